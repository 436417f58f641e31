"""Export through the real daemon process with real clients: the AWS CLI (the guide's commands plus
--endpoint-url) and boto3 with its waiters; outputs fetched from a real S3 server (moto) on 127.0.0.1
and checked with qemu-img against the disk that was imported."""
# ruff: noqa: F811  (the server fixtures are imported from tests.s3server)

from __future__ import annotations

import asyncio
import itertools
import json
import random
import sqlite3
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
from aiohttp import web
from botocore.exceptions import ClientError

from tests.daemon import DaemonProcess, HeldServer, aws, aws_json, make_raw, make_vmdk, upload, wait_for_task
from tests.faultproxy import FaultProxy
from tests.helpers import MiB, qemu_img, write_sparse_raw
from tests.s3server import BUCKET, S3Server, aws_files, moto_server  # noqa: F401  (fixtures)

EXPORT_BUCKET = "vmied-exports"
DENIED_BUCKET = "not-for-vmimport"
#: qemu-img's name of each exported format, and whether ``qemu-img check`` reads it.
QEMU_FORMATS = {"vmdk": ("vmdk", True), "vhd": ("vpc", False), "raw": ("raw", False), "vhdx": ("vhdx", True),
                "qcow2": ("qcow2", True)}
FAST_WAITER = {"Delay": 1, "MaxAttempts": 90}


def configure(daemon: DaemonProcess, **limits: int) -> None:
    """Add ``[limits]`` and ``[role]`` settings to the daemon's configuration file (before start)."""
    text = daemon.config_path.read_text()
    settings = "".join(f"{key} = {value}\n" for key, value in limits.items())
    text = text.replace("[limits]\n", f"[limits]\n{settings}", 1)
    text = text.replace("[role]\n", f'[role]\nwrite_buckets = ["{BUCKET}", "{EXPORT_BUCKET}"]\n', 1)
    daemon.config_path.write_text(text)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def wait_export_image(ec2: Any, task_id: str, timeout: float = 60.0) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def ended() -> bool:
        found.update(ec2.describe_export_image_tasks(ExportImageTaskIds=[task_id])["ExportImageTasks"][0])
        return found["Status"] in ("completed", "deleted")

    wait_until(ended, f"export {task_id}", timeout)
    return found


def fetch(s3: S3Server, key: str, path: Path, bucket: str = EXPORT_BUCKET) -> Path:
    s3.client().download_file(bucket, key, str(path))
    return path


def same_disk(raw: Path, image: Path, fmt: str) -> None:
    """qemu-img check (where qemu has one for the format) and compare against the imported raw disk."""
    qemu_format, checkable = QEMU_FORMATS[fmt]
    if checkable:
        qemu_img("check", "-f", qemu_format, image)
    qemu_img("compare", "-f", "raw", "-F", qemu_format, raw, image)


def import_image(ec2: Any, key: str) -> str:
    task_id = ec2.import_image(DiskContainers=[{"Format": "VMDK", "UserBucket": {"S3Bucket": BUCKET,
                                                                                 "S3Key": key}}])["ImportTaskId"]
    done = wait_for_task(ec2, task_id)
    assert done["Status"] == "completed", done
    image_id: str = done["ImageId"]
    return image_id


def import_instance(ec2: Any, *keys: str, url: str | None = None) -> dict[str, Any]:
    """ImportInstance of VMDK disks: S3 keys of the test bucket, or one disk at ``url``."""
    urls = [url] if url else [f"s3://{BUCKET}/{key}" for key in keys]
    disks = [{"Image": {"Format": "VMDK", "Bytes": 1, "ImportManifestUrl": location},
              "Volume": {"Size": 1}, "Description": f"disk {number}"} for number, location in enumerate(urls)]
    task: dict[str, Any] = ec2.import_instance(Platform="Windows", Description="legacy", DiskImages=disks,
                                               LaunchSpecification={"Architecture": "x86_64",
                                                                    "InstanceType": "m5.large"})["ConversionTask"]
    return task


def error_of(call: Callable[[], Any]) -> tuple[str, str]:
    with pytest.raises(ClientError) as caught:
        call()
    error = caught.value.response["Error"]
    return error["Code"], error["Message"]


# --- fixtures --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory, moto_server: S3Server) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export-disks")
    raw = make_raw(root / "boot.raw", 4 * MiB + 64 * 1024, 31)  # not a whole number of MiB
    big_raw = make_raw(root / "big.raw", 16 * MiB, 32)
    dense_raw = root / "dense.raw"  # random data but for a hole: a dynamic VHD of it has several parts
    data = bytearray(random.Random(33).randbytes(24 * MiB))
    data[8 * MiB:12 * MiB] = bytes(4 * MiB)
    dense_raw.write_bytes(bytes(data))
    files = {"raw": raw, "big-raw": big_raw, "dense-raw": dense_raw,
             "vms/boot.vmdk": make_vmdk(raw, root / "boot.vmdk"), "vms/big.vmdk": make_vmdk(big_raw, root / "big.vmdk"),
             "vms/dense.vmdk": make_vmdk(dense_raw, root / "dense.vmdk")}
    for key in ("vms/boot.vmdk", "vms/big.vmdk", "vms/dense.vmdk"):
        upload(moto_server, files[key], key)
    client = moto_server.client()
    for bucket in (EXPORT_BUCKET, DENIED_BUCKET):
        client.create_bucket(Bucket=bucket)
    return files


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, moto_server: S3Server,
           disks: dict[str, Path]) -> Iterator[DaemonProcess]:
    process = DaemonProcess(tmp_path_factory.mktemp("export-daemon"), moto_server)
    configure(process, max_export_bytes=8 * MiB, part_size=5 * MiB)
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def ec2(daemon: DaemonProcess) -> Any:
    return daemon.client()


