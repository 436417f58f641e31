"""Local files as sources and sinks; every system call runs off the event loop."""

from __future__ import annotations

import asyncio
import errno
import os
from collections import deque
from collections.abc import Callable
from typing import TypeVar

from ..errors import StorageError
from ..extents import Buffer
from .base import Sink, Source, check_sibling_name

T = TypeVar("T")
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
#: Buffered writes a FileSink lets run while its writer goes on (each is one sink buffer, 8 MiB).
WRITES_IN_FLIGHT = 2


async def _io(fn: Callable[..., T], *args: object) -> T:
    """Run a blocking file call on the loop's default executor."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def _storage_error(path: str, exc: OSError, doing: str) -> StorageError:
    return StorageError(f"cannot {doing} {path}: {exc.strerror or exc}", reason=f"file.{doing}")


class FileSource(Source):
    def __init__(self, path: str, fd: int, size: int) -> None:
        self.name = path
        self.path = path
        self._fd = fd
        self.size = size

    @classmethod
    async def open(cls, path: str) -> FileSource:
        try:
            fd = await _io(os.open, path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise _storage_error(path, exc, "open") from None
        size = os.lseek(fd, 0, os.SEEK_END)  # a seek, not I/O: safe on the loop
        return cls(path, fd, size)

    async def read_at(self, offset: int, length: int) -> bytes:
        try:
            data = await _io(os.pread, self._fd, length, offset)
        except OSError as exc:
            raise _storage_error(self.path, exc, "read") from None
        self.bytes_read += len(data)
        return data

    async def allocated(self, start: int, end: int) -> list[tuple[int, int]]:
        return await _io(_data_ranges, self._fd, start, end)

    async def open_sibling(self, name: str) -> Source:
        check_sibling_name(name)
        return await FileSource.open(os.path.join(os.path.dirname(self.path), name))

    async def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class FileSink(Sink):
    """Writes ``path`` through a hidden partial file renamed into place on commit.

    A crash or an abort never leaves a half-written file under the final name.
    """

    def __init__(self, path: str, fd: int, partial: str, sparse: bool, sync: bool) -> None:
        super().__init__()
        self._sync = sync
        self.name = path
        self.path = path
        self._fd = fd
        self._partial = partial
        self._sparse = sparse
        self._in_flight: deque[asyncio.Future[None]] = deque()

    @classmethod
    async def create(cls, path: str, sparse: bool = True, sync: bool = True) -> FileSink:
        """``sync=False`` skips the fsync before the rename (as qemu-img does): faster, not crash-safe."""
        directory, base = os.path.split(os.path.abspath(path))
        partial = os.path.join(directory, f".{base}.vmied-partial-{os.getpid()}")
        try:
            fd = await _io(os.open, partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise _storage_error(path, exc, "create") from None
        return cls(path, fd, partial, sparse, sync)

    @property
    def sparse(self) -> bool:
        return self._sparse

    async def _write_at(self, offset: int, data: bytes) -> None:
        try:
            await _io(_pwrite_all, self._fd, data, offset)
        except OSError as exc:
            raise _storage_error(self.path, exc, "write") from None

    async def _write_chunks(self, offset: int, chunks: list[Buffer]) -> None:
        """Write behind: the writer goes on while up to WRITES_IN_FLIGHT writes run (distinct offsets)."""
        self._in_flight.append(asyncio.ensure_future(_io(_pwritev_all, self._fd, chunks, offset)))
        while len(self._in_flight) > WRITES_IN_FLIGHT:
            await self._settle(self._in_flight.popleft())

    async def _settle(self, write: asyncio.Future[None]) -> None:
        try:
            await write
        except OSError as exc:
            raise _storage_error(self.path, exc, "write") from None

    async def _drain(self) -> None:
        while self._in_flight:
            await self._settle(self._in_flight.popleft())

    async def _fill(self, offset: int, data: bytes) -> None:
        await self._drain()
        await self._write_at(offset, data)

    async def _finish(self, size: int) -> None:
        try:
            await self._drain()
            await _io(_finish_file, self._fd, size, self._partial, self.path, self._sync)
        except OSError as exc:
            raise _storage_error(self.path, exc, "write") from None
        finally:
            os.close(self._fd)
            self._fd = -1

    async def abort(self) -> None:
        await asyncio.gather(*self._in_flight, return_exceptions=True)  # no write may outlive the fd
        self._in_flight.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            os.unlink(self._partial)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view = view[done:]
        offset += done


def _pwritev_all(fd: int, chunks: list[Buffer], offset: int) -> None:
    """Vectored writes straight from the chunks (IOV_MAX at a time), finishing short writes."""
    for first in range(0, len(chunks), _IOV_MAX):
        batch = chunks[first : first + _IOV_MAX]
        expected = sum(len(chunk) for chunk in batch)
        done = os.pwritev(fd, batch, offset)
        if done != expected:
            _pwrite_all(fd, b"".join(batch)[done:], offset + done)
        offset += expected


def _finish_file(fd: int, size: int, partial: str, path: str, sync: bool) -> None:
    os.ftruncate(fd, size)  # a trailing hole becomes file length without writing zeros
    if sync:
        os.fsync(fd)  # the data is durable before the name appears
    os.rename(partial, path)


def _data_ranges(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """SEEK_DATA/SEEK_HOLE walk of ``[start, end)``; the whole range where holes are unknown."""
    ranges: list[tuple[int, int]] = []
    position = start
    try:
        while position < end:
            data = os.lseek(fd, position, os.SEEK_DATA)
            if data >= end:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            ranges.append((data, hole))
            position = hole
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no data after position
            return ranges
        return [(start, end)]  # file system without SEEK_DATA: assume everything is data
    return ranges
