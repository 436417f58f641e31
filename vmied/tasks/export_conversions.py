"""The legacy conversion tasks ImportVolume and ImportInstance (docs/ec2-api.md §2.4, §3.5).

They are imports run by the import machinery of :mod:`.imports` (validate the disk, stream it into
the store, commit the snapshot with the task's checkpoint): ImportVolume makes one snapshot (the
volume ``vol-...`` answered at once), ImportInstance one snapshot per disk image and a stopped
instance record ``i-...`` whose volumes are those snapshots. vmied runs no VMs: the instance is
only what CreateInstanceExportTask exports.

The disk is read from ``Image.ImportManifestUrl`` taken as the location of the disk image itself
(an ``s3://bucket/key`` or an http(s) URL, e.g. a pre-signed one); AWS's XML import manifests that
list the parts of an upload are not read. The instance record is the completed task: its
``params`` hold the instance id and its volumes, its ``result`` the snapshots (see
:func:`instance_volumes`).

Module name: the export helper owns ``export_*`` modules; these tasks are what instance exports read.
"""

from __future__ import annotations

from typing import Any

from . import imports
from .db import COMPLETED, Task
from .engine import TaskContext, TaskFailed, TaskKind, register_kind

IMPORT_VOLUME = "import-volume"
IMPORT_INSTANCE = "import-instance"
CONVERSION_KINDS = (IMPORT_INSTANCE, IMPORT_VOLUME)
IMPORT_INSTANCE_TASK, IMPORT_VOLUME_TASK = "import-i", "import-vol"
INSTANCE, VOLUME = "i", "vol"
GiB = 1 << 30


def instance_volumes(task: Task) -> list[dict[str, Any]]:
    """The volumes of the instance an import-instance task made: id, size, snapshot (once converted)."""
    snapshots = task.result.get("snapshot_ids", [])
    volumes = []
    for number, disk in enumerate(task.params.get("DiskContainers", [])):
        volume: dict[str, Any] = {"volume_id": disk["VolumeId"], "size_gib": disk["VolumeSize"]}
        if task.state == COMPLETED and number < len(snapshots):
            volume["snapshot_id"] = snapshots[number]
        volumes.append(volume)
    return volumes


async def run_conversion(context: TaskContext) -> None:
    await context.phase("validating", 3)
    plan = await imports.validate(context)
    try:
        imports.describe_disks(context, plan)
        for disk in plan.disks:
            wanted = context.task.params["DiskContainers"][disk.container]["VolumeSize"] * GiB
            if disk.virtual_size > wanted:
                raise TaskFailed(f"ClientError: disk image {disk.container + 1} holds a {disk.virtual_size}-byte "
                                 f"disk, larger than its volume of {wanted // GiB} GiB")
        await context.phase("validated", 5)
        await convert(context, plan)
    finally:
        await plan.close()


async def convert(context: TaskContext, plan: imports.Plan) -> None:
    """Each disk into the store as a snapshot, committed one by one (a restart skips the done ones)."""
    task = context.task
    span = (5, 95)
    await context.phase("downloading/converting", span[0])
    done_snapshots: dict[str, dict[str, Any]] = task.checkpoint.setdefault("snapshots", {})
    total = sum(disk.virtual_size for disk in plan.disks)
    done = 0
    snapshot_ids: list[str] = []
    for disk in plan.disks:
        context.check()
        earlier = done_snapshots.get(str(disk.index))
        if earlier is not None and earlier["virtual_size"] == disk.virtual_size:
            snapshot_ids.append(earlier["id"])
            done += disk.virtual_size
            continue
        record = await imports.write_disk(context, disk, done, total, span)
        done += disk.virtual_size
        task.result["disks"][disk.index].update(status="completed", snapshot_id=record.id)
        done_snapshots[str(disk.index)] = {"id": record.id, "virtual_size": disk.virtual_size}
        snapshot_ids.append(record.id)
        last = len(snapshot_ids) == len(plan.disks)
        if last:
            context.complete()
            task.result["snapshot_ids"] = snapshot_ids
        await context.catalog.commit_snapshot(record, task)
    if task.state != COMPLETED:  # every disk was done before a restart
        context.complete()
        task.result["snapshot_ids"] = snapshot_ids
        await context.save()


register_kind(TaskKind(IMPORT_VOLUME, "import", run_conversion, imports.cleanup_import, pending_progress=2))
register_kind(TaskKind(IMPORT_INSTANCE, "import", run_conversion, imports.cleanup_import, pending_progress=2))
