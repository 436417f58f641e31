"""The snapshot store's objects, written like a format spec (design §4): structures and bounded parsing.

Object map, under the store's root (a directory, or an S3 bucket + prefix)::

    <snapshot-id>/pack-00000000     packs, numbered from 0 in disk order, written sequentially
    <snapshot-id>/pack-00000001     ...
    <snapshot-id>/manifest          written last: its presence is what makes the snapshot exist

Pack object (immutable; one snapshot's grains for one range of the disk)::

    0               grain data: zlib streams back to back, ascending grain number, no padding
    index_offset    pack index (read on its own for random access, located by the manifest):
                      INDEX_HEADER    magic "VMSTPIDX", version, header size, snapshot id,
                                      pack number, grain count
                      INDEX_ENTRY     x grain count: grain number, offset in the pack, length, checksum
                      TRAILER         CRC-32C of header + entries, magic "PIDX"
    pack_size

Manifest object (read whole, then kept in memory)::

    0               MANIFEST_HEADER   magic "VMSTSNAP", version, header size, snapshot id, virtual size,
                                      grain size, pack count, data grains, stored bytes, flags, SHA-256
    header size     PACK_ENTRY        x pack count: first grain, end grain (last + 1), grain count,
                                      CRC-32C of the pack index, index offset, pack size
    ...             TRAILER           CRC-32C of everything before it, magic "SNAP"

Structures (all little-endian; offsets in bytes)::

    MANIFEST_HEADER (148)            PACK_ENTRY (40)                 TRAILER (8)
      0  magic "VMSTSNAP"   8s         0  first grain      u64         0  CRC-32C    u32
      8  version (1)        u32        8  end grain        u64         4  end magic  4s
     12  header size (148)  u32       16  grain count      u32
     16  snapshot id        64s       20  index CRC-32C    u32       INDEX_ENTRY (24)
     80  virtual size       u64       24  index offset     u64         0  grain number  u64
     88  grain size (65536) u32       32  pack size        u64         8  offset        u64
     92  pack count         u32                                       16  length        u32
     96  data grains        u64      INDEX_HEADER (88)                20  CRC-32C       u32
    104  stored bytes       u64        0  magic "VMSTPIDX"  8s
    112  flags (1: SHA-256) u32        8  version (1)       u32
    116  SHA-256            32s       12  header size (88)  u32
                                      16  snapshot id       64s
                                      80  pack number       u32
                                      84  grain count       u32

Grains. Grain ``g`` covers virtual bytes ``[g x 64 KiB, (g + 1) x 64 KiB)``. Each stored grain is one
zlib stream (RFC 1950) exactly as a stream-optimized VMDK grain, so grains pass between the two without
being inflated and deflated again. All-zero grains are not stored: a grain absent from every pack reads
as zeros. The last grain of a disk whose size is not whole grains is stored as a *whole* grain, zero
padded (as qemu and VMware write the last grain of a VMDK stream); readers cut it to the disk's end.

Checksums. A grain's checksum is the CRC-32C of its *compressed* bytes, and its length is stored beside
it. That is what every read verifies without inflating, so pass-through (the store to a VMDK stream)
stays pass-through, at memory speed. The uncompressed content is covered as well: a zlib stream ends
with the Adler-32 of what it inflates to, which every inflate checks, and a grain that inflates to the
wrong length is refused (``codec.BAD_LENGTH``). Indices and the manifest carry their own CRC-32C, and the
manifest also holds each pack index's CRC, so a pack from another snapshot or an older write is refused.

Everything here is read back after crashes and from S3, so it is untrusted: every count, offset and
length is bounded and cross-checked before use (``parse_manifest``, ``parse_index``). Byte order
(little-endian) lives only in the ``struct`` layouts below.
"""

from __future__ import annotations

import array
import re
import struct
from bisect import bisect_right
from dataclasses import dataclass

import crc32c as _crc32c

from ..errors import CorruptImage, StorageError, UsageError
from ..extents import Buffer

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

GRAIN_SIZE = 64 * KiB
VERSION = 1
MANIFEST_MAGIC = b"VMSTSNAP"
MANIFEST_END = b"SNAP"
INDEX_MAGIC = b"VMSTPIDX"
INDEX_END = b"PIDX"
ID_BYTES = 64  # snapshot ids are NUL padded to this

#: magic, version, header size, snapshot id, virtual size, grain size, pack count, data grains,
#: stored bytes, flags, SHA-256 of the virtual disk (zeros unless FLAG_SHA256)
MANIFEST_HEADER = struct.Struct(f"<8sII{ID_BYTES}sQIIQQI32s")
#: first grain, end grain, grain count, index CRC-32C, index offset, pack size
PACK_ENTRY = struct.Struct("<QQIIQQ")
#: magic, version, header size, snapshot id, pack number, grain count
INDEX_HEADER = struct.Struct(f"<8sII{ID_BYTES}sII")
#: grain number, offset of its zlib stream in the pack, length, CRC-32C of the compressed bytes
INDEX_ENTRY = struct.Struct("<QQII")
#: CRC-32C of everything before it, end magic
TRAILER = struct.Struct("<I4s")

