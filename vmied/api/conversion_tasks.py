"""ImportVolume, ImportInstance, DescribeConversionTasks, CancelConversionTask (docs/ec2-api.md §2.4, §3.5).

The legacy conversion tasks, as boto3 calls them (neither create call is in the AWS CLI). Their
``ConversionTask`` answer follows botocore's model (``<conversionTasks><item><conversionTaskId>``),
not the API reference's sample XML (§5 item 14). ``state`` is ``active | cancelling | cancelled |
completed``; ``statusMessage`` is ``Pending`` while queued, ``Progress: N%`` while converting, the
failure (``ClientError: ...``) or the cancel reason once cancelled. The work is an import of the
disk image that ``Image.ImportManifestUrl`` describes (see :mod:`vmied.tasks.export_conversions`).

AWS's ImportInstance takes a single volume; vmied takes several (up to ``limits.disks_per_image``)
so that an instance can have more than one, which CreateInstanceExportTask then refuses as AWS does
("This instance has multiple volumes attached").
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from ..tasks import ids
from ..tasks.db import ACTIVE, COMPLETED, DELETED, DELETING, Task
from ..tasks.engine import NotCancellable
from ..tasks.export_conversions import (
    CONVERSION_KINDS,
    IMPORT_INSTANCE,
    IMPORT_INSTANCE_TASK,
    IMPORT_VOLUME,
    IMPORT_VOLUME_TASK,
    INSTANCE,
    VOLUME,
)
from ..tasks.imports import SNAPSHOT_FORMATS
from ..tasks.service import ServiceUnavailable
from .import_tasks import check_container, service_of
from .operations import ApiError, RequestContext, missing_parameter, operation
from .tags import tag_list

#: A conversion task that has not finished by then is cancelled on AWS (§3.5); shown, not enforced.
EXPIRATION = 7 * 24 * 3600
STATES = {ACTIVE: "active", DELETING: "cancelling", DELETED: "cancelled", COMPLETED: "completed"}
CONVERTING = "downloading/converting"


def expiration_time(task: Task) -> str:
    return datetime.fromtimestamp(task.created + EXPIRATION, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def disk_container(ctx: RequestContext, disk: dict[str, Any], where: str, description: str
                         ) -> dict[str, Any]:
    """One DiskImage (Image + Volume) as the import container the task reads."""
    image, volume = disk.get("Image") or {}, disk.get("Volume") or {}
    for name, value in (("Image.Format", image.get("Format")), ("Image.Bytes", image.get("Bytes")),
                        ("Image.ImportManifestUrl", image.get("ImportManifestUrl")),
                        ("Volume.Size", volume.get("Size"))):
        if value in (None, ""):
            raise missing_parameter(f"{where}{name}")
    if volume["Size"] < 1:
        raise ApiError("InvalidParameterValue", f"{where}Volume.Size: a volume has at least 1 GiB")
    container = await check_container(ctx, {"Url": image["ImportManifestUrl"], "Format": image["Format"]},
                                      f"{where}Image", SNAPSHOT_FORMATS)
    container.update(Description=description, VolumeId=ids.new_id(VOLUME), VolumeSize=volume["Size"],
                     Bytes=image["Bytes"])
    return container


def availability_zone(ctx: RequestContext, zone: str | None, zone_id: str | None) -> dict[str, str]:
    if zone and zone_id:
        raise ApiError("InvalidParameterCombination", "Give AvailabilityZone or AvailabilityZoneId, not both")
    if zone_id:
        return {"AvailabilityZoneId": zone_id}
    return {"AvailabilityZone": zone or f"{ctx.region}a"}


async def submit(ctx: RequestContext, kind: str, task_params: dict[str, Any]) -> Task:
    prefix = IMPORT_VOLUME_TASK if kind == IMPORT_VOLUME else IMPORT_INSTANCE_TASK
    task = Task(ids.new_id(prefix), kind, params=task_params, access_key=ctx.access_key_id,
                account_id=ctx.account_id)
    try:
        found, _ = await service_of(ctx).submit(task)
    except ServiceUnavailable as exc:
        raise ApiError("Unavailable", exc.message) from None
    return found


@operation("ImportVolume")
async def import_volume(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
    if not params.get("AvailabilityZone") and not params.get("AvailabilityZoneId"):
        raise missing_parameter("AvailabilityZone")
    zone = availability_zone(ctx, params.get("AvailabilityZone"), params.get("AvailabilityZoneId"))
    description = params.get("Description") or ""
    container = await disk_container(ctx, {"Image": params.get("Image"), "Volume": params.get("Volume")}, "",
                                     description)
    task = await submit(ctx, IMPORT_VOLUME, {"DiskContainers": [container], "Description": description, **zone})
    return {"ConversionTask": conversion_task_output(task)}


@operation("ImportInstance")
async def import_instance(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
    disks = params.get("DiskImages") or []
    if not disks:
        raise missing_parameter("DiskImage")
    limit = service_of(ctx).config.limits.disks_per_image
    if len(disks) > limit:
        raise ApiError("InvalidParameter", f"An instance import takes at most {limit} disk images, not {len(disks)}")
    launch = params.get("LaunchSpecification") or {}
    placement = launch.get("Placement") or {}
    zone = availability_zone(ctx, placement.get("AvailabilityZone"), placement.get("AvailabilityZoneId"))
    containers = [await disk_container(ctx, disk, f"DiskImage.{number}.", disk.get("Description") or "")
                  for number, disk in enumerate(disks, 1)]
    spec = {key: launch[key] for key in ("Architecture", "InstanceType") if launch.get(key)}
    task_params = {"DiskContainers": containers, "Description": params.get("Description") or "",
                   "Platform": params["Platform"], "InstanceId": ids.new_id(INSTANCE), "LaunchSpecification": spec,
                   **zone}
    task = await submit(ctx, IMPORT_INSTANCE, task_params)
    return {"ConversionTask": conversion_task_output(task)}


# --- describing ---------------------------------------------------------------------------------------------


def status_message(task: Task) -> str:
    if task.state == ACTIVE:
        return "Pending" if task.phase in ("pending", "validating", "validated") else f"Progress: {task.progress}%"
    if task.state == COMPLETED:
        return ""
    return task.status_message


def converted(task: Task) -> list[int]:
    """Bytes converted per disk (the task counts positions across all its disks in order)."""
    sizes = [disk["virtual_size"] for disk in task.result.get("disks", [])]
    containers = task.params["DiskContainers"]
    if not sizes:
        return [0] * len(containers)
    if task.state == COMPLETED:
        return sizes
    position = int(task.phase_bytes.get(CONVERTING, {}).get("position", 0))
    out, before = [], 0
    for size in sizes:
        out.append(min(max(position - before, 0), size))
        before += size
    return out


def volume_fields(task: Task, container: dict[str, Any], done: int) -> dict[str, Any]:
    zone: dict[str, Any] = {key: task.params[key] for key in ("AvailabilityZone", "AvailabilityZoneId")
                            if key in task.params}
    out: dict[str, Any] = {**zone, "BytesConverted": done,
                           "Image": {"Format": container["Format"].upper(), "Size": container["Bytes"],
                                     "ImportManifestUrl": container["Url"]},
                           "Volume": {"Id": container["VolumeId"], "Size": container["VolumeSize"]}}
    if container.get("Description"):
        out["Description"] = container["Description"]
    return out


def conversion_task_output(task: Task) -> dict[str, Any]:
    containers = task.params["DiskContainers"]
    done = converted(task)
    out: dict[str, Any] = {"ConversionTaskId": task.id, "ExpirationTime": expiration_time(task),
                           "State": STATES[task.state], "Tags": tag_list([])}
    message = status_message(task)
    if message:
        out["StatusMessage"] = message
    if task.kind == IMPORT_VOLUME:
        out["ImportVolume"] = volume_fields(task, containers[0], done[0])
        if task.params.get("Description"):
            out["ImportVolume"]["Description"] = task.params["Description"]
        return out
    disks = task.result.get("disks", [])
    volumes = []
    for number, container in enumerate(containers):
        volume = volume_fields(task, container, done[number])
        disk_status = disks[number]["status"] if number < len(disks) else "active"
        volume["Status"] = {ACTIVE: disk_status, COMPLETED: "completed"}.get(task.state, STATES[task.state])
        if task.state != COMPLETED and message:
            volume["StatusMessage"] = message
        volumes.append(volume)
    details: dict[str, Any] = {"InstanceId": task.params["InstanceId"], "Platform": task.params["Platform"],
                               "Volumes": volumes}
    if task.params.get("Description"):
        details["Description"] = task.params["Description"]
    out["ImportInstance"] = details
    return out


def check_conversion_id(task_id: str) -> None:
    if ids.prefix_of(task_id) not in (IMPORT_INSTANCE_TASK, IMPORT_VOLUME_TASK):
        raise ApiError("InvalidConversionTaskId.Malformed",
                       f"The conversion task ID '{task_id}' is malformed (it has the form import-i-xxxxxxxx or "
                       "import-vol-xxxxxxxxxxxxxxxxx)")


async def find(ctx: RequestContext, wanted: list[str]) -> list[Task]:
    for task_id in wanted:
        check_conversion_id(task_id)
    tasks = await service_of(ctx).tasks(CONVERSION_KINDS, ids=list(dict.fromkeys(wanted)) or None)
    tasks = [task for task in tasks if task.account_id == ctx.account_id]
    known = {task.id for task in tasks}
    missing = next((task_id for task_id in wanted if task_id not in known), None)
    if missing is not None:
        raise ApiError("InvalidConversionTaskId", f"The conversion task ID '{missing}' does not exist")
    return sorted(tasks, key=lambda task: task.id)


@operation("DescribeConversionTasks")
async def describe_conversion_tasks(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
    tasks = await find(ctx, params.get("ConversionTaskIds") or [])
    return {"ConversionTasks": [conversion_task_output(task) for task in tasks]}


@operation("CancelConversionTask")
async def cancel_conversion_task(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
    task_id: str = params["ConversionTaskId"]
    (task,) = await find(ctx, [task_id])
    refusal = ApiError("DeleteConversionTaskError", "The conversion task cannot be canceled.")
    if task.state != ACTIVE:
        raise refusal
    try:
        await service_of(ctx).cancel(task, params.get("ReasonMessage") or "User cancelled")
    except NotCancellable:
        raise refusal from None
    return {}

