"""S3 sources and sinks against real S3 servers on 127.0.0.1 (moto, SeaweedFS), with injected faults."""
# ruff: noqa: F811  (the server fixtures are imported from tests.s3server)

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import subprocess
import sys
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path

import pytest

from tests.faultproxy import Fault, fault_proxy
from tests.helpers import MiB, convert_file, qemu_img, random_layout, sha256_file, write_sparse_raw
from tests.s3server import (  # noqa: F401  (fixtures)
    ASSUMED,
    BUCKET,
    PROFILES,
    S3Server,
    aws_files,
    environment,
    fast_retries,
    moto,
    moto_server,
    seaweed,
    seaweed_server,
)
from vmied import metrics
from vmied.convert import convert
from vmied.errors import Cancelled, StorageError, UnsupportedImage
from vmied.formats.formats_available import WRITERS
from vmied.formats.raw import flat_extents
from vmied.io.base import Sink, Source
from vmied.io.open import create_sink, open_source
from vmied.io.retry import RangedSource, Received
from vmied.io.s3 import (
    FLAT_PARTS,
    MAX_PART,
    MAX_PARTS,
    MIN_PART,
    S3Sink,
    base_part_size,
    content_md5,
    multipart_etag,
    part_size,
    plan_capacity,
    s3_call,
    s3_client,
)
from vmied.io.s3_config import S3Config, S3Location
from vmied.io.s3_zeros import RUNG_FACTOR, ZeroLadder, rung_sizes
from vmied.pipeline import Progress, Workers