@pytest.fixture(scope="module")
def image(ec2: Any) -> str:
    return import_image(ec2, "vms/boot.vmdk")


@pytest.fixture(scope="module")
def instance(ec2: Any) -> dict[str, Any]:
    task = import_instance(ec2, "vms/boot.vmdk")
    ec2.get_waiter("conversion_task_completed").wait(ConversionTaskIds=[task["ConversionTaskId"]],
                                                     WaiterConfig=FAST_WAITER)
    return task


# --- ExportImage -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["VMDK", "VHD", "RAW", "VHDX", "QCOW2"])
def test_cli_export_image_to_each_format(daemon: DaemonProcess, ec2: Any, image: str, disks: dict[str, Path],
                                         moto_server: S3Server, tmp_path: Path, fmt: str) -> None:
    answer = aws_json(daemon, tmp_path, "export-image", "--image-id", image, "--disk-image-format", fmt,
                      "--s3-export-location", f"S3Bucket={EXPORT_BUCKET},S3Prefix=exports/",
                      "--description", "nightly export",
                      "--tag-specifications", "ResourceType=export-image-task,Tags=[{Key=team,Value=infra}]")
    task_id = answer["ExportImageTaskId"]
    assert task_id.startswith("export-ami-") and len(task_id) == len("export-ami-") + 17
    assert answer == {"Description": "nightly export", "DiskImageFormat": fmt.lower(), "ExportImageTaskId": task_id,
                      "ImageId": image, "RoleName": "vmimport", "Progress": "0",
                      "S3ExportLocation": {"S3Bucket": EXPORT_BUCKET, "S3Prefix": "exports/"},
                      "Status": "active", "StatusMessage": "validating", "Tags": [{"Key": "team", "Value": "infra"}]}
    wait_export_image(ec2, task_id)
    done = aws_json(daemon, tmp_path, "describe-export-image-tasks", "--export-image-task-ids", task_id)
    assert done == {"ExportImageTasks": [{
        "Description": "nightly export", "ExportImageTaskId": task_id, "ImageId": image,
        "S3ExportLocation": {"S3Bucket": EXPORT_BUCKET, "S3Prefix": "exports/"}, "Status": "completed",
        "Tags": [{"Key": "team", "Value": "infra"}]}]}
    key = f"exports/{task_id}.{fmt.lower()}"
    assert key in moto_server.objects(EXPORT_BUCKET)
    same_disk(disks["raw"], fetch(moto_server, key, tmp_path / f"out.{fmt.lower()}"), fmt.lower())
    assert moto_server.uploads(EXPORT_BUCKET) == []


def test_vmdk_export_is_stream_optimized_and_passes_grains(ec2: Any, image: str, moto_server: S3Server,
                                                           tmp_path: Path) -> None:
    task_id = ec2.export_image(ImageId=image, DiskImageFormat="VMDK",
                               S3ExportLocation={"S3Bucket": EXPORT_BUCKET, "S3Prefix": "raw-prefix-"}
                               )["ExportImageTaskId"]
    assert wait_export_image(ec2, task_id)["Status"] == "completed"
    out = fetch(moto_server, f"raw-prefix-{task_id}.vmdk", tmp_path / "out.vmdk")  # prefix used verbatim
    info = json.loads(qemu_img("info", "--output=json", out))
    assert info["format"] == "vmdk" and info["format-specific"]["data"]["create-type"] == "streamOptimized"


def test_export_image_client_token_is_idempotent(ec2: Any, image: str) -> None:
    request = {"ImageId": image, "DiskImageFormat": "RAW", "S3ExportLocation": {"S3Bucket": EXPORT_BUCKET},
               "ClientToken": "token-export-1"}
    first = ec2.export_image(**request)["ExportImageTaskId"]
    assert ec2.export_image(**request)["ExportImageTaskId"] == first
    code, message = error_of(lambda: ec2.export_image(**{**request, "DiskImageFormat": "VHD"}))
    assert code == "IdempotentParameterMismatch" and "token-export-1" in message
    wait_export_image(ec2, first)


def test_describe_export_image_tasks_filters_and_pages(ec2: Any, image: str) -> None:
    made = [ec2.export_image(ImageId=image, DiskImageFormat="RAW",
                             S3ExportLocation={"S3Bucket": EXPORT_BUCKET, "S3Prefix": "pages/"})["ExportImageTaskId"]]
    for task_id in made:
        wait_export_image(ec2, task_id)
    completed = ec2.describe_export_image_tasks(Filters=[{"Name": "task-state", "Values": ["completed"]}])
    ids = [task["ExportImageTaskId"] for task in completed["ExportImageTasks"]]
    assert set(made) <= set(ids) and len(ids) >= 2
    paged = [task["ExportImageTaskId"] for page in ec2.get_paginator("describe_export_image_tasks").paginate(
        Filters=[{"Name": "task-state", "Values": ["completed"]}], PaginationConfig={"PageSize": 1})
        for task in page["ExportImageTasks"]]
    assert paged == sorted(ids)
    assert ec2.describe_export_image_tasks(Filters=[{"Name": "task-state", "Values": ["deleting"]}]
                                           )["ExportImageTasks"] == []
    code, _ = error_of(lambda: ec2.describe_export_image_tasks(Filters=[{"Name": "bogus", "Values": ["x"]}]))
    assert code == "InvalidParameterValue"
    code, _ = error_of(lambda: ec2.describe_export_image_tasks(MaxResults=501))
    assert code == "InvalidParameterValue"


