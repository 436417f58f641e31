"""VMDK: hosted sparse extents, stream-optimized streams and descriptor files.

Reference: VMware "Virtual Disk Format 1.1" (the VMDK spec), §3 hosted sparse extents, §4 the
descriptor (vmdk_descriptor.py), "Stream-Optimized Compressed Sparse Extents"; qemu block/vmdk.c.

Hosted sparse extent (monolithicSparse, one extent of twoGbMaxExtentSparse)::

    sector 0        SparseExtentHeader (512 B, "KDMV")
    descriptorOffset  embedded descriptor (descriptorSize sectors, text, NUL padded)
    rgdOffset       redundant grain directory -> redundant grain tables
    gdOffset        grain directory: one u32 sector offset per grain table (0: none)
                    grain tables: numGTEsPerGT u32 sector offsets per table
                      GTE 0: unallocated (zero), GTE 1: zeroed grain, else the grain's sector
    overHead        grains (grainSize sectors each, uncompressed)

Stream-optimized extent (streamOptimized; compressed grains, markers)::

    sector 0        header (gdOffset = GD_AT_END: the real one is in the footer)
    sector 1..      embedded descriptor
    overHead        [grain marker: lba u64, size u32, zlib data]  padded to 512, ascending lba
                    [metadata marker: numSectors u64, 0 u32, type u32, pad] + numSectors sectors
                      type 1 GT, 2 GD, 3 footer (a header copy with the real gdOffset), 0 end
    ...             GT after each 512 grains' range, then GD, footer, end-of-stream marker

Streams are read once, in order, marker by marker (a stream need not have a grain directory);
hosted sparse extents are read through their grain directory with coalesced reads.
"""

from __future__ import annotations

import array
import os
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import ClassVar

from .. import codec
from ..errors import CorruptImage, UnsupportedImage, UsageError
from ..extents import Buffer, Extent, Kind, aligned, whole_grain
from ..fastio import is_zero, scan_grain_markers, zero_grains
from ..io.base import MiB, Sink, Source
from ..pipeline import Workers, ordered_map
from . import vmdk_descriptor as desc
from .base import ImageInfo, Reader, Writer, inflated
from .raw import flat_extents

# --- on-disk structures (spec §3, "Hosted Sparse Extent Header") ---------------------------------

SECTOR = 512
MAGIC = 0x564D444B  # "KDMV" little-endian
#: magicNumber, version, flags, capacity, grainSize, descriptorOffset, descriptorSize,
#: numGTEsPerGT, rgdOffset, gdOffset, overHead, uncleanShutdown, the four newline-detection
#: characters, compressAlgorithm; padded to one sector.
HEADER = struct.Struct("<IIIQQQQIQQQB4sH433x")
MARKER = struct.Struct("<QII")  # lba or numSectors, size (0 for metadata), type (metadata only)
GRAIN_MARKER_SIZE = 12
GTE = struct.Struct("<I")
U32 = struct.Struct("<I")

FLAG_NEWLINE_TEST = 1 << 0
FLAG_REDUNDANT_GT = 1 << 1
FLAG_ZEROED_GRAIN_GTE = 1 << 2
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
COMPRESSION_NONE = 0
COMPRESSION_DEFLATE = 1
GD_AT_END = 0xFFFFFFFFFFFFFFFF
NEWLINE_CHARS = b"\n \r\n"

MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3
GTE_UNALLOCATED, GTE_ZEROED = 0, 1

# --- bounds on untrusted numbers ----------------------------------------------------------------

MAX_GRAIN_SECTORS = 4096  # 2 MiB grains; VMware uses 128 (64 KiB)
MAX_GTES_PER_GT = 65536
#: Largest grain directory read into memory (a 64 TiB disk with 64 KiB grains needs 2 MiB).
MAX_GD_BYTES = 64 * MiB
#: A grain's deflate stream can exceed the grain (incompressible data); anything beyond this is hostile.
def max_compressed(grain_bytes: int) -> int:
    return 2 * grain_bytes + 4096

#: Grains gathered into one DEFLATED extent / one read (a few MiB of virtual disk).
BATCH_BYTES = 4 * MiB


