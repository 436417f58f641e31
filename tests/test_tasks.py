"""The import engine in the test's process: real store, real SQLite catalog, sources on a real S3 server."""
# ruff: noqa: F811  (the server fixtures are imported from tests.s3server)

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import HeldServer, corrupt_vmdk, make_ova, make_raw, make_vhd, make_vmdk, service_config, upload
from tests.helpers import MiB
from tests.s3server import BUCKET, S3Server, aws_files, moto, moto_server  # noqa: F401  (fixtures)
from vmied.tasks import ids
from vmied.tasks.db import ACTIVE, COMPLETED, DELETED, Task
from vmied.tasks.imports import IMPORT_IMAGE, IMPORT_SNAPSHOT, snapshot_description, url_origin
from vmied.tasks.service import Service

DISK = 6 * MiB


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("images")
    raw1 = make_raw(root / "one.raw", DISK, 1)
    raw2 = make_raw(root / "two.raw", 3 * MiB, 2)
    vmdk1 = make_vmdk(raw1, root / "one.vmdk")
    return {"raw1": raw1, "raw2": raw2, "vmdk1": vmdk1, "vmdk2": make_vmdk(raw2, root / "two.vmdk"),
            "vhd2": make_vhd(raw2, root / "two.vhd"), "ova": make_ova([raw1, raw2], root / "vm.ova"),
            "corrupt": corrupt_vmdk(vmdk1, root / "corrupt.vmdk")}


def container(key: str, fmt: str | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"Description": key, "UserBucket": {"S3Bucket": BUCKET, "S3Key": key}, **extra}
    if fmt:
        out["Format"] = fmt
    return out


def new_task(kind: str, containers: list[dict[str, Any]], **params: Any) -> Task:
    prefix = ids.IMPORT_IMAGE_TASK if kind == IMPORT_IMAGE else ids.IMPORT_SNAPSHOT_TASK
    return Task(ids.new_id(prefix), kind, params={"DiskContainers": containers, **params}, access_key="AKIDTEST",
                account_id="123456789012")


async def finished(service: Service, task_id: str, timeout: float = 60.0) -> Task:
    deadline = time.monotonic() + timeout
    while True:
        task = await service.get_task(task_id)
        assert task is not None
        if task.state in (COMPLETED, DELETED):
            return task
        assert time.monotonic() < deadline, f"task did not end: {task}"
        await asyncio.sleep(0.05)


async def test_import_snapshot_stores_the_disk(tmp_path: Path, moto: S3Server, images: dict[str, Path]) -> None:
    upload(moto, images["vmdk1"], "disks/one.vmdk")
    service = await Service.start(service_config(tmp_path, moto))
    try:
        task, created = await service.submit(new_task(IMPORT_SNAPSHOT, [container("disks/one.vmdk", "VMDK")]))
        assert created and task.state == ACTIVE and task.status_message == "pending" and task.progress == 3
        done = await finished(service, task.id)
        assert done.state == COMPLETED, done.status_message
        assert done.status_message == "" and done.progress is None
        snapshot_id = done.result["snapshot_id"]
        record = await service.catalog.get_snapshot(snapshot_id)
        assert record is not None and record.description == snapshot_description(task.id)
        assert record.virtual_size == DISK and record.task_id == task.id
        assert await service.store.read(snapshot_id, 0, DISK) == images["raw1"].read_bytes()
        assert done.result["disks"][0]["format"] == "VMDK"
        assert done.result["disks"][0]["disk_image_size"] == float(images["vmdk1"].stat().st_size)
        converting = done.phase_bytes["downloading/converting"]
        assert converting["position"] == DISK and converting["virtual"] == DISK and converting["read"] > 0
        assert converting["written"] == record.stored_bytes
        assert 0 < done.phase_bytes["validating"]["read"] < images["vmdk1"].stat().st_size  # metadata only
        assert done.phase_bytes["validating"]["virtual"] == DISK
    finally:
        await service.stop(5)


