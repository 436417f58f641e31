"""VHD (Virtual PC / Hyper-V "Virtual Hard Disk Image Format Specification" v1.0, 2006): fixed and dynamic.

File maps (all integers big-endian)::

    fixed:    [ disk data (Current Size bytes) ][ footer 512 ]

    dynamic:  [ footer copy 512 ][ dynamic header 1024 ][ BAT: Max Table Entries x u32 ] ...
              ... [ block: sector bitmap (ceil(block/512/8) rounded to 512) | block data ] ...
              ... (blocks in any order, at any 512-byte offset) ... [ footer 512 ]

* Footer (spec "Hard Disk Footer Format"): cookie ``conectix``, Data Offset (dynamic header, or all
  ones for a fixed disk), Current Size, CHS geometry, Disk Type (2 fixed, 3 dynamic, 4 differencing),
  Checksum (one's complement of the byte sum with the field zeroed).
* Dynamic header ("Dynamic Disk Header Format"): cookie ``cxsparse``, Table Offset (BAT), Max Table
  Entries, Block Size, Checksum, and for differencing disks the parent's name and locators.
* BAT ("Block Allocation Table and Data Blocks"): one u32 per block, the block's sector offset in the
  file, ``0xFFFFFFFF`` when the block is absent (reads as zero). Each allocated block starts with a
  sector bitmap, one bit per sector, most significant bit first; a clear bit marks a sector that is
  not present in the block, which on a dynamic disk reads as zero.

Virtual size policy: the virtual disk is the footer's **Current Size**, as the spec, Hyper-V, Azure
and Disk2VHD read it. The CHS geometry is not used: real files disagree with it (Windows' 10 MiB
disks, Disk2VHD's saturated 65535/16/255, Virtual PC's 127 GiB disk whose CHS size is 2 MB short of
its Current Size, zero-cylinder geometries). qemu uses the CHS size for some creator applications;
vmied writes creator application ``qem2``, for which qemu uses Current Size as well, so both agree.
"""

from __future__ import annotations

import itertools
import re
import struct
import sys
import time
import uuid
from array import array
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import ClassVar

from ..errors import CorruptImage, UnsupportedImage, UsageError
from ..extents import Extent, Kind, blocks, merge_zero
from ..io.base import DEFAULT_WINDOW, Sink
from ..pipeline import Workers, ordered_map
from .base import ImageInfo, Reader, Writer, inflated
from .raw import RawReader, RawWriter, split_zero_runs

# ---------------------------------------------------------------------------------------------------
# On-disk structures
# ---------------------------------------------------------------------------------------------------

SECTOR = 512
MiB = 1 << 20

FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427x")  # 512 bytes, spec "Hard Disk Footer Format"
FOOTER_COOKIE = b"conectix"
FOOTER_CHECKSUM_AT = 64  # byte offset of the Checksum field in the footer
DYN_HEADER = struct.Struct(">8sQQIIII16sII512s192s256x")  # 1024 bytes, "Dynamic Disk Header Format"
DYN_COOKIE = b"cxsparse"
DYN_CHECKSUM_AT = 36
PARENT_LOCATOR = struct.Struct(">4sIII Q")  # platform code, data space, data length, reserved, offset
BAT_UNUSED = 0xFFFFFFFF

DISK_FIXED, DISK_DYNAMIC, DISK_DIFFERENCING = 2, 3, 4
NO_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF

#: Block sizes accepted when reading (the spec's default is 2 MiB; anything past 256 MiB is absurd).
MIN_BLOCK, MAX_BLOCK = SECTOR, 256 * MiB
#: Most BAT entries read (4 bytes each): 64 MiB of table, 32 TiB of disk at 2 MiB blocks.
MAX_BAT_ENTRIES = 1 << 24
#: Largest read of adjacent blocks: a few 2 MiB blocks per request, few requests on object stores.
READ_WINDOW = 2 * DEFAULT_WINDOW
#: What the writer produces.
WRITE_BLOCK = 2 * MiB
#: Dynamic VHDs address blocks with 32-bit sector offsets; qemu and Hyper-V stop at 2040 GiB.
MAX_DYNAMIC_SIZE = 2040 * 1024 * MiB
#: Seconds between the Unix epoch and the VHD epoch (2000-01-01 00:00:00 UTC).
VHD_EPOCH = 946684800


