"""qcow2: reading what qemu-img writes, writing what qemu-img check accepts, and the refusals."""

from __future__ import annotations

import asyncio
import json
import random
import struct
import subprocess
import tempfile
import tracemalloc
from array import array
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import (
    MiB,
    convert_file,
    corpus_file,
    corpus_params,
    corpus_rows,
    leftovers,
    qemu_img,
    random_layout,
    sha256_file,
    write_sparse_raw,
)
from vmied.errors import CorruptImage, ImageError, UnsupportedImage, UsageError
from vmied.formats import open_reader, output_formats
from vmied.formats.qcow2 import (
    HEADER_V2,
    L1E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    Geometry,
    Metadata,
    Qcow2Reader,
    Refcounts,
    check_data_cluster,
    check_l1_entry,
    check_l1_size,
    compress_cluster,
    decompress_cluster,
    parse_cluster_size,
    parse_compressed_entry,
    parse_header,
)
from vmied.io.local import FileSource
from vmied.pipeline import Workers

# An odd virtual size: the last cluster is partial for every cluster size tested.
SIZE = 9 * MiB + 3 * 512


def sparse_source(path: Path, seed: int = 0, size: int = SIZE, count: int = 24) -> Path:
    write_sparse_raw(path, size, random_layout(random.Random(seed), size, count), seed)
    return path


def qemu_io(image: Path, *commands: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    subprocess.run([*args, str(image)], check=True, capture_output=True)


def qemu_check(image: Path) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "check", "--output=json", str(image)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def to_raw(image: Path, tmp: Path) -> Path:
    out = tmp / (image.name + ".raw")
    convert_file(image, out, "raw")
    return out


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def header_fields(path: Path) -> tuple[int, int, int]:
    """``(cluster_size, l1_table_offset, first L2 table offset)`` of an image."""
    head = path.read_bytes()[: 1 << 21]
    header = parse_header(head)
    (l1_entry,) = struct.unpack_from(">Q", head, header.l1_table_offset)
    return header.cluster_size, header.l1_table_offset, l1_entry & L1E_OFFSET_MASK


# --- the corpus ------------------------------------------------------------------------------


@pytest.mark.parametrize("row", corpus_params("convert-if-qcow2"))
def test_corpus_converts_bit_exact(row: dict[str, Any], corpus_cache: Path, tmp_path: Path) -> None:
    image = corpus_file(row, corpus_cache)
    out = to_raw(image, tmp_path)
    assert out.stat().st_size == row["expected_raw_size"]
    assert sha256_file(out) == row["expected_raw_sha256"]


def test_corpus_header_fragment(corpus_cache: Path) -> None:
    rows = [row for row in corpus_rows() if row["file"] == "libyal-fragments/libqcow_file_header.1"]
    if not rows:
        pytest.skip("../shared/corpus is absent")
    header = parse_header(corpus_file(rows[0], corpus_cache).read_bytes())
    assert (header.version, header.cluster_bits, header.size, header.header_length) == (3, 16, 4 * MiB, 104)
    assert (header.l1_size, header.l1_table_offset, header.refcount_table_offset) == (1, 0x30000, 0x10000)
    assert header.incompatible == 0 and header.compression_type == 0 and header.refcount_order == 4


# --- reading what qemu-img writes ------------------------------------------------------------

QEMU_VARIANTS = {
    "v2": ["-o", "compat=0.10"],
    "v3": ["-o", "compat=1.1"],
    "compressed": ["-c"],
    "c512": ["-o", "cluster_size=512"],
    "c4k-compressed": ["-c", "-o", "cluster_size=4k"],
    "c2M": ["-o", "cluster_size=2M"],
    "extended_l2": ["-o", "extended_l2=on,cluster_size=128k"],
    "zstd": ["-c", "-o", "compression_type=zstd"],
    "v2-compressed-512": ["-c", "-o", "compat=0.10,cluster_size=512"],
}


@pytest.mark.parametrize("variant", QEMU_VARIANTS)
def test_reads_qemu_images_bit_exact(variant: str, tmp_path: Path) -> None:
    src = sparse_source(tmp_path / "src.raw", seed=len(variant))
    image = tmp_path / "in.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", *QEMU_VARIANTS[variant], src, image)
    assert to_raw(image, tmp_path).read_bytes() == src.read_bytes()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layout=st.lists(st.tuples(st.integers(0, 4 * MiB - 1), st.integers(1, 300_000)), max_size=12),
    compressed=st.booleans(),
    cluster_size=st.sampled_from(["512", "4k", "64k", "64k-extended"]),
)
def test_reads_random_layouts(layout: list[tuple[int, int]], compressed: bool, cluster_size: str) -> None:
    size = 4 * MiB
    with tempfile.TemporaryDirectory() as tmp:
        src, image = Path(tmp) / "src.raw", Path(tmp) / "in.qcow2"
        write_sparse_raw(src, size, [(o, min(n, size - o)) for o, n in layout])
        flags = ["-c"] if compressed else []
        options = cluster_size.replace("-extended", ",extended_l2=on")
        qemu_img("convert", "-f", "raw", "-O", "qcow2", *flags, "-o", f"cluster_size={options}", src, image)
        assert to_raw(image, Path(tmp)).read_bytes() == src.read_bytes()


