"""The daemon's configuration: typed, frozen dataclasses read from TOML and validated at load.

Where it comes from (``load_config``):

- an explicit file (``vmied serve --config PATH``), alone; or
- ``/etc/vmied/vmied.toml`` if it exists, then every ``/etc/vmied/conf.d/*.toml`` in name order;
  a later file overrides single values of an earlier one and tables are merged key by key (lists
  such as ``server.listen`` are replaced whole), except ``[[credentials]]``, which each file adds
  to (a drop-in per access key; the same access key id again replaces the earlier entry);
- no file at all: the defaults, which run (127.0.0.1:8080, SQLite and a local store under the state
  directory, credentials generated on the first start).

Every file is checked on its own, so a refusal names the file and the dotted key: an unknown key
(a typo must not be silently ignored), a value of the wrong type, or a value out of range all raise
:class:`vmied.errors.UsageError`. Sizes take bytes or strings such as ``"64MiB"``; durations take
seconds or strings such as ``"90s"``, ``"5m"``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import json
import os
import re
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import UsageError
from .io.base import DEFAULT_READAHEAD, MiB
from .io.s3_config import (
    DEFAULT_PART_SIZE,
    DEFAULT_PARTS_IN_FLIGHT,
    DEFAULT_REMOTE_WINDOW,
    DEFAULT_ZERO_COPY_MAX,
    S3Config,
)

SYSTEM_CONFIG = "/etc/vmied/vmied.toml"
SYSTEM_DROP_INS = "/etc/vmied/conf.d"
TiB = 1 << 40

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("auto", "json", "text")
STORE_KINDS = ("local", "s3")
#: Keys whose values are never printed by ``render(..., mask_secrets=True)``.
SECRET_KEYS = frozenset({"secret_access_key", "session_token"})
MASK = "********"

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 1000,
    "m": 1 << 20, "mib": 1 << 20, "mb": 1000**2,
    "g": 1 << 30, "gib": 1 << 30, "gb": 1000**3,
    "t": 1 << 40, "tib": 1 << 40, "tb": 1000**4,
}
_DURATION_UNITS = {"": 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0, "h": 3600.0}
_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


# --- value kinds and checks (used through field metadata) ------------------------------------------

Check = Callable[[Any], str | None]  # returns why the value is refused, or None


def meta(check: Check | None = None, kind: str = "") -> dict[str, Any]:
    """A setting's field metadata: how to read it (``kind``: size, duration, policy) and check it."""
    return {"kind": kind, "check": check}


def one_of(*choices: str) -> Check:
    return lambda value: None if value in choices else f"must be one of {', '.join(choices)}"


def at_least(minimum: float, shown: str = "") -> Check:
    return lambda value: None if value >= minimum else f"must be at least {shown or minimum}"