ROOT = Path(__file__).resolve().parents[1]
DISK = 24 * MiB


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sparse raw disk with scattered data, some of it in 64 KiB runs the readers see as zero."""
    path = tmp_path_factory.mktemp("disk") / "disk.raw"
    rng = random.Random(5)
    write_sparse_raw(path, DISK, [*random_layout(rng, DISK, 20), (DISK - 3 * MiB, 2 * MiB)], seed=5)
    return path


def url(key: str) -> str:
    return f"s3://{BUCKET}/{key}"


async def run_convert(src: str, dst: str, output_format: str, src_config: S3Config | None = None,
                      dst_config: S3Config | None = None, input_format: str | None = None,
                      progress: Progress | None = None) -> tuple[Source, Sink]:
    source = await open_source(src, src_config)
    try:
        sink = await create_sink(dst, dst_config)
        with Workers() as workers:
            await convert(source, sink, output_format, input_format=input_format, workers=workers,
                          progress=progress or Progress())
    finally:
        await source.close()
    return source, sink


def download(server: S3Server, key: str, path: Path) -> Path:
    server.client().download_file(BUCKET, key, str(path))
    return path


def s3_sha256(server: S3Server, key: str) -> str:
    digest = hashlib.sha256()
    body = server.client().get_object(Bucket=BUCKET, Key=key)["Body"]
    while chunk := body.read(4 * MiB):
        digest.update(chunk)
    return digest.hexdigest()


# -- the part plan


def test_part_plan_fits_the_s3_limits() -> None:
    base = base_part_size(S3Config().part_size, None)
    assert base == 8 * MiB
    sizes = [part_size(i, base) for i in range(MAX_PARTS)]
    assert all(MIN_PART <= s <= MAX_PART for s in sizes)
    assert sum(sizes) >= 5 * (1 << 40)  # the S3 object limit fits without a size hint
    assert set(sizes[:FLAT_PARTS]) == {base}
    with pytest.raises(StorageError, match="10000 parts"):
        part_size(MAX_PARTS, base)


def test_part_size_grows_only_when_the_hint_needs_it() -> None:
    # A large source must not make every part larger (memory is part size x parts in flight).
    assert base_part_size(8 * MiB, 2 * (1 << 40)) == 8 * MiB
    assert base_part_size(MIN_PART, 4 * (1 << 40)) == MIN_PART
    hinted = base_part_size(MIN_PART, 5 * (1 << 40))  # the S3 object limit: more than a 5 MiB plan holds
    assert hinted % MiB == 0 and plan_capacity(hinted) >= 5 * (1 << 40) and hinted <= 8 * MiB
    assert base_part_size(1, None) == MIN_PART
    assert base_part_size(16 * MiB, 1 << 60) == MAX_PART


def test_location_parsing() -> None:
    assert S3Location.parse("s3://b/a/b.vmdk") == S3Location("b", "a/b.vmdk")
    for bad in ("s3://b", "s3:///k", "s3://b/dir/"):
        with pytest.raises(Exception, match="s3://bucket/key"):
            S3Location.parse(bad)


# -- conversions through S3 match file-to-file ones


@pytest.mark.parametrize("output_format", sorted(WRITERS))
async def test_every_format_through_s3_matches_local(moto: S3Server, disk: Path, tmp_path: Path,
                                                     output_format: str) -> None:
    """file -> S3 (fmt) -> S3 (raw) -> file gives the disk back; the S3 output reads as the local one does."""
    config = moto.config(part_size=MIN_PART, parts_in_flight=2)
    await run_convert(str(disk), url(f"out.{output_format}"), output_format, dst_config=config,
                      input_format="raw")
    local = tmp_path / f"local.{output_format}"
    await asyncio.to_thread(convert_file, disk, local, output_format, input_format="raw")
    remote = download(moto, f"out.{output_format}", tmp_path / f"remote.{output_format}")
    assert remote.stat().st_size == local.stat().st_size
    await run_convert(url(f"out.{output_format}"), url("back.raw"), "raw", src_config=config,
                      dst_config=config, input_format="raw" if output_format == "raw" else None)
    assert s3_sha256(moto, "back.raw") == sha256_file(disk)
    if output_format != "ova":
        qemu_img("compare", "-f", "raw", disk, remote)
    assert moto.uploads() == []


async def test_small_output_is_one_put_and_large_is_multipart(moto: S3Server, tmp_path: Path) -> None:
    small, large = tmp_path / "small.raw", tmp_path / "large.raw"
    small.write_bytes(random.Random(1).randbytes(3 * MiB))
    large.write_bytes(random.Random(2).randbytes(13 * MiB))
    config = moto.config(part_size=MIN_PART)
    for path in (small, large):
        await run_convert(str(path), url(path.name), "raw", dst_config=config, input_format="raw")
        assert s3_sha256(moto, path.name) == sha256_file(path)
    client = moto.client()
    assert "-" not in client.head_object(Bucket=BUCKET, Key="small.raw")["ETag"]
    assert client.head_object(Bucket=BUCKET, Key="large.raw")["ETag"].endswith('-3"')


async def test_the_completed_object_has_the_checksum_of_the_parts(moto: S3Server, seaweed: S3Server,
                                                                  tmp_path: Path) -> None:
    """The sink's expected ETag (MD5 of the parts' MD5s) is what real servers give the object."""
    content = random.Random(3).randbytes(12 * MiB)
    data = tmp_path / "disk.raw"
    data.write_bytes(content)
    digests = [hashlib.md5(content[start:start + MIN_PART]).hexdigest() for start in range(0, len(content), MIN_PART)]
    for server in (moto, seaweed):
        await run_convert(str(data), url("etag.raw"), "raw", dst_config=server.config(part_size=MIN_PART),
                          input_format="raw")
        etag = server.client().head_object(Bucket=BUCKET, Key="etag.raw")["ETag"]
        assert etag == multipart_etag([f'"{digest}"' for digest in digests])
    assert multipart_etag(['"not-an-md5"', '"0123"']) is None


async def test_an_object_replaced_while_it_is_written_fails_the_checksum(moto: S3Server) -> None:
    class RacedSink(S3Sink):
        """Another writer replaces the object between CompleteMultipartUpload and HeadObject."""

        async def _complete(self) -> None:
            await super()._complete()
            replacement = bytes(self.position)  # the same size: only the checksum can tell
            await asyncio.to_thread(moto.client().put_object, Bucket=BUCKET, Key="raced.raw", Body=replacement)

    config = moto.config(part_size=MIN_PART)
    sink = await RacedSink.create(S3Location(BUCKET, "raced.raw"), config, None)
    await sink.write(random.Random(5).randbytes(11 * MiB))
    with pytest.raises(StorageError, match=r"ETag .* not the .* of the bytes uploaded") as failed:
        await sink.commit()
    assert failed.value.reason == "s3.checksum"
    await sink.abort()  # as convert does on any failure: the other writer's object is not deleted
    assert not moto.uploads()
    assert moto.client().get_object(Bucket=BUCKET, Key="raced.raw")["Body"].read() == bytes(11 * MiB)


async def test_placeholders_keep_their_parts_until_filled(moto: S3Server) -> None:
    """Placeholders at the start and across a part boundary are filled after later parts went out."""
    config = moto.config(part_size=MIN_PART, parts_in_flight=2)
    sink = await create_sink(url("placeholders"), config)
    rng = random.Random(3)
    expected = bytearray()
    head = await sink.reserve(4096)
    expected += bytes(4096)
    first = rng.randbytes(MIN_PART - 4096 - 100)
    await sink.write(first)
    expected += first
    straddling = await sink.reserve(300)  # crosses the first part boundary
    expected += bytes(300)
    rest = rng.randbytes(3 * MIN_PART)
    await sink.write(rest)
    expected += rest
    await sink.skip(MiB)
    expected += bytes(MiB)
    head_data, straddle_data = rng.randbytes(4096), rng.randbytes(300)
    await sink.fill(straddling, straddle_data)
    await sink.fill(head, head_data)
    expected[0:4096] = head_data
    expected[straddling.offset : straddling.offset + 300] = straddle_data
    await sink.commit()
    body = moto.client().get_object(Bucket=BUCKET, Key="placeholders")["Body"].read()
    assert body == bytes(expected)


async def test_zero_runs_become_shared_zero_parts(moto: S3Server) -> None:
    """Skipped zeros: whole parts go out from one shared buffer, partial ones and a part holding a
    placeholder are assembled as usual; the object is byte for byte what was written."""
    config = moto.config(part_size=MIN_PART, parts_in_flight=2)
    sink = await create_sink(url("zeros"), config)
    assert isinstance(sink, S3Sink)
    rng = random.Random(4)
    expected = bytearray()
    lead = rng.randbytes(MiB + 7)
    await sink.write(lead)
    expected += lead
    await sink.skip(4 * MIN_PART)  # finishes part 1, three whole zero parts, then part of the next
    expected += bytes(4 * MIN_PART)
    placeholder = await sink.reserve(512)  # inside a zero run: its part is assembled, not shared
    expected += bytes(512)
    await sink.skip(2 * MIN_PART)
    expected += bytes(2 * MIN_PART)
    tail = rng.randbytes(1000)
    await sink.write(tail)
    expected += tail
    filler = rng.randbytes(512)
    await sink.fill(placeholder, filler)
    expected[placeholder.offset : placeholder.offset + 512] = filler
    await sink.commit()
    assert sink.zero_parts == 4  # parts 2, 3, 4 and 6
    body = moto.client().get_object(Bucket=BUCKET, Key="zeros")["Body"].read()
    assert len(body) == len(expected) and body == bytes(expected)
    assert moto.uploads() == []


async def write_with_zero_run(sink: S3Sink, zeros: int) -> str:
    """3 MiB of data, ``zeros`` zeros, 2 MiB of data, committed; the SHA-256 of what was written."""
    rng = random.Random(6)
    head, tail = rng.randbytes(3 * MiB), rng.randbytes(2 * MiB)
    await sink.write(head)
    await sink.skip(zeros)
    await sink.write(tail)
    await sink.commit()
    digest = hashlib.sha256(head)
    for _ in range(zeros // MiB):
        digest.update(bytes(MiB))
    digest.update(tail)
    return digest.hexdigest()


@pytest.mark.parametrize(("server_name", "zero_copy_max", "zeros", "part_sizes"), [
    # one rung of 40 MiB: copied whole while the run is longer; the 3 MiB left go with the tail
    ("moto", 8 * MIN_PART, (2 + 40 + 40 + 3) * MiB, [5, 40, 40, 5]),
    # the 6 MiB left make a part of their own: a range of the rung
    ("moto", 8 * MIN_PART, (2 + 40 + 6) * MiB, [5, 40, 6, 2]),
    # rungs of 40 and 320 MiB: the largest whole, then a range of it
    ("seaweed", 64 * MIN_PART, (2 + 320 + 100) * MiB, [5, 320, 100, 2]),
])
async def test_zero_runs_are_copied_inside_the_server(request: pytest.FixtureRequest, server_name: str,
                                                      zero_copy_max: int, zeros: int, part_sizes: list[int]) -> None:
    """A run of zeros is covered by whole copies of the largest scratch object of zeros while it is
    longer, then by a copy of the rest from the smallest one holding it, if the rest makes a part.
    The object is what was written, its checksum verified; no scratch object and no upload is left."""
    server: S3Server = request.getfixturevalue(server_name)
    config = server.config(part_size=MIN_PART, zero_copy_max=zero_copy_max)
    sink = await create_sink(url("sparse.raw"), config)
    assert isinstance(sink, S3Sink)
    sizes: dict[int, int] = {}
    sink.on_part = lambda number, etag, size: sizes.__setitem__(number, size)
    expected = await write_with_zero_run(sink, zeros)
    assert [sizes[number] / MiB for number in sorted(sizes)] == part_sizes
    assert (sink.copied_parts, sink.zero_parts) == (len(part_sizes) - 2, 0)
    assert s3_sha256(server, "sparse.raw") == expected
    assert server.objects() == ["sparse.raw"] and server.uploads() == []


async def test_a_rerun_removes_the_scratch_objects_a_killed_run_left(moto: S3Server) -> None:
    """A conversion killed outright (SIGKILL, power loss) cannot delete its scratch objects of zeros; the
    next conversion of the same output that copies zeros removes them and their uploads, and nothing
    else beside the output."""
    client = moto.client()
    for key in ("again.raw.vmied-zeros-335544320", "again.raw.other", "again.raw2.vmied-zeros-41943040"):
        client.put_object(Bucket=BUCKET, Key=key, Body=b"x")
    client.create_multipart_upload(Bucket=BUCKET, Key="again.raw.vmied-zeros-check")
    sink = await create_sink(url("again.raw"), moto.config(part_size=MIN_PART, zero_copy_max=8 * MIN_PART))
    assert isinstance(sink, S3Sink)
    expected = await write_with_zero_run(sink, (2 + 40 + 6) * MiB)
    assert sink.copied_parts == 2
    assert s3_sha256(moto, "again.raw") == expected
    assert sorted(moto.objects()) == ["again.raw", "again.raw.other", "again.raw2.vmied-zeros-41943040"]
    assert moto.uploads() == []


async def test_a_resumed_upload_keeps_its_parts_and_copies_its_zeros_again(moto: S3Server) -> None:
    """Copied parts are numbered like any other, so a resumed upload keeps the parts it sent before and
    makes the copies again (scratch objects do not outlive a detached sink)."""
    config = moto.config(part_size=MIN_PART, parts_in_flight=1, zero_copy_max=8 * MIN_PART)
    rng = random.Random(8)
    head, tail = rng.randbytes(3 * MiB), rng.randbytes(8 * MiB)
    zeros = 2 * MiB + 40 * MiB + 6 * MiB  # part 1 ends in zeros, parts 2 and 3 are copies (the rung, and 6
    recorded: dict[int, tuple[str, int]] = {}  # MiB of it), parts 4 and 5 hold the tail

    async def write(sink: S3Sink) -> None:
        await sink.write(head)
        await sink.skip(zeros)
        await sink.write(tail)

    first = await create_sink(url("resumed.raw"), config)
    assert isinstance(first, S3Sink)
    first.on_part = lambda number, etag, size: recorded.__setitem__(number, (etag, size))
    await write(first)
    while len(recorded) < 4:
        await asyncio.sleep(0.01)
    upload_id = first.upload_id
    assert upload_id is not None and first.copied_parts == 2
    await first.detach()
    assert moto.objects() == [] and moto.uploads() == ["resumed.raw"]
    second = await create_sink(url("resumed.raw"), config)
    assert isinstance(second, S3Sink)
    assert await second.resume(upload_id, recorded, first.part_base)
    await write(second)
    await second.commit()
    assert (second.parts_skipped, second.copied_parts) == (2, 2)
    expected = head + bytes(zeros) + tail
    assert moto.client().get_object(Bucket=BUCKET, Key="resumed.raw")["Body"].read() == expected
    assert moto.objects() == ["resumed.raw"] and moto.uploads() == []


async def test_the_ladder_copies_no_part_shorter_than_planned_and_starts_only_for_a_long_run(
        moto: S3Server) -> None:
    """Rungs of 40 and 320 MiB: no copy for a part planned longer than the run or than every rung that
    fits in it, none before a run as long as the first rung; then ranges of it for shorter runs."""
    async with AsyncExitStack() as stack:
        client = await s3_client(moto.config(), stack)
        ladder = ZeroLadder(client, S3Location(BUCKET, "out.raw"),
                            lambda location, action, what, call: s3_call(location, action, call),
                            content_md5, rung_sizes(MIN_PART, 64 * MIN_PART))
        assert await ladder.copy_for(30 * MiB, 40 * MiB) is None  # the run is shorter than its part
        assert await ladder.copy_for(100 * MiB, 50 * MiB) is None  # the 40 MiB rung is shorter than it
        assert await ladder.copy_for(30 * MiB, MIN_PART) is None  # too short to build the first rung
        assert moto.objects() == []
        whole = await ladder.copy_for(45 * MiB, MIN_PART)
        assert whole is not None and whole.size == whole.rung.size == 40 * MiB
        part = await ladder.copy_for(6 * MiB, MIN_PART)  # now the first rung is there: a range of it
        assert part is not None and (part.rung, part.size) == (whole.rung, 6 * MiB)
        assert part.arguments()["CopySourceRange"] == f"bytes=0-{6 * MiB - 1}"
        assert moto.objects() == ["out.raw.vmied-zeros-41943040"] and moto.uploads() == []
        await ladder.remove()
    assert moto.objects() == []


@pytest.mark.parametrize("copies", ["refused", "whole"])
async def test_a_server_that_cannot_copy_ranges_gets_the_zeros_uploaded(moto: S3Server, copies: str) -> None:
    """A range of the first rung is copied once into a throwaway upload; refused (501), or made whole
    as by a server that ignores the range, the ladder is off and the zeros are uploaded."""
    with fault_proxy(moto.endpoint, [], copies=copies) as proxy:
        config = moto.config(proxy.endpoint, part_size=MIN_PART, zero_copy_max=8 * MIN_PART)
        sink = await create_sink(url("sparse.raw"), config)
        assert isinstance(sink, S3Sink)
        expected = await write_with_zero_run(sink, 2 * MiB + 2 * 40 * MiB + 6 * MiB)
    assert proxy.copies_altered == 1
    assert (sink.copied_parts, sink.zero_parts) == (0, 17)
    assert s3_sha256(moto, "sparse.raw") == expected
    assert moto.objects() == ["sparse.raw"] and moto.uploads() == []


async def test_a_refused_larger_rung_leaves_the_copies_to_the_rungs_built(moto: S3Server) -> None:
    """The 320 MiB rung cannot be made (its copies refused): the ladder stops growing but keeps the
    40 MiB rung, whose copies may already be in flight, and covers the run with it."""
    with fault_proxy(moto.endpoint, [], copies="rungs-refused") as proxy:
        config = moto.config(proxy.endpoint, part_size=MIN_PART, zero_copy_max=64 * MIN_PART)
        sink = await create_sink(url("sparse.raw"), config)
        assert isinstance(sink, S3Sink)
        sizes: dict[int, int] = {}
        sink.on_part = lambda number, etag, size: sizes.__setitem__(number, size)
        expected = await write_with_zero_run(sink, (2 + 320 + 100) * MiB)
    assert proxy.copies_altered == RUNG_FACTOR  # the copies into the larger rung, sent at once, none retried
    assert [sizes[number] / MiB for number in sorted(sizes)] == [5, *[40] * 10, 20, 2]
    assert s3_sha256(moto, "sparse.raw") == expected
    assert moto.objects() == ["sparse.raw"] and moto.uploads() == []


async def test_a_crash_leaves_no_scratch_object_after_cleanup(moto: S3Server) -> None:
    """What a killed export may leave beside its object (scratch objects of zeros, a rung upload in
    progress) is removed by the export's cleanup; other objects with similar names are not."""
    from vmied.tasks.export_tasks import abort_uploads

    client = moto.client()
    for key in ("out.raw", "out.raw.vmied-zeros-41943040", "out.raw.vmied-zeros-335544320", "out.raw.other"):
        client.put_object(Bucket=BUCKET, Key=key, Body=b"x")
    client.create_multipart_upload(Bucket=BUCKET, Key="out.raw.vmied-zeros-check")
    client.create_multipart_upload(Bucket=BUCKET, Key="out.raw")
    await abort_uploads(moto.config(), S3Location(BUCKET, "out.raw"))
    assert sorted(moto.objects()) == ["out.raw", "out.raw.other"]
    assert moto.uploads() == []


