"""The extent stream helpers: the contract check, re-cutting to grains and to blocks."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmied.errors import CorruptImage
from vmied.extents import Extent, Kind, aligned, blocks, checked


async def _from(extents: list[Extent]) -> AsyncIterator[Extent]:
    for extent in extents:
        yield extent


def _stream(pieces: list[tuple[bool, int]]) -> tuple[list[Extent], bytes]:
    """Extents from ``(is_data, length)`` pieces, and the disk they describe."""
    out, disk, offset = [], bytearray(), 0
    for is_data, length in pieces:
        if is_data:
            data = bytes((offset + i) % 251 + 1 for i in range(length))
            out.append(Extent.of_data(offset, data))
            disk += data
        else:
            out.append(Extent.zero(offset, length))
            disk += bytes(length)
        offset += length
    return out, bytes(disk)


def _render(extents: list[Extent]) -> bytes:
    return b"".join(bytes(e.data) if e.data is not None else bytes(e.length) for e in extents)


pieces = st.lists(st.tuples(st.booleans(), st.integers(1, 3000)), max_size=12)


async def _collect(stream: AsyncIterator[Extent]) -> list[Extent]:
    return [extent async for extent in stream]


@settings(max_examples=100)
@given(pieces, st.sampled_from([1, 512, 1000, 4096]))
async def test_aligned_recuts_on_unit_boundaries(parts: list[tuple[bool, int]], unit: int) -> None:
    extents, disk = _stream(parts)
    out = await _collect(aligned(_from(extents), unit))
    assert _render(out) == disk
    assert all(e.offset % unit == 0 for e in out)
    assert all(e.end % unit == 0 for e in out[:-1])


@settings(max_examples=100)
@given(pieces, st.sampled_from([512, 1000, 4096]))
async def test_blocks_groups_data_by_block(parts: list[tuple[bool, int]], size: int) -> None:
    extents, disk = _stream(parts)
    rebuilt = bytearray(len(disk))
    async for index, group in blocks(_from(extents), size):
        assert any(e.kind is Kind.DATA for e in group)
        assert all(index * size <= e.offset and e.end <= (index + 1) * size for e in group)
        for e in group:
            if e.data is not None:
                rebuilt[e.offset : e.end] = e.data
    assert bytes(rebuilt) == disk


async def test_checked_refuses_gaps_overlaps_and_short_streams() -> None:
    with pytest.raises(CorruptImage, match="out of order"):
        await _collect(checked(_from([Extent.zero(0, 10), Extent.zero(20, 10)]), 30))
    with pytest.raises(CorruptImage, match="out of order"):
        await _collect(checked(_from([Extent.zero(0, 10), Extent.zero(5, 10)]), 30))
    with pytest.raises(CorruptImage, match="short of its virtual size"):
        await _collect(checked(_from([Extent.zero(0, 10)]), 30))
    with pytest.raises(CorruptImage, match="out of order"):
        await _collect(checked(_from([Extent.zero(0, 40)]), 30))
    assert len(await _collect(checked(_from([Extent.zero(0, 10), Extent.of_data(10, b"x")]), 11))) == 2


async def test_blocks_jumps_over_huge_holes() -> None:
    # 1 TiB of hole between two data pieces: only the two blocks with data come out, and the
    # hole is not walked block by block (that would take minutes at 4 KiB blocks).
    tib = 1 << 40
    stream = [Extent.of_data(0, b"a" * 100), Extent.zero(100, tib), Extent.of_data(tib + 100, b"b" * 10)]
    out = [(index, group) async for index, group in blocks(_from(stream), 4096)]
    assert [index for index, _ in out] == [0, (tib + 100) // 4096]
    last = out[1][1]
    assert last[0].offset == (tib + 100) // 4096 * 4096 and last[0].kind is Kind.ZERO
    assert last[-1].data == b"b" * 10