def test_reads_zero_clusters_subclusters_and_snapshots(tmp_path: Path) -> None:
    """Entries qemu-img convert never makes: zero flags, partial subclusters, shared clusters."""
    cases = {
        "zero": (["-o", "compat=1.1"], ["write -P 7 0 1M", "write -z 64k 192k", "write -z -u 512k 64k"]),
        "subclusters": (
            ["-o", "extended_l2=on"],
            [
                "write -P 5 4k 4k",
                "write -P 6 70k 2k",
                "write -z 1M 8k",
                "write -P 9 2M 64k",
                "write -z 2101248 8k",
            ],
        ),
        "snapshot": (["-o", "compat=0.10"], ["write -P 1 0 2M"]),
    }
    for name, (create, commands) in cases.items():
        image = tmp_path / f"{name}.qcow2"
        qemu_img("create", "-f", "qcow2", *create, image, "4M")
        qemu_io(image, *commands)
        if name == "snapshot":
            qemu_img("snapshot", "-c", "s1", image)
            qemu_io(image, "write -P 2 1M 64k")
        expected = tmp_path / f"{name}.expected"
        qemu_img("convert", "-O", "raw", image, expected)
        assert to_raw(image, tmp_path).read_bytes() == expected.read_bytes(), name


def test_huge_sparse_disks_in_bounded_memory(tmp_path: Path) -> None:
    """A 16 TiB qcow2 streams in flat memory; a 1 TiB sparse raw becomes a small qcow2."""
    image = tmp_path / "huge.qcow2"
    qemu_img("create", "-f", "qcow2", image, "16T")
    qemu_io(image, "write -P 0x5a 12T 64k")
    seen: list[tuple[int, bytes]] = []

    async def stream() -> None:
        source = await FileSource.open(str(image))
        try:
            with Workers() as workers:
                reader = await open_reader(source, workers)
                async for extent in reader.extents():
                    if extent.data is not None:
                        seen.append((extent.offset, bytes(extent.data)))
        finally:
            await source.close()

    tracemalloc.start()
    asyncio.run(stream())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seen == [(12 << 40, b"\x5a" * 65536)]
    assert peak < 8 * MiB, peak

    src = tmp_path / "huge.raw"
    with open(src, "wb") as f:
        f.truncate(1 << 40)
        f.seek(700 << 30)
        f.write(b"vmied" * 1000)
    out = tmp_path / "huge-out.qcow2"
    tracemalloc.start()
    convert_file(src, out, "qcow2", input_format="raw")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * MiB, peak
    assert out.stat().st_size < 1 * MiB
    assert qemu_check(out)["check-errors"] == 0
    qemu_img("compare", "-f", "raw", "-F", "qcow2", src, out)


