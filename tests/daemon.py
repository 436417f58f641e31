"""The daemon as a real process for the API tests, plus the small disk images the task tests import.

``start_daemon`` writes a TOML configuration (a free 127.0.0.1 port, a temporary state directory,
one access key, the ``[s3]`` section pointing at the test S3 server), runs ``python -m vmied serve
--config`` and waits for ``/readyz``. The process can be stopped (SIGTERM), killed (SIGKILL) and
started again on the same state, which is what the restart tests do.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.server
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config as BotoConfig

from tests.helpers import MiB, qemu_img, random_layout, write_sparse_raw
from tests.s3server import BUCKET, S3Server, free_port
from vmied.config import Config, LimitsConfig, RoleConfig, S3AccessConfig, ServerConfig, StateConfig
from vmied.formats import open_reader
from vmied.formats.ova import write_appliance
from vmied.io.local import FileSink, FileSource
from vmied.pipeline import Workers

ROOT = Path(__file__).resolve().parents[1]
ACCESS_KEY = "AKIDVMIEDTESTKEY0001"
SECRET_KEY = "vmied-test-secret-key-0123456789abcdef"
REGION = "us-east-1"
ACCOUNT = "123456789012"


# --- disk images -------------------------------------------------------------------------------------

def make_raw(path: Path, size: int, seed: int) -> Path:
    """A raw disk with scattered random data (and long zero runs the store does not keep)."""
    rng = random.Random(seed)
    write_sparse_raw(path, size, [*random_layout(rng, size, 24), (size - MiB, 512 * 1024)], seed=seed)
    return path


def make_vmdk(raw: Path, out: Path) -> Path:
    """A stream-optimized VMDK made by qemu-img (the reference implementation)."""
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, out)
    return out


def make_vhd(raw: Path, out: Path) -> Path:
    qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic,force_size=on", raw, out)
    return out


def make_ova(raws: list[Path], out: Path) -> Path:
    """An OVA with one stream-optimized VMDK per raw disk (vmied's own appliance writer)."""

    async def write() -> None:
        with Workers(2) as workers:
            readers = [await open_reader(await FileSource.open(str(raw)), workers, "raw") for raw in raws]
            sink = await FileSink.create(str(out))
            try:
                await write_appliance(sink, [(f"disk{n}.vmdk", r.virtual_size, r.extents())
                                             for n, r in enumerate(readers)], workers)
                await sink.commit()
            except BaseException:
                await sink.abort()
                raise
            finally:
                for reader in readers:
                    await reader.close()

    asyncio.run(write())
    return out


def corrupt_vmdk(vmdk: Path, out: Path) -> Path:
    """A copy of a stream-optimized VMDK with grain data overwritten (inflate fails on it)."""
    data = bytearray(vmdk.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(range(256)) * 16
    out.write_bytes(bytes(data))
    return out


def upload(s3: S3Server, path: Path, key: str, bucket: str = BUCKET) -> str:
    s3.client().upload_file(str(path), bucket, key)
    return key


def read_disk(path: Path) -> bytes:
    return path.read_bytes()


class HeldServer:
    """An HTTP server on 127.0.0.1 that serves one file by byte ranges once ``release()`` is called.

    Until then every request for more than ``hold_above`` bytes waits (with 0, every request): a
    task reading from it stays where it is, which lets a test cancel an import, or kill the daemon
    during one, deterministically. With ``hold_above`` set, metadata reads pass and data reads wait.
    """

    def __init__(self, path: Path, hold_above: int = 0) -> None:
        self.data = path.read_bytes()
        self.hold_above = hold_above  # requests for at most this many bytes are answered at once
        self.held = 0  # requests waiting now
        self.released = threading.Event()
        self.requests = 0
        held = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def do_GET(self) -> None:
                held.requests += 1
                first, last = 0, len(held.data) - 1
                match = re.match(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
                if match:
                    first, last = int(match.group(1)), min(int(match.group(2)), len(held.data) - 1)
                if last - first + 1 > held.hold_above:
                    held.held += 1
                    released = held.released.wait(60)
                    held.held -= 1
                    if not released:
                        self.send_error(503)
                        return
                body = held.data[first:last + 1]
                self.send_response(206 if match else 200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", '"held"')
                if match:
                    self.send_header("Content-Range", f"bytes {first}-{last}/{len(held.data)}")
                self.end_headers()
                self.wfile.write(body)

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that left (killed daemon)
                    super().handle_error(request, client_address)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/disk.vmdk"

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


# --- in-process service configuration --------------------------------------------------------------

def service_config(state: Path, s3: S3Server, *, import_tasks: int = 20, read_buckets: list[str] | None = None,
                   disks_per_image: int = 21, read_urls: list[str] | None = None) -> Config:
    """A Config for ``Service.start`` in the test's process: temp state, the test S3 server as sources."""
    return Config(
        server=dataclasses.replace(ServerConfig(), account_id=ACCOUNT, region=REGION),
        state=StateConfig(directory=str(state)),
        s3=S3AccessConfig(endpoint_url=s3.endpoint, profile=s3.profile, region=REGION, path_style=True),
        role=RoleConfig(read_buckets=read_buckets or [BUCKET], write_buckets=[BUCKET], read_urls=read_urls or ["*"]),
        limits=dataclasses.replace(LimitsConfig(), import_tasks=import_tasks, workers=2,
                                   disks_per_image=disks_per_image),
        credentials_file=str(state / "aws-credentials"), aws_config_file=str(state / "aws-config"))


# --- the daemon process ------------------------------------------------------------------------------

class DaemonProcess:
    """``python -m vmied serve --config <toml>`` on a free loopback port, restartable on the same state."""

    def __init__(self, directory: Path, s3: S3Server, *, import_tasks: int = 20,
                 read_buckets: list[str] | None = None, grace_period: float = 5.0,
                 extra: str = "") -> None:
        self.directory = directory
        self.state = directory / "state"
        self.port = free_port()
        self.config_path = directory / "vmied.toml"
        self.log_path = directory / "daemon.log"
        buckets = ", ".join(f'"{b}"' for b in (read_buckets or [BUCKET]))
        self.config_path.write_text(f"""
credentials_file = "{directory / 'aws-credentials'}"
aws_config_file = "{directory / 'aws-config'}"

[server]
listen = ["127.0.0.1:{self.port}"]
region = "{REGION}"
account_id = "{ACCOUNT}"
grace_period = {grace_period}

[log]
level = "info"
format = "text"

[state]
directory = "{self.state}"

[s3]
endpoint_url = "{s3.endpoint}"
profile = "{s3.profile}"
region = "{REGION}"
path_style = true

[role]
read_buckets = [{buckets}]
read_urls = ["*"]

[limits]
import_tasks = {import_tasks}
workers = 2

[[credentials]]
access_key_id = "{ACCESS_KEY}"
secret_access_key = "{SECRET_KEY}"
{extra}
""")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "vmied", "serve", "--config", str(self.config_path)],
                                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"vmied serve exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/readyz", timeout=1) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"vmied serve was not ready within {timeout} s:\n{self.log()[-4000:]}")
            time.sleep(0.1)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait (the graceful path)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (what a crash or an OOM kill does)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, **config: Any) -> Any:
        """A boto3 EC2 client with the daemon's key (one attempt: retries would hide a wrong status)."""
        return boto3.session.Session().client(
            "ec2", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=BotoConfig(retries={"max_attempts": 1, "mode": "standard"}, **config))

    def cli_env(self, home: Path) -> dict[str, str]:
        """Environment for the ``aws`` CLI: a ``vmied`` profile in temp files, nothing else visible."""
        credentials, config = home / "cli-credentials", home / "cli-config"
        credentials.write_text(f"[vmied]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n")
        config.write_text(f"[profile vmied]\nregion = {REGION}\noutput = json\n")
        env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
        env.update(AWS_SHARED_CREDENTIALS_FILE=str(credentials), AWS_CONFIG_FILE=str(config), AWS_PROFILE="vmied",
                   AWS_EC2_METADATA_DISABLED="true", AWS_MAX_ATTEMPTS="1")
        return env