async def test_read_with_one_identity_write_with_another(seaweed: S3Server, disk: Path) -> None:
    seaweed.client().upload_file(str(disk), BUCKET, "disk.raw")
    reader, writer = seaweed.config(profile="reader"), seaweed.config(profile="weed")
    await run_convert(url("disk.raw"), url("copy.raw"), "raw", reader, writer, input_format="raw")
    assert s3_sha256(seaweed, "copy.raw") == sha256_file(disk)
    with pytest.raises(StorageError, match=r"access denied: s3:PutObject.*vmied-test.*copy2\.raw") as denied:
        await run_convert(url("disk.raw"), url("copy2.raw"), "raw", reader, reader, input_format="raw")
    assert denied.value.reason == "s3.denied"
    assert seaweed.uploads() == [] and "copy2.raw" not in seaweed.objects()


# -- refusals fail fast and name what was denied


async def test_missing_object_fails_fast_naming_bucket_and_key(moto: S3Server) -> None:
    config = moto.config(retry=fast_retries(attempts=3))
    with pytest.raises(StorageError, match=r"no such .*: bucket 'vmied-test' key 'absent\.raw'") as missing:
        await open_source(url("absent.raw"), config)
    assert missing.value.reason == "s3.not_found"
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here'"):
        await open_source("s3://no-such-bucket-here/x.raw", config)