def test_export_image_refusals(daemon: DaemonProcess, ec2: Any, image: str, tmp_path: Path) -> None:
    where = {"S3Bucket": EXPORT_BUCKET}
    assert error_of(lambda: ec2.export_image(ImageId="ami-0123456789abcdef0", DiskImageFormat="RAW",
                                             S3ExportLocation=where))[0] == "InvalidAMIID.NotFound"
    assert error_of(lambda: ec2.export_image(ImageId="bogus", DiskImageFormat="RAW",
                                             S3ExportLocation=where))[0] == "InvalidAMIID.Malformed"
    code, message = error_of(lambda: ec2.export_image(ImageId=image, DiskImageFormat="RAW",
                                                      S3ExportLocation={"S3Bucket": DENIED_BUCKET}))
    assert code == "InvalidParameter"
    assert message.startswith("The service role vmimport provided does not exist or does not have sufficient "
                              "permissions")
    code, message = error_of(lambda: ec2.export_image(ImageId=image, DiskImageFormat="VDI", S3ExportLocation=where))
    assert code == "InvalidParameterValue" and "VDI" in message
    refused = aws(daemon, tmp_path, "export-image", "--image-id", image, "--disk-image-format", "RAW",
                  "--s3-export-location", f"S3Bucket={EXPORT_BUCKET}", "--dry-run", check=False)
    assert refused.returncode == 255 and "(DryRunOperation)" in refused.stderr
    for call in (lambda: ec2.describe_export_image_tasks(ExportImageTaskIds=["export-ami-0123456789abcdef0"]),
                 lambda: ec2.cancel_export_task(ExportTaskId="export-ami-0123456789abcdef0"),
                 lambda: ec2.describe_export_tasks(ExportTaskIds=["export-i-0123456789abcdef0"])):
        assert error_of(call)[0] == "InvalidExportTaskID.NotFound"
    assert error_of(lambda: ec2.cancel_export_task(ExportTaskId="import-ami-0123456789abcdef0")
                    )[0] == "InvalidExportTaskID.Malformed"


def test_export_image_over_the_size_limit_is_refused(ec2: Any) -> None:
    big = import_image(ec2, "vms/big.vmdk")  # 16 MiB; this daemon exports at most 8 MiB
    code, message = error_of(lambda: ec2.export_image(ImageId=big, DiskImageFormat="RAW",
                                                      S3ExportLocation={"S3Bucket": EXPORT_BUCKET}))
    assert code == "InvalidParameter" and str(8 * MiB) in message


def test_cancel_of_a_completed_export_is_incorrect_state(ec2: Any, image: str) -> None:
    task_id = ec2.export_image(ImageId=image, DiskImageFormat="RAW",
                               S3ExportLocation={"S3Bucket": EXPORT_BUCKET})["ExportImageTaskId"]
    wait_export_image(ec2, task_id)
    assert error_of(lambda: ec2.cancel_export_task(ExportTaskId=task_id))[0] == "IncorrectState"


# --- instance export -------------------------------------------------------------------------------------


def test_cli_create_instance_export_task_to_an_ova(daemon: DaemonProcess, ec2: Any, instance: dict[str, Any],
                                                   disks: dict[str, Path], moto_server: S3Server,
                                                   tmp_path: Path) -> None:
    instance_id = instance["ImportInstance"]["InstanceId"]
    (tmp_path / "file.json").write_text(json.dumps({"ContainerFormat": "ova", "DiskImageFormat": "VMDK",
                                                    "S3Bucket": EXPORT_BUCKET, "S3Prefix": "vms/"}, indent=2))
    task = aws_json(daemon, tmp_path, "create-instance-export-task", "--instance-id", instance_id,
                    "--target-environment", "vmware", "--export-to-s3-task", "file://file.json")["ExportTask"]
    task_id = task["ExportTaskId"]
    assert task_id.startswith("export-i-")
    assert task["State"] == "active"
    assert task["InstanceExportDetails"] == {"InstanceId": instance_id, "TargetEnvironment": "vmware"}
    assert task["ExportToS3Task"] == {"ContainerFormat": "ova", "DiskImageFormat": "vmdk", "S3Bucket": EXPORT_BUCKET,
                                      "S3Key": f"vms/{task_id}.ova"}
    ec2.get_waiter("export_task_completed").wait(ExportTaskIds=[task_id], WaiterConfig=FAST_WAITER)
    described = aws_json(daemon, tmp_path, "describe-export-tasks", "--export-task-ids", task_id)["ExportTasks"]
    assert [(t["ExportTaskId"], t["State"]) for t in described] == [(task_id, "completed")]
    ova = fetch(moto_server, f"vms/{task_id}.ova", tmp_path / "out.ova")
    with tarfile.open(ova) as archive:
        names = archive.getnames()
        assert names[0].endswith(".ovf") and names[1].endswith(".mf")
        descriptor = archive.extractfile(names[0]).read().decode()  # type: ignore[union-attr]
        assert "<vssd:VirtualSystemType>vmx-10</vssd:VirtualSystemType>" in descriptor
        disk = next(name for name in names if name.endswith(".vmdk"))
        archive.extract(disk, tmp_path, filter="data")
    same_disk(disks["raw"], tmp_path / disk, "vmdk")


