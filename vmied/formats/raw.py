"""Raw disks: the bytes of the virtual disk, nothing else.

Raw is never detected from content (any bytes are a valid raw disk); the caller declares it.
Reading skips holes the source knows of and turns all-zero 64 KiB runs into ZERO extents, so
every writer downstream can stay sparse. Writing leaves holes for zero extents where it can.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from .. import codec
from ..extents import Buffer, Extent, Kind
from ..fastio import zero_grains
from ..io.base import Source
from ..pipeline import Workers, ordered_map
from .base import ImageInfo, Reader, Writer

#: Granularity of zero detection: the VMDK grain and store grain size.
ZERO_GRANULE = 64 * 1024


def split_zero_runs(offset: int, data: Buffer, granule: int = ZERO_GRANULE) -> list[Extent]:
    """Cut a buffer into DATA and ZERO extents at ``granule`` boundaries (runs merged)."""
    flags = zero_grains(data, granule)
    out: list[Extent] = []
    view = memoryview(data)
    run_start = 0
    for index in range(1, len(flags) + 1):
        if index == len(flags) or flags[index] != flags[run_start]:
            start, end = run_start * granule, min(index * granule, len(data))
            if flags[run_start]:
                out.append(Extent.zero(offset + start, end - start))
            else:
                out.append(Extent.of_data(offset + start, view[start:end]))
            run_start = index
    return out


async def flat_extents(source: Source, workers: Workers, start: int, length: int, base: int = 0
                       ) -> AsyncIterator[Extent]:
    """Extents of ``length`` bytes stored flat in ``source`` from ``start``, at virtual ``base``.

    Holes the source knows of become ZERO extents without a read; data is read in the source's
    windows, as many ahead as it says, and cut into DATA and ZERO at 64 KiB in the worker pool.
    """
    end = start + length

    async def windows() -> AsyncIterator[tuple[int, int, bool]]:
        """``(offset, length, is_hole)`` in source offsets: holes whole, data in read windows."""
        position = start
        for data_start, data_end in await source.allocated(start, end):
            if data_start > position:
                yield position, data_start - position, True
            for offset in range(data_start, data_end, source.window):
                yield offset, min(source.window, data_end - offset), False
            position = data_end
        if position < end:
            yield position, end - position, True

    async def split(window: tuple[int, int, bool]) -> list[Extent]:
        offset, size, is_hole = window
        if is_hole:
            return [Extent.zero(base + offset - start, size)]
        data = await source.read_exact(offset, size, "flat data")
        return await workers.run(split_zero_runs, base + offset - start, data)

    async for batch in ordered_map(split, windows(), source.readahead):
        for extent in batch:
            yield extent


class RawReader(Reader):
    format = "raw"

    @classmethod
    def probe(cls, head: bytes, tail: bytes, size: int) -> bool:
        return False

    async def load(self) -> None:
        self.virtual_size = self.source.size

    def info(self) -> ImageInfo:
        return ImageInfo("raw", self.virtual_size, allocated_bytes=None)

    def extents(self) -> AsyncIterator[Extent]:
        return flat_extents(self.source, self.workers, 0, self.virtual_size)


class RawWriter(Writer):
    format = "raw"

    async def write(self, extents: AsyncIterator[Extent]) -> None:
        async def pieces(extent: Extent) -> list[Extent]:
            if extent.kind is Kind.ZERO:
                return [extent]
            return await self.workers.run(plain_pieces, extent)

        async for batch in ordered_map(pieces, extents):
            for piece in batch:
                if piece.kind is Kind.ZERO:
                    await self.sink.skip(piece.length)
                else:
                    assert piece.data is not None
                    await self.sink.write(piece.data)


def plain_pieces(extent: Extent) -> list[Extent]:
    """Worker job: a DATA or DEFLATED extent as DATA and ZERO pieces (inflated, zeros found) at once."""
    if extent.kind is Kind.DEFLATED:
        # grain by grain, not joined: the sink gathers them by reference into vectored writes
        pieces: list[Extent] = []
        for index, plain in enumerate(codec.inflate_grains(extent.grains, extent.grain_size, extent.length)):
            pieces.extend(split_zero_runs(extent.offset + index * extent.grain_size, plain))
        return pieces
    assert extent.data is not None
    return split_zero_runs(extent.offset, extent.data)
