"""Sources built from other sources: a byte range (a tar member), a concatenation (a chunked OVF
file), a digest taken while a reader reads (an OVA manifest check), and gzip decompression.

All of them are plain :class:`Source` objects, so format readers open a file inside an archive
exactly as they open a file on disk.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import zlib

from ..errors import CorruptImage, UnsupportedImage
from ..pipeline import Workers
from .base import DEFAULT_WINDOW, MiB, Source


class SliceSource(Source):
    """``[start, start + length)`` of ``parent`` as a source of its own."""

    def __init__(self, parent: Source, start: int, length: int, name: str) -> None:
        if start < 0 or length < 0 or start + length > parent.size:
            raise CorruptImage(
                f"{name} at offset {start} (+{length} bytes) lies beyond the end of {parent.name}",
                reason="image.truncated",
            )
        self.parent, self.start, self.size, self.name = parent, start, length, name
        self.window, self.readahead = parent.window, parent.readahead

    async def read_at(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        data = await self.parent.read_at(self.start + offset, length) if length else b""
        self.bytes_read += len(data)
        return data

    async def allocated(self, start: int, end: int) -> list[tuple[int, int]]:
        ranges = await self.parent.allocated(self.start + start, self.start + min(end, self.size))
        return [(a - self.start, b - self.start) for a, b in ranges]


class ConcatSource(Source):
    """Several sources read as one, in order (an OVF file stored as ``name.000000000``, ``.000000001``...)."""

    def __init__(self, parts: list[Source], name: str) -> None:
        self.parts, self.name = parts, name
        if parts:
            self.window, self.readahead = parts[0].window, parts[0].readahead
        self._starts: list[int] = []
        self.size = 0
        for part in parts:
            self._starts.append(self.size)
            self.size += part.size

    async def read_at(self, offset: int, length: int) -> bytes:
        out: list[bytes] = []
        end = min(offset + length, self.size)
        while offset < end:
            index = bisect.bisect_right(self._starts, offset) - 1
            part, base = self.parts[index], self._starts[index]
            data = await part.read_at(offset - base, min(end, base + part.size) - offset)
            if not data:
                break
            out.append(data)
            offset += len(data)
        self.bytes_read += sum(map(len, out))
        return b"".join(out)


class DigestingSource(Source):
    """Digests the bytes of ``inner`` in order, as the reader on top fetches them.

    Reads that land exactly where the digest stands are hashed at once; reads a little ahead (read-
    ahead windows completing out of order) wait in a bounded buffer; whatever the reader never reads
    (a skipped footer, an unread tail) is read by :meth:`finish`. So the manifest check costs no extra
    pass over data a sequential reader already fetched.
    """

    #: Bytes of out-of-order reads kept while the digest catches up (read-ahead depth x window).
    AHEAD_LIMIT = 8 * DEFAULT_WINDOW

    def __init__(self, inner: Source, algorithm: str, workers: Workers) -> None:
        self.inner, self.name, self.size = inner, inner.name, inner.size
        self.window, self.readahead = inner.window, inner.readahead
        self.workers = workers
        self._hash = hashlib.new(algorithm.lower())
        self._done = 0
        self._ahead: dict[int, bytes] = {}
        self._lock = asyncio.Lock()

    async def read_at(self, offset: int, length: int) -> bytes:
        data = await self.inner.read_at(offset, length)
        self.bytes_read += len(data)
        if offset + len(data) > self._done:
            async with self._lock:
                await self._absorb(offset, data)
        return data

    async def _absorb(self, offset: int, data: bytes) -> None:
        if offset > self._done:
            if sum(map(len, self._ahead.values())) + len(data) <= self.AHEAD_LIMIT:
                self._ahead[offset] = data
            return
        await self._consume(offset, data)
        while self._ahead:
            start = min(self._ahead)
            if start > self._done:
                break
            await self._consume(start, self._ahead.pop(start))

    async def _consume(self, offset: int, data: bytes) -> None:
        fresh = memoryview(data)[self._done - offset :]
        if fresh:
            await self.workers.run(self._hash.update, fresh)
            self._done += len(fresh)

    async def finish(self) -> str:
        """Digest whatever the reader did not read; the hex digest of the whole source."""
        async with self._lock:
            self._ahead.clear()
            position = self._done
            while position < self.size:
                chunk = await self.inner.read_exact(
                    position, min(DEFAULT_WINDOW, self.size - position), self.name
                )
                await self._consume(position, chunk)
                position += len(chunk)
            return self._hash.hexdigest()


class GunzipSource(Source):
    """The decompressed bytes of a gzip-compressed source (OVF ``ovf:compression="gzip"``).

    gzip has no index, so reads are served by one forward-moving decompressor, with the last
    window kept for reads slightly behind it; a read further back restarts from the start, at most
    ``MAX_RESTARTS`` times (a reader that jumps around a compressed file is refused rather than
    allowed to decompress it over and over). The size is found by a first pass, bounded by ``limit``
    so a decompression bomb stops early.
    """

    MAX_RESTARTS = 4

    def __init__(self, inner: Source, workers: Workers, size: int) -> None:
        self.inner, self.workers, self.size, self.name = inner, workers, size, inner.name
        self._lock = asyncio.Lock()
        self._restarts = -1
        self._restart()

    @classmethod
    async def open(cls, inner: Source, workers: Workers, limit: int) -> GunzipSource:
        size = 0
        stream = _GzipStream()
        async for chunk in inner.windows():
            stream.feed(chunk)
            while stream.pending:
                size += len(await workers.run(stream.pull))
                if size > limit:
                    raise UnsupportedImage(
                        f"{inner.name} decompresses to more than {limit} bytes, more than its disk can hold",
                        reason="ova.gzip_bomb",
                    )
        stream.check_end(inner.name)
        return cls(inner, workers, size)

    def _restart(self) -> None:
        self._restarts += 1
        if self._restarts > self.MAX_RESTARTS:
            raise UnsupportedImage(
                f"{self.name} is gzip-compressed and its disk format needs random access; "
                "decompress it before importing",
                reason="ova.gzip_seek",
            )
        self._stream = _GzipStream()
        self._in_position = 0  # compressed bytes consumed
        self._window = b""  # the last decompressed bytes, ending at _out_position
        self._out_position = 0

    async def read_at(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        async with self._lock:
            if offset < self._out_position - len(self._window):
                self._restart()
            parts: list[bytes] = []
            while length > 0:
                base = self._out_position - len(self._window)
                if offset < self._out_position:
                    piece = self._window[offset - base : offset - base + length]
                    parts.append(piece)
                    offset += len(piece)
                    length -= len(piece)
                    continue
                await self._advance()
        data = b"".join(parts)
        self.bytes_read += len(data)
        return data

    async def _advance(self) -> None:
        """Decompress the next window, keeping the previous one for short look-backs."""
        if not self._stream.pending:
            if self._in_position >= self.inner.size:
                raise CorruptImage(f"{self.name}: gzip data ends early", reason="ova.gzip")
            step = min(DEFAULT_WINDOW, self.inner.size - self._in_position)
            self._stream.feed(await self.inner.read_exact(self._in_position, step, self.name))
            self._in_position += step
        out = await self.workers.run(self._stream.pull)
        self._window = self._window[-DEFAULT_WINDOW:] + out
        self._out_position += len(out)


class _GzipStream:
    """Decompresses concatenated gzip members (gzip allows several), in bounded pieces."""

    PIECE = 16 * MiB

    def __init__(self) -> None:
        self._inflater = zlib.decompressobj(wbits=31)
        self.pending = b""  # compressed input not yet decompressed

    def feed(self, data: bytes) -> None:
        self.pending += data

    def pull(self) -> bytes:
        """Up to ``PIECE`` decompressed bytes from the input fed so far."""
        try:
            if self._inflater.eof:
                self._inflater = zlib.decompressobj(wbits=31)  # the next member starts here
            out = self._inflater.decompress(self.pending, self.PIECE)
        except zlib.error as exc:
            raise CorruptImage(f"gzip data is corrupt: {exc}", reason="ova.gzip") from None
        self.pending = self._inflater.unused_data if self._inflater.eof else self._inflater.unconsumed_tail
        return out

    def check_end(self, name: str) -> None:
        if not self._inflater.eof or self.pending:
            raise CorruptImage(f"{name}: gzip data ends early", reason="ova.gzip")
