"""https sources (pre-signed S3 URLs) against real S3 servers on 127.0.0.1, with injected faults."""
# ruff: noqa: F811  (the server fixtures are imported from tests.s3server)

from __future__ import annotations

import asyncio
import random
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from tests.faultproxy import Fault, fault_proxy
from tests.helpers import MiB, convert_file, sha256_file, write_sparse_raw
from tests.s3server import (  # noqa: F401  (fixtures)
    BUCKET,
    S3Server,
    aws_files,
    environment,
    fast_retries,
    moto,
    moto_server,
    seaweed,
    seaweed_server,
)
from vmied.convert import convert
from vmied.errors import StorageError, UsageError
from vmied.io.http import HttpSource, public_name
from vmied.io.local import FileSink
from vmied.io.open import create_sink, open_source
from vmied.io.retry import Retrier, RetryPolicy, Transient
from vmied.io.s3_config import S3Config
from vmied.pipeline import Progress, Workers

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("disk") / "disk.raw"
    rng = random.Random(11)
    write_sparse_raw(path, 12 * MiB, [(rng.randrange(0, 11 * MiB), 300_000) for _ in range(12)], seed=11)
    return path


def presign(server: S3Server, key: str, endpoint: str | None = None, profile: str | None = None) -> str:
    url: str = server.client(profile, endpoint).generate_presigned_url(
        "get_object", Params={"Bucket": BUCKET, "Key": key}, ExpiresIn=600)
    return url


async def convert_url(url: str, destination: Path, config: S3Config | None = None) -> HttpSource:
    source = await open_source(url, config)
    assert isinstance(source, HttpSource)
    try:
        sink = await FileSink.create(str(destination))
        with Workers() as workers:
            await convert(source, sink, "raw", input_format="raw", workers=workers, progress=Progress())
    finally:
        await source.close()
    return source


async def test_retrier_backs_off_with_jitter_and_records_reasons() -> None:
    policy = RetryPolicy(attempts=4, base_delay=0.001, max_delay=0.004)
    assert all(0 <= policy.delay(n, random.Random(n)) <= min(0.004, 0.001 * 2**n) for n in range(40))
    calls: list[int] = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise Transient("status-503", "busy")
        return "ok"

    async def broken() -> str:
        raise Transient("connection", "reset by peer")

    retrier = Retrier(policy)
    assert await retrier.run(flaky, "flaky") == "ok"
    assert [(r.reason, r.attempt) for r in retrier.records] == [("status-503", 1), ("status-503", 2)]
    with pytest.raises(StorageError, match=r"broken: gave up after 4 attempts \(last: connection"):
        await retrier.run(broken, "broken")
    assert len(retrier.records) == 5


def test_public_name_drops_the_signature_and_credentials() -> None:
    assert public_name("https://u:p@host:8443/b/k.vmdk?X-Amz-Signature=abc") == "https://host:8443/b/k.vmdk"


async def test_https_destination_is_refused() -> None:
    with pytest.raises(UsageError, match="only be a source"):
        await create_sink("https://127.0.0.1:1/x?sig=1")


async def test_presigned_url_converts_like_the_file(seaweed: S3Server, disk: Path, tmp_path: Path) -> None:
    seaweed.client().upload_file(str(disk), BUCKET, "disk.raw")
    await convert_url(presign(seaweed, "disk.raw"), tmp_path / "out.raw")
    assert sha256_file(tmp_path / "out.raw") == sha256_file(disk)


