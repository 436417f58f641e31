"""ExportImage, DescribeExportImageTasks, CreateInstanceExportTask, DescribeExportTasks, CancelExportTask.

Shapes and behaviour: docs/ec2-api.md §2.3, §3.4, §3.5. What can be refused from the catalog alone is
refused here (ApiError): an unknown image or instance, an image or instance whose snapshot is gone,
an instance with several volumes or whose import did not complete, a disk over
``limits.max_export_bytes``, a bucket the ``vmimport`` role may not write (``role.write_buckets``),
more than ``limits.export_tasks`` exports at once (ResourceLimitExceeded), a second export of an AMI
being exported. A ClientToken (botocore always sends one with ExportImage) makes ExportImage
idempotent.

Beyond AWS: ``DiskImageFormat`` also takes ``VHDX`` and ``QCOW2``. They are not in botocore's enum,
which botocore and the CLI do not check in requests; the wire layer accepts them for this shape
(``vmied.api.wire.EXTRA_ENUM_VALUES``). ``ContainerFormat=ova`` holds stream-optimized VMDK disks
only, so it takes ``DiskImageFormat=VMDK``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from ..tasks import ids
from ..tasks.db import ACTIVE, COMPLETED, DELETED, DELETING, Tag, Task, TokenMismatch
from ..tasks.engine import NotCancellable
from ..tasks.export_conversions import IMPORT_INSTANCE, INSTANCE, instance_volumes
from ..tasks.export_tasks import (
    DISK_FORMATS,
    EXPORT_IMAGE,
    EXPORT_INSTANCE,
    EXPORT_KINDS,
    TARGET_ENVIRONMENTS,
    extension,
    object_key,
)
from ..tasks.service import ServiceUnavailable
from .images import check_image_id
from .images import not_found as image_not_found
from .import_tasks import check_tag_specifications, choose, running_fields, service_of, snapshot_task_tags
from .operations import PAGE_LIMITS, ApiError, RequestContext, match_filters, missing_parameter, operation, paginate
from .tags import tag_list

MAX_DESCRIPTION = 255
#: ExportTask ``state`` of each task state (the image export keeps the task states themselves).
INSTANCE_EXPORT_STATES = {ACTIVE: "active", DELETING: "cancelling", DELETED: "cancelled", COMPLETED: "completed"}
#: Checking the limit and submitting is one step: two requests must not both take the last slot.
_submitting = asyncio.Lock()


# --- checks ----------------------------------------------------------------------------------------------


def check_description(params: dict[str, Any]) -> str:
    description: str = params.get("Description") or ""
    if len(description) > MAX_DESCRIPTION:
        raise ApiError("InvalidParameterValue",
                       f"Description: at most {MAX_DESCRIPTION} characters, not {len(description)}")
    return description


def check_bucket(ctx: RequestContext, bucket: str | None, where: str, role: str) -> str:
    if not bucket:
        raise missing_parameter(where)
    role_config = service_of(ctx).config.role  # may it write the bucket (docs/ec2-api.md §3.9)
    if not role_config.allows(bucket, role_config.write_buckets):
        raise ApiError("InvalidParameter", f"The service role {role} provided does not exist or does not have "
                                           f"sufficient permissions (it may not write to bucket {bucket})")
    return bucket


def check_size(ctx: RequestContext, virtual_size: int, what: str) -> None:
    limit = service_of(ctx).config.limits.max_export_bytes
    if virtual_size > limit:
        raise ApiError("InvalidParameter", f"{what} is {virtual_size} bytes; vmied exports disks of at most "
                                           f"{limit} bytes")


def disk_format(value: str | None, where: str) -> str:
    if not value:
        raise missing_parameter(where)
    chosen = choose(where, value, tuple(DISK_FORMATS))
    assert chosen is not None
    return chosen


async def export_image_source(ctx: RequestContext, image_id: str) -> tuple[str, int]:
    """The snapshot and size of the image's disk; refuses images vmied cannot export."""
    catalog = service_of(ctx).catalog
    check_image_id(image_id)
    image = await catalog.get_image(image_id)
    if image is None or image.owner_id != ctx.account_id:
        raise image_not_found(image_id)
    if image.state != "available":
        raise ApiError("InvalidAMIID.Unavailable", f"The image {image_id} is {image.state}")
    if len(image.devices) != 1:
        raise ApiError("InvalidParameter", f"The image {image_id} has {len(image.devices)} volumes; ExportImage "
                                           "exports images with one volume (export the others from their "
                                           "snapshots' images)")
    device = image.devices[0]
    snapshot = await catalog.get_snapshot(device.snapshot_id)
    if snapshot is None:
        raise ApiError("InvalidParameter", f"The image {image_id} is not exportable: its base snapshot "
                                           f"{device.snapshot_id} no longer exists")
    if snapshot.encrypted:
        raise ApiError("InvalidParameter", f"The image ID ({image_id}) provided has encrypted EBS block devices "
                                           "and is not exportable.")
    ctx.authorize(ctx.arn(snapshot.id))
    return snapshot.id, snapshot.virtual_size