@pytest.mark.parametrize(("target", "system_type", "controller"), [
    ("microsoft", "Microsoft:Hyper-V:System:8.0", "PIIX4"), ("citrix", "xen-3.0-unknown", "PIIX4")])
def test_target_environment_shapes_the_ovf(ec2: Any, instance: dict[str, Any], disks: dict[str, Path],
                                           moto_server: S3Server, tmp_path: Path, target: str, system_type: str,
                                           controller: str) -> None:
    task = ec2.create_instance_export_task(
        InstanceId=instance["ImportInstance"]["InstanceId"], TargetEnvironment=target,
        ExportToS3Task={"ContainerFormat": "ova", "DiskImageFormat": "VMDK", "S3Bucket": EXPORT_BUCKET}
    )["ExportTask"]
    ec2.get_waiter("export_task_completed").wait(ExportTaskIds=[task["ExportTaskId"]], WaiterConfig=FAST_WAITER)
    ova = fetch(moto_server, f"{task['ExportTaskId']}.ova", tmp_path / "out.ova")
    with tarfile.open(ova) as archive:
        descriptor = archive.extractfile(archive.getnames()[0]).read().decode()  # type: ignore[union-attr]
        disk = next(name for name in archive.getnames() if name.endswith(".vmdk"))
        archive.extract(disk, tmp_path, filter="data")
    assert f"<vssd:VirtualSystemType>{system_type}</vssd:VirtualSystemType>" in descriptor
    assert f"<rasd:ResourceSubType>{controller}</rasd:ResourceSubType>" in descriptor
    same_disk(disks["raw"], tmp_path / disk, "vmdk")


@pytest.mark.parametrize(("fmt", "target"), [("VHD", "microsoft"), ("RAW", "citrix"), ("VMDK", "vmware")])
def test_instance_export_of_a_bare_disk(ec2: Any, instance: dict[str, Any], disks: dict[str, Path],
                                        moto_server: S3Server, tmp_path: Path, fmt: str, target: str) -> None:
    task = ec2.create_instance_export_task(
        InstanceId=instance["ImportInstance"]["InstanceId"], TargetEnvironment=target, Description="bare",
        ExportToS3Task={"DiskImageFormat": fmt, "S3Bucket": EXPORT_BUCKET, "S3Prefix": "bare/"})["ExportTask"]
    assert task["ExportToS3Task"]["S3Key"] == f"bare/{task['ExportTaskId']}.{fmt.lower()}"
    ec2.get_waiter("export_task_completed").wait(ExportTaskIds=[task["ExportTaskId"]], WaiterConfig=FAST_WAITER)
    out = fetch(moto_server, task["ExportToS3Task"]["S3Key"], tmp_path / "out")
    same_disk(disks["raw"], out, fmt.lower())


def test_describe_export_tasks_filters_and_tags(ec2: Any, instance: dict[str, Any]) -> None:
    instance_id = instance["ImportInstance"]["InstanceId"]
    task_id = ec2.create_instance_export_task(
        InstanceId=instance_id, TargetEnvironment="vmware", Description="tagged",
        TagSpecifications=[{"ResourceType": "export-instance-task", "Tags": [{"Key": "team", "Value": "infra"}]}],
        ExportToS3Task={"DiskImageFormat": "RAW", "S3Bucket": EXPORT_BUCKET, "S3Prefix": "tags/"}
    )["ExportTask"]["ExportTaskId"]
    ec2.create_tags(Resources=[task_id], Tags=[{"Key": "ticket", "Value": "OPS-42"}])
    ec2.get_waiter("export_task_completed").wait(ExportTaskIds=[task_id], WaiterConfig=FAST_WAITER)
    found = ec2.describe_export_tasks(Filters=[{"Name": "tag:ticket", "Values": ["OPS-42"]}])["ExportTasks"]
    assert [(t["ExportTaskId"], t["Description"], t["State"]) for t in found] == [(task_id, "tagged", "completed")]
    assert found[0]["Tags"] == [{"Key": "team", "Value": "infra"}, {"Key": "ticket", "Value": "OPS-42"}]
    completed = ec2.describe_export_tasks(Filters=[{"Name": "state", "Values": ["completed"]},
                                                   {"Name": "instance-id", "Values": [instance_id]}])
    assert task_id in [t["ExportTaskId"] for t in completed["ExportTasks"]]
    assert ec2.describe_export_tasks(Filters=[{"Name": "state", "Values": ["cancelling"]}])["ExportTasks"] == []
    tags = ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [task_id]}])["Tags"]
    assert {t["ResourceType"] for t in tags} == {"export-instance-task"}