def test_info_reports_the_header(tmp_path: Path) -> None:
    image = tmp_path / "z.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "compression_type=zstd,extended_l2=on", image, "3M")
    info = run_info(image)
    assert info.format == "qcow2" and info.virtual_size == 3 * MiB and info.cluster_size == 65536
    assert info.details["compression_type"] == "zstd" and info.details["extended_l2"] is True
    assert info.problems == []


def run_info(image: Path) -> Any:
    async def go() -> Any:
        source = await FileSource.open(str(image))
        try:
            with Workers() as workers:
                return (await open_reader(source, workers)).info()
        finally:
            await source.close()

    return asyncio.run(go())


# --- writing ---------------------------------------------------------------------------------

WRITE_OPTIONS = {
    "default": {},
    "compressed": {"compress": "on"},
    "c512": {"cluster_size": "512"},
    "c512-compressed": {"cluster_size": "512", "compress": "on"},
    "c2M-compressed": {"cluster_size": "2M", "compress": "on"},
    "zstd": {"compress": "on", "compression_type": "zstd"},
}


@pytest.mark.parametrize("name", WRITE_OPTIONS)
def test_written_images_pass_qemu_check(name: str, tmp_path: Path) -> None:
    src = sparse_source(tmp_path / "src.raw", seed=3, count=40)
    image = tmp_path / "out.qcow2"
    convert_file(src, image, "qcow2", input_format="raw", options=WRITE_OPTIONS[name])
    check = qemu_check(image)
    assert check["check-errors"] == 0 and "leaks" not in check and "corruptions" not in check
    qemu_img("compare", "-f", "raw", "-F", "qcow2", src, image)
    if WRITE_OPTIONS[name].get("compress") == "on":
        assert check.get("compressed-clusters", 0) > 0
        plain = tmp_path / "plain.qcow2"
        options = {**WRITE_OPTIONS[name], "compress": "off"}
        convert_file(src, plain, "qcow2", input_format="raw", options=options)
        assert image.stat().st_size < plain.stat().st_size  # the text half compresses


def test_written_refcount_blocks_cross_ranges(tmp_path: Path) -> None:
    """512-byte clusters: one refcount block covers 128 KiB, so dozens are written mid-file."""
    src = tmp_path / "src.raw"
    write_sparse_raw(src, 6 * MiB, [(0, 3 * MiB), (4 * MiB + 1000, 700_000)], seed=9)
    image = tmp_path / "out.qcow2"
    convert_file(src, image, "qcow2", input_format="raw", options={"cluster_size": "512", "compress": "on"})
    assert qemu_check(image)["check-errors"] == 0
    qemu_img("compare", "-f", "raw", "-F", "qcow2", src, image)


def test_empty_and_zero_disks(tmp_path: Path) -> None:
    src = tmp_path / "zero.raw"
    with open(src, "wb") as f:
        f.truncate(5 * MiB)
        f.seek(MiB)
        f.write(bytes(MiB))  # allocated zeros stay unallocated in the output
    image = tmp_path / "zero.qcow2"
    convert_file(src, image, "qcow2", input_format="raw")
    check = qemu_check(image)
    assert check["check-errors"] == 0 and check.get("allocated-clusters", 0) == 0
    qemu_img("compare", "-f", "raw", "-F", "qcow2", src, image)