def test_cli_converts_a_presigned_url(seaweed: S3Server, disk: Path, tmp_path: Path,
                                     aws_files: dict[str, str]) -> None:
    seaweed.client().upload_file(str(disk), BUCKET, "disk.raw")
    out = tmp_path / "out.raw"
    run = subprocess.run([sys.executable, "-m", "vmied", "convert", "-f", "raw", presign(seaweed, "disk.raw"),
                          str(out)], env=environment(aws_files), capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert sha256_file(out) == sha256_file(disk)


async def test_faults_are_retried_from_the_last_byte(seaweed: S3Server, disk: Path, tmp_path: Path) -> None:
    seaweed.client().upload_file(str(disk), BUCKET, "disk.raw")
    reference = tmp_path / "reference.raw"
    await asyncio.to_thread(convert_file, disk, reference, "raw", input_format="raw")
    plan = [Fault("500", "GET", 1), Fault("reset", "GET", 3), Fault("slowdown", "GET", 4),
            Fault("truncate", "GET", 5), Fault("stall", "GET", 7), Fault("503", "GET", 8)]
    with fault_proxy(seaweed.endpoint, plan, stall=3.0) as proxy:
        config = S3Config(retry=fast_retries(read_timeout=0.5))
        source = await convert_url(presign(seaweed, "disk.raw", proxy.endpoint), tmp_path / "out.raw", config)
    assert sha256_file(tmp_path / "out.raw") == sha256_file(reference)
    assert len(proxy.fired) == len(plan), proxy.fired
    reasons = {record.reason for record in source.retries}
    assert {"status-503", "truncated"} <= reasons and reasons & {"timeout", "connection"}


async def test_retries_are_bounded(moto: S3Server) -> None:
    moto.client().put_object(Bucket=BUCKET, Key="small.raw", Body=bytes(MiB))
    with fault_proxy(moto.endpoint, [Fault("503", "GET", n) for n in range(1, 10)]) as proxy:
        url = presign(moto, "small.raw", proxy.endpoint)
        with pytest.raises(StorageError, match="gave up after 3 attempts") as failed:
            await open_source(url, S3Config(retry=fast_retries(attempts=3)))
    assert failed.value.reason == "storage.retries"
    assert "X-Amz-Signature" not in str(failed.value)


async def test_denied_and_missing_fail_fast(seaweed: S3Server) -> None:
    seaweed.client().put_object(Bucket=BUCKET, Key="small.raw", Body=bytes(MiB))
    config = S3Config(retry=fast_retries(attempts=3))
    forged = presign(seaweed, "small.raw", profile="moto")  # a key SeaweedFS does not know
    with pytest.raises(StorageError, match=r"access denied reading .*/small\.raw") as denied:
        await open_source(forged, config)
    assert denied.value.reason == "http.denied"
    assert "X-Amz-Signature" not in str(denied.value)
    with pytest.raises(StorageError, match="not found") as missing:
        await open_source(presign(seaweed, "absent.raw"), config)
    assert missing.value.reason == "http.not_found"


async def test_an_empty_object_has_size_zero(seaweed: S3Server) -> None:
    seaweed.client().put_object(Bucket=BUCKET, Key="empty.raw", Body=b"")
    source = await open_source(presign(seaweed, "empty.raw"))
    try:
        assert source.size == 0 and await source.read_at(0, 10) == b""
    finally:
        await source.close()


async def test_object_changed_while_reading(moto: S3Server) -> None:
    client = moto.client()
    client.put_object(Bucket=BUCKET, Key="moving.raw", Body=bytes(2 * MiB))
    source = await open_source(presign(moto, "moving.raw"))
    try:
        assert source.size == 2 * MiB
        assert await source.read_at(0, 10) == bytes(10)
        client.put_object(Bucket=BUCKET, Key="moving.raw", Body=b"\x01" * (2 * MiB))
        with pytest.raises(StorageError, match="object changed while reading") as changed:
            await source.read_at(MiB, 10)
        assert changed.value.reason == "http.changed"
    finally:
        await source.close()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (the CA bundle is the certificate itself)."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out",
                    str(cert)], check=True, capture_output=True)
    return cert, key


@pytest.fixture
async def https_file(certificate: tuple[Path, Path], disk: Path) -> AsyncIterator[str]:
    """The disk served over https on 127.0.0.1 by aiohttp (ranges and ETag as a static server does)."""
    async def serve(request: web.Request) -> web.FileResponse:
        return web.FileResponse(disk)

    app = web.Application()
    app.router.add_get("/disk.raw", serve)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"https://127.0.0.1:{port}/disk.raw?X-Amz-Signature=secret"
    await runner.cleanup()


async def test_https_with_a_custom_ca_bundle(https_file: str, certificate: tuple[Path, Path], disk: Path,
                                             tmp_path: Path) -> None:
    await convert_url(https_file, tmp_path / "out.raw", S3Config(ca_bundle=str(certificate[0])))
    assert sha256_file(tmp_path / "out.raw") == sha256_file(disk)
    with pytest.raises(StorageError, match="certificate") as untrusted:
        await open_source(https_file, S3Config(retry=fast_retries(attempts=3)))
    assert untrusted.value.reason == "http.tls"
    assert "secret" not in str(untrusted.value)


@pytest.mark.parametrize("location", ["https://127.0.0.1:9/x.raw", "s3://bucket/x.raw"])
async def test_a_missing_ca_bundle_is_refused_at_once(location: str, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="is not a readable file") as missing:
        await open_source(location, S3Config(ca_bundle=str(tmp_path / "absent.pem"), region="us-east-1",
                                             endpoint_url="https://127.0.0.1:9"))
    assert missing.value.reason == "tls.ca_bundle"
