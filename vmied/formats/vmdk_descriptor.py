"""The VMDK text descriptor (VMware Virtual Disk Format 1.1, §4 "The Descriptor File").

A descriptor is either a separate small text file or embedded in a sparse extent. It is parsed as
hostile text: capped in size (qemu uses the same 1 MiB cap), decoded as UTF-8 or windows-1252,
CRLF, comments and trailing spaces tolerated, every number bounded.

    # Disk DescriptorFile
    version=1
    encoding="UTF-8"
    CID=fffffffe
    parentCID=ffffffff                 <- anything else: a delta disk, refused
    createType="monolithicSparse"

    # Extent description
    RW 16777216 SPARSE "disk.vmdk"     <- access, size in sectors, type, file name[, offset]

    # The Disk Data Base
    ddb.adapterType = "lsilogic"
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from ..errors import CorruptImage, UnsupportedImage

#: Largest descriptor accepted, embedded or separate (qemu: 1 MiB).
MAX_DESCRIPTOR = 1 << 20
#: Largest number of extent lines (twoGbMaxExtent of a 62 TiB disk needs ~32k).
MAX_EXTENTS = 65536
#: VMDK's limit for a virtual disk: 62 TiB, rounded up to 64 TiB.
MAX_CAPACITY_SECTORS = (64 << 40) // 512
NO_PARENT = "ffffffff"
MAGIC_LINE = b"# Disk DescriptorFile"

#: createType values vmied converts, and those it refuses with the reason.
SUPPORTED_CREATE_TYPES = frozenset({
    "monolithicsparse", "monolithicflat", "twogbmaxextentsparse", "twogbmaxextentflat",
    "streamoptimized", "vmfs", "vmfsthin", "vmfspreallocated", "vmfseagerzeroedthick",
})
REFUSED_CREATE_TYPES = {
    "vmfssparse": "vmfsSparse (an ESX delta disk)",
    "sesparse": "SEsparse (a space-efficient snapshot delta)",
    "vmfsraw": "a raw device mapping",
    "vmfsrawdevicemap": "a raw device mapping",
    "vmfspassthroughrawdevicemap": "a raw device mapping",
    "fulldevice": "a raw physical device",
    "partitioneddevice": "raw physical partitions",
}
EXTENT_TYPES = frozenset({"SPARSE", "FLAT", "ZERO", "VMFS"})
REFUSED_EXTENT_TYPES = {
    "VMFSSPARSE": "vmfsSparse delta extent",
    "SESPARSE": "SEsparse delta extent",
    "VMFSRDM": "raw device mapping extent",
    "VMFSRAW": "raw device mapping extent",
}
_EXTENT_LINE = re.compile(r"^(RW|RDONLY|NOACCESS)\s+(\d+)\s+(\S+)(?:\s+(.*))?$")
_KEY_LINE = re.compile(r"^([A-Za-z0-9_.]+)\s*=\s*(.*)$")


@dataclass(frozen=True)
class ExtentLine:
    access: str
    sectors: int
    type: str
    filename: str = ""
    offset: int = 0  # in sectors, FLAT/VMFS only


@dataclass
class Descriptor:
    create_type: str = ""
    cid: str = ""
    parent_cid: str = NO_PARENT
    extents: list[ExtentLine] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def capacity_sectors(self) -> int:
        return sum(extent.sectors for extent in self.extents)


def decode(raw: bytes) -> str:
    """Descriptor bytes as text: NUL padding cut, UTF-8 or else windows-1252 (never fails)."""
    if len(raw) > MAX_DESCRIPTOR:
        raise CorruptImage(f"VMDK descriptor of {len(raw)} bytes exceeds the {MAX_DESCRIPTOR}-byte cap",
                           reason="vmdk.descriptor-size")
    raw = raw.split(b"\x00", 1)[0]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def parse_extent_line(line: str) -> ExtentLine:
    """``RW 2048 FLAT "name-flat.vmdk" 0``; sizes and offsets bounded."""
    match = _EXTENT_LINE.match(line)
    if not match:
        raise CorruptImage(f"VMDK descriptor extent line not understood: {line[:120]!r}",
                           reason="vmdk.descriptor-syntax")
    access, sectors_text, kind, rest = match.groups()
    sectors = int(sectors_text)
    kind = kind.upper()
    if kind in REFUSED_EXTENT_TYPES:
        raise UnsupportedImage(f"VMDK {REFUSED_EXTENT_TYPES[kind]} is not supported", reason="vmdk.extent-type")
    if kind not in EXTENT_TYPES:
        raise UnsupportedImage(f"VMDK extent type {kind} is not supported", reason="vmdk.extent-type")
    if sectors > MAX_CAPACITY_SECTORS:
        raise CorruptImage(f"VMDK extent of {sectors} sectors is larger than any VMDK can be",
                           reason="vmdk.capacity")
    filename, offset = "", 0
    if rest:
        try:
            parts = shlex.split(rest)
        except ValueError:
            raise CorruptImage(f"VMDK extent line has unbalanced quotes: {line[:120]!r}",
                               reason="vmdk.descriptor-syntax") from None
        filename = parts[0] if parts else ""
        if len(parts) > 1:
            if not parts[1].isdigit() or int(parts[1]) > MAX_CAPACITY_SECTORS:
                raise CorruptImage(f"VMDK extent offset {parts[1]!r} is not a sector count",
                                   reason="vmdk.descriptor-syntax")
            offset = int(parts[1])
    if kind != "ZERO" and not filename:
        raise CorruptImage(f"VMDK {kind} extent names no file", reason="vmdk.descriptor-syntax")
    return ExtentLine(access, sectors, kind, filename, offset)


def parse(raw: bytes) -> Descriptor:
    """Parse descriptor text and refuse what vmied does not convert (deltas, device mappings)."""
    descriptor = Descriptor()
    extent_lines: list[str] = []
    for number, line in enumerate(decode(raw).splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.split(None, 1)[0] in ("RW", "RDONLY", "NOACCESS"):
            if len(extent_lines) >= MAX_EXTENTS:
                raise CorruptImage("VMDK descriptor lists too many extents", reason="vmdk.descriptor-size")
            extent_lines.append(line)
            continue
        match = _KEY_LINE.match(line)
        if not match:
            raise CorruptImage(f"VMDK descriptor line {number} not understood: {line[:120]!r}",
                               reason="vmdk.descriptor-syntax")
        descriptor.keys[match.group(1)] = _unquote(match.group(2))
    descriptor.create_type = descriptor.keys.get("createType", "")
    descriptor.cid = descriptor.keys.get("CID", "")
    descriptor.parent_cid = descriptor.keys.get("parentCID", NO_PARENT)
    check_not_delta(descriptor)
    check_create_type(descriptor.create_type)
    descriptor.extents = [parse_extent_line(line) for line in extent_lines]
    return descriptor


def check_not_delta(descriptor: Descriptor) -> None:
    """A delta (child) disk is only meaningful with its parent: refuse it by name."""
    if descriptor.parent_cid.lower() != NO_PARENT:
        hint = descriptor.keys.get("parentFileNameHint", "")
        raise UnsupportedImage(
            f"VMDK is a delta disk (parentCID {descriptor.parent_cid}"
            + (f", parent {hint!r}" if hint else "") + "); convert the flattened disk instead",
            reason="vmdk.delta",
        )
    if "parentFileNameHint" in descriptor.keys:
        raise UnsupportedImage(
            f"VMDK is a delta disk (parent {descriptor.keys['parentFileNameHint']!r}); "
            "convert the flattened disk instead",
            reason="vmdk.delta",
        )


def check_create_type(create_type: str) -> None:
    kind = create_type.lower()
    if kind in REFUSED_CREATE_TYPES:
        raise UnsupportedImage(f"VMDK createType {create_type!r} is {REFUSED_CREATE_TYPES[kind]}: not supported",
                               reason="vmdk.create-type")
    if kind not in SUPPORTED_CREATE_TYPES:
        raise UnsupportedImage(f"VMDK createType {create_type!r} is not supported", reason="vmdk.create-type")


def render(create_type: str, capacity_sectors: int, filename: str, *, cid: int,
           adapter: str = "lsilogic", hw_version: str = "4") -> bytes:
    """A descriptor as VMware writes one for a single-extent sparse disk."""
    heads, sectors = 255, 63
    cylinders = max(1, min(65535, capacity_sectors // (heads * sectors)))
    lines = [
        "# Disk DescriptorFile",
        "version=1",
        'encoding="UTF-8"',
        f"CID={cid:08x}",
        f"parentCID={NO_PARENT}",
        f'createType="{create_type}"',
        "",
        "# Extent description",
        f'RW {capacity_sectors} SPARSE "{filename}"',
        "",
        "# The Disk Data Base",
        "#DDB",
        "",
        f'ddb.virtualHWVersion = "{hw_version}"',
        f'ddb.geometry.cylinders = "{cylinders}"',
        f'ddb.geometry.heads = "{heads}"',
        f'ddb.geometry.sectors = "{sectors}"',
        f'ddb.adapterType = "{adapter}"',
        'ddb.toolsInstallType = "4"',
        'ddb.toolsVersion = "2147483647"',
        "",
    ]
    return "\n".join(lines).encode()
