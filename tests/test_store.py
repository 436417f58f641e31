"""The snapshot store on a local directory and on real S3 servers (moto, SeaweedFS) on 127.0.0.1."""
# ruff: noqa: F811  (the server fixtures are imported from tests.s3server)

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import sys
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.faultproxy import Fault, fault_proxy
from tests.helpers import qemu_img
from tests.s3server import (  # noqa: F401  (fixtures)
    BUCKET,
    S3Server,
    aws_files,
    fast_retries,
    moto,
    moto_server,
    seaweed,
    seaweed_server,
)
from vmied import codec
from vmied.config import Config, load_config
from vmied.errors import Cancelled, CorruptImage, StorageError, UsageError
from vmied.extents import Extent, Kind
from vmied.io.local import FileSink
from vmied.io.s3 import MIN_PART, S3Sink
from vmied.metrics import REGISTRY
from vmied.pipeline import OrderedDigest, Progress, Workers
from vmied.store import (
    CorruptSnapshot,
    LocalObjects,
    Objects,
    S3Objects,
    SnapshotNotFound,
    SnapshotStore,
    StoreOptions,
    layout,
    open_store,
)
from vmied.store import store as store_module

MiB = 1 << 20
TiB = 1 << 40
GRAIN = layout.GRAIN_SIZE
PREFIX = "snapshots/"


# --- disks and extent streams ---------------------------------------------------------------------

