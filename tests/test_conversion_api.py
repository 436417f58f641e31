"""The legacy conversion tasks through the real daemon process with boto3 (ImportVolume and ImportInstance are
not in the AWS CLI): ImportVolume, ImportInstance, DescribeConversionTasks and its waiters,
CancelConversionTask, answers shaped as botocore parses them (docs/ec2-api.md §2.4)."""
# ruff: noqa: F811  (the fixtures are imported from tests.s3server and tests.test_export_api)

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from tests.daemon import corrupt_vmdk, make_vmdk, upload
from tests.helpers import MiB
from tests.s3server import BUCKET, S3Server, aws_files, moto_server  # noqa: F401  (fixtures)
from tests.test_export_api import (  # noqa: F401  (fixtures)
    EXPORT_BUCKET,
    FAST_WAITER,
    daemon,
    disks,
    ec2,
    error_of,
    fetch,
    import_instance,
    instance,
    same_disk,
)


def import_manifest(s3: S3Server, image: Path, name: str, cuts: list[int], size: int | None = None) -> str:
    """Upload ``image`` in parts cut at ``cuts`` and an AWS import manifest listing them; its pre-signed URL."""
    client = s3.client()
    data = image.read_bytes()
    bounds = [0, *cuts, len(data)]
    parts = []
    for index, (start, end) in enumerate(pairwise(bounds)):
        key = f"manifests/{name}.part{index}"
        client.put_object(Bucket=BUCKET, Key=key, Body=data[start:end])
        url = client.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": key})
        parts.append(f'<part index="{index}"><byte-range end="{end - 1}" start="{start}"/><key>{key}</key>'
                     f"<get-url>{escape(url)}</get-url></part>")
    manifest = (f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n<manifest><version>2010-11-15</version>'
                f"<file-format>VMDK</file-format><import><size>{size or len(data)}</size><volume-size>1</volume-size>"
                f'<parts count="{len(parts)}">{"".join(parts)}</parts></import></manifest>')
    client.put_object(Bucket=BUCKET, Key=f"manifests/{name}.xml", Body=manifest.encode())
    url: str = client.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": f"manifests/{name}.xml"})
    return url


def test_import_instance_from_an_import_manifest_then_export_it(ec2: Any, moto_server: S3Server,
                                                                disks: dict[str, Path], tmp_path: Path) -> None:
    vmdk = disks["vms/boot.vmdk"]
    third = vmdk.stat().st_size // 3
    url = import_manifest(moto_server, vmdk, "three", [third, 2 * third])
    task = import_instance(ec2, url=url)
    ec2.get_waiter("conversion_task_completed").wait(ConversionTaskIds=[task["ConversionTaskId"]],
                                                     WaiterConfig=FAST_WAITER)
    export = ec2.create_instance_export_task(
        InstanceId=task["ImportInstance"]["InstanceId"], TargetEnvironment="vmware",
        ExportToS3Task={"DiskImageFormat": "RAW", "S3Bucket": EXPORT_BUCKET})["ExportTask"]
    ec2.get_waiter("export_task_completed").wait(ExportTaskIds=[export["ExportTaskId"]], WaiterConfig=FAST_WAITER)
    same_disk(disks["raw"], fetch(moto_server, export["ExportToS3Task"]["S3Key"], tmp_path / "out.raw"), "raw")