async def test_profile_that_assumes_a_role(moto: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """The AWS chain's AssumeRole (here against moto's STS) yields session credentials that read S3."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", moto.endpoint)
    moto.client().put_object(Bucket=BUCKET, Key="role.raw", Body=b"r" * 1000)
    source = await open_source(url("role.raw"), moto.config(profile=ASSUMED))
    try:
        assert await source.read_at(0, 1000) == b"r" * 1000
        credentials = await source._client._get_credentials().get_frozen_credentials()  # type: ignore[attr-defined]
        assert credentials.token and credentials.access_key != "motokey"
    finally:
        await source.close()


async def test_web_identity_from_the_environment(moto: S3Server, monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    """AWS_ROLE_ARN + AWS_WEB_IDENTITY_TOKEN_FILE (as a Kubernetes service account sets them): the chain
    calls STS AssumeRoleWithWebIdentity with the token (here moto's STS) and reads S3 with the session."""
    from moto.sts.models import sts_backends

    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6dm1pZWQifQ.c2ln")
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", moto.endpoint)
    monkeypatch.setenv("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/vmied-web")
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token))
    monkeypatch.setenv("AWS_ROLE_SESSION_NAME", "vmied-web-identity")
    moto.client().put_object(Bucket=BUCKET, Key="web.raw", Body=b"w" * 1000)
    source = await open_source(url("web.raw"), replace(moto.config(), profile=None))  # the default chain
    try:
        assert await source.read_at(0, 1000) == b"w" * 1000
        credentials = await source._client._get_credentials().get_frozen_credentials()  # type: ignore[attr-defined]
    finally:
        await source.close()
    assert credentials.token and credentials.access_key not in {key for key, _ in PROFILES.values()}
    sessions = {role.access_key_id: role for role in sts_backends["123456789012"]["aws"].assumed_roles}
    assert sessions[credentials.access_key].session_name == "vmied-web-identity"
    assert sessions[credentials.access_key].role_arn == "arn:aws:iam::123456789012:role/vmied-web"


