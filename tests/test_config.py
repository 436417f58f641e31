"""The daemon's configuration: defaults without a file, drop-in merging, refusals naming the key, rendering."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from vmied.config import (
    MASK,
    Config,
    load_config,
    parse_duration,
    parse_size,
    render,
)
from vmied.errors import UsageError
from vmied.io.base import MiB

SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
TOKEN = "session-token-that-must-not-show"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load_system(tmp_path: Path) -> Config:
    """load_config as the daemon calls it without --config, on a test copy of /etc/vmied."""
    return load_config(None, system_file=str(tmp_path / "vmied.toml"), drop_ins=str(tmp_path / "conf.d"))


def test_defaults_without_any_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    config = load_system(tmp_path)
    assert config.sources == ()
    assert config.server.listen == ["127.0.0.1:8080"]
    assert (config.server.region, config.server.account_id) == ("us-east-1", "123456789012")
    assert (config.server.grace_period, config.server.max_clock_skew) == (60.0, 900.0)
    assert (config.log.level, config.log.format) == ("info", "auto")
    assert config.state.directory == str(tmp_path / "state")
    assert config.state.database == str(tmp_path / "state" / "vmied.db")
    assert (config.store.kind, config.store.path) == ("local", str(tmp_path / "state" / "store"))
    assert config.role.read_buckets == ["*"] and config.role.write_buckets == ["*"]
    assert config.role.read_urls == ["https://*"]  # a URL source is a fetch the caller chooses
    limits = config.limits
    assert (limits.import_tasks, limits.export_tasks, limits.disks_per_image) == (20, 5, 21)
    assert limits.max_export_bytes == 1 << 40
    assert config.credentials == []
    assert config.credentials_file == str(tmp_path / "aws-credentials")
    assert config == Config()


def test_state_directory_takes_the_first_of_systemds_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/vmied:/var/lib/other")
    assert Config().state.directory == "/var/lib/vmied"


def test_drop_ins_override_in_name_order_and_tables_merge(tmp_path: Path) -> None:
    write(tmp_path / "vmied.toml", """
[server]
listen = ["127.0.0.1:9000", "[::1]:9000"]
region = "eu-west-1"
[limits]
import_tasks = 3
export_tasks = 2
[[credentials]]
access_key_id = "AKIDFIRST0000000"
secret_access_key = "first-secret"
""")
    write(tmp_path / "conf.d" / "20-later.toml", """
[server]
region = "eu-central-1"
[log]
level = "debug"
[[credentials]]
access_key_id = "AKIDFIRST0000000"
secret_access_key = "replaced-secret"
""")
    write(tmp_path / "conf.d" / "10-earlier.toml", """