async def test_import_image_of_two_disks_registers_an_image(tmp_path: Path, moto: S3Server,
                                                            images: dict[str, Path]) -> None:
    upload(moto, images["vmdk1"], "disks/one.vmdk")
    upload(moto, images["vhd2"], "disks/two.vhd")
    service = await Service.start(service_config(tmp_path, moto))
    try:
        task, _ = await service.submit(new_task(IMPORT_IMAGE, [container("disks/one.vmdk", "vmdk"),
                                                               container("disks/two.vhd")]))
        done = await finished(service, task.id)
        assert done.state == COMPLETED, done.status_message
        image = await service.catalog.get_image(done.result["image_id"])
        assert image is not None and image.name == task.id
        assert [d.device_name for d in image.devices] == ["/dev/sda1", "/dev/sdb"]
        assert [d.virtual_size for d in image.devices] == [DISK, 3 * MiB]
        assert (image.architecture, image.boot_mode, image.license_type, image.usage_operation) == (
            "x86_64", "legacy-bios", "BYOL", "RunInstances")
        second = image.devices[1].snapshot_id
        assert await service.store.read(second, 0, 3 * MiB) == images["raw2"].read_bytes()
        assert [d["format"] for d in done.result["disks"]] == ["VMDK", "VHD"]
        assert await service.catalog.images_using(second) == [image.id]
    finally:
        await service.stop(5)


async def test_import_image_of_an_ova_imports_every_disk(tmp_path: Path, moto: S3Server,
                                                         images: dict[str, Path]) -> None:
    upload(moto, images["ova"], "vms/vm.ova")
    service = await Service.start(service_config(tmp_path, moto))
    try:
        task, _ = await service.submit(new_task(IMPORT_IMAGE, [container("vms/vm.ova", "ova")],
                                                Platform="Linux", BootMode="uefi"))
        done = await finished(service, task.id)
        assert done.state == COMPLETED, done.status_message
        image = await service.catalog.get_image(done.result["image_id"])
        assert image is not None and image.boot_mode == "uefi"
        assert len(image.devices) == 2
        for device, raw in zip(image.devices, (images["raw1"], images["raw2"]), strict=True):
            assert await service.store.read(device.snapshot_id, 0, raw.stat().st_size) == raw.read_bytes()
    finally:
        await service.stop(5)


@pytest.mark.parametrize(("key", "fmt", "expected"), [
    ("bad.vmdk", "VMDK", "ClientError: "),
    ("two.vmdk", "VHD", "ClientError: Disk validation failed [Unsupported specified file format"),
    ("missing.vmdk", None, "ClientError: Disk validation failed ["),
])
async def test_bad_input_ends_deleted_with_a_client_error(tmp_path: Path, moto: S3Server, images: dict[str, Path],
                                                          key: str, fmt: str | None, expected: str) -> None:
    upload(moto, images["corrupt"], "bad.vmdk")
    upload(moto, images["vmdk2"], "two.vmdk")
    service = await Service.start(service_config(tmp_path, moto))
    try:
        task, _ = await service.submit(new_task(IMPORT_SNAPSHOT, [container(key, fmt)]))
        done = await finished(service, task.id)
        assert done.state == DELETED
        assert done.status_message.startswith(expected), done.status_message
        assert await service.catalog.list_snapshots() == []
        assert await service.store.snapshots() == []
    finally:
        await service.stop(5)


async def test_a_url_origin_outside_the_role_is_refused_before_any_request(
        tmp_path: Path, moto: S3Server, images: dict[str, Path]) -> None:
    """read_urls keeps URL sources (a fetch the caller chooses) to the origins the operator allows."""
    held = HeldServer(images["vmdk2"])
    held.release()
    service = await Service.start(service_config(tmp_path, moto, read_urls=["https://*", "http://localhost:*"]))
    try:
        task, _ = await service.submit(new_task(IMPORT_SNAPSHOT, [{"Url": held.url}]))
        done = await finished(service, task.id)
        assert done.state == DELETED
        origin = url_origin(held.url)
        assert origin.startswith("http://127.0.0.1:")
        assert done.status_message == (
            "ClientError: The service role vmimport provided does not exist or does not have sufficient "
            f"permissions (URL origin {origin} is not among the role's read_urls)")
        assert held.requests == 0
    finally:
        held.close()
        await service.stop(5)