async def submit(ctx: RequestContext, task: Task, tags: list[Tag]) -> Task:
    """Check the export limits (unless this is a retry of a task the token made) and submit.

    At most ``limits.export_tasks`` exports are active at once, and one export per AMI (§3.4).
    """
    service = service_of(ctx)
    async with _submitting:
        active = await service.tasks(EXPORT_KINDS, states=[ACTIVE])
        retry = task.client_token is not None and any(
            t.client_token == task.client_token and t.access_key == task.access_key for t in active)
        if not retry:
            limit = service.config.limits.export_tasks
            if len(active) >= limit:
                raise ApiError("ResourceLimitExceeded", f"You have reached the limit of {limit} active export "
                                                        "tasks; wait for one to finish or cancel one")
            image_id = task.params.get("ImageId")
            same = next((t for t in active if t.kind == EXPORT_IMAGE and image_id is not None
                         and t.params.get("ImageId") == image_id), None)
            if same is not None:
                raise ApiError("InvalidParameter", f"The image {image_id} is already being exported by {same.id}")
        try:
            found, _ = await service.submit(task, tags)
        except TokenMismatch:
            raise ApiError("IdempotentParameterMismatch", f"The client token '{task.client_token}' was already "
                                                          "used with different parameters") from None
        except ServiceUnavailable as exc:
            raise ApiError("Unavailable", exc.message) from None
    return found


def new_task(ctx: RequestContext, kind: str, params: dict[str, Any], task_params: dict[str, Any]) -> Task:
    prefix = ids.EXPORT_IMAGE_TASK if kind == EXPORT_IMAGE else ids.EXPORT_INSTANCE_TASK
    task_params = json.loads(json.dumps(task_params, sort_keys=True))
    return Task(ids.new_id(prefix), kind, params=task_params, client_token=params.get("ClientToken") or None,
                access_key=ctx.access_key_id, account_id=ctx.account_id)


# --- ExportImage -------------------------------------------------------------------------------------------