@dataclass(frozen=True)
class Footer:
    features: int
    data_offset: int
    timestamp: int
    creator_app: bytes
    creator_os: bytes
    current_size: int
    cylinders: int
    heads: int
    sectors_per_track: int
    disk_type: int
    uuid: bytes

    @property
    def chs_size(self) -> int:
        return self.cylinders * self.heads * self.sectors_per_track * SECTOR


@dataclass(frozen=True)
class DynamicHeader:
    table_offset: int
    max_table_entries: int
    block_size: int
    parent_name: str
    locators: tuple[tuple[bytes, int, int], ...]  # (platform code, data length, data offset)


# ---------------------------------------------------------------------------------------------------
# Pure parsing and checks
# ---------------------------------------------------------------------------------------------------


def vhd_checksum(data: bytes, checksum_at: int) -> int:
    """The spec's checksum: one's complement of the sum of all bytes, the checksum field as zero."""
    total = sum(data) - sum(data[checksum_at : checksum_at + 4])
    return ~total & 0xFFFFFFFF


def parse_footer(data: bytes) -> Footer:
    (cookie, features, _version, data_offset, timestamp, creator_app, _creator_version, creator_os,
     _original_size, current_size, cylinders, heads, sectors, disk_type, checksum, disk_uuid,
     _saved_state) = FOOTER.unpack(data)
    if cookie != FOOTER_COOKIE:
        raise CorruptImage("VHD footer missing: no 'conectix' cookie in the last 512 bytes of the file "
                           "(truncated or not a VHD)", reason="vhd.footer_missing")
    if vhd_checksum(data, FOOTER_CHECKSUM_AT) != checksum:
        raise CorruptImage("VHD footer checksum mismatch (the footer is corrupt or was edited)",
                           reason="vhd.checksum")
    return Footer(features, data_offset, timestamp, creator_app, creator_os, current_size, cylinders,
                  heads, sectors, disk_type, disk_uuid)


def parse_dynamic_header(data: bytes) -> DynamicHeader:
    (cookie, _data_offset, table_offset, _version, max_entries, block_size, checksum, _parent_uuid,
     _parent_time, _reserved, parent_name, locators) = DYN_HEADER.unpack(data)
    if cookie != DYN_COOKIE:
        raise CorruptImage("VHD dynamic header missing: no 'cxsparse' cookie at the footer's Data Offset",
                           reason="vhd.header_missing")
    if vhd_checksum(data, DYN_CHECKSUM_AT) != checksum:
        raise CorruptImage("VHD dynamic header checksum mismatch (the header is corrupt or was edited)",
                           reason="vhd.checksum")
    entries = []
    for index in range(8):
        code, _space, length, _reserved, offset = PARENT_LOCATOR.unpack_from(locators, index * 24)
        if code != b"\0\0\0\0":
            entries.append((code, length, offset))
    name = parent_name.decode("utf-16-be", "replace").split("\0")[0]
    return DynamicHeader(table_offset, max_entries, block_size, name, tuple(entries))


