"""Resource identifiers (docs/ec2-api.md §3.1): a prefix plus 17 lower-case hex digits.

Identifiers are validated by shape before anything is looked up, so a malformed id gets the
``*.Malformed`` error and a well-formed unknown one the ``*.NotFound`` error (§3.8). The older
8-character style some clients still carry is accepted as well-formed.
"""

from __future__ import annotations

import re
import secrets

IMPORT_IMAGE_TASK = "import-ami"
IMPORT_SNAPSHOT_TASK = "import-snap"
EXPORT_IMAGE_TASK = "export-ami"
EXPORT_INSTANCE_TASK = "export-i"
IMAGE = "ami"
SNAPSHOT = "snap"

#: EC2 resource type (tagging, DescribeTags) of each id prefix.
RESOURCE_TYPES = {
    IMPORT_IMAGE_TASK: "import-image-task",
    IMPORT_SNAPSHOT_TASK: "import-snapshot-task",
    EXPORT_IMAGE_TASK: "export-image-task",
    EXPORT_INSTANCE_TASK: "export-instance-task",
    IMAGE: "image",
    SNAPSHOT: "snapshot",
    "import-i": "import-instance-task",
    "import-vol": "import-volume-task",
}

_SHAPE = re.compile(r"^([a-z]+(?:-[a-z]+)?)-([0-9a-f]{17}|[0-9a-z]{8})$")


def new_id(prefix: str) -> str:
    """A fresh identifier: ``prefix-`` and 17 random hex digits."""
    return f"{prefix}-{secrets.token_hex(9)[:17]}"


def prefix_of(resource_id: str) -> str | None:
    """The prefix of a well-formed identifier, or None when the id is malformed."""
    match = _SHAPE.match(resource_id)
    return match.group(1) if match else None


def is_valid(resource_id: str, prefix: str) -> bool:
    return prefix_of(resource_id) == prefix


def resource_type(resource_id: str) -> str | None:
    """The EC2 resource type an identifier names, or None if it names nothing vmied keeps."""
    prefix = prefix_of(resource_id)
    return RESOURCE_TYPES.get(prefix) if prefix else None