FLAG_SHA256 = 1 << 0

# --- bounds on untrusted numbers (and on what the writer may produce) ----------------------------

#: Largest disk the store keeps (the VHDX limit); grain numbers stay below 2^30.
MAX_VIRTUAL_SIZE = 64 * TiB
#: A zlib stream of one grain beyond this is hostile (incompressible data grows by a few bytes).
MAX_COMPRESSED_GRAIN = 2 * GRAIN_SIZE + 4096
#: Grains per pack: keeps one pack index (a random read's first object read) under 400 KiB.
MAX_GRAINS_PER_PACK = 16384
MAX_INDEX_BYTES = INDEX_HEADER.size + MAX_GRAINS_PER_PACK * INDEX_ENTRY.size + TRAILER.size
MAX_PACK_SIZE = MAX_GRAINS_PER_PACK * MAX_COMPRESSED_GRAIN + MAX_INDEX_BYTES
#: Packs per snapshot: a 64 TiB disk of incompressible data in 64 MiB packs needs about a million.
MAX_PACKS = 4 * 1024 * 1024
MAX_MANIFEST_BYTES = MANIFEST_HEADER.size + MAX_PACKS * PACK_ENTRY.size + TRAILER.size

_SNAPSHOT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MANIFEST_NAME = "manifest"
_PACK_NAME = re.compile(r"pack-(\d{8})")


class CorruptSnapshot(CorruptImage):
    """A stored snapshot fails its checks: a checksum, a bound, a structure (never returned silently)."""

    reason = "store.corrupt"


class SnapshotNotFound(StorageError):
    reason = "store.not_found"


def crc32c(data: Buffer) -> int:
    value: int = _crc32c.crc32c(data)
    return value


def check_snapshot_id(snapshot_id: str) -> str:
    """A snapshot id is one plain name (it becomes a directory or a key prefix)."""
    if not _SNAPSHOT_ID.fullmatch(snapshot_id):
        raise UsageError(f"snapshot id {snapshot_id!r} is not 1-64 letters, digits, '.', '_' or '-'")
    return snapshot_id


def pack_name(number: int) -> str:
    return f"pack-{number:08d}"


