"""Import tasks: ImportImage and ImportSnapshot (docs/ec2-api.md §3.2, §3.3).

One task reads each disk container (an S3 object named by bucket and key or by an ``s3://`` URL,
an https URL, or a snapshot already in the store), checks it, and writes each disk into the
snapshot store as a new ``snap-...``; an image import then registers an ``ami-...`` whose block
device mappings name the snapshots, boot disk first.

Phases (statusMessage, progress)::

    import-image:    pending 2 -> validating 3 -> validated 6 -> converting 6..75 -> preparing ami 76..85
    import-snapshot: pending 3 -> validating 3 -> validated 5 -> downloading/converting 5..95

then ``completed`` (no statusMessage/progress; ImageId or SnapshotId set). vmied does no guest OS
fix-ups and no test boot, so the ``updating`` and ``booting`` phases of AWS never appear.

Durability: each disk's snapshot is committed to the catalog, with the task's checkpoint, only
after the store holds it completely (a store write is all-or-nothing). A task resumed after a
restart skips the disks its checkpoint lists and rewrites the one that was interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any

from .. import metrics
from ..errors import Cancelled, UnsupportedImage, VmiedError
from ..formats import detect, reader_class
from ..formats.base import Reader
from ..formats.ova import Appliance, OvaReader, open_appliance
from ..io.base import Source
from ..io.open import open_source
from ..pipeline import Progress, prefetch
from . import ids
from .db import BlockDevice, ImageRecord, SnapshotRecord
from .engine import TaskContext, TaskFailed, TaskKind, register_kind

log = logging.getLogger("vmied.tasks")

IMPORT_IMAGE = "import-image"
IMPORT_SNAPSHOT = "import-snapshot"
IMPORT_KINDS = (IMPORT_IMAGE, IMPORT_SNAPSHOT)
FORMATS = ("ova", "vhd", "vhdx", "vmdk", "raw")
SNAPSHOT_FORMATS = ("vhd", "vhdx", "vmdk", "raw")


def snapshot_description(task_id: str) -> str:
    """What clients search DescribeSnapshots for (osbuild, lorax, PowerShell scripts)."""
    return f"Created by AWS-VMImport service for {task_id}"


def device_name(index: int) -> str:
    """``/dev/sda1`` for the boot disk, then ``/dev/sdb``, ``/dev/sdc``... as AWS names them."""
    return "/dev/sda1" if index == 0 else f"/dev/sd{chr(ord('a') + index)}"


def container_location(container: dict[str, Any]) -> str | None:
    """Where a disk container's bytes are (``s3://bucket/key`` or a URL), None for a snapshot."""
    bucket = container.get("UserBucket")
    if bucket:
        return f"s3://{bucket['S3Bucket']}/{bucket['S3Key']}"
    url: str | None = container.get("Url")
    return url


def bucket_of(location: str) -> str | None:
    if location.startswith("s3://"):
        return location[5:].split("/", 1)[0]
    return None


# --- what the validating phase finds -------------------------------------------------------------------


@dataclass
class PlannedDisk:
    """One disk to write into the store, opened and checked during ``validating``."""

    index: int  # position in the image (boot disk 0)
    container: int  # which disk container it came from
    format: str  # the content's format (VMDK, VHD, ...) as DescribeImportImageTasks reports it
    source_size: int  # bytes of the disk file (diskImageSize)
    virtual_size: int
    reader: Reader | None = None  # opened for the conversion
    appliance: Appliance | None = None  # for a disk of an OVA: opened from the appliance when its turn comes
    appliance_index: int = 0
    os_hint: str = ""

    async def open(self) -> Reader:
        if self.reader is None:
            assert self.appliance is not None
            self.reader = await self.appliance.disks[self.appliance_index].open()
        return self.reader


@dataclass
class Plan:
    disks: list[PlannedDisk] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)

    async def close(self) -> None:
        for disk in self.disks:
            if disk.reader is not None:
                try:
                    await disk.reader.close()
                except Exception:
                    log.debug("closing a reader failed", exc_info=True)
        for source in self.sources:
            try:
                await source.close()
            except Exception:
                log.debug("closing a source failed", exc_info=True)

    @contextlib.asynccontextmanager
    async def validating(self) -> AsyncIterator[None]:
        """Close what the plan opened if validation fails; a refused input fails the task as AWS says."""
        try:
            yield
        except BaseException as exc:
            await self.close()
            if isinstance(exc, VmiedError) and not isinstance(exc, Cancelled):
                raise TaskFailed(f"ClientError: Disk validation failed [{exc.message}]") from exc
            raise


