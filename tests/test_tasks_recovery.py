"""Durability: the catalog across restarts, interrupted tasks resumed or ended, idempotency, the schema."""
# ruff: noqa: F811  (the server fixtures are imported from tests.s3server)

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from tests.daemon import HeldServer, make_raw, make_vmdk, service_config, upload
from tests.helpers import MiB
from tests.s3server import S3Server, aws_files, moto, moto_server  # noqa: F401  (fixtures)
from tests.test_tasks import container, finished, new_task
from vmied.errors import StorageError
from vmied.tasks import ids
from vmied.tasks.db import (
    ACTIVE,
    COMPLETED,
    DELETED,
    DELETING,
    SCHEMA_VERSION,
    BlockDevice,
    Catalog,
    ImageRecord,
    SnapshotRecord,
    Tag,
    Task,
    TokenMismatch,
)
from vmied.tasks.engine import MAX_RESTARTS
from vmied.tasks.imports import IMPORT_IMAGE, IMPORT_SNAPSHOT
from vmied.tasks.service import Service


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("disks")
    small = make_raw(root / "small.raw", 2 * MiB, 3)
    large = make_raw(root / "large.raw", 24 * MiB, 4)
    return {"small": small, "large": large, "small.vmdk": make_vmdk(small, root / "small.vmdk"),
            "large.vmdk": make_vmdk(large, root / "large.vmdk")}


# --- the catalog alone ----------------------------------------------------------------------------------

async def test_client_token_returns_the_first_task_and_refuses_other_parameters(tmp_path: Path) -> None:
    catalog = await Catalog.open(str(tmp_path / "db.sqlite"))
    try:
        first = Task("import-snap-0123456789abcdef0", IMPORT_SNAPSHOT, params={"a": 1}, client_token="t",
                     access_key="K1")
        assert await catalog.create_task(first) == (first, True)
        again, created = await catalog.create_task(
            Task("import-snap-0123456789abcdef1", IMPORT_SNAPSHOT, params={"a": 1}, client_token="t", access_key="K1"))
        assert not created and again.id == first.id
        with pytest.raises(TokenMismatch):
            await catalog.create_task(Task("import-snap-0123456789abcdef2", IMPORT_SNAPSHOT, params={"a": 2},
                                           client_token="t", access_key="K1"))
        # the same token from another access key is another request
        other, created = await catalog.create_task(
            Task("import-snap-0123456789abcdef3", IMPORT_SNAPSHOT, params={"a": 2}, client_token="t", access_key="K2"))
        assert created and other.id.endswith("3")
        assert len(await catalog.list_tasks([IMPORT_SNAPSHOT])) == 2
    finally:
        await catalog.close()


async def test_catalog_survives_reopening_and_keeps_snapshots_in_use(tmp_path: Path) -> None:
    path = str(tmp_path / "db.sqlite")
    catalog = await Catalog.open(path)
    snapshot = SnapshotRecord("snap-0123456789abcdef0", 5 * MiB, "123456789012", "d")
    image = ImageRecord("ami-0123456789abcdef0", "import-ami-0123456789abcdef0", "123456789012", "x86_64",
                        "/dev/sda1", [BlockDevice("/dev/sda1", snapshot.id, 5 * MiB)])
    await catalog.put_snapshot(snapshot)
    await catalog.put_image(image)
    assert await catalog.set_tags([Tag(image.id, "image", "k", "v")]) is None
    await catalog.close()
    catalog = await Catalog.open(path)
    try:
        assert await catalog.get_image(image.id) == image
        assert await catalog.delete_snapshot(snapshot.id) == [image.id]  # in use: kept
        assert await catalog.get_snapshot(snapshot.id) == snapshot
        assert await catalog.set_tags([Tag(image.id, "image", f"k{n}", "") for n in range(50)]) == image.id
        assert len((await catalog.tags_of([image.id]))[image.id]) == 1  # refused as a whole
        assert await catalog.delete_image(image.id)
        assert await catalog.tags_of([image.id]) == {image.id: []}
        assert await catalog.delete_snapshot(snapshot.id) == []
        assert await catalog.get_snapshot(snapshot.id) is None
    finally:
        await catalog.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_a_database_from_a_newer_vmied_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(StorageError, match="newer than this vmied"):
        await Catalog.open(str(path))


async def test_finished_tasks_leave_the_listing_after_the_retention(tmp_path: Path) -> None:
    catalog = await Catalog.open(str(tmp_path / "db.sqlite"))
    try:
        old = Task(ids.new_id(ids.IMPORT_IMAGE_TASK), IMPORT_IMAGE, state=COMPLETED, finished=time.time() - 8 * 86400)
        fresh = Task(ids.new_id(ids.IMPORT_IMAGE_TASK), IMPORT_IMAGE, state=ACTIVE)
        for task in (old, fresh):
            await catalog.create_task(task)
        recent = await catalog.list_tasks([IMPORT_IMAGE], finished_after=time.time() - 7 * 86400)
        assert [task.id for task in recent] == [fresh.id]
        assert [task.id for task in await catalog.list_tasks([IMPORT_IMAGE], ids=[old.id])] == [old.id]
        await catalog.set_tags([Tag(old.id, "import-image-task", "k", "v")])
        assert await catalog.purge_tasks(time.time() - 7 * 86400) == 1
        assert [task.id for task in await catalog.list_tasks([IMPORT_IMAGE])] == [fresh.id]
        assert await catalog.list_tags() == []
    finally:
        await catalog.close()


