"""IAM-style identity policies: which access key may call which action on which resource.

A policy is the JSON document the AWS guides print (``Version``, ``Statement`` with ``Effect``,
``Action``/``NotAction``, ``Resource``/``NotResource``). Evaluation follows IAM: an explicit Deny
wins over any Allow, and without a matching Allow the answer is a (default) deny. A credential
without a policy (``None``) may do everything.

Action names compare case-insensitively (``ec2:describe*`` matches ``ec2:DescribeImages``);
resource ARNs compare case-sensitively. Both take the IAM wildcards ``*`` and ``?``.

Resources are named by ARNs of the form ``arn:aws:ec2:<region>:<account>:<type>/<id>`` with the
types ``image``, ``snapshot``, ``import-image-task``, ``import-snapshot-task``,
``export-image-task``, ``export-instance-task``, ``instance``, ``volume``, ``conversion-task``.
A resource being created is named with its id ``*`` (``import-image-task/*``), so only patterns
that cover every id of that type allow creating one. Actions without resource-level permissions
(the Describe calls, the legacy conversion tasks) are checked against the resource ``*``, as in IAM.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

POLICY_VERSIONS = ("2012-10-17", "2008-10-17")
_STATEMENT_KEYS = frozenset({"Sid", "Effect", "Action", "NotAction", "Resource", "NotResource"})

#: Id prefix -> ARN resource type. Longest prefixes first: ``import-i-`` is not an instance.
ID_RESOURCE_TYPES: tuple[tuple[str, str], ...] = (
    ("import-snap-", "import-snapshot-task"),
    ("import-ami-", "import-image-task"),
    ("import-vol-", "conversion-task"),
    ("export-ami-", "export-image-task"),
    ("import-i-", "conversion-task"),
    ("export-i-", "export-instance-task"),
    ("snap-", "snapshot"),
    ("ami-", "image"),
    ("vol-", "volume"),
    ("i-", "instance"),
)


class PolicyError(ValueError):
    """The policy document is malformed or uses something vmied does not evaluate (Condition...)."""


class Decision(enum.Enum):
    ALLOW = "allow"
    EXPLICIT_DENY = "explicit-deny"
    IMPLICIT_DENY = "implicit-deny"


# --- validation ---------------------------------------------------------------------------------------

def validate_policy(policy: Mapping[str, Any] | None) -> None:
    """Raise PolicyError naming the first problem of ``policy`` (None, allow-all, is valid)."""
    if policy is None:
        return
    if not isinstance(policy, Mapping):
        raise PolicyError("a policy must be a JSON object with a Statement")
    unknown = set(policy) - {"Version", "Statement", "Id"}
    if unknown:
        raise PolicyError(f"unknown policy element {sorted(unknown)[0]!r}")
    version = policy.get("Version", POLICY_VERSIONS[0])
    if version not in POLICY_VERSIONS:
        raise PolicyError(f"Version must be one of {', '.join(POLICY_VERSIONS)}, not {version!r}")
    for index, statement in enumerate(_statements(policy)):
        _validate_statement(statement, f"Statement[{index}]")


def _statements(policy: Mapping[str, Any]) -> list[Any]:
    statements = policy.get("Statement")
    if isinstance(statements, Mapping):
        return [statements]
    if isinstance(statements, list):
        return statements
    raise PolicyError("Statement must be an object or a list of objects")


def _validate_statement(statement: Any, where: str) -> None:
    if not isinstance(statement, Mapping):
        raise PolicyError(f"{where} must be an object")
    unknown = set(statement) - _STATEMENT_KEYS
    if unknown:
        # Condition and Principal are refused rather than ignored: ignoring a Condition would allow
        # more than the policy's author meant.
        raise PolicyError(f"{where}: {sorted(unknown)[0]} is not supported")
    if statement.get("Effect") not in ("Allow", "Deny"):
        raise PolicyError(f"{where}: Effect must be Allow or Deny")
    _validate_pair(statement, where, "Action", "NotAction", _check_action)
    _validate_pair(statement, where, "Resource", "NotResource", _check_resource)


def _validate_pair(statement: Mapping[str, Any], where: str, positive: str, negative: str,
                   check: Any) -> None:
    present = [key for key in (positive, negative) if key in statement]
    if len(present) != 1:
        raise PolicyError(f"{where} needs exactly one of {positive} and {negative}")
    values = statement[present[0]]
    items = [values] if isinstance(values, str) else values
    if not isinstance(items, list) or not items or not all(isinstance(item, str) for item in items):
        raise PolicyError(f"{where}: {present[0]} must be a string or a non-empty list of strings")
    for item in items:
        problem = check(item)
        if problem:
            raise PolicyError(f"{where}: {present[0]} {item!r} {problem}")


def _check_action(pattern: str) -> str | None:
    if pattern == "*" or re.fullmatch(r"[A-Za-z0-9-]+:[A-Za-z0-9*?]+", pattern):
        return None
    return "must be '*' or service:Action (such as ec2:ImportImage or ec2:Describe*)"


def _check_resource(pattern: str) -> str | None:
    if pattern == "*" or pattern.startswith("arn:"):
        return None
    return "must be '*' or an ARN"


# --- evaluation -----------------------------------------------------------------------------------------

def evaluate(policy: Mapping[str, Any] | None, action: str, resource: str) -> Decision:
    """The decision of ``policy`` for ``action`` (``ec2:ImportImage``) on ``resource`` (an ARN or ``*``)."""
    if policy is None:
        return Decision.ALLOW
    allowed = False
    for statement in _statements(policy):
        if not _statement_applies(statement, action, resource):
            continue
        if statement["Effect"] == "Deny":
            return Decision.EXPLICIT_DENY
        allowed = True
    return Decision.ALLOW if allowed else Decision.IMPLICIT_DENY


def _statement_applies(statement: Mapping[str, Any], action: str, resource: str) -> bool:
    if "Action" in statement:
        action_matches = _any_match(statement["Action"], action, fold_case=True)
    else:
        action_matches = not _any_match(statement["NotAction"], action, fold_case=True)
    if not action_matches:
        return False
    if "Resource" in statement:
        return _any_match(statement["Resource"], resource, fold_case=False)
    return not _any_match(statement["NotResource"], resource, fold_case=False)


def _any_match(patterns: str | Sequence[str], value: str, *, fold_case: bool) -> bool:
    items: Iterable[str] = [patterns] if isinstance(patterns, str) else patterns
    return any(_wildcard(pattern, fold_case).fullmatch(value) for pattern in items)


@lru_cache(maxsize=1024)
def _wildcard(pattern: str, fold_case: bool) -> re.Pattern[str]:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(regex, re.IGNORECASE | re.DOTALL if fold_case else re.DOTALL)


def denial_message(principal_arn: str, action: str, resource: str, decision: Decision) -> str:
    """The UnauthorizedOperation text EC2 gives (the modern, unencoded form)."""
    reason = ("with an explicit deny in an identity-based policy" if decision is Decision.EXPLICIT_DENY
              else f"because no identity-based policy allows the {action} action")
    target = f" on resource: {resource}" if resource != "*" else ""
    return (f"You are not authorized to perform this operation. User: {principal_arn} "
            f"is not authorized to perform: {action}{target} {reason}")


# --- the resources a request names ------------------------------------------------------------------------

def resource_arn(region: str, account_id: str, resource_id: str) -> str:
    """The ARN of an EC2 resource id (``ami-…`` -> ``arn:aws:ec2:<region>:<account>:image/ami-…``)."""
    for prefix, resource_type in ID_RESOURCE_TYPES:
        if resource_id.startswith(prefix):
            return f"arn:aws:ec2:{region}:{account_id}:{resource_type}/{resource_id}"
    # Not an id vmied knows: still a distinct ARN, so only "*"-wide patterns cover it (the handler
    # then answers that the id is invalid).
    return f"arn:aws:ec2:{region}:{account_id}:{resource_id}"


def new_resource_arn(region: str, account_id: str, resource_type: str) -> str:
    """The ARN a resource being created is authorized as (its id is not known yet)."""
    return f"arn:aws:ec2:{region}:{account_id}:{resource_type}/*"


def request_resources(action: str, params: Mapping[str, Any], region: str, account_id: str) -> list[str]:
    """Every resource ARN the request of ``action`` with decoded ``params`` acts on ("*" if none)."""

    def named(*ids: Any) -> list[str]:
        return [resource_arn(region, account_id, i) for i in ids if isinstance(i, str)]

    def created(resource_type: str) -> list[str]:
        return [new_resource_arn(region, account_id, resource_type)]

    resources: list[str]
    if action == "ImportImage":
        snapshots = [disk.get("SnapshotId") for disk in params.get("DiskContainers", [])]
        resources = created("import-image-task") + named(*snapshots)
    elif action == "ImportSnapshot":
        resources = created("import-snapshot-task")
    elif action == "ExportImage":
        resources = named(params.get("ImageId")) + created("export-image-task")
    elif action == "CreateInstanceExportTask":
        resources = named(params.get("InstanceId")) + created("export-instance-task")
    elif action == "CancelImportTask":
        resources = named(params.get("ImportTaskId"))
    elif action == "CancelExportTask":
        resources = named(params.get("ExportTaskId"))
    elif action == "DeregisterImage":
        resources = named(params.get("ImageId"))
    elif action == "DeleteSnapshot":
        resources = named(params.get("SnapshotId"))
    elif action in ("CreateTags", "DeleteTags"):
        resources = named(*params.get("Resources", []))
    else:
        resources = []
    return resources or ["*"]
