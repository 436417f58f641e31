"""What a format module provides: a Reader (content probe, metadata, extent stream) and a Writer.

Formats are detected from content only (design §3). A declared format that disagrees with the
content is refused, and bytes no probe recognises are never taken for raw unless the caller says so.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import UsageError
from ..extents import Extent, Kind
from ..io.base import Sink, Source
from ..pipeline import Workers, ordered_map

#: How much of the start of a source every probe sees.
HEAD_SIZE = 64 * 1024
#: How much of the end (VHD keeps its footer in the last 512 bytes).
TAIL_SIZE = 512


@dataclass
class ImageInfo:
    """What ``vmied info`` reports about an image."""

    format: str
    virtual_size: int
    subformat: str = ""
    allocated_bytes: int | None = None
    cluster_size: int | None = None  # grain, block or cluster size, where the format has one
    problems: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": self.format,
            "subformat": self.subformat,
            "virtual_size": self.virtual_size,
            "allocated_bytes": self.allocated_bytes,
            "cluster_size": self.cluster_size,
            "problems": self.problems,
        }
        out.update(self.details)
        return out


class Reader(ABC):
    """Reads one image: ``open`` parses and validates metadata, ``extents`` streams the disk."""

    format: ClassVar[str]

    def __init__(self, source: Source, workers: Workers) -> None:
        self.source = source
        self.workers = workers
        self.virtual_size = 0

    @classmethod
    @abstractmethod
    def probe(cls, head: bytes, tail: bytes, size: int) -> bool:
        """Whether the content is this format (cheap, from the first and last bytes only)."""

    @classmethod
    async def open(cls, source: Source, workers: Workers) -> Reader:
        reader = cls(source, workers)
        await reader.load()
        return reader

    @abstractmethod
    async def load(self) -> None:
        """Read and validate the metadata; refuse the image here, before any data moves."""

    @abstractmethod
    def extents(self) -> AsyncIterator[Extent]:
        """The virtual disk as extents in offset order (see vmied.extents)."""

    @abstractmethod
    def info(self) -> ImageInfo: ...

    async def close(self) -> None:
        await self.source.close()


class Writer(ABC):
    """Writes one image sequentially to a sink from an extent stream."""

    format: ClassVar[str]
    #: option name -> allowed values (None: free-form, validated by the writer)
    options: ClassVar[Mapping[str, tuple[str, ...] | None]] = {}

    def __init__(self, sink: Sink, virtual_size: int, options: Mapping[str, str], workers: Workers) -> None:
        for key, value in options.items():
            if key not in self.options:
                known = ", ".join(sorted(self.options)) or "none"
                raise UsageError(f"{self.format} output has no option {key!r} (options: {known})")
            allowed = self.options[key]
            if allowed is not None and value not in allowed:
                raise UsageError(f"{self.format} option {key}={value!r}: choose one of {', '.join(allowed)}")
        self.sink = sink
        self.virtual_size = virtual_size
        self.opts = dict(options)
        self.workers = workers

    @abstractmethod
    async def write(self, extents: AsyncIterator[Extent]) -> None:
        """Consume the whole stream and write the image; the caller commits the sink."""


async def inflated(extents: AsyncIterator[Extent], workers: Workers, keep_grain: int = 0
                   ) -> AsyncIterator[Extent]:
    """Turn DEFLATED extents into DATA, inflating in the worker pool, in order, bounded.

    Extents deflated in grains of ``keep_grain`` bytes pass through untouched, for writers that
    share that encoding (stream-optimized VMDK, the snapshot store).
    """
    from ..codec import inflate_extent

    async def materialise(extent: Extent) -> Extent:
        if extent.kind is not Kind.DEFLATED or extent.grain_size == keep_grain:
            return extent
        data = await workers.run(inflate_extent, extent.grains, extent.grain_size, extent.length)
        return Extent.of_data(extent.offset, data)

    async for extent in ordered_map(materialise, extents):
        yield extent
