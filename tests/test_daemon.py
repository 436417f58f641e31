"""``vmied serve`` as a real process: ops endpoints, first-start credentials, signals, sd_notify, socket activation.

Every daemon here listens on a free 127.0.0.1 port, keeps its state in a temporary directory and
writes its AWS profile into temporary files (AWS_SHARED_CREDENTIALS_FILE / AWS_CONFIG_FILE).
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.session
import pytest
from botocore.config import Config as BotoConfig
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon import HeldServer, make_raw, make_vmdk
from tests.helpers import MiB
from tests.s3server import free_port
from vmied.config import MASK, LogConfig
from vmied.log import JsonFormatter, TextFormatter, setup_logging, use_json
from vmied.taskctl import table

ROOT = Path(__file__).resolve().parents[1]
GRACE = 5.0
EXTRA_KEY, EXTRA_SECRET = "AKIDRELOADED0001", "reloaded-secret-0123456789"


class Daemon:
    """One ``python -m vmied serve --config`` process and its files."""

    def __init__(self, directory: Path, *, extra: str = "", level: str = "info", port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.config_path = directory / "vmied.toml"
        self.log_path = directory / "daemon.log"
        self.credentials_file = directory / "aws" / "credentials"
        self.aws_config_file = directory / "aws" / "config"
        self.state = directory / "state"
        self.extra = extra
        self.write_config(level)
        self.process: subprocess.Popen[bytes] | None = None

    def write_config(self, level: str, extra: str | None = None) -> None:
        self.config_path.write_text(f"""
