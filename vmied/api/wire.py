"""The EC2 query protocol on the wire, driven by botocore's EC2 service model (``ec2/2016-11-15``).

Requests: form-encoded keys such as ``DiskContainer.1.UserBucket.S3Bucket`` become the boto3-style
dict ``{"DiskContainers": [{"UserBucket": {"S3Bucket": ...}}]}`` (docs/ec2-api.md §1.2): a member's
wire name is its ``locationName`` with the first letter upper-cased, else its member name; lists
are ``Name.1``, ``Name.2`` (sorted numerically, the list member's own name ignored); nested members
are joined with ``.``. Every key must be one the model knows for that operation (UnknownParameter),
required members must be there (MissingParameter), scalars must parse as their type, enums match
case-insensitively and keep the caller's spelling (InvalidParameterValue).

Responses: ``<{Action}Response xmlns=…><requestId>…`` with each member under its ``locationName``
verbatim, lists as a wrapper element of ``<item>`` children, booleans ``true``/``false``, integers
as plain digits, timestamps ISO 8601 UTC; errors are ``<Response><Errors><Error>…<RequestID>``
(§1.4, §1.5). A result with a key the model does not have is a programming error (ValueError):
botocore would silently drop it.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from typing import Any
from urllib.parse import parse_qsl
from xml.sax.saxutils import escape

import botocore.session

from .operations import OPERATION_NAMES, ApiError, invalid_value, missing_parameter

API_VERSION = "2016-11-15"
XML_NAMESPACE = f"http://ec2.amazonaws.com/doc/{API_VERSION}/"
CONTENT_TYPE = "text/xml;charset=UTF-8"
_XML_DECLARATION = '<?xml version="1.0" encoding="UTF-8"?>\n'

_INT_RANGES = {"integer": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1)}
_INTEGER = re.compile(r"[+-]?[0-9]+")
_DOUBLE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_LIST_INDEX = re.compile(r"[1-9][0-9]{0,8}")
# Characters XML 1.0 cannot carry at all (not even as references).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")
_ENUMS_SHOWN = 20
#: Values vmied accepts beyond a model enum (by shape name): export formats AWS does not offer.
#: botocore and the CLI do not check enums in requests, so clients can send them.
EXTRA_ENUM_VALUES: dict[str, tuple[str, ...]] = {"DiskImageFormat": ("VHDX", "QCOW2")}


@cache
def service_model() -> Any:
    """botocore's EC2 model (loaded once; a few hundred milliseconds)."""
    return botocore.session.get_session().get_service_model("ec2", api_version=API_VERSION)


@cache
def operation_model(action: str) -> Any:
    if action not in OPERATION_NAMES:
        raise ApiError("InvalidAction", f"The action {action} is not valid for this web service.")
    return service_model().operation_model(action)


def wire_name(member_shape: Any, member_name: str) -> str:
    """A structure member's request key: queryName, else locationName with a capital first letter."""
    serialization = member_shape.serialization
    if "queryName" in serialization:
        return str(serialization["queryName"])
    if "name" in serialization:
        name = str(serialization["name"])
        return name[0].upper() + name[1:]
    return member_name


# --- requests --------------------------------------------------------------------------------------------

