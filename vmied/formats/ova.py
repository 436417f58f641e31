"""OVA: an OVF package as one tar archive (DSP0243 §5.3), read by member index, written as a stream.

Map of an OVA (POSIX.1-1988 ustar, with GNU and pax extensions where a member needs them)::

    0      ustar header  name.ovf        (DSP0243: the descriptor is the first member)
    512    descriptor XML, padded to 512
           ustar header  name.mf         (manifest; optional, usually second)
           ustar header  name.cert       (certificate; optional, ignored)
           ustar header  name-disk1.vmdk, data, padding to 512
           ...           or name-disk1.vmdk.000000000, .000000001, ... (ovf:chunkSize)
           two zero blocks               (often missing: the archive may end right after the data)

A header that only changes the next one (GNU ``L`` long name, pax ``x`` records) is applied to it.

Reading walks the headers with ranged reads, skipping member data, so the index of a 100 GiB OVA
costs a few reads. Each disk is then a :class:`SliceSource` (a :class:`ConcatSource` of chunks,
a :class:`GunzipSource` for ``compression="gzip"``) opened with the format its content shows; the
manifest digests of its members are taken while that reader streams, and checked at the end.

Writing produces the same layout in one sequential pass: the descriptor member has a fixed,
generous size (the XML is padded with whitespace), the manifest's size follows from the file
names, and each disk's header is a placeholder filled once its streamOptimized VMDK is written.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from typing import ClassVar

from ..errors import CorruptImage, UnsupportedImage
from ..extents import Extent
from ..io.base import MiB, Sink, Source
from ..io.slice import ConcatSource, DigestingSource, GunzipSource, SliceSource
from ..pipeline import OrderedDigest, Workers
from . import ovf
from .base import ImageInfo, Reader, Writer
from .ovf import Descriptor, ManifestEntry, OvfDisk, OvfFile, VirtualSystem

# --- Tar structures (POSIX.1-2001 pax, GNU tar manual "Basic Tar Format") -------------------------

BLOCK = 512
#: name mode uid gid size mtime chksum typeflag linkname magic version uname gname devmajor devminor prefix
TAR_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12x")
USTAR_MAGICS = (b"ustar\x00", b"ustar ")  # POSIX ("ustar\0" "00") and GNU ("ustar " " \0")
CHECKSUM_OFFSET, CHECKSUM_LENGTH = 148, 8

REGULAR_TYPES = (b"0", b"\x00", b"7")  # file, old-style file, contiguous file
DIRECTORY, GNU_LONG_NAME, GNU_LONG_LINK, PAX_HEADER, PAX_GLOBAL = b"5", b"L", b"K", b"x", b"g"
LINK_OR_DEVICE = {
    b"1": "hard link",
    b"2": "symbolic link",
    b"3": "character device",
    b"4": "block device",
    b"6": "FIFO",
}

MAX_MEMBERS = 10_000
MAX_LONG_NAME = 64 * 1024
MAX_PAX = 1 * MiB
#: Largest size an octal ustar size field holds; larger members use GNU base-256.
OCTAL_SIZE_LIMIT = 8**11
#: Chunk member suffix: ".000000000", ".000000001", ...
CHUNK_SUFFIX = ".{:09d}"


@dataclass(frozen=True)
class TarHeader:
    name: str
    size: int
    typeflag: bytes
    linkname: str


@dataclass(frozen=True)
class Member:
    name: str
    offset: int  # of the member data in the archive
    size: int


def _corrupt(message: str, reason: str) -> CorruptImage:
    return CorruptImage(message, reason=f"ova.{reason}")


def _refuse(message: str, reason: str) -> UnsupportedImage:
    return UnsupportedImage(message, reason=f"ova.{reason}")


def _text(field: bytes) -> str:
    return field.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")


def parse_number(field: bytes, what: str) -> int:
    """A numeric header field: octal text, or GNU base-256 when the top bit of the first byte is set."""
    if field[:1] and field[0] & 0x80:
        if field[0] == 0xFF:
            raise _corrupt(f"tar header {what} is negative", "tar_header")
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\x00", 1)[0].strip(b" ")
    if not text:
        return 0
    if not all(48 <= c <= 55 for c in text):
        raise _corrupt(f"tar header {what} {field!r} is not an octal number", "tar_header")
    return int(text, 8)


def checksum_ok(block: bytes) -> bool:
    """The header checksum: the byte sum with the checksum field read as spaces (signed or not)."""
    stored_field = block[CHECKSUM_OFFSET : CHECKSUM_OFFSET + CHECKSUM_LENGTH]
    try:
        stored = parse_number(stored_field, "checksum")
    except CorruptImage:
        return False
    blanked = block[:CHECKSUM_OFFSET] + b" " * CHECKSUM_LENGTH + block[CHECKSUM_OFFSET + CHECKSUM_LENGTH :]
    unsigned = sum(blanked)
    signed = sum(b - 256 if b > 127 else b for b in blanked)
    return stored in (unsigned, signed)


def is_tar_header(block: bytes) -> bool:
    """Whether ``block`` is a ustar/GNU header (the probe: magic and a valid checksum)."""
    return len(block) >= BLOCK and block[257:263] in USTAR_MAGICS and checksum_ok(block[:BLOCK])


def parse_header(block: bytes, offset: int) -> TarHeader | None:
    """One header block; None for the zero block that ends an archive."""
    if block == bytes(BLOCK):
        return None
    if not checksum_ok(block):
        raise _corrupt(
            f"tar header at offset {offset} has a bad checksum: not a tar archive or a damaged one",
            "tar_checksum",
        )
    (
        name,
        _mode,
        _uid,
        _gid,
        size,
        _mtime,
        _chk,
        typeflag,
        linkname,
        magic,
        _version,
        _uname,
        _gname,
        _major,
        _minor,
        prefix,
    ) = TAR_HEADER.unpack(block)
    full = _text(name)
    if magic == b"ustar\x00" and prefix[:1] != b"\x00":
        full = f"{_text(prefix)}/{full}"
    return TarHeader(full, parse_number(size, "size"), typeflag, _text(linkname))


def pax_records(data: bytes) -> dict[str, str]:
    """pax extended header records: ``"<length> <key>=<value>\\n"`` each (POSIX.1-2001 pax)."""
    records: dict[str, str] = {}
    position = 0
    while position < len(data):
        space = data.find(b" ", position, position + 20)
        if space < 0 or not data[position:space].isdigit():
            break  # trailing NUL padding, as some writers leave
        length = int(data[position:space])
        record = data[space + 1 : position + length]
        if (
            length <= space - position
            or position + length > len(data)
            or not record.endswith(b"\n")
            or b"=" not in record
        ):
            raise _corrupt("tar pax header has a malformed record", "tar_pax")
        key, value = record[:-1].split(b"=", 1)
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        position += length
    return records


def pax_size(value: str | None, header_size: int) -> int:
    """The member size: a pax ``size`` record overrides the header's (for members past 8 GiB)."""
    if value is None:
        return header_size
    if not value.isdigit() or len(value) > 20:
        raise _corrupt(f"tar pax size {value[:40]!r} is not a number", "tar_pax")
    return int(value)


