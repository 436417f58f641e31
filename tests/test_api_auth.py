"""SigV4 on the EC2 endpoint with a real boto3 client: every failure code of docs/ec2-api.md §3.8."""

from __future__ import annotations

import asyncio
import calendar
import json
import os
import sys
import time
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp
import pytest
from botocore import UNSIGNED
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from botocore.parsers import create_parser

from tests.ec2_endpoint import (
    ACCESS_KEY,
    SECRET_KEY,
    Clock,
    boto3_client,
    call,
    ec2_server,
    echo_handler,
    endpoint_url,
    make_config,
)
from vmied.api import wire
from vmied.api.auth import SignedRequest, SigV4Verifier
from vmied.api.operations import ApiError
from vmied.config import Credential

IMAGES = {"Images": [{"ImageId": "ami-0123456789abcdef0", "State": "available"}]}


def client_error(exc_info: pytest.ExceptionInfo[ClientError]) -> tuple[str, int, str]:
    response: dict[str, Any] = exc_info.value.response
    return response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"], response["Error"]["Message"]


async def test_signed_boto3_call_reaches_the_handler() -> None:
    handler = echo_handler(IMAGES)
    async with ec2_server(make_config(), {"DescribeImages": handler}) as server:
        answer = await call(boto3_client(server), "describe_images", ImageIds=["ami-0123456789abcdef0"])
    assert answer["Images"] == IMAGES["Images"]
    ctx, params = handler.calls[0]
    assert params == {"ImageIds": ["ami-0123456789abcdef0"]}
    assert (ctx.access_key_id, ctx.account_id, ctx.region, ctx.action) == (
        ACCESS_KEY, "123456789012", "us-east-1", "DescribeImages")
    assert answer["ResponseMetadata"]["RequestId"] == ctx.request_id


@pytest.mark.parametrize(("client_options", "code", "status"), [
    ({"signature_version": UNSIGNED}, "MissingAuthenticationToken", 403),
    ({"secret_key": "not-the-secret"}, "SignatureDoesNotMatch", 403),
    ({"access_key": "AKIDUNKNOWN"}, "AuthFailure", 401),
    ({"region": "eu-west-3"}, "SignatureDoesNotMatch", 403),
    ({"session_token": "a-token-nobody-issued"}, "InvalidClientTokenId", 403),
])
async def test_authentication_failures(client_options: dict[str, Any], code: str, status: int) -> None:
    handler = echo_handler(IMAGES)
    async with ec2_server(make_config(), {"DescribeImages": handler}) as server:
        with pytest.raises(ClientError) as caught:
            await call(boto3_client(server, **client_options), "describe_images")
    assert client_error(caught)[:2] == (code, status)
    assert not handler.calls


async def test_other_region_is_named_in_the_refusal() -> None:
    async with ec2_server(make_config(), {}) as server:
        with pytest.raises(ClientError) as caught:
            await call(boto3_client(server, region="eu-west-3"), "describe_images")
    assert "Credential should be scoped to a valid region, not 'eu-west-3'" in client_error(caught)[2]


@pytest.mark.parametrize("offset", [-16 * 60, 16 * 60])
async def test_clock_skew_beyond_the_limit_is_request_expired(offset: float) -> None:
    clock = Clock()
    clock.now = time.time() + offset
    async with ec2_server(make_config(), {"DescribeImages": echo_handler()}, clock) as server:
        with pytest.raises(ClientError) as caught:
            await call(boto3_client(server), "describe_images")
    assert client_error(caught)[:2] == ("RequestExpired", 400)


async def test_clock_skew_limit_comes_from_the_configuration() -> None:
    clock = Clock()
    clock.now = time.time() + 120
    handler = echo_handler()
    async with ec2_server(make_config(max_clock_skew=60), {"DescribeImages": handler}, clock) as server:
        with pytest.raises(ClientError) as caught:
            await call(boto3_client(server), "describe_images")
        assert client_error(caught)[0] == "RequestExpired"
    async with ec2_server(make_config(max_clock_skew=300), {"DescribeImages": handler}, clock) as server:
        await call(boto3_client(server), "describe_images")


