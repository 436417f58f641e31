"""Where an S3 object is and how to reach it: the settings of :mod:`.s3`, without its client libraries.

Kept apart so a local conversion (and the command line's defaults) can name S3 settings without
importing botocore and the metrics registry, which cost a tenth of the start-up of a short run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UsageError
from .base import DEFAULT_READAHEAD, MiB
from .retry import RetryPolicy

#: S3's smallest part (all but the last part of an upload).
MIN_PART = 5 * MiB
DEFAULT_PART_SIZE = 8 * MiB
DEFAULT_PARTS_IN_FLIGHT = 4
#: One ranged GET of a sequential read: AWS advises 8-16 MB. Each request costs the client about a
#: millisecond of CPU (signing, parsing), and the server its own: 4 MiB windows read a raw object
#: from a SeaweedFS on the same 2 cores at about 350 MB/s, 8 MiB ones at about 500 MB/s.
DEFAULT_REMOTE_WINDOW = 8 * MiB
#: The largest scratch object of zeros runs of zeros are copied from (:mod:`.s3_zeros`).
DEFAULT_ZERO_COPY_MAX = 512 * MiB


@dataclass(frozen=True, slots=True)
class S3Location:
    bucket: str
    key: str

    @classmethod
    def parse(cls, url: str) -> S3Location:
        if not url.startswith("s3://"):
            raise UsageError(f"{url} is not an s3://bucket/key URL")
        bucket, _, key = url[len("s3://"):].partition("/")
        if not bucket or not key or key.endswith("/"):
            raise UsageError(f"{url}: an S3 location is s3://bucket/key, with a key naming one object")
        return cls(bucket, key)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True, slots=True)
class S3Config:
    """One identity and endpoint (a conversion may read with one and write with another)."""

    profile: str | None = None  # a profile of the shared config/credentials files; None: the default chain
    region: str | None = None
    endpoint_url: str | None = None  # an S3-compatible service instead of AWS
    path_style: bool = False  # bucket in the path rather than in the host name
    ca_bundle: str | None = None  # PEM file of trusted CAs; None: AWS_CA_BUNDLE or the system store
    window: int = DEFAULT_REMOTE_WINDOW  # one ranged GET of a sequential pass
    readahead: int = DEFAULT_READAHEAD  # ranged GETs in flight ahead of the reader
    part_size: int = DEFAULT_PART_SIZE  # base part size (grown only by the plan, see the module's table)
    parts_in_flight: int = DEFAULT_PARTS_IN_FLIGHT
    zero_copy_max: int = DEFAULT_ZERO_COPY_MAX  # 0: upload every zero, copy none inside the server
    connections: int = 16
    retry: RetryPolicy = field(default_factory=RetryPolicy)