def parse_size(value: int | str) -> int:
    """Bytes from an integer or a string such as ``"64MiB"``, ``"1 TiB"``, ``"500MB"``."""
    if isinstance(value, bool):
        raise ValueError("a size is a number of bytes or a string such as \"64MiB\"")
    if isinstance(value, int):
        return value
    match = _QUANTITY.match(value)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _SIZE_UNITS:
        raise ValueError(f"{value!r} is not a size (bytes, or a number with KiB, MiB, GiB, TiB, kB, MB, GB, TB)")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_duration(value: int | float | str) -> float:
    """Seconds from a number or a string such as ``"90s"``, ``"5m"``, ``"1h"``, ``"250ms"``."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string such as \"90s\"")
    if isinstance(value, int | float):
        return float(value)
    match = _QUANTITY.match(value)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _DURATION_UNITS:
        raise ValueError(f"{value!r} is not a duration (seconds, or a number with ms, s, m, h)")
    return float(match.group(1)) * _DURATION_UNITS[unit]


def twelve_digits(value: str) -> str | None:
    return None if re.fullmatch(r"\d{12}", value) else "must be 12 digits"


def check_listen(addresses: list[str]) -> str | None:
    if not addresses:
        return "needs at least one address"
    for address in addresses:
        try:
            split_address(address)
        except ValueError as exc:
            return str(exc)
    return None


def split_address(address: str) -> tuple[str, int]:
    """``"127.0.0.1:8080"`` or ``"[::1]:8080"`` -> (host, port)."""
    host, sep, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{address!r} is not HOST:PORT (IPv6 as [::1]:PORT)")
    return host, int(port_text)


def default_state_directory() -> str:
    """systemd's ``$STATE_DIRECTORY`` (StateDirectory=), else the FHS place for root, else XDG's."""
    given = os.environ.get("STATE_DIRECTORY", "")
    if given:
        return given.split(":")[0]
    if os.geteuid() == 0:
        return "/var/lib/vmied"
    xdg = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(xdg, "vmied")


def default_credentials_file() -> str:
    """Where the AWS CLI and SDKs look for credentials (so the written profile is found)."""
    return os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.expanduser("~/.aws/credentials")


def default_aws_config_file() -> str:
    return os.environ.get("AWS_CONFIG_FILE") or os.path.expanduser("~/.aws/config")


# --- the sections ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServerConfig:
    listen: list[str] = field(default_factory=lambda: ["127.0.0.1:8080"], metadata=meta(check_listen))
    region: str = field(default="us-east-1", metadata=meta(lambda v: None if v else "must not be empty"))
    account_id: str = field(default="123456789012", metadata=meta(twelve_digits))
    grace_period: float = field(default=60.0, metadata=meta(at_least(0), "duration"))
    max_clock_skew: float = field(default=900.0, metadata=meta(at_least(0), "duration"))
    #: EC2 API requests answered at once; more are refused with 503 RequestLimitExceeded, which the
    #: AWS CLI and SDKs retry with backoff (a flood of clients must not grow the daemon without bound).
    max_requests: int = field(default=256, metadata=meta(at_least(1)))


@dataclass(frozen=True)
class LogConfig:
    level: str = field(default="info", metadata=meta(one_of(*LOG_LEVELS)))
    format: str = field(default="auto", metadata=meta(one_of(*LOG_FORMATS)))


@dataclass(frozen=True)
class StateConfig:
    directory: str = field(default_factory=default_state_directory,
                           metadata=meta(lambda v: None if v else "must not be empty"))
    database: str = ""  # "" -> <directory>/vmied.db


@dataclass(frozen=True)
class StoreConfig:
    kind: str = field(default="local", metadata=meta(one_of(*STORE_KINDS)))
    path: str = ""  # local store; "" -> <state.directory>/store
    bucket: str = ""
    prefix: str = ""
    endpoint_url: str = ""
    region: str = ""
    profile: str = ""
    path_style: bool = False
    ca_bundle: str = ""
    #: Record a SHA-256 of the whole virtual disk for snapshots up to this size (0: none). It costs
    #: an inflate and a hash of every byte on one core, about doubling an import's time; grains are
    #: checked without it (CRC-32C per stored grain, Adler-32 and length on every inflate).
    digest_max_size: int = field(default=0, metadata=meta(at_least(0), "size"))


@dataclass(frozen=True)
class S3AccessConfig:
    """How tasks reach the customers' buckets (sources of imports, destinations of exports)."""

    endpoint_url: str = ""
    region: str = ""
    profile: str = ""
    path_style: bool = False
    ca_bundle: str = ""


@dataclass(frozen=True)
class RoleConfig:
    """The ``vmimport`` role: fnmatch patterns of the buckets tasks may read and write, and of the URL
    origins (``scheme://host:port``) import sources may name. A URL source makes the daemon fetch
    what a caller names, so by default only https (AWS's ``Url`` takes https and s3 URLs); narrow
    ``read_urls`` further wherever the network behind the daemon is not public."""

    read_buckets: list[str] = field(default_factory=lambda: ["*"])
    write_buckets: list[str] = field(default_factory=lambda: ["*"])
    read_urls: list[str] = field(default_factory=lambda: ["https://*"])

    @staticmethod
    def allows(name: str, patterns: list[str]) -> bool:
        """Whether ``name`` (a bucket, a URL origin) matches one of ``patterns``, case-sensitively."""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


