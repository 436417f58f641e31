"""ImportImage, ImportSnapshot, DescribeImportImageTasks, DescribeImportSnapshotTasks, CancelImportTask.

Shapes and behaviour: docs/ec2-api.md §2.2 and §3.2-3.3. The request is checked here (anything
refused synchronously is an ApiError); what is only known by reading the disks fails the task later
(``deleted`` + ``ClientError: ...``). A ClientToken makes a create call idempotent per access key:
the same token with the same parameters answers the first task; with other parameters,
IdempotentParameterMismatch.
"""

from __future__ import annotations

import json
from typing import Any

from ..tasks import ids
from ..tasks.db import ACTIVE, COMPLETED, DELETED, DELETING, Tag, Task, TokenMismatch
from ..tasks.engine import NotCancellable
from ..tasks.imports import FORMATS, IMPORT_IMAGE, IMPORT_SNAPSHOT, SNAPSHOT_FORMATS
from ..tasks.service import Service, ServiceUnavailable
from .operations import ApiError, RequestContext, match_filters, missing_parameter, operation, paginate
from .tags import check_tags, tag_list

ARCHITECTURES = ("i386", "x86_64", "arm64")
PLATFORMS = ("Windows", "Linux")
LICENSE_TYPES = ("AWS", "BYOL")
BOOT_MODES = ("legacy-bios", "uefi")
USAGE_OPERATIONS = ("RunInstances", "RunInstances:0002", "RunInstances:0006", "RunInstances:0102",
                    "RunInstances:0202", "RunInstances:0800", "RunInstances:0100", "RunInstances:0004",
                    "RunInstances:0200")
TASK_STATES = (ACTIVE, COMPLETED, DELETING, DELETED)
#: Parameters that do not make two create requests different (idempotency compares the rest).
NOT_COMPARED = ("ClientToken", "DryRun")


def service_of(ctx: RequestContext) -> Service:
    service: Service = ctx.service
    return service


def choose(name: str, value: str | None, allowed: tuple[str, ...]) -> str | None:
    """``value`` spelled as in ``allowed`` (case-insensitive), or InvalidParameterValue listing them."""
    if value is None:
        return None
    for choice in allowed:
        if choice.lower() == value.lower():
            return choice
    raise ApiError("InvalidParameterValue",
                   f"Value ({value}) for parameter {name} is invalid. Choose one of {', '.join(allowed)}")


# --- creating ----------------------------------------------------------------------------------------


async def check_container(ctx: RequestContext, container: dict[str, Any], where: str,
                          formats: tuple[str, ...]) -> dict[str, Any]:
    """One disk container: exactly one source, a known format; returns it as the task keeps it."""
    out = {key: value for key, value in container.items() if value not in (None, "")}
    url, bucket, snapshot_id = out.get("Url"), out.get("UserBucket"), out.get("SnapshotId")
    given = [name for name, value in (("Url", url), ("UserBucket", bucket), ("SnapshotId", snapshot_id)) if value]
    if len(given) > 1:
        raise ApiError("InvalidParameterCombination",
                       f"{where}: give only one of Url, UserBucket and SnapshotId (got {' and '.join(given)})")
    if not given:
        raise ApiError("InvalidParameter", f"{where}: a disk container needs a Url, a UserBucket or a SnapshotId")
    if bucket is not None:
        for member in ("S3Bucket", "S3Key"):
            if not bucket.get(member):
                raise missing_parameter(f"{where}.UserBucket.{member}")
    if url is not None and not ((url.startswith("s3://") and "/" in url[5:].strip("/"))
                                or url.startswith(("https://", "http://"))):
        raise ApiError("InvalidParameter", f"{where}.Url: Invalid S3 source location {url!r} "
                                           "(give s3://bucket/key or an https URL)")
    if snapshot_id is not None:
        if not ids.is_valid(snapshot_id, ids.SNAPSHOT):
            raise ApiError("InvalidSnapshotID.Malformed", f"Invalid id: \"{snapshot_id}\" (expecting \"snap-...\")")
        record = await service_of(ctx).catalog.get_snapshot(snapshot_id)
        if record is None or record.owner_id != ctx.account_id:
            raise ApiError("InvalidSnapshot.NotFound", f"The snapshot '{snapshot_id}' does not exist.")
    if "Format" in out and out["Format"].lower() not in formats:
        raise ApiError("InvalidParameterValue",
                       f"Value ({out['Format']}) for parameter {where}.Format is invalid. "
                       f"Choose one of {', '.join(f.upper() for f in formats)}")
    return out


