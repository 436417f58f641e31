"""What EC2 handlers are written against: errors, the request context, the registry, paging, filters.

A handler is ``async def handler(ctx: RequestContext, params: dict) -> dict``: ``params`` is the
decoded request with boto3 member names (``{"DiskContainers": [{"Format": "ova", ...}]}``), the
result a dict with the model's output member names, which the wire layer turns into the XML botocore
reads. Handlers register with ``@operation("ImportImage")``. A refusal is ``raise ApiError(code,
message)``; the HTTP status follows from the code (:data:`ERROR_STATUS`, else 400).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from . import policy

#: The 21 EC2 actions vmied answers (docs/ec2-api.md §0).
OPERATION_NAMES: tuple[str, ...] = (
    "ImportImage", "ImportSnapshot", "DescribeImportImageTasks", "DescribeImportSnapshotTasks",
    "CancelImportTask", "ExportImage", "DescribeExportImageTasks", "CreateInstanceExportTask",
    "DescribeExportTasks", "CancelExportTask", "ImportInstance", "ImportVolume",
    "DescribeConversionTasks", "CancelConversionTask", "DescribeImages", "DeregisterImage",
    "DescribeSnapshots", "DeleteSnapshot", "CreateTags", "DescribeTags", "DeleteTags",
)

#: HTTP status of the codes that are not 400. Only server faults are 5xx: botocore retries those.
ERROR_STATUS: dict[str, int] = {
    "AuthFailure": 401,
    "MissingAuthenticationToken": 403,
    "InvalidClientTokenId": 403,
    "SignatureDoesNotMatch": 403,
    "UnauthorizedOperation": 403,
    "DryRunOperation": 412,
    "RequestEntityTooLarge": 413,
    "InternalError": 500,
    "RequestLimitExceeded": 503,
    "Unavailable": 503,
    "ServiceUnavailable": 503,
}


class ApiError(Exception):
    """An EC2 error answer: ``<Response><Errors><Error><Code>…`` with a non-2xx status."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status if status is not None else ERROR_STATUS.get(code, 400)
        if not 400 <= self.status <= 599:
            # botocore reads an error document under a 2xx/3xx status as an empty success.
            raise ValueError(f"an EC2 error needs a 4xx or 5xx status, not {self.status}")


def missing_parameter(name: str) -> ApiError:
    return ApiError("MissingParameter", f"The request must contain the parameter {name}")


def invalid_value(name: str, value: object, expected: str) -> ApiError:
    return ApiError("InvalidParameterValue", f"Value ({value}) for parameter {name} is invalid. {expected}")


@dataclass
class RequestContext:
    """One authenticated EC2 request, as its handler sees it."""

    request_id: str
    action: str
    access_key_id: str
    account_id: str
    region: str
    service: Any  # what the daemon passed to make_ec2_app (the tasks Service)
    policy: Mapping[str, Any] | None = None  # the access key's policy; None allows everything

    @property
    def principal_arn(self) -> str:
        return f"arn:aws:iam::{self.account_id}:user/{self.access_key_id}"

    def arn(self, resource_id: str) -> str:
        """The ARN of an id (``ami-…``, ``snap-…``, ``import-ami-…``) in this request's region and account."""
        return policy.resource_arn(self.region, self.account_id, resource_id)

    def authorize(self, resource_arn: str, action: str | None = None) -> None:
        """Raise UnauthorizedOperation unless the key's policy allows this action on ``resource_arn``.

        The app already checks the resources the request names (:func:`policy.request_resources`);
        a handler calls this for resources it discovers itself (the snapshots of an image it exports).
        """
        full_action = f"ec2:{action or self.action}"
        decision = policy.evaluate(self.policy, full_action, resource_arn)
        if decision is not policy.Decision.ALLOW:
            raise ApiError("UnauthorizedOperation",
                           policy.denial_message(self.principal_arn, full_action, resource_arn, decision))


Handler = Callable[[RequestContext, dict[str, Any]], Awaitable[dict[str, Any]]]

#: Action name -> handler; filled by ``@operation`` as the handler modules are imported.
OPERATIONS: dict[str, Handler] = {}


def operation(name: str) -> Callable[[Handler], Handler]:
    """Register the decorated coroutine as the handler of the EC2 action ``name``."""
    if name not in OPERATION_NAMES:
        raise ValueError(f"{name} is not one of the EC2 actions vmied answers")

    def register(handler: Handler) -> Handler:
        if name in OPERATIONS and OPERATIONS[name] is not handler:
            raise ValueError(f"a handler for {name} is already registered")
        OPERATIONS[name] = handler
        return handler

    return register


# --- paging ------------------------------------------------------------------------------------------------

T = TypeVar("T")

#: MaxResults bounds per action where AWS documents them; others take 1..1000.
PAGE_LIMITS: dict[str, tuple[int, int]] = {
    "DescribeExportImageTasks": (1, 500),
    "DescribeTags": (5, 1000),
    "DescribeSnapshots": (5, 1000),
}
DEFAULT_PAGE_LIMITS = (1, 1000)