@operation("ExportImage")
async def export_image(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
    image_id: str = params["ImageId"]
    fmt = disk_format(params.get("DiskImageFormat"), "DiskImageFormat")
    role = params.get("RoleName") or "vmimport"
    location = params.get("S3ExportLocation") or {}
    bucket = check_bucket(ctx, location.get("S3Bucket"), "S3ExportLocation.S3Bucket", role)
    description = check_description(params)
    specs = check_tag_specifications(params, "export-image-task", ())
    snapshot_id, virtual_size = await export_image_source(ctx, image_id)
    check_size(ctx, virtual_size, f"The disk of image {image_id}")
    task_params = {"ImageId": image_id, "SnapshotId": snapshot_id, "DiskImageFormat": fmt, "S3Bucket": bucket,
                   "S3Prefix": location.get("S3Prefix") or "", "Description": description, "RoleName": role,
                   "TagSpecifications": specs}
    task = new_task(ctx, EXPORT_IMAGE, params, task_params)
    task = await submit(ctx, task, snapshot_task_tags(task.id, specs, "export-image-task"))
    tags = await service_of(ctx).catalog.tags_of([task.id])
    out = export_image_output(task, tags[task.id])
    out["DiskImageFormat"] = task.params["DiskImageFormat"].lower()
    out["RoleName"] = task.params["RoleName"]
    return out


def export_image_output(task: Task, tags: list[Tag]) -> dict[str, Any]:
    params = task.params
    out: dict[str, Any] = {"ExportImageTaskId": task.id, "ImageId": params["ImageId"],
                           "S3ExportLocation": {"S3Bucket": params["S3Bucket"], "S3Prefix": params["S3Prefix"]}}
    if params.get("Description"):
        out["Description"] = params["Description"]
    out.update(phase_fields(task))
    out["Tags"] = tag_list(tags)
    return out


def phase_fields(task: Task) -> dict[str, Any]:
    """Status, StatusMessage, Progress; a task waiting for a runner is ``validating`` at 0 (§3.4)."""
    out = running_fields(task)
    if task.state == ACTIVE and task.phase == "pending":
        out.update(StatusMessage="validating", Progress="0")
    return out


def check_task_ids(wanted: list[str], prefixes: tuple[str, ...]) -> None:
    for task_id in wanted:
        if ids.prefix_of(task_id) not in prefixes:
            raise ApiError("InvalidExportTaskID.Malformed", f"The export task ID '{task_id}' is malformed")


async def find_tasks(ctx: RequestContext, kinds: tuple[str, ...], wanted: list[str]) -> list[Task]:
    tasks = await service_of(ctx).tasks(kinds, ids=list(dict.fromkeys(wanted)) or None)
    tasks = [task for task in tasks if task.account_id == ctx.account_id]
    known = {task.id for task in tasks}
    missing = next((task_id for task_id in wanted if task_id not in known), None)
    if missing is not None:
        raise ApiError("InvalidExportTaskID.NotFound", f"The export task ID '{missing}' does not exist")
    return tasks


def task_getters(tags: dict[str, list[Tag]], state: Any) -> dict[str, Any]:
    return {"task-state": state, "tag:": lambda task: {t.key: t.value for t in tags[task.id]},
            "tag-key": lambda task: [t.key for t in tags[task.id]]}


@operation("DescribeExportImageTasks")
async def describe_export_image_tasks(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
    wanted = params.get("ExportImageTaskIds") or []
    check_task_ids(wanted, (ids.EXPORT_IMAGE_TASK,))
    tasks = await find_tasks(ctx, (EXPORT_IMAGE,), wanted)
    tags = await service_of(ctx).catalog.tags_of([task.id for task in tasks])
    tasks = match_filters(tasks, params.get("Filters"), task_getters(tags, lambda task: task.state))
    token = None
    if not wanted:
        tasks, token = paginate(tasks, params.get("MaxResults"), params.get("NextToken"), key=lambda task: task.id,
                                scope=(ctx.action, params.get("Filters")),
                                limits=PAGE_LIMITS["DescribeExportImageTasks"])
    out: dict[str, Any] = {"ExportImageTasks": [export_image_output(task, tags[task.id]) for task in tasks]}
    if token:
        out["NextToken"] = token
    return out


# --- CreateInstanceExportTask --------------------------------------------------------------------------------


async def instance_source(ctx: RequestContext, instance_id: str) -> tuple[str, int]:
    """The snapshot and size of an imported instance's one volume; refuses what AWS refuses (§2.3)."""
    service = service_of(ctx)
    if ids.prefix_of(instance_id) != INSTANCE:
        raise ApiError("InvalidInstanceID.Malformed", f"Invalid id: \"{instance_id}\" (expecting \"i-...\")")
    imported = [task for task in await service.catalog.list_tasks((IMPORT_INSTANCE,))
                if task.params.get("InstanceId") == instance_id and task.account_id == ctx.account_id]
    if not imported:
        raise ApiError("InvalidInstanceID.NotFound", f"The instance ID '{instance_id}' does not exist")
    task = service.fresh(imported[0])
    volumes = instance_volumes(task)
    if len(volumes) > 1:
        raise ApiError("UnsupportedOperation", "This instance has multiple volumes attached. Please remove "
                                               "additional volumes.")
    if task.state != COMPLETED:
        raise ApiError("NotExportable", f"Only imported instances can be exported. (The import {task.id} of "
                                        f"{instance_id} is {task.state}, not completed.)")
    snapshot_id = volumes[0]["snapshot_id"]
    snapshot = await service.catalog.get_snapshot(snapshot_id)
    if snapshot is None:
        raise ApiError("NotExportable", f"This instance cannot be exported: the snapshot {snapshot_id} of its "
                                        "volume no longer exists.")
    ctx.authorize(ctx.arn(snapshot_id))
    return snapshot_id, snapshot.virtual_size


@operation("CreateInstanceExportTask")
async def create_instance_export_task(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
    instance_id: str = params["InstanceId"]
    target = choose("TargetEnvironment", params["TargetEnvironment"], tuple(TARGET_ENVIRONMENTS))
    destination = params.get("ExportToS3Task") or {}
    fmt = disk_format(destination.get("DiskImageFormat"), "ExportToS3.DiskImageFormat")
    container = choose("ExportToS3.ContainerFormat", destination.get("ContainerFormat"), ("ova",))
    if container == "ova" and fmt != "VMDK":
        raise ApiError("InvalidParameterCombination", f"An OVA holds stream-optimized VMDK disks: "
                                                      f"ContainerFormat ova needs DiskImageFormat VMDK, not {fmt}")
    bucket = check_bucket(ctx, destination.get("S3Bucket"), "ExportToS3.S3Bucket", "vmimport")
    description = check_description(params)
    specs = check_tag_specifications(params, "export-instance-task", ())
    snapshot_id, virtual_size = await instance_source(ctx, instance_id)
    check_size(ctx, virtual_size, f"The volume of instance {instance_id}")
    task_params = {"InstanceId": instance_id, "SnapshotId": snapshot_id, "TargetEnvironment": target,
                   "DiskImageFormat": fmt, "S3Bucket": bucket, "S3Prefix": destination.get("S3Prefix") or "",
                   "Description": description, "TagSpecifications": specs}
    if container:
        task_params["ContainerFormat"] = container
    task = new_task(ctx, EXPORT_INSTANCE, params, task_params)
    task = await submit(ctx, task, snapshot_task_tags(task.id, specs, "export-instance-task"))
    tags = await service_of(ctx).catalog.tags_of([task.id])
    return {"ExportTask": export_task_output(task, tags[task.id])}


def export_task_output(task: Task, tags: list[Tag]) -> dict[str, Any]:
    params = task.params
    destination: dict[str, Any] = {"DiskImageFormat": params["DiskImageFormat"].lower(),
                                   "S3Bucket": params["S3Bucket"],
                                   "S3Key": object_key(params["S3Prefix"], task.id, extension(params))}
    if params.get("ContainerFormat"):
        destination["ContainerFormat"] = params["ContainerFormat"]
    out: dict[str, Any] = {"ExportTaskId": task.id, "Description": params.get("Description", ""),
                           "ExportToS3Task": destination,
                           "InstanceExportDetails": {"InstanceId": params["InstanceId"],
                                                     "TargetEnvironment": params["TargetEnvironment"]},
                           "State": INSTANCE_EXPORT_STATES[task.state], "Tags": tag_list(tags)}
    if task.state != COMPLETED:
        out["StatusMessage"] = phase_fields(task).get("StatusMessage", "")
    return out


@operation("DescribeExportTasks")
async def describe_export_tasks(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
    wanted = params.get("ExportTaskIds") or []
    check_task_ids(wanted, (ids.EXPORT_INSTANCE_TASK,))
    tasks = await find_tasks(ctx, (EXPORT_INSTANCE,), wanted)
    tags = await service_of(ctx).catalog.tags_of([task.id for task in tasks])
    getters = {**task_getters(tags, lambda task: INSTANCE_EXPORT_STATES[task.state]),
               "state": lambda task: INSTANCE_EXPORT_STATES[task.state],
               "instance-id": lambda task: task.params["InstanceId"]}
    tasks = match_filters(tasks, params.get("Filters"), getters)
    return {"ExportTasks": [export_task_output(task, tags[task.id]) for task in sorted(tasks, key=lambda t: t.id)]}


# --- CancelExportTask ----------------------------------------------------------------------------------------


@operation("CancelExportTask")
async def cancel_export_task(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
    task_id: str = params["ExportTaskId"]
    check_task_ids([task_id], (ids.EXPORT_IMAGE_TASK, ids.EXPORT_INSTANCE_TASK))
    service = service_of(ctx)
    (task,) = await find_tasks(ctx, EXPORT_KINDS, [task_id])
    if task.state != ACTIVE:
        raise ApiError("IncorrectState", f"The export task {task_id} is {task.state} and cannot be cancelled")
    if task.phase == "completing":
        raise ApiError("IncorrectState", f"The export task {task_id} is transferring the final disk image and "
                                         "cannot be cancelled")
    try:
        await service.cancel(task, "")
    except NotCancellable as exc:
        raise ApiError("IncorrectState", f"The export task {task_id} is {exc.state} and cannot be "
                                         "cancelled") from None
    return {}