async def test_session_token_must_match() -> None:
    credential = Credential(access_key_id="ASIATEMPORARY", secret_access_key="temporary-secret",
                            session_token="the-session-token")
    handler = echo_handler()
    async with ec2_server(make_config(credential), {"DescribeImages": handler}) as server:
        keys = {"access_key": "ASIATEMPORARY", "secret_key": "temporary-secret"}
        await call(boto3_client(server, session_token="the-session-token", **keys), "describe_images")
        for token in (None, "another-token"):
            with pytest.raises(ClientError) as caught:
                await call(boto3_client(server, session_token=token, **keys), "describe_images")
            assert client_error(caught)[:2] == ("InvalidClientTokenId", 403)
    assert len(handler.calls) == 1


# --- pre-signed URLs --------------------------------------------------------------------------------------

def presigned_url(server: Any, expires: int = 300, method: str = "GET", **client_options: Any) -> str:
    url: str = boto3_client(server, **client_options).generate_presigned_url(
        "describe_images", Params={"ImageIds": ["ami-0123456789abcdef0"]}, ExpiresIn=expires, HttpMethod=method)
    return url


async def fetch(method: str, url: str, **options: Any) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.request(method, url, **options) as response:
        body = await response.read()
    parsed: dict[str, Any] = create_parser("ec2").parse(
        {"body": body, "headers": {}, "status_code": response.status},
        wire.operation_model("DescribeImages").output_shape)
    return response.status, parsed


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_presigned_url_is_accepted(method: str) -> None:
    handler = echo_handler(IMAGES)
    async with ec2_server(make_config(), {"DescribeImages": handler}) as server:
        status, parsed = await fetch(method, presigned_url(server, method=method))
    assert status == 200, parsed
    assert parsed["Images"] == IMAGES["Images"]
    assert handler.calls[0][1] == {"ImageIds": ["ami-0123456789abcdef0"]}


