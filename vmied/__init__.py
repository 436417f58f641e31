"""vmied: stream VM disk images between formats and S3-compatible object storage."""

__version__ = "0.1.0"