def check_tag_specifications(params: dict[str, Any], task_type: str, result_types: tuple[str, ...]
                             ) -> list[dict[str, Any]]:
    specs = params.get("TagSpecifications") or []
    for number, spec in enumerate(specs, 1):
        resource_type = spec.get("ResourceType")
        if resource_type not in (task_type, *result_types):
            raise ApiError("InvalidParameterValue",
                           f"TagSpecification.{number}.ResourceType: '{resource_type}' cannot be tagged here "
                           f"(use {task_type})")
        check_tags(spec.get("Tags") or [], f"TagSpecification.{number}.Tag")
    return list(specs)


def check_image_options(params: dict[str, Any]) -> dict[str, Any]:
    """Architecture, platform, licensing and boot mode of ImportImage, spelled canonically."""
    out: dict[str, Any] = {}
    out["Architecture"] = choose("Architecture", params.get("Architecture"), ARCHITECTURES)
    out["Platform"] = choose("Platform", params.get("Platform"), PLATFORMS)
    out["LicenseType"] = choose("LicenseType", params.get("LicenseType"), LICENSE_TYPES)
    if params.get("BootMode") == "uefi-preferred":
        raise ApiError("InvalidParameterValue", "BootMode uefi-preferred isn't supported for importing images "
                                                "(choose legacy-bios or uefi)")
    out["BootMode"] = choose("BootMode", params.get("BootMode"), BOOT_MODES)
    out["Hypervisor"] = choose("Hypervisor", params.get("Hypervisor"), ("xen",))
    out["UsageOperation"] = choose("UsageOperation", params.get("UsageOperation"), USAGE_OPERATIONS)
    if out["LicenseType"] and out["UsageOperation"]:
        raise ApiError("InvalidParameterCombination",
                       "Specifying a value for both LicenseType and UsageOperation is not allowed")
    specs = params.get("LicenseSpecifications") or []
    for number, spec in enumerate(specs, 1):
        arn = spec.get("LicenseConfigurationArn", "")
        if not arn.startswith("arn:"):
            raise ApiError("InvalidParameterValue",
                           f"LicenseSpecifications.{number}.LicenseConfigurationArn: {arn!r} is not an ARN")
    if specs:
        out["LicenseSpecifications"] = specs
    return {key: value for key, value in out.items() if value is not None}