@dataclass(frozen=True)
class SparseHeader:
    version: int
    flags: int
    capacity: int  # sectors
    grain_size: int  # sectors
    descriptor_offset: int
    descriptor_size: int
    gtes_per_gt: int
    rgd_offset: int
    gd_offset: int
    overhead: int
    unclean_shutdown: int
    newline_chars: bytes
    compress_algorithm: int

    @property
    def grain_bytes(self) -> int:
        return self.grain_size * SECTOR

    @property
    def compressed(self) -> bool:
        return bool(self.flags & FLAG_COMPRESSED)

    @property
    def markers(self) -> bool:
        return bool(self.flags & FLAG_MARKERS)

    @property
    def gt_coverage(self) -> int:
        """Virtual bytes one grain table maps."""
        return self.gtes_per_gt * self.grain_bytes

    @property
    def gd_entries(self) -> int:
        return -(-self.capacity * SECTOR // self.gt_coverage)

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, self.version, self.flags, self.capacity, self.grain_size,
                           self.descriptor_offset, self.descriptor_size, self.gtes_per_gt,
                           self.rgd_offset, self.gd_offset, self.overhead, self.unclean_shutdown,
                           self.newline_chars, self.compress_algorithm)


# --- bounded parsing -----------------------------------------------------------------------------


def parse_header(raw: bytes) -> SparseHeader:
    magic, *fields = HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise CorruptImage("not a VMDK sparse extent (no KDMV magic)", reason="vmdk.magic")
    return SparseHeader(*fields)


def check_header(header: SparseHeader, file_size: int) -> None:
    """Every field bounded before any of it is used (qemu's checks, and a few more)."""
    if header.version not in (1, 2, 3):
        raise UnsupportedImage(f"VMDK sparse extent version {header.version} is not supported",
                               reason="vmdk.version")
    grain = header.grain_size
    if grain < 1 or grain > MAX_GRAIN_SECTORS or grain & (grain - 1):
        raise CorruptImage(f"VMDK grain size of {grain} sectors is not a power of two up to "
                           f"{MAX_GRAIN_SECTORS}", reason="vmdk.grain-size")
    if header.capacity > desc.MAX_CAPACITY_SECTORS:
        raise CorruptImage(f"VMDK capacity of {header.capacity} sectors is larger than any VMDK can be",
                           reason="vmdk.capacity")
    if not 1 <= header.gtes_per_gt <= MAX_GTES_PER_GT:
        raise CorruptImage(f"VMDK numGTEsPerGT {header.gtes_per_gt} out of range", reason="vmdk.gt-size")
    if header.compressed and header.compress_algorithm != COMPRESSION_DEFLATE:
        raise UnsupportedImage(f"VMDK compression algorithm {header.compress_algorithm} is not supported",
                               reason="vmdk.compression")
    if header.descriptor_offset:
        end = (header.descriptor_offset + header.descriptor_size) * SECTOR
        if header.descriptor_size * SECTOR > desc.MAX_DESCRIPTOR:
            raise CorruptImage(f"VMDK embedded descriptor of {header.descriptor_size} sectors exceeds "
                               "the 1 MiB cap", reason="vmdk.descriptor-size")
        if end > file_size:
            raise CorruptImage("VMDK embedded descriptor lies beyond the end of the file",
                               reason="vmdk.descriptor-offset")
    if header.overhead * SECTOR > file_size and not header.markers:
        raise CorruptImage("VMDK overhead lies beyond the end of the file", reason="vmdk.overhead")


def check_grain_directory(header: SparseHeader, gd_offset: int, file_size: int) -> int:
    """The GD's size in bytes, refusing one beyond the file or larger than the file could index."""
    size = header.gd_entries * GTE.size
    if size > MAX_GD_BYTES or header.gd_entries * header.gtes_per_gt * GTE.size > 64 * file_size + MAX_GD_BYTES:
        raise CorruptImage(f"VMDK grain directory of {header.gd_entries} entries is too big for its "
                           f"file (capacity {header.capacity} sectors)", reason="vmdk.gd-size")
    if gd_offset * SECTOR + size > file_size:
        raise CorruptImage("VMDK grain directory lies beyond the end of the file", reason="vmdk.gd-offset")
    return size


def check_grain_location(offset: int, length: int, file_size: int) -> None:
    if offset + length > file_size:
        raise CorruptImage(f"VMDK grain at byte {offset} lies beyond the end of the file ({file_size})",
                           reason="vmdk.grain-offset")


