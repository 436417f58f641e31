"""IAM-style policies: the evaluation function, and its enforcement by the app with a real boto3 client."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.ec2_endpoint import boto3_client, call, ec2_server, echo_handler, make_config
from vmied.api.app import make_ec2_app
from vmied.api.operations import RequestContext
from vmied.api.policy import Decision, PolicyError, evaluate, request_resources, resource_arn, validate_policy
from vmied.config import Credential, load_config
from vmied.errors import UsageError

ARN = "arn:aws:ec2:us-east-1:123456789012"


def allow(action: Any, resource: Any = "*") -> dict[str, Any]:
    return {"Effect": "Allow", "Action": action, "Resource": resource}


def deny(action: Any, resource: Any = "*") -> dict[str, Any]:
    return {"Effect": "Deny", "Action": action, "Resource": resource}


def document(*statements: dict[str, Any]) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": list(statements)}


# --- evaluation -------------------------------------------------------------------------------------------

def test_no_policy_allows_everything_and_an_empty_one_nothing() -> None:
    assert evaluate(None, "ec2:DeleteSnapshot", f"{ARN}:snapshot/snap-1") is Decision.ALLOW
    assert evaluate(document(), "ec2:DescribeImages", "*") is Decision.IMPLICIT_DENY


@pytest.mark.parametrize(("pattern", "action", "allowed"), [
    ("ec2:*", "ec2:ImportImage", True),
    ("*", "ec2:ImportImage", True),
    ("ec2:Describe*", "ec2:DescribeImportImageTasks", True),
    ("ec2:Describe*", "ec2:ImportImage", False),
    ("EC2:describeimages", "ec2:DescribeImages", True),
    ("ec2:Import?????", "ec2:ImportImage", True),
    ("ec2:Import?????", "ec2:ImportSnapshot", False),
    (["ec2:CreateTags", "ec2:DeleteTags"], "ec2:DeleteTags", True),
    ("s3:*", "ec2:DescribeImages", False),
])
def test_action_patterns(pattern: Any, action: str, allowed: bool) -> None:
    decision = evaluate(document(allow(pattern)), action, "*")
    assert (decision is Decision.ALLOW) is allowed


def test_explicit_deny_wins_over_any_allow() -> None:
    policy = document(allow("ec2:*"), deny("ec2:DeleteSnapshot", f"{ARN}:snapshot/snap-0keep*"), allow("*"))
    assert evaluate(policy, "ec2:DeleteSnapshot", f"{ARN}:snapshot/snap-0keep1") is Decision.EXPLICIT_DENY
    assert evaluate(policy, "ec2:DeleteSnapshot", f"{ARN}:snapshot/snap-0other") is Decision.ALLOW
    assert evaluate(policy, "ec2:DeregisterImage", f"{ARN}:image/ami-1") is Decision.ALLOW


def test_resource_arns_with_wildcards_are_case_sensitive() -> None:
    policy = document(allow(["ec2:DeregisterImage", "ec2:ExportImage"],
                            [f"{ARN}:image/ami-0a*", "arn:aws:ec2:*:*:export-image-task/*"]))
    assert evaluate(policy, "ec2:DeregisterImage", f"{ARN}:image/ami-0abc") is Decision.ALLOW
    assert evaluate(policy, "ec2:DeregisterImage", f"{ARN}:image/ami-0ABC") is Decision.IMPLICIT_DENY
    assert evaluate(policy, "ec2:DeregisterImage", f"{ARN}:image/ami-0b") is Decision.IMPLICIT_DENY
    assert evaluate(policy, "ec2:DeregisterImage", f"{ARN}:IMAGE/ami-0abc") is Decision.IMPLICIT_DENY
    assert evaluate(policy, "ec2:ExportImage", f"{ARN}:export-image-task/*") is Decision.ALLOW
    # Describe calls are checked against "*": a resource-scoped Allow does not cover them.
    assert evaluate(document(allow("ec2:Describe*", f"{ARN}:image/*")), "ec2:DescribeImages", "*") \
        is Decision.IMPLICIT_DENY


def test_not_action_and_not_resource() -> None:
    policy = {"Statement": [{"Effect": "Allow", "NotAction": "ec2:Delete*", "Resource": "*"},
                            {"Effect": "Deny", "Action": "ec2:*", "NotResource": f"{ARN}:*"}]}
    assert evaluate(policy, "ec2:DescribeImages", "*") is Decision.EXPLICIT_DENY  # "*" is outside ARN:*
    assert evaluate(policy, "ec2:CreateTags", f"{ARN}:image/ami-1") is Decision.ALLOW
    assert evaluate(policy, "ec2:DeleteTags", f"{ARN}:image/ami-1") is Decision.IMPLICIT_DENY
    assert evaluate(policy, "ec2:CreateTags", "arn:aws:ec2:eu-west-3:123456789012:image/ami-1") \
        is Decision.EXPLICIT_DENY


def test_single_statement_object() -> None:
    assert evaluate({"Statement": allow("ec2:DescribeImages")}, "ec2:DescribeImages", "*") is Decision.ALLOW


@pytest.mark.parametrize(("policy", "problem"), [
    ({"Statement": [{**allow("ec2:*"), "Condition": {"Bool": {"aws:SecureTransport": "true"}}}]}, "Condition"),
    ({"Statement": [{"Action": "ec2:*", "Resource": "*"}]}, "Effect"),
    ({"Statement": [{**allow("ec2:*"), "NotAction": "ec2:Delete*"}]}, "exactly one of Action and NotAction"),
    ({"Statement": [{"Effect": "Allow", "Action": "ec2:*"}]}, "exactly one of Resource and NotResource"),
    ({"Statement": [allow("ImportImage")]}, "service:Action"),
    ({"Statement": [allow("ec2:*", "image/ami-1")]}, "an ARN"),
    ({"Statement": [allow([])]}, "non-empty list"),
    ({"Version": "2020-01-01", "Statement": []}, "Version"),
    ({"Statement": "everything"}, "Statement must be"),
    ({"Statement": [], "Principal": "*"}, "Principal"),
])
def test_malformed_policies_are_refused_with_the_reason(policy: dict[str, Any], problem: str) -> None:
    with pytest.raises(PolicyError, match=problem):
        validate_policy(policy)


def test_request_resources_name_every_resource_the_request_acts_on() -> None:
    tags = request_resources("CreateTags", {"Resources": [
        "ami-1", "snap-1", "import-ami-1", "import-snap-1", "export-ami-1", "export-i-1", "i-1", "import-i-1",
        "vol-1", "bogus"]}, "us-east-1", "123456789012")
    assert tags == [f"{ARN}:image/ami-1", f"{ARN}:snapshot/snap-1", f"{ARN}:import-image-task/import-ami-1",
                    f"{ARN}:import-snapshot-task/import-snap-1", f"{ARN}:export-image-task/export-ami-1",
                    f"{ARN}:export-instance-task/export-i-1", f"{ARN}:instance/i-1",
                    f"{ARN}:conversion-task/import-i-1", f"{ARN}:volume/vol-1", f"{ARN}:bogus"]
    assert request_resources("ImportImage", {"DiskContainers": [{"SnapshotId": "snap-1"}, {"Url": "s3://b/k"}]},
                             "us-east-1", "123456789012") == [f"{ARN}:import-image-task/*", f"{ARN}:snapshot/snap-1"]
    assert request_resources("ExportImage", {"ImageId": "ami-1"}, "us-east-1", "123456789012") == [
        f"{ARN}:image/ami-1", f"{ARN}:export-image-task/*"]
    assert request_resources("DescribeImages", {"ImageIds": ["ami-1"]}, "us-east-1", "123456789012") == ["*"]
    assert resource_arn("eu-west-3", "111122223333", "snap-9") == "arn:aws:ec2:eu-west-3:111122223333:snapshot/snap-9"


# --- enforcement by the app -----------------------------------------------------------------------------------

def limited(policy: dict[str, Any]) -> Any:
    return make_config(Credential(access_key_id="AKIDLIMITED", secret_access_key="limited-secret", policy=policy))


def limited_client(server: Any) -> Any:
    return boto3_client(server, access_key="AKIDLIMITED", secret_key="limited-secret")


def denial(caught: pytest.ExceptionInfo[ClientError]) -> tuple[str, int, str]:
    error = caught.value.response
    return error["Error"]["Code"], error["ResponseMetadata"]["HTTPStatusCode"], error["Error"]["Message"]


async def test_action_outside_the_policy_is_unauthorized_operation_with_ec2s_message() -> None:
    handlers = {"DescribeImages": echo_handler({"Images": []}), "ImportImage": echo_handler()}
    async with ec2_server(limited(document(allow("ec2:Describe*"))), handlers) as server:
        client = limited_client(server)
        assert (await call(client, "describe_images"))["Images"] == []
        with pytest.raises(ClientError) as caught:
            await call(client, "import_image", DiskContainers=[{"Url": "s3://bucket/disk.vmdk"}])
    code, status, message = denial(caught)
    assert (code, status) == ("UnauthorizedOperation", 403)
    assert message == (
        "You are not authorized to perform this operation. User: arn:aws:iam::123456789012:user/AKIDLIMITED "
        "is not authorized to perform: ec2:ImportImage on resource: "
        "arn:aws:ec2:us-east-1:123456789012:import-image-task/* because no identity-based policy allows the "
        "ec2:ImportImage action")
    assert not handlers["ImportImage"].calls  # type: ignore[attr-defined]


async def test_deny_on_one_resource_wins_and_names_the_explicit_deny() -> None:
    policy = document(allow("ec2:*"), deny("ec2:DeleteSnapshot", f"{ARN}:snapshot/snap-0keep*"))
    handler = echo_handler()
    async with ec2_server(limited(policy), {"DeleteSnapshot": handler}) as server:
        client = limited_client(server)
        await call(client, "delete_snapshot", SnapshotId="snap-0other")
        with pytest.raises(ClientError) as caught:
            await call(client, "delete_snapshot", SnapshotId="snap-0keep1")
    code, _, message = denial(caught)
    assert code == "UnauthorizedOperation"
    assert message.endswith(
        f"on resource: {ARN}:snapshot/snap-0keep1 with an explicit deny in an identity-based policy")
    assert [params["SnapshotId"] for _, params in handler.calls] == ["snap-0other"]


async def test_tagging_needs_permission_on_every_resource() -> None:
    policy = document(allow("ec2:CreateTags", f"{ARN}:image/*"))
    handler = echo_handler()
    async with ec2_server(limited(policy), {"CreateTags": handler}) as server:
        client = limited_client(server)
        await call(client, "create_tags", Resources=["ami-1"], Tags=[{"Key": "k", "Value": "v"}])
        with pytest.raises(ClientError) as caught:
            await call(client, "create_tags", Resources=["ami-1", "snap-1"], Tags=[{"Key": "k", "Value": "v"}])
    assert f"{ARN}:snapshot/snap-1" in denial(caught)[2]
    assert len(handler.calls) == 1


async def test_dry_run_answers_whether_the_call_would_be_allowed() -> None:
    policy = document(allow("ec2:DeregisterImage", f"{ARN}:image/ami-0mine*"))
    handler = echo_handler({"Return": True})
    async with ec2_server(limited(policy), {"DeregisterImage": handler}) as server:
        client = limited_client(server)
        with pytest.raises(ClientError) as allowed:
            await call(client, "deregister_image", ImageId="ami-0mine1", DryRun=True)
        with pytest.raises(ClientError) as denied:
            await call(client, "deregister_image", ImageId="ami-0theirs", DryRun=True)
    assert denial(allowed) == ("DryRunOperation", 412, "Request would have succeeded, but DryRun flag is set.")
    assert denial(denied)[:2] == ("UnauthorizedOperation", 403)
    assert not handler.calls


async def test_handlers_authorize_resources_they_discover() -> None:
    """ctx.authorize checks a resource the request did not name (the snapshots behind an image)."""

    async def export_image(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
        ctx.authorize(ctx.arn("snap-0behind"))
        return {"ExportImageTaskId": "export-ami-1"}

    policy = document(allow("ec2:ExportImage", [f"{ARN}:image/*", f"{ARN}:export-image-task/*"]))
    async with ec2_server(limited(policy), {"ExportImage": export_image}) as server:
        with pytest.raises(ClientError) as caught:
            await call(limited_client(server), "export_image", ImageId="ami-1", DiskImageFormat="VMDK",
                       S3ExportLocation={"S3Bucket": "b"})
    assert f"on resource: {ARN}:snapshot/snap-0behind" in denial(caught)[2]


def test_app_refuses_a_policy_it_cannot_evaluate() -> None:
    condition = {"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}}
    config = limited({"Statement": [{**allow("ec2:*"), "Condition": condition}]})
    with pytest.raises(UsageError, match=r"credentials\[0\] \(AKIDLIMITED\): policy: .*Condition"):
        make_ec2_app(config, service=None, operations={})


def test_configuration_refuses_a_policy_the_endpoint_cannot_evaluate(tmp_path: Path) -> None:
    path = tmp_path / "vmied.toml"
    path.write_text(f'[state]\ndirectory = "{tmp_path}"\n[[credentials]]\naccess_key_id = "AKID1"\n'
                    'secret_access_key = "s"\npolicy = { Statement = [ { Effect = "Allow", Action = "ec2:*", '
                    'NotResource = "image/*" } ] }\n')
    with pytest.raises(UsageError, match=r"credentials\[0\]\.policy: Statement\[0\]: NotResource 'image/\*'"):
        load_config(str(path))
