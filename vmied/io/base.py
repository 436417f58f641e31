"""The source and sink interfaces every storage backend implements (design §2).

A :class:`Source` is random access (``read_at``) plus sequential windows with read-ahead
(``windows``). A :class:`Sink` is written strictly in order; regions whose content is only known at
the end (block tables, tar sizes, digests) are reserved as placeholders and filled before commit.
Nothing is visible at the destination until :meth:`Sink.commit`; :meth:`Sink.abort` leaves nothing.
"""

from __future__ import annotations

import posixpath
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..errors import CorruptImage, UnsupportedImage
from ..extents import Buffer
from ..pipeline import ordered_map

MiB = 1 << 20
#: Size of one sequential read; large enough for throughput, small enough to keep memory flat.
DEFAULT_WINDOW = 4 * MiB
#: Sequential windows requested ahead of the consumer.
DEFAULT_READAHEAD = 4


def check_sibling_name(name: str) -> str:
    """A file named by an image (VMDK extent, OVF href) must be a plain name beside it."""
    if (
        not name
        or "\x00" in name
        or "\\" in name
        or name.startswith("/")
        or "://" in name
        or posixpath.normpath(name) != name
        or name.split("/")[0] in ("..", ".")
        or "/" in name
    ):
        raise UnsupportedImage(
            f"file name {name!r} is not a plain name inside the image's directory",
            reason="path.outside",
        )
    return name


class Source(ABC):
    """Random and sequential read access to one object (file, S3 object, URL)."""

    name: str
    size: int
    bytes_read: int = 0
    #: The size of one read of a sequential pass, and how many such reads run ahead of the reader.
    #: Remote sources take theirs from configuration: a request costs far more there than a pread.
    window: int = DEFAULT_WINDOW
    readahead: int = DEFAULT_READAHEAD

    @abstractmethod
    async def read_at(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``; shorter only at the end of the object."""

    async def read_exact(self, offset: int, length: int, what: str) -> bytes:
        """Exactly ``length`` bytes, or a :class:`CorruptImage` naming ``what`` was cut off."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise CorruptImage(
                f"{what} at offset {offset} (+{length} bytes) lies beyond the end of "
                f"{self.name} ({self.size} bytes)",
                reason="image.truncated",
            )
        data = await self.read_at(offset, length)
        if len(data) != length:
            raise CorruptImage(f"{what}: short read from {self.name}", reason="image.truncated")
        return data

    async def windows(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Read ``[start, end)`` in order as consecutive windows, ``readahead`` requests ahead."""
        window = self.window
        stop = self.size if end is None else min(end, self.size)

        async def offsets() -> AsyncIterator[int]:
            for offset in range(start, stop, window):
                yield offset

        async def fetch(offset: int) -> bytes:
            return await self.read_exact(offset, min(window, stop - offset), "data")

        async for chunk in ordered_map(fetch, offsets(), self.readahead):
            yield chunk

    async def allocated(self, start: int, end: int) -> list[tuple[int, int]]:
        """Ranges of ``[start, end)`` that may hold data; the rest is known to read as zero.

        Backends that know their holes (sparse local files) say so, and readers of flat data
        skip them without reading; everything else answers the whole range.
        """
        return [(start, end)] if end > start else []

    async def open_sibling(self, name: str) -> Source:
        """Open another object beside this one (a VMDK extent file named by a descriptor)."""
        raise UnsupportedImage(
            f"{self.name} refers to a separate file {name!r}; this source cannot open files beside it",
            reason="path.sibling",
        )

    async def close(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class Placeholder:
    """A region of the output written as zeros now and filled with its real bytes at the end."""

    offset: int
    length: int


class Sink(ABC):
    """Sequential writer of one output object, buffered into large writes.

    Subclasses implement ``_write_at`` (one buffered run of bytes), ``_fill`` and the commit/abort
    pair. ``skip`` lets a sparse-capable backend leave a hole instead of writing zeros.
    """

    name: str

    def __init__(self, buffer_size: int = 8 * MiB) -> None:
        self.position = 0
        self.bytes_written = 0
        # Writes are gathered by reference (no copy on the event loop) and handed on together.
        self._chunks: list[Buffer] = []
        self._buffered = 0
        self._buffer_offset = 0
        self._buffer_size = buffer_size
        self._reserved: dict[int, bytearray] = {}  # placeholders still in the buffer, by offset

    async def write(self, data: Buffer) -> None:
        if not data:
            return
        if not self._chunks:
            self._buffer_offset = self.position
        self._chunks.append(data)
        self._buffered += len(data)
        self.position += len(data)
        if self._buffered >= self._buffer_size:
            await self.flush()

    async def flush(self) -> None:
        if self._chunks:
            chunks, offset, size = self._chunks, self._buffer_offset, self._buffered
            self._chunks, self._buffered = [], 0
            self._reserved.clear()
            await self._write_chunks(offset, chunks)
            self.bytes_written += size

    async def _write_chunks(self, offset: int, chunks: list[Buffer]) -> None:
        """Write gathered chunks at ``offset``; backends that can write a vector override this."""
        await self._write_at(offset, b"".join(chunks))

    async def skip(self, length: int) -> None:
        """Advance over ``length`` zero bytes (a hole where the backend can make one)."""
        if self.sparse:
            await self.flush()
            self.position += length
        else:
            await self.write_zeros(length)

    async def write_zeros(self, length: int) -> None:
        chunk = bytes(min(length, MiB))
        while length > 0:
            step = min(length, len(chunk))
            await self.write(chunk[:step] if step < len(chunk) else chunk)
            length -= step

    async def reserve(self, length: int) -> Placeholder:
        placeholder = Placeholder(self.position, length)
        region = bytearray(length)
        await self.write(region)
        if self._chunks and self._chunks[-1] is region:
            self._reserved[placeholder.offset] = region
        return placeholder

    async def fill(self, placeholder: Placeholder, data: Buffer) -> None:
        if len(data) != placeholder.length:
            raise ValueError(f"placeholder of {placeholder.length} bytes filled with {len(data)}")
        region = self._reserved.get(placeholder.offset)
        if region is not None and len(region) == len(data):
            region[:] = data  # still in memory: patch it there
            return
        await self.flush()
        await self._fill(placeholder.offset, bytes(data))

    @property
    def sparse(self) -> bool:
        """Whether ``skip`` may leave a hole (raw output on a file system that supports it)."""
        return False

    async def commit(self) -> None:
        """Flush, make the output visible at its final name, and release resources."""
        await self.flush()
        await self._finish(self.position)

    @abstractmethod
    async def _write_at(self, offset: int, data: bytes) -> None: ...

    @abstractmethod
    async def _fill(self, offset: int, data: bytes) -> None: ...

    @abstractmethod
    async def _finish(self, size: int) -> None: ...

    @abstractmethod
    async def abort(self) -> None:
        """Remove everything written so far; the destination is as it was before."""
