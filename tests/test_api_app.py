"""The EC2 app around the handlers: Action/Version, unknown parameters, DryRun, errors, limits, request ids,
the log line and metrics, paging and filters as real botocore clients and paginators use them."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from botocore.parsers import create_parser

from tests.ec2_endpoint import (
    ACCESS_KEY,
    SECRET_KEY,
    boto3_client,
    call,
    ec2_server,
    echo_handler,
    endpoint_url,
    make_config,
)
from vmied import api, metrics
from vmied.api import wire
from vmied.api.app import MAX_BODY_BYTES, reconfigure_ec2_app
from vmied.api.operations import (
    ApiError,
    RequestContext,
    match_filters,
    paginate,
)
from vmied.config import Credential
from vmied.errors import CorruptImage, UsageError


async def signed_post(server: Any, body: bytes, method: str = "POST") -> tuple[int, dict[str, Any], dict[str, str]]:
    """A request signed by botocore's signer but with a body of our choosing (what boto3 would refuse to send)."""
    url = endpoint_url(server) + "/"
    if method == "GET":
        url, body = f"{url}?{body.decode()}", b""
    request = AWSRequest(method=method, url=url, data=body,
                         headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"})
    SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "ec2", "us-east-1").add_auth(request)
    async with aiohttp.ClientSession() as session, session.request(
            method, url, data=body, headers=dict(request.headers.items())) as response:
        xml = await response.read()
        headers = dict(response.headers)
    parsed: dict[str, Any] = create_parser("ec2").parse(
        {"body": xml, "headers": {}, "status_code": response.status}, None)
    return response.status, parsed, headers


@pytest.mark.parametrize(("body", "code", "fragment"), [
    (b"Action=RunInstances&Version=2016-11-15", "InvalidAction", "The action RunInstances is not valid"),
    (b"Action=describeimages&Version=2016-11-15", "InvalidAction", "describeimages"),
    (b"Version=2016-11-15", "MissingAction", "Action"),
    (b"Action=DescribeImages", "MissingParameter", "The request must contain the parameter Version"),
    (b"Action=DescribeImages&Version=2014-01-01", "NoSuchVersion", "(2014-01-01)"),
    (b"Action=DescribeImages&Version=2016-11-15&Foo=bar", "UnknownParameter", "The parameter Foo is not recognized"),
    (b"Action=DescribeImages&Version=2016-11-15&Filters.1.Name=state", "UnknownParameter", "Filters.1.Name"),
    (b"Action=DescribeImages&Version=2016-11-15&MaxResults=ten", "InvalidParameterValue", "MaxResults"),
    (b"Action=DeleteSnapshot&Version=2016-11-15", "MissingParameter", "SnapshotId"),
    (b"Action=DescribeImages&Version=2016-11-15&Action=DeleteSnapshot", "InvalidParameterValue", "once"),
])
async def test_request_refusals(body: bytes, code: str, fragment: str) -> None:
    handlers = {"DescribeImages": echo_handler({"Images": []}), "DeleteSnapshot": echo_handler()}
    async with ec2_server(make_config(), handlers) as server:
        status, parsed, headers = await signed_post(server, body)
    assert (status, parsed["Error"]["Code"]) == (400, code)
    assert fragment in parsed["Error"]["Message"]
    assert parsed["ResponseMetadata"]["RequestId"] == headers["x-amzn-RequestId"]
    assert not any(h.calls for h in handlers.values())  # type: ignore[attr-defined]


async def test_get_with_the_parameters_in_the_query_string() -> None:
    handler = echo_handler({"Images": []})
    async with ec2_server(make_config(), {"DescribeImages": handler}) as server:
        body = b"Action=DescribeImages&Version=2016-11-15&ImageId.1=ami-1"
        status, parsed, _ = await signed_post(server, body, "GET")
    assert status == 200, parsed
    assert handler.calls[0][1] == {"ImageIds": ["ami-1"]}


async def test_plain_get_goes_to_the_status_page_when_there_is_one() -> None:
    async def status_page(request: web.Request) -> web.StreamResponse:
        return web.Response(text="vmied status")

    async with ec2_server(make_config(), {}, status_page=status_page) as server, aiohttp.ClientSession() as session:
        async with session.get(endpoint_url(server) + "/") as response:
            assert (response.status, await response.text()) == (200, "vmied status")
        async with session.get(endpoint_url(server) + "/?Action=DescribeImages&Version=2016-11-15") as response:
            assert response.status == 403  # an EC2 request without a signature, not the status page