[server]
region = "ap-south-1"
grace_period = "2m"
[limits]
export_tasks = 4
[[credentials]]
access_key_id = "AKIDSECOND000000"
secret_access_key = "second-secret"
account_id = "210987654321"
""")
    write(tmp_path / "conf.d" / "ignored.conf", "not = toml at all [")
    config = load_system(tmp_path)
    assert config.sources == (str(tmp_path / "vmied.toml"), str(tmp_path / "conf.d" / "10-earlier.toml"),
                              str(tmp_path / "conf.d" / "20-later.toml"))
    assert config.server.region == "eu-central-1"  # the last file wins
    assert config.server.listen == ["127.0.0.1:9000", "[::1]:9000"]  # untouched keys of a table stay
    assert config.server.grace_period == 120.0
    assert (config.limits.import_tasks, config.limits.export_tasks) == (3, 4)
    assert config.log.level == "debug"
    keys = {c.access_key_id: c for c in config.credentials}
    assert keys["AKIDFIRST0000000"].secret_access_key == "replaced-secret"
    assert keys["AKIDFIRST0000000"].account_id == "123456789012"  # the server's account by default
    assert keys["AKIDSECOND000000"].account_id == "210987654321"


def test_an_explicit_file_is_read_alone(tmp_path: Path) -> None:
    explicit = write(tmp_path / "explicit.toml", "[log]\nlevel = \"warning\"\n")
    write(tmp_path / "conf.d" / "10.toml", "[log]\nlevel = \"debug\"\n")
    config = load_config(str(explicit), system_file=str(tmp_path / "vmied.toml"), drop_ins=str(tmp_path / "conf.d"))
    assert config.log.level == "warning" and config.sources == (str(explicit),)


@pytest.mark.parametrize(("text", "named"), [
    ("[server]\nlisen = ['127.0.0.1:1']\n", "server.lisen: unknown key"),
    ("[srever]\nregion = 'x'\n", "srever: unknown key"),
    ("verbose = true\n", "verbose: unknown key"),
    ("[log]\nlevel = 'loud'\n", "log.level: must be one of debug, info"),
    ("[log]\nlevel = 3\n", "log.level: must be a string"),
    ("[server]\nlisten = ['localhost']\n", "server.listen: 'localhost' is not HOST:PORT"),
    ("[server]\nlisten = []\n", "server.listen: needs at least one address"),
    ("[server]\nlisten = ['127.0.0.1:70000']\n", "server.listen"),
    ("[server]\naccount_id = '1234'\n", "server.account_id: must be 12 digits"),
    ("[server]\ngrace_period = 'soon'\n", "server.grace_period: 'soon' is not a duration"),
    ("[server]\ngrace_period = -1\n", "server.grace_period: must be at least 0"),
    ("[server]\nmax_clock_skew = true\n", "server.max_clock_skew"),
    ("[limits]\nimport_tasks = 0\n", "limits.import_tasks: must be at least 1"),
    ("[limits]\nimport_tasks = '20'\n", "limits.import_tasks: must be an integer"),
    ("[limits]\npart_size = '1MiB'\n", "limits.part_size: must be at least 5MiB"),
    ("[limits]\npart_size = '16 parsecs'\n", "limits.part_size: '16 parsecs' is not a size"),
    ("[limits]\nwindow_size = 1.5\n", "limits.window_size: must be a size"),
    ("[store]\nkind = 'tape'\n", "store.kind: must be one of local, s3"),
    ("[store]\nkind = 's3'\n", "store.kind = \"s3\" needs store.bucket"),
    ("[s3]\npath_style = 'yes'\n", "s3.path_style: must be true or false"),
    ("[role]\nread_buckets = [1]\n", "role.read_buckets: must be a list of strings"),
    ("server = 1\n", "server: must be a table"),
    ("[[credentials]]\naccess_key_id = 'AKIDONLY00000000'\n", "credentials[0].secret_access_key: is required"),
    ("[[credentials]]\naccess_key_id = 'AK ID'\nsecret_access_key = 's'\n", "credentials[0].access_key_id"),
    ("[[credentials]]\naccess_key_id = 'AKIDX0000000000'\nsecret_access_key = 's'\npolicy = '{nope'\n",
     "credentials[0].policy: is not valid JSON"),
    ("[[credentials]]\naccess_key_id = 'AKIDX0000000000'\nsecret_access_key = 's'\npolicy = '{}'\n",
     "credentials[0].policy: must be an IAM policy document"),
    ("[[credentials]]\naccess_key_id = 'AKIDX0000000000'\nsecret_access_key = 's'\nrole = 'admin'\n",
     "credentials[0].role: unknown key"),
    ("[server\n", "not valid TOML"),
])
def test_bad_files_are_refused_naming_the_file_and_key(tmp_path: Path, text: str, named: str) -> None:
    path = write(tmp_path / "vmied.toml", text)
    with pytest.raises(UsageError) as refused:
        load_config(str(path))
    assert named in refused.value.message
    assert str(path) in refused.value.message
    assert refused.value.exit_code == 2


def test_a_bad_drop_in_is_named(tmp_path: Path) -> None:
    write(tmp_path / "vmied.toml", "[log]\nlevel = 'info'\n")
    bad = write(tmp_path / "conf.d" / "50-typo.toml", "[limits]\nimport_task = 3\n")
    with pytest.raises(UsageError, match=r"50-typo\.toml: limits\.import_task: unknown key"):
        load_system(tmp_path)
    assert bad.exists()


def test_missing_explicit_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such file"):
        load_config(str(tmp_path / "absent.toml"))


@pytest.mark.parametrize(("text", "size"), [
    (4096, 4096), ("4096", 4096), ("64MiB", 64 * MiB), ("64 MiB", 64 * MiB), ("1.5GiB", 3 << 29),
    ("500MB", 500_000_000), ("1TiB", 1 << 40), ("2k", 2048), ("16m", 16 * MiB),
])
def test_sizes(text: int | str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MiB", "-1MiB", "12 furlongs", "1e9"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


@pytest.mark.parametrize(("text", "seconds"), [(30, 30.0), (2.5, 2.5), ("90s", 90.0), ("5m", 300.0),
                                               ("1h", 3600.0), ("250ms", 0.25), ("45", 45.0)])
def test_durations(text: float | str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_policies_as_table_json_or_file(tmp_path: Path) -> None:
    document = {"Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": ["ec2:ImportImage"], "Resource": "*"}]}
    write(tmp_path / "policy.json", json.dumps(document))
    path = write(tmp_path / "vmied.toml", f"""
