"""Running CPU work off the event loop, in order, with bounded memory; progress and cancellation.

The loop never blocks: a reader or writer hands megabyte batches to :class:`Workers`, a thread
pool sized to the cores (the kernels release the GIL), and keeps at most ``depth`` batches in
flight, so memory is bounded by ``depth × batch`` whatever the disk size.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import Cancelled
from .extents import Buffer

T = TypeVar("T")
R = TypeVar("R")

#: Batches of CPU work in flight per stage: enough to keep every core busy while the next
#: batch is read, small enough that memory stays at a few batches.
DEFAULT_DEPTH = 2 * (os.cpu_count() or 2)


class Workers:
    """A thread pool for GIL-releasing CPU kernels, with an async front."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or os.cpu_count() or 2
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="vmied-cpu")

    async def run(self, fn: Callable[..., R], *args: object) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def ordered_map(
    start: Callable[[T], Awaitable[R]], items: AsyncIterable[T], depth: int = DEFAULT_DEPTH
) -> AsyncIterator[R]:
    """Yield ``await start(item)`` for each item in input order, with up to ``depth`` running.

    On early exit (an error downstream, a cancellation) the jobs still running are cancelled.
    """
    pending: deque[asyncio.Future[R]] = deque()
    try:
        async for item in items:
            pending.append(asyncio.ensure_future(start(item)))
            if len(pending) >= depth:
                yield await pending.popleft()
        while pending:
            yield await pending.popleft()
    finally:
        await cancel_and_wait(*pending)


async def gather_all(*steps: Awaitable[R]) -> list[R]:
    """``asyncio.gather``, but the first failure (or a cancellation) cancels and awaits the rest, so
    no step outlives the caller (a request half-way through a multipart upload being aborted)."""
    tasks = [asyncio.ensure_future(step) for step in steps]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        await cancel_and_wait(*tasks)


async def cancel_and_wait(*futures: asyncio.Future[Any]) -> None:
    """Cancel ``futures`` (those still running) and wait until each has finished, its error swallowed:
    what a caller does before it lets go of work it started, so none outlives it."""
    for future in futures:
        future.cancel()
    await asyncio.gather(*futures, return_exceptions=True)


async def await_ticking(work: Awaitable[T], every: float, tick: Callable[[], object]) -> T:
    """Await ``work``, calling ``tick`` every ``every`` seconds while it runs; an exception from ``tick``
    stops the work (cancelled and awaited) and is raised."""
    running = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({running}, timeout=every)
            if done:
                return running.result()
            tick()
    finally:
        await cancel_and_wait(running)


async def prefetch(items: AsyncIterable[T], depth: int = DEFAULT_DEPTH) -> AsyncGenerator[T, None]:
    """Run the producer ``items`` in its own task, up to ``depth`` items ahead of the consumer.

    This is what lets a reader inflate while the writer deflates: without it an async pipeline
    only ever runs one stage at a time.
    """
    queue: asyncio.Queue[tuple[bool, object]] = asyncio.Queue(depth)

    async def produce() -> None:
        try:
            async for item in items:
                await queue.put((True, item))
            await queue.put((False, None))
        except asyncio.CancelledError:
            raise  # the consumer stopped: waiting to hand it anything would never end
        except BaseException as exc:  # handed to the consumer, which re-raises it
            await queue.put((False, exc))

    producer = asyncio.ensure_future(produce())
    try:
        while True:
            more, value = await queue.get()
            if not more:
                if isinstance(value, BaseException):
                    raise value
                return
            yield value  # type: ignore[misc]
    finally:
        await cancel_and_wait(producer)


@dataclass
class Progress:
    """What an operation has done so far, and its cancel flag (checked at batch boundaries)."""

    virtual_size: int = 0
    position: int = 0  # virtual bytes the writer has consumed
    bytes_read: int = 0  # source bytes fetched
    bytes_written: int = 0  # destination bytes produced
    started: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    listeners: list[Callable[[Progress], None]] = field(default_factory=list)

    def cancel(self) -> None:
        self.cancelled = True

    def check(self) -> None:
        if self.cancelled:
            raise Cancelled("operation cancelled")

    def advance(self, position: int) -> None:
        self.position = position
        self.check()
        for listener in self.listeners:
            listener(self)

    @property
    def fraction(self) -> float:
        return self.position / self.virtual_size if self.virtual_size else 1.0

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


class OrderedDigest:
    """A SHA-256 fed in order on one thread of its own, ``depth`` jobs queued at most: the caller
    goes on while earlier bytes are hashed (a disk for the store, an OVA member for its manifest).

    Zero runs are hashed by the megabyte in jobs of at most ZERO_JOB bytes, so no single job runs
    long, and closing never waits on the event loop for a job to finish.
    """

    ZERO_JOB = 256 << 20

    def __init__(self, depth: int) -> None:
        self._sha = hashlib.sha256()
        self._depth = depth
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="vmied-digest")
        self._queued: deque[asyncio.Future[None]] = deque()

    async def feed(self, pieces: list[Buffer | int]) -> None:
        loop = asyncio.get_running_loop()
        for job in self._jobs(pieces):
            self._queued.append(loop.run_in_executor(self._thread, _hash, self._sha, job))
            if len(self._queued) > self._depth:
                await self._queued.popleft()

    def _jobs(self, pieces: list[Buffer | int]) -> list[list[Buffer | int]]:
        jobs: list[list[Buffer | int]] = [[]]
        for piece in pieces:
            if isinstance(piece, int) and piece > self.ZERO_JOB:
                jobs += [[min(self.ZERO_JOB, piece - at)] for at in range(0, piece, self.ZERO_JOB)]
                jobs.append([])
            else:
                jobs[-1].append(piece)
        return [job for job in jobs if job]

    async def hexdigest(self) -> str:
        while self._queued:
            await self._queued.popleft()
        return self._sha.hexdigest()

    def close(self) -> None:
        for future in self._queued:
            future.cancel()
        self._thread.shutdown(wait=False, cancel_futures=True)


#: Zeros are hashed from one buffer of this size.
ZERO_CHUNK = 1 << 20


def _hash(sha: Any, pieces: list[Buffer | int]) -> None:
    """Thread job: feed plain bytes, zeros by the megabyte."""
    zeros = bytes(ZERO_CHUNK)
    for piece in pieces:
        if isinstance(piece, int):
            full, rest = divmod(piece, ZERO_CHUNK)
            for _ in range(full):
                sha.update(zeros)
            sha.update(zeros[:rest])
        else:
            sha.update(piece)