def bitmap_size(block_size: int) -> int:
    """Bytes of sector bitmap before each block: one bit per sector, padded to whole sectors."""
    bitmap_bytes = -(-(block_size // SECTOR) // 8)
    return -(-bitmap_bytes // SECTOR) * SECTOR


def check_block_size(block_size: int) -> int:
    if block_size & (block_size - 1) or not MIN_BLOCK <= block_size <= MAX_BLOCK:
        raise CorruptImage(f"VHD block size {block_size} is not a power of two between {MIN_BLOCK} bytes "
                           f"and {MAX_BLOCK // MiB} MiB", reason="vhd.block_size")
    return block_size


def check_bat_geometry(header: DynamicHeader, virtual_size: int, file_size: int) -> int:
    """How many BAT entries the disk uses; refuses tables that are too small, huge or past the end."""
    needed = -(-virtual_size // header.block_size)
    if needed > MAX_BAT_ENTRIES:
        raise UnsupportedImage(f"VHD has {needed} blocks, more than the {MAX_BAT_ENTRIES} vmied reads",
                               reason="vhd.bat_size")
    if header.max_table_entries < needed:
        raise CorruptImage(f"VHD BAT of {header.max_table_entries} entries is too small for {needed} blocks",
                           reason="vhd.bat_size")
    end = header.table_offset + 4 * header.max_table_entries
    if header.table_offset < SECTOR or end > file_size - SECTOR:
        raise CorruptImage(
            f"VHD BAT at offset {header.table_offset} with Max Table Entries {header.max_table_entries} "
            f"lies outside the file ({file_size} bytes)", reason="vhd.bat_outside")
    return needed


def check_bat_entry(index: int, entry: int, span: int, data_end: int) -> int:
    """The file offset of block ``index``; refuses a block that is not wholly inside the data area."""
    offset = entry * SECTOR
    if offset < SECTOR or offset + span > data_end:
        raise CorruptImage(f"VHD BAT entry {index} points at offset {offset}, outside the file's data "
                           f"area [512, {data_end})", reason="vhd.bat_entry")
    return offset


def check_bat(bat: array[int], span: int, data_end: int) -> int:
    """Check every allocated entry (each block inside the file, no two blocks overlapping)."""
    starts = sorted(check_bat_entry(i, e, span, data_end) for i, e in enumerate(bat) if e != BAT_UNUSED)
    for before, after in itertools.pairwise(starts):
        if after - before < span:
            raise CorruptImage(f"VHD blocks at offsets {before} and {after} overlap",
                               reason="vhd.bat_overlap")
    return len(starts)


def differencing_message(header: DynamicHeader | None, paths: list[str]) -> str:
    parent = header.parent_name if header else "?"
    where = "; parent locators: " + ", ".join(paths) if paths else ""
    return (f"VHD is a differencing disk (disk type 4) whose content depends on the parent disk "
            f"\"{parent}\"{where}: differencing disks are not supported; merge it into its parent first")


def decode_locator(code: bytes, data: bytes) -> str:
    """A parent locator's path: UTF-16LE for the Windows codes, UTF-8 for Mac ones."""
    text = data.decode("utf-16-le" if code in (b"W2ku", b"W2ru") else "utf-8", "replace")
    return text.split("\0")[0]


def present_runs(bitmap: bytes, sectors: int) -> list[tuple[int, int, bool]]:
    """``(first sector, count, present)`` runs of a sector bitmap over its first ``sectors`` sectors."""
    bits = "".join(format(byte, "08b") for byte in bitmap[: -(-sectors // 8)])[:sectors]
    return [(m.start(), m.end() - m.start(), m.group()[0] == "1") for m in re.finditer(r"1+|0+", bits)]


def decode_blocks(
    offset: int, data: bytes, bitmap_len: int, block_size: int, lengths: list[int]
) -> list[Extent]:
    """Turn a run of consecutive blocks (bitmap + data each) into extents, honouring the bitmaps."""
    view = memoryview(data)
    out: list[Extent] = []
    stride = bitmap_len + block_size
    for k, length in enumerate(lengths):
        bitmap = bytes(view[k * stride : k * stride + bitmap_len])
        body = view[k * stride + bitmap_len : k * stride + bitmap_len + length]
        for first, count, present in present_runs(bitmap, -(-length // SECTOR)):
            start, end = first * SECTOR, min((first + count) * SECTOR, length)
            if present:
                out.append(Extent.of_data(offset + start, body[start:end]))
            else:
                out.append(Extent.zero(offset + start, end - start))
        offset += length
    return merge_zero(out)


# ---------------------------------------------------------------------------------------------------
# Geometry and footers for the writer
# ---------------------------------------------------------------------------------------------------


def chs_geometry(size: int) -> tuple[int, int, int]:
    """``(cylinders, heads, sectors per track)`` as the spec's appendix computes them."""
    total = min(size // SECTOR, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        sectors, heads = 255, 16
        cyl_heads = total // sectors
    else:
        sectors = 17
        cyl_heads = total // sectors
        heads = max((cyl_heads + 1023) // 1024, 4)
        if cyl_heads >= heads * 1024 or heads > 16:
            sectors, heads = 31, 16
            cyl_heads = total // sectors
        if cyl_heads >= heads * 1024:
            sectors, heads = 63, 16
            cyl_heads = total // sectors
    return cyl_heads // heads, heads, sectors


def build_footer(size: int, disk_type: int, data_offset: int, when: float, disk_uuid: bytes) -> bytes:
    cylinders, heads, sectors = chs_geometry(size)
    fields = [FOOTER_COOKIE, 2, 0x00010000, data_offset, (int(when) - VHD_EPOCH) & 0xFFFFFFFF, b"qem2",
              0x00010000, b"Wi2k", size, size, cylinders, heads, sectors, disk_type, 0, disk_uuid, 0]
    blank = FOOTER.pack(*fields)
    fields[14] = vhd_checksum(blank, FOOTER_CHECKSUM_AT)
    return FOOTER.pack(*fields)


def build_dynamic_header(table_offset: int, entries: int, block_size: int) -> bytes:
    fields = [DYN_COOKIE, NO_DATA_OFFSET, table_offset, 0x00010000, entries, block_size, 0, bytes(16), 0, 0,
              bytes(512), bytes(192)]
    fields[6] = vhd_checksum(DYN_HEADER.pack(*fields), DYN_CHECKSUM_AT)
    return DYN_HEADER.pack(*fields)


def output_size(virtual_size: int, round_to_mib: bool) -> int:
    """VHD sizes are whole sectors; some platforms (Azure) also want whole MiB. Always round up."""
    unit = MiB if round_to_mib else SECTOR
    return -(-virtual_size // unit) * unit


async def split_block(workers: Workers, extents: list[Extent]) -> list[Extent]:
    """One block's extents with its all-zero 64 KiB runs turned into ZERO (one pool job per block)."""

    def split() -> list[Extent]:
        out: list[Extent] = []
        for extent in extents:
            if extent.kind is Kind.DATA and extent.data is not None:
                out.extend(split_zero_runs(extent.offset, extent.data))
            else:
                out.append(extent)
        return merge_zero(out)

    return await workers.run(split)


async def write_block_body(sink: Sink, pieces: list[Extent], block_size: int) -> None:
    """A block's bytes: data written, zero runs left as holes, the block padded to its full size."""
    written = 0
    for piece in pieces:
        if piece.kind is Kind.ZERO:
            await sink.skip(piece.length)
        else:
            assert piece.data is not None
            await sink.write(piece.data)
        written += piece.length
    await sink.skip(block_size - written)


# ---------------------------------------------------------------------------------------------------
# Reader and Writer
# ---------------------------------------------------------------------------------------------------


class VhdReader(Reader):
    format = "vhd"

    footer: Footer
    header: DynamicHeader | None = None
    bat: array[int]
    allocated = 0

    @classmethod
    def probe(cls, head: bytes, tail: bytes, size: int) -> bool:
        # A fixed VHD has its only footer at the end; a dynamic one a copy at the start too.
        return tail[:8] == FOOTER_COOKIE or head[:8] == FOOTER_COOKIE

    async def load(self) -> None:
        size = self.source.size
        if size < SECTOR or size % SECTOR:
            raise CorruptImage(f"VHD file of {size} bytes cannot end with a 512-byte footer (truncated?)",
                               reason="vhd.footer_missing")
        raw_footer = await self.source.read_exact(size - SECTOR, SECTOR, "VHD footer")
        self.footer = parse_footer(raw_footer)
        self.virtual_size = self.footer.current_size
        if self.footer.disk_type == DISK_DIFFERENCING:
            await self._refuse_differencing()
        if self.footer.disk_type == DISK_FIXED:
            if self.virtual_size > size - SECTOR:
                raise CorruptImage(f"fixed VHD of Current Size {self.virtual_size} holds only "
                                   f"{size - SECTOR} bytes of data", reason="vhd.truncated")
            self.allocated = self.virtual_size
            return
        if self.footer.disk_type != DISK_DYNAMIC:
            raise UnsupportedImage(f"VHD disk type {self.footer.disk_type} is not fixed (2) or dynamic (3)",
                                   reason="vhd.disk_type")
        copy = await self.source.read_exact(0, SECTOR, "VHD footer copy")
        if copy != raw_footer:
            raise CorruptImage("ClientError: Footers not identical: the VHD footer copy at offset 0 differs "
                               "from the footer at the end of the file", reason="vhd.footers")
        await self._load_dynamic()

    async def _read_header(self) -> DynamicHeader:
        offset = self.footer.data_offset
        if offset % SECTOR or offset > self.source.size:
            raise CorruptImage(f"VHD dynamic header offset {offset} is unaligned or past the end",
                               reason="vhd.header_missing")
        raw = await self.source.read_exact(offset, DYN_HEADER.size, "VHD dynamic header")
        return parse_dynamic_header(raw)

    async def _load_dynamic(self) -> None:
        header = self.header = await self._read_header()
        check_block_size(header.block_size)
        needed = check_bat_geometry(header, self.virtual_size, self.source.size)
        raw = await self.source.read_exact(header.table_offset, 4 * needed, "VHD BAT")
        self.bat = array("I", raw)
        if sys.byteorder == "little":
            self.bat.byteswap()
        span = bitmap_size(header.block_size) + header.block_size
        self.allocated = await self.workers.run(check_bat, self.bat, span, self.source.size - SECTOR)

    async def _refuse_differencing(self) -> None:
        header, paths = None, []
        try:
            header = await self._read_header()
            for code, length, offset in header.locators:
                if 0 < length <= 4096 and offset + length <= self.source.size:
                    raw = await self.source.read_exact(offset, length, "VHD parent locator")
                    paths.append(decode_locator(code, raw))
        except CorruptImage:
            pass  # the refusal names the disk type; a damaged header only loses the parent's name
        raise UnsupportedImage(differencing_message(header, paths), reason="vhd.differencing")

    def info(self) -> ImageInfo:
        footer = self.footer
        details = {
            "creator_app": footer.creator_app.decode("latin-1").rstrip("\0 "),
            "chs_size": footer.chs_size,
            "geometry": [footer.cylinders, footer.heads, footer.sectors_per_track],
        }
        block = self.header.block_size if self.header else None
        subformat = "fixed" if footer.disk_type == DISK_FIXED else "dynamic"
        allocated = self.allocated * (block or 1)
        problems = []
        if footer.chs_size != self.virtual_size:
            problems.append(f"CHS geometry gives {footer.chs_size} bytes, Current Size {self.virtual_size}: "
                            "vmied uses Current Size (qemu uses the CHS size for some creator applications)")
        return ImageInfo("vhd", self.virtual_size, subformat, allocated, block, problems, details)

    async def extents(self) -> AsyncIterator[Extent]:
        if self.header is None:
            raw = RawReader(self.source, self.workers)  # a fixed VHD is a raw disk followed by the footer
            raw.virtual_size = self.virtual_size
            async for extent in raw.extents():
                yield extent
            return
        async for batch in ordered_map(self._fetch, self._plan()):
            for extent in batch:
                yield extent

    async def _plan(self) -> AsyncIterator[tuple[int, int, int, list[int]]]:
        """Jobs in virtual order: ``(offset, length, -1, [])`` for a zero run, or
        ``(offset, 0, file offset, block lengths)`` for blocks adjacent both in the disk and in the
        file, grouped up to one read window so that files written in order are read sequentially."""
        assert self.header is not None
        block = self.header.block_size
        span = bitmap_size(block) + block
        position = 0
        run: tuple[int, int, list[int]] | None = None  # virtual start, file start, block lengths
        for index, entry in enumerate(self.bat):
            if entry == BAT_UNUSED:
                continue
            start, offset = index * block, entry * SECTOR
            length = min(block, self.virtual_size - start)
            if (run and run[0] + block * len(run[2]) == start and run[1] + span * len(run[2]) == offset
                    and span * (len(run[2]) + 1) <= READ_WINDOW):
                run[2].append(length)
                continue
            if run:
                yield run[0], 0, run[1], run[2]
                position = run[0] + sum(run[2])
            if position < start:
                yield position, start - position, -1, []
            run = (start, offset, [length])
        if run:
            yield run[0], 0, run[1], run[2]
            position = run[0] + sum(run[2])
        if position < self.virtual_size:
            yield position, self.virtual_size - position, -1, []

    async def _fetch(self, job: tuple[int, int, int, list[int]]) -> list[Extent]:
        offset, zero_length, file_offset, lengths = job
        if file_offset < 0:
            return [Extent.zero(offset, zero_length)]
        assert self.header is not None
        block, bitmap_len = self.header.block_size, bitmap_size(self.header.block_size)
        size = (len(lengths) - 1) * (bitmap_len + block) + bitmap_len + lengths[-1]
        data = await self.source.read_exact(file_offset, size, "VHD data block")
        return await self.workers.run(decode_blocks, offset, data, bitmap_len, block, lengths)


class VhdWriter(Writer):
    format = "vhd"
    options: ClassVar[Mapping[str, tuple[str, ...] | None]] = {
        "subformat": ("dynamic", "fixed"),
        "round_to_mib": ("on", "off"),
        "uuid": None,  # the footer's unique id; random if not given
        "timestamp": None,  # the footer's creation time (Unix seconds); now if not given
    }

    async def write(self, extents: AsyncIterator[Extent]) -> None:
        size = output_size(self.virtual_size, self.opts.get("round_to_mib", "off") == "on")
        fixed = self.opts.get("subformat", "dynamic") == "fixed"
        if not fixed and size > MAX_DYNAMIC_SIZE:
            raise UsageError(f"a dynamic VHD holds at most 2040 GiB; this disk is {size} bytes "
                             "(use -o subformat=fixed or another format)")
        when, disk_uuid = self._identity()
        if fixed:
            await RawWriter(self.sink, self.virtual_size, {}, self.workers).write(extents)
            await self.sink.skip(size - self.virtual_size)
            await self.sink.write(build_footer(size, DISK_FIXED, NO_DATA_OFFSET, when, disk_uuid))
            return
        footer = build_footer(size, DISK_DYNAMIC, SECTOR, when, disk_uuid)
        await self._write_dynamic(extents, size, footer)

    def _identity(self) -> tuple[float, bytes]:
        """Creation time and unique id: given (a resumed export writes the same bytes again) or fresh."""
        try:
            when = float(self.opts["timestamp"]) if "timestamp" in self.opts else time.time()
            disk_uuid = uuid.UUID(self.opts["uuid"]).bytes if "uuid" in self.opts else uuid.uuid4().bytes
        except ValueError as exc:
            raise UsageError(f"vhd options uuid/timestamp: {exc}") from None
        return when, disk_uuid

    async def _write_dynamic(self, extents: AsyncIterator[Extent], size: int, footer: bytes) -> None:
        """Footer copy, header, BAT (a placeholder, filled at the end), blocks, footer.

        The footer copy is complete before any data (size, time and UUID are known), so it is written
        directly; only the BAT depends on where the blocks land.
        """
        entries = -(-size // WRITE_BLOCK)
        table_offset = 3 * SECTOR
        await self.sink.write(footer)
        await self.sink.write(build_dynamic_header(table_offset, entries, WRITE_BLOCK))
        bat = array("I", [BAT_UNUSED]) * entries
        placeholder = await self.sink.reserve(-(-4 * entries // SECTOR) * SECTOR)
        bitmap = b"\xff" * bitmap_size(WRITE_BLOCK)

        async def classify(item: tuple[int, list[Extent]]) -> tuple[int, list[Extent]]:
            return item[0], await split_block(self.workers, item[1])

        stream = blocks(inflated(extents, self.workers), WRITE_BLOCK)
        async for index, pieces in ordered_map(classify, stream):
            if all(piece.kind is Kind.ZERO for piece in pieces):
                continue  # an all-zero block stays unallocated
            # Place the bitmap so that the block's data is 4 KiB aligned in the file, as Windows does.
            await self.sink.skip(-(self.sink.position + SECTOR) % 4096)
            bat[index] = self.sink.position // SECTOR
            await self.sink.write(bitmap)
            await write_block_body(self.sink, pieces, WRITE_BLOCK)
        await self.sink.write(footer)
        if sys.byteorder == "little":
            bat.byteswap()
        table = bat.tobytes()
        await self.sink.fill(placeholder, table + b"\xff" * (placeholder.length - len(table)))