def test_a_manifest_whose_parts_do_not_add_up_fails_the_conversion(ec2: Any, moto_server: S3Server,
                                                                   disks: dict[str, Path]) -> None:
    vmdk = disks["vms/boot.vmdk"]
    url = import_manifest(moto_server, vmdk, "short", [vmdk.stat().st_size // 2], size=vmdk.stat().st_size + 1)
    task = ec2.import_volume(AvailabilityZone="us-east-1a", Volume={"Size": 1}, Image={
        "Format": "VMDK", "Bytes": 1, "ImportManifestUrl": url})["ConversionTask"]
    ec2.get_waiter("conversion_task_cancelled").wait(ConversionTaskIds=[task["ConversionTaskId"]],
                                                     WaiterConfig=FAST_WAITER)
    done = ec2.describe_conversion_tasks(ConversionTaskIds=[task["ConversionTaskId"]])["ConversionTasks"][0]
    assert done["StatusMessage"].startswith("ClientError: Disk validation failed [the parts of the import manifest "
                                            f"cover {vmdk.stat().st_size} bytes")


def test_import_volume_and_describe_conversion_tasks(ec2: Any, moto_server: S3Server) -> None:
    url = moto_server.client().generate_presigned_url("get_object", Params={"Bucket": BUCKET,
                                                                           "Key": "vms/boot.vmdk"})
    task = ec2.import_volume(AvailabilityZone="us-east-1a", Description="data disk",
                             Image={"Format": "VMDK", "Bytes": 1300687360, "ImportManifestUrl": url},
                             Volume={"Size": 16})["ConversionTask"]
    task_id = task["ConversionTaskId"]
    assert task_id.startswith("import-vol-") and task["State"] == "active" and task["StatusMessage"] == "Pending"
    volume = task["ImportVolume"]
    assert volume["Image"] == {"Format": "VMDK", "Size": 1300687360, "ImportManifestUrl": url}
    assert volume["Volume"]["Id"].startswith("vol-") and volume["Volume"]["Size"] == 16
    assert (volume["AvailabilityZone"], volume["Description"], volume["BytesConverted"]) == (
        "us-east-1a", "data disk", 0)
    assert task["ExpirationTime"].endswith("Z")
    ec2.get_waiter("conversion_task_completed").wait(ConversionTaskIds=[task_id], WaiterConfig=FAST_WAITER)
    done = ec2.describe_conversion_tasks(ConversionTaskIds=[task_id])["ConversionTasks"][0]
    assert done["State"] == "completed" and done["ImportVolume"]["BytesConverted"] == 4 * MiB + 64 * 1024
    listed = [t["ConversionTaskId"] for t in ec2.describe_conversion_tasks()["ConversionTasks"]]
    assert task_id in listed
    snapshots = ec2.describe_snapshots(Filters=[{"Name": "description", "Values": [
        f"Created by AWS-VMImport service for {task_id}"]}])["Snapshots"]
    assert len(snapshots) == 1
    assert error_of(lambda: ec2.describe_conversion_tasks(ConversionTaskIds=["bogus-id"])
                    )[0] == "InvalidConversionTaskId.Malformed"
    assert error_of(lambda: ec2.describe_conversion_tasks(ConversionTaskIds=["import-i-ffvko9js"])
                    )[0] == "InvalidConversionTaskId"


def test_import_instance_conversion_task_shape(ec2: Any, instance: dict[str, Any]) -> None:
    assert instance["ConversionTaskId"].startswith("import-i-")
    details = instance["ImportInstance"]
    assert details["InstanceId"].startswith("i-") and details["Platform"] == "Windows"
    assert details["Description"] == "legacy"
    [volume] = details["Volumes"]
    assert volume["Image"]["Format"] == "VMDK" and volume["Volume"]["Size"] == 1
    done = ec2.describe_conversion_tasks(ConversionTaskIds=[instance["ConversionTaskId"]])["ConversionTasks"][0]
    assert done["State"] == "completed"
    assert done["ImportInstance"]["Volumes"][0]["Status"] == "completed"
    assert done["ImportInstance"]["Volumes"][0]["BytesConverted"] == 4 * MiB + 64 * 1024




def test_import_volume_refusals(ec2: Any) -> None:
    image = {"Format": "VMDK", "Bytes": 1, "ImportManifestUrl": f"s3://{BUCKET}/vms/boot.vmdk"}

    def volume(**changes: Any) -> Any:
        return ec2.import_volume(**{"AvailabilityZone": "us-east-1a", "Image": image, "Volume": {"Size": 1},
                                    **changes})

    assert error_of(lambda: volume(AvailabilityZoneId="use1-az1"))[0] == "InvalidParameterCombination"
    assert error_of(lambda: ec2.import_volume(Image=image, Volume={"Size": 1}))[0] == "MissingParameter"
    assert error_of(lambda: volume(Image={**image, "ImportManifestUrl": "ftp://x/y"}))[0] == "InvalidParameter"
    assert error_of(lambda: volume(Image={**image, "Format": "QCOW2"}))[0] == "InvalidParameterValue"
    assert error_of(lambda: volume(Volume={"Size": 0}))[0] == "InvalidParameterValue"
    assert error_of(lambda: ec2.cancel_conversion_task(ConversionTaskId="import-vol-0123456789abcdef0")
                    )[0] == "InvalidConversionTaskId"
    assert error_of(lambda: volume(DryRun=True))[0] == "DryRunOperation"


def test_a_conversion_that_fails_ends_cancelled_with_the_reason(ec2: Any, moto_server: S3Server,
                                                                disks: dict[str, Path], tmp_path: Path) -> None:
    upload(moto_server, corrupt_vmdk(disks["vms/boot.vmdk"], tmp_path / "corrupt.vmdk"), "vms/corrupt.vmdk")
    task = import_instance(ec2, "vms/corrupt.vmdk")
    ec2.get_waiter("conversion_task_cancelled").wait(ConversionTaskIds=[task["ConversionTaskId"]],
                                                     WaiterConfig=FAST_WAITER)
    done = ec2.describe_conversion_tasks(ConversionTaskIds=[task["ConversionTaskId"]])["ConversionTasks"][0]
    assert done["State"] == "cancelled" and done["StatusMessage"].startswith("ClientError: ")
    assert done["ImportInstance"]["Volumes"][0]["Status"] == "cancelled"


def test_a_disk_larger_than_its_volume_fails(ec2: Any, moto_server: S3Server, tmp_path: Path) -> None:
    raw = tmp_path / "two-gib.raw"
    with open(raw, "wb") as out:
        out.truncate(2 << 30)  # all zero: the VMDK stream of it is tiny
    upload(moto_server, make_vmdk(raw, tmp_path / "two-gib.vmdk"), "vms/two-gib.vmdk")
    task = ec2.import_volume(AvailabilityZone="us-east-1a", Volume={"Size": 1}, Image={
        "Format": "VMDK", "Bytes": 1, "ImportManifestUrl": f"s3://{BUCKET}/vms/two-gib.vmdk"})["ConversionTask"]
    ec2.get_waiter("conversion_task_cancelled").wait(ConversionTaskIds=[task["ConversionTaskId"]],
                                                     WaiterConfig=FAST_WAITER)
    done = ec2.describe_conversion_tasks(ConversionTaskIds=[task["ConversionTaskId"]])["ConversionTasks"][0]
    assert done["StatusMessage"] == (f"ClientError: disk image 1 holds a {2 << 30}-byte disk, larger than its "
                                     "volume of 1 GiB")
