"""SIGKILL of the daemon during an import, then a restart on the same state: the task resumes from its
checkpoint or ends ``deleted`` with the reason; nothing stays ``active``; nothing committed is lost."""
# ruff: noqa: F811  (the server fixtures are imported from tests.s3server)

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import DaemonProcess, HeldServer, make_raw, make_vmdk, upload, wait_for_task
from tests.helpers import MiB
from tests.s3server import BUCKET, S3Server, aws_files, moto, moto_server  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def vmdks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("restart-disks")
    return {"small": make_vmdk(make_raw(root / "small.raw", 2 * MiB, 21), root / "small.vmdk"),
            "large": make_vmdk(make_raw(root / "large.raw", 16 * MiB, 22), root / "large.vmdk")}


def wait_until(condition: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def stored_snapshots(daemon: DaemonProcess) -> set[str]:
    """Snapshots with a manifest in the daemon's local store (what survived and was not collected)."""
    store = daemon.state / "store"
    return {entry.name for entry in store.iterdir() if (entry / "manifest").exists()} if store.exists() else set()


def active_tasks(ec2: Any) -> list[str]:
    active = [{"Name": "task-state", "Values": ["active", "deleting"]}]
    return ([t["ImportTaskId"] for t in ec2.describe_import_image_tasks(Filters=active)["ImportImageTasks"]]
            + [t["ImportTaskId"] for t in ec2.describe_import_snapshot_tasks(Filters=active)["ImportSnapshotTasks"]])


def test_sigkill_mid_import_resumes_from_the_checkpoint(tmp_path: Path, moto: S3Server,
                                                        vmdks: dict[str, Path]) -> None:
    upload(moto, vmdks["small"], "disks/boot.vmdk")
    held = HeldServer(vmdks["large"], hold_above=64 * 1024)  # metadata passes, the disk's data waits
    daemon = DaemonProcess(tmp_path, moto)
    daemon.start()
    try:
        ec2 = daemon.client()
        task_id = ec2.import_image(DiskContainers=[
            {"Format": "VMDK", "UserBucket": {"S3Bucket": BUCKET, "S3Key": "disks/boot.vmdk"}},
            {"Format": "VMDK", "Url": held.url}])["ImportTaskId"]

        def first_disk_committed() -> bool:
            task = ec2.describe_import_image_tasks(ImportTaskIds=[task_id])["ImportImageTasks"][0]
            details = task["SnapshotDetails"]
            return len(details) == 2 and details[0].get("Status") == "completed" and held.held > 0

        wait_until(first_disk_committed, "the boot disk to be committed and the second disk to be read")
        before = ec2.describe_import_image_tasks(ImportTaskIds=[task_id])["ImportImageTasks"][0]
        boot_snapshot = before["SnapshotDetails"][0]["SnapshotId"]
        assert before["StatusMessage"] == "converting"
        daemon.kill()

        daemon.start()
        ec2 = daemon.client()
        resumed = ec2.describe_import_image_tasks(ImportTaskIds=[task_id])["ImportImageTasks"][0]
        assert resumed["Status"] == "active"
        held.release()
        done = wait_for_task(ec2, task_id)
        assert done["Status"] == "completed", done
        assert done["SnapshotDetails"][0]["SnapshotId"] == boot_snapshot  # committed before the kill: kept
        image = ec2.describe_images(ImageIds=[done["ImageId"]])["Images"][0]
        snapshots = [m["Ebs"]["SnapshotId"] for m in image["BlockDeviceMappings"]]
        assert snapshots[0] == boot_snapshot and len(snapshots) == 2
        assert stored_snapshots(daemon) == set(snapshots)  # the write cut by the kill was collected
        assert active_tasks(ec2) == []
        daemon.stop()
    finally:
        daemon.kill()
        held.close()


def test_sigkill_then_a_source_gone_ends_deleted_with_the_reason(tmp_path: Path, moto: S3Server,
                                                                 vmdks: dict[str, Path]) -> None:
    held = HeldServer(vmdks["small"])  # even the first read waits: the task is validating
    daemon = DaemonProcess(tmp_path, moto)
    daemon.start()
    try:
        ec2 = daemon.client()
        task_id = ec2.import_snapshot(DiskContainer={"Format": "VMDK", "Url": held.url})["ImportTaskId"]
        wait_until(lambda: held.held > 0, "the task to read its source")
        daemon.kill()
        held.close()  # the source is gone when the daemon comes back
        daemon.start()
        ec2 = daemon.client()
        ended = wait_for_task(ec2, task_id, timeout=120)["SnapshotTaskDetail"]
        assert ended["Status"] == "deleted"
        assert ended["StatusMessage"].startswith("ClientError: Disk validation failed ["), ended
        assert active_tasks(ec2) == [] and stored_snapshots(daemon) == set()
        daemon.stop()
    finally:
        daemon.kill()
        held.close()
