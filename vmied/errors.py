"""The errors vmied reports, each with a stable reason a script or a task can rely on.

Every refusal of an input names what is wrong (``reason``: a short dotted identifier such as
``vmdk.delta`` that tests and metrics key on) and, where the AWS documentation gives one, the
``ClientError: ...`` text that VM Import/Export uses for the same problem.
"""

from __future__ import annotations


class VmiedError(Exception):
    """Base of every error vmied raises on purpose; the CLI prints it without a traceback."""

    exit_code = 1
    reason = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    @property
    def message(self) -> str:
        return str(self.args[0])


class ImageError(VmiedError):
    """The input image is refused: corrupt, hostile or of a kind vmied does not convert."""

    exit_code = 3
    reason = "image.invalid"


class CorruptImage(ImageError):
    """A structure of the image is inconsistent (bad checksum, offset past the end, bad length)."""

    reason = "image.corrupt"


class UnsupportedImage(ImageError):
    """A well-formed image of a kind vmied deliberately does not convert (deltas, unknown formats)."""

    reason = "image.unsupported"


class UsageError(VmiedError):
    """The caller asked for something that cannot be done (bad option, unknown output format)."""

    exit_code = 2
    reason = "usage"


class StorageError(VmiedError):
    """Reading the source or writing the destination failed (missing file, denied, I/O error)."""

    exit_code = 4
    reason = "storage"


class Cancelled(VmiedError):
    """The operation was cancelled; nothing partial was left behind."""

    exit_code = 130
    reason = "cancelled"
