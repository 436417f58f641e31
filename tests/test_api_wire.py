"""The EC2 wire codec against botocore's own serializer and parser (docs/ec2-api.md §1, §5)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import pytest
from botocore.parsers import create_parser
from botocore.serialize import create_serializer
from hypothesis import given, settings
from hypothesis import strategies as st

from vmied.api import wire
from vmied.api.operations import OPERATION_NAMES, ApiError

MOMENT = datetime(2025, 1, 15, 10, 5, 0, 123000, tzinfo=UTC)


class Sampler:
    """A maximal value for a model shape: every member set, two-element lists, awkward strings."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def value(self, shape: Any) -> Any:
        kind = shape.type_name
        n = next(self._counter)
        if kind == "structure":
            return {name: self.value(member) for name, member in shape.members.items()}
        if kind == "list":
            return [self.value(shape.member), self.value(shape.member)]
        if kind == "string":
            if shape.enum:
                return shape.enum[n % len(shape.enum)]
            return f"v{n} a b&c=d/é<x>+%;\t\r\nend"
        if kind == "boolean":
            return n % 2 == 0
        if kind in ("integer", "long"):
            return int(shape.metadata.get("min", 0)) + 7
        if kind in ("double", "float"):
            return 1.5 + n
        if kind == "timestamp":
            return MOMENT
        raise AssertionError(f"no sample for {kind}")


def serialize(action: str, params: dict[str, Any]) -> bytes:
    """The request body botocore itself sends for ``params``."""
    model = wire.operation_model(action)
    request = create_serializer("ec2").serialize_to_request(params, model)
    return urlencode(request["body"]).encode()


def decode_body(body: bytes) -> tuple[str, dict[str, Any]]:
    pairs = wire.parse_form(body)
    assert pairs[:2] == [("Action", pairs[0][1]), ("Version", wire.API_VERSION)]
    return pairs[0][1], wire.decode_request(pairs[0][1], pairs[2:])


def parse_response(action: str, xml: bytes, status: int = 200) -> dict[str, Any]:
    model = wire.operation_model(action)
    parsed: dict[str, Any] = create_parser("ec2").parse(
        {"body": xml, "headers": {}, "status_code": status}, model.output_shape)
    return parsed


@pytest.mark.parametrize("action", OPERATION_NAMES)
def test_request_round_trip_through_botocore(action: str) -> None:
    params = Sampler().value(wire.operation_model(action).input_shape)
    decoded_action, decoded = decode_body(serialize(action, params))
    assert decoded_action == action
    assert decoded == params


@pytest.mark.parametrize("action", OPERATION_NAMES)
def test_response_round_trip_through_botocore(action: str) -> None:
    model = wire.operation_model(action)
    result = Sampler().value(model.output_shape) if model.output_shape is not None else {}
    xml = wire.encode_response(action, result, "req-1")
    parsed = parse_response(action, xml)
    assert parsed.pop("ResponseMetadata")["RequestId"] == "req-1"
    assert parsed == result
    assert xml.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n<' + action.encode() + b'Response xmlns="')


def test_operations_without_output_answer_return_true() -> None:
    for action in ("CancelExportTask", "CancelConversionTask", "DeleteSnapshot", "CreateTags", "DeleteTags"):
        assert wire.operation_model(action).output_shape is None
        assert b"<return>true</return>" in wire.encode_response(action, {}, "r")
    assert parse_response("DeregisterImage", wire.encode_response("DeregisterImage", {"Return": True}, "r"))[
        "Return"] is True


# --- request decoding: the pitfalls of §5 -------------------------------------------------------------------

def decode(action: str, body: str) -> dict[str, Any]:
    return wire.decode_request(action, wire.parse_form(body))


def refusal(action: str, body: str) -> ApiError:
    with pytest.raises(ApiError) as caught:
        decode(action, body)
    assert caught.value.status == 400
    return caught.value


def test_filters_wire_name_differs_between_import_task_describes_and_the_others() -> None:
    assert decode("DescribeImportImageTasks", "Filters.1.Name=task-state&Filters.1.Value.1=active") == {
        "Filters": [{"Name": "task-state", "Values": ["active"]}]}
    assert decode("DescribeImages", "Filter.1.Name=state&Filter.1.Value.1=available") == {
        "Filters": [{"Name": "state", "Values": ["available"]}]}
    wrong = refusal("DescribeImportImageTasks", "Filter.1.Name=task-state&Filter.1.Value.1=active")
    assert (wrong.code, wrong.message) == ("UnknownParameter", "The parameter Filter.1.Name is not recognized")
    assert refusal("DescribeImages", "Filters.1.Name=state").code == "UnknownParameter"