@dataclass(frozen=True)
class LimitsConfig:
    import_tasks: int = field(default=20, metadata=meta(at_least(1)))  # AWS: 20 concurrent import tasks
    export_tasks: int = field(default=5, metadata=meta(at_least(1)))  # AWS: 5 concurrent export tasks
    disks_per_image: int = field(default=21, metadata=meta(at_least(1)))  # AWS: 21 disks per ImportImage
    max_export_bytes: int = field(default=TiB, metadata=meta(at_least(1), "size"))
    workers: int = field(default=0, metadata=meta(at_least(0)))  # 0: one per core
    window_size: int = field(default=DEFAULT_REMOTE_WINDOW, metadata=meta(at_least(64 << 10, "64KiB"), "size"))
    readahead: int = field(default=DEFAULT_READAHEAD, metadata=meta(at_least(0)))
    part_size: int = field(default=DEFAULT_PART_SIZE,
                           metadata=meta(at_least(5 * MiB, "5MiB (the S3 minimum)"), "size"))
    parts_in_flight: int = field(default=DEFAULT_PARTS_IN_FLIGHT, metadata=meta(at_least(1)))
    #: The largest scratch object of zeros that exports copy runs of zeros from, inside the
    #: server, instead of uploading them; 0: upload every zero.
    zero_copy_max: int = field(default=DEFAULT_ZERO_COPY_MAX, metadata=meta(at_least(0), "size"))