async def test_dry_run_is_412_and_never_reaches_the_handler() -> None:
    handler = echo_handler()
    async with ec2_server(make_config(), {"DeleteSnapshot": handler}) as server:
        with pytest.raises(ClientError) as caught:
            await call(boto3_client(server), "delete_snapshot", SnapshotId="snap-1", DryRun=True)
        await call(boto3_client(server), "delete_snapshot", SnapshotId="snap-1", DryRun=False)
    response = caught.value.response
    assert (response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"]) == ("DryRunOperation", 412)
    assert response["Error"]["Message"] == "Request would have succeeded, but DryRun flag is set."
    assert [params for _, params in handler.calls] == [{"SnapshotId": "snap-1", "DryRun": False}]


async def test_handler_errors_become_ec2_errors() -> None:
    async def in_use(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
        raise ApiError("InvalidSnapshot.InUse", f"The snapshot {params['SnapshotId']} is currently in use by ami-1")

    async def corrupt(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
        raise CorruptImage("VMDK grain table points past the end of the file")

    async with ec2_server(make_config(), {"DeleteSnapshot": in_use, "ImportSnapshot": corrupt}) as server:
        client = boto3_client(server)
        with pytest.raises(ClientError) as caught:
            await call(client, "delete_snapshot", SnapshotId="snap-1")
        assert caught.value.response["Error"] == {
            "Code": "InvalidSnapshot.InUse", "Message": "The snapshot snap-1 is currently in use by ami-1"}
        with pytest.raises(ClientError) as caught:
            await call(client, "import_snapshot", DiskContainer={"Url": "s3://b/k"})
        assert caught.value.response["Error"] == {
            "Code": "InvalidParameter", "Message": "VMDK grain table points past the end of the file"}
        assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400


async def test_requests_over_the_limit_are_refused_with_503_request_limit_exceeded() -> None:
    """One request in flight at most: a second one meanwhile gets 503 RequestLimitExceeded (what botocore
    retries as throttling), and once the first has its answer the next is served again."""
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
        entered.set()
        await release.wait()
        return {"Images": []}

    config = make_config()
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, max_requests=1))
    async with ec2_server(config, {"DescribeImages": slow}) as server:
        first = asyncio.ensure_future(signed_post(server, b"Action=DescribeImages&Version=2016-11-15"))
        await entered.wait()
        status, parsed, _ = await signed_post(server, b"Action=DescribeImages&Version=2016-11-15")
        assert status == 503
        assert parsed["Error"] == {"Code": "RequestLimitExceeded", "Message": "Request limit exceeded."}
        release.set()
        assert (await first)[0] == 200
        assert (await signed_post(server, b"Action=DescribeImages&Version=2016-11-15"))[0] == 200


@pytest.mark.parametrize("result", [{"NoSuchMember": 1}, {"Images": "not a list"}])
async def test_unexpected_failures_are_500_internal_error_without_details(
        result: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    async def broken(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
        return result

    async def crashing(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("secret internal detail")

    async with ec2_server(make_config(), {"DescribeImages": broken, "DeleteSnapshot": crashing}) as server:
        for body in (b"Action=DescribeImages&Version=2016-11-15", b"Action=DeleteSnapshot&Version=2016-11-15"
                                                                  b"&SnapshotId=snap-1"):
            status, parsed, _ = await signed_post(server, body)
            assert (status, parsed["Error"]) == (500, {"Code": "InternalError",
                                                       "Message": "An internal error has occurred"})
    records = [r for r in caplog.records if r.name == "vmied.api"]
    assert len(records) == 2  # still one line per request, carrying the traceback
    assert all(r.levelno == logging.ERROR and r.exc_info and r.__dict__["code"] == "InternalError" for r in records)
    assert "secret internal detail" in str(records[1].exc_info[1])  # type: ignore[index]


async def test_body_over_the_cap_is_refused() -> None:
    async with ec2_server(make_config(), {"DescribeImages": echo_handler()}) as server:
        status, parsed, _ = await signed_post(
            server, b"Action=DescribeImages&Version=2016-11-15&Foo=" + b"x" * MAX_BODY_BYTES)
    assert (status, parsed["Error"]["Code"]) == (413, "RequestEntityTooLarge")


async def test_unregistered_action_is_unsupported_not_a_crash() -> None:
    async with ec2_server(make_config(), {}) as server:
        status, parsed, _ = await signed_post(server, b"Action=ImportVolume&Version=2016-11-15&Image.Format=RAW"
                                                      b"&Image.Bytes=1&Image.ImportManifestUrl=u&Volume.Size=1")
    assert (status, parsed["Error"]["Code"]) == (400, "UnsupportedOperation")


async def test_one_log_line_and_metrics_per_request(caplog: pytest.LogCaptureFixture) -> None:
    def count(action: str, code: str) -> float:
        value: float = metrics.REGISTRY.get_sample_value(
            "vmied_api_requests_total", {"action": action, "code": code}) or 0.0
        return value

    before = (count("DescribeImages", "OK"), count("other", "InvalidAction"))
    latency_before = metrics.REGISTRY.get_sample_value(
        "vmied_api_request_duration_seconds_count", {"action": "DescribeImages"}) or 0.0
    caplog.set_level(logging.INFO, logger="vmied.api")
    async with ec2_server(make_config(), {"DescribeImages": echo_handler({"Images": []})}) as server:
        answer = await call(boto3_client(server), "describe_images")
        await signed_post(server, b"Action=Nope&Version=2016-11-15")
    records = [r for r in caplog.records if r.name == "vmied.api"]
    assert len(records) == 2
    first = records[0].__dict__
    assert first["request_id"] == answer["ResponseMetadata"]["RequestId"]
    assert (first["action"], first["code"], first["status"], first["access_key_id"]) == (
        "DescribeImages", "OK", 200, ACCESS_KEY)
    assert first["duration_ms"] >= 0 and first["remote"] == "127.0.0.1"
    assert (records[1].__dict__["action"], records[1].__dict__["code"]) == ("unknown", "InvalidAction")
    assert (count("DescribeImages", "OK"), count("other", "InvalidAction")) == (before[0] + 1, before[1] + 1)
    assert metrics.REGISTRY.get_sample_value(
        "vmied_api_request_duration_seconds_count", {"action": "DescribeImages"}) == latency_before + 1


def test_load_handlers_imports_what_exists_and_refuses_a_missing_module(monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(api.load_handlers()) == set(api.HANDLER_MODULES) - api.NOT_YET_WRITTEN
    monkeypatch.setattr(api, "HANDLER_MODULES", (*api.HANDLER_MODULES, "no_such_handlers"))
    with pytest.raises(ImportError, match="no_such_handlers"):
        api.load_handlers()


# --- paging and filters, as botocore's paginators and the CLI drive them ------------------------------------

SNAPSHOTS = [{"SnapshotId": f"snap-{i:017x}", "State": "completed" if i % 3 else "pending",
              "Tags": [{"Key": "team", "Value": "infra" if i % 2 else "web"}]} for i in range(1, 12)]


async def describe_snapshots(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
    getters = {"status": lambda s: s["State"], "snapshot-id": lambda s: s["SnapshotId"], "tag:": lambda s: s["Tags"],
               "tag-key": lambda s: [t["Key"] for t in s["Tags"]]}
    found = match_filters(SNAPSHOTS, params.get("Filters"), getters)
    page, token = paginate(found, params.get("MaxResults"), params.get("NextToken"), key=lambda s: s["SnapshotId"],
                           scope=(ctx.action, params.get("Filters")), limits=(5, 1000))
    return {"Snapshots": page, "NextToken": token}


async def test_botocore_paginator_walks_every_page_once() -> None:
    async with ec2_server(make_config(), {"DescribeSnapshots": describe_snapshots}) as server:
        client = boto3_client(server)
        paginator = client.get_paginator("describe_snapshots")

        def walk(**params: Any) -> list[list[str]]:
            return [[s["SnapshotId"] for s in page["Snapshots"]] for page in paginator.paginate(**params)]

        pages = await asyncio.to_thread(walk, PaginationConfig={"PageSize": 5})
        assert [len(p) for p in pages] == [5, 5, 1]
        assert list(itertools.chain(*pages)) == [s["SnapshotId"] for s in SNAPSHOTS]
        filtered = await asyncio.to_thread(walk, Filters=[{"Name": "status", "Values": ["completed"]},
                                                          {"Name": "tag:team", "Values": ["inf*"]}],
                                           PaginationConfig={"PageSize": 5})
        assert list(itertools.chain(*filtered)) == [s["SnapshotId"] for s in SNAPSHOTS
                                     if s["State"] == "completed" and s["Tags"][0]["Value"] == "infra"]
        first = await call(client, "describe_snapshots", MaxResults=5)
        with pytest.raises(ClientError) as caught:  # a token of another query
            await call(client, "describe_snapshots", MaxResults=5, NextToken=first["NextToken"],
                       Filters=[{"Name": "status", "Values": ["pending"]}])
        assert caught.value.response["Error"]["Code"] == "InvalidNextToken"
        for bad in ("garbage", "eyJ2IjoyfQ==", first["NextToken"][:-4]):
            with pytest.raises(ClientError) as caught:
                await call(client, "describe_snapshots", MaxResults=5, NextToken=bad)
            assert caught.value.response["Error"]["Code"] == "InvalidNextToken"
        with pytest.raises(ClientError) as caught:
            await call(client, "describe_snapshots", MaxResults=1001)
        assert caught.value.response["Error"]["Code"] == "InvalidParameterValue"


def test_paginate_survives_items_removed_between_pages() -> None:
    items = [f"i-{n:02d}" for n in range(10)]
    page, token = paginate(items, 4, None, key=str)
    assert page == items[:4] and token
    remaining = [i for i in items if i not in ("i-03", "i-04")]
    page, token = paginate(remaining, 4, token, key=str)
    assert page == ["i-05", "i-06", "i-07", "i-08"]
    page, token = paginate(remaining, 4, token, key=str)
    assert (page, token) == (["i-09"], None)
    assert paginate(items, None, None, key=str) == (items, None)
    assert paginate(items, 10, None, key=str) == (items, None)


def test_match_filters_semantics() -> None:
    items = [{"id": "a", "state": "available", "public": False, "size": 8, "tags": {"Name": "web*1"}},
             {"id": "b", "state": "failed", "public": True, "size": 16, "tags": {}}]
    getters = {"state": lambda i: i["state"], "is-public": lambda i: i["public"], "volume-size": lambda i: i["size"],
               "tag:": lambda i: i["tags"], "image-id": lambda i: i["id"]}

    def ids(*filters: dict[str, Any]) -> list[str]:
        return [i["id"] for i in match_filters(items, list(filters), getters)]

    assert ids() == ["a", "b"]
    assert ids({"Name": "state", "Values": ["failed", "available"]}) == ["a", "b"]  # values OR
    assert ids({"Name": "state", "Values": ["avail*"]}, {"Name": "is-public", "Values": ["false"]}) == ["a"]
    assert ids({"Name": "state", "Values": ["a?ailable"]}) == ["a"]
    assert ids({"Name": "volume-size", "Values": ["16"]}) == ["b"]
    assert ids({"Name": "tag:Name", "Values": ["web\\*1"]}) == ["a"]  # escaped wildcard is literal
    assert ids({"Name": "tag:Name", "Values": ["web\\*2"]}) == []
    assert ids({"Name": "state", "Values": ["AVAILABLE"]}) == []  # values are case-sensitive
    for bad, code in [({"Name": "colour", "Values": ["red"]}, "InvalidParameterValue"),
                      ({"Name": "tag:", "Values": ["x"]}, "InvalidParameterValue"),
                      ({"Name": "state"}, "InvalidParameterValue"),
                      ({"Values": ["x"]}, "MissingParameter"),
                      ({"Name": "state", "Values": ["x"] * 201}, "FilterLimitExceeded")]:
        with pytest.raises(ApiError) as caught:
            ids(bad)
        assert caught.value.code == code
    with pytest.raises(ApiError, match="The filter 'colour' is invalid"):
        ids({"Name": "colour", "Values": ["red"]})


def test_wire_keeps_the_filter_values_in_order() -> None:
    pairs = wire.parse_form("Filter.1.Name=state&Filter.1.Value.2=b&Filter.1.Value.1=a")
    assert wire.decode_request("DescribeImages", pairs) == {"Filters": [{"Name": "state", "Values": ["a", "b"]}]}


async def test_endpoint_url_with_a_path_is_served_and_signed_over_that_path() -> None:
    handler = echo_handler({"Images": []})
    async with ec2_server(make_config(), {"DescribeImages": handler}) as server:
        await call(boto3_client(server, path="/vmie"), "describe_images")
    assert len(handler.calls) == 1


async def test_reconfigure_swaps_credentials_for_the_next_request() -> None:
    handler = echo_handler({"Images": []})
    new_key = Credential(access_key_id="AKIDROTATED", secret_access_key="rotated-secret",
                         policy={"Statement": [{"Effect": "Deny", "Action": "ec2:*", "Resource": "*"}]})
    async with ec2_server(make_config(), {"DescribeImages": handler}) as server:
        await call(boto3_client(server), "describe_images")
        reconfigure_ec2_app(server.app, make_config(new_key))
        with pytest.raises(ClientError) as caught:
            await call(boto3_client(server), "describe_images")
        assert caught.value.response["Error"]["Code"] == "AuthFailure"
        with pytest.raises(ClientError) as caught:
            await call(boto3_client(server, access_key="AKIDROTATED", secret_key="rotated-secret"), "describe_images")
        assert caught.value.response["Error"]["Code"] == "UnauthorizedOperation"
        with pytest.raises(UsageError):
            reconfigure_ec2_app(server.app, make_config(Credential(
                access_key_id="AKIDBAD", secret_access_key="s", policy={"Statement": [{"Effect": "Maybe"}]})))
        with pytest.raises(ClientError) as caught:  # the refused configuration changed nothing
            await call(boto3_client(server, access_key="AKIDBAD", secret_key="s"), "describe_images")
        assert caught.value.response["Error"]["Code"] == "AuthFailure"
    assert len(handler.calls) == 1