def test_disk_container_indexed_for_import_image_but_not_for_import_snapshot() -> None:
    assert decode("ImportImage", "DiskContainer.1.Format=ova")["DiskContainers"] == [{"Format": "ova"}]
    assert decode("ImportSnapshot", "DiskContainer.Format=VMDK")["DiskContainer"] == {"Format": "VMDK"}
    assert refusal("ImportImage", "DiskContainer.Format=ova").message == \
        "The parameter DiskContainer.Format is not recognized"
    assert refusal("ImportSnapshot", "DiskContainer.1.Format=VMDK").code == "UnknownParameter"
    assert refusal("ImportSnapshot", "DiskContainer=x").code == "UnknownParameter"


def test_list_indexes_sort_numerically_and_gaps_are_tolerated() -> None:
    body = "&".join(f"ImportTaskId.{i}=t{i}" for i in (10, 2, 9, 1, 11, 30))
    assert decode("DescribeImportImageTasks", body)["ImportTaskIds"] == ["t1", "t2", "t9", "t10", "t11", "t30"]


@pytest.mark.parametrize("index", ["0", "01", "a", "-1", "1.5"])
def test_bad_list_index_is_an_unknown_parameter(index: str) -> None:
    assert refusal("DescribeImportImageTasks", f"ImportTaskId.{index}=t").code == "UnknownParameter"


def test_singular_wire_names_and_tag_specifications() -> None:
    body = "ResourceId.1=ami-1&ResourceId.2=snap-2&Tag.1.Key=a&Tag.2.Key=b&Tag.2.Value="
    assert decode("DeleteTags", body) == {"Resources": ["ami-1", "snap-2"],
                                          "Tags": [{"Key": "a"}, {"Key": "b", "Value": ""}]}
    body = ("TagSpecification.1.ResourceType=import-image-task&TagSpecification.1.Tag.1.Key=k"
            "&TagSpecification.1.Tag.1.Value=v")
    assert decode("ImportImage", body) == {"TagSpecifications": [
        {"ResourceType": "import-image-task", "Tags": [{"Key": "k", "Value": "v"}]}]}
    assert decode("CreateInstanceExportTask", "InstanceId=i-1&TargetEnvironment=vmware&ExportToS3.S3Bucket=b")[
        "ExportToS3Task"] == {"S3Bucket": "b"}
    assert decode("ImportInstance", "Platform=Windows&LaunchSpecification.GroupName.1=default")[
        "LaunchSpecification"] == {"GroupNames": ["default"]}


def test_scalars_decode_by_model_type() -> None:
    params = decode("ImportImage", "ClientData.UploadStart=2025-01-15T10%3A00%3A00Z&ClientData.UploadEnd="
                                   "2025-01-15T10%3A05%3A00.123000Z&ClientData.UploadSize=1.5&Encrypted=true&DryRun=false")
    assert params == {"ClientData": {"UploadStart": datetime(2025, 1, 15, 10, 0, tzinfo=UTC),
                                     "UploadEnd": MOMENT, "UploadSize": 1.5}, "Encrypted": True, "DryRun": False}
    assert decode("DescribeImages", "MaxResults=1000&DryRun=TRUE") == {"MaxResults": 1000, "DryRun": True}
    assert decode("ImportVolume", "Image.Format=RAW&Image.Bytes=9007199254740993&Image.ImportManifestUrl=u"
                                  "&Volume.Size=16")["Image"]["Bytes"] == 9007199254740993


@pytest.mark.parametrize(("action", "body", "where"), [
    ("DescribeImages", "DryRun=yes", "DryRun"),
    ("DescribeImages", "MaxResults=5.0", "MaxResults"),
    ("DescribeImages", "MaxResults=99999999999", "MaxResults"),
    ("DescribeExportImageTasks", "MaxResults=501", "MaxResults"),
    ("DescribeExportImageTasks", "MaxResults=0", "MaxResults"),
    ("ImportImage", "ClientData.UploadSize=nan", "ClientData.UploadSize"),
    ("ImportImage", "ClientData.UploadSize=1_000", "ClientData.UploadSize"),
    ("ImportImage", "ClientData.UploadStart=yesterday", "ClientData.UploadStart"),
    ("ImportImage", "BootMode=bios", "BootMode"),
    ("ExportImage", "ImageId=ami-1&S3ExportLocation.S3Bucket=b&DiskImageFormat=vdi", "DiskImageFormat"),
    ("ImportImage", "Description=a%00b", "Description"),
])
def test_bad_values_are_invalid_parameter_value(action: str, body: str, where: str) -> None:
    error = refusal(action, body)
    assert error.code == "InvalidParameterValue"
    assert where in error.message


