"""Turn a location (path, ``s3://bucket/key``, https URL) into a source or a sink."""

from __future__ import annotations

from ..errors import UsageError
from .base import Sink, Source
from .local import FileSink, FileSource

REMOTE_SCHEMES = ("s3://", "http://", "https://")


async def open_source(location: str) -> Source:
    if location.startswith(REMOTE_SCHEMES):
        raise UsageError(f"{location}: remote sources are not available in this build")
    return await FileSource.open(location)


async def create_sink(location: str) -> Sink:
    if location.startswith(REMOTE_SCHEMES):
        raise UsageError(f"{location}: remote destinations are not available in this build")
    return await FileSink.create(location)