[server]
listen = ["127.0.0.1:{self.port}"]
grace_period = {GRACE}
[log]
level = "{level}"
format = "json"
[state]
directory = "{self.state}"
[role]
read_urls = ["http://127.0.0.1:*"]  # the tests' sources are HTTP servers on loopback
{self.extra if extra is None else extra}
""")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, **extra: str) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("AWS_", "NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_", "STATE_DIRECTORY"))}
        env.update(AWS_SHARED_CREDENTIALS_FILE=str(self.credentials_file), AWS_CONFIG_FILE=str(self.aws_config_file),
                   AWS_EC2_METADATA_DISABLED="true", PYTHONUNBUFFERED="1", **extra)
        return env

    def start(self, command: list[str] | None = None, wait: bool = True, pass_fds: tuple[int, ...] = (),
              **env: str) -> None:
        command = command or [sys.executable, "-m", "vmied", "serve", "--config", str(self.config_path)]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                            env=self.env(**env), pass_fds=pass_fds)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"vmied serve exited with {self.process.returncode}:\n{self.log_text()}")
            if get(self.url + "/readyz")[0] == 200:
                return
            assert time.monotonic() < deadline, f"not ready within {timeout} s:\n{self.log_text()}"
            time.sleep(0.1)

    def stop(self) -> tuple[int, float]:
        """SIGTERM; the exit code and how long the exit took."""
        assert self.process is not None
        began = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(GRACE + 15)
        return code, time.monotonic() - began

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                raise AssertionError(f"a log line that is not JSON: {line!r}") from None
        return lines

    def wait_log(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in self.log_lines() if predicate(line)]
            if found:
                return found[-1]
            assert time.monotonic() < deadline, f"no such log line within {timeout} s:\n{self.log_text()}"
            time.sleep(0.1)

    def ec2(self, profile: str | None = "vmied", **keys: str) -> Any:
        """An EC2 client of the written profile (this daemon's AWS files, region and endpoint) or of keys."""
        if profile is None:
            return boto3.session.Session(**keys).client("ec2", endpoint_url=self.url, region_name="us-east-1",
                                                        config=BotoConfig(retries={"max_attempts": 1}))
        files = botocore.session.Session()
        files.set_config_variable("credentials_file", str(self.credentials_file))
        files.set_config_variable("config_file", str(self.aws_config_file))
        files.set_config_variable("profile", profile)
        return boto3.session.Session(botocore_session=files).client(
            "ec2", config=BotoConfig(retries={"max_attempts": 1}))


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The exposition parsed: (sample name, sorted labels) -> value."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


@pytest.fixture
def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    running = Daemon(tmp_path)
    yield running
    running.kill()


def test_ops_endpoints_first_start_profile_and_restart(daemon: Daemon) -> None:
    daemon.credentials_file.parent.mkdir()
    daemon.credentials_file.write_text("# operator's file\n[default]\naws_access_key_id = KEEPME\n")
    daemon.start()

    status, body = get(daemon.url + "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body = get(daemon.url + "/readyz")
    assert status == 200 and json.loads(body)["status"] == "ready"
    status, body = get(daemon.url + "/metrics")
    assert status == 200
    metrics = samples(body.decode())
    assert metrics[("vmied_ready", ())] == 1.0
    assert ("vmied_tasks", (("kind", "import-image"), ("state", "active"))) in metrics
    assert any(name == "vmied_build_info" for name, _ in metrics)
    assert any(name == "process_resident_memory_bytes" for name, _ in metrics)

    # First start: a key kept 0600 in the state directory and written as the "vmied" profile.
    kept_path = daemon.state / "credentials.toml"
    assert stat.S_IMODE(kept_path.stat().st_mode) == 0o600
    kept = tomllib.loads(kept_path.read_text())
    credentials = daemon.credentials_file.read_text()
    assert "[default]\naws_access_key_id = KEEPME" in credentials and "# operator's file" in credentials
    assert f"[vmied]\naws_access_key_id = {kept['access_key_id']}\n" in credentials
    assert f"aws_secret_access_key = {kept['secret_access_key']}" in credentials
    assert stat.S_IMODE(daemon.credentials_file.stat().st_mode) == 0o600
    assert "[profile vmied]\nregion = us-east-1\n" in daemon.aws_config_file.read_text()
    # ... with which a client signs its requests at once (profile, region and endpoint from the files).
    assert daemon.ec2().describe_import_image_tasks()["ImportImageTasks"] == []
    assert any(line["msg"] == "generated an access key on first start" for line in daemon.log_lines())

    code, took = daemon.stop()
    assert code == 0 and took < GRACE
    assert daemon.log_lines()[-1]["msg"] == "stopped"

    # Second start on the same state: the same key, the files left as they were.
    written = (daemon.credentials_file.read_bytes(), daemon.aws_config_file.read_bytes())
    daemon.start()
    assert tomllib.loads(kept_path.read_text()) == kept
    assert (daemon.credentials_file.read_bytes(), daemon.aws_config_file.read_bytes()) == written
    assert daemon.ec2().describe_import_image_tasks()["ImportImageTasks"] == []
    assert sum(line["msg"] == "generated an access key on first start" for line in daemon.log_lines()) == 1
    assert daemon.stop()[0] == 0


def test_status_page_and_status_json(daemon: Daemon) -> None:
    daemon.start()
    status, body = get(daemon.url + "/")
    assert status == 200
    page = body.decode()
    assert "<title>vmied status</title>" in page and "No task is running." in page
    status, body = get(daemon.url + "/status.json")
    summary = json.loads(body)
    assert status == 200 and summary["ready"] is True and summary["listen"] == [f"127.0.0.1:{daemon.port}"]
    assert summary["running"] == [] and summary["failed"] == []


def test_show_config_masks_secrets_and_exits(tmp_path: Path) -> None:
    secret = "a-secret-that-must-not-be-printed"
    daemon = Daemon(tmp_path, extra=f"""
[[credentials]]
access_key_id = "AKIDSHOWN0000000"
secret_access_key = "{secret}"
""")
    shown = subprocess.run([sys.executable, "-m", "vmied", "serve", "--config", str(daemon.config_path),
                            "--show-config"], capture_output=True, text=True, env=daemon.env(), timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert secret not in shown.stdout and MASK in shown.stdout
    effective = tomllib.loads(shown.stdout)
    assert effective["server"]["listen"] == [f"127.0.0.1:{daemon.port}"]
    assert effective["credentials"][0]["access_key_id"] == "AKIDSHOWN0000000"
    assert not daemon.state.exists()  # it only printed: no state, no listener
    assert get(daemon.url + "/healthz")[0] == 0


def test_a_bad_configuration_stops_the_start_naming_the_key(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, extra="[limits]\nimport_taks = 3\n")
    started = subprocess.run([sys.executable, "-m", "vmied", "serve", "--config", str(daemon.config_path)],
                             capture_output=True, text=True, env=daemon.env(), timeout=60)
    assert started.returncode == 2
    assert "limits.import_taks: unknown key" in started.stderr and str(daemon.config_path) in started.stderr
    assert "Traceback" not in started.stderr


def test_sighup_reloads_log_level_and_credentials_and_keeps_running_on_a_bad_file(daemon: Daemon) -> None:
    daemon.start()
    assert daemon.process is not None
    assert get(daemon.url + "/healthz")[0] == 200
    assert not any(line["level"] == "debug" for line in daemon.log_lines())  # probes log at debug only

    new_key = f"""
[[credentials]]
access_key_id = "{EXTRA_KEY}"
secret_access_key = "{EXTRA_SECRET}"
"""
    daemon.write_config("debug", extra=new_key)
    daemon.process.send_signal(signal.SIGHUP)
    reloaded = daemon.wait_log(lambda line: line["msg"] == "configuration reloaded")
    assert reloaded["log_level"] == "debug"
    client = daemon.ec2(profile=None, aws_access_key_id=EXTRA_KEY, aws_secret_access_key=EXTRA_SECRET)
    assert client.describe_import_image_tasks()["ImportImageTasks"] == []
    assert get(daemon.url + "/healthz")[0] == 200
    probe = daemon.wait_log(lambda line: line["level"] == "debug" and line.get("path") == "/healthz")
    assert probe["status"] == 200  # the new level is in force

    daemon.config_path.write_text(daemon.config_path.read_text() + "\n[limits]\nimport_tasks = 'many'\n")
    daemon.process.send_signal(signal.SIGHUP)
    refused = daemon.wait_log(lambda line: line["msg"].startswith("reload refused"))
    assert "limits.import_tasks" in refused["error"]
    assert get(daemon.url + "/readyz")[0] == 200
    assert client.describe_import_image_tasks()["ImportImageTasks"] == []  # the running config stays
    metrics = samples(get(daemon.url + "/metrics")[1].decode())
    assert metrics[("vmied_config_reloads_total", (("outcome", "failed"),))] == 1.0
    assert metrics[("vmied_config_reloads_total", (("outcome", "ok"),))] == 1.0
    code, took = daemon.stop()
    assert code == 0 and took < GRACE


@pytest.mark.parametrize("namespace", ["path", "abstract"])
def test_sd_notify_ready_watchdog_and_stopping(daemon: Daemon, namespace: str) -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as short, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        if namespace == "path":
            address = os.path.join(short, "notify")  # short: AF_UNIX paths are limited to 108 bytes
            receiver.bind(address)
        else:
            address = f"@vmied-test-{os.getpid()}-{time.monotonic_ns()}"
            receiver.bind("\0" + address[1:])
        receiver.settimeout(60)
        daemon.start(wait=False, NOTIFY_SOCKET=address, WATCHDOG_USEC="400000")

        messages: list[str] = []

        def receive_until(state: str) -> None:
            while not any(state in message.split("\n") for message in messages):
                messages.append(receiver.recv(4096).decode())

        receive_until("READY=1")
        ready = next(message for message in messages if "READY=1" in message.split("\n"))
        assert f"STATUS=serving on 127.0.0.1:{daemon.port}" in ready
        assert get(daemon.url + "/readyz")[0] == 200  # READY comes after the listener is up
        receive_until("WATCHDOG=1")
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGTERM)
        receive_until("STOPPING=1")
        assert daemon.process.wait(GRACE + 15) == 0
        assert messages[0] == "STATUS=starting"


def test_socket_activation_uses_the_passed_socket(daemon: Daemon) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        # As systemd does: the socket as file descriptor 3, LISTEN_PID naming the process that runs.
        launcher = ("import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); os.close(fd); "
                    "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
                    "os.execv(sys.executable, [sys.executable, '-m', 'vmied', 'serve', '--config', sys.argv[2]])")
        daemon.start([sys.executable, "-c", launcher, str(listener.fileno()), str(daemon.config_path)],
                     wait=False, pass_fds=(listener.fileno(),))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while get(url + "/readyz")[0] != 200:
            assert daemon.process is not None and daemon.process.poll() is None, daemon.log_text()
            assert time.monotonic() < deadline, daemon.log_text()
            time.sleep(0.1)
    assert get(daemon.url + "/healthz")[0] == 0  # server.listen is replaced by the passed socket
    ready = daemon.wait_log(lambda line: line["msg"] == "ready")
    assert ready["listen"] == [f"127.0.0.1:{port}"]
    assert daemon.stop()[0] == 0


# --- the log formats (in process) --------------------------------------------------------------------

def log_record(**extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("vmied.tasks", logging.INFO, __file__, 1, "task %s", ("completed",), None)
    record.__dict__.update(extra)
    return record


def test_json_log_lines_carry_the_extras() -> None:
    line = json.loads(JsonFormatter().format(log_record(task_id="import-ami-0123456789abcdef0", phase="converting",
                                                        bytes=1 << 20, duration=1.5, level="not-a-level")))
    assert line["msg"] == "task completed" and line["logger"] == "vmied.tasks"
    assert line["level"] == "info"  # an extra never hides a standard field
    assert (line["task_id"], line["phase"], line["bytes"], line["duration"]) == (
        "import-ami-0123456789abcdef0", "converting", 1 << 20, 1.5)
    assert line["ts"].endswith("Z")
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        failed = log_record()
        failed.exc_info = sys.exc_info()
    text = JsonFormatter().format(failed)
    assert "\n" not in text and "ValueError: boom" in json.loads(text)["exc"]


def test_text_log_lines_and_the_auto_format() -> None:
    text = TextFormatter().format(log_record(request_id="r-1", action="ImportImage", code="OK"))
    assert text.endswith("INFO    vmied.tasks: task completed [request_id=r-1 action=ImportImage code=OK]")

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert use_json("auto", io.StringIO()) and not use_json("auto", Terminal())
    assert use_json("json", Terminal()) and not use_json("text", io.StringIO())


def test_setup_logging_applies_a_new_level_and_format_without_a_second_handler() -> None:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    stream = io.StringIO()
    try:
        setup_logging(LogConfig(level="warning", format="json"), stream)
        logging.getLogger("vmied.test").info("hidden")
        setup_logging(LogConfig(level="debug", format="text"), stream)
        logging.getLogger("vmied.test").debug("shown")
        assert len(root.handlers) == len(handlers) + 1
        assert "hidden" not in stream.getvalue() and "DEBUG   vmied.test: shown" in stream.getvalue()
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)


# --- vmied tasks (the operator CLI) against a running daemon --------------------------------------------

def vmied_tasks(daemon: Daemon, *args: str, expect: int = 0) -> str:
    done = subprocess.run([sys.executable, "-m", "vmied", "tasks", *args], capture_output=True, text=True,
                          env=daemon.env(), cwd=ROOT, timeout=60)
    assert done.returncode == expect, done.stdout + done.stderr
    return done.stdout if expect == 0 else done.stderr


def test_tasks_cli_lists_describes_and_cancels(daemon: Daemon, tmp_path: Path) -> None:
    daemon.start()
    vmdk = make_vmdk(make_raw(tmp_path / "disk.raw", 4 * MiB, 5), tmp_path / "disk.vmdk")
    held = HeldServer(vmdk, hold_above=64 * 1024)  # the header is read, the grains wait
    try:
        task_id = daemon.ec2().import_snapshot(DiskContainer={"Format": "VMDK", "Url": held.url})["ImportTaskId"]
        deadline = time.monotonic() + 30
        while not held.held:
            assert time.monotonic() < deadline, daemon.log_text()
            time.sleep(0.05)

        rows = json.loads(vmied_tasks(daemon, "--output", "json", "list"))
        row = next(row for row in rows if row["task_id"] == task_id)
        assert (row["kind"], row["status"]) == ("import-snapshot", "active")
        # Bytes and ETA come from /status.json once the conversion reports progress (not yet: held).
        assert {"bytes_done", "bytes_total", "eta_seconds"} <= set(row)
        listing = vmied_tasks(daemon, "list")
        assert listing.splitlines()[0].split() == ["TASK", "KIND", "STATUS", "MESSAGE", "PROGRESS", "BYTES", "ETA"]
        assert any(line.startswith(task_id) and " active " in line for line in listing.splitlines())

        described = json.loads(vmied_tasks(daemon, "--output", "json", "describe", task_id))[0]
        assert described["task"]["SnapshotTaskDetail"]["Url"] == held.url

        assert vmied_tasks(daemon, "cancel", task_id).strip() == f"{task_id}: active -> deleting"
        held.release()
        deadline = time.monotonic() + 30
        while json.loads(vmied_tasks(daemon, "--output", "json", "describe", task_id))[0]["status"] != "deleted":
            assert time.monotonic() < deadline, daemon.log_text()
            time.sleep(0.2)
    finally:
        held.close()
    assert "is not a task id" in vmied_tasks(daemon, "describe", "ami-0123456789abcdef0", expect=2)
    refused = vmied_tasks(daemon, "describe", "import-ami-0123456789abcdef0", expect=1)
    assert "DescribeImportImageTasks" in refused and "Traceback" not in refused


def test_tasks_table_shows_bytes_and_eta() -> None:
    rows = [{"task_id": "import-ami-0123456789abcdef0", "kind": "import-image", "status": "active",
             "status_message": "converting", "progress": 42, "bytes_done": 3 << 29, "bytes_total": 4 << 30,
             "eta_seconds": 3725.0},
            {"task_id": "import-snap-0123456789abcdef0", "kind": "import-snapshot", "status": "completed",
             "status_message": "", "progress": None, "bytes_done": None, "bytes_total": None, "eta_seconds": None}]
    lines = table(rows).splitlines()
    assert lines[1].split() == ["import-ami-0123456789abcdef0", "import-image", "active", "converting", "42%",
                                "1.5", "GiB/4.0", "GiB", "1h02m"]
    assert lines[2].split() == ["import-snap-0123456789abcdef0", "import-snapshot", "completed", "-", "-", "-", "-"]


def test_sigterm_during_a_running_import_stops_within_the_grace_period(daemon: Daemon, tmp_path: Path) -> None:
    daemon.start()
    vmdk = make_vmdk(make_raw(tmp_path / "disk.raw", 4 * MiB, 6), tmp_path / "disk.vmdk")
    held = HeldServer(vmdk, hold_above=64 * 1024)  # the import stays in its conversion until the test ends
    try:
        daemon.ec2().import_snapshot(DiskContainer={"Format": "VMDK", "Url": held.url})
        deadline = time.monotonic() + 30
        while not held.held:
            assert time.monotonic() < deadline, daemon.log_text()
            time.sleep(0.05)
        assert daemon.process is not None
        began = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        daemon.wait_log(lambda line: line["msg"] == "stopping")
        status, body = get(daemon.url + "/readyz")
        assert (status, json.loads(body)["status"]) == (503, "stopping")  # still answering, taking no work
        assert daemon.process.wait(GRACE + 15) == 0
        took = time.monotonic() - began
        assert GRACE - 0.5 <= took < GRACE + 10  # the task had its grace period, then was checkpointed
    finally:
        held.close()


def test_an_unusable_state_directory_stops_the_start_with_its_reason(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    daemon = Daemon(tmp_path)
    daemon.config_path.write_text(daemon.config_path.read_text().replace(
        f'directory = "{daemon.state}"', f'directory = "{tmp_path / "a-file" / "state"}"'))
    started = subprocess.run([sys.executable, "-m", "vmied", "serve", "--config", str(daemon.config_path)],
                             capture_output=True, text=True, env=daemon.env(), timeout=60)
    assert started.returncode == 4, started.stderr
    assert "a-file/state: Not a directory" in started.stderr and "Traceback" not in started.stderr


def test_task_transitions_are_logged_with_id_phase_bytes_and_duration(daemon: Daemon, tmp_path: Path) -> None:
    daemon.start()
    vmdk = make_vmdk(make_raw(tmp_path / "disk.raw", 2 * MiB, 8), tmp_path / "disk.vmdk")
    served = HeldServer(vmdk)
    served.release()
    try:
        task_id = daemon.ec2().import_snapshot(DiskContainer={"Format": "VMDK", "Url": served.url})["ImportTaskId"]
        done = daemon.wait_log(lambda line: line.get("task_id") == task_id and line.get("state") == "completed")
    finally:
        served.close()
    assert done["kind"] == "import-snapshot" and done["duration"] > 0
    assert any(counters.get("read") for counters in done["bytes"].values()), done
    request = next(line for line in daemon.log_lines() if line.get("action") == "ImportSnapshot")
    assert request["code"] == "OK" and request["request_id"]
