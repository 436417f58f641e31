"""Retries for remote storage, and the ranged, resuming reads S3 and https sources share.

A remote read or write fails for reasons that go away (a 503 or SlowDown, a reset connection, a
stalled or truncated body) and for reasons that do not (denied, missing, changed). Backends turn
the first kind into :class:`Transient` and the second into a :class:`StorageError`;
:class:`Retrier` retries only the first, a bounded number of times with exponential backoff and
full jitter, and records every retry with its reason (metrics read :attr:`Retrier.records`).
"""

from __future__ import annotations

import asyncio
import random
import ssl
from abc import abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from ..errors import StorageError
from .base import DEFAULT_READAHEAD, DEFAULT_WINDOW, Source

T = TypeVar("T")

#: HTTP statuses a server uses for "try again later" (throttling, overload, a gateway timing out).
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard to try: attempts in total, the backoff curve, and the network timeouts."""

    attempts: int = 8
    base_delay: float = 0.25  # seconds before the first retry (before jitter)
    max_delay: float = 20.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0  # the longest silence inside one response before it counts as stalled

    def delay(self, retry: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(max, base x 2^retry)], so many clients do not retry in step."""
        return rng.uniform(0.0, min(self.max_delay, self.base_delay * (1 << min(retry, 30))))


class Transient(Exception):
    """A failure worth retrying; ``reason`` is a short word for the records (``status-503``, ``reset``)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class RetryRecord:
    what: str
    reason: str
    attempt: int
    delay: float


def network_failure(exc: BaseException) -> Transient | None:
    """The :class:`Transient` for a failure of the connection itself, or None for anything else.

    A certificate that does not verify is not transient: retrying cannot fix the trust store.
    """
    import aiohttp  # loaded already by any remote source; kept off the local-only start path

    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        return None
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return Transient("timeout", "no data within the read timeout")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return Transient("truncated", str(exc) or type(exc).__name__)
    if isinstance(exc, aiohttp.ClientConnectionError | ConnectionError):
        return Transient("connection", str(exc) or type(exc).__name__)
    return None


def status_failure(status: int, detail: str) -> Transient | None:
    return Transient(f"status-{status}", detail) if status in TRANSIENT_STATUSES else None


class Retrier:
    """Runs an attempt until it succeeds, fails for good, or the policy's attempts are spent."""

    def __init__(self, policy: RetryPolicy, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.records: list[RetryRecord] = []
        self._rng = rng or random.Random()

    async def run(self, attempt: Callable[[], Awaitable[T]], what: str) -> T:
        for number in range(1, self.policy.attempts + 1):
            try:
                return await attempt()
            except Transient as exc:
                if number == self.policy.attempts:
                    raise StorageError(
                        f"{what}: gave up after {number} attempts (last: {exc})", reason="storage.retries"
                    ) from None
                delay = self.policy.delay(number - 1, self._rng)
                self.records.append(RetryRecord(what, exc.reason, number, delay))
                from .. import metrics  # prometheus_client: loaded by remote I/O only, not at start-up

                metrics.S3_RETRIES.labels(exc.reason).inc()
                await asyncio.sleep(delay)
        raise AssertionError("a policy allows at least one attempt")


class RangedSource(Source):
    """A remote object read by ranged requests; a failed request resumes from the last byte received."""

    def __init__(self, name: str, size: int, policy: RetryPolicy, window: int = DEFAULT_WINDOW,
                 readahead: int = DEFAULT_READAHEAD) -> None:
        if policy.attempts < 1 or window < 1 or readahead < 1:
            raise ValueError("a remote source needs an attempt, a window and a request in flight")
        self.name = name
        self.size = size
        self.retrier = Retrier(policy)
        self.window = window
        self.readahead = readahead

    @property
    def retries(self) -> list[RetryRecord]:
        return self.retrier.records

    @abstractmethod
    async def _fetch(self, offset: int, length: int, into: Received) -> None:
        """Add the bytes of ``[offset, offset + length)`` to ``into`` as they arrive.

        Raise :class:`Transient` (bytes already added are kept) or :class:`StorageError`.
        """

    async def read_at(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        received = Received()

        async def attempt() -> None:
            done = received.size
            await self._fetch(offset + done, length - done, received)
            if received.size > length:
                raise StorageError(f"{self.name}: the server sent more than the {length} bytes asked for at "
                                   f"{offset}", reason="storage.range")
            if received.size < length:
                raise Transient("truncated", f"response ended after {received.size - done} bytes")

        if length:
            await self.retrier.run(attempt, f"reading {self.name} bytes {offset}-{offset + length - 1}")
        self.bytes_read += length
        return b"".join(received.chunks)  # the one copy of the window (none if it came in one piece)


class Received:
    """The chunks of one ranged read, kept as the connection delivered them until the read is whole:
    appending each to a growing buffer and freezing that into bytes would copy every byte twice more
    (a sixth of the client's CPU when it reads a raw disk from an S3 server on the same machine)."""

    __slots__ = ("chunks", "size")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0

    def add(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.size += len(chunk)
