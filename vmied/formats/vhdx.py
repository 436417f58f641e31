"""VHDX ([MS-VHDX] "Virtual Hard Disk v2 (VHDX) File Format"): read fixed and dynamic, replay the log;
write dynamic.

File map (all integers little-endian, every region 1 MiB aligned)::

    0       file type identifier   "vhdxfile" + creator (UTF-16)          §2.2.1
    64 KiB  header 1               "head", CRC-32C, sequence number, log   §2.2.2
    128 KiB header 2
    192 KiB region table 1         "regi", CRC-32C, BAT and metadata        §2.2.3
    256 KiB region table 2
    1 MiB.. log, metadata region, BAT region and payload blocks at the offsets the current header
            and the region table give (vmied writes log at 1 MiB, metadata at 2 MiB, BAT at 3 MiB)

* Metadata region (§2.6): a table ("metadata", entries of item GUID, offset, length, flags) then the
  items: file parameters (block size, leave-blocks-allocated, has-parent), virtual disk size,
  page 83 data, logical and physical sector size, parent locator.
* BAT (§2.5): one u64 per entry, state in bits 0-2 and the file offset in MiB in bits 20-63. Every
  ``chunk_ratio`` payload entries are followed by one sector bitmap entry, where
  ``chunk_ratio = 2**23 * logical_sector_size / block_size``.
* Log (§2.3): a circular buffer of 4 KiB sectors holding entries ("loge" header, "zero" and "desc"
  descriptors, "data" sectors). When the current header's LogGuid is not zero the log must be
  replayed before the file is read; vmied replays the active sequence into an in-memory overlay of
  the file (:class:`ReplayedFile`) and leaves the source untouched.
"""

from __future__ import annotations

import bisect
import itertools
import re
import struct
import sys
import uuid
from array import array
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from ..errors import CorruptImage, UnsupportedImage, UsageError
from ..extents import Extent, Kind, blocks
from ..io.base import DEFAULT_WINDOW, Source
from ..pipeline import ordered_map
from .base import ImageInfo, Reader, Writer, inflated
from .vhd import split_block, write_block_body

# ---------------------------------------------------------------------------------------------------
# On-disk structures
# ---------------------------------------------------------------------------------------------------

KiB, MiB = 1 << 10, 1 << 20
LOG_SECTOR = 4 * KiB

FILE_ID_SIGNATURE = b"vhdxfile"
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
REGION_TABLE_OFFSETS = (192 * KiB, 256 * KiB)
HEADER_SIZE = 4 * KiB
REGION_TABLE_SIZE = 64 * KiB

# §2.2.2 header: signature, checksum, sequence, file/data write GUIDs, log GUID, log version, version,
# log length, log offset (then reserved up to 4 KiB).
HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")
HEADER_SIGNATURE = b"head"
# §2.2.3 region table header (signature, checksum, entry count, reserved) and entries.
REGION_HEADER = struct.Struct("<4sIII")
REGION_ENTRY = struct.Struct("<16sQII")
REGION_SIGNATURE = b"regi"
MAX_REGION_ENTRIES = 2047
# §2.6.1 metadata table header and entries.
METADATA_HEADER = struct.Struct("<8sHH20x")
METADATA_ENTRY = struct.Struct("<16sIII4x")
METADATA_SIGNATURE = b"metadata"
MAX_METADATA_ENTRIES = 2047
META_IS_VIRTUAL_DISK, META_IS_REQUIRED = 2, 4
# §2.3.1 log entry header, descriptors and data sectors.
LOG_ENTRY = struct.Struct("<4sIIIQII16sQQ")  # 64 bytes
LOG_DESCRIPTOR = struct.Struct("<4sIQQQ")  # 32 bytes: "zero" or "desc"
LOG_DATA_SECTOR = struct.Struct("<4sI4084sI")
LOG_ENTRY_SIGNATURE, LOG_ZERO_SIGNATURE, LOG_DESC_SIGNATURE, LOG_DATA_SIGNATURE = b"loge", b"zero", b"desc", b"data"


def guid(text: str) -> bytes:
    return uuid.UUID(text).bytes_le