def wait_for_task(client: Any, task_id: str, timeout: float = 60.0, done: tuple[str, ...] = ("completed", "deleted")
                  ) -> dict[str, Any]:
    """Poll DescribeImport*Tasks until the task ends; its description."""
    deadline = time.monotonic() + timeout
    while True:
        if task_id.startswith("import-ami-"):
            task: dict[str, Any] = client.describe_import_image_tasks(ImportTaskIds=[task_id])["ImportImageTasks"][0]
            status = task["Status"]
        else:
            task = client.describe_import_snapshot_tasks(ImportTaskIds=[task_id])["ImportSnapshotTasks"][0]
            status = task["SnapshotTaskDetail"]["Status"]
        if status in done:
            return task
        if time.monotonic() > deadline:
            raise AssertionError(f"task {task_id} did not end within {timeout} s: {task}")
        time.sleep(0.1)


def aws(daemon: DaemonProcess, home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``aws ec2 ...`` (pip awscli) against the daemon with a ``vmied`` profile; JSON output."""
    result = subprocess.run([sys.executable, "-m", "awscli", "ec2", *args, "--endpoint-url", daemon.endpoint],
                            capture_output=True, text=True, env=daemon.cli_env(home), cwd=home, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"aws ec2 {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


def aws_json(daemon: DaemonProcess, home: Path, *args: str) -> Any:
    return json.loads(aws(daemon, home, *args).stdout or "null")
