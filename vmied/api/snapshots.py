"""DescribeSnapshots and DeleteSnapshot over the catalog's snapshots (docs/ec2-api.md §2.5, §4.1-4.2)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from ..tasks import ids
from ..tasks.db import ACTIVE, SnapshotRecord, Tag
from .operations import PAGE_LIMITS, ApiError, RequestContext, match_filters, missing_parameter, operation, paginate
from .tags import tag_list

GiB = 1 << 30
#: The volume id AWS gives imported snapshots ("an arbitrary volume ID that should not be used").
VOLUME_ID = "vol-ffffffff"


def volume_size(virtual_size: int) -> int:
    """EBS volume size in GiB (whole GiB, rounded up, at least 1)."""
    return max(1, -(-virtual_size // GiB))


def snapshot_output(snapshot: SnapshotRecord, tags: list[Tag]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "SnapshotId": snapshot.id, "VolumeId": VOLUME_ID, "State": snapshot.state,
        "StartTime": datetime.fromtimestamp(snapshot.created, UTC), "Progress": "100%",
        "OwnerId": snapshot.owner_id, "VolumeSize": volume_size(snapshot.virtual_size),
        "Description": snapshot.description, "Encrypted": snapshot.encrypted, "StorageTier": "standard",
        "FullSnapshotSizeInBytes": snapshot.virtual_size, "Tags": tag_list(tags),
    }
    if snapshot.kms_key_id:
        out["KmsKeyId"] = snapshot.kms_key_id
    return out


def check_snapshot_id(snapshot_id: str) -> None:
    if not ids.is_valid(snapshot_id, ids.SNAPSHOT):
        raise ApiError("InvalidSnapshotID.Malformed", f"Invalid id: \"{snapshot_id}\" (expecting \"snap-...\")")


def not_found(snapshot_id: str) -> ApiError:
    return ApiError("InvalidSnapshot.NotFound", f"The snapshot '{snapshot_id}' does not exist.")


def snapshot_getters(tags: dict[str, list[Tag]]) -> dict[str, Any]:
    return {
        "description": lambda s: s.description,
        "encrypted": lambda s: s.encrypted,
        "kms-key-id": lambda s: s.kms_key_id or None,
        "owner-alias": lambda s: None,
        "owner-id": lambda s: s.owner_id,
        "progress": lambda s: "100%",
        "snapshot-id": lambda s: s.id,
        "start-time": lambda s: datetime.fromtimestamp(s.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
        "status": lambda s: s.state,
        "storage-tier": lambda s: "standard",
        "transfer-type": lambda s: "standard",
        "volume-id": lambda s: VOLUME_ID,
        "volume-size": lambda s: volume_size(s.virtual_size),
        "tag:": lambda s: {tag.key: tag.value for tag in tags[s.id]},
        "tag-key": lambda s: [tag.key for tag in tags[s.id]],
    }


@operation("DescribeSnapshots")
async def describe_snapshots(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
    catalog = ctx.service.catalog
    wanted = list(dict.fromkeys(params.get("SnapshotIds") or []))
    for snapshot_id in wanted:
        check_snapshot_id(snapshot_id)
    # snapshots are private (never shared or public): a caller sees its own account's
    snapshots = [s for s in await catalog.list_snapshots(wanted or None) if s.owner_id == ctx.account_id]
    if wanted:
        known = {snapshot.id for snapshot in snapshots}
        missing = next((snapshot_id for snapshot_id in wanted if snapshot_id not in known), None)
        if missing is not None:
            raise not_found(missing)
    owners = params.get("OwnerIds") or []
    if owners:
        snapshots = [s for s in snapshots if any(owner == s.owner_id or (owner == "self" and s.owner_id ==
                                                                          ctx.account_id) for owner in owners)]
    restorable = params.get("RestorableByUserIds") or []
    if restorable:  # snapshots are private: only their owner may create volumes from them
        snapshots = [s for s in snapshots if any(user in ("self", s.owner_id) for user in restorable)]
    tags = await catalog.tags_of([s.id for s in snapshots])
    snapshots = match_filters(snapshots, params.get("Filters"), snapshot_getters(tags))
    token = None
    if not wanted:
        snapshots, token = paginate(snapshots, params.get("MaxResults"), params.get("NextToken"),
                                    key=lambda s: s.id, scope=(ctx.action, params.get("Filters"), owners, restorable),
                                    limits=PAGE_LIMITS["DescribeSnapshots"])
    out: dict[str, Any] = {"Snapshots": [snapshot_output(s, tags[s.id]) for s in snapshots]}
    if token:
        out["NextToken"] = token
    return out


@operation("DeleteSnapshot")
async def delete_snapshot(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
    snapshot_id = params.get("SnapshotId")
    if not snapshot_id:
        raise missing_parameter("SnapshotId")
    check_snapshot_id(snapshot_id)
    service = ctx.service
    snapshot = await service.catalog.get_snapshot(snapshot_id)
    if snapshot is None or snapshot.owner_id != ctx.account_id:
        raise not_found(snapshot_id)
    if snapshot.task_id:  # a disk of an image import still running belongs to that import
        task = await service.get_task(snapshot.task_id)
        if task is not None and task.state == ACTIVE:
            raise ApiError("InvalidSnapshot.InUse",
                           f"The snapshot {snapshot_id} is currently in use by {snapshot.task_id}")
    users = await service.delete_snapshot(snapshot_id)
    if users:
        raise ApiError("InvalidSnapshot.InUse", f"The snapshot {snapshot_id} is currently in use by {users[0]}")
    return {}