def test_enums_match_case_insensitively_and_keep_the_callers_spelling() -> None:
    params = decode("ExportImage", "ImageId=ami-1&S3ExportLocation.S3Bucket=b&DiskImageFormat=vmdk")
    assert params["DiskImageFormat"] == "vmdk"


def test_missing_required_parameters_name_the_wire_key() -> None:
    assert refusal("ExportImage", "DiskImageFormat=RAW&S3ExportLocation.S3Bucket=b").message == \
        "The request must contain the parameter ImageId"
    error = refusal("ExportImage", "DiskImageFormat=RAW&ImageId=ami-1&S3ExportLocation.S3Prefix=p")
    assert (error.code, error.message) == (
        "MissingParameter", "The request must contain the parameter S3ExportLocation.S3Bucket")
    assert refusal("ImportInstance", "Platform=Windows&DiskImage.1.Image.Format=RAW").message.endswith(
        "DiskImage.1.Image.Bytes")


def test_unknown_duplicate_and_malformed_keys() -> None:
    assert refusal("DescribeImages", "Foo=1").message == "The parameter Foo is not recognized"
    assert refusal("DescribeImages", "ImageId.1=a&ImageId.1=b").code == "InvalidParameterValue"
    assert refusal("DescribeImages", "ImageId..1=a").code == "UnknownParameter"
    assert refusal("DescribeImages", "DryRun.1=true").code == "UnknownParameter"
    assert refusal("DescribeImages", "imageid.1=a").code == "UnknownParameter"  # names are case-sensitive


def test_body_that_is_not_utf8_is_refused() -> None:
    with pytest.raises(ApiError) as caught:
        wire.parse_form(b"Action=DescribeImages&Version=2016-11-15&Filter.1.Name=%ff")
    assert caught.value.code == "MalformedQueryString"


def test_captured_bodies_reserialize_byte_for_byte() -> None:
    """Decoding a CLI body and serializing the result with botocore gives the exact same bytes."""
    for body in [
        "Action=ImportImage&Version=2016-11-15&Architecture=x86_64&Description=My+server+VM&DiskContainer.1."
        "Description=My+Server+OVA&DiskContainer.1.Format=ova&DiskContainer.1.UserBucket.S3Bucket=my-import-bucket"
        "&DiskContainer.1.UserBucket.S3Key=vms%2Fmy-server-vm.ova&LicenseType=BYOL&Platform=Linux&TagSpecification"
        ".1.ResourceType=import-image-task&TagSpecification.1.Tag.1.Key=project&TagSpecification.1.Tag.1.Value=demo"
        "&BootMode=uefi",
        "Action=DescribeTags&Version=2016-11-15&Filter.1.Name=resource-id&Filter.1.Value.1=export-ami-0123456789abcd"
        "ef0&Filter.2.Name=resource-type&Filter.2.Value.1=export-image-task",
        "Action=DeleteTags&Version=2016-11-15&ResourceId.1=ami-1&Tag.1.Key=a&Tag.2.Key=b&Tag.2.Value=",
    ]:
        action, params = decode_body(body.encode())
        assert serialize(action, params) == body.encode()


# --- response encoding: the parser edge cases of §1.6 ----------------------------------------------------------

def test_element_names_are_the_models_location_names() -> None:
    xml = wire.encode_response("DescribeImages", {"Images": [{"ImageId": "ami-1", "State": "available",
                                                              "Public": False, "OwnerId": "1", "Tags": []}]}, "r")
    for element in (b"<imagesSet><item>", b"<imageId>ami-1</imageId>", b"<imageState>available</imageState>",
                    b"<isPublic>false</isPublic>", b"<imageOwnerId>1</imageOwnerId>", b"<tagSet/>"):
        assert element in xml
    assert parse_response("DescribeImages", xml)["Images"][0]["Tags"] == []


def test_awkward_text_survives_the_botocore_parser() -> None:
    text = "a&b <c> \"q\" 'a' é \r\n\t ]]> end"
    xml = wire.encode_response("ImportSnapshot", {"Description": text, "ImportTaskId": "import-snap-1"}, "r")
    assert parse_response("ImportSnapshot", xml)["Description"] == text


