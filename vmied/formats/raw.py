"""Raw disks: the bytes of the virtual disk, nothing else.

Raw is never detected from content (any bytes are a valid raw disk); the caller declares it.
Reading skips holes the source knows of and turns all-zero 64 KiB runs into ZERO extents, so
every writer downstream can stay sparse. Writing leaves holes for zero extents where it can.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from ..extents import Extent, Kind
from ..fastio import zero_grains
from ..io.base import DEFAULT_WINDOW
from ..pipeline import ordered_map
from .base import ImageInfo, Reader, Writer, inflated

#: Granularity of zero detection: the VMDK grain and store grain size.
ZERO_GRANULE = 64 * 1024


def split_zero_runs(offset: int, data: bytes, granule: int = ZERO_GRANULE) -> list[Extent]:
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


class RawReader(Reader):
    format = "raw"

    @classmethod
    def probe(cls, head: bytes, tail: bytes, size: int) -> bool:
        return False

    async def load(self) -> None:
        self.virtual_size = self.source.size

    def info(self) -> ImageInfo:
        return ImageInfo("raw", self.virtual_size, allocated_bytes=None)

    async def extents(self) -> AsyncIterator[Extent]:
        async for batch in ordered_map(self._split, self._windows()):
            for extent in batch:
                yield extent

    async def _windows(self) -> AsyncIterator[tuple[int, int, bool]]:
        """``(offset, length, is_hole)``: known holes whole, allocated ranges in read windows."""
        position = 0
        for start, end in await self.source.allocated(0, self.virtual_size):
            if start > position:
                yield position, start - position, True
            for offset in range(start, end, DEFAULT_WINDOW):
                yield offset, min(DEFAULT_WINDOW, end - offset), False
            position = end
        if position < self.virtual_size:
            yield position, self.virtual_size - position, True

    async def _split(self, window: tuple[int, int, bool]) -> list[Extent]:
        offset, length, is_hole = window
        if is_hole:
            return [Extent.zero(offset, length)]
        data = await self.source.read_exact(offset, length, "raw data")
        return await self.workers.run(split_zero_runs, offset, data)


class RawWriter(Writer):
    format = "raw"

    async def write(self, extents: AsyncIterator[Extent]) -> None:
        async for extent in inflated(extents, self.workers):
            if extent.kind is Kind.ZERO:
                await self.sink.skip(extent.length)
                continue
            assert extent.data is not None
            for piece in await self.workers.run(split_zero_runs, extent.offset, extent.data):
                if piece.kind is Kind.ZERO:
                    await self.sink.skip(piece.length)
                else:
                    assert piece.data is not None
                    await self.sink.write(piece.data)
