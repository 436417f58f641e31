"""One conversion: source → reader → extent stream → writer → sink (design §2).

Used by ``vmied convert`` and by the daemon's tasks. On any failure or cancellation the sink is
aborted, so the destination never holds a partial output.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass

from .extents import Extent, checked
from .formats import open_reader, writer_class
from .formats.base import ImageInfo
from .io.base import Sink, Source
from .pipeline import Progress, Workers, prefetch


@dataclass
class Result:
    source: ImageInfo
    output_format: str
    output_bytes: int


async def tracked(extents: AsyncIterator[Extent], progress: Progress) -> AsyncGenerator[Extent, None]:
    """Report each extent the writer takes, and stop at the next batch once cancelled."""
    async for extent in extents:
        progress.check()
        yield extent
        progress.advance(extent.end)


async def convert(
    source: Source,
    sink: Sink,
    output_format: str,
    *,
    options: Mapping[str, str] | None = None,
    input_format: str | None = None,
    workers: Workers,
    progress: Progress | None = None,
) -> Result:
    """Convert ``source`` into ``sink``; the sink is committed on success and aborted otherwise."""
    progress = progress or Progress()
    try:
        reader = await open_reader(source, workers, input_format)
        writer = writer_class(output_format)(sink, reader.virtual_size, options or {}, workers)
        progress.virtual_size = reader.virtual_size
        fetched = prefetch(checked(reader.extents(), reader.virtual_size))
        stream = tracked(fetched, progress)
        try:
            await writer.write(stream)
        finally:
            # A writer that stops early must not leave the reader's task running: close the
            # stream outside in (an async for does not close what it iterates).
            await stream.aclose()
            await fetched.aclose()
        await sink.commit()
    except BaseException:
        await sink.abort()
        raise
    progress.bytes_read = source.bytes_read
    progress.bytes_written = sink.position
    return Result(reader.info(), output_format, sink.position)
