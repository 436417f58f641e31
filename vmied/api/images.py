"""DescribeImages and DeregisterImage over the catalog's images (docs/ec2-api.md §2.5, §4.1)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from ..tasks import ids
from ..tasks.db import ImageRecord, SnapshotRecord, Tag
from .operations import ApiError, RequestContext, match_filters, missing_parameter, operation, paginate
from .snapshots import volume_size
from .tags import tag_list

#: Owner aliases of images vmied never has (AWS's own, the marketplace's).
FOREIGN_OWNERS = ("amazon", "aws-marketplace", "aws-backup-vault")

PLATFORM_DETAILS = {"RunInstances": "Linux/UNIX", "RunInstances:0002": "Windows",
                    "RunInstances:0800": "Windows BYOL", "RunInstances:0006": "Windows with SQL Server Standard",
                    "RunInstances:0102": "Windows with SQL Server Enterprise",
                    "RunInstances:0202": "Windows with SQL Server Web",
                    "RunInstances:0100": "Linux with SQL Server Enterprise",
                    "RunInstances:0004": "Linux with SQL Server Standard",
                    "RunInstances:0200": "Linux with SQL Server Web"}


def timestamp(seconds: float) -> str:
    """``2025-01-15T10:22:31.000Z``, as EC2 prints CreationDate."""
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def image_output(image: ImageRecord, snapshots: dict[str, SnapshotRecord], tags: list[Tag]) -> dict[str, Any]:
    mappings = []
    for device in image.devices:
        snapshot = snapshots.get(device.snapshot_id)
        mappings.append({"DeviceName": device.device_name,
                         "Ebs": {"SnapshotId": device.snapshot_id, "VolumeSize": volume_size(device.virtual_size),
                                 "DeleteOnTermination": True, "VolumeType": "gp2",
                                 "Encrypted": bool(snapshot and snapshot.encrypted)}})
    out: dict[str, Any] = {
        "ImageId": image.id, "ImageLocation": f"{image.owner_id}/{image.name}", "State": image.state,
        "OwnerId": image.owner_id, "CreationDate": timestamp(image.created), "Public": False,
        "Architecture": image.architecture, "ImageType": "machine", "Name": image.name,
        "Description": image.description, "RootDeviceType": "ebs", "RootDeviceName": image.root_device_name,
        "BlockDeviceMappings": mappings, "VirtualizationType": "hvm", "Tags": tag_list(tags), "Hypervisor": "xen",
        "EnaSupport": True, "PlatformDetails": PLATFORM_DETAILS.get(image.usage_operation, "Linux/UNIX"),
        "UsageOperation": image.usage_operation or "RunInstances",
    }
    if image.boot_mode:
        out["BootMode"] = image.boot_mode
    if image.platform == "Windows":
        out["Platform"] = "windows"
    return out


def image_getters(tags: dict[str, list[Tag]], snapshots: dict[str, SnapshotRecord]) -> dict[str, Any]:
    def devices(attribute: str) -> Any:
        return lambda image: [getattr(device, attribute) for device in image.devices]

    none = lambda image: None  # noqa: E731  (filters on what vmied's images never have)
    return {
        "architecture": lambda image: image.architecture,
        "block-device-mapping.delete-on-termination": lambda image: [True for _ in image.devices],
        "block-device-mapping.device-name": devices("device_name"),
        "block-device-mapping.snapshot-id": devices("snapshot_id"),
        "block-device-mapping.volume-size": lambda image: [volume_size(d.virtual_size) for d in image.devices],
        "block-device-mapping.volume-type": lambda image: ["gp2" for _ in image.devices],
        "block-device-mapping.encrypted": lambda image: [bool(s.encrypted) for d in image.devices
                                                         if (s := snapshots.get(d.snapshot_id))],
        "creation-date": lambda image: timestamp(image.created),
        "description": lambda image: image.description,
        "ena-support": lambda image: True,
        "free-tier-eligible": lambda image: False,
        "hypervisor": lambda image: "xen",
        "image-allowed": lambda image: True,
        "image-id": lambda image: image.id,
        "image-type": lambda image: "machine",
        "is-public": lambda image: False,
        "kernel-id": none, "ramdisk-id": none, "owner-alias": none, "product-code": none,
        "product-code.type": none, "source-image-id": none, "source-image-region": none,
        "source-instance-id": none, "sriov-net-support": none, "state-reason-code": none,
        "state-reason-message": none,
        "manifest-location": lambda image: f"{image.owner_id}/{image.name}",
        "name": lambda image: image.name,
        "owner-id": lambda image: image.owner_id,
        "platform": lambda image: "windows" if image.platform == "Windows" else None,
        "root-device-name": lambda image: image.root_device_name,
        "root-device-type": lambda image: "ebs",
        "state": lambda image: image.state,
        "virtualization-type": lambda image: "hvm",
        "tag:": lambda image: {tag.key: tag.value for tag in tags[image.id]},
        "tag-key": lambda image: [tag.key for tag in tags[image.id]],
    }


def check_image_id(image_id: str) -> None:
    if not ids.is_valid(image_id, ids.IMAGE):
        raise ApiError("InvalidAMIID.Malformed", f"Invalid id: \"{image_id}\" (expecting \"ami-...\")")


def not_found(image_id: str) -> ApiError:
    return ApiError("InvalidAMIID.NotFound", f"The image id '[{image_id}]' does not exist")


def owner_matches(ctx: RequestContext, image: ImageRecord, owners: list[str]) -> bool:
    return any(owner == image.owner_id or (owner == "self" and image.owner_id == ctx.account_id)
               for owner in owners if owner not in FOREIGN_OWNERS)


@operation("DescribeImages")
async def describe_images(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
    catalog = ctx.service.catalog
    wanted = list(dict.fromkeys(params.get("ImageIds") or []))
    for image_id in wanted:
        check_image_id(image_id)
    # images are private (never shared or public): a caller sees its own account's
    images = [image for image in await catalog.list_images(wanted or None) if image.owner_id == ctx.account_id]
    if wanted:
        known = {image.id for image in images}
        missing = [image_id for image_id in wanted if image_id not in known]
        if missing:
            raise ApiError("InvalidAMIID.NotFound", f"The image ids '[{', '.join(missing)}]' do not exist"
                           if len(missing) > 1 else f"The image id '[{missing[0]}]' does not exist")
    if params.get("Owners"):
        images = [image for image in images if owner_matches(ctx, image, params["Owners"])]
    if params.get("ExecutableUsers"):  # images are private: only their owner may launch them
        images = [image for image in images if owner_matches(ctx, image, params["ExecutableUsers"])]
    tags = await catalog.tags_of([image.id for image in images])
    snapshot_ids = {device.snapshot_id for image in images for device in image.devices}
    snapshots = {s.id: s for s in await catalog.list_snapshots(snapshot_ids)} if snapshot_ids else {}
    images = match_filters(images, params.get("Filters"), image_getters(tags, snapshots))
    token = None
    if not wanted:
        images, token = paginate(images, params.get("MaxResults"), params.get("NextToken"),
                                 key=lambda image: image.id,
                                 scope=(ctx.action, params.get("Filters"), params.get("Owners"),
                                        params.get("ExecutableUsers")))
    out: dict[str, Any] = {"Images": [image_output(image, snapshots, tags[image.id]) for image in images]}
    if token:
        out["NextToken"] = token
    return out


@operation("DeregisterImage")
async def deregister_image(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
    image_id = params.get("ImageId")
    if not image_id:
        raise missing_parameter("ImageId")
    check_image_id(image_id)
    image = await ctx.service.catalog.get_image(image_id)
    if image is None or image.owner_id != ctx.account_id:
        raise not_found(image_id)
    results = await ctx.service.deregister_image(image, bool(params.get("DeleteAssociatedSnapshots")))
    out: dict[str, Any] = {"Return": True}
    if params.get("DeleteAssociatedSnapshots"):
        out["DeleteSnapshotResults"] = [{"SnapshotId": snapshot_id, "ReturnCode": code}
                                        for snapshot_id, code in results]
    return out
