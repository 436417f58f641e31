"""CreateTags, DescribeTags, DeleteTags on images, snapshots and import/export tasks (docs/ec2-api.md §2.5)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..tasks import ids
from ..tasks.db import Tag
from ..tasks.engine import KINDS
from .operations import PAGE_LIMITS, ApiError, RequestContext, match_filters, missing_parameter, operation, paginate

MAX_TAGS_PER_RESOURCE = 50
MAX_KEY = 127
MAX_VALUE = 256
MAX_RESOURCES = 1000

#: Id prefix -> the NotFound error code of that resource type (§3.8).
NOT_FOUND = {
    ids.IMAGE: ("InvalidAMIID.NotFound", "The image id '[{}]' does not exist"),
    ids.SNAPSHOT: ("InvalidSnapshot.NotFound", "The snapshot '{}' does not exist."),
    ids.IMPORT_IMAGE_TASK: ("InvalidConversionTaskId.Malformed", "The conversion task ID '{}' does not exist"),
    ids.IMPORT_SNAPSHOT_TASK: ("InvalidConversionTaskId.Malformed", "The conversion task ID '{}' does not exist"),
    ids.EXPORT_IMAGE_TASK: ("InvalidExportTaskID.NotFound", "The export task ID '{}' does not exist"),
    ids.EXPORT_INSTANCE_TASK: ("InvalidExportTaskID.NotFound", "The export task ID '{}' does not exist"),
}


def tag_list(tags: Iterable[Tag]) -> list[dict[str, str]]:
    """Tags as the ``Tags``/``tagSet`` member of an output shape."""
    return [{"Key": tag.key, "Value": tag.value} for tag in tags]


def check_tags(tags: list[dict[str, Any]], where: str, *, need_key: bool = True) -> None:
    """Keys 1-127 characters, not ``aws:``; values up to 256 characters; at most 50."""
    if len(tags) > MAX_TAGS_PER_RESOURCE:
        raise ApiError("TagLimitExceeded", f"{where}: {len(tags)} tags; a resource takes at most "
                                           f"{MAX_TAGS_PER_RESOURCE}")
    for number, tag in enumerate(tags, 1):
        key = tag.get("Key")
        if key is None:
            if need_key:
                raise missing_parameter(f"{where}.{number}.Key")
            continue
        if not 1 <= len(key) <= MAX_KEY:
            raise ApiError("InvalidParameterValue", f"{where}.{number}.Key: a tag key has 1 to {MAX_KEY} characters")
        if key.lower().startswith("aws:"):
            raise ApiError("InvalidParameterValue", f"{where}.{number}.Key: tag keys starting with 'aws:' are "
                                                    "reserved for internal use")
        if len(tag.get("Value") or "") > MAX_VALUE:
            raise ApiError("InvalidParameterValue", f"{where}.{number}.Value: a tag value has at most "
                                                    f"{MAX_VALUE} characters")


async def resource_exists(ctx: RequestContext, resource_id: str) -> str:
    """The resource type of an existing resource; InvalidID / the type's NotFound otherwise."""
    service = ctx.service
    prefix = ids.prefix_of(resource_id)
    resource_type = ids.resource_type(resource_id)
    if prefix is None or resource_type is None or prefix not in NOT_FOUND:
        raise ApiError("InvalidID", f"The ID '{resource_id}' is not valid")
    if prefix == ids.IMAGE:
        image = await service.catalog.get_image(resource_id)
        found = image is not None and image.owner_id == ctx.account_id
    elif prefix == ids.SNAPSHOT:
        snapshot = await service.catalog.get_snapshot(resource_id)
        found = snapshot is not None and snapshot.owner_id == ctx.account_id
    else:
        task = await service.get_task(resource_id)
        found = task is not None and task.account_id == ctx.account_id
    if not found:
        code, message = NOT_FOUND[prefix]
        raise ApiError(code, message.format(resource_id))
    return resource_type


def resources_of(params: dict[str, Any]) -> list[str]:
    resources = params.get("Resources") or []
    if not resources:
        raise missing_parameter("ResourceId")
    if len(resources) > MAX_RESOURCES:
        raise ApiError("InvalidParameterValue", f"At most {MAX_RESOURCES} resource IDs per request")
    return list(dict.fromkeys(resources))


@operation("CreateTags")
async def create_tags(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
    resources = resources_of(params)
    tags = params.get("Tags") or []
    if not tags:
        raise missing_parameter("Tag")
    check_tags(tags, "Tag")
    types = {resource_id: await resource_exists(ctx, resource_id) for resource_id in resources}
    records = [Tag(resource_id, types[resource_id], tag["Key"], tag.get("Value") or "")
               for resource_id in resources for tag in tags]
    refused = await ctx.service.catalog.set_tags(records, MAX_TAGS_PER_RESOURCE)
    if refused is not None:
        raise ApiError("TagLimitExceeded", f"The maximum number of tags ({MAX_TAGS_PER_RESOURCE}) for resource "
                                           f"{refused} has been reached.")
    return {}


@operation("DeleteTags")
async def delete_tags(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
    resources = resources_of(params)
    tags = params.get("Tags")
    keys: list[tuple[str, str | None]] | None = None
    if tags:
        check_tags(tags, "Tag")
        keys = [(tag["Key"], tag.get("Value")) for tag in tags]
    for resource_id in resources:
        await resource_exists(ctx, resource_id)
    await ctx.service.catalog.delete_tags(resources, keys)
    return {}


@operation("DescribeTags")
async def describe_tags(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
    catalog = ctx.service.catalog
    own = ({image.id for image in await catalog.list_images() if image.owner_id == ctx.account_id}
           | {snapshot.id for snapshot in await catalog.list_snapshots() if snapshot.owner_id == ctx.account_id}
           | {task.id for task in await catalog.list_tasks(KINDS) if task.account_id == ctx.account_id})
    tags = [tag for tag in await catalog.list_tags() if tag.resource_id in own]
    getters = {"key": lambda tag: tag.key, "value": lambda tag: tag.value,
               "resource-id": lambda tag: tag.resource_id, "resource-type": lambda tag: tag.resource_type,
               "tag:": lambda tag: {tag.key: tag.value}}
    tags = match_filters(tags, params.get("Filters"), getters)
    page, token = paginate(tags, params.get("MaxResults"), params.get("NextToken"),
                           key=lambda tag: f"{tag.resource_id}\x00{tag.key}", scope=(ctx.action, params.get("Filters")),
                           limits=PAGE_LIMITS["DescribeTags"])
    out: dict[str, Any] = {"Tags": [{"Key": tag.key, "ResourceId": tag.resource_id,
                                     "ResourceType": tag.resource_type, "Value": tag.value} for tag in page]}
    if token:
        out["NextToken"] = token
    return out