@pytest.mark.parametrize("size", [0, 1000, 65536 + 512])
def test_tiny_and_odd_sizes(size: int, tmp_path: Path) -> None:
    """qemu counts whole sectors: an odd size is rounded up so that no byte is lost."""
    src = tmp_path / "odd.raw"
    src.write_bytes(random.Random(size).randbytes(size))
    image = tmp_path / "odd.qcow2"
    convert_file(src, image, "qcow2", input_format="raw", options={"compress": "on"})
    assert qemu_check(image)["check-errors"] == 0
    back = tmp_path / "back.raw"
    qemu_img("convert", "-O", "raw", image, back)
    restored = back.read_bytes()
    assert len(restored) == -(-size // 512) * 512
    assert restored[:size] == src.read_bytes() and not any(restored[size:])


@pytest.mark.parametrize("fmt", output_formats())
def test_round_trip_through_every_format(fmt: str, tmp_path: Path) -> None:
    src = sparse_source(tmp_path / "src.raw", seed=11)
    first = tmp_path / "first.qcow2"
    middle = tmp_path / f"middle.{fmt}"
    back = tmp_path / "back.qcow2"
    convert_file(src, first, "qcow2", input_format="raw", options={"compress": "on"})
    convert_file(first, middle, fmt)
    convert_file(middle, back, "qcow2", input_format="raw" if fmt == "raw" else None)
    assert qemu_check(back)["check-errors"] == 0
    expected = src.read_bytes()
    restored = to_raw(back, tmp_path).read_bytes()
    assert restored[: len(expected)] == expected and not any(restored[len(expected) :])


def test_writer_options_are_checked() -> None:
    assert parse_cluster_size("64k") == 65536 and parse_cluster_size("2M") == 2 * MiB
    assert parse_cluster_size("512") == 512
    for bad in ("1000", "256", "4M", "k", "", "-1"):
        with pytest.raises(UsageError):
            parse_cluster_size(bad)


def test_writer_refuses_tables_beyond_qemu_limits(tmp_path: Path) -> None:
    src = tmp_path / "huge.raw"
    with open(src, "wb") as f:
        f.truncate(1 << 40)  # 1 TiB sparse: 512-byte clusters would need a 128 MiB L1 table
    with pytest.raises(UsageError, match="cluster_size"):
        convert_file(
            src, tmp_path / "out.qcow2", "qcow2", input_format="raw", options={"cluster_size": "512"}
        )
    assert not list(leftovers(tmp_path))


# --- refusals --------------------------------------------------------------------------------


def refused(image: Path, tmp_path: Path) -> ImageError:
    with pytest.raises(ImageError) as info:
        convert_file(image, tmp_path / "out.raw", "raw")
    assert not list(leftovers(tmp_path))
    return info.value


def test_refuses_backing_file_by_name(tmp_path: Path) -> None:
    base = tmp_path / "base-disk.raw"
    base.write_bytes(bytes(MiB))
    image = tmp_path / "child.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", base.name, "-F", "raw", image)
    error = refused(image, tmp_path)
    assert isinstance(error, UnsupportedImage) and error.reason == "qcow2.backing_file"
    assert "base-disk.raw" in error.message


@pytest.mark.parametrize("method", ["aes", "luks"])
def test_refuses_encryption(method: str, tmp_path: Path) -> None:
    image = tmp_path / "secret.qcow2"
    fast = ",encrypt.iter-time=10" if method == "luks" else ""
    create = ["create", "-f", "qcow2", "--object", "secret,id=s0,data=password",
              "-o", f"encrypt.format={method},encrypt.key-secret=s0{fast}", image, "1M"]
    # qemu-img times PBKDF2 on the thread's CPU clock and gives up ("Unable to get accurate CPU usage")
    # when a loaded machine leaves that clock unmoved (seen in 4 runs of 10 with 2 cores busy): retry.
    for attempt in range(1, 6):
        try:
            qemu_img(*create)
            break
        except subprocess.CalledProcessError as failed:
            if attempt == 5 or "accurate CPU usage" not in failed.stderr:
                raise
    error = refused(image, tmp_path)
    assert error.reason == "qcow2.encrypted" and method.upper() in error.message


def test_refuses_external_data_file(tmp_path: Path) -> None:
    image = tmp_path / "meta.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={tmp_path / 'payload.raw'}", image, "1M")
    error = refused(image, tmp_path)
    assert error.reason == "qcow2.data_file" and "payload.raw" in error.message


def made_image(tmp_path: Path, *options: str) -> Path:
    image = tmp_path / "in.qcow2"
    qemu_img("create", "-f", "qcow2", *options, image, "4M")
    qemu_io(image, "write -P 3 0 256k")
    return image


