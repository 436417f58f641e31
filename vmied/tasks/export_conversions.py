"""The legacy conversion tasks ImportVolume and ImportInstance (docs/ec2-api.md §2.4, §3.5).

They are imports run by the import machinery of :mod:`.imports` (validate the disk, stream it into
the store, commit the snapshot with the task's checkpoint): ImportVolume makes one snapshot (the
volume ``vol-...`` answered at once), ImportInstance one snapshot per disk image and a stopped
instance record ``i-...`` whose volumes are those snapshots. vmied runs no VMs: the instance is
only what CreateInstanceExportTask exports.

The disk is read from ``Image.ImportManifestUrl``: an AWS import manifest (the XML that
``ec2-upload-disk-image`` writes: ``<manifest><import><size>`` and ``<parts>`` whose ``<get-url>``
each serve one byte range of the disk image, in order), or, as a vmied extension, the disk image
itself (an ``s3://bucket/key`` or an http(s) URL, e.g. a pre-signed one). The instance record is the completed task: its
``params`` hold the instance id and its volumes, its ``result`` the snapshots (see
:func:`instance_volumes`).

Module name: the export helper owns ``export_*`` modules; these tasks are what instance exports read.
"""

from __future__ import annotations

from typing import Any
from xml.etree.ElementTree import Element

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from ..errors import UnsupportedImage, VmiedError
from ..formats import detect, reader_class
from ..formats.ova import OvaReader
from ..io.base import Source
from ..io.open import open_source
from ..io.slice import ConcatSource
from . import imports
from .db import COMPLETED, Task
from .engine import TaskContext, TaskFailed, TaskKind, register_kind

IMPORT_VOLUME = "import-volume"
IMPORT_INSTANCE = "import-instance"
CONVERSION_KINDS = (IMPORT_INSTANCE, IMPORT_VOLUME)
IMPORT_INSTANCE_TASK, IMPORT_VOLUME_TASK = "import-i", "import-vol"
INSTANCE, VOLUME = "i", "vol"
GiB = 1 << 30
#: Largest import manifest read (a manifest of 10,000 parts is about 10 MiB).
MAX_MANIFEST = 16 << 20
MAX_PARTS = 10_000


class InvalidManifest(VmiedError):
    reason = "manifest.invalid"


def is_manifest(head: bytes) -> bool:
    """An import manifest is XML; no disk image format starts like one."""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    return text.startswith((b"<?xml", b"<manifest"))


def manifest_parts(data: bytes) -> tuple[int, list[tuple[int, int, str]]]:
    """The disk image size and its parts ``(start, end inclusive, get-url)`` from an import manifest."""
    try:
        root: Element = SafeET.fromstring(data)
    except (SafeET.ParseError, DefusedXmlException, ValueError) as exc:
        raise InvalidManifest(f"the import manifest is not valid XML ({exc})") from None
    size_text = root.findtext("import/size")
    parts = root.findall("import/parts/part")
    if root.tag != "manifest" or size_text is None or not parts:
        raise InvalidManifest("the import manifest needs <manifest><import><size> and <parts><part> elements")
    if len(parts) > MAX_PARTS:
        raise InvalidManifest(f"the import manifest lists {len(parts)} parts; at most {MAX_PARTS} are read")
    out: list[tuple[int, int, str]] = []
    try:
        size = int(size_text)
        for part in sorted(parts, key=lambda p: int(p.get("index", "-1"))):
            byte_range, url = part.find("byte-range"), (part.findtext("get-url") or "").strip()
            if byte_range is None or not url:
                raise InvalidManifest(f"part {part.get('index')} of the import manifest has no byte-range or get-url")
            out.append((int(byte_range.get("start", "")), int(byte_range.get("end", "")), url))
    except ValueError:
        raise InvalidManifest("the import manifest has a size, index or byte range that is not a number") from None
    expected = 0
    for start, end, _ in out:
        if start != expected or end < start:
            raise InvalidManifest(f"the parts of the import manifest do not cover the image in order (a part "
                                  f"starts at {start}, expected {expected})")
        expected = end + 1
    if expected != size:
        raise InvalidManifest(f"the parts of the import manifest cover {expected} bytes, the manifest says {size}")
    return size, out


async def open_disk(context: TaskContext, plan: imports.Plan, location: str) -> Source:
    """The disk image at ``location``: the parts a manifest there lists, joined, or the object itself."""
    config = context.service.config.s3_config()
    imports.check_role(context, location)
    source = await open_source(location, config)
    plan.sources.append(source)
    if not is_manifest(await source.read_at(0, min(64, source.size))):
        return source
    if source.size > MAX_MANIFEST:
        raise InvalidManifest(f"the import manifest is {source.size} bytes; at most {MAX_MANIFEST} are read")
    size, parts = manifest_parts(await source.read_exact(0, source.size, "import manifest"))
    opened: list[Source] = []
    for number, (start, end, url) in enumerate(parts):
        context.check()
        imports.check_role(context, url)
        part = await open_source(url, config)
        plan.sources.append(part)
        if part.size != end - start + 1:
            raise InvalidManifest(f"part {number} of the import manifest holds {part.size} bytes, its byte range "
                                  f"{end - start + 1}")
        opened.append(part)
    joined = ConcatSource(opened, f"{source.name} ({len(parts)} parts)")
    assert joined.size == size
    return joined


async def plan_disks(context: TaskContext) -> imports.Plan:
    """Open and check each disk image (validating); refusals fail the task with ClientError."""
    plan = imports.Plan()
    async with plan.validating():
        for number, container in enumerate(context.task.params["DiskContainers"]):
            context.check()
            source = await open_disk(context, plan, container["Url"])
            declared = container["Format"].lower()
            cls = reader_class("raw") if declared == "raw" else await detect(source)
            if cls is OvaReader or cls.format != declared:
                raise UnsupportedImage(f"Unsupported specified file format: {container['Format']} was given but "
                                       f"the content of {source.name} is {cls.format.upper()}",
                                       reason="format.mismatch")
            reader = await cls.open(source, context.service.workers)
            plan.disks.append(imports.PlannedDisk(len(plan.disks), number, cls.format.upper(), source.size,
                                                  reader.virtual_size, reader))
    return plan


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
    plan = await plan_disks(context)
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