# --- reading -------------------------------------------------------------------------------------


class SparseExtentReader:
    """One hosted sparse or stream-optimized extent: its header, then its grains in order."""

    def __init__(self, source: Source, header: SparseHeader, workers: Workers) -> None:
        self.source = source
        self.header = header
        self.workers = workers
        self.size = header.capacity * SECTOR
        self.grains_read = 0

    @classmethod
    async def open(cls, source: Source, workers: Workers) -> SparseExtentReader:
        raw = await source.read_exact(0, SECTOR, "VMDK header")
        header = parse_header(raw)
        check_header(header, source.size)
        if header.markers and header.gd_offset == GD_AT_END:
            header = await cls._footer_header(source, header)
        return cls(source, header, workers)

    @staticmethod
    async def _footer_header(source: Source, header: SparseHeader) -> SparseHeader:
        """A stream's header names no GD; its footer (2nd-to-last sector) may. Only used for info."""
        if source.size < 3 * SECTOR:
            return header
        footer_raw = await source.read_exact(source.size - 2 * SECTOR, SECTOR, "VMDK footer")
        try:
            footer = parse_header(footer_raw)
        except CorruptImage:
            return header  # a stream with no footer is read marker by marker all the same
        if footer.capacity != header.capacity or footer.grain_size != header.grain_size:
            raise CorruptImage("VMDK footer disagrees with the header (capacity or grain size)",
                               reason="vmdk.footer")
        return header

    async def embedded_descriptor(self) -> desc.Descriptor | None:
        if not self.header.descriptor_offset or not self.header.descriptor_size:
            return None
        raw = await self.source.read_exact(self.header.descriptor_offset * SECTOR,
                                           self.header.descriptor_size * SECTOR, "VMDK descriptor")
        return desc.parse(raw)

    def extents(self, base: int) -> AsyncIterator[Extent]:
        if self.header.markers and self.header.compressed:
            return self._stream_extents(base)
        if self.header.compressed:
            raise UnsupportedImage("VMDK with compressed grains but no grain markers is not supported",
                                   reason="vmdk.compression")
        return self._indexed_extents(base)

    # streamOptimized: one pass, marker by marker ------------------------------------------------

    async def _stream_extents(self, base: int) -> AsyncIterator[Extent]:
        grain_bytes = self.header.grain_bytes
        position = 0  # virtual bytes of this extent covered so far
        batch: list[Buffer] = []
        batch_start = 0
        async for lba, data in self._stream_grains():
            offset = lba * SECTOR
            if offset % grain_bytes or offset >= self.size:
                raise CorruptImage(f"VMDK grain marker at sector {lba} is not a grain of the disk",
                                   reason="vmdk.grain-lba")
            if offset < position:
                raise CorruptImage(f"VMDK stream grains out of order (sector {lba} after byte {position})",
                                   reason="vmdk.stream-order")
            if batch and (offset != batch_start + len(batch) * grain_bytes or len(batch) * grain_bytes >= BATCH_BYTES):
                yield self._deflated(base, batch_start, batch)
                batch = []
            if not batch:
                if offset > position:
                    yield Extent.zero(base + position, offset - position)
                batch_start = offset
            batch.append(data)
            position = min(offset + grain_bytes, self.size)
            self.grains_read += 1
        if batch:
            yield self._deflated(base, batch_start, batch)
        if position < self.size:
            yield Extent.zero(base + position, self.size - position)

    def _deflated(self, base: int, start: int, grains: list[Buffer]) -> Extent:
        length = min(len(grains) * self.header.grain_bytes, self.size - start)
        return Extent.deflated(base + start, length, tuple(grains), self.header.grain_bytes)

    async def _stream_grains(self) -> AsyncIterator[tuple[int, memoryview]]:
        """(lba, compressed data) of each grain marker, in file order; metadata skipped."""
        max_data = max_compressed(self.header.grain_bytes)
        start = self.header.overhead * SECTOR
        buf = b""
        skip = 0  # bytes of metadata still to pass over in coming windows
        async for window in self.source.windows(start):
            if skip >= len(window):
                skip -= len(window)
                continue
            buf = buf + window[skip:] if buf else window[skip:]
            view = memoryview(buf)  # grains are views: the window is not copied grain by grain
            skip = 0
            cursor = 0
            while True:
                try:
                    grains, consumed = scan_grain_markers(view[cursor:], max_data)
                except ValueError:
                    raise CorruptImage("VMDK grain marker claims more data than a grain can compress to",
                                       reason="vmdk.grain-size") from None
                for lba, data_offset, size in grains:
                    at = cursor + data_offset
                    yield lba, view[at : at + size]
                cursor += consumed
                if cursor + MARKER.size > len(buf) or U32.unpack_from(buf, cursor + 8)[0] != 0:
                    break  # need more bytes: an incomplete marker or grain
                if cursor + SECTOR > len(buf):
                    break
                sectors, _, kind = MARKER.unpack_from(buf, cursor)
                if kind == MARKER_EOS:
                    return
                if sectors * SECTOR > self.source.size:
                    raise CorruptImage(f"VMDK metadata marker claims {sectors} sectors",
                                       reason="vmdk.marker")
                cursor += SECTOR + sectors * SECTOR  # GT, GD, footer or a type the spec lacks
                if cursor > len(buf):
                    skip, cursor = cursor - len(buf), len(buf)
            buf = buf[cursor:]
        if buf and not is_zero(buf):
            raise CorruptImage("VMDK stream ends inside a grain (truncated file)", reason="image.truncated")

    # hosted sparse: through the grain directory --------------------------------------------------

    async def _indexed_extents(self, base: int) -> AsyncIterator[Extent]:
        header = self.header
        gd_offset = header.gd_offset
        if header.flags & FLAG_REDUNDANT_GT and gd_offset in (0, GD_AT_END):
            gd_offset = header.rgd_offset
        size = check_grain_directory(header, gd_offset, self.source.size)
        directory = array.array("I", await self.source.read_exact(gd_offset * SECTOR, size, "VMDK grain directory"))
        if sys.byteorder != "little":
            directory.byteswap()

        async def reads() -> AsyncIterator[tuple[int, int, int]]:
            """(virtual offset, file offset, length) runs: file offset -1 for zero runs."""
            for table_index, table_sector in enumerate(directory):
                async for run in self._table_runs(table_index, table_sector):
                    yield run

        async def fetch(run: tuple[int, int, int]) -> Extent:
            virtual, file_offset, length = run
            if file_offset < 0:
                return Extent.zero(base + virtual, length)
            data = await self.source.read_exact(file_offset, length, "VMDK grain")
            return Extent.of_data(base + virtual, data)

        async for extent in ordered_map(fetch, _coalesce(reads())):
            yield extent

    async def _table_runs(self, table_index: int, table_sector: int) -> AsyncIterator[tuple[int, int, int]]:
        header = self.header
        grain_bytes = header.grain_bytes
        table_start = table_index * header.gt_coverage
        table_end = min(table_start + header.gt_coverage, self.size)
        if table_sector in (GTE_UNALLOCATED,) or table_start >= self.size:
            yield table_start, -1, table_end - table_start
            return
        table_bytes = header.gtes_per_gt * GTE.size
        check_grain_location(table_sector * SECTOR, table_bytes, self.source.size)
        table = array.array("I", await self.source.read_exact(table_sector * SECTOR, table_bytes, "VMDK grain table"))
        if sys.byteorder != "little":
            table.byteswap()
        for index, entry in enumerate(table):
            virtual = table_start + index * grain_bytes
            if virtual >= self.size:
                break
            length = min(grain_bytes, self.size - virtual)
            if entry in (GTE_UNALLOCATED, GTE_ZEROED):
                yield virtual, -1, length
                continue
            check_grain_location(entry * SECTOR, length, self.source.size)
            yield virtual, entry * SECTOR, length