def pack_number(name: str) -> int | None:
    """The number of a pack object's name, None for anything else."""
    match = _PACK_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def grain_count(virtual_size: int) -> int:
    return -(-virtual_size // GRAIN_SIZE)


def _id_field(snapshot_id: str) -> bytes:
    return snapshot_id.encode("ascii").ljust(ID_BYTES, b"\0")


def _sealed(body: bytes, end_magic: bytes) -> bytes:
    return body + TRAILER.pack(crc32c(body), end_magic)


def _unseal(data: Buffer, end_magic: bytes, what: str) -> memoryview:
    """The body before a trailer whose CRC-32C and magic match, or CorruptSnapshot."""
    view = memoryview(data)
    if len(view) < TRAILER.size:
        raise CorruptSnapshot(f"{what} is truncated ({len(view)} bytes)", reason="store.truncated")
    crc, magic = TRAILER.unpack_from(view, len(view) - TRAILER.size)
    body = view[: len(view) - TRAILER.size]
    if magic != end_magic or crc != crc32c(body):
        raise CorruptSnapshot(f"{what} fails its checksum (damaged or truncated)", reason="store.checksum")
    return body


# --- pack index -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class PackIndex:
    """One pack's grains, as columns: grain numbers ascending, their offsets, lengths and CRC-32Cs."""

    grains: array.array[int]
    offsets: array.array[int]
    lengths: array.array[int]
    crcs: array.array[int]

    def __len__(self) -> int:
        return len(self.grains)

    def span(self, first: int, last: int) -> tuple[int, int]:
        """Byte range ``[start, end)`` in the pack of entries ``first..last`` (inclusive)."""
        return self.offsets[first], self.offsets[last] + self.lengths[last]

    @property
    def nbytes(self) -> int:
        return len(self.grains) * INDEX_ENTRY.size


def index_size(count: int) -> int:
    return INDEX_HEADER.size + count * INDEX_ENTRY.size + TRAILER.size


def encode_index(snapshot_id: str, number: int, entries: list[tuple[int, int, int, int]]) -> bytes:
    """A pack index for ``entries`` of (grain, offset, length, crc)."""
    header = INDEX_HEADER.pack(INDEX_MAGIC, VERSION, INDEX_HEADER.size, _id_field(snapshot_id), number,
                               len(entries))
    return _sealed(header + b"".join(INDEX_ENTRY.pack(*entry) for entry in entries), INDEX_END)


def parse_index(data: Buffer, snapshot_id: str, number: int, pack: PackEntry) -> PackIndex:
    """Parse and check a pack index against its manifest entry; every entry bounded."""
    what = f"index of pack {number} of snapshot {snapshot_id}"
    if len(data) != index_size(pack.grain_count):
        raise CorruptSnapshot(f"{what} is {len(data)} bytes, the manifest says {index_size(pack.grain_count)}",
                              reason="store.truncated")
    if crc32c(data) != pack.index_crc:
        raise CorruptSnapshot(f"{what} does not match the manifest's checksum", reason="store.checksum")
    body = _unseal(data, INDEX_END, what)
    magic, version, header_size, ident, stored_number, count = INDEX_HEADER.unpack_from(body, 0)
    if magic != INDEX_MAGIC or version != VERSION or header_size != INDEX_HEADER.size:
        raise CorruptSnapshot(f"{what} has no valid header", reason="store.header")
    if ident != _id_field(snapshot_id) or stored_number != number or count != pack.grain_count:
        raise CorruptSnapshot(f"{what} belongs to another pack or snapshot", reason="store.mismatch")
    index = PackIndex(array.array("Q"), array.array("Q"), array.array("I"), array.array("I"))
    expected_offset, previous = 0, pack.first_grain - 1
    for grain, offset, length, crc in INDEX_ENTRY.iter_unpack(body[INDEX_HEADER.size :]):
        if not previous < grain < pack.end_grain:
            raise CorruptSnapshot(f"{what}: grain {grain} out of order or outside its pack", reason="store.index")
        if offset != expected_offset or not 0 < length <= MAX_COMPRESSED_GRAIN:
            raise CorruptSnapshot(f"{what}: grain {grain} at {offset} (+{length}) is not where it belongs",
                                  reason="store.index")
        index.grains.append(grain)
        index.offsets.append(offset)
        index.lengths.append(length)
        index.crcs.append(crc)
        previous, expected_offset = grain, offset + length
    if count and (index.grains[0] != pack.first_grain or index.grains[-1] != pack.end_grain - 1):
        raise CorruptSnapshot(f"{what} does not span the manifest's grain range", reason="store.index")
    if expected_offset != pack.index_offset:
        raise CorruptSnapshot(f"{what}: grains end at {expected_offset}, the index starts at {pack.index_offset}",
                              reason="store.index")
    return index


def verify_grains(data: Buffer, index: PackIndex, first: int, last: int, where: str) -> list[bytes]:
    """Worker job: cut entries ``first..last`` out of ``data`` (read from their span), checking each CRC."""
    view = memoryview(data)
    start, end = index.span(first, last)
    if len(view) != end - start:
        raise CorruptSnapshot(f"{where} is truncated (read {len(view)} of {end - start} bytes)",
                              reason="store.truncated")
    out = []
    for entry in range(first, last + 1):
        at = index.offsets[entry] - start
        grain = view[at : at + index.lengths[entry]]
        if crc32c(grain) != index.crcs[entry]:
            raise CorruptSnapshot(f"{where}: grain {index.grains[entry]} fails its checksum (damaged data)",
                                  reason="store.checksum")
        out.append(bytes(grain))
    return out


# --- manifest -------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PackEntry:
    first_grain: int
    end_grain: int
    grain_count: int
    index_crc: int
    index_offset: int
    pack_size: int

    @property
    def index_length(self) -> int:
        return self.pack_size - self.index_offset


@dataclass
class Manifest:
    snapshot_id: str
    virtual_size: int
    data_grains: int
    stored_bytes: int
    sha256: str | None
    #: one column per PACK_ENTRY field: compact enough for a million packs
    first_grains: array.array[int]
    end_grains: array.array[int]
    grain_counts: array.array[int]
    index_crcs: array.array[int]
    index_offsets: array.array[int]
    pack_sizes: array.array[int]
    nbytes: int = 0  # size of the manifest object

    @property
    def pack_count(self) -> int:
        return len(self.first_grains)

    def pack(self, number: int) -> PackEntry:
        return PackEntry(self.first_grains[number], self.end_grains[number], self.grain_counts[number],
                         self.index_crcs[number], self.index_offsets[number], self.pack_sizes[number])

    def packs_between(self, first_grain: int, end_grain: int) -> range:
        """Packs whose grain ranges meet ``[first_grain, end_grain)``."""
        start = max(0, bisect_right(self.first_grains, first_grain) - 1)
        if start < self.pack_count and self.end_grains[start] <= first_grain:
            start += 1
        return range(start, bisect_right(self.first_grains, end_grain - 1))


def manifest_size(pack_count: int) -> int:
    return MANIFEST_HEADER.size + pack_count * PACK_ENTRY.size + TRAILER.size


def encode_manifest(snapshot_id: str, virtual_size: int, packs: list[PackEntry], sha256: str | None) -> bytes:
    data_grains = sum(pack.grain_count for pack in packs)
    stored = sum(pack.pack_size for pack in packs) + manifest_size(len(packs))
    header = MANIFEST_HEADER.pack(MANIFEST_MAGIC, VERSION, MANIFEST_HEADER.size, _id_field(snapshot_id),
                                  virtual_size, GRAIN_SIZE, len(packs), data_grains, stored,
                                  FLAG_SHA256 if sha256 else 0, bytes.fromhex(sha256) if sha256 else bytes(32))
    entries = b"".join(PACK_ENTRY.pack(p.first_grain, p.end_grain, p.grain_count, p.index_crc, p.index_offset,
                                       p.pack_size) for p in packs)
    return _sealed(header + entries, MANIFEST_END)


def parse_manifest(data: Buffer, snapshot_id: str) -> Manifest:
    """Parse and check a whole manifest: header, CRC, and every pack entry against its neighbours."""
    what = f"manifest of snapshot {snapshot_id}"
    if len(data) > MAX_MANIFEST_BYTES:
        raise CorruptSnapshot(f"{what} is {len(data)} bytes, more than any snapshot needs", reason="store.header")
    if len(data) < MANIFEST_HEADER.size + TRAILER.size:
        raise CorruptSnapshot(f"{what} is truncated ({len(data)} bytes)", reason="store.truncated")
    body = _unseal(data, MANIFEST_END, what)
    (magic, version, header_size, ident, virtual_size, grain_size, count, data_grains, stored, flags,
     digest) = MANIFEST_HEADER.unpack_from(body, 0)
    if magic != MANIFEST_MAGIC or version != VERSION or header_size != MANIFEST_HEADER.size:
        raise CorruptSnapshot(f"{what} has no valid header (magic {magic!r}, version {version})",
                              reason="store.header")
    if ident != _id_field(snapshot_id):
        raise CorruptSnapshot(f"{what} names another snapshot", reason="store.mismatch")
    if grain_size != GRAIN_SIZE or virtual_size > MAX_VIRTUAL_SIZE or count > MAX_PACKS:
        raise CorruptSnapshot(f"{what}: grain size {grain_size}, virtual size {virtual_size} or {count} packs "
                              "out of bounds", reason="store.header")
    if len(data) != manifest_size(count):
        raise CorruptSnapshot(f"{what} is {len(data)} bytes but lists {count} packs", reason="store.truncated")
    manifest = Manifest(snapshot_id, virtual_size, data_grains, stored,
                        bytes(digest).hex() if flags & FLAG_SHA256 else None,
                        array.array("Q"), array.array("Q"), array.array("I"), array.array("I"),
                        array.array("Q"), array.array("Q"), nbytes=len(data))
    total_grains, previous_end, grains, pack_bytes = grain_count(virtual_size), 0, 0, 0
    for number, fields in enumerate(PACK_ENTRY.iter_unpack(body[MANIFEST_HEADER.size :])):
        pack = PackEntry(*fields)
        _check_pack_entry(pack, previous_end, total_grains, f"{what}: pack {number}")
        previous_end = pack.end_grain
        grains += pack.grain_count
        pack_bytes += pack.pack_size
        manifest.first_grains.append(pack.first_grain)
        manifest.end_grains.append(pack.end_grain)
        manifest.grain_counts.append(pack.grain_count)
        manifest.index_crcs.append(pack.index_crc)
        manifest.index_offsets.append(pack.index_offset)
        manifest.pack_sizes.append(pack.pack_size)
    if grains != data_grains or pack_bytes + len(data) != stored:
        raise CorruptSnapshot(f"{what}: totals disagree with its packs", reason="store.header")
    return manifest


def _check_pack_entry(pack: PackEntry, previous_end: int, total_grains: int, what: str) -> None:
    if not previous_end <= pack.first_grain < pack.end_grain <= total_grains:
        raise CorruptSnapshot(f"{what} covers grains [{pack.first_grain}, {pack.end_grain}), out of order or "
                              "beyond the disk", reason="store.header")
    if not 0 < pack.grain_count <= min(MAX_GRAINS_PER_PACK, pack.end_grain - pack.first_grain):
        raise CorruptSnapshot(f"{what} claims {pack.grain_count} grains", reason="store.header")
    if (pack.pack_size > MAX_PACK_SIZE or pack.index_length != index_size(pack.grain_count)
            or not pack.grain_count <= pack.index_offset <= pack.grain_count * MAX_COMPRESSED_GRAIN):
        raise CorruptSnapshot(f"{what}: index at {pack.index_offset} in {pack.pack_size} bytes is out of bounds",
                              reason="store.header")