def test_url_origins_spell_out_the_port_and_lower_the_host() -> None:
    assert url_origin("https://Example.COM/disk.vmdk?x=1") == "https://example.com:443"
    assert url_origin("http://user:secret@10.0.0.5:8080/a") == "http://10.0.0.5:8080"
    assert url_origin("http://[::1]/a") == "http://[::1]:80"


async def test_a_bucket_outside_the_role_is_refused(tmp_path: Path, moto: S3Server, images: dict[str, Path]) -> None:
    upload(moto, images["vmdk2"], "two.vmdk")
    service = await Service.start(service_config(tmp_path, moto, read_buckets=["other-*"]))
    try:
        task, _ = await service.submit(new_task(IMPORT_IMAGE, [container("two.vmdk")]))
        done = await finished(service, task.id)
        assert done.state == DELETED
        assert done.status_message.startswith("ClientError: The service role vmimport provided does not exist or "
                                              "does not have sufficient permissions")
        assert BUCKET in done.status_message
    finally:
        await service.stop(5)


async def test_too_many_disks_in_an_ova(tmp_path: Path, moto: S3Server, images: dict[str, Path]) -> None:
    upload(moto, images["ova"], "vms/vm.ova")
    service = await Service.start(service_config(tmp_path, moto, disks_per_image=1))
    try:
        task, _ = await service.submit(new_task(IMPORT_IMAGE, [container("vms/vm.ova")]))
        done = await finished(service, task.id)
        assert done.state == DELETED and "at most 1" in done.status_message
    finally:
        await service.stop(5)