async def _coalesce(runs: AsyncIterator[tuple[int, int, int]]) -> AsyncIterator[tuple[int, int, int]]:
    """Join runs that continue each other on both sides (zero after zero, data after adjacent data)."""
    current: tuple[int, int, int] | None = None
    async for virtual, file_offset, length in runs:
        if current is not None:
            c_virtual, c_file, c_length = current
            joins = c_virtual + c_length == virtual and (
                (c_file < 0 and file_offset < 0)
                or (c_file >= 0 and c_file + c_length == file_offset and c_length + length <= BATCH_BYTES)
            )
            if joins:
                current = (c_virtual, c_file, c_length + length)
                continue
            yield current
        current = (virtual, file_offset, length)
    if current is not None:
        yield current


class VmdkReader(Reader):
    """A VMDK: a sparse/stream extent opened directly, or a descriptor file naming extents."""

    format = "vmdk"

    def __init__(self, source: Source, workers: Workers) -> None:
        super().__init__(source, workers)
        self.subformat = ""
        self.parts: list[tuple[int, Callable[[int], AsyncIterator[Extent]]]] = []
        self.sparse: list[SparseExtentReader] = []
        self.opened: list[Source] = []

    @classmethod
    def probe(cls, head: bytes, tail: bytes, size: int) -> bool:
        return head[:4] == b"KDMV" or head.lstrip(b"\xef\xbb\xbf").startswith(desc.MAGIC_LINE)

    async def load(self) -> None:
        head = await self.source.read_at(0, 4)
        if head == b"KDMV":
            await self._load_sparse()
        else:
            await self._load_descriptor_file()
        self.virtual_size = sum(size for size, _ in self.parts)

    async def _load_sparse(self) -> None:
        extent = await SparseExtentReader.open(self.source, self.workers)
        descriptor = await extent.embedded_descriptor()
        if descriptor is not None:
            self.subformat = descriptor.create_type
            if descriptor.create_type.lower() not in ("monolithicsparse", "streamoptimized"):
                raise UnsupportedImage(f"VMDK sparse file with createType {descriptor.create_type!r} is "
                                       "an extent of another disk: convert its descriptor file",
                                       reason="vmdk.create-type")
        else:
            self.subformat = "streamOptimized" if extent.header.markers else "monolithicSparse"
        self.sparse.append(extent)
        self.parts.append((extent.size, extent.extents))

    async def _load_descriptor_file(self) -> None:
        if self.source.size > desc.MAX_DESCRIPTOR:
            raise CorruptImage(f"VMDK descriptor file of {self.source.size} bytes exceeds the 1 MiB cap",
                               reason="vmdk.descriptor-size")
        descriptor = desc.parse(await self.source.read_exact(0, self.source.size, "VMDK descriptor"))
        self.subformat = descriptor.create_type
        if not descriptor.extents:
            raise CorruptImage("VMDK descriptor lists no extents", reason="vmdk.descriptor-syntax")
        for line in descriptor.extents:
            self.parts.append((line.sectors * SECTOR, await self._open_extent(line)))

    async def _open_extent(self, line: desc.ExtentLine) -> Callable[[int], AsyncIterator[Extent]]:
        size = line.sectors * SECTOR
        if line.type == "ZERO":
            return lambda base: _zero_extent(base, size)
        source = await self.source.open_sibling(line.filename)
        self.opened.append(source)
        if line.type in ("FLAT", "VMFS"):
            if line.offset * SECTOR + size > source.size:
                raise CorruptImage(f"VMDK extent {line.filename!r} ends beyond its file "
                                   f"({line.offset * SECTOR + size} > {source.size} bytes)",
                                   reason="vmdk.extent-outside")
            return lambda base: flat_extents(source, self.workers, line.offset * SECTOR, size, base)
        extent = await SparseExtentReader.open(source, self.workers)
        if extent.size != size:
            raise CorruptImage(f"VMDK extent {line.filename!r} holds {extent.size} bytes, its descriptor "
                               f"says {size}", reason="vmdk.extent-size")
        self.sparse.append(extent)
        return extent.extents

    async def extents(self) -> AsyncIterator[Extent]:
        base = 0
        for size, part in self.parts:
            async for extent in part(base):
                yield extent
            base += size

    def info(self) -> ImageInfo:
        first = self.sparse[0].header if self.sparse else None
        details: dict[str, object] = {"extents": len(self.parts)}
        if first is not None:
            details.update(version=first.version, compressed=first.compressed)
        return ImageInfo("vmdk", self.virtual_size, subformat=self.subformat,
                         allocated_bytes=self.source.size + sum(s.size for s in self.opened),
                         cluster_size=first.grain_bytes if first else None, details=details)

    async def close(self) -> None:
        for source in self.opened:
            await source.close()
        await super().close()


