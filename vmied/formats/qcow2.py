"""qcow2, QEMU's copy-on-write format: read versions 2 and 3, write version 3.

Spec: qemu docs/interop/qcow2.txt ("QCOW2 Image Format"); field and flag names follow qemu's
block/qcow2.h, compression follows block/qcow2-threads.c (raw deflate with a 4 KiB window, or
one zstd frame per cluster).

A file is cut into clusters of ``2**cluster_bits`` bytes (512 B to 2 MiB). Guest offsets are
translated through two levels of tables; nothing else is needed to read the active disk::

    guest offset ──▶ L1 index ──▶ L1 entry ──▶ L2 table (one cluster) ──▶ L2 entry ──▶ host cluster
                     (offset >> (cluster_bits + l2_bits))       (offset >> cluster_bits) & (l2_entries-1)

Refcounts (refcount table → refcount blocks → one counter per host cluster) only matter to a
writer; a reader ignores them. Internal snapshots have their own L1 tables; the active one is read.

ASCII map of a file this module writes (strictly sequential; only the first two items are
placeholders, filled once the end is known)::

    cluster 0      header (v3, 112 bytes) + end-of-extensions marker          [placeholder]
    cluster 1..    L1 table, sized from the virtual size                       [placeholder]
    ...            data clusters of L2 region 0 in guest order (compressed clusters packed
                   byte-wise, as qemu packs them), then the L2 table of region 0,
                   data of region 1, its L2 table, ... (regions without data get no table)
    ...            a refcount block, whenever the file grows past the host range one covers
    end            the remaining refcount blocks, then the refcount table

Reader memory: the L1 entries mapping the virtual size and a sorted index of the L2 tables
(8 bytes each, both capped at qemu's 32 MiB L1 limit: 16 KiB for a 1 TiB disk with 64 KiB
clusters), two L2 tables being parsed, and the runs in flight (each read at most 4 MiB).

Writer memory: the L1 table (8 bytes per L2 region, at most 32 MiB as qemu caps it: 16 KiB for
a 1 TiB disk with 64 KiB clusters), one L2 table and one or two refcount blocks (one cluster
each), the refcount table (8 bytes per refcount block: 4 KiB per TiB of output at 64 KiB
clusters), plus the pipeline's batches in flight. It does not grow with the amount of data.
"""

from __future__ import annotations

import enum
import struct
import sys
import zlib
from array import array
from bisect import bisect_left
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import ClassVar

import deflate
from isal import isal_zlib

from ..errors import CorruptImage, UnsupportedImage, UsageError
from ..extents import Buffer, Extent, Kind, blocks
from ..fastio import is_zero
from ..io.base import Sink
from ..pipeline import Workers, ordered_map
from .base import ImageInfo, Reader, Writer, inflated
from .raw import split_zero_runs

# --------------------------------------------------------------------------------------------
# On-disk structures (big-endian throughout; qcow2.txt "Header")
# --------------------------------------------------------------------------------------------

MAGIC = b"QFI\xfb"
#: magic, version, backing_file_offset, backing_file_size, cluster_bits, size, crypt_method,
#: l1_size, l1_table_offset, refcount_table_offset, refcount_table_clusters, nb_snapshots,
#: snapshots_offset: bytes 0-71, the whole version 2 header.
HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
#: incompatible_features, compatible_features, autoclear_features, refcount_order,
#: header_length: bytes 72-103 (version 3).
HEADER_V3 = struct.Struct(">QQQII")
#: compression_type (byte 104, present when header_length > 104) and padding to 112.
HEADER_COMPRESSION = struct.Struct(">B7x")
V3_HEADER_LENGTH = HEADER_V2.size + HEADER_V3.size + HEADER_COMPRESSION.size  # 112
#: Header extension: type, length; data padded to 8 bytes follows (qcow2.txt "Header extensions").
EXTENSION = struct.Struct(">II")

MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21
DEFAULT_CLUSTER_SIZE = 64 * 1024
MAX_BACKING_NAME = 1023
#: qemu's caps (block/qcow2.h QCOW_MAX_L1_SIZE, QCOW_MAX_REFTABLE_SIZE): tables larger than this
#: are refused by qemu too, and bound what vmied ever allocates for them.
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536

CRYPT_METHODS = {1: "AES", 2: "LUKS"}

# Incompatible feature bits (qcow2.txt bytes 72-79)
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)
COMPAT_LAZY_REFCOUNTS = 1 << 0

COMPRESSION_ZLIB, COMPRESSION_ZSTD = 0, 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

# Header extension types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_DATA_FILE = 0x44415441
FEATURE_NAME = struct.Struct(">BB46s")  # type (0 incompatible), bit number, name

# L1 / L2 entries (qcow2.txt "Cluster mapping")
OFLAG_COPIED = 1 << 63  # refcount is exactly one
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0  # standard L2 entries, version 3 only
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
COMPRESSED_SECTOR = SECTOR = 512
#: Extended L2 entries: 32 subclusters; bitmap bits 0-31 "allocated", 32-63 "reads as zero".
SUBCLUSTERS = 32
ALL_ALLOC = (1 << SUBCLUSTERS) - 1

#: Refcount width vmied writes (qemu's default, refcount_order 4).
WRITE_REFCOUNT_ORDER = 4

#: Largest single data read and largest batch of compressed clusters handed to a worker.
MAX_RUN = 4 << 20
#: A gap up to this size between compressed clusters is read through rather than split.
COMPRESSED_GAP = 64 * 1024