def test_instance_export_refusals(ec2: Any, instance: dict[str, Any], disks: dict[str, Path]) -> None:
    to_s3 = {"DiskImageFormat": "VMDK", "S3Bucket": EXPORT_BUCKET}

    def export(instance_id: str, **destination: str) -> Any:
        return ec2.create_instance_export_task(InstanceId=instance_id, TargetEnvironment="vmware",
                                               ExportToS3Task={**to_s3, **destination})

    assert error_of(lambda: export("i-0123456789abcdef0"))[0] == "InvalidInstanceID.NotFound"
    assert error_of(lambda: export("bogus"))[0] == "InvalidInstanceID.Malformed"
    instance_id = instance["ImportInstance"]["InstanceId"]
    assert error_of(lambda: export(instance_id, DiskImageFormat="RAW", ContainerFormat="ova")
                    )[0] == "InvalidParameterCombination"
    assert error_of(lambda: export(instance_id, S3Bucket=DENIED_BUCKET))[0] == "InvalidParameter"

    two = import_instance(ec2, "vms/boot.vmdk", "vms/boot.vmdk")
    ec2.get_waiter("conversion_task_completed").wait(ConversionTaskIds=[two["ConversionTaskId"]],
                                                     WaiterConfig=FAST_WAITER)
    assert error_of(lambda: export(two["ImportInstance"]["InstanceId"])) == (
        "UnsupportedOperation", "This instance has multiple volumes attached. Please remove additional volumes.")

    gone = import_instance(ec2, "vms/boot.vmdk")
    ec2.get_waiter("conversion_task_completed").wait(ConversionTaskIds=[gone["ConversionTaskId"]],
                                                     WaiterConfig=FAST_WAITER)
    snapshot = ec2.describe_snapshots(Filters=[{"Name": "description", "Values": [
        f"Created by AWS-VMImport service for {gone['ConversionTaskId']}"]}])["Snapshots"][0]["SnapshotId"]
    ec2.delete_snapshot(SnapshotId=snapshot)
    code, message = error_of(lambda: export(gone["ImportInstance"]["InstanceId"]))
    assert code == "NotExportable" and snapshot in message

    big = import_instance(ec2, "vms/big.vmdk")
    ec2.get_waiter("conversion_task_completed").wait(ConversionTaskIds=[big["ConversionTaskId"]],
                                                     WaiterConfig=FAST_WAITER)
    code, message = error_of(lambda: export(big["ImportInstance"]["InstanceId"]))
    assert code == "InvalidParameter" and str(8 * MiB) in message


def test_instance_still_importing_is_not_exportable_and_its_conversion_cancels(ec2: Any,
                                                                               disks: dict[str, Path]) -> None:
    held = HeldServer(disks["vms/boot.vmdk"])
    try:
        task = import_instance(ec2, url=held.url)
        code, message = error_of(lambda: ec2.create_instance_export_task(
            InstanceId=task["ImportInstance"]["InstanceId"], TargetEnvironment="vmware",
            ExportToS3Task={"DiskImageFormat": "VMDK", "S3Bucket": EXPORT_BUCKET}))
        assert code == "NotExportable" and message.startswith("Only imported instances can be exported.")
        ec2.cancel_conversion_task(ConversionTaskId=task["ConversionTaskId"], ReasonMessage="bye")
        held.release()  # the cancel is seen at the next step of the import
        ec2.get_waiter("conversion_task_cancelled").wait(ConversionTaskIds=[task["ConversionTaskId"]],
                                                         WaiterConfig=FAST_WAITER)
        done = ec2.describe_conversion_tasks(ConversionTaskIds=[task["ConversionTaskId"]])["ConversionTasks"][0]
        assert (done["State"], done["StatusMessage"]) == ("cancelled", "bye")
        assert error_of(lambda: ec2.cancel_conversion_task(ConversionTaskId=task["ConversionTaskId"])) == (
            "DeleteConversionTaskError", "The conversion task cannot be canceled.")
    finally:
        held.close()


# --- cancel, limits and resume: exports held at the S3 server ------------------------------------------------


