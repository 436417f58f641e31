"""Import through the real daemon process with real clients: the AWS CLI (the guide's commands verbatim
plus --endpoint-url) and boto3 with its waiters; sources on a real S3 server (moto) on 127.0.0.1."""
# ruff: noqa: F811  (the server fixtures are imported from tests.s3server)

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

from tests.daemon import (
    DaemonProcess,
    HeldServer,
    aws,
    aws_json,
    corrupt_vmdk,
    make_ova,
    make_raw,
    make_vmdk,
    upload,
    wait_for_task,
)
from tests.helpers import MiB
from tests.s3server import BUCKET, S3Server, aws_files, moto_server  # noqa: F401  (fixtures)

OTHER_BUCKET = "not-for-vmimport"
#: A second access key of another account: it must see none of the first account's resources.
OTHER_KEY, OTHER_SECRET, OTHER_ACCOUNT = "AKIDOTHERACCOUNT0001", "other-account-secret-0123456789", "210987654321"


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory, moto_server: S3Server) -> dict[str, Path]:
    """The test images, uploaded to the S3 server under the keys the guide's examples use."""
    root = tmp_path_factory.mktemp("api-disks")
    raw1, raw2 = make_raw(root / "one.raw", 4 * MiB, 11), make_raw(root / "two.raw", 2 * MiB, 12)
    vmdk1, vmdk2 = make_vmdk(raw1, root / "one.vmdk"), make_vmdk(raw2, root / "two.vmdk")
    big = make_vmdk(make_raw(root / "big.raw", 32 * MiB, 13), root / "big.vmdk")
    files = {"vms/my-server-vm.ova": make_ova([raw1, raw2], root / "vm.ova"),
             "disks/my-server-vm-disk1.vmdk": vmdk1, "disks/my-server-vm-disk2.vmdk": vmdk2,
             "vms/my-server-vm.vmdk": vmdk2, "vms/big.vmdk": big,
             "vms/corrupt.vmdk": corrupt_vmdk(vmdk1, root / "corrupt.vmdk")}
    for key, path in files.items():
        upload(moto_server, path, key)
    moto_server.client().create_bucket(Bucket=OTHER_BUCKET)
    upload(moto_server, vmdk2, "vms/my-server-vm.vmdk", bucket=OTHER_BUCKET)
    return {"raw1": raw1, "raw2": raw2, **files}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, moto_server: S3Server,
           disks: dict[str, Path]) -> Iterator[DaemonProcess]:
    other = (f'\n[[credentials]]\naccess_key_id = "{OTHER_KEY}"\nsecret_access_key = "{OTHER_SECRET}"\n'
             f'account_id = "{OTHER_ACCOUNT}"\n')
    process = DaemonProcess(tmp_path_factory.mktemp("daemon"), moto_server, import_tasks=2, extra=other)
    process.start()
    yield process
    process.stop()


@pytest.fixture
def ec2(daemon: DaemonProcess) -> Any:
    return daemon.client()


# --- the guide's commands through the AWS CLI ------------------------------------------------------------