async def _zero_extent(base: int, size: int) -> AsyncIterator[Extent]:
    yield Extent.zero(base, size)


# --- writing -------------------------------------------------------------------------------------

GRAIN_SECTORS = 128  # 64 KiB, what VMware, VirtualBox and qemu write
GTES_PER_GT = 512
DESCRIPTOR_SECTORS = 20  # room for the descriptor, as qemu and VMware leave


def _padded(data: Buffer) -> bytes:
    return bytes(data) + bytes(-len(data) % SECTOR)


#: A grain record as pieces for a gathering sink: marker head, deflated grain, sector padding.
Record = tuple[bytes, Buffer, bytes]


def grain_record(lba: int, compressed: Buffer) -> Record:
    """A grain marker and its data, padded to a sector, without copying the data."""
    head = struct.pack("<QI", lba, len(compressed))
    return head, compressed, _ZERO_PAD[: -(len(head) + len(compressed)) % SECTOR]


def stream_grain_record(lba: int, compressed: bytes) -> bytes:
    """A grain marker and its data, padded to a sector, as one buffer."""
    return b"".join(grain_record(lba, compressed))


_ZERO_PAD = bytes(SECTOR)


def grain_records(grains: list[Buffer | None], first: int, grain_sectors: int) -> list[Record | None]:
    """Frame deflated grains as stream records in the worker, so the writer only places them."""
    return [None if grain is None else grain_record((first + i) * grain_sectors, grain)
            for i, grain in enumerate(grains)]