class HoldingProxy(FaultProxy):
    """A proxy in front of the S3 server that holds the requests ``hold`` matches until released."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream, [])
        self.hold: Callable[[str, dict[str, list[str]]], bool] = lambda method, query: False
        self.released = threading.Event()
        self.held = 0
        self.parts: list[tuple[int, int]] = []  # (part number, HTTP status) of every UploadPart answered
        self.copies = 0  # requests that name a copy source (UploadPartCopy)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        query = parse_qs(request.query_string)
        if self.hold(request.method, query):
            self.held += 1
            await asyncio.get_running_loop().run_in_executor(None, self.released.wait, 60)
            self.held -= 1
        response = await super()._handle(request)
        if request.method == "PUT" and "partNumber" in query:
            self.parts.append((int(query["partNumber"][0]), response.status))
        self.copies += "x-amz-copy-source" in request.headers
        return response

    def release(self) -> None:
        self.released.set()

    def rearm(self, hold: Callable[[str, dict[str, list[str]]], bool]) -> None:
        self.released.clear()
        self.hold = hold


def holds_parts_after(count: int) -> Callable[[str, dict[str, list[str]]], bool]:
    return lambda method, query: method == "PUT" and int(query.get("partNumber", ["0"])[0]) > count


@pytest.fixture(scope="module")
def proxy(moto_server: S3Server) -> Iterator[HoldingProxy]:
    held = HoldingProxy(moto_server.endpoint).start()
    assert isinstance(held, HoldingProxy)
    yield held
    held.release()
    held.stop()


@pytest.fixture(scope="module")
def held_daemon(tmp_path_factory: pytest.TempPathFactory, moto_server: S3Server, proxy: HoldingProxy,
                disks: dict[str, Path]) -> Iterator[DaemonProcess]:
    process = DaemonProcess(tmp_path_factory.mktemp("held-daemon"), S3Server(proxy.endpoint, moto_server.profile))
    configure(process, part_size=5 * MiB, parts_in_flight=1)
    process.start()
    yield process
    process.kill()


@pytest.fixture(scope="module")
def big_image(held_daemon: DaemonProcess) -> str:
    return import_image(held_daemon.client(), "vms/big.vmdk")


def test_cancelled_export_leaves_no_object_and_no_upload(held_daemon: DaemonProcess, proxy: HoldingProxy,
                                                         big_image: str, moto_server: S3Server) -> None:
    ec2 = held_daemon.client()
    proxy.rearm(holds_parts_after(1))
    task_id = ec2.export_image(ImageId=big_image, DiskImageFormat="RAW",
                               S3ExportLocation={"S3Bucket": EXPORT_BUCKET, "S3Prefix": "cancel/"}
                               )["ExportImageTaskId"]
    wait_until(lambda: proxy.held > 0, "the second part to be held")
    assert moto_server.uploads(EXPORT_BUCKET) == [f"cancel/{task_id}.raw"]
    code, message = error_of(lambda: ec2.export_image(ImageId=big_image, DiskImageFormat="VHD",
                                                      S3ExportLocation={"S3Bucket": EXPORT_BUCKET}))
    assert code == "InvalidParameter" and f"already being exported by {task_id}" in message
    assert ec2.cancel_export_task(ExportTaskId=task_id)["ResponseMetadata"]["HTTPStatusCode"] == 200
    done = wait_export_image(ec2, task_id)
    assert (done["Status"], done["StatusMessage"]) == ("deleted", "User cancelled")
    proxy.release()
    wait_until(lambda: proxy.held == 0, "the held part to be answered")
    assert moto_server.uploads(EXPORT_BUCKET) == []
    assert not [key for key in moto_server.objects(EXPORT_BUCKET) if key.startswith("cancel/")]


@pytest.fixture(scope="module")
def sparse_image(held_daemon: DaemonProcess, moto_server: S3Server, tmp_path_factory: pytest.TempPathFactory,
                 proxy: HoldingProxy) -> tuple[str, Path]:
    """A 96 MiB disk with data only in its first and last MiB: its RAW export is one long run of zeros."""
    root = tmp_path_factory.mktemp("sparse")
    raw = root / "sparse.raw"
    write_sparse_raw(raw, 96 * MiB, [(0, MiB), (95 * MiB, MiB)], seed=41)
    upload(moto_server, make_vmdk(raw, root / "sparse.vmdk"), "vms/sparse.vmdk")
    proxy.rearm(lambda method, query: False)
    return import_image(held_daemon.client(), "vms/sparse.vmdk"), raw


def scratch_objects(s3: S3Server) -> list[str]:
    return [key for key in s3.objects(EXPORT_BUCKET) + s3.uploads(EXPORT_BUCKET) if ".vmied-zeros-" in key]


def test_raw_export_copies_its_zeros_inside_the_server(held_daemon: DaemonProcess, proxy: HoldingProxy,
                                                       sparse_image: tuple[str, Path], moto_server: S3Server,
                                                       tmp_path: Path) -> None:
    """Parts of 5 MiB: the 40 MiB scratch object of zeros is made, checked, copied twice whole and once
    in part (the last 10 MiB of zeros), deleted."""
    image_id, raw = sparse_image
    ec2 = held_daemon.client()
    proxy.rearm(lambda method, query: False)
    copies = proxy.copies
    task_id = ec2.export_image(ImageId=image_id, DiskImageFormat="RAW",
                               S3ExportLocation={"S3Bucket": EXPORT_BUCKET, "S3Prefix": "zeros/"})["ExportImageTaskId"]
    assert wait_export_image(ec2, task_id)["Status"] == "completed"
    assert proxy.copies - copies == 1 + 3  # the test copy, then parts of 40, 40 and 10 MiB
    assert fetch(moto_server, f"zeros/{task_id}.raw", tmp_path / "out.raw").read_bytes() == raw.read_bytes()
    assert scratch_objects(moto_server) == [] and moto_server.uploads(EXPORT_BUCKET) == []


def test_export_cancelled_while_its_scratch_object_is_made_leaves_nothing(
        held_daemon: DaemonProcess, proxy: HoldingProxy, sparse_image: tuple[str, Path],
        moto_server: S3Server) -> None:
    image_id, _ = sparse_image
    ec2 = held_daemon.client()
    proxy.rearm(holds_parts_after(1))  # the export's part 1 goes out, and part 1 of the scratch object
    task_id = ec2.export_image(ImageId=image_id, DiskImageFormat="RAW",
                               S3ExportLocation={"S3Bucket": EXPORT_BUCKET, "S3Prefix": "zeros-cancel/"}
                               )["ExportImageTaskId"]
    wait_until(lambda: proxy.held > 0 and any(".vmied-zeros-" in key for key in moto_server.uploads(EXPORT_BUCKET)),
               "a part of the scratch object to be held")
    ec2.cancel_export_task(ExportTaskId=task_id)
    assert wait_export_image(ec2, task_id)["Status"] == "deleted"
    proxy.release()
    wait_until(lambda: proxy.held == 0, "the held parts to be answered")
    assert moto_server.uploads(EXPORT_BUCKET) == [] and scratch_objects(moto_server) == []
    assert not [key for key in moto_server.objects(EXPORT_BUCKET) if key.startswith("zeros-cancel/")]


@pytest.mark.parametrize("reads_let_through", [0, 3])
def test_cancel_reaches_an_import_whose_source_read_is_stalled(held_daemon: DaemonProcess, proxy: HoldingProxy,
                                                               reads_let_through: int) -> None:
    """A source GET the server does not answer (held here for up to a minute) does not delay a
    cancel: with no read let through the import stalls while validating, with three while converting."""
    ec2 = held_daemon.client()
    gets = itertools.count()
    proxy.rearm(lambda method, query: method == "GET" and next(gets) >= reads_let_through)
    task_id = ec2.import_snapshot(DiskContainer={"Format": "VMDK", "UserBucket": {
        "S3Bucket": BUCKET, "S3Key": "vms/dense.vmdk"}})["ImportTaskId"]
    try:
        wait_until(lambda: proxy.held > 0, "a source read to be held")
        ec2.cancel_import_task(ImportTaskId=task_id)
        done = wait_for_task(ec2, task_id, timeout=10)
        assert done["SnapshotTaskDetail"]["Status"] == "deleted"
        assert proxy.held > 0  # the read is still unanswered: the cancel did not wait for it
    finally:
        proxy.release()
    wait_until(lambda: proxy.held == 0, "the held read to be answered")


def test_cancel_while_completing_is_incorrect_state(held_daemon: DaemonProcess, proxy: HoldingProxy,
                                                    big_image: str, moto_server: S3Server) -> None:
    ec2 = held_daemon.client()
    proxy.rearm(lambda method, query: method == "POST" and "uploadId" in query)  # CompleteMultipartUpload
    task_id = ec2.export_image(ImageId=big_image, DiskImageFormat="RAW",
                               S3ExportLocation={"S3Bucket": EXPORT_BUCKET, "S3Prefix": "final/"}
                               )["ExportImageTaskId"]
    wait_until(lambda: proxy.held > 0, "the completion to be held")
    running = ec2.describe_export_image_tasks(ExportImageTaskIds=[task_id])["ExportImageTasks"][0]
    assert (running["Status"], running["StatusMessage"], running["Progress"]) == ("active", "updating", "90")
    code, message = error_of(lambda: ec2.cancel_export_task(ExportTaskId=task_id))
    assert code == "IncorrectState" and "final disk image" in message
    proxy.release()
    assert wait_export_image(ec2, task_id)["Status"] == "completed"
    assert f"final/{task_id}.raw" in moto_server.objects(EXPORT_BUCKET)


def test_at_most_five_exports_run_at_once(held_daemon: DaemonProcess, proxy: HoldingProxy, big_image: str,
                                          moto_server: S3Server) -> None:
    ec2 = held_daemon.client()
    instance = import_instance(ec2, "vms/big.vmdk")
    ec2.get_waiter("conversion_task_completed").wait(ConversionTaskIds=[instance["ConversionTaskId"]],
                                                     WaiterConfig=FAST_WAITER)
    proxy.rearm(lambda method, query: method == "PUT" and "partNumber" in query)
    to_s3 = {"DiskImageFormat": "RAW", "S3Bucket": EXPORT_BUCKET, "S3Prefix": "limit/"}
    running = [ec2.create_instance_export_task(InstanceId=instance["ImportInstance"]["InstanceId"],
                                               TargetEnvironment="citrix", ExportToS3Task=to_s3)["ExportTask"]
               for _ in range(5)]
    assert error_of(lambda: ec2.create_instance_export_task(
        InstanceId=instance["ImportInstance"]["InstanceId"], TargetEnvironment="citrix", ExportToS3Task=to_s3)
                    )[0] == "ResourceLimitExceeded"
    code, _ = error_of(lambda: ec2.export_image(ImageId=big_image, DiskImageFormat="RAW",
                                                S3ExportLocation={"S3Bucket": EXPORT_BUCKET}))
    assert code == "ResourceLimitExceeded"
    for task in running:
        ec2.cancel_export_task(ExportTaskId=task["ExportTaskId"])
    ids = [task["ExportTaskId"] for task in running]
    ec2.get_waiter("export_task_cancelled").wait(ExportTaskIds=ids, WaiterConfig=FAST_WAITER)
    proxy.release()
    wait_until(lambda: proxy.held == 0, "the held parts to be answered")
    assert moto_server.uploads(EXPORT_BUCKET) == []
    assert not [key for key in moto_server.objects(EXPORT_BUCKET) if key.startswith("limit/")]


def checkpointed_parts(daemon: DaemonProcess, task_id: str) -> set[int]:
    """Part numbers the task's checkpoint lists, read from the daemon's database (another process)."""
    with sqlite3.connect(f"file:{daemon.state / 'vmied.db'}?mode=ro", uri=True) as db:
        row = db.execute("SELECT checkpoint FROM tasks WHERE id = ?", (task_id,)).fetchone()
    return {int(number) for number in json.loads(row[0]).get("parts", {})} if row else set()


def reference_export(state: Path, task_id: str, out: Path) -> None:
    """What an uninterrupted export of the task writes: its snapshot through the task's writer."""
    from vmied.io.local import FileSink
    from vmied.pipeline import Workers
    from vmied.store import LocalObjects, SnapshotStore
    from vmied.tasks.db import Catalog
    from vmied.tasks.export_tasks import write_image

    async def run() -> None:
        catalog = await Catalog.open(str(state / "vmied.db"))
        task = await catalog.get_task(task_id)
        await catalog.close()
        assert task is not None
        with Workers(2) as workers:
            store = SnapshotStore(await LocalObjects.open(str(state / "store")), workers)
            reader = await store.open(task.params["SnapshotId"])
            sink = await FileSink.create(str(out))
            await write_image(task, sink, reader.virtual_size, reader.extents(), workers)
            await sink.commit()
            await store.close()

    asyncio.run(run())