def check_role(context: TaskContext, location: str) -> None:
    """The ``vmimport`` role may read the bucket (docs/ec2-api.md §3.9), or the URL's origin."""
    role = context.service.config.role
    bucket = bucket_of(location)
    if bucket is not None:
        what, subject, patterns, setting = "bucket", bucket, role.read_buckets, "read_buckets"
    else:
        what, subject, patterns, setting = "URL origin", url_origin(location), role.read_urls, "read_urls"
    if not role.allows(subject, patterns):
        role_name = context.task.params.get("RoleName") or "vmimport"
        raise TaskFailed(f"ClientError: The service role {role_name} provided does not exist or does not have "
                         f"sufficient permissions ({what} {subject} is not among the role's {setting})")


def url_origin(url: str) -> str:
    """``scheme://host:port`` of a URL, the port spelled out, the host lower-case (what read_urls match)."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme, 0)
    except ValueError:
        port = 0
    host = parts.hostname or ""
    return f"{parts.scheme}://{f'[{host}]' if ':' in host else host}:{port}"


async def plan_container(context: TaskContext, plan: Plan, number: int, container: dict[str, Any]) -> None:
    """Open one disk container and add its disks to ``plan``; refuses what cannot be imported."""
    service = context.service
    image_task = context.task.kind == IMPORT_IMAGE
    snapshot_id = container.get("SnapshotId")
    if snapshot_id:
        record = await service.catalog.get_snapshot(snapshot_id)
        if record is None:
            raise TaskFailed(f"ClientError: The snapshot {snapshot_id} does not exist")
        reader = await service.store.open(snapshot_id)
        plan.disks.append(PlannedDisk(len(plan.disks), number, "RAW", record.virtual_size, reader.virtual_size,
                                      reader))
        return
    location = container_location(container)
    assert location is not None, "the API refuses a container without a source"
    check_role(context, location)
    source = await open_source(location, service.config.s3_config())
    plan.sources.append(source)
    declared = (container.get("Format") or "").lower() or None
    if declared == "raw":
        cls = reader_class("raw")
    else:
        cls = await detect(source)
        if declared is not None and cls.format != declared:
            raise UnsupportedImage(f"Unsupported specified file format: {container.get('Format')} was given but "
                                   f"the content of {source.name} is {cls.format.upper()}", reason="format.mismatch")
    if cls is OvaReader:
        if not image_task:
            raise UnsupportedImage("an OVA holds a whole virtual machine: import it with ImportImage",
                                   reason="format.unsupported")
        appliance = await open_appliance(source, service.workers)
        for disk in appliance.disks:
            os_hint = disk.system.os.name if disk.system and disk.system.os else ""
            size = sum(member.size for member in disk.members)
            plan.disks.append(PlannedDisk(len(plan.disks), number, disk.content_format.upper(), size,
                                          disk.disk.capacity, appliance=appliance, appliance_index=disk.index,
                                          os_hint=os_hint))
        return
    reader = await cls.open(source, service.workers)
    plan.disks.append(PlannedDisk(len(plan.disks), number, cls.format.upper(), source.size, reader.virtual_size,
                                  reader))


async def validate(context: TaskContext) -> Plan:
    plan = Plan()
    async with plan.validating():
        for number, container in enumerate(context.task.params["DiskContainers"]):
            context.check()
            await plan_container(context, plan, number, container)
    limit = context.service.config.limits.disks_per_image
    if len(plan.disks) > limit:
        await plan.close()
        raise TaskFailed(f"ClientError: the image has {len(plan.disks)} disks; an image import takes at most "
                         f"{limit} (import the others with ImportSnapshot)")
    return plan


def describe_disks(context: TaskContext, plan: Plan) -> None:
    """Replace the per-container snapshot details by one per disk (an OVA may hold several)."""
    containers = context.task.params["DiskContainers"]
    previous = {int(k): v for k, v in context.task.checkpoint.get("snapshots", {}).items()}
    disks = []
    for disk in plan.disks:
        container = containers[disk.container]
        detail: dict[str, Any] = {
            "container": disk.container,
            "description": container.get("Description", ""),
            "format": disk.format,
            "disk_image_size": float(disk.source_size),
            "virtual_size": disk.virtual_size,
            "device_name": container.get("DeviceName") or device_name(disk.index),
            "status": "active",
        }
        if disk.index in previous:
            detail.update(status="completed", snapshot_id=previous[disk.index]["id"])
        disks.append(detail)
    context.task.result["disks"] = disks


# --- converting --------------------------------------------------------------------------------------


async def commit(transaction: Awaitable[None]) -> None:
    """Let a catalog commit finish even if the task is interrupted meanwhile (the store already holds
    the data; the in-memory task already says so), so memory and catalog never disagree."""
    await asyncio.shield(asyncio.ensure_future(transaction))


async def write_disk(context: TaskContext, disk: PlannedDisk, done_before: int, total: int,
                     span: tuple[int, int]) -> SnapshotRecord:
    """Stream one disk into the store as a new snapshot; the catalog row is returned, not yet committed."""
    service = context.service
    reader = await disk.open()
    snapshot_id = ids.new_id(ids.SNAPSHOT)
    progress = context.progress
    progress.virtual_size = disk.virtual_size
    progress.position = 0
    low, high = span
    source: Source | None = getattr(reader, "source", None)

    def bytes_read() -> int:
        return source.bytes_read if source is not None else int(getattr(reader, "bytes_read", 0))

    def report(current: Progress) -> None:
        fraction = (done_before + current.position) / total if total else 1.0
        context.report(low + int((high - low) * fraction), position=done_before + current.position,
                       virtual=total, read=bytes_read(), written=written_before + current.bytes_written)

    written_before = int(context.task.phase_bytes.get(context.task.phase, {}).get("written", 0))
    progress.bytes_written = 0
    progress.listeners[:] = [report]
    context.written.append(snapshot_id)
    # The store checks the stream, advances the progress and stops at its cancel flag.
    stored = await service.store.write(snapshot_id, prefetch(reader.extents()), disk.virtual_size, progress)
    progress.listeners.clear()
    context.report(low + int((high - low) * (done_before + disk.virtual_size) / total) if total else high,
                   position=done_before + disk.virtual_size, virtual=total, read=bytes_read(),
                   written=written_before + stored.stored_bytes)
    label = metrics.bounded(disk.format.lower(), (*FORMATS, "qcow2", "empty"))
    metrics.BYTES.labels(label, "read").inc(bytes_read())
    metrics.BYTES.labels("store", "written").inc(stored.stored_bytes)
    task = context.task
    params = task.params
    return SnapshotRecord(snapshot_id, disk.virtual_size, task.account_id, snapshot_description(task.id),
                          stored_bytes=stored.stored_bytes, task_id=task.id,
                          encrypted=bool(params.get("Encrypted")), kms_key_id=params.get("KmsKeyId", ""),
                          sha256=stored.sha256 or "")


def platform_defaults(params: dict[str, Any]) -> dict[str, str]:
    """Architecture, platform, boot mode and licensing of the image (docs/ec2-api.md §3.6, §3.7)."""
    platform = params.get("Platform") or "Linux"
    license_type = params.get("LicenseType") or ("AWS" if platform == "Windows" else "BYOL")
    if platform == "Windows":
        usage = params.get("UsageOperation") or ("RunInstances:0002" if license_type == "AWS" else "RunInstances:0800")
    else:
        usage = params.get("UsageOperation") or "RunInstances"
    return {"architecture": params.get("Architecture") or "x86_64", "platform": platform,
            "boot_mode": params.get("BootMode") or "legacy-bios", "license_type": license_type,
            "usage_operation": usage}


async def run_import(context: TaskContext) -> None:
    task = context.task
    image_task = task.kind == IMPORT_IMAGE
    defaults = platform_defaults(task.params)
    if image_task and defaults["platform"] == "Linux" and defaults["license_type"] != "BYOL":
        raise TaskFailed("ClientError: Linux images can only be imported with the BYOL license type")
    await context.phase("validating", 3)
    plan = await context.until_cancelled(validate(context))  # a stalled source read too
    try:
        context.report(3, read=sum(source.bytes_read for source in plan.sources),
                       virtual=sum(disk.virtual_size for disk in plan.disks))
        describe_disks(context, plan)
        task.result.update({key: value for key, value in defaults.items() if image_task})
        await context.phase("validated", 6 if image_task else 5)
        await convert_disks(context, plan)
    finally:
        await plan.close()


async def convert_disks(context: TaskContext, plan: Plan) -> None:
    task = context.task
    image_task = task.kind == IMPORT_IMAGE
    span = (6, 75) if image_task else (5, 95)
    await context.phase("converting" if image_task else "downloading/converting", span[0])
    done_snapshots: dict[str, dict[str, Any]] = task.checkpoint.setdefault("snapshots", {})
    total = sum(disk.virtual_size for disk in plan.disks)
    done = 0
    records: list[tuple[PlannedDisk, str]] = []
    for disk in plan.disks:
        context.check()
        earlier = done_snapshots.get(str(disk.index))
        if earlier is not None and await context.catalog.get_snapshot(earlier["id"]) is None:
            earlier = None  # the checkpoint got ahead of the catalog: write this disk again
        if earlier is not None:
            if earlier["virtual_size"] != disk.virtual_size:
                raise TaskFailed(f"ClientError: disk {disk.index + 1} changed while the import was interrupted "
                                 f"({earlier['virtual_size']} bytes before, {disk.virtual_size} now)")
            records.append((disk, earlier["id"]))
            done += disk.virtual_size
            continue
        record = await context.until_cancelled(write_disk(context, disk, done, total, span))
        done += disk.virtual_size
        detail = task.result["disks"][disk.index]
        detail.update(status="completed", snapshot_id=record.id)
        done_snapshots[str(disk.index)] = {"id": record.id, "virtual_size": disk.virtual_size}
        records.append((disk, record.id))
        if not image_task:
            context.complete()
            task.result["snapshot_id"] = record.id
            await commit(context.catalog.commit_snapshot(record, task))
            await apply_result_tags(context, {"snapshot": [record.id]})
            return
        task.progress = span[0] + int((span[1] - span[0]) * done / total) if total else span[1]
        await commit(context.catalog.commit_snapshot(record, task))
    await register_image(context, plan, records)


async def register_image(context: TaskContext, plan: Plan, records: list[tuple[PlannedDisk, str]]) -> None:
    task = context.task
    await context.phase("preparing ami", 76)
    result = task.result
    platform = result["platform"]
    os_hint = next((disk.os_hint for disk in plan.disks if disk.os_hint), "")
    devices = [BlockDevice(result["disks"][disk.index]["device_name"], snapshot_id, disk.virtual_size)
               for disk, snapshot_id in records]
    image = ImageRecord(
        ids.new_id(ids.IMAGE), task.id, task.account_id, result["architecture"], devices[0].device_name, devices,
        description=f"AWS-VMImport service: {platform}" + (f" - {os_hint}" if os_hint else ""),
        platform="Windows" if platform == "Windows" else "", boot_mode=result["boot_mode"],
        license_type=result["license_type"], usage_operation=result["usage_operation"], task_id=task.id)
    context.report(85)
    context.complete()
    result["image_id"] = image.id
    await commit(context.catalog.commit_image(image, task))
    await apply_result_tags(context, {"image": [image.id], "snapshot": [device.snapshot_id for device in devices]})


async def apply_result_tags(context: TaskContext, resources: dict[str, list[str]]) -> None:
    """Tags the request's TagSpecifications asked for on the resulting image or snapshots."""
    from .db import Tag

    tags = [Tag(resource_id, resource_type, tag["Key"], tag.get("Value", ""))
            for spec in context.task.params.get("TagSpecifications", [])
            for resource_type, resource_ids in resources.items() if spec.get("ResourceType") == resource_type
            for resource_id in resource_ids for tag in spec.get("Tags", [])]
    if tags:
        await context.catalog.set_tags(tags)


async def cleanup_import(context: TaskContext) -> None:
    """A failed or cancelled import leaves nothing: its snapshots leave the catalog and the store."""
    service = context.service
    snapshot_ids = {record.id for record in await service.catalog.list_snapshots(task_id=context.task.id)}
    for snapshot_id in sorted(snapshot_ids):
        if not await service.catalog.delete_snapshot(snapshot_id):
            await service.delete_stored(snapshot_id)
    for snapshot_id in context.written:
        if snapshot_id not in snapshot_ids:
            await service.delete_stored(snapshot_id)


register_kind(TaskKind(IMPORT_IMAGE, "import", run_import, cleanup_import, pending_progress=2))
register_kind(TaskKind(IMPORT_SNAPSHOT, "import", run_import, cleanup_import, pending_progress=3))