BAT_GUID = guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS = guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE83_DATA = guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE = guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE = guid("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
KNOWN_METADATA = {FILE_PARAMETERS, VIRTUAL_DISK_SIZE, PAGE83_DATA, LOGICAL_SECTOR_SIZE,
                  PHYSICAL_SECTOR_SIZE, PARENT_LOCATOR}

# §2.5.1 BAT entry states.
PAYLOAD_NOT_PRESENT, PAYLOAD_UNDEFINED, PAYLOAD_ZERO, PAYLOAD_UNMAPPED = 0, 1, 2, 3
PAYLOAD_FULLY_PRESENT, PAYLOAD_PARTIALLY_PRESENT = 6, 7
READS_AS_ZERO = {PAYLOAD_NOT_PRESENT, PAYLOAD_UNDEFINED, PAYLOAD_ZERO, PAYLOAD_UNMAPPED}
# Sector bitmap entries (every chunk_ratio + 1-th entry) only matter to differencing disks, which are
# refused, so the reader skips them.

MIN_BLOCK, MAX_BLOCK = MiB, 256 * MiB
MAX_VIRTUAL_SIZE = 64 * 1024 * 1024 * MiB  # 64 TiB (§2.6.2.2)
#: Bounds on what is held in memory for one image (refused past these, with a named reason).
MAX_BAT_BYTES = 64 * MiB
MAX_METADATA_BYTES = 16 * MiB
MAX_LOG_BYTES = 64 * MiB
#: Writer defaults.
DEFAULT_BLOCK = 32 * MiB
LOG_OFFSET, LOG_LENGTH, METADATA_OFFSET, METADATA_LENGTH, BAT_OFFSET = MiB, MiB, 2 * MiB, MiB, 3 * MiB
METADATA_ITEMS_AT = 64 * KiB


def crc32c_of(data: bytes, checksum_at: int) -> int:
    """CRC-32C of ``data`` with its 4-byte checksum field at ``checksum_at`` taken as zero."""
    import crc32c  # on first use: its import (importlib.metadata) is 10 ms of every start-up otherwise

    value = crc32c.crc32c(data[:checksum_at])
    value = crc32c.crc32c(b"\0\0\0\0", value)
    return int(crc32c.crc32c(data[checksum_at + 4 :], value))


def with_crc(data: bytearray, checksum_at: int) -> bytes:
    struct.pack_into("<I", data, checksum_at, crc32c_of(bytes(data), checksum_at))
    return bytes(data)


# ---------------------------------------------------------------------------------------------------
# Headers, region table, metadata
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    sequence: int
    log_guid: bytes
    log_length: int
    log_offset: int


def parse_header(data: bytes) -> Header | None:
    """A header if its signature, CRC-32C and version are valid, else None (§2.2.2)."""
    (signature, checksum, sequence, _file_write, _data_write, log_guid, log_version, version,
     log_length, log_offset) = HEADER.unpack_from(data)
    if signature != HEADER_SIGNATURE or crc32c_of(data, 4) != checksum or version != 1 or log_version != 0:
        return None
    return Header(sequence, log_guid, log_length, log_offset)


def current_header(first: Header | None, second: Header | None) -> Header:
    """The header with the greater sequence number. Equal numbers (Disk2VHD writes both headers
    with the same one) are accepted: the first header is used."""
    if first is None and second is None:
        raise CorruptImage("VHDX has no valid header (both fail their signature or CRC-32C check)",
                           reason="vhdx.header")
    if first is None or (second is not None and second.sequence > first.sequence):
        assert second is not None
        return second
    return first


def check_log_location(header: Header, file_size: int) -> None:
    if (header.log_offset % MiB or header.log_length % MiB or header.log_offset < MiB
            or header.log_offset + header.log_length > file_size):
        raise CorruptImage(f"VHDX log at {header.log_offset} (+{header.log_length}) is unaligned or outside "
                           "the file", reason="vhdx.log_location")


@dataclass(frozen=True)
class Region:
    offset: int
    length: int


def parse_region_table(data: bytes) -> dict[bytes, Region] | None:
    """The region table's entries, or None if its signature, CRC or count is invalid (§2.2.3)."""
    signature, checksum, count, _ = REGION_HEADER.unpack_from(data)
    if signature != REGION_SIGNATURE or count > MAX_REGION_ENTRIES or crc32c_of(data, 4) != checksum:
        return None
    regions: dict[bytes, Region] = {}
    for index in range(count):
        region_guid, offset, length, required = REGION_ENTRY.unpack_from(data, 16 + 32 * index)
        if region_guid in regions:
            raise CorruptImage("VHDX region table lists a region twice", reason="vhdx.region")
        if region_guid not in (BAT_GUID, METADATA_GUID) and required & 1:
            raise UnsupportedImage(f"VHDX requires unknown region {uuid.UUID(bytes_le=region_guid)}",
                                   reason="vhdx.region_unknown")
        regions[region_guid] = Region(offset, length)
    return regions


def check_regions(regions: dict[bytes, Region], header: Header, file_size: int) -> tuple[Region, Region]:
    """BAT and metadata regions: present, 1 MiB aligned, inside the file, not overlapping (§2.2.3.1)."""
    try:
        bat, metadata = regions[BAT_GUID], regions[METADATA_GUID]
    except KeyError:
        raise CorruptImage("VHDX region table lacks the BAT or metadata region", reason="vhdx.region") from None
    spans = [(r.offset, r.offset + r.length) for r in regions.values()] + [
        (header.log_offset, header.log_offset + header.log_length)]
    for region in (bat, metadata):
        if region.offset % MiB or region.offset < MiB or region.length == 0 or \
                region.offset + region.length > file_size:
            raise CorruptImage(f"VHDX region at {region.offset} (+{region.length}) is unaligned or outside "
                               "the file", reason="vhdx.region")
    for (a0, a1), (b0, b1) in itertools.combinations(sorted(spans), 2):
        if a0 < b1 and b0 < a1 and a1 > a0 and b1 > b0:
            raise CorruptImage(f"VHDX regions [{a0}, {a1}) and [{b0}, {b1}) overlap", reason="vhdx.region")
    return bat, metadata


@dataclass(frozen=True)
class Metadata:
    block_size: int
    leave_allocated: bool
    virtual_size: int
    logical_sector: int
    physical_sector: int
    has_parent: bool
    parent_paths: tuple[str, ...] = ()

    @property
    def chunk_ratio(self) -> int:
        return (1 << 23) * self.logical_sector // self.block_size

    @property
    def payload_blocks(self) -> int:
        return -(-self.virtual_size // self.block_size)

    @property
    def bat_entries(self) -> int:
        """Total BAT entries for a disk without parent: payload entries plus interleaved bitmap ones."""
        n = self.payload_blocks
        return n + (n - 1) // self.chunk_ratio if n else 0


def metadata_items(data: bytes) -> dict[bytes, bytes]:
    """The metadata table's items by GUID, each bounded inside the region (§2.6.1)."""
    signature, _, count = METADATA_HEADER.unpack_from(data)
    if signature != METADATA_SIGNATURE or count > MAX_METADATA_ENTRIES:
        raise CorruptImage("VHDX metadata table signature or entry count is invalid", reason="vhdx.metadata")
    items: dict[bytes, bytes] = {}
    for index in range(count):
        item_guid, offset, length, flags = METADATA_ENTRY.unpack_from(data, 32 * (index + 1))
        if item_guid in items:
            raise CorruptImage("VHDX metadata lists an item twice", reason="vhdx.metadata")
        if length and (offset < METADATA_ITEMS_AT or offset + length > len(data)):
            raise CorruptImage(f"VHDX metadata item at {offset} (+{length}) lies outside its region",
                               reason="vhdx.metadata")
        if item_guid not in KNOWN_METADATA and flags & META_IS_REQUIRED:
            raise UnsupportedImage(f"VHDX requires unknown metadata item {uuid.UUID(bytes_le=item_guid)}",
                                   reason="vhdx.metadata_unknown")
        items[item_guid] = data[offset : offset + length]
    return items


def item_value(items: dict[bytes, bytes], item: bytes, layout: str, name: str) -> tuple[int, ...]:
    raw = items.get(item)
    if raw is None or len(raw) < struct.calcsize(layout):
        raise CorruptImage(f"VHDX metadata item {name} is missing or short", reason="vhdx.metadata")
    return struct.unpack_from(layout, raw)


def parent_paths(raw: bytes) -> tuple[str, ...]:
    """Paths named by a parent locator (§2.6.2.6), only to name the parent in the refusal."""
    if len(raw) < 20:
        return ()
    count = struct.unpack_from("<H", raw, 18)[0]
    paths = []
    for index in range(min(count, 64)):
        if 20 + 12 * (index + 1) > len(raw):
            break
        key_at, value_at, key_len, value_len = struct.unpack_from("<IIHH", raw, 20 + 12 * index)
        key = raw[key_at : key_at + key_len].decode("utf-16-le", "replace")
        if key.endswith("path"):
            paths.append(raw[value_at : value_at + value_len].decode("utf-16-le", "replace"))
    return tuple(paths)


def parse_metadata(data: bytes) -> Metadata:
    items = metadata_items(data)
    block_size, flags = item_value(items, FILE_PARAMETERS, "<II", "file parameters")
    (virtual_size,) = item_value(items, VIRTUAL_DISK_SIZE, "<Q", "virtual disk size")
    (logical,) = item_value(items, LOGICAL_SECTOR_SIZE, "<I", "logical sector size")
    (physical,) = item_value(items, PHYSICAL_SECTOR_SIZE, "<I", "physical sector size")
    meta = Metadata(block_size, bool(flags & 1), virtual_size, logical, physical, bool(flags & 2),
                    parent_paths(items.get(PARENT_LOCATOR, b"")))
    check_metadata(meta)
    return meta


def check_metadata(meta: Metadata) -> None:
    if meta.has_parent:
        where = ": parent " + ", ".join(meta.parent_paths) if meta.parent_paths else ""
        raise UnsupportedImage(f"VHDX is a differencing disk (has a parent){where}: differencing disks are "
                               "not supported; merge it into its parent first", reason="vhdx.differencing")
    if meta.block_size & (meta.block_size - 1) or not MIN_BLOCK <= meta.block_size <= MAX_BLOCK:
        raise CorruptImage(f"VHDX block size {meta.block_size} is not a power of two from 1 to 256 MiB",
                           reason="vhdx.block_size")
    if meta.logical_sector not in (512, 4096) or meta.physical_sector not in (512, 4096):
        raise CorruptImage(f"VHDX sector sizes {meta.logical_sector}/{meta.physical_sector} are not 512 or 4096",
                           reason="vhdx.sector_size")
    if meta.virtual_size > MAX_VIRTUAL_SIZE or meta.virtual_size % meta.logical_sector:
        raise CorruptImage(f"VHDX virtual size {meta.virtual_size} is above 64 TiB or not whole sectors",
                           reason="vhdx.size")


# ---------------------------------------------------------------------------------------------------
# BAT
# ---------------------------------------------------------------------------------------------------


def bat_index(block: int, chunk_ratio: int) -> int:
    """Where payload block ``block`` sits in the BAT (after every chunk, a sector bitmap entry)."""
    return block + block // chunk_ratio


def check_bat_entry(block: int, entry: int, length: int, file_size: int) -> int:
    """The file offset of a payload block, 0 for one that reads as zero; refuses bad states/offsets."""
    state, offset = entry & 7, (entry >> 20) * MiB
    if state in READS_AS_ZERO:
        return 0
    if state == PAYLOAD_PARTIALLY_PRESENT:
        raise UnsupportedImage(f"VHDX block {block} is partially present, which needs a parent disk",
                               reason="vhdx.differencing")
    if state != PAYLOAD_FULLY_PRESENT:
        raise CorruptImage(f"VHDX BAT entry for block {block} has invalid state {state}", reason="vhdx.bat_entry")
    if offset < MiB or offset + length > file_size:
        raise CorruptImage(f"VHDX block {block} at offset {offset} (+{length}) lies outside the file "
                           f"({file_size} bytes)", reason="vhdx.bat_entry")
    return offset


def block_offsets(bat: bytes, meta: Metadata, file_size: int) -> array[int]:
    """Each payload block's file offset (0 when it reads as zero), checked, no two blocks overlapping."""
    entries = array("Q", bat)
    if sys.byteorder == "big":
        entries.byteswap()
    offsets = array("Q")
    for block in range(meta.payload_blocks):
        length = min(meta.block_size, meta.virtual_size - block * meta.block_size)
        offsets.append(check_bat_entry(block, entries[bat_index(block, meta.chunk_ratio)], length, file_size))
    present = sorted(o for o in offsets if o)
    for before, after in itertools.pairwise(present):
        if after - before < meta.block_size:
            raise CorruptImage(f"VHDX blocks at offsets {before} and {after} overlap", reason="vhdx.bat_overlap")
    return offsets


# ---------------------------------------------------------------------------------------------------
# Log replay (§2.3)
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogEntry:
    position: int  # offset of the entry in the log
    length: int
    tail: int
    sequence: int
    flushed_offset: int
    last_offset: int
    writes: tuple[tuple[int, int, bytes | None], ...]  # (file offset, length, data or None for zeros)


def circular(log: bytes, start: int, length: int) -> bytes:
    """``length`` bytes of the circular log from ``start``, wrapping at its end."""
    end = start + length
    return log[start:end] if end <= len(log) else log[start:] + log[: end - len(log)]


def parse_log_entry(log: bytes, position: int, log_guid: bytes) -> LogEntry | None:
    """The entry at ``position`` if it is complete and valid for this log, else None (§2.3.1)."""
    (signature, checksum, length, tail, sequence, count, _, entry_guid, flushed, last) = \
        LOG_ENTRY.unpack_from(log, position)
    if (signature != LOG_ENTRY_SIGNATURE or entry_guid != log_guid or sequence == 0 or length == 0
            or length % LOG_SECTOR or length > len(log) or tail % LOG_SECTOR or tail >= len(log)):
        return None
    descriptor_sectors = -(-(LOG_ENTRY.size + LOG_DESCRIPTOR.size * count) // LOG_SECTOR)
    data_sectors = length // LOG_SECTOR - descriptor_sectors
    if data_sectors < 0:
        return None
    entry = circular(log, position, length)
    if crc32c_of(entry, 4) != checksum:
        return None
    writes: list[tuple[int, int, bytes | None]] = []
    next_data = descriptor_sectors
    for index in range(count):
        kind, trailing, a, file_offset, desc_sequence = LOG_DESCRIPTOR.unpack_from(entry, 64 + 32 * index)
        if desc_sequence != sequence or file_offset % LOG_SECTOR:
            return None
        if kind == LOG_ZERO_SIGNATURE and a % LOG_SECTOR == 0:
            writes.append((file_offset, a, None))
        elif kind == LOG_DESC_SIGNATURE and next_data < length // LOG_SECTOR:
            data_signature, high, body, low = LOG_DATA_SECTOR.unpack_from(entry, next_data * LOG_SECTOR)
            if data_signature != LOG_DATA_SIGNATURE or (high << 32 | low) != sequence:
                return None
            # The sector's first 8 and last 4 bytes live in the descriptor (LeadingBytes, TrailingBytes).
            writes.append((file_offset, LOG_SECTOR, struct.pack("<Q", a) + body + struct.pack("<I", trailing)))
            next_data += 1
        else:
            return None
    return LogEntry(position, length, tail, sequence, flushed, last, tuple(writes))


def check_log_work(log: bytes, log_guid: bytes) -> None:
    """Refuse a log whose candidate entries would take more than 16 passes over it to checksum.

    Each 4 KiB sector may start an entry claiming the whole log: a hostile log could otherwise make
    the search cost (log size)^2 / 4 KiB bytes of CRC. Real logs claim about one pass in total.
    """
    work = 0
    for position in range(0, len(log), LOG_SECTOR):
        if log[position : position + 4] == LOG_ENTRY_SIGNATURE and log[position + 32 : position + 48] == log_guid:
            work += struct.unpack_from("<I", log, position + 8)[0]
    if work > 16 * len(log):
        raise CorruptImage(f"VHDX log entries claim {work} bytes in a {len(log)}-byte log", reason="vhdx.log_entry")


def active_sequence(log: bytes, log_guid: bytes) -> list[LogEntry]:
    """The log's active sequence (§2.3.3): among chains of valid entries that follow each other with
    consecutive sequence numbers, the one with the highest head sequence number whose head's Tail
    names an entry of the chain; returned from that tail entry to the head. Empty if there is none."""
    check_log_work(log, log_guid)
    entries = {p: e for p in range(0, len(log), LOG_SECTOR) if (e := parse_log_entry(log, p, log_guid))}
    successor: dict[int, int] = {}
    for position, entry in entries.items():
        following = entries.get((position + entry.length) % len(log))
        if following and following.sequence == entry.sequence + 1:
            successor[position] = following.position
    best: list[LogEntry] = []
    for start in set(entries) - set(successor.values()) or set(entries):
        chain, position = [entries[start]], start
        while position in successor and len(chain) <= len(entries):
            position = successor[position]
            chain.append(entries[position])
        head = chain[-1]
        tails = [i for i, e in enumerate(chain) if e.position == head.tail]
        if tails and (not best or head.sequence > best[-1].sequence):
            best = chain[tails[-1] :]
    return best


@dataclass
class ReplayedFile:
    """The image file as read after replaying its log, without writing to the source.

    Data sectors written by the log are kept per 4 KiB page; zero descriptors as ranges. A later log
    write replaces earlier ones, exactly as replaying them onto the file in order would.
    """

    source: Source
    size: int
    pages: dict[int, bytes] = field(default_factory=dict)
    zeros: list[tuple[int, int]] = field(default_factory=list)
    _keys: list[int] = field(default_factory=list)

    def apply(self, entries: list[LogEntry]) -> None:
        for entry in entries:
            for offset, length, data in entry.writes:
                if data is not None:
                    self.pages[offset] = data
                    continue
                self.zeros.append((offset, offset + length))
                for page in [p for p in self.pages if offset <= p < offset + length]:
                    del self.pages[page]
        self._keys = sorted(self.pages)
        self.zeros.sort()

    async def read(self, offset: int, length: int, what: str) -> bytes:
        if offset < 0 or offset + length > self.size:
            raise CorruptImage(f"{what} at offset {offset} (+{length}) lies beyond the end of the file "
                               f"({self.size} bytes after log replay)", reason="image.truncated")
        stored = max(0, min(offset + length, self.source.size) - offset)
        data = await self.source.read_exact(offset, stored, what) if stored else b""
        if not self.pages and not self.zeros and stored == length:
            return data
        buffer = bytearray(data) + bytes(length - stored)
        for start, end in self.zeros:
            lo, hi = max(start, offset), min(end, offset + length)
            if lo < hi:
                buffer[lo - offset : hi - offset] = bytes(hi - lo)
        first = bisect.bisect_left(self._keys, offset - LOG_SECTOR + 1)
        for page in self._keys[first : bisect.bisect_left(self._keys, offset + length)]:
            lo, hi = max(page, offset), min(page + LOG_SECTOR, offset + length)
            buffer[lo - offset : hi - offset] = self.pages[page][lo - page : hi - page]
        return bytes(buffer)


def replayed_size(entries: list[LogEntry], file_size: int) -> int:
    """The file size after replay (§2.3.3): the head's LastFileOffset if larger; a file shorter than
    the head's FlushedFileOffset lost data the log relies on."""
    head = entries[-1]
    if head.flushed_offset > file_size:
        raise CorruptImage(f"VHDX file ({file_size} bytes) is shorter than the log's flushed file offset "
                           f"{head.flushed_offset}: it was truncated", reason="vhdx.log_truncated")
    limit = max(file_size, head.last_offset)
    for entry in entries:
        for offset, length, _ in entry.writes:
            # Headers are never updated through the log (§2.2.2); region tables and the rest may be.
            if offset < REGION_TABLE_OFFSETS[0] or offset + length > 2 * MAX_VIRTUAL_SIZE:
                raise CorruptImage(f"VHDX log writes to offset {offset} (+{length}), into the headers "
                                   "or far past the file", reason="vhdx.log_entry")
            limit = max(limit, offset + length)
    if limit > 2 * MAX_VIRTUAL_SIZE:
        raise CorruptImage(f"VHDX log grows the file to {limit} bytes", reason="vhdx.log_entry")
    return limit


# ---------------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------------


class VhdxReader(Reader):
    format = "vhdx"

    meta: Metadata
    file: ReplayedFile
    offsets: array[int]
    replayed_entries = 0

    @classmethod
    def probe(cls, head: bytes, tail: bytes, size: int) -> bool:
        return head[:8] == FILE_ID_SIGNATURE

    async def load(self) -> None:
        start = await self.source.read_exact(0, REGION_TABLE_OFFSETS[1] + REGION_TABLE_SIZE, "VHDX headers")
        if start[:8] != FILE_ID_SIGNATURE:
            raise CorruptImage("VHDX file identifier 'vhdxfile' missing", reason="vhdx.identifier")
        header = current_header(*(parse_header(start[o : o + HEADER_SIZE]) for o in HEADER_OFFSETS))
        check_log_location(header, self.source.size)
        self.file = ReplayedFile(self.source, self.source.size)
        if header.log_guid != bytes(16):
            await self._replay(header)
        tables = await self.file.read(REGION_TABLE_OFFSETS[0], 2 * REGION_TABLE_SIZE, "VHDX region tables")
        regions = parse_region_table(tables[:REGION_TABLE_SIZE]) or parse_region_table(tables[REGION_TABLE_SIZE:])
        if regions is None:
            raise CorruptImage("VHDX has no valid region table (both fail their signature or CRC-32C check)",
                               reason="vhdx.region")
        bat, metadata = check_regions(regions, header, self.file.size)
        if metadata.length > MAX_METADATA_BYTES:
            raise UnsupportedImage(f"VHDX metadata region of {metadata.length} bytes is larger than vmied "
                                   "reads", reason="vhdx.metadata_size")
        self.meta = parse_metadata(await self.file.read(metadata.offset, metadata.length, "VHDX metadata"))
        self.virtual_size = self.meta.virtual_size
        self.offsets = await self._load_bat(bat)

    async def _replay(self, header: Header) -> None:
        if header.log_length > MAX_LOG_BYTES:
            raise UnsupportedImage(f"VHDX log of {header.log_length} bytes is larger than vmied replays",
                                   reason="vhdx.log_size")
        log = await self.source.read_exact(header.log_offset, header.log_length, "VHDX log")
        entries = await self.workers.run(active_sequence, log, header.log_guid)
        if entries:
            self.file.size = replayed_size(entries, self.source.size)
            self.file.apply(entries)
            self.replayed_entries = len(entries)

    async def _load_bat(self, region: Region) -> array[int]:
        needed = 8 * self.meta.bat_entries
        if needed > MAX_BAT_BYTES:
            raise UnsupportedImage(f"VHDX BAT of {needed} bytes is larger than vmied reads",
                                   reason="vhdx.bat_size")
        if needed > region.length:
            raise CorruptImage(f"VHDX BAT region of {region.length} bytes cannot hold {needed // 8} entries",
                               reason="vhdx.bat_size")
        bat = await self.file.read(region.offset, needed, "VHDX BAT")
        return await self.workers.run(block_offsets, bat, self.meta, self.file.size)

    def info(self) -> ImageInfo:
        meta = self.meta
        allocated = sum(min(meta.block_size, meta.virtual_size - i * meta.block_size)
                        for i, offset in enumerate(self.offsets) if offset)
        details = {"logical_sector_size": meta.logical_sector, "physical_sector_size": meta.physical_sector,
                   "log_entries_replayed": self.replayed_entries}
        subformat = "fixed" if meta.leave_allocated else "dynamic"
        problems = [f"dirty log: {self.replayed_entries} entries replayed in memory (the file is unchanged)"
                    ] if self.replayed_entries else []
        return ImageInfo("vhdx", self.virtual_size, subformat, allocated, meta.block_size, problems, details)

    async def extents(self) -> AsyncIterator[Extent]:
        async for extent in ordered_map(self._fetch, self._plan()):
            yield extent

    async def _plan(self) -> AsyncIterator[tuple[int, int, int]]:
        """``(virtual offset, length, file offset or -1 for zeros)`` in virtual order: zero runs whole,
        data in read windows, joined across blocks that follow each other in the file."""
        block = self.meta.block_size
        run: list[int] | None = None  # [virtual start, length, file start]
        for index, file_offset in enumerate(self.offsets):
            start = index * block
            length = min(block, self.virtual_size - start)
            piece = [start, length, file_offset if file_offset else -1]
            if run and (run[2] < 0) == (piece[2] < 0) and (run[2] < 0 or run[2] + run[1] == piece[2]):
                run[1] += length
                continue
            if run:
                async for job in self._windows(run):
                    yield job
            run = piece
        if run:
            async for job in self._windows(run):
                yield job

    @staticmethod
    async def _windows(run: list[int]) -> AsyncIterator[tuple[int, int, int]]:
        start, length, file_offset = run
        if file_offset < 0:
            yield start, length, -1
            return
        for done in range(0, length, DEFAULT_WINDOW):
            yield start + done, min(DEFAULT_WINDOW, length - done), file_offset + done

    async def _fetch(self, job: tuple[int, int, int]) -> Extent:
        offset, length, file_offset = job
        if file_offset < 0:
            return Extent.zero(offset, length)
        return Extent.of_data(offset, await self.file.read(file_offset, length, "VHDX payload block"))


# ---------------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------------

_SIZE = re.compile(r"^(\d+)\s*([kmg]?)(?:i?b)?$", re.IGNORECASE)


def parse_block_size(text: str) -> int:
    """``-o block_size=``: bytes, or with a K/M/G suffix; a power of two from 1 to 256 MiB."""
    match = _SIZE.match(text.strip())
    if not match:
        raise UsageError(f"vhdx option block_size={text!r} is not a size (e.g. 32M)")
    value = int(match.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[match.group(2).lower()]
    if value & (value - 1) or not MIN_BLOCK <= value <= MAX_BLOCK:
        raise UsageError(f"vhdx block_size={text}: choose a power of two from 1M to 256M")
    return value


def build_identifier() -> bytes:
    return (FILE_ID_SIGNATURE + "vmied".encode("utf-16-le")).ljust(64 * KiB, b"\0")


def build_header(sequence: int, write_guid: bytes) -> bytes:
    data = bytearray(HEADER_SIZE)
    HEADER.pack_into(data, 0, HEADER_SIGNATURE, 0, sequence, write_guid, write_guid, bytes(16), 0, 1,
                     LOG_LENGTH, LOG_OFFSET)
    return with_crc(data, 4)


def build_region_table(bat_length: int) -> bytes:
    data = bytearray(REGION_TABLE_SIZE)
    REGION_HEADER.pack_into(data, 0, REGION_SIGNATURE, 0, 2, 0)
    REGION_ENTRY.pack_into(data, 16, BAT_GUID, BAT_OFFSET, bat_length, 1)
    REGION_ENTRY.pack_into(data, 48, METADATA_GUID, METADATA_OFFSET, METADATA_LENGTH, 1)
    return with_crc(data, 4)


def build_metadata(meta: Metadata, page83: bytes) -> bytes:
    values = [
        (FILE_PARAMETERS, struct.pack("<II", meta.block_size, 0), META_IS_REQUIRED),
        (VIRTUAL_DISK_SIZE, struct.pack("<Q", meta.virtual_size), META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
        (PAGE83_DATA, page83, META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
        (LOGICAL_SECTOR_SIZE, struct.pack("<I", meta.logical_sector), META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
        (PHYSICAL_SECTOR_SIZE, struct.pack("<I", meta.physical_sector), META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
    ]
    data = bytearray(METADATA_LENGTH)
    METADATA_HEADER.pack_into(data, 0, METADATA_SIGNATURE, 0, len(values))
    at = METADATA_ITEMS_AT
    for index, (item, value, flags) in enumerate(values):
        METADATA_ENTRY.pack_into(data, 32 * (index + 1), item, at, len(value), flags)
        data[at : at + len(value)] = value
        at += len(value)
    return bytes(data)


class VhdxWriter(Writer):
    """Dynamic VHDX: fixed structures at 0-3 MiB, BAT placeholder at 3 MiB, blocks in disk order."""

    format = "vhdx"
    #: ``uuid`` (page 83 id) and ``write_guid``: random unless given (a resumed export writes the same bytes)
    options: ClassVar[Mapping[str, tuple[str, ...] | None]] = {"block_size": None, "uuid": None, "write_guid": None}

    async def write(self, extents: AsyncIterator[Extent]) -> None:
        block_size = parse_block_size(self.opts.get("block_size", str(DEFAULT_BLOCK)))
        size = -(-self.virtual_size // 512) * 512  # whole logical sectors
        meta = Metadata(block_size, False, size, 512, 4096, False)
        if not 0 < size <= MAX_VIRTUAL_SIZE:
            raise UsageError(f"a VHDX disk holds 1 sector to 64 TiB; this one is {size} bytes")
        bat_bytes = 8 * meta.bat_entries
        if bat_bytes > MAX_BAT_BYTES:
            raise UsageError(f"a {size}-byte disk needs a {bat_bytes}-byte BAT: choose a larger block_size")
        bat_length = max(MiB, -(-bat_bytes // MiB) * MiB)
        write_guid, page83 = self._guid("write_guid"), self._guid("uuid")
        sink = self.sink
        await sink.write(build_identifier())
        await sink.write(build_header(1, write_guid).ljust(64 * KiB, b"\0"))
        await sink.write(build_header(2, write_guid).ljust(64 * KiB, b"\0"))
        table = build_region_table(bat_length)
        await sink.write(table + table)
        await sink.skip(LOG_OFFSET + LOG_LENGTH - sink.position)  # reserved area and an empty log
        await sink.write(build_metadata(meta, page83))
        placeholder = await sink.reserve(bat_length)
        bat = array("Q", bytes(bat_length))

        async def classify(item: tuple[int, list[Extent]]) -> tuple[int, list[Extent]]:
            return item[0], await split_block(self.workers, item[1])

        stream = blocks(inflated(extents, self.workers), block_size)
        # A few blocks in flight: enough to keep the pool busy, bounded for 256 MiB blocks.
        async for index, pieces in ordered_map(classify, stream, max(2, 128 * MiB // block_size)):
            if all(piece.kind is Kind.ZERO for piece in pieces):
                continue  # stays PAYLOAD_BLOCK_NOT_PRESENT
            bat[bat_index(index, meta.chunk_ratio)] = (sink.position // MiB) << 20 | PAYLOAD_FULLY_PRESENT
            await write_block_body(sink, pieces, block_size)
        if sys.byteorder == "big":
            bat.byteswap()
        await sink.fill(placeholder, bat.tobytes())

    def _guid(self, name: str) -> bytes:
        if name not in self.opts:
            return uuid.uuid4().bytes
        try:
            return uuid.UUID(self.opts[name]).bytes_le
        except ValueError:
            raise UsageError(f"vhdx option {name}={self.opts[name]!r} is not a GUID") from None