def tamper(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = [(key, changes.get(key, value)) for key, value in parse_qsl(parts.query, keep_blank_values=True)]
    return urlunsplit(parts._replace(query=urlencode(query)))


@pytest.mark.parametrize(("changes", "code"), [
    ({"ImageId.1": "ami-0fedcba9876543210"}, "SignatureDoesNotMatch"),
    ({"X-Amz-Expires": "3600"}, "SignatureDoesNotMatch"),
    ({"X-Amz-Signature": "0" * 64}, "SignatureDoesNotMatch"),
    ({"X-Amz-Expires": "9999999"}, "IncompleteSignature"),
    ({"X-Amz-Credential": "AKIDEXAMPLE/20250101/us-east-1/ec2"}, "IncompleteSignature"),
    ({"X-Amz-Algorithm": "AWS4-HMAC-SHA1"}, "IncompleteSignature"),
])
async def test_tampered_presigned_url_is_refused(changes: dict[str, str], code: str) -> None:
    handler = echo_handler(IMAGES)
    async with ec2_server(make_config(), {"DescribeImages": handler}) as server:
        status, parsed = await fetch("GET", tamper(presigned_url(server), **changes))
    assert parsed["Error"]["Code"] == code
    assert status in (400, 403)
    assert not handler.calls


async def test_presigned_url_expires() -> None:
    clock = Clock()
    async with ec2_server(make_config(), {"DescribeImages": echo_handler(IMAGES)}, clock) as server:
        url = presigned_url(server, expires=60)
        clock.now = time.time() + 61
        status, parsed = await fetch("GET", url)
    assert (status, parsed["Error"]["Code"]) == (400, "RequestExpired")


async def test_presigned_url_with_extra_body_parameters_is_refused() -> None:
    """The body of a pre-signed POST is covered by the signature: nothing can be slipped in."""
    handler = echo_handler(IMAGES)
    async with ec2_server(make_config(), {"DescribeImages": handler}) as server:
        status, parsed = await fetch("POST", presigned_url(server, method="POST"), data=b"Owner.1=self",
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert (status, parsed["Error"]["Code"]) == (403, "SignatureDoesNotMatch")
    assert not handler.calls


# --- hand-made signatures ------------------------------------------------------------------------------------

def signed_headers(url: str, body: bytes, *, service: str = "ec2", region: str = "us-east-1",
                   secret: str = SECRET_KEY) -> dict[str, str]:
    request = AWSRequest(method="POST", url=url, data=body,
                         headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"})
    SigV4Auth(Credentials(ACCESS_KEY, secret), service, region).add_auth(request)
    return dict(request.headers.items())


async def post(server: Any, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    return await fetch("POST", endpoint_url(server) + "/", data=body, headers=headers)


async def test_signature_for_another_service_is_refused() -> None:
    body = b"Action=DescribeImages&Version=2016-11-15"
    async with ec2_server(make_config(), {"DescribeImages": echo_handler()}) as server:
        status, parsed = await post(server, body, signed_headers(endpoint_url(server) + "/", body, service="s3"))
    assert (status, parsed["Error"]["Code"]) == (403, "SignatureDoesNotMatch")
    assert "scoped to correct service: 'ec2'" in parsed["Error"]["Message"]


@pytest.mark.parametrize(("authorization", "fragment"), [
    ("AWS AKIDEXAMPLE:c2lnbmF0dXJl", "Unsupported authorization type 'AWS'"),
    ("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261128/us-east-1/ec2/aws4_request", "'Signature' parameter"),
    ("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/us-east-1, SignedHeaders=host, Signature=00", "5 slash-delimited"),
    ("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261128/us-east-1/ec2/aws4_request, "
     "SignedHeaders=content-type;x-amz-date, Signature=00", "'Host' must be a 'SignedHeader'"),
    ("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261128/us-east-1/ec2/aws4_request, "
     "SignedHeaders=host;x-amz-date;x-custom, Signature=00", "'x-custom' is not in the request"),
])
async def test_malformed_authorization_is_incomplete_signature(authorization: str, fragment: str) -> None:
    body = b"Action=DescribeImages&Version=2016-11-15"
    clock = Clock()
    clock.now = calendar.timegm(time.strptime("20261128T023000Z", "%Y%m%dT%H%M%SZ"))
    headers = {"Authorization": authorization, "X-Amz-Date": "20261128T023000Z",
               "Content-Type": "application/x-www-form-urlencoded"}
    async with ec2_server(make_config(), {"DescribeImages": echo_handler()}, clock) as server:
        status, parsed = await post(server, body, headers)
    assert (status, parsed["Error"]["Code"]) == (400, "IncompleteSignature")
    assert fragment in parsed["Error"]["Message"]


async def test_header_and_query_authentication_together_are_refused() -> None:
    async with ec2_server(make_config(), {"DescribeImages": echo_handler()}) as server:
        url = presigned_url(server)
        status, parsed = await fetch("GET", url, headers={"Authorization": "AWS4-HMAC-SHA256 Credential=x"})
    assert (status, parsed["Error"]["Code"]) == (400, "IncompleteSignature")


def test_verifier_signs_non_root_paths_and_reports_the_credential() -> None:
    """The canonical URI is the raw path (the CLI pointed at http://host:port/vmie signs /vmie)."""
    body = b"Action=DescribeImages&Version=2016-11-15"
    headers = signed_headers("http://127.0.0.1:8080/vmie", body)
    amz_date = headers["X-Amz-Date"]
    verifier = SigV4Verifier([Credential(ACCESS_KEY, SECRET_KEY)], "us-east-1", 900,
                             clock=lambda: calendar.timegm(time.strptime(amz_date, "%Y%m%dT%H%M%SZ")))
    header_list = [("Host", "127.0.0.1:8080"), *headers.items()]
    request = SignedRequest("POST", "/vmie", [], header_list, body)
    assert verifier.verify(request).access_key_id == ACCESS_KEY
    with pytest.raises(ApiError) as caught:
        verifier.verify(SignedRequest("POST", "/", [], header_list, body))
    assert caught.value.code == "SignatureDoesNotMatch"
    with pytest.raises(ApiError) as caught:
        verifier.verify(SignedRequest("POST", "/vmie", [], [("Host", "127.0.0.1:8081"), *headers.items()], body))
    assert caught.value.code == "SignatureDoesNotMatch"


async def run_cli(server: Any, secret: str, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": secret,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
           "AWS_MAX_ATTEMPTS": "1"}
    env.pop("AWS_PROFILE", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "awscli", "ec2", *args, "--endpoint-url", endpoint_url(server), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_aws_cli_signs_and_reports_signature_failures() -> None:
    async with ec2_server(make_config(), {"DescribeImages": echo_handler(IMAGES)}) as server:
        code, out, err = await run_cli(server, SECRET_KEY, "describe-images", "--image-ids", "ami-0123456789abcdef0")
        assert code == 0, err
        assert json.loads(out)["Images"] == IMAGES["Images"]
        code, out, err = await run_cli(server, "wrong-secret", "describe-images")
    assert code == 255
    assert "An error occurred (SignatureDoesNotMatch) when calling the DescribeImages operation" in err