def member_name(name: str) -> str:
    """Member names as tar tools write them for files in the current directory."""
    while name.startswith("./"):
        name = name[2:]
    return name


def check_member_type(header: TarHeader) -> None:
    """An OVA holds plain files: links and devices are refused, and tar features vmied does not read."""
    if header.typeflag in LINK_OR_DEVICE:
        raise _refuse(
            f"OVA member {header.name!r} is a {LINK_OR_DEVICE[header.typeflag]}"
            + (f" to {header.linkname!r}" if header.linkname else "")
            + "; an OVA may only hold plain files",
            "member_type",
        )
    if header.typeflag not in (*REGULAR_TYPES, DIRECTORY):
        raise _refuse(
            f"OVA member {header.name!r} has tar type {header.typeflag!r}, which vmied does not read",
            "member_type",
        )


def padded_size(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def check_member_count(count: int) -> None:
    if count > MAX_MEMBERS:
        raise _refuse(f"OVA has more than {MAX_MEMBERS} members", "limits")


async def read_index(source: Source) -> list[Member]:
    """Walk the tar headers with ranged reads (member data is skipped, not read)."""
    members: list[Member] = []
    offset = 0
    pending: dict[str, str] = {}  # path/size for the next header, from GNU L or pax x records
    while offset + BLOCK <= source.size:
        header = parse_header(await source.read_exact(offset, BLOCK, "tar header"), offset)
        if header is None:
            break
        data_offset = offset + BLOCK
        size = pax_size(pending.get("size"), header.size)
        if data_offset + size > source.size:
            raise _corrupt(
                f"OVA member {header.name!r} ({size} bytes at offset {data_offset}) runs past the "
                f"end of the archive ({source.size} bytes)",
                "truncated",
            )
        if header.typeflag in (GNU_LONG_NAME, GNU_LONG_LINK, PAX_HEADER, PAX_GLOBAL):
            limit = MAX_LONG_NAME if header.typeflag in (GNU_LONG_NAME, GNU_LONG_LINK) else MAX_PAX
            if size > limit:
                raise _refuse(f"tar extension header of {size} bytes (limit {limit})", "limits")
            data = await source.read_exact(data_offset, size, "tar extension header")
            if header.typeflag == GNU_LONG_NAME:
                pending["path"] = _text(data)
            elif header.typeflag == PAX_HEADER:
                pending.update((k, v) for k, v in pax_records(data).items() if k in ("path", "size"))
        else:
            header = replace(header, name=pending.get("path", header.name), size=size)
            pending = {}
            check_member_type(header)
            if header.typeflag != DIRECTORY:
                members.append(Member(member_name(header.name), data_offset, size))
                check_member_count(len(members))
        offset = data_offset + padded_size(size)
    return members


# --- The appliance -------------------------------------------------------------------------------


def index_by_name(members: list[Member]) -> dict[str, Member]:
    by_name: dict[str, Member] = {}
    for member in members:
        if member.name in by_name:
            raise _corrupt(f"OVA holds two members named {member.name!r}", "duplicate_member")
        by_name[member.name] = member
    return by_name


def file_members(file: OvfFile, members: dict[str, Member]) -> list[Member]:
    """The members holding ``file``: itself, or its chunks; refuse missing members and wrong sizes."""
    if file.chunk_size is None:
        if file.href not in members:
            raise _corrupt(f"OVA does not contain {file.href}, which its descriptor references", "missing_file")
        found = [members[file.href]]
    else:
        found = []
        while (name := file.href + CHUNK_SUFFIX.format(len(found))) in members:
            found.append(members[name])
        if not found and file.href in members:
            found = [members[file.href]]  # one chunk only: some writers then keep the plain name
        if not found:
            raise _corrupt(
                f"OVA does not contain {file.href}{CHUNK_SUFFIX.format(0)}, the first chunk of {file.href}",
                "missing_file",
            )
        if any(m.size != file.chunk_size for m in found[:-1]) or found[-1].size > file.chunk_size:
            raise _corrupt(f"OVA chunks of {file.href} are not {file.chunk_size} bytes each", "file_size")
    total = sum(m.size for m in found)
    if file.size is not None and total != file.size:
        raise _corrupt(f"OVA member {file.href} holds {total} bytes; the descriptor says {file.size}", "file_size")
    return found


def gzip_limit(capacity: int) -> int:
    """Most bytes a compressed disk file may inflate to: a disk image never needs twice its capacity."""
    return 2 * capacity + 64 * MiB


@dataclass
class ApplianceDisk:
    """One disk of an appliance, in boot order; ``open()`` gives a Reader for it."""

    appliance: Appliance
    index: int
    disk: OvfDisk
    system: VirtualSystem | None
    file: OvfFile | None
    members: list[Member]
    content_format: str = ""  # what the disk file's content is ("empty" for a disk to create)

    async def source(self, digests: list[tuple[ManifestEntry, DigestingSource]] | None = None) -> Source:
        """The disk file as a source; with ``digests``, members listed in the manifest are digested."""
        assert self.file is not None
        parts: list[Source] = []
        for member in self.members:
            part: Source = SliceSource(self.appliance.source, member.offset, member.size, member.name)
            entry = self.appliance.manifest.get(member.name)
            if digests is not None and entry is not None:
                part = DigestingSource(part, entry.algorithm, self.appliance.workers)
                digests.append((entry, part))
            parts.append(part)
        source = parts[0] if len(parts) == 1 else ConcatSource(parts, self.file.href)
        if self.file.compression == "gzip":
            source = await GunzipSource.open(source, self.appliance.workers, gzip_limit(self.disk.capacity))
        return source

    async def open(self) -> OvaReader:
        """A reader of this disk; closing it leaves the appliance's source open for the other disks."""
        reader = OvaReader(self.appliance.source, self.appliance.workers)
        reader.owns_source = False
        await reader.load_disk(self.appliance, self.index)
        return reader

    def describe(self) -> dict[str, object]:
        return {
            "id": self.disk.id,
            "capacity": self.disk.capacity,
            "href": self.file.href if self.file else None,
            "format": self.content_format,
            "ovf_format": self.disk.format,
            "boot_order": self.index,
            "system": self.system.id if self.system else None,
            "os_hint": self.system.os.name if self.system and self.system.os else None,
        }


@dataclass
class Appliance:
    source: Source
    workers: Workers
    ovf_name: str
    descriptor: Descriptor
    manifest: dict[str, ManifestEntry]
    disks: list[ApplianceDisk]


async def read_member(source: Source, member: Member, limit: int, what: str) -> bytes:
    if member.size > limit:
        raise _refuse(f"OVA {what} {member.name} is {member.size} bytes (limit {limit})", "limits")
    return await source.read_exact(member.offset, member.size, f"OVA {what}")


async def load_manifest(
    source: Source, workers: Workers, by_name: dict[str, Member], ovf_member: Member, descriptor_bytes: bytes
) -> dict[str, ManifestEntry]:
    """The manifest (``<descriptor name>.mf``, else any ``.mf``), with its entries' members present and
    the descriptor's digest checked."""
    own = os.path.splitext(ovf_member.name)[0].lower() + ".mf"
    manifests = sorted(
        (m for m in by_name.values() if m.name.lower().endswith(".mf")), key=lambda m: m.name.lower() != own
    )
    if not manifests:
        return {}
    manifest = await workers.run(
        ovf.parse_manifest, await read_member(source, manifests[0], ovf.MAX_MANIFEST, "manifest")
    )
    for name in manifest:
        if name not in by_name:
            raise _corrupt(f"OVA manifest lists {name}, which the archive does not contain", "missing_file")
    entry = manifest.get(ovf_member.name)
    if entry is not None:
        digest = await workers.run(lambda: hashlib.new(entry.algorithm.lower(), descriptor_bytes).hexdigest())
        ovf.check_digest(entry, digest)
    return manifest


async def open_appliance(source: Source, workers: Workers) -> Appliance:
    """Index the archive, parse and check the descriptor and manifest, and list the disks in boot order.

    Everything that can be refused before disk data moves is refused here, including a disk file
    whose content is not an image vmied reads (each disk's metadata is opened once to check it).
    """
    members = await read_index(source)
    if not members or not members[0].name.lower().endswith(".ovf"):
        first = repr(members[0].name) if members else "nothing"
        raise _refuse(f"OVA has no OVF descriptor as its first member (it starts with {first})", "no_ovf")
    by_name = index_by_name(members)
    descriptor_bytes = await read_member(source, members[0], ovf.MAX_DESCRIPTOR, "descriptor")
    descriptor = await workers.run(ovf.parse_descriptor, descriptor_bytes)  # up to 16 MiB of XML
    manifest = await load_manifest(source, workers, by_name, members[0], descriptor_bytes)
    appliance = Appliance(source, workers, members[0].name, descriptor, manifest, [])
    for index, (disk, system) in enumerate(descriptor.disk_order()):
        file = descriptor.files[disk.file_ref] if disk.file_ref else None
        found = file_members(file, by_name) if file else []
        appliance.disks.append(ApplianceDisk(appliance, index, disk, system, file, found))
    if not appliance.disks:
        raise _refuse("OVA descriptor lists no disks", "no_disk")
    for entry in appliance.disks:
        entry.content_format = await disk_format(entry)
    return appliance


# --- Reader ----------------------------------------------------------------------------------------


class OvaReader(Reader):
    """An OVA: ``extents()`` streams one disk (the boot disk unless opened through ``Appliance.disks``)."""

    format = "ova"

    def __init__(self, source: Source, workers: Workers) -> None:
        super().__init__(source, workers)
        self.appliance: Appliance | None = None
        self.disk: ApplianceDisk | None = None
        self.inner: Reader | None = None
        self.digests: list[tuple[ManifestEntry, DigestingSource]] = []
        self.owns_source = True

    @classmethod
    def probe(cls, head: bytes, tail: bytes, size: int) -> bool:
        # any ustar archive: load() then names what is wrong with one that is not an OVA
        return is_tar_header(head)

    async def load(self) -> None:
        await self.load_disk(await open_appliance(self.source, self.workers), 0)

    async def load_disk(self, appliance: Appliance, index: int) -> None:
        self.appliance, self.disk = appliance, appliance.disks[index]
        if self.disk.file is None:  # an empty disk the descriptor asks the importer to create
            self.virtual_size = self.disk.disk.capacity
            return
        self.inner = await open_inner(await self.disk.source(self.digests), self.workers)
        self.virtual_size = self.inner.virtual_size

    async def extents(self) -> AsyncIterator[Extent]:
        if self.inner is None:
            yield Extent.zero(0, self.virtual_size)
            return
        async for extent in self.inner.extents():
            yield extent
        for entry, source in self.digests:  # the stream is complete: now the manifest can be checked
            ovf.check_digest(entry, await source.finish())

    def info(self) -> ImageInfo:
        assert self.appliance is not None and self.disk is not None
        inner = self.inner.info() if self.inner else None
        disks = [disk.describe() for disk in self.appliance.disks]
        problems = list(inner.problems) if inner else []
        if self.virtual_size != self.disk.disk.capacity:
            problems.append(
                f"disk {self.disk.disk.id} holds {self.virtual_size} bytes; the descriptor says "
                f"{self.disk.disk.capacity}"
            )
        return ImageInfo(
            "ova",
            self.virtual_size,
            subformat=inner.format if inner else "empty",
            allocated_bytes=self.source.size,
            cluster_size=inner.cluster_size if inner else None,
            problems=problems,
            details={
                "ovf_version": self.appliance.descriptor.version,
                "descriptor": self.appliance.ovf_name,
                "manifest": bool(self.appliance.manifest),
                "disks": disks,
            },
        )

    async def close(self) -> None:
        if self.inner is not None:
            await self.inner.close()
        if self.owns_source:
            await super().close()


async def open_inner(source: Source, workers: Workers) -> Reader:
    """The disk file's reader, chosen from its content (an OVA inside an OVA is refused)."""
    from . import detect  # the registry imports this module

    cls = await detect(source)
    if cls is OvaReader:
        raise _refuse(f"OVA member {source.name} is itself a tar archive", "nested")
    return await cls.open(source, workers)


async def disk_format(disk: ApplianceDisk) -> str:
    """Check that a disk's content is an image vmied reads, before any data moves; its format name."""
    if disk.file is None:
        return "empty"
    reader = await open_inner(await disk.source(), disk.appliance.workers)
    await reader.close()
    return reader.format


# --- Writer ----------------------------------------------------------------------------------------


class MemberSink(Sink):
    """A tar member written into the outer sink: its bytes are counted and digested on their way.

    Writes are buffered (so small writes are digested in megabyte batches in the pool); a
    placeholder may be filled while its bytes are still buffered, not after they were digested.
    """

    def __init__(self, outer: Sink, name: str) -> None:
        super().__init__(buffer_size=4 * MiB)
        self.outer, self.name = outer, name
        self._digest = OrderedDigest(depth=4)  # hashed on its own thread while the writer goes on
        self.sha256 = ""  # hex digest, once committed

    async def _write_at(self, offset: int, data: bytes) -> None:
        await self._digest.feed([data])
        await self.outer.write(data)

    async def _fill(self, offset: int, data: bytes) -> None:
        raise ValueError(f"{self.name}: an OVA member is digested as it is written and cannot be patched")

    async def _finish(self, size: int) -> None:
        try:
            self.sha256 = await self._digest.hexdigest()
        finally:
            self._digest.close()

    async def abort(self) -> None:
        self._digest.close()  # the outer sink is aborted by whoever owns it


def tar_header(name: str, size: int, mtime: int) -> bytes:
    """A POSIX ustar header for a regular file (GNU base-256 size past 8 GiB)."""
    encoded = name.encode()
    if len(encoded) > 100:
        raise ValueError(f"member name {name!r} is longer than 100 bytes")
    size_field = (b"%011o\x00" % size) if size < OCTAL_SIZE_LIMIT else b"\x80" + size.to_bytes(11, "big")
    fields = TAR_HEADER.pack(
        encoded,
        b"0000644\x00",
        b"0000000\x00",
        b"0000000\x00",
        size_field,
        b"%011o\x00" % mtime,
        b" " * 8,
        b"0",
        b"",
        b"ustar\x00",
        b"00",
        b"root",
        b"root",
        b"",
        b"",
        b"",
    )
    checksum = b"%06o\x00 " % sum(fields)
    return fields[:CHECKSUM_OFFSET] + checksum + fields[CHECKSUM_OFFSET + CHECKSUM_LENGTH :]


def appliance_name(sink_name: str) -> str:
    """The file name stem for the descriptor and disks, from the output's name."""
    stem = os.path.splitext(os.path.basename(sink_name))[0]
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem)[:48].strip("._") or "vm"