[[credentials]]
access_key_id = "AKIDTABLE0000000"
secret_access_key = "s1"
policy = {{ Version = "2012-10-17", Statement = [{{ Effect = "Allow", Action = ["ec2:ImportImage"], Resource = "*"}}]}}
[[credentials]]
access_key_id = "AKIDJSON00000000"
secret_access_key = "s2"
policy = '{json.dumps(document)}'
[[credentials]]
access_key_id = "AKIDFILE00000000"
secret_access_key = "s3"
policy_file = "{tmp_path / 'policy.json'}"
[[credentials]]
access_key_id = "AKIDOPEN00000000"
secret_access_key = "s4"
""")
    policies = [c.policy for c in load_config(str(path)).credentials]
    assert policies == [document, document, document, None]


def test_render_masks_secrets_and_reads_back(tmp_path: Path) -> None:
    path = write(tmp_path / "vmied.toml", f"""
credentials_file = "{tmp_path / 'creds'}"
aws_config_file = "{tmp_path / 'conf'}"
[server]
listen = ["127.0.0.1:8181"]
grace_period = "90s"
[state]
directory = "{tmp_path / 'state'}"
[store]
kind = "s3"
bucket = "store-bucket"
prefix = "snaps/"
[limits]
max_export_bytes = "2TiB"
[[credentials]]
access_key_id = "AKIDRENDER000000"
secret_access_key = "{SECRET}"
session_token = "{TOKEN}"
policy = '{{"Version": "2012-10-17", "Statement": [{{"Effect": "Allow", "Action": "ec2:*", "Resource": "*"}}]}}'
""")
    config = load_config(str(path))
    shown = render(config)
    assert SECRET not in shown and TOKEN not in shown
    assert shown.count(MASK) == 2
    assert "AKIDRENDER000000" in shown  # the key id is not a secret: the operator needs it
    assert tomllib.loads(shown)["limits"]["max_export_bytes"] == 2 << 40
    full = write(tmp_path / "full.toml", render(config, mask_secrets=False))
    assert load_config(str(full)) == config


def test_s3_configs_follow_the_sections_and_limits(tmp_path: Path) -> None:
    path = write(tmp_path / "vmied.toml", """
[s3]
endpoint_url = "http://127.0.0.1:9000"
region = "us-west-2"
profile = "imports"
path_style = true
[store]
kind = "s3"
bucket = "store"
endpoint_url = "http://127.0.0.1:9001"
[limits]
window_size = "8MiB"
readahead = 2
part_size = "32MiB"
parts_in_flight = 3
""")
    config = load_config(str(path))
    access = config.s3_config()
    assert (access.endpoint_url, access.region, access.profile, access.path_style) == (
        "http://127.0.0.1:9000", "us-west-2", "imports", True)
    assert access.ca_bundle is None
    assert (access.window, access.readahead, access.part_size, access.parts_in_flight) == (8 * MiB, 2, 32 * MiB, 3)
    store = config.store_s3_config()
    assert (store.endpoint_url, store.profile, store.part_size) == ("http://127.0.0.1:9001", None, 32 * MiB)
    assert config.store.path == ""  # an S3 store has no local directory