def compress_records(data: Buffer, grain_bytes: int, first: int) -> list[Record | None]:
    """Worker job: the stream records of the grains of ``data`` (None for all-zero grains)."""
    return grain_records(compress_grains(data, grain_bytes), first, grain_bytes // SECTOR)


def verify_records(grains: tuple[Buffer, ...], grain_bytes: int, length: int, first: int) -> list[Record | None]:
    """Worker job for pass-through grains: checked (see verify_grains), then framed."""
    return grain_records(verify_grains(grains, grain_bytes, length), first, grain_bytes // SECTOR)


def metadata_marker(sectors: int, kind: int) -> bytes:
    return MARKER.pack(sectors, 0, kind) + bytes(SECTOR - MARKER.size)


def compress_grains(data: Buffer, grain_bytes: int) -> list[Buffer | None]:
    """Worker job: deflate each grain of ``data``; None for all-zero grains (left unallocated)."""
    view = memoryview(data)
    flags = zero_grains(view, grain_bytes)
    return [None if flags[i] else codec.deflate(whole_grain(view[i * grain_bytes:(i + 1) * grain_bytes], grain_bytes))
            for i in range(len(flags))]


def verify_grains(grains: tuple[Buffer, ...], grain_bytes: int, length: int) -> list[Buffer | None]:
    """Worker job for pass-through: every grain must inflate to its size; None where all zero.

    A short last grain (an odd-sized disk) is deflated again as a whole grain, which is what
    qemu and VMware expect to read.
    """
    plain = codec.inflate_grains(grains, grain_bytes, length)
    return [None if is_zero(data) else grain if len(data) == grain_bytes
            else codec.deflate(whole_grain(data, grain_bytes))
            for grain, data in zip(grains, plain, strict=True)]


class VmdkWriter(Writer):
    format = "vmdk"
    options: ClassVar[dict[str, tuple[str, ...] | None]] = {
        "subformat": ("streamOptimized", "monolithicSparse"),
        "adapter_type": ("ide", "lsilogic", "buslogic", "legacyESX"),
        "hwversion": None,
        "cid": None,  # the descriptor's content id (8 hex digits); random if not given
    }

    async def write(self, extents: AsyncIterator[Extent]) -> None:
        subformat = self.opts.get("subformat", "streamOptimized")
        grain_bytes = GRAIN_SECTORS * SECTOR
        capacity = -(-self.virtual_size // SECTOR)
        descriptor = desc.render(subformat, capacity, os.path.basename(self.sink.name) or "disk.vmdk",
                                 cid=self._content_id(),
                                 adapter=self.opts.get("adapter_type", "lsilogic"),
                                 hw_version=self.opts.get("hwversion", "4"))
        if len(descriptor) > DESCRIPTOR_SECTORS * SECTOR:
            raise ValueError("descriptor larger than its reserved sectors")
        layout = _Layout(capacity, grain_bytes)
        if subformat == "streamOptimized":
            await _StreamWriter(self.sink, layout, descriptor).write(self._compressed_grains(extents, grain_bytes))
        else:
            await _SparseWriter(self.sink, layout, descriptor).write(self._plain_grains(extents, grain_bytes))

    def _content_id(self) -> int:
        """A given ``cid`` (a resumed export must write the same bytes again), else a random one."""
        given = self.opts.get("cid")
        if given is None:
            return int.from_bytes(os.urandom(4), "little") | 1
        try:
            cid = int(given, 16)
        except ValueError:
            cid = -1
        if not 0 < cid <= 0xFFFFFFFF:
            raise UsageError(f"vmdk option cid={given!r}: give 1 to 8 hex digits, not zero")
        return cid

    async def _compressed_grains(self, extents: AsyncIterator[Extent], grain_bytes: int
                                 ) -> AsyncIterator[tuple[int, list[Record | None]]]:
        """(first grain index, framed grain records or None) per batch, made in the pool, in order."""
        def job(extent: Extent) -> Awaitable[list[Record | None]]:
            first = extent.offset // grain_bytes
            if extent.kind is Kind.DEFLATED:
                return self.workers.run(verify_records, extent.grains, grain_bytes, extent.length, first)
            assert extent.data is not None
            return self.workers.run(compress_records, extent.data, grain_bytes, first)

        async def start(extent: Extent) -> tuple[int, list[Record | None]]:
            if extent.kind is Kind.ZERO:
                return extent.offset // grain_bytes, []
            return extent.offset // grain_bytes, await job(extent)

        source = aligned(inflated(extents, self.workers, keep_grain=grain_bytes), grain_bytes)
        async for batch in ordered_map(start, source):
            yield batch

    async def _plain_grains(self, extents: AsyncIterator[Extent], grain_bytes: int
                            ) -> AsyncIterator[tuple[int, list[bytes | None]]]:
        async def start(extent: Extent) -> tuple[int, list[bytes | None]]:
            if extent.kind is Kind.ZERO or extent.data is None:
                return extent.offset // grain_bytes, []
            return extent.offset // grain_bytes, await self.workers.run(_split_plain, extent.data, grain_bytes)

        async for batch in ordered_map(start, aligned(inflated(extents, self.workers), grain_bytes)):
            yield batch


def _split_plain(data: Buffer, grain_bytes: int) -> list[bytes | None]:
    view = memoryview(data)
    flags = zero_grains(view, grain_bytes)
    return [None if flags[i] else bytes(whole_grain(view[i * grain_bytes:(i + 1) * grain_bytes], grain_bytes))
            for i in range(len(flags))]


@dataclass(frozen=True)
class _Layout:
    capacity: int  # sectors
    grain_bytes: int

    @property
    def gt_count(self) -> int:
        return -(-self.capacity * SECTOR // (GTES_PER_GT * self.grain_bytes))

    @property
    def gt_sectors(self) -> int:
        return GTES_PER_GT * GTE.size // SECTOR

    @property
    def gd_sectors(self) -> int:
        return -(-self.gt_count * GTE.size // SECTOR)

    def header(self, *, version: int, flags: int, gd_offset: int, rgd_offset: int, overhead: int,
               compressed: bool) -> SparseHeader:
        return SparseHeader(version, flags, self.capacity, self.grain_bytes // SECTOR, 1, DESCRIPTOR_SECTORS,
                            GTES_PER_GT, rgd_offset, gd_offset, overhead, 0, NEWLINE_CHARS,
                            COMPRESSION_DEFLATE if compressed else COMPRESSION_NONE)


class _StreamWriter:
    """streamOptimized, strictly sequential: VMware's layout (a GT after each GT range's grains)."""

    def __init__(self, sink: Sink, layout: _Layout, descriptor: bytes) -> None:
        self.sink = sink
        self.layout = layout
        self.descriptor = descriptor
        self.table = array.array("I", bytes(GTES_PER_GT * GTE.size))
        self.directory = array.array("I")

    def _header(self, gd_offset: int) -> bytes:
        overhead = -(-(1 + DESCRIPTOR_SECTORS) // GRAIN_SECTORS) * GRAIN_SECTORS
        return self.layout.header(version=3, flags=FLAG_NEWLINE_TEST | FLAG_COMPRESSED | FLAG_MARKERS,
                                  gd_offset=gd_offset, rgd_offset=0, overhead=overhead,
                                  compressed=True).pack()

    async def write(self, batches: AsyncIterator[tuple[int, list[Record | None]]]) -> None:
        sink = self.sink
        await sink.write(self._header(GD_AT_END))
        await sink.write(_padded(self.descriptor).ljust(DESCRIPTOR_SECTORS * SECTOR, b"\0"))
        await sink.write_zeros(-sink.position % self.layout.grain_bytes)
        async for first, records in batches:
            for index, record in enumerate(records, first):
                if record is None:
                    continue
                while len(self.directory) < index // GTES_PER_GT:
                    await self._flush_table()
                self.table[index % GTES_PER_GT] = sink.position // SECTOR
                for piece in record:
                    await sink.write(piece)
        while len(self.directory) < self.layout.gt_count:
            await self._flush_table()
        gd_sector = sink.position // SECTOR + 1
        await sink.write(metadata_marker(self.layout.gd_sectors, MARKER_GD))
        await sink.write(_padded(_le(self.directory)))
        await sink.write(metadata_marker(1, MARKER_FOOTER))
        await sink.write(self._header(gd_sector))
        await sink.write(metadata_marker(0, MARKER_EOS))

    async def _flush_table(self) -> None:
        await self.sink.write(metadata_marker(self.layout.gt_sectors, MARKER_GT))
        self.directory.append(self.sink.position // SECTOR)
        await self.sink.write(_le(self.table))
        self.table = array.array("I", bytes(GTES_PER_GT * GTE.size))


class _SparseWriter:
    """monolithicSparse: metadata reserved up front (a placeholder), grains after, tables filled last."""

    def __init__(self, sink: Sink, layout: _Layout, descriptor: bytes) -> None:
        self.sink = sink
        self.layout = layout
        self.descriptor = descriptor

    async def write(self, batches: AsyncIterator[tuple[int, list[bytes | None]]]) -> None:
        layout, sink = self.layout, self.sink
        rgd = 1 + DESCRIPTOR_SECTORS
        rgt = rgd + layout.gd_sectors
        gd = rgt + layout.gt_count * layout.gt_sectors
        gt = gd + layout.gd_sectors
        overhead = -(-(gt + layout.gt_count * layout.gt_sectors) // GRAIN_SECTORS) * GRAIN_SECTORS
        header = layout.header(version=1, flags=FLAG_NEWLINE_TEST | FLAG_REDUNDANT_GT, gd_offset=gd,
                               rgd_offset=rgd, overhead=overhead, compressed=False)
        await sink.write(header.pack())
        await sink.write(_padded(self.descriptor).ljust(DESCRIPTOR_SECTORS * SECTOR, b"\0"))
        tables = await sink.reserve((overhead - rgd) * SECTOR)
        entries = array.array("I", bytes(layout.gt_count * GTES_PER_GT * GTE.size))
        async for first, grains in batches:
            for index, grain in enumerate(grains, first):
                if grain is not None:
                    entries[index] = sink.position // SECTOR
                    await sink.write(grain)
        metadata = bytearray((overhead - rgd) * SECTOR)
        for directory_at, tables_at in ((rgd, rgt), (gd, gt)):
            directory = array.array("I", (tables_at + i * layout.gt_sectors for i in range(layout.gt_count)))
            _put(metadata, (directory_at - rgd) * SECTOR, _le(directory))
            _put(metadata, (tables_at - rgd) * SECTOR, _le(entries))
        await sink.fill(tables, metadata)


def _put(buffer: bytearray, offset: int, data: bytes) -> None:
    buffer[offset : offset + len(data)] = data


def _le(table: array.array[int]) -> bytes:
    """A u32 table in the on-disk (little-endian) byte order."""
    if sys.byteorder == "little":
        return table.tobytes()
    swapped = array.array("I", table)
    swapped.byteswap()
    return swapped.tobytes()