def parse_form(data: bytes | str) -> list[tuple[str, str]]:
    """The (key, value) pairs of a form-encoded body or query string, blank values kept."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return parse_qsl(text, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise ApiError("MalformedQueryString", "The request parameters are not UTF-8 encoded") from None


@dataclass
class _Node:
    """One dotted segment of the request keys: a value, children, or (malformed) both."""

    key: str
    value: str | None = None
    children: dict[str, _Node] = field(default_factory=dict)

    def first_key(self) -> str:
        """The first complete request key at or below this node (for error messages)."""
        node = self
        while node.value is None and node.children:
            node = next(iter(node.children.values()))
        return node.key


def _build_tree(pairs: Sequence[tuple[str, str]]) -> _Node:
    root = _Node("")
    for key, value in pairs:
        segments = key.split(".")
        if not all(segments):
            raise ApiError("UnknownParameter", f"The parameter {key} is not recognized")
        node = root
        for depth, segment in enumerate(segments):
            child = node.children.get(segment)
            if child is None:
                child = node.children[segment] = _Node(".".join(segments[: depth + 1]))
            node = child
        if node.value is not None:
            raise ApiError("InvalidParameterValue", f"The parameter {key} is given more than once")
        node.value = value
    return root


def decode_request(action: str, pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """The boto3-style parameters of ``action`` from its request pairs (Action and Version removed)."""
    model = operation_model(action)
    root = _build_tree(pairs)
    if model.input_shape is None:
        if root.children:
            raise ApiError("UnknownParameter", f"The parameter {root.first_key()} is not recognized")
        return {}
    return _decode_structure(model.input_shape, root)


def _decode(shape: Any, node: _Node) -> Any:
    kind = shape.type_name
    if kind in ("structure", "list"):
        if node.value is not None:
            raise ApiError("UnknownParameter", f"The parameter {node.key} is not recognized")
        return _decode_structure(shape, node) if kind == "structure" else _decode_list(shape, node)
    if node.children:
        raise ApiError("UnknownParameter", f"The parameter {node.first_key()} is not recognized")
    assert node.value is not None  # a node is created for a key, so a leaf always has a value
    return _decode_scalar(shape, node.key, node.value)


def _decode_structure(shape: Any, node: _Node) -> dict[str, Any]:
    result: dict[str, Any] = {}
    known: set[str] = set()
    for member_name, member_shape in shape.members.items():
        name = wire_name(member_shape, member_name)
        known.add(name)
        child = node.children.get(name)
        if child is not None:
            result[member_name] = _decode(member_shape, child)
    for name, child in node.children.items():
        if name not in known:
            raise ApiError("UnknownParameter", f"The parameter {child.first_key()} is not recognized")
    for member_name in shape.required_members:
        if member_name not in result:
            prefix = f"{node.key}." if node.key else ""
            raise missing_parameter(prefix + wire_name(shape.members[member_name], member_name))
    return result


def _decode_list(shape: Any, node: _Node) -> list[Any]:
    for index, child in node.children.items():
        if not _LIST_INDEX.fullmatch(index):
            raise ApiError("UnknownParameter", f"The parameter {child.first_key()} is not recognized")
    ordered = sorted(node.children.items(), key=lambda item: int(item[0]))
    return [_decode(shape.member, child) for _, child in ordered]


def _decode_scalar(shape: Any, key: str, text: str) -> Any:
    kind = shape.type_name
    if kind == "string":
        return _decode_string(shape, key, text)
    if kind == "boolean":
        if text.lower() not in ("true", "false"):
            raise invalid_value(key, text, "Expected: 'true' or 'false'.")
        return text.lower() == "true"
    if kind in _INT_RANGES:
        return _decode_integer(shape, key, text)
    if kind in ("double", "float"):
        number = float(text) if _DOUBLE.fullmatch(text) else math.nan
        if not math.isfinite(number):
            raise invalid_value(key, text, "Expected: a number.")
        return number
    if kind == "timestamp":
        return _decode_timestamp(key, text)
    if kind == "blob":
        try:
            return base64.b64decode(text, validate=True)
        except binascii.Error:
            raise invalid_value(key, text, "Expected: base64 data.") from None
    raise ApiError("InvalidParameterValue", f"The parameter {key} has a type vmied does not read ({kind})")


def _decode_string(shape: Any, key: str, text: str) -> str:
    if _NOT_XML.search(text):
        raise ApiError("InvalidParameterValue",
                       f"Value for parameter {key} contains control characters, which are not allowed")
    length = len(text)
    if length < shape.metadata.get("min", 0) or length > shape.metadata.get("max", length):
        raise invalid_value(key, text, f"Its length must be between {shape.metadata.get('min', 0)} "
                                       f"and {shape.metadata.get('max', 'any')}.")
    enum = [*shape.enum, *EXTRA_ENUM_VALUES.get(shape.name, ())] if shape.enum else []
    if enum and text.lower() not in {value.lower() for value in enum}:
        shown = ", ".join(enum[:_ENUMS_SHOWN]) + (", ..." if len(enum) > _ENUMS_SHOWN else "")
        raise invalid_value(key, text, f"Valid values: {shown}.")
    return text


def _decode_integer(shape: Any, key: str, text: str) -> int:
    if not _INTEGER.fullmatch(text):
        raise invalid_value(key, text, "Expected: an integer.")
    number = int(text)
    low, high = _INT_RANGES[shape.type_name]
    low = max(low, shape.metadata.get("min", low))
    high = min(high, shape.metadata.get("max", high))
    if not low <= number <= high:
        raise invalid_value(key, text, f"Expected: an integer between {low} and {high}.")
    return number


def _decode_timestamp(key: str, text: str) -> datetime:
    try:
        if _INTEGER.fullmatch(text):
            return datetime.fromtimestamp(int(text), UTC)
        moment = datetime.fromisoformat(text)
    except (ValueError, OverflowError, OSError):
        raise invalid_value(key, text, "Expected: an ISO 8601 timestamp such as 2025-01-15T10:00:00Z.") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


# --- responses ---------------------------------------------------------------------------------------------

def encode_response(action: str, result: Mapping[str, Any], request_id: str) -> bytes:
    """The XML answer of ``action`` for the handler result ``result`` (model member names)."""
    shape = operation_model(action).output_shape
    out = [_XML_DECLARATION, f'<{action}Response xmlns="{XML_NAMESPACE}">',
           f"<requestId>{_text(request_id)}</requestId>"]
    if shape is None:
        # No output in the model: AWS still documents <return>true</return>; botocore ignores it.
        extra = set(result) - {"ResponseMetadata"}
        if extra:
            raise ValueError(f"{action} has no output, but the result has {sorted(extra)}")
        out.append("<return>true</return>")
    else:
        _encode_members(shape, result, out, action)
    out.append(f"</{action}Response>")
    return "".join(out).encode("utf-8")


def encode_error(code: str, message: str, request_id: str) -> bytes:
    """The EC2 error document: note ``RequestID`` here against ``requestId`` in a success."""
    return (f"{_XML_DECLARATION}<Response><Errors><Error><Code>{_text(code)}</Code>"
            f"<Message>{_text(message)}</Message></Error></Errors>"
            f"<RequestID>{_text(request_id)}</RequestID></Response>").encode()


def _encode_members(shape: Any, value: Any, out: list[str], path: str) -> None:
    if not isinstance(value, Mapping):
        raise ValueError(f"{path} must be a mapping, not {type(value).__name__}")
    unknown = set(value) - set(shape.members) - {"ResponseMetadata"}
    if unknown:
        raise ValueError(f"{path} has no member {sorted(unknown)[0]!r} in the EC2 model")
    for member_name, member_shape in shape.members.items():
        member_value = value.get(member_name)
        if member_value is not None:
            tag = member_shape.serialization.get("name", member_name)
            _encode_value(member_shape, member_value, tag, out, f"{path}.{member_name}")


def _encode_value(shape: Any, value: Any, tag: str, out: list[str], path: str) -> None:
    kind = shape.type_name
    if kind == "structure":
        out.append(f"<{tag}>")
        _encode_members(shape, value, out, path)
        out.append(f"</{tag}>")
    elif kind == "list":
        if isinstance(value, str | bytes | Mapping) or not isinstance(value, Sequence):
            raise ValueError(f"{path} must be a list, not {type(value).__name__}")
        if not value:
            out.append(f"<{tag}/>")
            return
        out.append(f"<{tag}>")
        for index, item in enumerate(value):
            if item is None:
                raise ValueError(f"{path}[{index}] is None")
            _encode_value(shape.member, item, "item", out, f"{path}[{index}]")
        out.append(f"</{tag}>")
    else:
        out.append(f"<{tag}>{_encode_scalar(kind, value, path)}</{tag}>")


def _encode_scalar(kind: str, value: Any, path: str) -> str:
    if kind == "boolean":
        if not isinstance(value, bool):
            raise ValueError(f"{path} must be a bool, not {value!r}")
        return "true" if value else "false"
    if kind in _INT_RANGES:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path} must be an int, not {value!r}")
        return str(value)
    if kind in ("double", "float"):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{path} must be a finite number, not {value!r}")
        return repr(float(value))
    if kind == "timestamp":
        return format_timestamp(value, path)
    if kind == "blob":
        if not isinstance(value, bytes):
            raise ValueError(f"{path} must be bytes, not {type(value).__name__}")
        return base64.b64encode(value).decode("ascii")
    if not isinstance(value, str):
        raise ValueError(f"{path} must be a str, not {value!r}")
    return _text(value)


def format_timestamp(value: datetime | str, path: str = "timestamp") -> str:
    """ISO 8601 UTC with milliseconds, as EC2 writes them (``2025-01-15T10:40:12.000Z``)."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{path} is not an ISO 8601 timestamp: {value!r}") from None
    if not isinstance(value, datetime):
        raise ValueError(f"{path} must be a datetime, not {value!r}")
    moment = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _text(value: str) -> str:
    """XML character data: escaped, carriage returns kept (a raw CR would be read back as LF),
    and characters XML cannot carry replaced by U+FFFD rather than making the document unreadable."""
    return escape(_NOT_XML.sub("\ufffd", value), {"\r": "&#13;"})