def test_header_bits(tmp_path: Path) -> None:
    image = made_image(tmp_path)
    incompatible = HEADER_V2.size
    patch(image, incompatible, struct.pack(">Q", 1 << 1))
    assert refused(image, tmp_path).reason == "qcow2.corrupt_bit"
    patch(image, incompatible, struct.pack(">Q", 1 << 9))
    error = refused(image, tmp_path)
    assert error.reason == "qcow2.incompatible_feature" and "bit 9" in error.message
    patch(image, 4, struct.pack(">I", 1))
    assert refused(image, tmp_path).reason == "qcow2.version"


def test_dirty_bit_is_read_and_reported(tmp_path: Path) -> None:
    image = made_image(tmp_path)
    expected = tmp_path / "expected.raw"
    qemu_img("convert", "-O", "raw", image, expected)
    patch(image, HEADER_V2.size, struct.pack(">Q", 1 << 0))
    assert to_raw(image, tmp_path).read_bytes() == expected.read_bytes()
    assert any("dirty" in problem for problem in run_info(image).problems)


def test_corrupt_l1_entries(tmp_path: Path) -> None:
    image = made_image(tmp_path)
    cluster, l1, _ = header_fields(image)
    size = image.stat().st_size
    for entry, reason in [
        ((size + cluster) | 1 << 63, "qcow2.offset_past_end"),
        (cluster * 2 + 512, "qcow2.unaligned"),
        (0, None),  # an empty L1 entry: the region reads as zeros
        (1 << 60, "qcow2.l1_entry"),
        (l1, "qcow2.overlap"),
    ]:
        patch(image, l1, struct.pack(">Q", entry))
        if reason is None:
            assert not any(to_raw(image, tmp_path).read_bytes())
        else:
            assert refused(image, tmp_path).reason == reason


def test_shared_l2_table(tmp_path: Path) -> None:
    image = tmp_path / "two.qcow2"
    qemu_img("create", "-f", "qcow2", image, "1G")
    qemu_io(image, "write -P 1 0 64k", "write -P 2 600M 64k")
    _, l1, l2 = header_fields(image)
    patch(image, l1 + 8, struct.pack(">Q", l2 | 1 << 63))
    error = refused(image, tmp_path)
    assert error.reason == "qcow2.overlap" and "shared" in error.message


def test_corrupt_l2_entries(tmp_path: Path) -> None:
    image = made_image(tmp_path)
    cluster, l1, l2 = header_fields(image)
    size = image.stat().st_size
    for entry, reason in [
        ((size + cluster) | 1 << 63, "qcow2.offset_past_end"),
        ((l2 + 4096) | 1 << 63, "qcow2.unaligned"),
        (l2 | 1 << 63, "qcow2.overlap"),  # the data cluster is the L2 table itself
        (l1 | 1 << 63, "qcow2.overlap"),  # the L1 table
        (l2 | 1 << 58, "qcow2.l2_entry"),
        (OFLAG_COMPRESSED | (size + 10 * cluster), "qcow2.offset_past_end"),
    ]:
        patch(image, l2, struct.pack(">Q", entry))
        assert refused(image, tmp_path).reason == reason


def test_garbage_compressed_cluster(tmp_path: Path) -> None:
    src = sparse_source(tmp_path / "src.raw", seed=5)
    image = tmp_path / "c.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-c", src, image)
    _, _, l2 = header_fields(image)
    entries = struct.unpack_from(">8192Q", image.read_bytes(), l2)
    entry = next(e for e in entries if e & OFLAG_COMPRESSED)
    host, _ = parse_compressed_entry(entry, Geometry(16, SIZE, image.stat().st_size, 3, False))
    patch(image, host, b"\xff" * 64)
    assert refused(image, tmp_path).reason == "qcow2.compressed"


def test_zero_flag_in_version_2(tmp_path: Path) -> None:
    image = made_image(tmp_path, "-o", "compat=0.10")
    _, _, l2 = header_fields(image)
    (entry,) = struct.unpack_from(">Q", image.read_bytes(), l2)
    patch(image, l2, struct.pack(">Q", entry | 1))
    assert refused(image, tmp_path).reason == "qcow2.l2_entry"


