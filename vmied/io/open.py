"""Turn a location (path, ``s3://bucket/key``, https URL) into a source or a sink.

Remote locations take an :class:`~.s3.S3Config` each, so one conversion can read with one identity
and endpoint and write with another. https sources use its retry policy and CA bundle.
"""

from __future__ import annotations

from ..errors import UsageError
from .base import Sink, Source
from .local import FileSink, FileSource
from .s3_config import S3Config, S3Location

# The remote sources and sinks are imported where used: their client libraries (aiohttp,
# aiobotocore, botocore) and the metrics registry cost a quarter of a second at start, which a
# local conversion does not need (their settings come from the light .s3_config).

REMOTE_SCHEMES = ("s3://", "http://", "https://")


async def open_source(location: str, s3: S3Config | None = None) -> Source:
    config = s3 or S3Config()
    if location.startswith("s3://"):
        from .s3 import S3Source

        return await S3Source.open(S3Location.parse(location), config)
    if location.startswith(("http://", "https://")):
        from .http import HttpSource

        return await HttpSource.open(location, config.retry, config.ca_bundle, config.connections,
                                     config.window, config.readahead)
    return await FileSource.open(location)


async def create_sink(location: str, s3: S3Config | None = None, expected_size: int | None = None,
                      *, sync: bool = True) -> Sink:
    """A sink for ``location``; ``expected_size`` (a hint, may be wrong) sizes S3 upload parts.

    ``sync=False`` lets a local file appear without an fsync first (as qemu-img leaves it).
    """
    if location.startswith("s3://"):
        from .s3 import S3Sink

        return await S3Sink.create(S3Location.parse(location), s3 or S3Config(), expected_size)
    if location.startswith(REMOTE_SCHEMES):
        from .http import public_name

        raise UsageError(f"{public_name(location)}: an http(s) URL can only be a source; "
                         "write to s3:// instead")
    return await FileSink.create(location, sync=sync)
