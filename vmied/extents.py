"""The extent stream: what every reader yields and every writer consumes (design §2).

A reader describes the virtual disk as extents in offset order that cover ``[0, virtual_size)``
without gaps or overlaps. An extent is one of:

* ``ZERO``: ``length`` bytes that read as zero (never materialised);
* ``DATA``: ``data`` holds exactly ``length`` bytes (a reader keeps these to a few MiB);
* ``DEFLATED``: ``grains`` are zlib streams that each inflate to ``grain_size`` bytes (the last one
  to whatever of ``length`` remains), so a writer sharing that encoding can copy them through.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from .errors import CorruptImage

Buffer = bytes | bytearray | memoryview


class Kind(enum.IntEnum):
    ZERO = 0
    DATA = 1
    DEFLATED = 2


@dataclass(frozen=True, slots=True)
class Extent:
    kind: Kind
    offset: int
    length: int
    data: Buffer | None = None
    grains: tuple[Buffer, ...] = field(default=())
    grain_size: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.length

    @staticmethod
    def zero(offset: int, length: int) -> Extent:
        return Extent(Kind.ZERO, offset, length)

    @staticmethod
    def of_data(offset: int, data: Buffer) -> Extent:
        return Extent(Kind.DATA, offset, len(data), data)

    @staticmethod
    def deflated(offset: int, length: int, grains: tuple[Buffer, ...], grain_size: int) -> Extent:
        return Extent(Kind.DEFLATED, offset, length, grains=grains, grain_size=grain_size)


async def checked(extents: AsyncIterator[Extent], virtual_size: int) -> AsyncIterator[Extent]:
    """Pass extents through, proving the reader's contract: contiguous, in order, exact cover.

    A reader bug or a hostile image that makes a reader skip or repeat a range must never turn into
    a silently shifted disk, so the pipeline always runs the stream through this check.
    """
    position = 0
    async for extent in extents:
        if extent.offset != position or extent.length < 0 or extent.end > virtual_size:
            raise CorruptImage(
                f"extent stream out of order: got [{extent.offset}, {extent.end}) "
                f"at position {position} of {virtual_size}",
                reason="extents.order",
            )
        if extent.kind is Kind.DATA and extent.data is not None and len(extent.data) != extent.length:
            raise CorruptImage("data extent length mismatch", reason="extents.length")
        if extent.length:
            position = extent.end
            yield extent
    if position != virtual_size:
        raise CorruptImage(
            f"image ends at {position} bytes, short of its virtual size {virtual_size}",
            reason="extents.short",
        )


def whole_grain(data: Buffer, grain_size: int) -> Buffer:
    """The last grain of an odd-sized disk, zero-padded to a whole grain as qemu and VMware write it."""
    return data if len(data) == grain_size else bytes(data) + bytes(grain_size - len(data))


def merge_zero(extents: list[Extent]) -> list[Extent]:
    """Join neighbouring ZERO extents so writers see long holes as one."""
    out: list[Extent] = []
    for extent in extents:
        if out and extent.kind is Kind.ZERO and out[-1].kind is Kind.ZERO:
            out[-1] = Extent.zero(out[-1].offset, out[-1].length + extent.length)
        else:
            out.append(extent)
    return out


def clip(extent: Extent, start: int, end: int) -> Extent:
    """The part of a ZERO or DATA extent inside ``[start, end)`` (virtual offsets)."""
    start, end = max(start, extent.offset), min(end, extent.end)
    if extent.kind is Kind.ZERO:
        return Extent.zero(start, end - start)
    if extent.kind is Kind.DATA and extent.data is not None:
        view = memoryview(extent.data)[start - extent.offset : end - extent.offset]
        return Extent.of_data(start, view)
    raise ValueError("clip() takes ZERO or DATA extents; inflate DEFLATED ones first")


async def blocks(extents: AsyncIterator[Extent], block_size: int) -> AsyncIterator[tuple[int, list[Extent]]]:
    """Regroup a ZERO/DATA stream by fixed-size blocks: ``(block_index, extents in that block)``.

    Only blocks that hold data are yielded; a block is all-zero when it does not appear. Block
    formats (VHD, VHDX, qcow2) write what this yields.
    """
    current: list[Extent] = []
    index = -1
    async for extent in extents:
        position = extent.offset
        while position < extent.end:
            block = position // block_size
            block_end = min((block + 1) * block_size, extent.end)
            if block != index:
                if current and any(e.kind is not Kind.ZERO for e in current):
                    yield index, current
                current, index = [], block
                hole_end = extent.end - extent.end % block_size
                if extent.kind is Kind.ZERO and position % block_size == 0 and hole_end > position:
                    # Whole blocks inside a hole yield nothing: jump over them, so a sparse
                    # multi-TiB disk costs nothing per empty block.
                    current, index, position = [], -1, hole_end
                    continue
            current.append(clip(extent, position, block_end))
            position = block_end
    if current and any(e.kind is not Kind.ZERO for e in current):
        yield index, current


async def aligned(extents: AsyncIterator[Extent], unit: int) -> AsyncIterator[Extent]:
    """Re-cut a contiguous stream so that every extent starts on a multiple of ``unit``.

    Pieces smaller than a unit are gathered (at most ``unit`` bytes held) and handed on as one DATA
    extent; aligned extents pass through untouched, DEFLATED ones included (their grain must be
    ``unit``). Writers with a fixed grain (VMDK) consume this.
    """
    head = bytearray()  # an incomplete unit being assembled; empty means we are aligned
    head_offset = 0
    async for extent in extents:
        position, end = extent.offset, extent.end
        if head:
            take = min(unit - len(head), end - position)
            head += _bytes_of(clip(extent, position, position + take))
            position += take
            if len(head) < unit:
                continue
            yield Extent.of_data(head_offset, bytes(head))
            head.clear()
        if extent.kind is Kind.DEFLATED:
            yield extent
            continue
        whole_end = end - (end - position) % unit
        if whole_end > position:
            yield extent if position == extent.offset and whole_end == end else clip(extent, position, whole_end)
        if whole_end < end:
            head_offset = whole_end
            head += _bytes_of(clip(extent, whole_end, end))
    if head:
        yield Extent.of_data(head_offset, bytes(head))


def _bytes_of(extent: Extent) -> Buffer:
    return extent.data if extent.data is not None else bytes(extent.length)