def random_disk(rng: random.Random, size: int, pieces: int = 20) -> bytearray:
    """Scattered data, half random (incompressible), half text; everything else zero."""
    disk = bytearray(size)
    for _ in range(pieces):
        offset = rng.randrange(size)
        length = min(rng.choice([1, 511, 4096, GRAIN, 70000, 3 * GRAIN, 300000]), size - offset)
        text = (rng.choice([b"abc ", b"hello world\n", b"\x01\x02"]) * (length // 2 + 1))[:length]
        disk[offset : offset + length] = rng.randbytes(length) if rng.random() < 0.5 else text
    return disk


def deflated(disk: Buffer, start: int, end: int, grain: int, whole_last: bool) -> Extent:
    """A DEFLATED extent made with zlib level 9 (not what vmied's deflate writes: pass-through shows)."""
    streams = []
    for offset in range(start, end, grain):
        piece = bytes(disk[offset : min(offset + grain, end)])
        if whole_last and len(piece) < grain:
            piece += bytes(grain - len(piece))
        streams.append(zlib.compress(piece, 9))
    return Extent.deflated(start, end - start, tuple(streams), grain)


Buffer = bytes | bytearray | memoryview


def extent_plan(disk: bytearray, rng: random.Random) -> list[Extent]:
    """The disk as a random mix of DATA, ZERO, DEFLATED 64 KiB and DEFLATED 4 KiB extents."""
    out: list[Extent] = []
    position, size = 0, len(disk)
    while position < size:
        kind = rng.choice(["data", "zero", "deflated", "deflated", "deflated4k"])
        if kind == "deflated" and position % GRAIN == 0:
            end = min(position + rng.randrange(1, 10) * GRAIN, size)
            out.append(deflated(disk, position, end, GRAIN, rng.random() < 0.5))
        elif kind == "deflated4k":
            end = min(position + rng.randrange(1, 40) * 4096, size)
            out.append(deflated(disk, position, end, 4096, False))
        else:
            end = min(position + rng.randrange(1, 400000), size)
            if kind == "zero" and not any(disk[position:end]):
                out.append(Extent.zero(position, end - position))
            else:
                out.append(Extent.of_data(position, bytes(disk[position:end])))
        position = end
    return out


async def stream(extents: list[Extent]) -> AsyncIterator[Extent]:
    for extent in extents:
        yield extent


async def read_back(store: SnapshotStore, snapshot_id: str) -> bytearray:
    """The disk as open() streams it, checking the reader's contract along the way."""
    reader = await store.open(snapshot_id)
    out = bytearray()
    async for extent in reader.extents():
        assert extent.offset == len(out)
        if extent.kind is Kind.ZERO:
            out += bytes(extent.length)
        else:
            assert extent.kind is Kind.DEFLATED and extent.grain_size == GRAIN
            out += b"".join(codec.inflate_grains(extent.grains, GRAIN, extent.length))
    await reader.close()
    return out


def nonzero_grains(disk: Buffer) -> int:
    return sum(1 for at in range(0, len(disk), GRAIN) if any(disk[at : at + GRAIN]))


# --- backends -------------------------------------------------------------------------------------

@dataclass
class Backend:
    name: str
    root: Path
    server: S3Server | None = None

    async def objects(self) -> Objects:
        if self.server is None:
            return await LocalObjects.open(str(self.root))
        config = self.server.config(part_size=MIN_PART, parts_in_flight=2, retry=fast_retries())
        return await S3Objects.open(config, BUCKET, PREFIX)

    async def store(self, workers: Workers, **options: Any) -> SnapshotStore:
        return SnapshotStore(await self.objects(), workers, StoreOptions(**{"pack_size": 256 * 1024, **options}))

    def listing(self) -> list[str]:
        """Every object (and, on S3, every unfinished upload) under the store's root."""
        if self.server is None:
            if not self.root.exists():
                return []
            return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())
        objects = [key for key in self.server.objects() if key.startswith(PREFIX)]
        return sorted([key[len(PREFIX):] for key in objects] + [f"upload:{key}" for key in self.server.uploads()])

    def read_object(self, key: str) -> bytes:
        if self.server is None:
            return (self.root / key).read_bytes()
        body: bytes = self.server.client().get_object(Bucket=BUCKET, Key=PREFIX + key)["Body"].read()
        return body

    def write_object(self, key: str, data: bytes) -> None:
        if self.server is None:
            (self.root / key).parent.mkdir(parents=True, exist_ok=True)
            (self.root / key).write_bytes(data)
        else:
            self.server.client().put_object(Bucket=BUCKET, Key=PREFIX + key, Body=data)


@pytest.fixture(params=["local", "moto"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "local":
        return Backend("local", tmp_path / "store")
    return Backend("moto", tmp_path, request.getfixturevalue("moto"))


@pytest.fixture
def local(tmp_path: Path) -> Backend:
    return Backend("local", tmp_path / "store")


@pytest.fixture
def workers() -> Iterator[Workers]:
    with Workers(2) as pool:
        yield pool


# --- round trips ----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_disks_round_trip_bit_exact(backend: Backend, workers: Workers, seed: int) -> None:
    rng = random.Random(seed)
    size = rng.choice([3 * MiB, 3 * MiB + 12345, 2 * MiB + 511])
    disk = random_disk(rng, size)
    store = await backend.store(workers, pack_size=64 * 1024)
    stored = await store.write("snap-1", stream(extent_plan(disk, rng)), size)
    assert stored.virtual_size == size
    assert stored.data_grains == nonzero_grains(disk)  # zero grains are not stored
    assert stored.sha256 == hashlib.sha256(disk).hexdigest()
    assert stored.pack_count > 1
    assert await read_back(store, "snap-1") == disk
    for _ in range(30):
        offset = rng.randrange(size)
        length = rng.randrange(min(size - offset, 400000) + 1)
        assert await store.read("snap-1", offset, length) == disk[offset : offset + length]
    assert await store.stat("snap-1") == stored
    assert await store.snapshots() == ["snap-1"]
    await store.close()


async def test_random_read_costs_at_most_two_object_reads(backend: Backend, workers: Workers) -> None:
    rng = random.Random(7)
    size = 4 * MiB
    disk = random_disk(rng, size, pieces=40)
    store = await backend.store(workers, index_cache_bytes=1)  # keeps one index: most reads start cold
    await store.write("snap-r", stream([Extent.of_data(0, bytes(disk))]), size)
    manifest = await store.manifest("snap-r")
    for _ in range(60):
        grain = rng.randrange(size // GRAIN)
        offset = grain * GRAIN + rng.randrange(GRAIN)
        length = rng.randrange(1, min(size - offset, 2 * GRAIN) + 1)
        packs = manifest.packs_between(offset // GRAIN, layout.grain_count(offset + length))
        before = store.objects.reads
        assert await store.read("snap-r", offset, length) == disk[offset : offset + length]
        assert store.objects.reads - before <= 2 * max(1, len(packs))
        if len(packs) <= 1:
            assert store.objects.reads - before <= 2
    await store.close()


async def test_deflated_64k_grains_pass_through_unchanged(local: Backend, workers: Workers,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(11)
    size = 40 * GRAIN
    disk = random_disk(rng, size, pieces=30)
    source = deflated(disk, 0, size, GRAIN, False)

    def no_deflate(*args: object) -> bytes:
        raise AssertionError("a 64 KiB DEFLATED grain was deflated again")

    monkeypatch.setattr(store_module.codec, "deflate", no_deflate)
    store = await local.store(workers)
    await store.write("snap-p", stream([source]), size)
    kept = [stream for at, stream in zip(range(0, size, GRAIN), source.grains, strict=True)
            if any(disk[at : at + GRAIN])]
    stored: list[bytes] = []
    reader = await store.open("snap-p")
    async for extent in reader.extents():
        stored.extend(extent.grains)
    assert stored == kept  # byte for byte the input's zlib streams
    manifest = await store.manifest("snap-p")
    packs = b"".join(local.read_object(f"snap-p/pack-{n:08d}") for n in range(manifest.pack_count))
    assert all(stream in packs for stream in kept)
    await store.close()


async def test_short_last_grain_is_stored_whole_and_read_cut(local: Backend, workers: Workers) -> None:
    size = 3 * GRAIN + 1000
    disk = bytearray(random.Random(3).randbytes(size))
    for whole_last in (False, True):
        store = await local.store(workers)
        snapshot = f"odd-{whole_last}"
        await store.write(snapshot, stream([deflated(disk, 0, size, GRAIN, whole_last)]), size)
        reader = await store.open(snapshot)
        extents = [extent async for extent in reader.extents()]
        last = extents[-1].grains[-1]
        assert len(zlib.decompress(last)) == GRAIN  # whole, zero padded, as a VMDK stream grain
        assert await read_back(store, snapshot) == disk
        assert await store.read(snapshot, size - 10, 10) == disk[-10:]
        await store.close()


async def test_empty_and_all_zero_disks(local: Backend, workers: Workers) -> None:
    store = await local.store(workers)
    empty = await store.write("empty", stream([]), 0)
    assert (empty.data_grains, empty.pack_count) == (0, 0)
    zeros = await store.write("zeros", stream([Extent.zero(0, 5 * MiB), Extent.of_data(5 * MiB, bytes(MiB))]), 6 * MiB)
    assert (zeros.data_grains, zeros.pack_count) == (0, 0)
    assert zeros.sha256 == hashlib.sha256(bytes(6 * MiB)).hexdigest()
    assert await read_back(store, "zeros") == bytes(6 * MiB)
    assert await store.read("zeros", 123, 4567) == bytes(4567)
    await store.close()


async def test_manifest_of_a_16_tib_sparse_disk_stays_small(local: Backend, workers: Workers) -> None:
    size = 16 * TiB
    rng = random.Random(16)
    offsets = sorted(rng.randrange(size // GRAIN) * GRAIN for _ in range(200))
    extents, position, pieces = [], 0, {}
    for offset in offsets:
        if offset < position:
            continue
        data = rng.randbytes(GRAIN)
        extents += [Extent.zero(position, offset - position), Extent.of_data(offset, data)]
        pieces[offset] = data
        position = offset + GRAIN
    extents.append(Extent.zero(position, size - position))
    store = await local.store(workers)  # default digest_max_size: no SHA-256 of 16 TiB of zeros
    stored = await store.write("huge", stream([e for e in extents if e.length]), size)
    assert stored.sha256 is None
    manifest_bytes = len(local.read_object("huge/manifest"))
    assert manifest_bytes < 64 * 1024
    for offset, data in list(pieces.items())[:20]:
        assert await store.read("huge", offset - 100, GRAIN + 200) == bytes(100) + data + bytes(100)
    # the bound for the same disk full of incompressible data, in default 64 MiB packs: ~10 MiB
    assert layout.manifest_size(size // StoreOptions().pack_size) < 16 * MiB
    await store.close()


async def test_memory_is_bounded_by_the_configuration_not_the_disk(local: Backend, workers: Workers) -> None:
    """Python-allocated peak while writing and streaming 128 MiB of incompressible data stays far below it."""
    size = 128 * MiB
    rng = random.Random(12)

    async def generated() -> AsyncIterator[Extent]:
        for at in range(0, size, MiB):
            yield Extent.of_data(at, rng.randbytes(MiB))

    store = await local.store(workers, pack_size=8 * MiB, window=2 * MiB, readahead=2, depth=2)
    tracemalloc.start()
    try:
        await store.write("big", generated(), size)
        _, write_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        reader = await store.open("big")
        grains = 0
        async for extent in reader.extents():
            grains += len(extent.grains)
        _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert grains == size // GRAIN
    assert write_peak < 32 * MiB and read_peak < 16 * MiB  # measured: about 21 and 10, (write_peak, read_peak)
    await store.close()


# --- exports through the format writers -----------------------------------------------------------

@pytest.mark.parametrize("output_format", ["vmdk", "qcow2", "vhd"])
async def test_store_to_image_to_qemu_raw_equals_input(local: Backend, workers: Workers, tmp_path: Path,
                                                       output_format: str, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(21)
    size = 4 * MiB
    disk = random_disk(rng, size, pieces=30)
    store = await local.store(workers)
    await store.write("snap-x", stream(extent_plan(disk, rng)), size)
    deflates = 0
    real_deflate = codec.deflate

    def counting_deflate(data: Buffer, level: int = codec.DEFAULT_LEVEL) -> bytes:
        nonlocal deflates
        deflates += 1
        return real_deflate(data, level)

    monkeypatch.setattr(codec, "deflate", counting_deflate)
    image = tmp_path / f"out.{output_format}"
    progress = Progress()
    written = await store.export("snap-x", await FileSink.create(str(image)), output_format, progress=progress)
    assert written == image.stat().st_size and progress.position == size
    if output_format == "vmdk":
        assert deflates == 0  # stream-optimized VMDK: the stored grains pass through
    qemu_img("convert", "-O", "raw", image, tmp_path / "back.raw")
    assert (tmp_path / "back.raw").read_bytes() == disk
    await store.close()


# --- integrity ------------------------------------------------------------------------------------

async def write_sample(backend: Backend, workers: Workers, snapshot_id: str = "snap-c") -> tuple[SnapshotStore,
                                                                                                bytearray]:
    rng = random.Random(5)
    size = 2 * MiB
    disk = random_disk(rng, size, pieces=30)
    store = await backend.store(workers)
    await store.write(snapshot_id, stream([Extent.of_data(0, bytes(disk))]), size)
    return store, disk


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x40]) + data[at + 1 :]


async def test_damaged_grain_is_a_named_error(backend: Backend, workers: Workers) -> None:
    store, disk = await write_sample(backend, workers)
    manifest = await store.manifest("snap-c")
    index = await store.index(manifest, 0)
    pack = backend.read_object("snap-c/pack-00000000")
    backend.write_object("snap-c/pack-00000000", flip(pack, index.offsets[0] + 5))
    fresh = await backend.store(workers)  # nothing cached
    grain = index.grains[0]
    with pytest.raises(CorruptSnapshot, match="fails its checksum") as caught:
        await fresh.read("snap-c", grain * GRAIN, 10)
    assert caught.value.reason == "store.checksum"
    with pytest.raises(CorruptSnapshot, match="fails its checksum"):
        await read_back(fresh, "snap-c")
    assert await fresh.read("snap-c", index.grains[-1] * GRAIN, 10) == disk[index.grains[-1] * GRAIN :][:10]
    await store.close()
    await fresh.close()


async def test_damaged_or_truncated_pack_index_is_a_named_error(local: Backend, workers: Workers) -> None:
    store, _ = await write_sample(local, workers)
    manifest = await store.manifest("snap-c")
    pack = local.read_object("snap-c/pack-00000001")
    index_offset = manifest.pack(1).index_offset
    for damaged in (flip(pack, index_offset + 3), flip(pack, len(pack) - 9), pack[: len(pack) - 20],
                    pack[:index_offset]):
        local.write_object("snap-c/pack-00000001", damaged)
        fresh = await local.store(workers)
        with pytest.raises(CorruptSnapshot):
            await read_back(fresh, "snap-c")
        await fresh.close()
    (local.root / "snap-c" / "pack-00000001").unlink()
    fresh = await local.store(workers)
    with pytest.raises(CorruptSnapshot, match="pack 1 of snapshot snap-c is missing"):
        await read_back(fresh, "snap-c")
    await fresh.close()
    await store.close()


def test_index_entries_are_checked_even_when_the_checksums_agree() -> None:
    """A well-sealed index that lies (grain outside its pack, gap, huge length) is refused by bounds."""
    def entry_and_index(entries: list[tuple[int, int, int, int]], index_offset: int) -> tuple[layout.PackEntry, bytes]:
        data = layout.encode_index("s", 0, entries)
        return layout.PackEntry(10, 20, len(entries), layout.crc32c(data), index_offset,
                                index_offset + len(data)), data

    good_entry, good = entry_and_index([(10, 0, 100, 1), (19, 100, 50, 2)], 150)
    assert list(layout.parse_index(good, "s", 0, good_entry).grains) == [10, 19]
    for entries, index_offset in (
        ([(10, 0, 100, 1), (25, 100, 50, 2)], 150),  # grain beyond the pack's range
        ([(10, 0, 100, 1), (10, 100, 50, 2)], 150),  # repeated grain
        ([(10, 0, 100, 1), (19, 120, 50, 2)], 170),  # gap between streams
        ([(10, 0, 1 << 30, 1)], 1 << 30),  # a grain no zlib stream of 64 KiB can be
        ([(11, 0, 100, 1)], 100),  # does not start at the pack's first grain
    ):
        pack, data = entry_and_index(entries, index_offset)
        with pytest.raises(CorruptSnapshot):
            layout.parse_index(data, "s", 0, pack)
    with pytest.raises(CorruptSnapshot, match="another pack or snapshot"):
        layout.parse_index(good, "t", 0, good_entry)


# hostile structures: whatever the bytes, a parse either succeeds consistently or is CorruptSnapshot

U64 = st.integers(0, (1 << 64) - 1)
U32 = st.integers(0, (1 << 32) - 1)
SAMPLE_ENTRIES = [(10, 0, 100, 1), (19, 100, 50, 2)]
SAMPLE_INDEX = layout.encode_index("s", 0, SAMPLE_ENTRIES)
SAMPLE_PACK = layout.PackEntry(10, 20, 2, layout.crc32c(SAMPLE_INDEX), 150, 150 + len(SAMPLE_INDEX))
SAMPLE_MANIFEST = layout.encode_manifest("s", 20 * GRAIN, [SAMPLE_PACK], "ab" * 32)


def sealed(body: bytes, end_magic: bytes) -> bytes:
    return body + layout.TRAILER.pack(layout.crc32c(body), end_magic)


def test_sample_structures_parse() -> None:
    manifest = layout.parse_manifest(SAMPLE_MANIFEST, "s")
    assert (manifest.pack_count, manifest.data_grains, manifest.sha256) == (1, 2, "ab" * 32)
    assert manifest.pack(0) == SAMPLE_PACK
    assert list(layout.parse_index(SAMPLE_INDEX, "s", 0, SAMPLE_PACK).offsets) == [0, 100]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_are_never_a_manifest_or_an_index(data: bytes) -> None:
    with pytest.raises(CorruptSnapshot):
        layout.parse_manifest(data, "s")
    with pytest.raises(CorruptSnapshot):
        layout.parse_index(data, "s", 0, SAMPLE_PACK)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_damaged_byte_or_cut_is_caught(data: st.DataObject) -> None:
    for good, parse in ((SAMPLE_MANIFEST, lambda b: layout.parse_manifest(b, "s")),
                        (SAMPLE_INDEX, lambda b: layout.parse_index(b, "s", 0, SAMPLE_PACK))):
        at = data.draw(st.integers(0, len(good) - 1))
        with pytest.raises(CorruptSnapshot):
            parse(flip(good, at) if data.draw(st.booleans()) else good[:at])


@settings(max_examples=300, deadline=None)
@given(U64, U32, U32, U64, U64, U32, st.tuples(U64, U64, U32, U32, U64, U64))
def test_resealed_manifests_with_any_numbers_are_parsed_or_refused(
        virtual_size: int, grain_size: int, count: int, data_grains: int, stored: int, flags: int,
        entry: tuple[int, int, int, int, int, int]) -> None:
    """Valid CRCs around lying numbers: the bounds, not the checksum, must refuse them, without a huge allocation."""
    header = layout.MANIFEST_HEADER.pack(layout.MANIFEST_MAGIC, layout.VERSION, layout.MANIFEST_HEADER.size,
                                         b"s".ljust(64, b"\0"), virtual_size, grain_size, count, data_grains,
                                         stored, flags, bytes(32))
    try:
        manifest = layout.parse_manifest(sealed(header + layout.PACK_ENTRY.pack(*entry), layout.MANIFEST_END), "s")
    except CorruptSnapshot:
        return
    pack = manifest.pack(0)
    assert manifest.pack_count == 1 and pack.end_grain <= layout.grain_count(manifest.virtual_size)
    assert pack.index_length == layout.index_size(pack.grain_count) and pack.pack_size <= layout.MAX_PACK_SIZE


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(U64, U64, U32, U32), min_size=1, max_size=4), U32, st.data())
def test_resealed_indices_with_any_numbers_are_parsed_or_refused(
        entries: list[tuple[int, int, int, int]], number: int, data: st.DataObject) -> None:
    index = layout.encode_index("s", number % 3, entries)
    pack = layout.PackEntry(data.draw(U64), data.draw(U64), len(entries), layout.crc32c(index), data.draw(U64),
                            data.draw(U64))
    try:
        parsed = layout.parse_index(index, "s", number % 3, pack)
    except CorruptSnapshot:
        return
    assert list(parsed.grains) == sorted(set(parsed.grains))
    assert parsed.offsets[-1] + parsed.lengths[-1] == pack.index_offset


async def test_damaged_manifest_is_a_named_error(local: Backend, workers: Workers) -> None:
    store, _ = await write_sample(local, workers)
    good = local.read_object("snap-c/manifest")
    header = layout.MANIFEST_HEADER

    def resealed(body: bytes) -> bytes:
        return body + layout.TRAILER.pack(layout.crc32c(body), layout.MANIFEST_END)

    fields = list(header.unpack_from(good, 0))
    entries = good[header.size : len(good) - layout.TRAILER.size]
    lying_count = header.pack(*fields[:6], 1 << 31, *fields[7:]) + entries
    lying_size = header.pack(*fields[:4], 1 << 62, *fields[5:]) + entries
    first = list(layout.PACK_ENTRY.unpack_from(entries, 0))
    huge_pack = header.pack(*fields) + layout.PACK_ENTRY.pack(*first[:5], 1 << 60) + entries[layout.PACK_ENTRY.size :]
    for damaged in (b"", b"garbage", good[:-1], good[:100], flip(good, 40), os.urandom(len(good)),
                    resealed(lying_count), resealed(lying_size), resealed(huge_pack),
                    resealed(b"VMSTSNAP" + good[8 : len(good) - layout.TRAILER.size - 40])):
        local.write_object("snap-c/manifest", damaged)
        fresh = await local.store(workers)
        with pytest.raises(CorruptSnapshot):
            await fresh.read("snap-c", 0, 10)
        await fresh.close()
    local.write_object("snap-c/manifest", b"x" * (layout.MAX_MANIFEST_BYTES + 1))
    fresh = await local.store(workers)
    with pytest.raises(CorruptSnapshot):
        await fresh.open("snap-c")
    await fresh.close()
    await store.close()


async def test_hostile_deflated_input_is_refused_and_leaves_nothing(backend: Backend, workers: Workers) -> None:
    store = await backend.store(workers)
    good = zlib.compress(os.urandom(GRAIN))
    short = zlib.compress(b"x" * 1000)
    extents = [Extent.deflated(0, 8 * GRAIN, (good,) * 8, GRAIN), Extent.deflated(8 * GRAIN, GRAIN, (short,), GRAIN)]
    with pytest.raises(CorruptImage, match="invalid length"):
        await store.write("snap-h", stream(extents), 9 * GRAIN)
    assert backend.listing() == []
    await store.close()


# --- all or nothing -------------------------------------------------------------------------------

async def failing(extents: list[Extent], after: int) -> AsyncIterator[Extent]:
    for number, extent in enumerate(extents):
        if number == after:
            raise OSError("the source went away")
        yield extent


def incompressible(size: int, chunk: int = MiB) -> list[Extent]:
    rng = random.Random(9)
    return [Extent.of_data(at, rng.randbytes(min(chunk, size - at))) for at in range(0, size, chunk)]


async def test_failed_write_leaves_nothing(backend: Backend, workers: Workers) -> None:
    store = await backend.store(workers)
    with pytest.raises(OSError, match="went away"):
        await store.write("snap-f", failing(incompressible(3 * MiB), 2), 3 * MiB)
    assert backend.listing() == []
    with pytest.raises(SnapshotNotFound):
        await store.open("snap-f")
    await store.write("snap-f", stream(incompressible(MiB)), MiB)  # the id is free again
    await store.close()


async def test_failed_write_aborts_the_multipart_upload_of_a_big_pack(moto: S3Server, tmp_path: Path,
                                                                      workers: Workers,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    backend = Backend("moto", tmp_path, moto)
    store = await backend.store(workers, pack_size=32 * MiB, depth=1)
    extents = incompressible(20 * MiB)
    aborted_uploads = []
    real_abort = S3Sink.abort

    async def spying_abort(sink: S3Sink) -> None:
        aborted_uploads.append(sink._upload_id)
        await real_abort(sink)

    monkeypatch.setattr(S3Sink, "abort", spying_abort)
    with pytest.raises(OSError, match="went away"):
        await store.write("snap-m", failing(extents, 19), 20 * MiB)
    assert len(aborted_uploads) == 1 and aborted_uploads[0] is not None  # a multipart upload was under way
    assert backend.listing() == []
    stored = await store.write("snap-m", stream(extents), 20 * MiB)
    assert stored.pack_count == 1 and backend.listing() == ["snap-m/manifest", "snap-m/pack-00000000"]
    await store.close()


async def test_cancelled_write_leaves_nothing(backend: Backend, workers: Workers) -> None:
    store = await backend.store(workers)
    progress = Progress()

    async def cancel_midway() -> AsyncIterator[Extent]:
        for extent in incompressible(4 * MiB, 256 * 1024):
            if extent.offset == 2 * MiB:
                progress.cancel()
            yield extent

    with pytest.raises(Cancelled):
        await store.write("snap-k", cancel_midway(), 4 * MiB, progress)
    assert backend.listing() == []

    async def slow() -> AsyncIterator[Extent]:
        for extent in incompressible(4 * MiB, 256 * 1024):
            await asyncio.sleep(0.01)
            yield extent

    task = asyncio.ensure_future(store.write("snap-k", slow(), 4 * MiB))
    await asyncio.sleep(0.15)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):  # the cleanup runs shielded from the cancellation
        if not backend.listing():
            break
        await asyncio.sleep(0.05)
    assert backend.listing() == []
    await store.close()


async def test_snapshots_are_immutable_and_ids_plain(local: Backend, workers: Workers) -> None:
    store, _ = await write_sample(local, workers)
    with pytest.raises(Exception, match="exists already"):
        await store.write("snap-c", stream([Extent.zero(0, GRAIN)]), GRAIN)
    for bad in ("", "../x", "a/b", ".hidden", "x" * 65):
        with pytest.raises(UsageError):
            await store.write(bad, stream([]), 0)
    with pytest.raises(UsageError):
        await store.read("snap-c", 2 * MiB - 10, 11)
    with pytest.raises(UsageError):
        await store.read("snap-c", -1, 1)
    await store.close()


# --- delete and garbage collection ----------------------------------------------------------------

async def test_delete_frees_every_object(backend: Backend, workers: Workers) -> None:
    store, disk = await write_sample(backend, workers, "snap-a")
    await store.write("snap-b", stream([Extent.of_data(0, bytes(disk))]), len(disk))
    await store.delete("snap-a")
    assert all(key.startswith("snap-b/") for key in backend.listing())
    with pytest.raises(SnapshotNotFound):
        await store.read("snap-a", 0, 1)
    await store.delete("snap-a")  # idempotent
    assert await read_back(store, "snap-b") == disk
    await store.delete("snap-b")
    assert backend.listing() == []
    await store.close()


async def test_collect_garbage(backend: Backend, workers: Workers) -> None:
    store, disk = await write_sample(backend, workers, "keep-me")
    await store.write("drop-me", stream([Extent.of_data(0, bytes(disk))]), len(disk))
    # an interrupted write: packs, a partial object, no manifest; and an extra pack beside a kept snapshot
    pack = backend.read_object("keep-me/pack-00000000")
    backend.write_object("crashed/pack-00000000", pack)
    backend.write_object("keep-me/pack-00099999", pack)
    backend.write_object("crashed/.pack-00000001.vmied-partial-123", pack[:100])
    backend.write_object("not-ours/readme.txt", b"left alone")
    if backend.server is not None:
        client = backend.server.client()
        client.create_multipart_upload(Bucket=BUCKET, Key=PREFIX + "crashed/pack-00000002")
        client.create_multipart_upload(Bucket=BUCKET, Key=PREFIX + "not-ours/upload")
    removed = await store.collect_garbage({"keep-me"})
    assert "keep-me/manifest" not in removed
    left = backend.listing()
    foreign = ["not-ours/readme.txt"] + ([] if backend.server is None else ["upload:snapshots/not-ours/upload"])
    assert [key for key in left if not key.startswith("keep-me/")] == foreign
    manifest = await store.manifest("keep-me")
    assert [key for key in left if key.startswith("keep-me/")] == sorted(
        ["keep-me/manifest", *(f"keep-me/pack-{n:08d}" for n in range(manifest.pack_count))])
    assert await read_back(store, "keep-me") == disk
    assert await store.snapshots() == ["keep-me"]
    stat = await store.stat("keep-me")
    assert REGISTRY.get_sample_value("vmied_store_bytes") == stat.stored_bytes
    assert REGISTRY.get_sample_value("vmied_store_grains") == stat.data_grains == nonzero_grains(disk)
    assert stat.stored_bytes == sum(len(backend.read_object(key)) for key in left if key.startswith("keep-me/"))
    await store.delete("keep-me")
    assert REGISTRY.get_sample_value("vmied_store_bytes") == 0
    await store.close()


CRASHING_WRITER = """
import asyncio, random, sys
from vmied.extents import Extent
from vmied.io.retry import RetryPolicy
from vmied.io.s3_config import S3Config
from vmied.pipeline import Workers
from vmied.store import LocalObjects, S3Objects, SnapshotStore, StoreOptions

async def main(where):
    if where.startswith("http"):
        config = S3Config(profile="moto", region="us-east-1", endpoint_url=where, path_style=True,
                          part_size=5 << 20, retry=RetryPolicy(attempts=2))
        objects, pack = await S3Objects.open(config, sys.argv[2], sys.argv[3]), 64 << 20
    else:
        objects, pack = await LocalObjects.open(where), 256 << 10
    rng = random.Random(1)

    async def endless():
        for at in range(0, 1 << 40, 1 << 20):
            await asyncio.sleep(0.01)
            yield Extent.of_data(at, rng.randbytes(1 << 20))

    with Workers(2) as workers:
        await SnapshotStore(objects, workers, StoreOptions(pack_size=pack)).write("crash", endless(), 1 << 40)

asyncio.run(main(sys.argv[1]))
"""


async def test_garbage_collection_judges_every_snapshot_with_manifests_read_at_once(local: Backend,
                                                                                    workers: Workers) -> None:
    """More kept snapshots than the manifest cache holds, their manifests read several at a time: every
    kept one stays whole and counts its grains, every other one goes."""
    store = await local.store(workers, manifest_cache=1)
    disks = {}
    for n in range(24):
        disks[f"snap-{n:02d}"] = disk = random_disk(random.Random(n), 512 * 1024, pieces=4)
        await store.write(f"snap-{n:02d}", stream([Extent.of_data(0, bytes(disk))]), len(disk))
    keep = {f"snap-{n:02d}" for n in range(0, 24, 3)}
    removed = await store.collect_garbage(keep)
    assert {key.split("/")[0] for key in removed} == set(disks) - keep
    assert await store.snapshots() == sorted(keep)
    assert REGISTRY.get_sample_value("vmied_store_grains") == sum(nonzero_grains(disks[k]) for k in keep)
    for snapshot_id in sorted(keep):
        assert await read_back(store, snapshot_id) == disks[snapshot_id]
    await store.close()


async def test_the_walk_is_in_key_order_and_a_prefix_is_a_prefix(backend: Backend) -> None:
    """Keys come in S3's order ("a-b/..." before "a/..."), whichever the backend; a snapshot's prefix
    does not take in a longer id that starts the same."""
    for key in ("a/x", "a-b/y", "a/pack-00000000", "snap-1/manifest", "snap-10/manifest", "top"):
        backend.write_object(key, key.encode())
    objects = await backend.objects()
    keys = [info.key async for info in objects.walk()]
    assert keys == sorted(keys) == ["a-b/y", "a/pack-00000000", "a/x", "snap-1/manifest", "snap-10/manifest", "top"]
    assert [info.key for info in await objects.scan("snap-1/")] == ["snap-1/manifest"]
    assert [(info.key, info.size) for info in await objects.scan("a/")] == [("a/pack-00000000", 15), ("a/x", 3)]
    await objects.close()


async def test_garbage_collection_keeps_a_snapshot_listed_out_of_order(backend: Backend, workers: Workers) -> None:
    """Were a listing out of key order, a kept snapshot's packs could come apart from its manifest; the
    collection reads the manifest itself, so none of them is taken for an interrupted write's."""
    store, disk = await write_sample(backend, workers, "keep-me")
    await store.write("drop-me", stream([Extent.of_data(0, bytes(disk))]), len(disk))
    listed = [info async for info in store.objects.walk()]
    assert len([info for info in listed if info.key.startswith("keep-me/pack-")]) > 1

    async def scrambled(prefix: str = "") -> AsyncIterator[Any]:
        packs_first = sorted(listed, key=lambda info: (not info.key.endswith("pack-00000000"), info.key[::-1]))
        for info in packs_first:
            yield info

    store.objects.walk = scrambled  # type: ignore[method-assign]
    removed = await store.collect_garbage({"keep-me"})
    assert {key.split("/")[0] for key in removed} == {"drop-me"}
    assert await read_back(store, "keep-me") == disk
    await store.close()


async def test_garbage_collection_survives_a_kept_snapshot_missing_a_pack(backend: Backend, workers: Workers) -> None:
    """A pack lost from under a kept snapshot (the store was damaged) neither stops the collection nor
    costs the snapshot its other objects: reading it then names the missing pack."""
    store, _ = await write_sample(backend, workers, "keep-me")
    await store.write("drop-me", stream([Extent.of_data(0, bytes(MiB))]), MiB)
    left = [key for key in backend.listing() if key.startswith("keep-me/")]
    objects = await backend.objects()
    await objects.delete("keep-me/pack-00000001")
    await objects.close()
    removed = await store.collect_garbage({"keep-me"})
    assert {key.split("/")[0] for key in removed} == {"drop-me"}
    assert [key for key in backend.listing() if key.startswith("keep-me/")] == [
        key for key in left if key != "keep-me/pack-00000001"]
    await store.close()


async def test_garbage_collection_after_a_killed_writer(backend: Backend, workers: Workers) -> None:
    """SIGKILL in the middle of a write (packs committed, a pack or a multipart upload open), then the start-up GC."""
    where = [str(backend.root)] if backend.server is None else [backend.server.endpoint, BUCKET, PREFIX]
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", CRASHING_WRITER, *where,
                                                   stderr=asyncio.subprocess.PIPE)
    try:
        for _ in range(300):
            left = backend.listing()
            if (backend.server is None and len(left) > 2) or any(key.startswith("upload:") for key in left):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"the writer left nothing to collect: {left}")
    finally:
        process.kill()
        _, stderr = await process.communicate()
    assert process.returncode == -signal.SIGKILL, stderr.decode()
    assert not any(key.endswith("/manifest") for key in backend.listing())
    store = await backend.store(workers)
    assert await store.snapshots() == []
    removed = await store.collect_garbage(set())
    assert removed and backend.listing() == []
    await store.close()


async def test_garbage_collection_keeps_a_snapshot_being_written(local: Backend, workers: Workers) -> None:
    store = await local.store(workers, depth=1)
    gate = asyncio.Event()

    async def paused() -> AsyncIterator[Extent]:
        for extent in incompressible(8 * MiB, 256 * 1024):
            if extent.offset == 6 * MiB:
                await gate.wait()
            yield extent

    task = asyncio.ensure_future(store.write("busy", paused(), 8 * MiB))
    for _ in range(100):
        if local.listing():
            break
        await asyncio.sleep(0.02)
    assert local.listing()
    assert await store.collect_garbage(set()) == []
    gate.set()
    await task
    assert await store.snapshots() == ["busy"]
    await store.close()


# --- configuration and a second S3 implementation -------------------------------------------------

def config_file(tmp_path: Path, store: str) -> Config:
    path = tmp_path / "vmied.toml"
    path.write_text(f'[state]\ndirectory = "{tmp_path / "state"}"\n[store]\n{store}')
    return load_config(str(path))


async def test_open_store_from_configuration(tmp_path: Path, moto: S3Server, workers: Workers) -> None:
    store = await open_store(config_file(tmp_path, 'kind = "local"\n'), workers)
    await store.write("c1", stream([Extent.of_data(0, b"x" * 1000)]), 1000)
    assert (tmp_path / "state" / "store" / "c1" / "manifest").exists()
    await store.close()
    s3_section = (f'kind = "s3"\nbucket = "{BUCKET}"\nprefix = "cfg"\nendpoint_url = "{moto.endpoint}"\n'
                  'region = "us-east-1"\nprofile = "moto"\npath_style = true\n')
    store = await open_store(config_file(tmp_path, s3_section), workers)
    await store.write("c1", stream([Extent.of_data(0, b"y" * 1000)]), 1000)
    assert await store.read("c1", 0, 1000) == b"y" * 1000
    assert "cfg/c1/manifest" in moto.objects()
    await store.close()
    with pytest.raises(StorageError, match="no-such-bucket"):
        await open_store(config_file(tmp_path, s3_section.replace(BUCKET, "no-such-bucket")), workers)
    bare = SimpleNamespace(store=SimpleNamespace(kind="local", path=str(tmp_path / "bare"), pack_size=MiB),
                           state=SimpleNamespace(directory=str(tmp_path)))
    store = await open_store(bare, workers)  # only the attributes the contract names
    assert store.options.pack_size == MiB
    await store.close()


STORE_FAULTS = [Fault("503", "GET", 2), Fault("reset", "GET", 5), Fault("truncate", "GET", 9),
                Fault("slowdown", "PUT", 1), Fault("500", "PUT", 4), Fault("drop", "PUT", 6),
                Fault("503", "HEAD", 2), Fault("500", "POST", 1)]


async def test_store_rides_out_s3_faults(moto: S3Server, tmp_path: Path, workers: Workers) -> None:
    """Errors, resets and cut bodies on every kind of request are retried by vmied's S3 retry policy."""
    rng = random.Random(41)
    disk = random_disk(rng, 3 * MiB, pieces=30)
    with fault_proxy(moto.endpoint, STORE_FAULTS) as proxy:
        config = moto.config(proxy.endpoint, part_size=MIN_PART, parts_in_flight=2, retry=fast_retries())
        store = SnapshotStore(await S3Objects.open(config, BUCKET, PREFIX), workers,
                              StoreOptions(pack_size=128 * 1024))
        await store.write("snap-t", stream(extent_plan(disk, rng)), len(disk))
        assert await read_back(store, "snap-t") == disk
        assert await store.read("snap-t", 12345, 300000) == disk[12345:312345]
        await store.delete("snap-t")
        await store.close()
    assert sorted(proxy.fired) == sorted(f"{f.method}#{f.nth}:{f.kind}" for f in STORE_FAULTS), proxy.fired
    assert store.objects.retrier.records  # type: ignore[attr-defined]
    assert Backend("moto", tmp_path, moto).listing() == []


async def test_round_trip_on_seaweedfs(seaweed: S3Server, tmp_path: Path, workers: Workers) -> None:
    backend = Backend("seaweed", tmp_path, seaweed)
    rng = random.Random(31)
    disk = random_disk(rng, 3 * MiB + 777)
    store = await backend.store(workers, pack_size=6 * MiB)
    await store.write("snap-w", stream(extent_plan(disk, rng)), len(disk))
    assert await read_back(store, "snap-w") == disk
    assert await store.read("snap-w", 1000, 200000) == disk[1000:201000]
    with pytest.raises(OSError):
        await store.write("snap-v", failing(incompressible(8 * MiB), 7), 8 * MiB)
    assert [key for key in backend.listing() if not key.startswith("snap-w/")] == []
    await store.delete("snap-w")
    assert backend.listing() == []
    await store.close()


async def test_export_failure_leaves_no_output(local: Backend, workers: Workers, tmp_path: Path) -> None:
    store, _ = await write_sample(local, workers)
    pack = local.read_object("snap-c/pack-00000001")
    local.write_object("snap-c/pack-00000001", flip(pack, 10))
    fresh = await local.store(workers)
    with pytest.raises(CorruptSnapshot):
        await fresh.export("snap-c", await FileSink.create(str(tmp_path / "out.vmdk")), "vmdk")
    assert list(tmp_path.glob("*out.vmdk*")) == []
    await fresh.close()
    await store.close()


async def test_rewriting_an_interrupted_snapshot_starts_clean(local: Backend, workers: Workers) -> None:
    """A task resumed after a crash writes its snapshot again: the old attempt's packs go first."""
    local.write_object("again/pack-00000007", b"stale")
    store = await local.store(workers)
    await store.write("again", stream([Extent.of_data(0, b"z" * 5000)]), 5000)
    assert local.listing() == ["again/manifest", "again/pack-00000000"]
    await store.close()


def test_digest_jobs_cut_long_zero_runs() -> None:
    digest = OrderedDigest(2)
    jobs = digest._jobs([b"ab", 600 * MiB, b"c", 5])
    assert jobs == [[b"ab"], [256 * MiB], [256 * MiB], [88 * MiB], [b"c", 5]]
    digest.close()


async def test_ordered_digest_is_the_sha256_of_what_it_was_fed_in_order() -> None:
    digest = OrderedDigest(1)
    pieces: list[bytes | int] = [b"head", 3 * MiB + 5, *(bytes([n]) * 70_000 for n in range(1, 20)), 7, b"tail"]
    for piece in pieces:
        await digest.feed([piece])
    expected = hashlib.sha256(b"".join(bytes(p) if isinstance(p, int) else p for p in pieces)).hexdigest()
    assert await digest.hexdigest() == expected
    digest.close()


def test_structures_have_their_documented_sizes() -> None:
    """The sizes the layout's table gives (a change of layout must change the version too)."""
    assert (layout.MANIFEST_HEADER.size, layout.PACK_ENTRY.size, layout.TRAILER.size) == (148, 40, 8)
    assert (layout.INDEX_HEADER.size, layout.INDEX_ENTRY.size) == (88, 24)
    assert layout.MAX_INDEX_BYTES < 400 * 1024