def paginate(items: Iterable[T], max_results: int | None, next_token: str | None, *,
             key: Callable[[T], str], scope: object = None,
             limits: tuple[int, int] = DEFAULT_PAGE_LIMITS) -> tuple[list[T], str | None]:
    """One page of ``items`` in ``key`` order, and the token of the next page (None: last page).

    Tokens are stateless and opaque to clients: the key of the last item returned, bound to
    ``scope`` (pass what selects the items, e.g. ``(ctx.action, params.get("Filters"))``) so a token
    cannot be replayed against another query. Items removed between pages do not upset paging.
    ``max_results`` None returns everything after the token (when a request names explicit ids,
    answer exactly those and skip paging, docs/ec2-api.md §1.7). A token that is not one of ours, or
    belongs to another query, raises InvalidNextToken; MaxResults out of ``limits`` raises
    InvalidParameterValue.
    """
    low, high = limits
    if max_results is not None and not low <= max_results <= high:
        raise ApiError("InvalidParameterValue",
                       f"Value ( {max_results} ) for parameter maxResults is invalid. "
                       f"Parameter must be between {low} and {high}.")
    ordered = sorted(items, key=key)
    scope_digest = _scope_digest(scope)
    if next_token:
        after = _read_token(next_token, scope_digest)
        ordered = [item for item in ordered if key(item) > after]
    if max_results is None or len(ordered) <= max_results:
        return ordered, None
    page = ordered[:max_results]
    return page, _make_token(key(page[-1]), scope_digest)


def _scope_digest(scope: object) -> str:
    text = json.dumps(scope, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _make_token(after: str, scope_digest: str) -> str:
    payload = json.dumps({"v": 1, "after": after, "q": scope_digest}, separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode()


def _read_token(token: str, scope_digest: str) -> str:
    refusal = ApiError("InvalidNextToken", f"The token '{token[:200]}' is not valid for this request")
    try:
        payload = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
    except (ValueError, binascii.Error, UnicodeEncodeError):
        raise refusal from None
    if (not isinstance(payload, dict) or payload.get("v") != 1 or payload.get("q") != scope_digest
            or not isinstance(payload.get("after"), str)):
        raise refusal
    after: str = payload["after"]
    return after


# --- filters -------------------------------------------------------------------------------------------------

MAX_FILTERS = 50
MAX_FILTER_VALUES = 200

#: Filter name -> what to compare for one item: a value, a list of values, or None (no value).
#: The special name ``"tag:"`` is the item's tags (a {key: value} mapping or a list of
#: {"Key", "Value"} dicts) and enables the filters ``tag:<key>``.
Getters = Mapping[str, Callable[[Any], Any]]


def match_filters(items: Iterable[T], filters: Sequence[Mapping[str, Any]] | None, getters: Getters) -> list[T]:
    """The items every filter matches (filters AND, the values of one filter OR, ``*``/``?`` wildcards).

    A filter name not in ``getters`` raises InvalidParameterValue naming it, before anything is matched.
    """
    compiled = [_compile_filter(f, getters) for f in (filters or [])]
    if len(compiled) > MAX_FILTERS:
        raise ApiError("FilterLimitExceeded", f"The request uses {len(compiled)} filters; the limit is {MAX_FILTERS}")
    return [item for item in items if all(matches(item) for matches in compiled)]


def _compile_filter(spec: Mapping[str, Any], getters: Getters) -> Callable[[Any], bool]:
    name = spec.get("Name")
    if not name:
        raise missing_parameter("Filter.N.Name")
    values = spec.get("Values") or []
    if not values:
        raise ApiError("InvalidParameterValue", f"The filter '{name}' needs at least one value")
    if len(values) > MAX_FILTER_VALUES:
        raise ApiError("FilterLimitExceeded",
                       f"The filter '{name}' has {len(values)} values; the limit is {MAX_FILTER_VALUES}")
    patterns = [_filter_pattern(value) for value in values]
    if name.startswith("tag:") and name != "tag:" and "tag:" in getters:
        tag_key, tags_of = name[len("tag:"):], getters["tag:"]
        return lambda item: _any_value_matches(_tag_value(tags_of(item), tag_key), patterns)
    getter = getters.get(name)
    if getter is None or name == "tag:":
        raise ApiError("InvalidParameterValue", f"The filter '{name}' is invalid")
    return lambda item: _any_value_matches(getter(item), patterns)


def _tag_value(tags: Any, tag_key: str) -> str | None:
    if isinstance(tags, Mapping):
        value = tags.get(tag_key)
        return None if value is None else str(value)
    for tag in tags or []:
        if tag.get("Key") == tag_key:
            return str(tag.get("Value", ""))
    return None


def _any_value_matches(value: Any, patterns: list[re.Pattern[str]]) -> bool:
    if value is None:
        return False
    scalar = isinstance(value, str | bool | int | float)
    candidates = [value] if scalar else [v for v in value if v is not None]
    texts = [("true" if v else "false") if isinstance(v, bool) else str(v) for v in candidates]
    return any(pattern.fullmatch(text) for text in texts for pattern in patterns)


def _filter_pattern(value: Any) -> re.Pattern[str]:
    """EC2 filter wildcards: ``*`` any run, ``?`` one character, ``\\`` escapes the next character."""
    text = str(value)
    regex: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char == "\\" and index + 1 < len(text):
            index += 1
            regex.append(re.escape(text[index]))
        elif char == "*":
            regex.append(".*")
        elif char == "?":
            regex.append(".")
        else:
            regex.append(re.escape(char))
        index += 1
    return re.compile("".join(regex), re.DOTALL)