def check_common(params: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if params.get("KmsKeyId") and not params.get("Encrypted"):
        raise ApiError("InvalidParameterCombination", "KmsKeyId requires Encrypted to be true")
    for key in ("Description", "Encrypted", "KmsKeyId", "RoleName", "ClientData"):
        if params.get(key) not in (None, ""):
            out[key] = params[key]
    return out


def snapshot_task_tags(task_id: str, specs: list[dict[str, Any]], task_type: str) -> list[Tag]:
    return [Tag(task_id, task_type, tag["Key"], tag.get("Value", "")) for spec in specs
            if spec.get("ResourceType") == task_type for tag in spec.get("Tags") or []]


async def create(ctx: RequestContext, kind: str, params: dict[str, Any], task_params: dict[str, Any],
                 task_type: str) -> Task:
    """Submit the task (or find the one this ClientToken made); answers the task as it is now."""
    service = service_of(ctx)
    # What the task keeps must survive JSON (ClientData carries timestamps) and compare equal after it.
    task_params = json.loads(json.dumps(task_params, default=str, sort_keys=True))
    prefix = ids.IMPORT_IMAGE_TASK if kind == IMPORT_IMAGE else ids.IMPORT_SNAPSHOT_TASK
    task = Task(ids.new_id(prefix), kind, params=task_params, client_token=params.get("ClientToken") or None,
                access_key=ctx.access_key_id, account_id=ctx.account_id)
    tags = snapshot_task_tags(task.id, task_params.get("TagSpecifications", []), task_type)
    try:
        found, _ = await service.submit(task, tags)
    except TokenMismatch:
        raise ApiError("IdempotentParameterMismatch",
                       f"The client token '{task.client_token}' was already used with different parameters") from None
    except ServiceUnavailable as exc:
        raise ApiError("Unavailable", exc.message) from None
    return found


@operation("ImportImage")
async def import_image(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
    containers = params.get("DiskContainers") or []
    limit = service_of(ctx).config.limits.disks_per_image
    if not containers:
        raise missing_parameter("DiskContainer")
    if len(containers) > limit:
        raise ApiError("InvalidParameter", f"An image import takes at most {limit} disk containers, not "
                                           f"{len(containers)} (import the others with ImportSnapshot)")
    checked = [await check_container(ctx, container, f"DiskContainer.{number}", FORMATS)
               for number, container in enumerate(containers, 1)]
    task_params = {**check_common(params), **check_image_options(params), "DiskContainers": checked,
                   "TagSpecifications": check_tag_specifications(params, "import-image-task",
                                                                 ("image", "snapshot"))}
    task = await create(ctx, IMPORT_IMAGE, params, task_params, "import-image-task")
    tags = await service_of(ctx).catalog.tags_of([task.id])
    out = image_task_output(task, tags[task.id])
    out.pop("BootMode", None)  # not in the ImportImage response model (Describe has it)
    return out


@operation("ImportSnapshot")
async def import_snapshot(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
    container = params.get("DiskContainer")
    if not container:
        raise missing_parameter("DiskContainer")
    checked = await check_container(ctx, container, "DiskContainer", SNAPSHOT_FORMATS)
    if checked.get("SnapshotId"):
        raise ApiError("InvalidParameter", "ImportSnapshot reads a Url or a UserBucket, not a SnapshotId")
    task_params = {**check_common(params), "DiskContainers": [checked],
                   "TagSpecifications": check_tag_specifications(params, "import-snapshot-task", ("snapshot",))}
    task = await create(ctx, IMPORT_SNAPSHOT, params, task_params, "import-snapshot-task")
    tags = await service_of(ctx).catalog.tags_of([task.id])
    return snapshot_task_output(task, tags[task.id])


# --- describing --------------------------------------------------------------------------------------


def source_fields(container: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if container.get("UserBucket"):
        bucket = container["UserBucket"]
        out["UserBucket"] = {"S3Bucket": bucket["S3Bucket"], "S3Key": bucket["S3Key"]}
    if container.get("Url"):
        out["Url"] = container["Url"]
    return out


def running_fields(task: Task) -> dict[str, Any]:
    """Progress and StatusMessage: shown while active, the message alone once deleting/deleted."""
    out: dict[str, Any] = {"Status": task.state}
    if task.state == COMPLETED:
        return out
    if task.status_message:
        out["StatusMessage"] = task.status_message
    if task.state == ACTIVE and task.progress is not None:
        out["Progress"] = str(task.progress)
    return out


def snapshot_details(task: Task) -> list[dict[str, Any]]:
    containers = task.params.get("DiskContainers", [])
    disks = task.result.get("disks")
    if disks is None:  # not validated yet: one line per container, as the caller described it
        return [{"Description": c.get("Description", ""), "DiskImageSize": 0.0,
                 **({"Format": c["Format"]} if c.get("Format") else {}), **source_fields(c),
                 **({"SnapshotId": c["SnapshotId"]} if c.get("SnapshotId") else {})} for c in containers]
    details = []
    for disk in disks:
        container = containers[disk["container"]]
        detail: dict[str, Any] = {"Description": disk["description"], "DeviceName": disk["device_name"],
                                  "DiskImageSize": disk["disk_image_size"], "Format": disk["format"],
                                  "Status": disk["status"], **source_fields(container)}
        if disk.get("snapshot_id") and task.state != DELETED:
            detail["SnapshotId"] = disk["snapshot_id"]
        details.append(detail)
    return details


def image_task_output(task: Task, tags: list[Tag]) -> dict[str, Any]:
    params, result = task.params, task.result
    out: dict[str, Any] = {"ImportTaskId": task.id}
    for key, result_key in (("Architecture", "architecture"), ("Platform", "platform"),
                            ("LicenseType", "license_type"), ("UsageOperation", "usage_operation"),
                            ("BootMode", "boot_mode")):
        value = params.get(key) or (result.get(result_key) if task.state == COMPLETED else None)
        if value:
            out[key] = value
    for key in ("Description", "Hypervisor", "KmsKeyId"):
        if params.get(key):
            out[key] = params[key]
    out["Encrypted"] = bool(params.get("Encrypted"))
    if params.get("LicenseSpecifications"):
        out["LicenseSpecifications"] = params["LicenseSpecifications"]
    if result.get("image_id") and task.state == COMPLETED:
        out["ImageId"] = result["image_id"]
    out.update(running_fields(task))
    out["SnapshotDetails"] = snapshot_details(task)
    out["Tags"] = tag_list(tags)
    return out


def snapshot_task_output(task: Task, tags: list[Tag]) -> dict[str, Any]:
    params = task.params
    container = params["DiskContainers"][0]
    disks = task.result.get("disks") or []
    detail: dict[str, Any] = {"DiskImageSize": disks[0]["disk_image_size"] if disks else 0.0,
                              "Encrypted": bool(params.get("Encrypted")), **source_fields(container)}
    description = container.get("Description") or params.get("Description")
    if description:
        detail["Description"] = description
    fmt = disks[0]["format"] if disks else container.get("Format")
    if fmt:
        detail["Format"] = fmt
    if params.get("KmsKeyId"):
        detail["KmsKeyId"] = params["KmsKeyId"]
    if task.state == COMPLETED:
        detail["SnapshotId"] = task.result["snapshot_id"]
    detail.update(running_fields(task))
    out: dict[str, Any] = {"ImportTaskId": task.id, "SnapshotTaskDetail": detail, "Tags": tag_list(tags)}
    if params.get("Description"):
        out["Description"] = params["Description"]
    return out


def malformed_task_id(task_id: str) -> ApiError:
    return ApiError("InvalidConversionTaskId.Malformed", f"The conversion task ID '{task_id}' is malformed")


async def describe(ctx: RequestContext, params: dict[str, Any], kind: str, prefix: str
                   ) -> tuple[list[Task], dict[str, list[Tag]], str | None]:
    service = service_of(ctx)
    wanted = params.get("ImportTaskIds") or []
    for task_id in wanted:
        if not ids.is_valid(task_id, prefix):
            raise malformed_task_id(task_id)
    tasks = await service.tasks((kind,), ids=list(dict.fromkeys(wanted)) or None)
    tasks = [task for task in tasks if task.account_id == ctx.account_id]
    if wanted:
        known = {task.id for task in tasks}
        missing = next((task_id for task_id in wanted if task_id not in known), None)
        if missing is not None:
            raise malformed_task_id(missing)
    tags = await service.catalog.tags_of([task.id for task in tasks])
    getters = {"task-state": lambda task: task.state, "tag:": lambda task: {t.key: t.value for t in tags[task.id]},
               "tag-key": lambda task: [t.key for t in tags[task.id]]}
    tasks = match_filters(tasks, params.get("Filters"), getters)
    if wanted:
        return tasks, tags, None
    page, token = paginate(tasks, params.get("MaxResults"), params.get("NextToken"), key=lambda task: task.id,
                           scope=(ctx.action, params.get("Filters")))
    return page, tags, token


@operation("DescribeImportImageTasks")
async def describe_import_image_tasks(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
    tasks, tags, token = await describe(ctx, params, IMPORT_IMAGE, ids.IMPORT_IMAGE_TASK)
    out: dict[str, Any] = {"ImportImageTasks": [image_task_output(task, tags[task.id]) for task in tasks]}
    if token:
        out["NextToken"] = token
    return out


@operation("DescribeImportSnapshotTasks")
async def describe_import_snapshot_tasks(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
    tasks, tags, token = await describe(ctx, params, IMPORT_SNAPSHOT, ids.IMPORT_SNAPSHOT_TASK)
    out: dict[str, Any] = {"ImportSnapshotTasks": [snapshot_task_output(task, tags[task.id]) for task in tasks]}
    if token:
        out["NextToken"] = token
    return out


# --- cancelling --------------------------------------------------------------------------------------


@operation("CancelImportTask")
async def cancel_import_task(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
    task_id = params.get("ImportTaskId")
    if not task_id:
        raise missing_parameter("ImportTaskId")
    if ids.prefix_of(task_id) not in (ids.IMPORT_IMAGE_TASK, ids.IMPORT_SNAPSHOT_TASK):
        raise malformed_task_id(task_id)
    service = service_of(ctx)
    task = await service.get_task(task_id)
    if task is None or task.account_id != ctx.account_id:
        raise ApiError("InvalidConversionTaskId.Malformed", f"The conversion task ID '{task_id}' does not exist")
    if task.state != ACTIVE:
        raise ApiError("IncorrectState", f"The import task {task_id} is {task.state} and cannot be cancelled")
    try:
        previous = await service.cancel(task, params.get("CancelReason") or "")
    except NotCancellable as exc:
        raise ApiError("IncorrectState", f"The import task {task_id} is {exc.state} and cannot be cancelled") from None
    return {"ImportTaskId": task_id, "PreviousState": previous, "State": DELETING}