async def test_unknown_profile_is_a_storage_error(moto: S3Server) -> None:
    with pytest.raises(StorageError, match="profile"):
        await open_source(url("x.raw"), moto.config(profile="nobody"))


async def test_sequential_windows_follow_the_configuration(moto: S3Server) -> None:
    data = random.Random(4).randbytes(5 * MiB + 7)
    moto.client().put_object(Bucket=BUCKET, Key="windows.raw", Body=data)
    source = await open_source(url("windows.raw"), moto.config(window=MiB, readahead=3))
    try:
        chunks = [chunk async for chunk in source.windows(100)]
        assert [len(c) for c in chunks] == [MiB] * 4 + [MiB - 93]
        assert b"".join(chunks) == data[100:]
        assert len(await source.read_at(len(data) - 3, 10)) == 3

        def gets() -> float:
            labels = {"operation": "GetObject", "outcome": "ok"}
            return metrics.REGISTRY.get_sample_value("vmied_s3_requests_total", labels) or 0.0

        before = gets()
        with Workers() as workers:  # a raw disk is read in the source's windows too: one GET each
            extents = [extent async for extent in flat_extents(source, workers, 0, source.size)]
        assert gets() - before == 6 and sum(extent.length for extent in extents) == len(data)
    finally:
        await source.close()