def test_invalid_subcluster_bitmap(tmp_path: Path) -> None:
    image = made_image(tmp_path, "-o", "extended_l2=on")
    _, _, l2 = header_fields(image)
    patch(image, l2 + 8, struct.pack(">Q", 1 << 32 | 1))  # subcluster 0 both allocated and zero
    assert refused(image, tmp_path).reason == "qcow2.l2_entry"


def test_absurd_l1_size_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    image = made_image(tmp_path)
    l1_size = 36
    for virtual, entries in [(1 << 40, 0xFFFFFFFF), (1 << 61, 1 << 22), (1 << 50, 1 << 21)]:
        patch(image, 24, struct.pack(">Q", virtual))
        patch(image, l1_size, struct.pack(">I", entries))
        tracemalloc.start()
        error = refused(image, tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert isinstance(error, CorruptImage) and error.reason in ("qcow2.l1_size", "qcow2.offset_past_end")
        assert peak < 8 * MiB


# --- the pure parts, directly ----------------------------------------------------------------


def test_l1_size_checks() -> None:
    header = parse_header(bytes(made_header(size=1 << 30, l1_size=2)))
    geometry = Geometry(16, 1 << 30, 1 << 20, 3, False)
    assert check_l1_size(header, geometry) == 2
    with pytest.raises(CorruptImage, match="too few"):
        check_l1_size(
            parse_header(bytes(made_header(size=1 << 31, l1_size=2))), Geometry(16, 1 << 31, 0, 3, False)
        )


def made_header(size: int, l1_size: int) -> bytearray:
    head = bytearray(512)
    HEADER_V2.pack_into(head, 0, b"QFI\xfb", 3, 0, 0, 16, size, 0, l1_size, 0x30000, 0x10000, 1, 0, 0)
    struct.pack_into(">QQQII", head, HEADER_V2.size, 0, 0, 0, 4, 104)
    return head


def test_entry_checks_name_the_problem() -> None:
    geometry = Geometry(16, 1 << 30, 1 << 20, 3, False)
    metadata = Metadata(65536, [(0, 65536, "the header")], array("Q", [3]))
    assert check_l1_entry(0, 0, geometry, metadata) == 0
    assert check_l1_entry(0x20000 | 1 << 63, 0, geometry, metadata) == 0x20000
    with pytest.raises(CorruptImage, match="overlaps an L2 table"):
        check_data_cluster(0x30000, 65536, 0, geometry, metadata)
    with pytest.raises(CorruptImage, match="overlaps the header"):
        check_data_cluster(0, 65536, 0, geometry, metadata)
    with pytest.raises(CorruptImage, match="past the end"):
        check_data_cluster(0xF0000, 0x20000, 0, geometry, metadata)


def test_compressed_entry_layout() -> None:
    geometry = Geometry(16, 1 << 30, 1 << 30, 3, False)
    # qemu: offset in bits 0..53, additional sectors in 54..61 for 64 KiB clusters
    assert parse_compressed_entry(OFLAG_COMPRESSED | 3 << 54 | 0x12345, geometry) == (
        0x12345,
        4 * 512 - 0x145,
    )
    data = bytes(range(256)) * 256
    for compression in (0, 1):
        packed = compress_cluster(data, compression)
        assert decompress_cluster(packed + b"trailing sector bytes", 65536, compression, 0) == data
        with pytest.raises(CorruptImage):
            decompress_cluster(packed, 32768, compression, 0)


@pytest.mark.parametrize("cluster_bits", [9, 12, 16])
def test_refcount_final_layout_covers_itself(cluster_bits: int) -> None:
    refcounts = Refcounts(cluster_bits)
    per_block = refcounts.per_block
    for first in (1, per_block - 1, per_block, 3 * per_block - 2, 10 * per_block + 7):
        refcounts = Refcounts(cluster_bits)
        blocks, table = refcounts.final_layout(first)
        end = first + blocks + table
        assert blocks == -(-end // per_block)
        assert table * (1 << cluster_bits) >= 8 * blocks


def test_probe() -> None:
    assert Qcow2Reader.probe(b"QFI\xfb\x00\x00\x00\x03", b"", 1 << 20)
    assert not Qcow2Reader.probe(b"KDMV", b"", 1 << 20)