def descriptor_room(hardware: ovf.Hardware, hrefs: list[str], capacities: list[int]) -> int:
    """Bytes reserved for the descriptor: its text with every number at its widest, rounded up."""
    widest = 10**20 - 1
    text = ovf.build_descriptor(
        hardware, [ovf.DiskSpec(h, c, widest, widest) for h, c in zip(hrefs, capacities, strict=True)]
    )
    return padded_size(len(text) + BLOCK)


async def pad_member(sink: Sink, size: int) -> None:
    await sink.write_zeros(padded_size(size) - size)


async def write_appliance(
    sink: Sink,
    disks: list[tuple[str, int, AsyncIterator[Extent]]],
    workers: Workers,
    hardware: ovf.Hardware | None = None,
    adapter_type: str = "lsilogic",
    *,
    mtime: int | None = None,
    disk_options: Mapping[str, str] | None = None,
) -> None:
    """Write an OVA (OVF 1.0, SHA256 manifest, one streamOptimized VMDK per disk; boot disk first).

    ``disks`` are ``(file name, virtual size, extent stream)``; the streams are consumed in order.
    ``mtime`` (tar member times, default now) and ``disk_options`` (more VMDK writer options, e.g.
    ``cid``) make the output reproducible. The caller commits or aborts the sink.
    """
    from .vmdk import VmdkWriter  # the registry imports this module

    hardware = hardware or ovf.Hardware(name=appliance_name(sink.name))
    hrefs = [ovf.check_href(name) for name, _, _ in disks]
    if len(set(hrefs)) != len(hrefs) or not hrefs:
        raise ValueError("an appliance needs one or more disks with distinct file names")
    mtime, stem = int(time.time()) if mtime is None else mtime, appliance_name(hardware.name)
    ovf_name, mf_name = f"{stem}.ovf", f"{stem}.mf"
    room = descriptor_room(hardware, hrefs, [size for _, size, _ in disks])
    await sink.write(tar_header(ovf_name, room, mtime))
    descriptor_slot = await sink.reserve(room)
    manifest_size = sum(len(ovf.manifest_line(n, "0" * 64)) for n in (ovf_name, *hrefs))
    await sink.write(tar_header(mf_name, manifest_size, mtime))
    manifest_slot = await sink.reserve(manifest_size)
    await pad_member(sink, manifest_size)
    specs, digests = [], []
    for href, virtual_size, extents in disks:
        header_slot = await sink.reserve(BLOCK)
        member = MemberSink(sink, href)
        try:
            await VmdkWriter(
                member, virtual_size,
                {**(disk_options or {}), "subformat": "streamOptimized", "adapter_type": adapter_type}, workers
            ).write(extents)
            await member.commit()
        except BaseException:
            await member.abort()
            raise
        await sink.fill(header_slot, tar_header(href, member.position, mtime))
        await pad_member(sink, member.position)
        specs.append(ovf.DiskSpec(href, virtual_size, member.position))
        digests.append(member.sha256)
    await sink.write_zeros(2 * BLOCK)
    descriptor = ovf.padded(ovf.build_descriptor(hardware, specs), room)
    await sink.fill(descriptor_slot, descriptor)
    lines = [ovf.manifest_line(ovf_name, hashlib.sha256(descriptor).hexdigest())]
    lines += [ovf.manifest_line(href, digest) for href, digest in zip(hrefs, digests, strict=True)]
    await sink.fill(manifest_slot, b"".join(lines))


class OvaWriter(Writer):
    """One disk as an OVA appliance (VMware and VirtualBox import it)."""

    format = "ova"
    options: ClassVar[dict[str, tuple[str, ...] | None]] = {"adapter_type": ("lsilogic", "ide")}

    async def write(self, extents: AsyncIterator[Extent]) -> None:
        adapter = self.opts.get("adapter_type", "lsilogic")
        name = appliance_name(self.sink.name)
        hardware = ovf.Hardware(name=name, controller="lsilogic" if adapter == "lsilogic" else "PIIX4")
        await write_appliance(
            self.sink, [(f"{name}-disk1.vmdk", self.virtual_size, extents)], self.workers, hardware, adapter
        )