class _OversendingSource(RangedSource):
    """A backend that answers a range with more bytes than asked (a broken server or proxy)."""

    async def _fetch(self, offset: int, length: int, into: Received) -> None:
        into.add(bytes(length + 1))


async def test_a_range_answered_with_more_bytes_is_refused() -> None:
    source = _OversendingSource("oversending", 100, fast_retries())
    with pytest.raises(StorageError, match="more than the 10 bytes asked for") as refused:
        await source.read_at(0, 10)
    assert refused.value.reason == "storage.range"


async def test_sibling_objects_are_opened_beside_the_key(moto: S3Server) -> None:
    moto.client().put_object(Bucket=BUCKET, Key="vm/disk.vmdk", Body=b"descriptor")
    moto.client().put_object(Bucket=BUCKET, Key="vm/disk-flat.vmdk", Body=b"extent")
    source = await open_source(url("vm/disk.vmdk"), moto.config())
    try:
        sibling = await source.open_sibling("disk-flat.vmdk")
        assert sibling.name == url("vm/disk-flat.vmdk") and await sibling.read_at(0, 6) == b"extent"
        await sibling.close()
        with pytest.raises(UnsupportedImage, match="plain name"):
            await source.open_sibling("../other/disk-flat.vmdk")
    finally:
        await source.close()


async def test_object_changed_while_reading(moto: S3Server) -> None:
    client = moto.client()
    client.put_object(Bucket=BUCKET, Key="moving.raw", Body=bytes(2 * MiB))
    source = await open_source(url("moving.raw"), moto.config())
    try:
        assert await source.read_at(0, 10) == bytes(10)
        client.put_object(Bucket=BUCKET, Key="moving.raw", Body=b"\x01" * (2 * MiB))
        with pytest.raises(StorageError, match="object changed while reading") as changed:
            await source.read_at(MiB, 10)
        assert changed.value.reason == "s3.changed"
    finally:
        await source.close()


# -- faults: retried, resumed, recorded; the output is bit-identical


FAULTS = [
    Fault("500", "HEAD", 1), Fault("reset", "GET", 1), Fault("slowdown", "GET", 2), Fault("truncate", "GET", 4),
    Fault("503", "GET", 6), Fault("stall", "GET", 8), Fault("500", "POST", 1), Fault("slowdown", "PUT", 1),
    Fault("drop", "PUT", 3), Fault("503", "POST", 2),
]