@dataclass(frozen=True, slots=True)
class Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = HEADER_V2.size
    compression_type: int = COMPRESSION_ZLIB

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible & INCOMPAT_EXTL2)

    def pack(self) -> bytes:
        """The version 3 header bytes (what the writer stores at offset 0)."""
        return (
            HEADER_V2.pack(
                MAGIC,
                self.version,
                self.backing_file_offset,
                self.backing_file_size,
                self.cluster_bits,
                self.size,
                self.crypt_method,
                self.l1_size,
                self.l1_table_offset,
                self.refcount_table_offset,
                self.refcount_table_clusters,
                self.nb_snapshots,
                self.snapshots_offset,
            )
            + HEADER_V3.pack(
                self.incompatible, self.compatible, self.autoclear, self.refcount_order, self.header_length
            )
            + HEADER_COMPRESSION.pack(self.compression_type)
        )


@dataclass(frozen=True, slots=True)
class Geometry:
    """Everything entry parsing needs, derived from a validated header and the file size."""

    cluster_bits: int
    virtual_size: int
    file_size: int
    version: int
    extended_l2: bool

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // (16 if self.extended_l2 else 8)

    @property
    def region_size(self) -> int:
        """Guest bytes one L2 table maps."""
        return self.l2_entries * self.cluster_size

    @property
    def l1_entries(self) -> int:
        """L1 entries needed to map the virtual size (qemu's size_to_l1)."""
        return -(-self.virtual_size // self.region_size)

    @property
    def csize_shift(self) -> int:
        """Compressed L2 entries: host offset below this bit, extra sector count above."""
        return 62 - (self.cluster_bits - 8)


def from_big_endian(typecode: str, raw: Buffer) -> array[int]:
    """Table entries as integers (the structure layer's one place for byte order)."""
    values = array(typecode, raw)
    if sys.byteorder == "little":
        values.byteswap()
    return values


def big_endian(values: array[int]) -> bytes:
    if sys.byteorder == "big":
        return values.tobytes()
    swapped = array(values.typecode, values)
    swapped.byteswap()
    return swapped.tobytes()


# --------------------------------------------------------------------------------------------
# Bounded parsing and the named safety checks
# --------------------------------------------------------------------------------------------


def parse_header(buf: bytes) -> Header:
    """The header fields (versions 2 and 3) from the first bytes of the file, shape-checked."""
    if len(buf) < HEADER_V2.size or buf[:4] != MAGIC:
        raise CorruptImage("not a qcow2 image (no QFI\\xfb magic or header cut short)", reason="qcow2.header")
    fields = HEADER_V2.unpack_from(buf)
    version = fields[1]
    if version not in (2, 3):
        raise UnsupportedImage(
            f"qcow version {version} is not supported (only qcow2 versions 2 and 3)", reason="qcow2.version"
        )
    header = Header(*fields[1:])
    if version == 3:
        if len(buf) < HEADER_V2.size + HEADER_V3.size:
            raise CorruptImage("qcow2 v3 header cut short", reason="qcow2.header")
        incompatible, compatible, autoclear, refcount_order, header_length = HEADER_V3.unpack_from(
            buf, HEADER_V2.size
        )
        if header_length < HEADER_V2.size + HEADER_V3.size or header_length % 8 or header_length > len(buf):
            raise CorruptImage(f"qcow2 header length {header_length} is invalid", reason="qcow2.header")
        compression = buf[104] if header_length > 104 else COMPRESSION_ZLIB
        header = replace(
            header,
            incompatible=incompatible,
            compatible=compatible,
            autoclear=autoclear,
            refcount_order=refcount_order,
            header_length=header_length,
            compression_type=compression,
        )
    check_header(header)
    return header


def check_header(header: Header) -> None:
    """Field ranges qemu insists on (qcow2_do_open) before anything is used as an offset."""
    if not MIN_CLUSTER_BITS <= header.cluster_bits <= MAX_CLUSTER_BITS:
        raise CorruptImage(
            f"qcow2 cluster_bits {header.cluster_bits} is outside 9..21", reason="qcow2.cluster_bits"
        )
    if header.header_length > header.cluster_size:
        raise CorruptImage("qcow2 header is larger than one cluster", reason="qcow2.header")
    if header.refcount_order > 6:
        raise CorruptImage(
            f"qcow2 refcount_order {header.refcount_order} is above 6", reason="qcow2.refcount_order"
        )
    if header.extended_l2 and header.cluster_bits < 14:
        raise CorruptImage(
            "qcow2 extended L2 entries need clusters of at least 16 KiB", reason="qcow2.extended_l2"
        )
    if header.nb_snapshots > MAX_SNAPSHOTS:
        raise CorruptImage(f"qcow2 claims {header.nb_snapshots} snapshots", reason="qcow2.snapshots")


def parse_extensions(buf: bytes, start: int, end: int) -> dict[int, bytes]:
    """Header extensions between ``start`` and ``end`` (the end of the first cluster)."""
    found: dict[int, bytes] = {}
    position = start
    while position + EXTENSION.size <= end:
        kind, length = EXTENSION.unpack_from(buf, position)
        if kind == EXT_END:
            break
        data_start = position + EXTENSION.size
        if data_start + length > end:
            raise CorruptImage(
                f"qcow2 header extension {kind:#010x} runs past the first cluster", reason="qcow2.extension"
            )
        found.setdefault(kind, buf[data_start : data_start + length])
        position = data_start + (length + 7) // 8 * 8
    return found


def feature_names(table: bytes | None) -> dict[int, str]:
    """Names of incompatible feature bits from the feature name table extension."""
    names: dict[int, str] = {}
    for position in range(0, len(table or b"") - FEATURE_NAME.size + 1, FEATURE_NAME.size):
        kind, bit, raw = FEATURE_NAME.unpack_from(table or b"", position)
        if kind == 0 and bit < 64:
            names[bit] = raw.rstrip(b"\x00").decode("utf-8", "replace")
    return names


def check_refusals(header: Header, extensions: dict[int, bytes], backing_name: str | None) -> None:
    """Well-formed images vmied will not convert, each refused by name."""
    if header.crypt_method:
        method = CRYPT_METHODS.get(header.crypt_method, f"method {header.crypt_method}")
        raise UnsupportedImage(
            f"qcow2 image is encrypted ({method}); encrypted images are not supported",
            reason="qcow2.encrypted",
        )
    if backing_name is not None:
        backing_format = extensions.get(EXT_BACKING_FORMAT, b"").decode("utf-8", "replace")
        raise UnsupportedImage(
            f"qcow2 image has a backing file {backing_name!r}"
            + (f" (format {backing_format})" if backing_format else "")
            + ": it only holds the differences from that "
            "image; convert the full chain first (qemu-img convert) and import the result",
            reason="qcow2.backing_file",
        )
    if header.incompatible & INCOMPAT_DATA_FILE:
        name = extensions.get(EXT_DATA_FILE, b"").decode("utf-8", "replace")
        raise UnsupportedImage(
            f"qcow2 image keeps its data in an external data file {name or '(unnamed)'!r}; not supported",
            reason="qcow2.data_file",
        )
    if header.incompatible & INCOMPAT_CORRUPT:
        raise CorruptImage(
            "qcow2 image is marked corrupt (incompatible feature bit 1); repair it with "
            "qemu-img check -r all first",
            reason="qcow2.corrupt_bit",
        )
    unknown = header.incompatible & ~INCOMPAT_KNOWN
    if unknown:
        names = feature_names(extensions.get(EXT_FEATURE_NAMES))
        bits = [bit for bit in range(64) if unknown >> bit & 1]
        described = ", ".join(f"bit {bit}" + (f" ({names[bit]})" if bit in names else "") for bit in bits)
        raise UnsupportedImage(
            f"qcow2 image uses unknown incompatible features: {described}",
            reason="qcow2.incompatible_feature",
        )
    if header.incompatible & INCOMPAT_COMPRESSION and header.compression_type not in COMPRESSION_NAMES:
        raise UnsupportedImage(
            f"qcow2 compression type {header.compression_type} is not supported",
            reason="qcow2.compression_type",
        )
    if not header.incompatible & INCOMPAT_COMPRESSION and header.compression_type != COMPRESSION_ZLIB:
        raise CorruptImage(
            "qcow2 compression type set without its incompatible feature bit", reason="qcow2.compression_type"
        )


def check_l1_size(header: Header, geometry: Geometry) -> int:
    """L1 entries to read: those mapping the virtual size, within qemu's cap and the header's count."""
    needed = geometry.l1_entries
    if header.l1_size > MAX_L1_BYTES // 8 or needed > MAX_L1_BYTES // 8:
        raise CorruptImage(
            f"qcow2 L1 table size is absurd: {max(header.l1_size, needed)} entries (qemu's limit is "
            f"{MAX_L1_BYTES // 8}) for a virtual size of {header.size} bytes",
            reason="qcow2.l1_size",
        )
    if header.l1_size < needed:
        raise CorruptImage(
            f"qcow2 L1 table has {header.l1_size} entries, too few for a virtual size of "
            f"{header.size} bytes ({needed} needed)",
            reason="qcow2.l1_size",
        )
    return needed


def check_table(offset: int, length: int, cluster_size: int, file_size: int, what: str) -> None:
    """A metadata table must start on a cluster boundary and lie inside the file."""
    if offset % cluster_size:
        raise CorruptImage(
            f"qcow2 {what} offset {offset:#x} is not cluster aligned", reason="qcow2.unaligned"
        )
    if length and (offset == 0 or offset + length > file_size):
        raise CorruptImage(
            f"qcow2 {what} at {offset:#x} (+{length} bytes) lies outside the file ({file_size} bytes)",
            reason="qcow2.offset_past_end",
        )


@dataclass
class Metadata:
    """Host ranges holding metadata: data clusters must not overlap them."""

    cluster_size: int
    ranges: list[tuple[int, int, str]] = field(default_factory=list)
    #: host cluster numbers of the L2 tables, sorted (8 bytes each: at most 32 MiB, like the L1)
    l2_clusters: array[int] = field(default_factory=lambda: array("Q"))

    def what_overlaps(self, offset: int, length: int) -> str | None:
        for start, end, what in self.ranges:
            if offset < end and start < offset + length:
                return what
        first, last = offset // self.cluster_size, (offset + max(length, 1) - 1) // self.cluster_size
        index = bisect_left(self.l2_clusters, first)
        if index < len(self.l2_clusters) and self.l2_clusters[index] <= last:
            return "an L2 table"
        return None


def check_l1_entry(entry: int, index: int, geometry: Geometry, metadata: Metadata) -> int:
    """The L2 table offset of one L1 entry (0: region unallocated), checked against the file."""
    if entry & L1E_RESERVED_MASK:
        raise CorruptImage(
            f"qcow2 L1 entry {index} has reserved bits set ({entry:#x})", reason="qcow2.l1_entry"
        )
    offset = entry & L1E_OFFSET_MASK
    if not offset:
        return 0
    check_table(offset, geometry.cluster_size, geometry.cluster_size, geometry.file_size, f"L2 table {index}")
    overlap = metadata.what_overlaps(offset, geometry.cluster_size)
    if overlap:
        raise CorruptImage(
            f"qcow2 L2 table {index} at {offset:#x} overlaps {overlap}", reason="qcow2.overlap"
        )
    return offset


def check_l2_tables_distinct(clusters: array[int], cluster_size: int) -> None:
    """Each L1 entry of the active table has its own L2 table (``clusters`` sorted)."""
    for previous, current in pairwise(clusters):
        if previous == current:
            raise CorruptImage(
                f"qcow2 L2 table at {current * cluster_size:#x} is shared by two L1 entries",
                reason="qcow2.overlap",
            )


def check_data_cluster(host: int, needed: int, guest: int, geometry: Geometry, metadata: Metadata) -> None:
    """A standard data cluster: aligned, inside the file for the ``needed`` bytes read, not metadata."""
    if host % geometry.cluster_size:
        raise CorruptImage(
            f"qcow2 data cluster for guest offset {guest:#x} at host {host:#x} is not cluster aligned",
            reason="qcow2.unaligned",
        )
    if host + needed > geometry.file_size:
        raise CorruptImage(
            f"qcow2 data cluster for guest offset {guest:#x} at host {host:#x} lies past the end "
            f"of the file ({geometry.file_size} bytes)",
            reason="qcow2.offset_past_end",
        )
    overlap = metadata.what_overlaps(host, needed)
    if overlap:
        raise CorruptImage(
            f"qcow2 data cluster for guest offset {guest:#x} at host {host:#x} overlaps {overlap}",
            reason="qcow2.overlap",
        )


def parse_compressed_entry(entry: int, geometry: Geometry) -> tuple[int, int]:
    """``(host offset, bytes to read)`` of a compressed cluster (qcow2_parse_compressed_l2_entry).

    The size covers whole 512-byte sectors, so it may run past the end of the file for the last
    cluster: it is clipped there, and the cluster must at least start inside the file.
    """
    shift = geometry.csize_shift
    host = entry & ((1 << shift) - 1)
    sectors = ((entry >> shift) & ((1 << (geometry.cluster_bits - 8)) - 1)) + 1
    size = sectors * COMPRESSED_SECTOR - (host & (COMPRESSED_SECTOR - 1))
    return host, size


def check_compressed(host: int, size: int, guest: int, geometry: Geometry, metadata: Metadata) -> int:
    """Bytes of a compressed cluster to read (clipped to the file), after the named checks."""
    if host == 0 or host >= geometry.file_size:
        raise CorruptImage(
            f"qcow2 compressed cluster for guest offset {guest:#x} at host {host:#x} lies outside "
            f"the file ({geometry.file_size} bytes)",
            reason="qcow2.offset_past_end",
        )
    length = min(size, geometry.file_size - host)
    overlap = metadata.what_overlaps(host, length)
    if overlap:
        raise CorruptImage(
            f"qcow2 compressed cluster for guest offset {guest:#x} at host {host:#x} overlaps {overlap}",
            reason="qcow2.overlap",
        )
    return length


# --------------------------------------------------------------------------------------------
# L2 tables to runs: what the reader fetches
# --------------------------------------------------------------------------------------------


class RunKind(enum.IntEnum):
    ZERO = 0
    DATA = 1
    COMPRESSED = 2


@dataclass(slots=True)
class Run:
    """Guest ``[offset, offset + length)``: zeros, one host read, or compressed clusters."""

    kind: RunKind
    offset: int
    length: int
    host: int = 0  # DATA: host offset of the first byte; COMPRESSED: start of the host span
    host_end: int = 0  # COMPRESSED: end of the host span to read
    clusters: list[tuple[int, int]] = field(default_factory=list)  # COMPRESSED: (host, size) each


class RunBuilder:
    """Collects runs in guest order, merging neighbours so reads are large."""

    def __init__(self) -> None:
        self.runs: list[Run] = []

    def zero(self, offset: int, length: int) -> None:
        last = self.runs[-1] if self.runs else None
        if last is not None and last.kind is RunKind.ZERO:
            last.length += length
        else:
            self.runs.append(Run(RunKind.ZERO, offset, length))

    def data(self, offset: int, length: int, host: int) -> None:
        last = self.runs[-1] if self.runs else None
        if (
            last is not None
            and last.kind is RunKind.DATA
            and last.host + last.length == host
            and last.length + length <= MAX_RUN
        ):
            last.length += length
        else:
            self.runs.append(Run(RunKind.DATA, offset, length, host))

    def compressed(self, offset: int, length: int, host: int, size: int, cluster_size: int) -> None:
        last = self.runs[-1] if self.runs else None
        if (
            last is not None
            and last.kind is RunKind.COMPRESSED
            and last.host <= host
            and host <= last.host_end + COMPRESSED_GAP
            and (len(last.clusters) + 1) * cluster_size <= max(MAX_RUN, cluster_size)
        ):
            last.length += length
            last.host_end = max(last.host_end, host + size)
            last.clusters.append((host, size))
        else:
            self.runs.append(Run(RunKind.COMPRESSED, offset, length, host, host + size, [(host, size)]))


def l2_runs(table: bytes, region: int, geometry: Geometry, metadata: Metadata) -> list[Run]:
    """The runs of one L2 region (index ``region``), every entry checked, clipped to the disk."""
    cs = geometry.cluster_size
    first = region * geometry.l2_entries
    count = min(geometry.l2_entries, -(-geometry.virtual_size // cs) - first)
    used = table[: count * (16 if geometry.extended_l2 else 8)]
    builder = RunBuilder()
    if is_zero(used):  # an allocated but empty table (preallocated metadata): skip the loop
        builder.zero(first * cs, min(count * cs, geometry.virtual_size - first * cs))
        return builder.runs
    words = from_big_endian("Q", used)
    step = 2 if geometry.extended_l2 else 1
    for index in range(count):
        guest = (first + index) * cs
        length = min(cs, geometry.virtual_size - guest)
        entry = words[index * step]
        if entry & OFLAG_COMPRESSED:
            host, size = parse_compressed_entry(entry, geometry)
            size = check_compressed(host, size, guest, geometry, metadata)
            builder.compressed(guest, length, host, size, cs)
        elif geometry.extended_l2:
            add_extended_entry(builder, entry, words[index * step + 1], guest, length, geometry, metadata)
        else:
            add_standard_entry(builder, entry, guest, length, geometry, metadata)
    return builder.runs


def check_l2_entry(entry: int, guest: int) -> None:
    if entry & L2E_STD_RESERVED_MASK:
        raise CorruptImage(
            f"qcow2 L2 entry for guest offset {guest:#x} has reserved bits set ({entry:#x})",
            reason="qcow2.l2_entry",
        )


def add_standard_entry(
    builder: RunBuilder, entry: int, guest: int, length: int, geometry: Geometry, metadata: Metadata
) -> None:
    check_l2_entry(entry, guest)
    host = entry & L2E_OFFSET_MASK
    if entry & OFLAG_ZERO:
        if geometry.version < 3:
            raise CorruptImage(
                f"qcow2 zero-cluster flag at guest offset {guest:#x} in a version 2 image",
                reason="qcow2.l2_entry",
            )
        builder.zero(guest, length)
    elif host == 0:
        builder.zero(guest, length)  # unallocated, and there is no backing file
    else:
        check_data_cluster(host, length, guest, geometry, metadata)
        builder.data(guest, length, host)


def add_extended_entry(
    builder: RunBuilder,
    entry: int,
    bitmap: int,
    guest: int,
    length: int,
    geometry: Geometry,
    metadata: Metadata,
) -> None:
    """An extended L2 entry: 32 subclusters, each allocated, reading as zero, or unallocated."""
    check_l2_entry(entry & ~OFLAG_ZERO, guest)  # bit 0 carries no meaning with subclusters
    host = entry & L2E_OFFSET_MASK
    allocated, zeros = bitmap & ALL_ALLOC, bitmap >> SUBCLUSTERS
    if (host == 0 and allocated) or allocated & zeros:
        raise CorruptImage(
            f"qcow2 extended L2 entry for guest offset {guest:#x} has an invalid subcluster "
            f"bitmap ({bitmap:#018x})",
            reason="qcow2.l2_entry",
        )
    data = allocated & ~zeros
    if not data:
        builder.zero(guest, length)
        return
    sub = geometry.cluster_size // SUBCLUSTERS
    last = max(index for index in range(SUBCLUSTERS) if data >> index & 1)
    check_data_cluster(host, min(length, (last + 1) * sub), guest, geometry, metadata)
    for index in range(SUBCLUSTERS):
        start = index * sub
        if start >= length:
            break
        piece = min(sub, length - start)
        if data >> index & 1:
            builder.data(guest + start, piece, host + start)
        else:
            builder.zero(guest + start, piece)


# --------------------------------------------------------------------------------------------
# Cluster compression (block/qcow2-threads.c)
# --------------------------------------------------------------------------------------------

#: qemu compresses with deflateInit2(-12): a raw deflate stream with a 4 KiB window, and
#: decompresses with the same window, so a writer must never refer further back than 4 KiB.
DEFLATE_WBITS = -12
DEFLATE_LEVEL = 1
ZSTD_LEVEL = 1


def decompress_cluster(data: Buffer, cluster_size: int, compression: int, where: int) -> bytes | bytearray:
    """One compressed cluster: it must produce exactly ``cluster_size`` bytes; trailing bytes
    (the rest of the last sector) are ignored, as qemu ignores them."""
    out: bytes | bytearray
    try:
        if compression == COMPRESSION_ZSTD:
            # one byte more than a cluster: a frame holding more is caught, not cut short
            out = zstd_decompress(data, cluster_size + 1)
        else:  # libdeflate needs the exact output size and stops at the final block
            out = deflate.deflate_decompress(bytes(data), cluster_size)
    except (deflate.DeflateError, ValueError) as exc:
        raise CorruptImage(
            f"qcow2 compressed cluster at host {where:#x} does not decompress to "
            f"{cluster_size} bytes ({exc})",
            reason="qcow2.compressed",
        ) from None
    if len(out) != cluster_size:
        raise CorruptImage(
            f"qcow2 compressed cluster at host {where:#x} decompresses to {len(out)} bytes, "
            f"not {cluster_size}",
            reason="qcow2.compressed",
        )
    return out


def zstd_decompress(data: Buffer, limit: int) -> bytes:
    """At most ``limit`` bytes of one zstd frame; a damaged frame is a ValueError."""
    import pyzstd  # on first use: 10 ms of every start-up otherwise, for the rare zstd image

    try:
        return bytes(pyzstd.ZstdDecompressor().decompress(data, limit))
    except pyzstd.ZstdError as exc:
        raise ValueError(str(exc)) from None


def compress_cluster(data: Buffer, compression: int) -> bytes:
    if compression == COMPRESSION_ZSTD:
        import pyzstd  # see zstd_decompress

        return bytes(pyzstd.compress(data, ZSTD_LEVEL))
    compressor = isal_zlib.compressobj(DEFLATE_LEVEL, zlib.DEFLATED, DEFLATE_WBITS)  # honours the window
    packed: bytes = compressor.compress(data) + compressor.flush()
    return packed


def inflate_run(run: Run, span: bytes, cluster_size: int, compression: int) -> list[Extent]:
    """Decompress a run of compressed clusters read as one host span (worker thread)."""
    parts = []
    for host, size in run.clusters:
        start = host - run.host
        parts.append(
            decompress_cluster(memoryview(span)[start : start + size], cluster_size, compression, host)
        )
    data = b"".join(parts)
    if len(data) > run.length:  # the disk ends inside the last cluster
        data = data[: run.length]
    return split_zero_runs(run.offset, data)


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------


class Qcow2Reader(Reader):
    format = "qcow2"

    @classmethod
    def probe(cls, head: bytes, tail: bytes, size: int) -> bool:
        return head[:4] == MAGIC

    async def load(self) -> None:
        size = self.source.size
        head = await self.source.read_at(0, min(size, 1 << MAX_CLUSTER_BITS))
        header = parse_header(head)
        cs = header.cluster_size
        ext_start = header.header_length if header.version == 3 else HEADER_V2.size
        ext_end = min(cs, len(head), header.backing_file_offset or cs)
        extensions = parse_extensions(head, ext_start, ext_end)
        check_refusals(header, extensions, read_backing_name(header, head))
        self.header, self.extensions = header, extensions
        self.virtual_size = header.size
        self.geometry = Geometry(header.cluster_bits, header.size, size, header.version, header.extended_l2)
        self.l1_offsets = await self._load_l1()

    async def _load_l1(self) -> array[int]:
        header, geometry = self.header, self.geometry
        cs = geometry.cluster_size
        count = check_l1_size(header, geometry)
        check_table(header.l1_table_offset, count * 8, cs, geometry.file_size, "L1 table")
        reftable_bytes = header.refcount_table_clusters * cs
        if reftable_bytes > MAX_REFTABLE_BYTES:
            raise CorruptImage(
                f"qcow2 refcount table of {header.refcount_table_clusters} clusters is absurd",
                reason="qcow2.refcount_table",
            )
        check_table(header.refcount_table_offset, reftable_bytes, cs, geometry.file_size, "refcount table")
        ranges = [
            (0, cs, "the header"),
            (header.l1_table_offset, header.l1_table_offset + count * 8, "the L1 table"),
            (
                header.refcount_table_offset,
                header.refcount_table_offset + reftable_bytes,
                "the refcount table",
            ),
        ]
        self.metadata = Metadata(cs, [r for r in ranges if r[1] > r[0]])
        raw = await self.source.read_exact(header.l1_table_offset, count * 8, "qcow2 L1 table")
        offsets = from_big_endian("Q", raw)
        for index, entry in enumerate(offsets):
            offsets[index] = check_l1_entry(entry, index, geometry, self.metadata)
        self.metadata.l2_clusters = array("Q", sorted(offset // cs for offset in offsets if offset))
        check_l2_tables_distinct(self.metadata.l2_clusters, cs)
        return offsets

    def info(self) -> ImageInfo:
        header = self.header
        problems = []
        if header.incompatible & INCOMPAT_DIRTY:
            problems.append(
                "dirty bit set: the image was not closed cleanly, its refcounts may be stale "
                "(irrelevant for reading; qemu-img check -r all repairs them)"
            )
        return ImageInfo(
            "qcow2",
            self.virtual_size,
            subformat=f"v{header.version}",
            allocated_bytes=self.source.size,
            cluster_size=header.cluster_size,
            problems=problems,
            details={
                "compat": "0.10" if header.version == 2 else "1.1",
                "compression_type": COMPRESSION_NAMES.get(
                    header.compression_type, str(header.compression_type)
                ),
                "extended_l2": header.extended_l2,
                "refcount_bits": 1 << header.refcount_order,
                "lazy_refcounts": bool(header.compatible & COMPAT_LAZY_REFCOUNTS),
                "snapshots": header.nb_snapshots,
            },
        )

    async def extents(self) -> AsyncIterator[Extent]:
        async for batch in ordered_map(self._resolve, self._runs()):
            for extent in batch:
                yield extent

    async def _runs(self) -> AsyncIterator[Run]:
        """Runs in guest order; L2 tables are loaded one region at a time, two ahead."""

        async def regions() -> AsyncIterator[int]:
            for region in range(len(self.l1_offsets)):
                yield region

        async for runs in ordered_map(self._region_runs, regions(), 2):
            for run in runs:
                yield run

    async def _region_runs(self, region: int) -> list[Run]:
        geometry = self.geometry
        start = region * geometry.region_size
        offset = self.l1_offsets[region]
        if not offset:
            return [Run(RunKind.ZERO, start, min(geometry.region_size, self.virtual_size - start))]
        table = await self.source.read_exact(offset, geometry.cluster_size, f"qcow2 L2 table {region}")
        return await self.workers.run(l2_runs, table, region, geometry, self.metadata)

    async def _resolve(self, run: Run) -> list[Extent]:
        if run.kind is RunKind.ZERO:
            return [Extent.zero(run.offset, run.length)]
        if run.kind is RunKind.DATA:
            return await self._read_data(run)
        end = min(run.host_end, self.source.size)
        span = await self.source.read_exact(run.host, end - run.host, "qcow2 compressed clusters")
        return await self.workers.run(
            inflate_run, run, span, self.geometry.cluster_size, self.header.compression_type
        )

    async def _read_data(self, run: Run) -> list[Extent]:
        """Data clusters, skipping holes the source knows of (metadata-preallocated images)."""
        out: list[Extent] = []
        delta = run.offset - run.host  # guest offset minus host offset
        position, end = run.host, run.host + run.length
        for start, stop in [*await self.source.allocated(position, end), (end, end)]:
            if start > position:
                out.append(Extent.zero(position + delta, start - position))
            if stop > start:
                data = await self.source.read_exact(start, stop - start, "qcow2 data clusters")
                out += await self.workers.run(split_zero_runs, start + delta, data)
            position = max(position, stop)
        return out


def read_backing_name(header: Header, head: bytes) -> str | None:
    """The backing file name a header points to (None when there is none), bounded."""
    if not header.backing_file_offset:
        return None
    end = header.backing_file_offset + header.backing_file_size
    if header.backing_file_size > MAX_BACKING_NAME or end > min(len(head), header.cluster_size):
        raise CorruptImage(
            "qcow2 backing file name is too long or lies outside the first cluster",
            reason="qcow2.backing_file",
        )
    return head[header.backing_file_offset : end].decode("utf-8", "replace")


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


def parse_cluster_size(text: str) -> int:
    """``cluster_size=`` as qemu-img takes it: bytes, or with a k/M suffix; a power of two."""
    units = {"": 1, "k": 1024, "K": 1024, "m": 1 << 20, "M": 1 << 20}
    number, unit = (text[:-1], text[-1]) if text[-1:] in "kKmM" and text[-1:] else (text, "")
    if not number.isdigit():
        raise UsageError(f"qcow2 option cluster_size={text!r}: give a size such as 65536 or 64k")
    size = int(number) * units[unit]
    if size & (size - 1) or not 1 << MIN_CLUSTER_BITS <= size <= 1 << MAX_CLUSTER_BITS:
        raise UsageError(f"qcow2 option cluster_size={text!r}: a power of two from 512 to 2M")
    return size


@dataclass(frozen=True, slots=True)
class Encoded:
    """One cluster ready to be placed: its guest cluster index and stored bytes."""

    cluster: int
    payload: Buffer
    compressed: bool


def encode_clusters(
    batch: list[tuple[int, list[Extent]]], cluster_size: int, compression: int | None
) -> list[Encoded]:
    """Assemble, drop all-zero, and optionally compress a batch of clusters (worker thread).

    A compressed cluster is kept only when smaller than a cluster, as qemu does.
    """
    out = []
    for index, pieces in batch:
        payload = cluster_bytes(index, pieces, cluster_size)
        if is_zero(payload):
            continue
        if compression is not None:
            packed = compress_cluster(payload, compression)
            if len(packed) < cluster_size:
                out.append(Encoded(index, packed, True))
                continue
        out.append(Encoded(index, payload, False))
    return out


def cluster_bytes(index: int, pieces: list[Extent], cluster_size: int) -> Buffer:
    """The full cluster: the data pieces in place, zeros elsewhere (and past the disk's end)."""
    first = pieces[0]
    if (
        len(pieces) == 1
        and first.kind is Kind.DATA
        and first.length == cluster_size
        and first.data is not None
    ):
        return first.data
    buf = bytearray(cluster_size)
    base = index * cluster_size
    for piece in pieces:
        if piece.kind is Kind.DATA and piece.data is not None:
            buf[piece.offset - base : piece.end - base] = piece.data
    return buf


class Refcounts:
    """16-bit refcounts of the host clusters as the file grows, one refcount block per range.

    A block covers ``cluster_size // 2`` host clusters. Once the file has grown past the end of
    a block's range nothing can touch that range again, so the block can be written and dropped:
    only the one or two blocks of the current position are ever held.
    """

    def __init__(self, cluster_bits: int) -> None:
        self.cluster_bits = cluster_bits
        self.per_block = (1 << cluster_bits) * 8 >> WRITE_REFCOUNT_ORDER
        self.live: dict[int, array[int]] = {}
        self.table = array("Q")  # host offset of each written refcount block, by range
        self.next_block = 0  # first range whose block is not written yet

    def add(self, offset: int, length: int) -> None:
        """One more reference to every host cluster that ``[offset, offset + length)`` touches."""
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        for cluster in range(first, last + 1):
            block, slot = divmod(cluster, self.per_block)
            counts = self.live.get(block)
            if counts is None:
                counts = self.live[block] = array("H", bytes(2 * self.per_block))
            counts[slot] += 1

    def ready(self, position: int) -> bool:
        """Whether the next block's range lies wholly before ``position``."""
        return (self.next_block + 1) * self.per_block << self.cluster_bits <= position

    def take(self, host: int) -> bytes:
        """The next block's bytes; it is stored at ``host`` (a reference the caller adds)."""
        counts = self.live.pop(self.next_block, None) or array("H", bytes(2 * self.per_block))
        self.table.append(host)
        self.next_block += 1
        return big_endian(counts)

    def final_layout(self, first_cluster: int) -> tuple[int, int]:
        """``(blocks, table clusters)`` to append at ``first_cluster`` so every cluster is covered.

        The blocks and the table count themselves, so iterate to the fixed point (as qemu's
        qcow2_refcount_area does).
        """
        cluster_size = 1 << self.cluster_bits
        blocks_needed, table_clusters = 0, 1
        while True:
            end = first_cluster + blocks_needed + table_clusters
            ranges = -(-end // self.per_block)
            layout = (ranges - self.next_block, -(-ranges * 8 // cluster_size))
            if layout == (blocks_needed, table_clusters):
                return layout
            blocks_needed, table_clusters = layout

    def table_bytes(self, clusters: int) -> bytes:
        raw = big_endian(self.table)
        return raw + bytes(clusters * (1 << self.cluster_bits) - len(raw))


class Qcow2Writer(Writer):
    format = "qcow2"
    options: ClassVar[Mapping[str, tuple[str, ...] | None]] = {
        "compress": ("on", "off"),
        "cluster_size": None,
        "compression_type": ("zlib", "zstd"),
    }

    def __init__(self, sink: Sink, virtual_size: int, options: Mapping[str, str], workers: Workers) -> None:
        super().__init__(sink, virtual_size, options, workers)
        cluster_size = parse_cluster_size(self.opts.get("cluster_size", str(DEFAULT_CLUSTER_SIZE)))
        self.cluster_bits = cluster_size.bit_length() - 1
        zstd = self.opts.get("compression_type") == "zstd"
        self.compression_type = COMPRESSION_ZSTD if zstd else COMPRESSION_ZLIB
        self.compress = self.opts.get("compress") == "on"
        self.geometry = Geometry(self.cluster_bits, self.virtual_size, 0, 3, False)
        l1_entries = self.geometry.l1_entries
        # host clusters: at most every guest cluster, its L2 tables and as much again for refcounts
        host_clusters = 2 * (-(-self.virtual_size // cluster_size) + l1_entries + 2)
        refcount_blocks = -(-host_clusters // (cluster_size // 2))
        if l1_entries * 8 > MAX_L1_BYTES or refcount_blocks * 8 > MAX_REFTABLE_BYTES:
            raise UsageError(
                f"a {self.virtual_size}-byte disk needs qcow2 tables beyond qemu's limits with "
                f"{cluster_size}-byte clusters; choose a larger cluster_size"
            )

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    async def write(self, extents: AsyncIterator[Extent]) -> None:
        cs, geometry = self.cluster_size, self.geometry
        self.base = self.sink.position
        self.refcounts = Refcounts(self.cluster_bits)
        self.l1 = array("Q", bytes(8 * geometry.l1_entries))
        l1_clusters = -(-len(self.l1) * 8 // cs)
        header_slot = await self.sink.reserve(cs)
        l1_slot = await self.sink.reserve(l1_clusters * cs)
        self.refcounts.add(0, (1 + l1_clusters) * cs)
        self.region, self.l2 = -1, array("Q")
        compression = self.compression_type if self.compress else None

        async def encode(batch: list[tuple[int, list[Extent]]]) -> list[Encoded]:
            return await self.workers.run(encode_clusters, batch, cs, compression)

        batches = batched(blocks(data_only(inflated(extents, self.workers)), cs), max(1, MAX_RUN // cs))
        async for encoded in ordered_map(encode, batches):
            for cluster in encoded:
                await self._place(cluster)
        await self._finish_region()
        reftable_offset, reftable_clusters = await self._write_refcounts()
        header = Header(
            version=3,
            backing_file_offset=0,
            backing_file_size=0,
            cluster_bits=self.cluster_bits,
            # qemu sees whole 512-byte sectors only and would drop a shorter tail: round up
            size=-(-self.virtual_size // SECTOR) * SECTOR,
            crypt_method=0,
            l1_size=len(self.l1),
            l1_table_offset=cs,
            refcount_table_offset=reftable_offset,
            refcount_table_clusters=reftable_clusters,
            nb_snapshots=0,
            snapshots_offset=0,
            incompatible=INCOMPAT_COMPRESSION if self.compression_type == COMPRESSION_ZSTD else 0,
            refcount_order=WRITE_REFCOUNT_ORDER,
            header_length=V3_HEADER_LENGTH,
            compression_type=self.compression_type,
        )
        packed = header.pack()
        await self.sink.fill(header_slot, packed + bytes(cs - len(packed)))
        await self.sink.fill(l1_slot, big_endian(self.l1) + bytes(l1_slot.length - 8 * len(self.l1)))

    @property
    def position(self) -> int:
        """Host offset of the next byte written (relative to the start of the qcow2 file)."""
        return self.sink.position - self.base

    async def _place(self, cluster: Encoded) -> None:
        region, slot = divmod(cluster.cluster, self.geometry.l2_entries)
        if region != self.region:
            await self._finish_region()
            self.region, self.l2 = region, array("Q", bytes(8 * self.geometry.l2_entries))
        await self._write_ready_refblocks()
        if cluster.compressed:
            host = self.position
            extra = ((host + len(cluster.payload) - 1) >> 9) - (host >> 9)
            self.l2[slot] = OFLAG_COMPRESSED | host | extra << self.geometry.csize_shift
        else:
            host = await self._align()
            self.l2[slot] = OFLAG_COPIED | host
        await self.sink.write(cluster.payload)
        self.refcounts.add(host, len(cluster.payload))

    async def _finish_region(self) -> None:
        if self.region < 0:
            return
        await self._write_ready_refblocks()
        host = await self._append_cluster(big_endian(self.l2))
        self.l1[self.region] = OFLAG_COPIED | host
        self.region = -1

    async def _align(self) -> int:
        """Pad to the next cluster boundary (the padding lies in a cluster already in use)."""
        gap = -self.position % self.cluster_size
        if gap:
            await self.sink.write(bytes(gap))
        return self.position

    async def _append_cluster(self, data: bytes) -> int:
        host = await self._align()
        await self.sink.write(data)
        self.refcounts.add(host, len(data))
        return host

    async def _write_ready_refblocks(self) -> None:
        while self.refcounts.ready(self.position):
            host = await self._align()
            self.refcounts.add(host, self.cluster_size)
            await self.sink.write(self.refcounts.take(host))

    async def _write_refcounts(self) -> tuple[int, int]:
        """The last refcount blocks and the refcount table: ``(table offset, table clusters)``."""
        await self._write_ready_refblocks()
        cs = self.cluster_size
        first = await self._align()
        count, table_clusters = self.refcounts.final_layout(first // cs)
        self.refcounts.add(first, (count + table_clusters) * cs)
        for index in range(count):
            await self.sink.write(self.refcounts.take(first + index * cs))
        table_offset = self.position
        await self.sink.write(self.refcounts.table_bytes(table_clusters))
        return table_offset, table_clusters


async def data_only(extents: AsyncIterator[Extent]) -> AsyncIterator[Extent]:
    """Drop ZERO extents: zero clusters stay unallocated, and a terabyte hole then costs nothing
    instead of one step per cluster in blocks()."""
    async for extent in extents:
        if extent.kind is not Kind.ZERO:
            yield extent


async def batched(
    items: AsyncIterator[tuple[int, list[Extent]]], size: int
) -> AsyncIterator[list[tuple[int, list[Extent]]]]:
    batch: list[tuple[int, list[Extent]]] = []
    async for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