def check_policy(policy: Any) -> str | None:
    if policy is None:
        return None
    if not isinstance(policy, dict) or not isinstance(policy.get("Statement"), list | dict):
        return "must be an IAM policy document: an object with a Statement"
    # What the EC2 endpoint can evaluate (Effect, Action/NotAction, Resource/NotResource; no Condition).
    from .api.policy import PolicyError, validate_policy
    try:
        validate_policy(policy)
    except PolicyError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class Credential:
    access_key_id: str = field(metadata=meta(
        lambda v: None if re.fullmatch(r"\w{1,128}", v, re.ASCII) else "must be 1 to 128 letters, digits or _"))
    secret_access_key: str = field(metadata=meta(
        lambda v: None if v else "must not be empty"))
    policy: dict[str, Any] | None = field(default=None, metadata=meta(check_policy, "policy"))  # None: allow everything
    session_token: str = ""
    # "" -> server.account_id
    account_id: str = field(default="", metadata=meta(lambda v: None if not v else twelve_digits(v)))


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    log: LogConfig = field(default_factory=LogConfig)
    state: StateConfig = field(default_factory=StateConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    s3: S3AccessConfig = field(default_factory=S3AccessConfig)
    role: RoleConfig = field(default_factory=RoleConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    credentials: list[Credential] = field(default_factory=list)
    #: The AWS credentials file the first start writes the ``vmied`` profile to (and the config file
    #: it writes the profile's region to); default: AWS_SHARED_CREDENTIALS_FILE / AWS_CONFIG_FILE,
    #: else ~/.aws/credentials and ~/.aws/config of the user running the daemon.
    credentials_file: str = field(default_factory=default_credentials_file)
    aws_config_file: str = field(default_factory=default_aws_config_file)
    #: The files this configuration was read from, in order (empty: pure defaults).
    sources: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        # Fill the places derived from the state directory, so every reader sees one answer.
        if not self.state.database:
            object.__setattr__(self, "state", dataclasses.replace(
                self.state, database=os.path.join(self.state.directory, "vmied.db")))
        if not self.store.path and self.store.kind == "local":
            object.__setattr__(self, "store", dataclasses.replace(
                self.store, path=os.path.join(self.state.directory, "store")))
        filled = [c if c.account_id else dataclasses.replace(c, account_id=self.server.account_id)
                  for c in self.credentials]
        object.__setattr__(self, "credentials", filled)

    def s3_config(self) -> S3Config:
        """Access to the customers' buckets, tuned by ``[limits]``."""
        return S3Config(profile=self.s3.profile or None, region=self.s3.region or None,
                        endpoint_url=self.s3.endpoint_url or None, path_style=self.s3.path_style,
                        ca_bundle=self.s3.ca_bundle or None, window=self.limits.window_size,
                        readahead=self.limits.readahead, part_size=self.limits.part_size,
                        parts_in_flight=self.limits.parts_in_flight, zero_copy_max=self.limits.zero_copy_max)

    def store_s3_config(self) -> S3Config:
        """Access to the snapshot store's bucket (``store.kind = "s3"``)."""
        return S3Config(profile=self.store.profile or None, region=self.store.region or None,
                        endpoint_url=self.store.endpoint_url or None, path_style=self.store.path_style,
                        ca_bundle=self.store.ca_bundle or None, part_size=self.limits.part_size,
                        parts_in_flight=self.limits.parts_in_flight,
                        zero_copy_max=0)  # the store writes grains: no runs of zeros to copy

    def credential(self, access_key_id: str) -> Credential | None:
        return next((c for c in self.credentials if c.access_key_id == access_key_id), None)


SECTIONS: dict[str, type] = {
    "server": ServerConfig, "log": LogConfig, "state": StateConfig, "store": StoreConfig,
    "s3": S3AccessConfig, "role": RoleConfig, "limits": LimitsConfig,
}
TOP_LEVEL = ("credentials", "credentials_file", "aws_config_file")


# --- loading -----------------------------------------------------------------------------------------

def config_files(path: str | None, system_file: str = SYSTEM_CONFIG, drop_ins: str = SYSTEM_DROP_INS) -> list[str]:
    """The files to read, in order: the explicit one, or the system file and its drop-ins."""
    if path is not None:
        if not os.path.isfile(path):
            raise UsageError(f"configuration file {path}: no such file")
        return [path]
    files = [system_file] if os.path.isfile(system_file) else []
    return files + sorted(glob.glob(os.path.join(glob.escape(drop_ins), "*.toml")))


def load_config(path: str | None = None, *, system_file: str = SYSTEM_CONFIG,
                drop_ins: str = SYSTEM_DROP_INS) -> Config:
    """The effective configuration (see the module's docstring); refuses a bad file with UsageError.

    ``system_file`` and ``drop_ins`` (the places read without an explicit path) exist for tests.
    """
    files = config_files(path, system_file, drop_ins)
    merged: dict[str, Any] = {}
    credentials: dict[str, dict[str, Any]] = {}
    for name in files:
        document = read_toml(name)
        for key, value in validate_document(document, name).items():
            if key == "credentials":
                credentials.update((entry["access_key_id"], entry) for entry in value)
            elif isinstance(value, dict):
                merged.setdefault(key, {}).update(value)
            else:
                merged[key] = value
    return build_config(merged, list(credentials.values()), files)


def read_toml(name: str) -> dict[str, Any]:
    try:
        with open(name, "rb") as file:
            return tomllib.load(file)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"configuration file {name}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise UsageError(f"configuration file {name}: cannot read it: {exc.strerror}") from None


def build_config(merged: dict[str, Any], credentials: list[dict[str, Any]], files: list[str]) -> Config:
    sections = {key: cls(**merged.get(key, {})) for key, cls in SECTIONS.items()}
    files_text = ", ".join(files) or "the defaults"
    if sections["store"].kind == "s3" and not sections["store"].bucket:
        raise UsageError(f"configuration ({files_text}): store.kind = \"s3\" needs store.bucket")
    if sections["store"].kind == "local" and sections["store"].bucket:
        raise UsageError(f"configuration ({files_text}): store.bucket is set but store.kind is \"local\"")
    extra = {key: merged[key] for key in ("credentials_file", "aws_config_file") if key in merged}
    for key, value in extra.items():
        extra[key] = os.path.expanduser(value)
    return Config(**sections, credentials=[Credential(**entry) for entry in credentials],
                  sources=tuple(files), **extra)


def validate_document(document: dict[str, Any], name: str) -> dict[str, Any]:
    """The document's values converted to their types; UsageError naming ``name`` and the dotted key."""
    result: dict[str, Any] = {}
    for key, value in document.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise refusal(name, key, "must be a table ([" + key + "])")
            result[key] = validate_table(value, SECTIONS[key], name, key)
        elif key == "credentials":
            if not isinstance(value, list) or not all(isinstance(entry, dict) for entry in value):
                raise refusal(name, key, "must be an array of tables ([[credentials]])")
            result[key] = [validate_credential(entry, name, f"credentials[{index}]")
                           for index, entry in enumerate(value)]
        elif key in ("credentials_file", "aws_config_file"):
            if not isinstance(value, str) or not value:
                raise refusal(name, key, "must be a file path (a non-empty string)")
            result[key] = value
        else:
            raise refusal(name, key, f"unknown key (known: {', '.join([*SECTIONS, *TOP_LEVEL])})")
    return result


def validate_credential(entry: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    entry = dict(entry)
    if "policy_file" in entry:
        # An IAM policy kept as its own JSON file, as the AWS guide prints them.
        policy_file = entry.pop("policy_file")
        if not isinstance(policy_file, str):
            raise refusal(name, f"{where}.policy_file", "must be a file path")
        try:
            with open(os.path.expanduser(policy_file), encoding="utf-8") as file:
                entry["policy"] = file.read()
        except OSError as exc:
            raise refusal(name, f"{where}.policy_file", f"cannot read {policy_file}: {exc.strerror}") from None
    values = validate_table(entry, Credential, name, where)
    for required in ("access_key_id", "secret_access_key"):
        if required not in values:
            raise refusal(name, f"{where}.{required}", "is required")
    return values


def validate_table(table: Mapping[str, Any], cls: type, name: str, where: str) -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, raw in table.items():
        dotted = f"{where}.{key}"
        if key not in fields:
            raise refusal(name, dotted, f"unknown key (known in [{where}]: {', '.join(fields)})")
        metadata = fields[key].metadata
        try:
            value = convert(raw, hints[key], metadata.get("kind", ""))
        except ValueError as exc:
            raise refusal(name, dotted, str(exc)) from None
        check: Check | None = metadata.get("check")
        problem = check(value) if check else None
        if problem:
            raise refusal(name, dotted, f"{problem} (got {raw!r})")
        values[key] = value
    return values


def convert(raw: Any, hint: Any, kind: str) -> Any:
    """``raw`` (as TOML gave it) as a value of ``hint``, or ValueError saying what was expected."""
    if kind == "size":
        return parse_size(raw) if isinstance(raw, int | str) else _wrong("a size such as 67108864 or \"64MiB\"", raw)
    if kind == "duration":
        if isinstance(raw, int | float | str):
            return parse_duration(raw)
        return _wrong("a duration in seconds or a string such as \"90s\"", raw)
    if kind == "policy":
        if isinstance(raw, str):
            try:
                return json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ValueError(f"is not valid JSON: {exc}") from None
        return raw if isinstance(raw, dict) else _wrong("a policy document (a table or a JSON string)", raw)
    if hint is bool:
        return raw if isinstance(raw, bool) else _wrong("true or false", raw)
    if hint is int:
        return raw if isinstance(raw, int) and not isinstance(raw, bool) else _wrong("an integer", raw)
    if hint is float:
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            return float(raw)
        return _wrong("a number", raw)
    if hint is str:
        return raw if isinstance(raw, str) else _wrong("a string", raw)
    if typing.get_origin(hint) is list:
        if isinstance(raw, str):
            raw = [raw]  # one address or pattern given without brackets
        if isinstance(raw, list) and all(isinstance(item, str) for item in raw):
            return list(raw)
        return _wrong("a list of strings", raw)
    raise ValueError(f"unsupported setting type {hint}")  # pragma: no cover - a programming error


def _wrong(expected: str, raw: Any) -> Any:
    raise ValueError(f"must be {expected}, not {type(raw).__name__} {raw!r}")


def refusal(name: str, dotted_key: str, problem: str) -> UsageError:
    return UsageError(f"configuration file {name}: {dotted_key}: {problem}", reason="config.invalid")


# --- rendering (vmied serve --show-config) ------------------------------------------------------------

def render(config: Config, mask_secrets: bool = True) -> str:
    """The effective configuration as TOML that ``load_config`` reads back; secrets masked by default."""
    lines = [f"# effective configuration; read from: {', '.join(config.sources) or 'defaults only'}"]
    for key in ("credentials_file", "aws_config_file"):
        lines.append(f"{key} = {_toml_value(getattr(config, key))}")
    for section in SECTIONS:
        lines += ["", f"[{section}]"]
        for item in dataclasses.fields(getattr(config, section)):
            lines.append(f"{item.name} = {_toml_value(getattr(getattr(config, section), item.name))}")
    for credential in config.credentials:
        lines += ["", "[[credentials]]"]
        for item in dataclasses.fields(credential):
            value = getattr(credential, item.name)
            if item.name == "policy":
                if value is not None:
                    lines.append(f"policy = {_toml_value(json.dumps(value, sort_keys=True))}")
                continue
            if mask_secrets and item.name in SECRET_KEYS and value:
                value = MASK
            lines.append(f"{item.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot render {value!r}")  # pragma: no cover - a programming error