async def test_faults_are_retried_and_the_output_is_identical(moto: S3Server, disk: Path,
                                                              tmp_path: Path) -> None:
    moto.client().upload_file(str(disk), BUCKET, "disk.raw")
    reference = tmp_path / "reference.raw"
    await asyncio.to_thread(convert_file, disk, reference, "raw", input_format="raw")
    with fault_proxy(moto.endpoint, FAULTS, stall=3.0) as proxy:
        config = moto.config(proxy.endpoint, part_size=MIN_PART, parts_in_flight=2, window=4 * MiB,
                             retry=fast_retries(read_timeout=0.5))  # the plan counts GETs of 4 MiB
        source, sink = await run_convert(url("disk.raw"), url("copy.raw"), "raw", config, config,
                                         input_format="raw")
    assert s3_sha256(moto, "copy.raw") == sha256_file(reference)
    assert len(proxy.fired) == len(FAULTS), proxy.fired
    reasons = {record.reason for record in source.retries} | {record.reason for record in sink.retries}  # type: ignore[attr-defined]
    assert {"InternalError", "SlowDown", "ServiceUnavailable", "truncated"} <= reasons
    assert reasons & {"timeout", "connection"}
    assert moto.uploads() == []


@pytest.mark.skipif("vmdk" not in WRITERS, reason="the VMDK format is not registered")
async def test_vmdk_stream_round_trip_through_faults(moto: S3Server, disk: Path) -> None:
    """raw -> VMDK stream -> raw, both legs S3 to S3 through faults, gives the disk back bit for bit."""
    moto.client().upload_file(str(disk), BUCKET, "disk.raw")
    legs = [("disk.raw", "disk.vmdk", "vmdk", "raw"), ("disk.vmdk", "back.raw", "raw", None)]
    for src, dst, output_format, input_format in legs:
        with fault_proxy(moto.endpoint, FAULTS, stall=3.0) as proxy:
            config = moto.config(proxy.endpoint, part_size=MIN_PART, parts_in_flight=2,
                                 retry=fast_retries(read_timeout=0.5))
            source, _ = await run_convert(url(src), url(dst), output_format, config, config,
                                          input_format=input_format)
        assert proxy.fired and source.retries  # type: ignore[attr-defined]
    assert s3_sha256(moto, "back.raw") == sha256_file(disk)
    assert moto.uploads() == []


async def test_a_part_damaged_on_the_way_is_caught_and_sent_again(seaweed: S3Server, disk: Path) -> None:
    """The part's Content-MD5 lets the server refuse a flipped byte (moto does not check it; SeaweedFS does)."""
    plan = [Fault("corrupt", "PUT", 2), Fault("corrupt", "PUT", 4)]
    with fault_proxy(seaweed.endpoint, plan) as proxy:
        config = seaweed.config(proxy.endpoint, part_size=MIN_PART, parts_in_flight=1, retry=fast_retries())
        _, sink = await run_convert(str(disk), url("copy.raw"), "raw", dst_config=config, input_format="raw")
    assert len(proxy.fired) == 2
    assert [record.reason for record in sink.retries] == ["BadDigest", "BadDigest"]  # type: ignore[attr-defined]
    assert s3_sha256(seaweed, "copy.raw") == sha256_file(disk)


async def test_persistent_failure_aborts_the_upload(moto: S3Server, disk: Path) -> None:
    moto.client().upload_file(str(disk), BUCKET, "disk.raw")
    plan = [Fault("500", "PUT", n) for n in range(2, 10)]
    with fault_proxy(moto.endpoint, plan) as proxy:
        config = moto.config(proxy.endpoint, part_size=MIN_PART, parts_in_flight=2,
                             retry=fast_retries(attempts=3))
        with pytest.raises(StorageError, match="gave up after 3 attempts") as failed:
            await run_convert(url("disk.raw"), url("copy.raw"), "raw", config, config, input_format="raw")
    assert failed.value.reason == "storage.retries"
    assert moto.uploads() == []
    assert "copy.raw" not in moto.objects()


async def test_cancelled_conversion_leaves_nothing(moto: S3Server, disk: Path) -> None:
    moto.client().upload_file(str(disk), BUCKET, "disk.raw")
    progress = Progress()
    progress.listeners.append(lambda p: p.cancel() if p.position > 12 * MiB else None)
    config = moto.config(part_size=MIN_PART, parts_in_flight=2)
    with pytest.raises(Cancelled):
        await run_convert(url("disk.raw"), url("copy.raw"), "raw", config, config, input_format="raw",
                          progress=progress)
    assert moto.uploads() == []
    assert "copy.raw" not in moto.objects()


# -- the CLI: no local files, memory set by configuration