async def wait_for(condition: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_cancel_a_running_import_leaves_nothing(tmp_path: Path, moto: S3Server, images: dict[str, Path]) -> None:
    upload(moto, images["vmdk2"], "two.vmdk")
    held = HeldServer(images["vmdk1"], hold_above=64 * 1024)  # the second disk's data waits
    service = await Service.start(service_config(tmp_path, moto))
    try:
        task, _ = await service.submit(new_task(IMPORT_IMAGE, [container("two.vmdk"), {"Url": held.url}]))
        live = service.engine.live(task.id)
        assert live is not None
        await wait_for(lambda: bool(live.checkpoint.get("snapshots")) and held.held > 0,
                       "the first disk to be committed and the second to be read")
        assert len(await service.catalog.list_snapshots()) == 1
        assert await service.cancel(live, "wrong disk") == ACTIVE
        held.release()
        done = await finished(service, task.id)
        assert (done.state, done.status_message) == (DELETED, "wrong disk")
        assert await service.catalog.list_snapshots() == []
        assert await service.store.snapshots() == []
    finally:
        held.close()
        await service.stop(5)


async def test_runners_are_bounded_by_the_import_limit(tmp_path: Path, moto: S3Server,
                                                       images: dict[str, Path]) -> None:
    held = HeldServer(images["vmdk2"])
    service = await Service.start(service_config(tmp_path, moto, import_tasks=1))
    try:
        first, _ = await service.submit(new_task(IMPORT_SNAPSHOT, [{"Url": held.url}]))
        second, _ = await service.submit(new_task(IMPORT_SNAPSHOT, [{"Url": held.url}]))
        third, _ = await service.submit(new_task(IMPORT_SNAPSHOT, [{"Url": held.url}]))
        assert list(service.engine.running) == [first.id]
        assert service.engine.status()["import"] == {"running": 1, "queued": 2, "limit": 1}
        queued = await service.get_task(second.id)
        assert queued is not None and (queued.status_message, queued.progress) == ("pending", 3)
        # a queued task cancelled before it ran ends at once
        await service.cancel(third, "")
        gone = await service.get_task(third.id)
        assert gone is not None and (gone.state, gone.status_message) == (DELETED, "User cancelled")
        held.release()
        assert (await finished(service, first.id)).state == COMPLETED
        assert (await finished(service, second.id)).state == COMPLETED
    finally:
        held.close()
        await service.stop(5)


async def test_reload_raises_the_limit(tmp_path: Path, moto: S3Server, images: dict[str, Path]) -> None:
    held = HeldServer(images["vmdk2"])
    service = await Service.start(service_config(tmp_path, moto, import_tasks=1))
    try:
        tasks = [(await service.submit(new_task(IMPORT_SNAPSHOT, [{"Url": held.url}])))[0] for _ in range(3)]
        assert len(service.engine.running) == 1
        await service.reload(service_config(tmp_path, moto, import_tasks=3))
        assert len(service.engine.running) == 3
        held.release()
        for task in tasks:
            assert (await finished(service, task.id)).state == COMPLETED
    finally:
        held.close()
        await service.stop(5)


async def test_image_from_a_stored_snapshot_and_an_s3_url(tmp_path: Path, moto: S3Server,
                                                          images: dict[str, Path]) -> None:
    upload(moto, images["vmdk2"], "disks/two.vmdk")
    service = await Service.start(service_config(tmp_path, moto))
    try:
        first, _ = await service.submit(new_task(IMPORT_SNAPSHOT, [{"Url": f"s3://{BUCKET}/disks/two.vmdk"}]))
        snapshot_id = (await finished(service, first.id)).result["snapshot_id"]
        task, _ = await service.submit(new_task(IMPORT_IMAGE, [{"SnapshotId": snapshot_id, "DeviceName": "/dev/xvda"}],
                                                Platform="Windows"))
        done = await finished(service, task.id)
        assert done.state == COMPLETED, done.status_message
        image = await service.catalog.get_image(done.result["image_id"])
        assert image is not None and image.devices[0].device_name == "/dev/xvda"
        assert (image.platform, image.license_type, image.usage_operation) == ("Windows", "AWS", "RunInstances:0002")
        copy = image.devices[0].snapshot_id
        assert copy != snapshot_id  # an image import makes its own snapshot
        assert await service.store.read(copy, 0, 3 * MiB) == images["raw2"].read_bytes()
    finally:
        await service.stop(5)


async def test_status_summary_and_task_gauge(tmp_path: Path, moto: S3Server, images: dict[str, Path]) -> None:
    from vmied import metrics

    upload(moto, images["corrupt"], "bad.vmdk")
    service = await Service.start(service_config(tmp_path, moto))
    try:
        task, _ = await service.submit(new_task(IMPORT_SNAPSHOT, [container("bad.vmdk")]))
        await finished(service, task.id)
        summary = await service.status_summary()
        assert summary["running"] == []
        assert [f["task_id"] for f in summary["failed"]] == [task.id]
        assert summary["failed"][0]["status_message"].startswith("ClientError: ")
        await asyncio.sleep(0.1)  # the gauge is refreshed from the catalog after the transition
        assert metrics.TASKS.labels(IMPORT_SNAPSHOT, DELETED)._value.get() == 1
        assert metrics.TASKS.labels(IMPORT_SNAPSHOT, ACTIVE)._value.get() == 0
    finally:
        await service.stop(5)


async def test_cancel_during_validation_ends_with_the_reason(tmp_path: Path, moto: S3Server,
                                                             images: dict[str, Path]) -> None:
    upload(moto, images["vmdk2"], "two.vmdk")
    held = HeldServer(images["vmdk2"])
    service = await Service.start(service_config(tmp_path, moto))
    try:
        task, _ = await service.submit(new_task(IMPORT_IMAGE, [{"Url": held.url}, container("two.vmdk")]))
        deadline = time.monotonic() + 30
        while held.held == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        live = await service.get_task(task.id)
        assert live is not None and live.status_message == "validating"
        await service.cancel(live, "changed my mind")
        held.release()
        done = await finished(service, task.id)
        assert (done.state, done.status_message) == (DELETED, "changed my mind")
    finally:
        held.close()
        await service.stop(5)