def start_export(ec2: Any, fmt: str) -> tuple[str, str]:
    """An export of the dense disk: ExportImage, or for OVA an instance export; its id and object key."""
    if fmt != "OVA":
        image = import_image(ec2, "vms/dense.vmdk")
        task_id: str = ec2.export_image(ImageId=image, DiskImageFormat=fmt, S3ExportLocation={
            "S3Bucket": EXPORT_BUCKET, "S3Prefix": "resume/"})["ExportImageTaskId"]
        return task_id, f"resume/{task_id}.{fmt.lower()}"
    conversion = import_instance(ec2, "vms/dense.vmdk")
    ec2.get_waiter("conversion_task_completed").wait(ConversionTaskIds=[conversion["ConversionTaskId"]],
                                                     WaiterConfig=FAST_WAITER)
    task_id = ec2.create_instance_export_task(
        InstanceId=conversion["ImportInstance"]["InstanceId"], TargetEnvironment="vmware",
        ExportToS3Task={"ContainerFormat": "ova", "DiskImageFormat": "VMDK", "S3Bucket": EXPORT_BUCKET,
                        "S3Prefix": "resume/"})["ExportTask"]["ExportTaskId"]
    return task_id, f"resume/{task_id}.ova"


def wait_completed(ec2: Any, task_id: str) -> None:
    if task_id.startswith("export-ami-"):
        done = wait_export_image(ec2, task_id)
        assert done["Status"] == "completed", done
    else:
        ec2.get_waiter("export_task_completed").wait(ExportTaskIds=[task_id], WaiterConfig=FAST_WAITER)