def test_cli_import_image_of_an_ova_then_inspect_and_clean_up(daemon: DaemonProcess, tmp_path: Path,
                                                              disks: dict[str, Path], ec2: Any) -> None:
    (tmp_path / "containers.json").write_text(json.dumps([
        {"Description": "My Server OVA", "Format": "ova",
         "UserBucket": {"S3Bucket": BUCKET, "S3Key": "vms/my-server-vm.ova"}}], indent=2))
    task = aws_json(daemon, tmp_path, "import-image", "--description", "My server VM",
                    "--disk-containers", "file://containers.json")
    assert task["ImportTaskId"].startswith("import-ami-") and len(task["ImportTaskId"]) == len("import-ami-") + 17
    assert (task["Status"], task["StatusMessage"], task["Progress"]) == ("active", "pending", "2")
    assert task["Description"] == "My server VM"
    assert task["SnapshotDetails"] == [{"Description": "My Server OVA", "DiskImageSize": 0.0, "Format": "ova",
                                        "UserBucket": {"S3Bucket": BUCKET, "S3Key": "vms/my-server-vm.ova"}}]
    task_id = task["ImportTaskId"]
    wait_for_task(ec2, task_id)
    described = aws_json(daemon, tmp_path, "describe-import-image-tasks", "--import-task-ids", task_id)
    done = described["ImportImageTasks"][0]
    assert done["Status"] == "completed" and "Progress" not in done and "StatusMessage" not in done
    details = done["SnapshotDetails"]
    assert [d["DeviceName"] for d in details] == ["/dev/sda1", "/dev/sdb"]
    assert {d["Status"] for d in details} == {"completed"} and all(d["Format"] == "VMDK" for d in details)
    text = aws(daemon, tmp_path, "describe-import-image-tasks", "--import-task-ids", task_id,
               "--query", "ImportImageTasks[0].[Status,ImageId]", "--output", "text").stdout.split()
    assert text == ["completed", done["ImageId"]]

    image = aws_json(daemon, tmp_path, "describe-images", "--image-ids", done["ImageId"])["Images"][0]
    assert image["Name"] == task_id and image["State"] == "available"
    assert image["RootDeviceName"] == "/dev/sda1" and image["Architecture"] == "x86_64"
    assert image["ImageLocation"] == f"123456789012/{task_id}"
    assert [m["Ebs"]["SnapshotId"] for m in image["BlockDeviceMappings"]] == [d["SnapshotId"] for d in details]
    assert image["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] == 1

    found = aws_json(daemon, tmp_path, "describe-snapshots", "--owner-ids", "self", "--filters",
                     f"Name=description,Values=Created by AWS-VMImport service for {task_id}")["Snapshots"]
    assert sorted(s["SnapshotId"] for s in found) == sorted(d["SnapshotId"] for d in details)
    assert all(s["State"] == "completed" and s["Progress"] == "100%" for s in found)

    boot = details[0]["SnapshotId"]
    refused = aws(daemon, tmp_path, "delete-snapshot", "--snapshot-id", boot, check=False)
    assert refused.returncode == 255
    assert (f"An error occurred (InvalidSnapshot.InUse) when calling the DeleteSnapshot operation: "
            f"The snapshot {boot} is currently in use by {done['ImageId']}") in refused.stderr
    assert aws_json(daemon, tmp_path, "deregister-image", "--image-id", done["ImageId"]) == {"Return": True}
    assert aws(daemon, tmp_path, "delete-snapshot", "--snapshot-id", boot).stdout == ""
    gone = aws(daemon, tmp_path, "describe-images", "--image-ids", done["ImageId"], check=False)
    assert gone.returncode == 255 and "InvalidAMIID.NotFound" in gone.stderr


def test_cli_import_image_of_two_vmdk_disks(daemon: DaemonProcess, tmp_path: Path, disks: dict[str, Path],
                                            ec2: Any) -> None:
    (tmp_path / "containers.json").write_text(json.dumps([
        {"Description": "First disk", "Format": "vmdk",
         "UserBucket": {"S3Bucket": BUCKET, "S3Key": "disks/my-server-vm-disk1.vmdk"}},
        {"Description": "Second disk", "Format": "vmdk",
         "UserBucket": {"S3Bucket": BUCKET, "S3Key": "disks/my-server-vm-disk2.vmdk"}}], indent=2))
    task = aws_json(daemon, tmp_path, "import-image", "--description", "My server VM",
                    "--disk-containers", "file://containers.json")
    assert [d["Description"] for d in task["SnapshotDetails"]] == ["First disk", "Second disk"]
    wait_for_task(ec2, task["ImportTaskId"])
    done = aws_json(daemon, tmp_path, "describe-import-image-tasks", "--import-task-ids",
                    task["ImportTaskId"])["ImportImageTasks"][0]
    assert done["Status"] == "completed"
    assert [d["DiskImageSize"] for d in done["SnapshotDetails"]] == [
        float(disks["disks/my-server-vm-disk1.vmdk"].stat().st_size),
        float(disks["disks/my-server-vm-disk2.vmdk"].stat().st_size)]
    assert (done["LicenseType"], done["Platform"], done["UsageOperation"], done["BootMode"]) == (
        "BYOL", "Linux", "RunInstances", "legacy-bios")
    image = ec2.describe_images(ImageIds=[done["ImageId"]])["Images"][0]
    assert [m["DeviceName"] for m in image["BlockDeviceMappings"]] == ["/dev/sda1", "/dev/sdb"]
    assert image["PlatformDetails"] == "Linux/UNIX" and image["UsageOperation"] == "RunInstances"


def test_cli_import_image_with_encryption(daemon: DaemonProcess, tmp_path: Path, disks: dict[str, Path],
                                          ec2: Any) -> None:
    (tmp_path / "containers.json").write_text(json.dumps([
        {"Description": "First disk", "Format": "vmdk",
         "UserBucket": {"S3Bucket": BUCKET, "S3Key": "disks/my-server-vm-disk1.vmdk"}}], indent=2))
    task = aws_json(daemon, tmp_path, "import-image", "--description", "My server disks", "--encrypted",
                    "--kms-key-id", "0ea3fef3-80a7-4778-9d8c-1c0c6EXAMPLE", "--disk-containers",
                    "file://containers.json")
    assert (task["Encrypted"], task["KmsKeyId"]) == (True, "0ea3fef3-80a7-4778-9d8c-1c0c6EXAMPLE")
    done = wait_for_task(ec2, task["ImportTaskId"])
    assert done["Status"] == "completed" and done["Encrypted"] is True
    snapshot = ec2.describe_snapshots(SnapshotIds=[done["SnapshotDetails"][0]["SnapshotId"]])["Snapshots"][0]
    assert (snapshot["Encrypted"], snapshot["KmsKeyId"]) == (True, "0ea3fef3-80a7-4778-9d8c-1c0c6EXAMPLE")
    refused = aws(daemon, tmp_path, "import-image", "--kms-key-id", "k", "--disk-containers",
                  "file://containers.json", check=False)
    assert refused.returncode == 255 and "InvalidParameterCombination" in refused.stderr


def test_cli_import_snapshot_describe_cancel(daemon: DaemonProcess, tmp_path: Path, disks: dict[str, Path],
                                             ec2: Any) -> None:
    (tmp_path / "containers.json").write_text(json.dumps(
        {"Description": "My server VMDK", "Format": "VMDK",
         "UserBucket": {"S3Bucket": BUCKET, "S3Key": "vms/my-server-vm.vmdk"}}, indent=2))
    task = aws_json(daemon, tmp_path, "import-snapshot", "--description", "My server VM",
                    "--disk-container", "file://containers.json")
    detail = task["SnapshotTaskDetail"]
    assert (detail["Status"], detail["StatusMessage"], detail["Progress"], detail["DiskImageSize"]) == (
        "active", "pending", "3", 0.0)
    assert task["ImportTaskId"].startswith("import-snap-") and task["Tags"] == []
    # a task whose source answers only when released is active for as long as the test needs
    held = HeldServer(disks["vms/my-server-vm.vmdk"])
    try:
        (tmp_path / "held.json").write_text(json.dumps({"Format": "VMDK", "Url": held.url}))
        stuck = aws_json(daemon, tmp_path, "import-snapshot", "--disk-container", "file://held.json")["ImportTaskId"]
        cancelled = aws_json(daemon, tmp_path, "cancel-import-task", "--import-task-id", stuck)
        assert cancelled == {"ImportTaskId": stuck, "PreviousState": "active", "State": "deleting"}
        held.release()
        ended = wait_for_task(ec2, stuck)["SnapshotTaskDetail"]
    finally:
        held.close()
    assert (ended["Status"], ended["StatusMessage"]) == ("deleted", "User cancelled")
    assert ended["Url"] == held.url
    again = aws(daemon, tmp_path, "cancel-import-task", "--import-task-id", stuck, check=False)
    assert again.returncode == 255 and "IncorrectState" in again.stderr

    done = wait_for_task(ec2, task["ImportTaskId"])["SnapshotTaskDetail"]
    described = aws_json(daemon, tmp_path, "describe-import-snapshot-tasks", "--import-task-ids",
                         task["ImportTaskId"])["ImportSnapshotTasks"][0]["SnapshotTaskDetail"]
    assert described == done and done["Status"] == "completed" and done["SnapshotId"].startswith("snap-")
    assert "Progress" not in done and "StatusMessage" not in done
    # filter + one item per page: the CLI follows NextToken and merges the pages
    second = ec2.import_snapshot(DiskContainer={"UserBucket": {"S3Bucket": BUCKET, "S3Key": "vms/big.vmdk"}})
    wait_for_task(ec2, second["ImportTaskId"])
    listing = aws_json(daemon, tmp_path, "describe-import-snapshot-tasks", "--filters",
                       "Name=task-state,Values=completed", "--page-size", "1")["ImportSnapshotTasks"]
    ids = [t["ImportTaskId"] for t in listing]
    assert {task["ImportTaskId"], second["ImportTaskId"]} <= set(ids) and stuck not in ids
    assert len(ids) == len(set(ids)) and all(t["SnapshotTaskDetail"]["Status"] == "completed" for t in listing)
    bogus = aws(daemon, tmp_path, "describe-import-snapshot-tasks", "--import-task-ids", "bogus-id", check=False)
    assert bogus.returncode == 255
    assert ("An error occurred (InvalidConversionTaskId.Malformed) when calling the DescribeImportSnapshotTasks "
            "operation: The conversion task ID 'bogus-id' is malformed") in bogus.stderr


# --- boto3 ---------------------------------------------------------------------------------------------

def test_boto3_waiters_snapshot_imported_and_image_available(ec2: Any, disks: dict[str, Path]) -> None:
    snapshot_task = ec2.import_snapshot(DiskContainer={"Format": "vmdk", "UserBucket": {
        "S3Bucket": BUCKET, "S3Key": "vms/my-server-vm.vmdk"}})["ImportTaskId"]
    ec2.get_waiter("snapshot_imported").wait(ImportTaskIds=[snapshot_task],
                                             WaiterConfig={"Delay": 1, "MaxAttempts": 60})
    detail = ec2.describe_import_snapshot_tasks(ImportTaskIds=[snapshot_task])["ImportSnapshotTasks"][0]
    snapshot_id = detail["SnapshotTaskDetail"]["SnapshotId"]
    snapshot = ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"][0]
    assert snapshot["Description"] == f"Created by AWS-VMImport service for {snapshot_task}"
    assert snapshot["VolumeSize"] == 1 and snapshot["OwnerId"] == "123456789012"

    image_task = ec2.import_image(DiskContainers=[{"Format": "VMDK", "UserBucket": {
        "S3Bucket": BUCKET, "S3Key": "disks/my-server-vm-disk1.vmdk"}}], Platform="Linux", BootMode="uefi",
        TagSpecifications=[{"ResourceType": "import-image-task", "Tags": [{"Key": "project", "Value": "demo"}]}])
    assert image_task["Tags"] == [{"Key": "project", "Value": "demo"}]
    done = wait_for_task(ec2, image_task["ImportTaskId"])
    assert done["Status"] == "completed" and done["BootMode"] == "uefi"
    ec2.get_waiter("image_available").wait(ImageIds=[done["ImageId"]], WaiterConfig={"Delay": 1, "MaxAttempts": 30})
    image = ec2.describe_images(Owners=["self"], Filters=[{"Name": "name", "Values": [image_task["ImportTaskId"]]}])
    assert [i["ImageId"] for i in image["Images"]] == [done["ImageId"]]
    assert image["Images"][0]["BootMode"] == "uefi"


def test_dry_run_creates_nothing(ec2: Any) -> None:
    before = len(ec2.describe_import_image_tasks()["ImportImageTasks"])
    with pytest.raises(ClientError) as caught:
        ec2.import_image(DryRun=True, DiskContainers=[{"UserBucket": {"S3Bucket": BUCKET, "S3Key": "vms/x.vmdk"}}])
    assert caught.value.response["Error"]["Code"] == "DryRunOperation"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert len(ec2.describe_import_image_tasks()["ImportImageTasks"]) == before


def test_client_token_retry_returns_the_same_task(ec2: Any) -> None:
    token = str(uuid.uuid4())
    container = {"Format": "VMDK", "UserBucket": {"S3Bucket": BUCKET, "S3Key": "vms/my-server-vm.vmdk"}}
    first = ec2.import_snapshot(DiskContainer=container, ClientToken=token, Description="one")
    second = ec2.import_snapshot(DiskContainer=container, ClientToken=token, Description="one")
    assert first["ImportTaskId"] == second["ImportTaskId"]
    with pytest.raises(ClientError) as caught:
        ec2.import_snapshot(DiskContainer=container, ClientToken=token, Description="two")
    assert caught.value.response["Error"]["Code"] == "IdempotentParameterMismatch"
    assert wait_for_task(ec2, first["ImportTaskId"])["SnapshotTaskDetail"]["Status"] == "completed"
    assert ec2.import_snapshot(DiskContainer=container, ClientToken=token,
                               Description="one")["ImportTaskId"] == first["ImportTaskId"]


def test_a_corrupt_vmdk_ends_deleted_with_a_client_error(ec2: Any) -> None:
    task = ec2.import_image(DiskContainers=[{"Format": "VMDK", "UserBucket": {
        "S3Bucket": BUCKET, "S3Key": "vms/corrupt.vmdk"}}])
    done = wait_for_task(ec2, task["ImportTaskId"])
    assert done["Status"] == "deleted"
    assert done["StatusMessage"].startswith("ClientError: ") and "ImageId" not in done
    described = ec2.describe_import_image_tasks(Filters=[{"Name": "task-state", "Values": ["deleted"]}])
    assert task["ImportTaskId"] in [t["ImportTaskId"] for t in described["ImportImageTasks"]]


def test_a_bucket_the_role_may_not_read(ec2: Any) -> None:
    task = ec2.import_snapshot(DiskContainer={"Format": "VMDK", "UserBucket": {
        "S3Bucket": OTHER_BUCKET, "S3Key": "vms/my-server-vm.vmdk"}})
    detail = wait_for_task(ec2, task["ImportTaskId"])["SnapshotTaskDetail"]
    assert detail["Status"] == "deleted"
    assert detail["StatusMessage"].startswith("ClientError: The service role vmimport provided does not exist or "
                                              "does not have sufficient permissions")


@pytest.mark.parametrize(("call", "params", "code"), [
    ("import_image", {}, "MissingParameter"),
    ("import_image", {"DiskContainers": [{"Format": "qcow2", "Url": "s3://b/k"}]}, "InvalidParameterValue"),
    ("import_image", {"DiskContainers": [{"Url": "s3://b/k", "UserBucket": {"S3Bucket": "b", "S3Key": "k"}}]},
     "InvalidParameterCombination"),
    ("import_image", {"DiskContainers": [{"Url": "s3://b/k"}], "LicenseType": "BYOL",
                      "UsageOperation": "RunInstances"}, "InvalidParameterCombination"),
    ("import_image", {"DiskContainers": [{"Url": "s3://b/k"}] * 22}, "InvalidParameter"),
    ("import_snapshot", {"DiskContainer": {"Format": "OVA", "Url": "s3://b/k"}}, "InvalidParameterValue"),
    ("describe_images", {"ImageIds": ["ami-00000000000000000"]}, "InvalidAMIID.NotFound"),
    ("describe_images", {"ImageIds": ["bogus"]}, "InvalidAMIID.Malformed"),
    ("describe_snapshots", {"SnapshotIds": ["snap-00000000000000000"]}, "InvalidSnapshot.NotFound"),
    ("delete_snapshot", {"SnapshotId": "vol-1"}, "InvalidSnapshotID.Malformed"),
    ("deregister_image", {"ImageId": "ami-00000000000000000"}, "InvalidAMIID.NotFound"),
    ("describe_import_image_tasks", {"ImportTaskIds": ["import-ami-00000000000000000"]},
     "InvalidConversionTaskId.Malformed"),
    ("cancel_import_task", {"ImportTaskId": "import-snap-00000000000000000"}, "InvalidConversionTaskId.Malformed"),
    ("create_tags", {"Resources": ["vol-12345678"], "Tags": [{"Key": "a", "Value": "b"}]}, "InvalidID"),
    ("describe_import_image_tasks", {"Filters": [{"Name": "nope", "Values": ["x"]}]}, "InvalidParameterValue"),
])
def test_refusals(ec2: Any, call: str, params: dict[str, Any], code: str) -> None:
    with pytest.raises(ClientError) as caught:
        getattr(ec2, call)(**params)
    assert caught.value.response["Error"]["Code"] == code
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400


def test_tags_on_images_snapshots_and_tasks(ec2: Any) -> None:
    task = ec2.import_image(DiskContainers=[{"UserBucket": {"S3Bucket": BUCKET, "S3Key": "vms/my-server-vm.vmdk"}}],
                            TagSpecifications=[{"ResourceType": "image", "Tags": [{"Key": "role", "Value": "web"}]}])
    done = wait_for_task(ec2, task["ImportTaskId"])
    image_id, snapshot_id = done["ImageId"], done["SnapshotDetails"][0]["SnapshotId"]
    assert ec2.describe_images(ImageIds=[image_id])["Images"][0]["Tags"] == [{"Key": "role", "Value": "web"}]
    ec2.create_tags(Resources=[image_id, snapshot_id, task["ImportTaskId"]],
                    Tags=[{"Key": "team", "Value": "blue"}, {"Key": "empty"}])
    resources = [image_id, snapshot_id, task["ImportTaskId"]]
    tagged = ec2.describe_tags(Filters=[{"Name": "key", "Values": ["team"]},
                                        {"Name": "resource-id", "Values": resources}])
    assert sorted((t["ResourceId"], t["ResourceType"], t["Value"]) for t in tagged["Tags"]) == sorted([
        (image_id, "image", "blue"), (snapshot_id, "snapshot", "blue"),
        (task["ImportTaskId"], "import-image-task", "blue")])
    found = ec2.describe_snapshots(Filters=[{"Name": "tag:team", "Values": ["bl*"]}])["Snapshots"]
    assert snapshot_id in [s["SnapshotId"] for s in found]
    described = ec2.describe_import_image_tasks(ImportTaskIds=[task["ImportTaskId"]])["ImportImageTasks"][0]
    assert {"Key": "empty", "Value": ""} in described["Tags"]
    ec2.delete_tags(Resources=[image_id], Tags=[{"Key": "team", "Value": "red"}])  # other value: kept
    ec2.delete_tags(Resources=[image_id], Tags=[{"Key": "role"}])
    assert ec2.describe_images(ImageIds=[image_id])["Images"][0]["Tags"] == [
        {"Key": "empty", "Value": ""}, {"Key": "team", "Value": "blue"}]
    ec2.delete_tags(Resources=[image_id])
    assert ec2.describe_images(ImageIds=[image_id])["Images"][0]["Tags"] == []
    result = ec2.deregister_image(ImageId=image_id, DeleteAssociatedSnapshots=True)
    assert result["DeleteSnapshotResults"] == [{"SnapshotId": snapshot_id, "ReturnCode": "success"}]
    with pytest.raises(ClientError) as caught:
        ec2.describe_snapshots(SnapshotIds=[snapshot_id])
    assert caught.value.response["Error"]["Code"] == "InvalidSnapshot.NotFound"


def test_describe_snapshots_owner_self_pages_like_the_cli(daemon: DaemonProcess, tmp_path: Path, ec2: Any) -> None:
    everything = ec2.describe_snapshots(OwnerIds=["self"], MaxResults=1000)["Snapshots"]
    cli = aws_json(daemon, tmp_path, "describe-snapshots", "--owner-ids", "self")["Snapshots"]
    assert [s["SnapshotId"] for s in cli] == [s["SnapshotId"] for s in everything]
    paged = aws_json(daemon, tmp_path, "describe-snapshots", "--owner-ids", "self", "--page-size", "5")["Snapshots"]
    assert [s["SnapshotId"] for s in paged] == [s["SnapshotId"] for s in everything]
    assert ec2.describe_snapshots(OwnerIds=["amazon"])["Snapshots"] == []


def test_another_account_sees_nothing_of_this_one(daemon: DaemonProcess, ec2: Any) -> None:
    task = ec2.import_snapshot(DiskContainer={"UserBucket": {"S3Bucket": BUCKET, "S3Key": "vms/my-server-vm.vmdk"}})
    snapshot_id = wait_for_task(ec2, task["ImportTaskId"])["SnapshotTaskDetail"]["SnapshotId"]
    ec2.create_tags(Resources=[snapshot_id], Tags=[{"Key": "mine", "Value": "yes"}])
    other = boto3.session.Session().client(
        "ec2", endpoint_url=daemon.endpoint, region_name="us-east-1", aws_access_key_id=OTHER_KEY,
        aws_secret_access_key=OTHER_SECRET, config=BotoConfig(retries={"max_attempts": 1}))
    assert other.describe_snapshots()["Snapshots"] == []
    assert other.describe_import_snapshot_tasks()["ImportSnapshotTasks"] == []
    assert other.describe_images()["Images"] == []
    assert other.describe_tags()["Tags"] == []
    for call, params, code in (
            ("describe_snapshots", {"SnapshotIds": [snapshot_id]}, "InvalidSnapshot.NotFound"),
            ("delete_snapshot", {"SnapshotId": snapshot_id}, "InvalidSnapshot.NotFound"),
            ("create_tags", {"Resources": [snapshot_id], "Tags": [{"Key": "a"}]}, "InvalidSnapshot.NotFound"),
            ("describe_import_snapshot_tasks", {"ImportTaskIds": [task["ImportTaskId"]]},
             "InvalidConversionTaskId.Malformed"),
            ("cancel_import_task", {"ImportTaskId": task["ImportTaskId"]}, "InvalidConversionTaskId.Malformed")):
        with pytest.raises(ClientError) as caught:
            getattr(other, call)(**params)
        assert caught.value.response["Error"]["Code"] == code, call
    assert ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"][0]["Tags"] == [
        {"Key": "mine", "Value": "yes"}]