def readonly_command(args: list[str], tmp_path: Path) -> list[str]:
    """``vmied`` in a private mount namespace where the working directory and TMPDIR are read-only."""
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    script = (f'mount -t tmpfs -o ro,size=1m vmied-ro "{readonly}" && cd "{readonly}" && '
              f'TMPDIR="{readonly}" PYTHONPATH="{ROOT}" exec "{sys.executable}" -m vmied "$@"')
    return ["unshare", "-m", "sh", "-c", script, "vmied", *args]


def vmied_readonly(args: list[str], env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(readonly_command(args, tmp_path), env=env, capture_output=True, text=True, timeout=300)


#: Runs argv[1:] and prints that child's peak RSS (KiB): this test process's other children do not count.
PEAK_RSS = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def vmied_readonly_peak(args: list[str], env: dict[str, str], tmp_path: Path) -> tuple[int, str, int]:
    """Exit code, stderr and peak RSS in KiB of a :func:`vmied_readonly` run."""
    run = subprocess.run([sys.executable, "-c", PEAK_RSS, *readonly_command(args, tmp_path)],
                         env=env, capture_output=True, text=True, timeout=300)
    return run.returncode, run.stderr, int(run.stdout.split()[-1])


def storage_flags(server: S3Server, profile: str | None = None) -> list[str]:
    return ["--endpoint-url", server.endpoint, "--profile", profile or server.profile, "--region", "us-east-1",
            "--path-style"]


@pytest.fixture
def can_unshare(tmp_path: Path) -> None:
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("needs root to run vmied with a read-only working directory (unshare -m)")


@pytest.mark.parametrize("output_format", [f for f in ("vmdk", "raw") if f in WRITERS])
def test_cli_s3_to_s3_writes_nothing_locally(moto: S3Server, disk: Path, tmp_path: Path,
                                             aws_files: dict[str, str], can_unshare: None,
                                             output_format: str) -> None:
    moto.client().upload_file(str(disk), BUCKET, "disk.raw")
    env = environment(aws_files)
    there = vmied_readonly(["convert", "-f", "raw", "-O", output_format, url("disk.raw"),
                            url(f"disk.{output_format}"), *storage_flags(moto), "--part-size", "5"], env, tmp_path)
    assert there.returncode == 0, there.stderr
    declared = ["-f", "raw"] if output_format == "raw" else []
    back = subprocess.run([sys.executable, "-m", "vmied", "convert", *declared, url(f"disk.{output_format}"),
                           url("back.raw"), *storage_flags(moto)], env=env, capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert back.returncode == 0, back.stderr
    assert s3_sha256(moto, "back.raw") == sha256_file(disk)


def test_cli_info_of_an_s3_object(moto: S3Server, aws_files: dict[str, str]) -> None:
    moto.client().put_object(Bucket=BUCKET, Key="info.raw", Body=bytes(3 * MiB))
    run = subprocess.run([sys.executable, "-m", "vmied", "info", "-f", "raw", "--output", "json", url("info.raw"),
                          *storage_flags(moto)], env=environment(aws_files), capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["virtual_size"] == 3 * MiB


def test_cli_reports_a_denied_write(seaweed: S3Server, disk: Path, aws_files: dict[str, str]) -> None:
    seaweed.client().upload_file(str(disk), BUCKET, "disk.raw")
    run = subprocess.run([sys.executable, "-m", "vmied", "convert", "-f", "raw", url("disk.raw"), url("x.raw"),
                          *storage_flags(seaweed), "--dest-profile", "reader"], env=environment(aws_files),
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == StorageError.exit_code
    assert "access denied: s3:PutObject" in run.stderr and "[s3.denied]" in run.stderr


@pytest.mark.slow
def test_large_sparse_disk_s3_to_s3_in_bounded_memory(seaweed: S3Server, tmp_path: Path,
                                                      aws_files: dict[str, str], can_unshare: None) -> None:
    """A 1 GiB disk goes S3 -> S3 through the CLI with peak RSS set by configuration, not disk size."""
    size = 1 << 30
    big = tmp_path / "big.raw"
    rng = random.Random(9)
    write_sparse_raw(big, size, [(rng.randrange(0, size - MiB), 256 * 1024) for _ in range(64)], seed=9)
    flags = storage_flags(seaweed)
    env = environment(aws_files)
    upload = subprocess.run([sys.executable, "-m", "vmied", "convert", "-f", "raw", str(big), url("big.raw"),
                             *flags], env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert upload.returncode == 0, upload.stderr
    code, stderr, peak_kib = vmied_readonly_peak(["convert", "-f", "raw", url("big.raw"), url("copy.raw"),
                                                  *flags], env, tmp_path)
    assert code == 0, stderr
    assert peak_kib < 300 * 1024, f"peak RSS {peak_kib // 1024} MiB"
    head = seaweed.client().head_object(Bucket=BUCKET, Key="copy.raw")
    assert head["ContentLength"] == size
    assert s3_sha256(seaweed, "copy.raw") == sha256_file(big)