@pytest.mark.parametrize(("interruption", "fmt"), [("SIGKILL", "VHD"), ("SIGTERM", "VHD"), ("SIGKILL", "VMDK"),
                                                    ("SIGKILL", "VHDX"), ("SIGKILL", "OVA")])
def test_interrupted_export_resumes_from_its_parts_bit_identically(tmp_path: Path, proxy: HoldingProxy,
                                                                   moto_server: S3Server, disks: dict[str, Path],
                                                                   interruption: str, fmt: str) -> None:
    """SIGKILL (nothing runs) or SIGTERM (the grace period ends, the upload is kept) mid-export.

    VHD and VHDX hold their block table in part 1, filled last (so part 1 is uploaded last), as an OVA
    holds its descriptor and manifest; the VMDK stream has no placeholder. Their ids and times (VMDK
    CID, VHD/VHDX UUIDs, VHD and tar times) must come out the same after the restart.
    """
    daemon = DaemonProcess(tmp_path, S3Server(proxy.endpoint, moto_server.profile), grace_period=0.5)
    configure(daemon, part_size=5 * MiB, parts_in_flight=1)
    daemon.start()
    key = ""
    try:
        ec2 = daemon.client()
        proxy.rearm(holds_parts_after(2))
        task_id, key = start_export(ec2, fmt)
        wait_until(lambda: proxy.held > 0 and 2 in checkpointed_parts(daemon, task_id),
                   "part 2 uploaded and checkpointed, part 3 held")
        if interruption == "SIGKILL":
            daemon.kill()
        else:
            assert daemon.stop() == 0
        assert moto_server.uploads(EXPORT_BUCKET) == [key]
        done_before = checkpointed_parts(daemon, task_id)
        before = len(proxy.parts)
        proxy.rearm(lambda method, query: False)
        proxy.release()
        daemon.start()
        ec2 = daemon.client()
        wait_completed(ec2, task_id)
        resent = {number for number, status in proxy.parts[before:] if status == 200}
        size = int(moto_server.client().head_object(Bucket=EXPORT_BUCKET, Key=key)["ContentLength"])
        assert size > 3 * 5 * MiB
        assert not resent & done_before and resent | done_before == set(range(1, -(-size // (5 * MiB)) + 1))
        assert moto_server.uploads(EXPORT_BUCKET) == []
        out = fetch(moto_server, key, tmp_path / f"resumed.{fmt.lower()}")
        if fmt == "OVA":
            with tarfile.open(out) as archive:
                disk = next(name for name in archive.getnames() if name.endswith(".vmdk"))
                archive.extract(disk, tmp_path, filter="data")
            same_disk(disks["dense-raw"], tmp_path / disk, "vmdk")
        else:
            same_disk(disks["dense-raw"], out, fmt.lower())
    finally:
        proxy.release()
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.stop()
    reference = tmp_path / "reference" / key.rsplit("/", 1)[1]  # a VMDK names its own file: same name
    reference.parent.mkdir()
    reference_export(daemon.state, task_id, reference)
    assert out.read_bytes() == reference.read_bytes()
