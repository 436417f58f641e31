"""The pipeline's small asyncio helpers."""

from __future__ import annotations

import asyncio

import pytest

from vmied.pipeline import await_ticking, gather_all


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


async def test_await_ticking_ticks_while_the_work_runs_and_a_raising_tick_stops_it() -> None:
    ticks: list[int] = []

    async def work(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "done"

    assert await await_ticking(work(0.25), 0.1, lambda: ticks.append(1)) == "done"
    assert 1 <= len(ticks) <= 3
    stopped = asyncio.Event()

    async def stalled() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            stopped.set()

    def refuse() -> None:
        raise LookupError("cancelled by the caller")

    with pytest.raises(LookupError):
        await await_ticking(stalled(), 0.05, refuse)
    assert stopped.is_set()  # the work was cancelled and awaited, not left running
