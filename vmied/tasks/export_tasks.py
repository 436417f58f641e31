"""Export tasks: ExportImage and CreateInstanceExportTask (docs/ec2-api.md §2.3, §3.4, §3.5).

One task reads one snapshot from the store (the image's disk, or the volume of an imported
instance) and writes it, in the requested format, as one S3 object: ``<S3Prefix><task id>.<ext>``.
The stream goes store reader -> writer -> S3 multipart sink without a temporary file; a VMDK stream
passes the stored deflated grains through.

Phases (statusMessage, progress): ``validating`` 0 -> ``converting`` 1..85 (by bytes) ->
``updating`` 90 while the last parts and the completion are sent (``completing``: from here on the
export cannot be cancelled, IncorrectState) -> ``completed``. A failure or a cancel aborts the
multipart upload: no object and no parts are left.

Resume: the multipart upload id, the planned part size and every uploaded part (number, ETag,
size) are kept in the task's checkpoint. After a restart the export runs again from the start of
the disk (the writers are deterministic: their ids and times are derived from the task), and each
part the interrupted run uploaded, confirmed by ListParts and by its MD5, is not sent again. The
final object is the one an uninterrupted export writes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

from .. import metrics
from ..convert import tracked
from ..errors import StorageError, VmiedError
from ..extents import Extent, checked
from ..formats import ovf, writer_class
from ..formats.base import Reader
from ..formats.ova import appliance_name, write_appliance
from ..io.base import Sink
from ..io.s3 import S3Sink, s3_call, s3_client
from ..io.s3_config import S3Config, S3Location
from ..io.s3_zeros import remove_scratch
from ..pipeline import Progress, Workers, prefetch
from .db import Task
from .engine import TaskContext, TaskFailed, TaskKind, register_kind

log = logging.getLogger("vmied.tasks")

EXPORT_IMAGE = "export-image"
EXPORT_INSTANCE = "export-instance"
EXPORT_KINDS = (EXPORT_IMAGE, EXPORT_INSTANCE)

#: DiskImageFormat (as the API spells it) -> (vmied writer, its options). VHDX and QCOW2 go beyond AWS.
DISK_FORMATS: dict[str, tuple[str, dict[str, str]]] = {
    "VMDK": ("vmdk", {"subformat": "streamOptimized"}),
    "VHD": ("vhd", {"subformat": "dynamic"}),
    "RAW": ("raw", {}),
    "VHDX": ("vhdx", {}),
    "QCOW2": ("qcow2", {}),
}
#: TargetEnvironment -> the virtual hardware the OVF of an OVA export describes, and the disk adapter.
TARGET_ENVIRONMENTS: dict[str, tuple[ovf.Hardware, str]] = {
    "vmware": (ovf.Hardware(controller="lsilogic", system_type="vmx-10", os_type="otherGuest64"), "lsilogic"),
    "citrix": (ovf.Hardware(controller="PIIX4", system_type="xen-3.0-unknown", os_type="otherGuest64"), "ide"),
    "microsoft": (ovf.Hardware(controller="PIIX4", system_type="Microsoft:Hyper-V:System:8.0",
                               os_type="otherGuest64"), "ide"),
}
#: Least seconds between two saves of the checkpoint's part list.
SAVE_INTERVAL = 0.5
#: Ids and times written into an output are derived from the task id in this namespace.
IDENTITY_NAMESPACE = uuid.UUID("6d1f3c52-3f7e-4f5c-9a3e-7f0e2b1c8d40")


def object_key(prefix: str, task_id: str, extension: str) -> str:
    """``<S3Prefix><task id>.<ext>``: the prefix is used verbatim, no ``/`` is added (§3.4)."""
    return f"{prefix}{task_id}.{extension}"


def extension(params: dict[str, Any]) -> str:
    return "ova" if params.get("ContainerFormat") == "ova" else params["DiskImageFormat"].lower()


def identity_options(writer: str, task_id: str, created: float) -> dict[str, str]:
    """Writer options that fix the ids and times an output carries, derived from the task.

    A resumed export must produce the bytes the interrupted run produced, part for part.
    """
    disk_uuid = uuid.uuid5(IDENTITY_NAMESPACE, task_id)
    if writer == "vmdk":
        return {"cid": f"{int(disk_uuid.hex[:8], 16) | 1:08x}"}
    if writer == "vhd":
        return {"uuid": str(disk_uuid), "timestamp": str(int(created))}
    if writer == "vhdx":
        return {"uuid": str(disk_uuid), "write_guid": str(uuid.uuid5(disk_uuid, "write"))}
    return {}


# --- running -----------------------------------------------------------------------------------------


class Checkpoint:
    """The upload's resumable state in the task's checkpoint: upload id, part size, uploaded parts.

    Part records are saved coalesced (one save in flight, the next one takes every part recorded
    meanwhile), so a long export does not write its growing part list once per part.
    """

    def __init__(self, context: TaskContext) -> None:
        self.context = context
        self._dirty = False
        self._saving: asyncio.Future[None] | None = None

    @property
    def state(self) -> dict[str, Any]:
        return self.context.task.checkpoint

    def parts(self) -> dict[int, tuple[str, int]]:
        return {int(number): (etag, size) for number, (etag, size) in self.state.get("parts", {}).items()}

    async def started(self, upload_id: str, part_base: int) -> None:
        """The multipart upload exists: record it before any part is sent (cleanup can then abort it)."""
        self.state.update(upload_id=upload_id, part_base=part_base, parts={})
        await self.context.save()

    def part_done(self, number: int, etag: str, size: int) -> None:
        self.state.setdefault("parts", {})[str(number)] = [etag, size]
        self._dirty = True
        if self._saving is None or self._saving.done():
            self._saving = asyncio.ensure_future(self._save())

    async def _save(self) -> None:
        while self._dirty:
            self._dirty = False
            try:
                await self.context.save()
            except Exception as exc:  # the parts are uploaded again after a restart, nothing worse
                log.warning("task %s: checkpoint not saved (%s)", self.context.task.id, exc)
                return
            if self._dirty:  # more parts came during the save: gather some more before the next
                await asyncio.sleep(SAVE_INTERVAL)

    async def settle(self) -> None:
        """Wait until every part recorded so far is saved."""
        if self._saving is not None:
            await asyncio.gather(self._saving, return_exceptions=True)
            self._saving = None

    def clear(self) -> None:
        for key in ("upload_id", "part_base", "parts"):
            self.state.pop(key, None)


async def open_sink(context: TaskContext, location: S3Location, config: S3Config, expected_size: int,
                    checkpoint: Checkpoint) -> S3Sink:
    """The S3 sink of the export; a resumed task continues its interrupted multipart upload."""
    sink = await S3Sink.create(location, config, expected_size)
    try:
        upload_id = checkpoint.state.get("upload_id")
        if upload_id:
            if await sink.resume(upload_id, checkpoint.parts(), int(checkpoint.state["part_base"])):
                log.info("task %s resumes upload %s (%d parts uploaded before)", context.task.id, upload_id,
                         len(checkpoint.parts()))
            else:
                log.info("task %s: upload %s is gone; the export starts over", context.task.id, upload_id)
                checkpoint.clear()
    except BaseException:
        await sink.detach()
        raise
    sink.on_upload = lambda upload: checkpoint.started(upload, sink.part_base)
    sink.on_part = checkpoint.part_done
    return sink


async def source_snapshot(context: TaskContext) -> str:
    """The snapshot to export, which must still exist in the catalog (the API checked it too)."""
    params = context.task.params
    snapshot_id: str = params["SnapshotId"]
    if await context.catalog.get_snapshot(snapshot_id) is None:
        what = f"image {params['ImageId']}" if "ImageId" in params else f"instance {params['InstanceId']}"
        raise TaskFailed(f"ClientError: the snapshot {snapshot_id} of the {what} no longer exists")
    return snapshot_id


async def run_export(context: TaskContext) -> None:
    task, service = context.task, context.service
    params = task.params
    await context.phase("validating", 0)
    snapshot_id = await source_snapshot(context)
    reader = await service.store.open(snapshot_id)
    limit = service.config.limits.max_export_bytes
    if reader.virtual_size > limit:
        raise TaskFailed(f"ClientError: the disk is {reader.virtual_size} bytes; exports are limited to {limit}")
    location = S3Location(params["S3Bucket"], object_key(params.get("S3Prefix", ""), task.id, extension(params)))
    task.result["s3_key"] = location.key
    checkpoint = Checkpoint(context)
    sink = await open_sink(context, location, service.config.s3_config(), reader.virtual_size, checkpoint)
    try:
        try:
            await context.phase("converting", 1)
            await context.until_cancelled(write_output(context, reader, sink))
            await checkpoint.settle()
            # The point of no return: the last parts and the completion (cancel: IncorrectState).
            await context.phase("updating", 90, "completing")
            await sink.commit()
        except asyncio.CancelledError:  # the service stops: keep the upload for the next start
            await sink.detach()
            raise
        except BaseException:
            await sink.abort()
            raise
    finally:
        await checkpoint.settle()
        await reader.close()
    metrics.BYTES.labels(metrics.bounded(extension(params), ("ova", "vmdk", "vhd", "raw", "vhdx", "qcow2")),
                         "written").inc(sink.position)
    task.result["bytes"] = sink.position
    task.result["parts_resumed"] = sink.parts_skipped
    context.complete()
    await context.save()


async def write_image(task: Task, sink: Sink, virtual_size: int, extents: AsyncIterator[Extent],
                      workers: Workers) -> None:
    """The file the task asks for: a disk image, or an OVA around a VMDK stream of the disk.

    Its ids and times come from the task, so writing it again gives the same bytes.
    """
    params = task.params
    if params.get("ContainerFormat") == "ova":
        hardware, adapter = TARGET_ENVIRONMENTS[params["TargetEnvironment"]]
        name = appliance_name(sink.name)
        hardware = dataclasses.replace(hardware, name=name)
        await write_appliance(sink, [(f"{name}-disk1.vmdk", virtual_size, extents)], workers, hardware, adapter,
                              mtime=int(task.created), disk_options=identity_options("vmdk", task.id, task.created))
        return
    writer, options = DISK_FORMATS[params["DiskImageFormat"]]
    identity = identity_options(writer, task.id, task.created)
    await writer_class(writer)(sink, virtual_size, {**options, **identity}, workers).write(extents)


async def write_output(context: TaskContext, reader: Reader, sink: S3Sink) -> None:
    """The disk (or an OVA around it) into ``sink``, reporting progress 1..85 by virtual bytes."""
    task = context.task
    progress = context.progress
    virtual_size = progress.virtual_size = reader.virtual_size

    def counters(position: int) -> dict[str, int]:
        return {"position": position, "virtual": virtual_size, "written": sink.position,
                "read": int(getattr(reader, "bytes_read", 0))}

    def report(current: Progress) -> None:
        fraction = current.position / virtual_size if virtual_size else 1.0
        context.report(1 + int(84 * fraction), **counters(current.position))

    progress.listeners[:] = [report]
    fetched = prefetch(checked(reader.extents(), virtual_size))
    stream = tracked(fetched, progress)
    try:
        await write_image(task, sink, virtual_size, stream, context.service.workers)
    finally:  # a writer that stops early must not leave the read-ahead task running
        progress.listeners.clear()
        await stream.aclose()
        await fetched.aclose()
    context.report(85, **counters(virtual_size))
    metrics.BYTES.labels("store", "read").inc(counters(virtual_size)["read"])


async def cleanup_export(context: TaskContext) -> None:
    """Leave no multipart upload of the export's object (the sink aborted its own; this finds the rest).

    Runs after a failure or cancel, and at start for an export a crash left ``deleting``.
    """
    params, task = context.task.params, context.task
    key = task.result.get("s3_key") or object_key(params.get("S3Prefix", ""), task.id, extension(params))
    location = S3Location(params["S3Bucket"], key)
    await abort_uploads(context.service.config.s3_config(), location)
    context.task.checkpoint.clear()


async def remove_scratch_objects(client: Any, location: S3Location) -> None:
    """Delete the scratch objects of zeros the export's sink copied from, if a crash left them."""
    try:
        await remove_scratch(client, location, lambda at, action, _, call: s3_call(at, action, call))
    except VmiedError as exc:
        log.warning("could not remove the scratch objects of %s: %s", location, exc.message)