def test_characters_xml_cannot_carry_are_replaced_not_fatal() -> None:
    xml = wire.encode_response("ImportSnapshot", {"Description": "bad\x01byte"}, "r")
    assert parse_response("ImportSnapshot", xml)["Description"] == "bad\ufffdbyte"


def test_scalars_encode_as_botocore_reads_them() -> None:
    result = {"Snapshots": [{"SnapshotId": "snap-1", "VolumeSize": 8, "Encrypted": False,
                             "StartTime": datetime(2025, 1, 15, 10, 40, 12, tzinfo=UTC), "Progress": "100%"}]}
    xml = wire.encode_response("DescribeSnapshots", result, "r")
    assert b"<volumeSize>8</volumeSize>" in xml and b"<startTime>2025-01-15T10:40:12.000Z</startTime>" in xml
    parsed = parse_response("DescribeSnapshots", xml)
    parsed.pop("ResponseMetadata")
    assert parsed == result
    xml = wire.encode_response("ImportImage", {"SnapshotDetails": [{"DiskImageSize": 705638400}]}, "r")
    assert b"<diskImageSize>705638400.0</diskImageSize>" in xml


@pytest.mark.parametrize(("result", "problem"), [
    ({"ImportTaskID": "x"}, "ImportTaskID"),
    ({"Encrypted": "true"}, "bool"),
    ({"Progress": 2}, "str"),
    ({"SnapshotDetails": {"Format": "RAW"}}, "list"),
    ({"SnapshotDetails": [{"DiskImageSize": float("nan")}]}, "finite"),
    ({"Tags": [None]}, "None"),
])
def test_results_botocore_would_misread_are_programming_errors(result: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        wire.encode_response("ImportImage", result, "r")
    with pytest.raises(ValueError, match="VolumeSize"):
        wire.encode_response("DescribeSnapshots", {"Snapshots": [{"VolumeSize": 8.0}]}, "r")
    with pytest.raises(ValueError, match="no output"):
        wire.encode_response("DeleteSnapshot", {"Return": True}, "r")


def test_error_document_is_what_botocore_turns_into_a_client_error() -> None:
    xml = wire.encode_error("InvalidSnapshot.InUse", "The snapshot snap-1 is in use by ami-<1> & more", "rid")
    assert b"<RequestID>rid</RequestID>" in xml and b"<Response><Errors><Error><Code>" in xml
    parsed = parse_response("DeleteSnapshot", xml, status=400)
    assert parsed["Error"] == {"Code": "InvalidSnapshot.InUse",
                               "Message": "The snapshot snap-1 is in use by ami-<1> & more"}
    assert parsed["ResponseMetadata"]["RequestId"] == "rid"


@settings(max_examples=60, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_any_string_round_trips_both_ways(text: str) -> None:
    xml = wire.encode_response("ImportSnapshot", {"Description": text}, "r")
    expected = wire._NOT_XML.sub("\ufffd", text)
    assert parse_response("ImportSnapshot", xml).get("Description", "") == expected
    body = serialize("ImportSnapshot", {"Description": text})
    if wire._NOT_XML.search(text):
        with pytest.raises(ApiError):
            decode_body(body)
    else:
        assert decode_body(body)[1] == {"Description": text}


SEGMENTS = ["DiskContainer", "Filters", "Filter", "Name", "Value", "UserBucket", "S3Bucket", "Tag", "Key",
            "TagSpecification", "ImportTaskId", "MaxResults", "DryRun", "ClientData", "UploadSize", "UploadStart",
            "Image", "Bytes", "Volume", "Size", "ExportToS3", "1", "2", "10", "0", "x", ""]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(OPERATION_NAMES),
       st.lists(st.tuples(st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=5).map(".".join),
                          st.text(max_size=12)), max_size=8))
def test_any_request_decodes_or_is_refused_with_an_ec2_error(action: str, pairs: list[tuple[str, str]]) -> None:
    try:
        params = wire.decode_request(action, pairs)
    except ApiError as error:
        assert error.status == 400 and error.code in (
            "UnknownParameter", "MissingParameter", "InvalidParameterValue")
    else:
        assert isinstance(params, dict)


def test_api_error_status_must_be_an_error_status() -> None:
    assert ApiError("UnauthorizedOperation", "no").status == 403
    assert ApiError("InvalidSnapshot.NotFound", "no").status == 400
    with pytest.raises(ValueError, match="4xx or 5xx"):
        ApiError("Whatever", "fine", 200)