# --- restarts -------------------------------------------------------------------------------------------

async def interrupted_after_first_disk(tmp_path: Path, moto: S3Server, held: HeldServer) -> tuple[Task, str]:
    """Start an import of two disks, stop the service once the first is committed and the second is being
    read (its data held); the task and the first disk's snapshot."""
    service = await Service.start(service_config(tmp_path, moto))
    accepted, _ = await service.submit(new_task(IMPORT_IMAGE, [container("small.vmdk"), {"Url": held.url}]))
    task = service.engine.live(accepted.id)  # the running task's own record
    assert task is not None
    deadline = time.monotonic() + 30
    while not (task.checkpoint.get("snapshots") and held.held):
        assert time.monotonic() < deadline and task.state == ACTIVE, task
        await asyncio.sleep(0.01)
    await service.stop(0)  # no grace: the second disk is cut off mid-write
    first = task.checkpoint["snapshots"]["0"]["id"]
    return task, first


async def test_an_interrupted_import_resumes_from_its_checkpoint(tmp_path: Path, moto: S3Server,
                                                                 disks: dict[str, Path]) -> None:
    upload(moto, disks["small.vmdk"], "small.vmdk")
    held = HeldServer(disks["large.vmdk"], hold_above=64 * 1024)
    try:
        task, first = await interrupted_after_first_disk(tmp_path, moto, held)
        held.release()
        service = await Service.start(service_config(tmp_path, moto))
        try:
            done = await finished(service, task.id)
            assert done.state == COMPLETED, done.status_message
            assert done.restarts == 1
            image = await service.catalog.get_image(done.result["image_id"])
            assert image is not None
            assert image.devices[0].snapshot_id == first  # the committed disk was not written again
            second = await service.store.read(image.devices[1].snapshot_id, 0, 24 * MiB)
            assert second == disks["large"].read_bytes()
            assert sorted(await service.store.snapshots()) == sorted(d.snapshot_id for d in image.devices)
        finally:
            await service.stop(5)
    finally:
        held.close()


async def test_a_task_interrupted_too_often_ends_deleted_with_the_reason(tmp_path: Path, moto: S3Server,
                                                                        disks: dict[str, Path]) -> None:
    upload(moto, disks["small.vmdk"], "small.vmdk")
    held = HeldServer(disks["large.vmdk"], hold_above=64 * 1024)
    try:
        task, _ = await interrupted_after_first_disk(tmp_path, moto, held)
    finally:
        held.close()
    catalog = await Catalog.open(service_config(tmp_path, moto).state.database)
    stored = await catalog.get_task(task.id)
    assert stored is not None and stored.state == ACTIVE
    stored.restarts = MAX_RESTARTS - 1
    await catalog.save_task(stored)
    await catalog.close()
    service = await Service.start(service_config(tmp_path, moto))
    try:
        ended = await service.get_task(task.id)
        assert ended is not None and ended.state == DELETED
        assert "interrupted by 3 restarts" in ended.status_message
        assert await service.catalog.list_snapshots() == []
        assert await service.store.snapshots() == []
    finally:
        await service.stop(5)


async def test_a_task_being_cancelled_at_the_crash_ends_deleted(tmp_path: Path, moto: S3Server,
                                                                disks: dict[str, Path]) -> None:
    config = service_config(tmp_path, moto)
    catalog = await Catalog.open(config.state.database)
    task = new_task(IMPORT_SNAPSHOT, [container("small.vmdk")])
    task.state, task.status_message = DELETING, "wrong disk"
    await catalog.create_task(task)
    await catalog.close()
    service = await Service.start(config)
    try:
        ended = await service.get_task(task.id)
        assert ended is not None and (ended.state, ended.status_message) == (DELETED, "wrong disk")
    finally:
        await service.stop(5)


async def test_a_task_still_queued_at_the_stop_runs_after_the_start(tmp_path: Path, moto: S3Server,
                                                                    disks: dict[str, Path]) -> None:
    upload(moto, disks["small.vmdk"], "small.vmdk")
    config = service_config(tmp_path, moto)
    catalog = await Catalog.open(config.state.database)
    task = new_task(IMPORT_SNAPSHOT, [container("small.vmdk")])
    task.status_message, task.phase, task.progress = "pending", "pending", 3
    task.restarts = MAX_RESTARTS  # queued tasks were never interrupted: the count does not apply
    await catalog.create_task(task)
    await catalog.close()
    service = await Service.start(config)
    try:
        done = await finished(service, task.id)
        assert done.state == COMPLETED, done.status_message
        assert await service.store.read(done.result["snapshot_id"], 0, 2 * MiB) == disks["small"].read_bytes()
    finally:
        await service.stop(5)


async def test_one_service_per_state_directory(tmp_path: Path, moto: S3Server) -> None:
    from vmied.errors import UsageError

    config = service_config(tmp_path, moto)
    service = await Service.start(config)
    try:
        with pytest.raises(UsageError, match="another vmied is running on this state"):
            await Service.start(config)
    finally:
        await service.stop(5)
    again = await Service.start(config)  # the lock went with the first service
    await again.stop(5)