async def abort_uploads(config: S3Config, location: S3Location) -> None:
    """Abort every multipart upload of exactly ``location``'s key, and remove its scratch objects."""
    async with AsyncExitStack() as stack:
        client = await s3_client(config, stack)
        await remove_scratch_objects(client, location)
        try:
            listing = await s3_call(location, "s3:ListBucketMultipartUploads", lambda: client.list_multipart_uploads(
                Bucket=location.bucket, Prefix=location.key))
        except StorageError as exc:
            if exc.reason == "s3.not_found":
                return
            raise
        for upload in listing.get("Uploads", []):
            if upload.get("Key") != location.key:
                continue
            upload_id = str(upload["UploadId"])
            try:
                await s3_call(location, "s3:AbortMultipartUpload", abort_call(client, location, upload_id))
            except VmiedError as exc:
                log.warning("could not abort upload %s of %s: %s", upload_id, location, exc.message)


def abort_call(client: Any, location: S3Location, upload_id: str) -> Callable[[], Awaitable[Any]]:
    return lambda: client.abort_multipart_upload(Bucket=location.bucket, Key=location.key, UploadId=upload_id)


register_kind(TaskKind(EXPORT_IMAGE, "export", run_export, cleanup_export, pending_progress=0))
register_kind(TaskKind(EXPORT_INSTANCE, "export", run_export, cleanup_export, pending_progress=0))
