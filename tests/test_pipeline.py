"""The pipeline's small asyncio helpers."""

from __future__ import annotations

import asyncio

import pytest

from vmied.pipeline import gather_all


async def test_gather_all_gives_the_results_in_order() -> None:
    async def later(value: int, delay: float) -> int:
        await asyncio.sleep(delay)
        return value

    assert await gather_all(later(1, 0.02), later(2, 0.0), later(3, 0.01)) == [1, 2, 3]


async def test_gather_all_cancels_and_awaits_the_rest_when_one_fails() -> None:
    """No step outlives the call: the slow one is cancelled and has finished cleaning up on return."""
    cleaned_up = asyncio.Event()

    async def slow() -> int:
        try:
            await asyncio.sleep(10)
        finally:
            await asyncio.sleep(0)  # clean-up that itself awaits
            cleaned_up.set()
        return 0

    async def failing() -> int:
        await asyncio.sleep(0.01)
        raise RuntimeError("part refused")

    with pytest.raises(RuntimeError, match="part refused"):
        await gather_all(slow(), failing())
    assert cleaned_up.is_set()
