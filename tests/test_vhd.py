"""VHD: qemu-made fixed and dynamic disks read bit-exact and round-trip through every output format;
what vmied writes qemu reads back; the corpus converts or is refused; hostile headers are refused."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmied.errors import CorruptImage, ImageError, UnsupportedImage, UsageError
from vmied.formats import output_formats, vhd

from .helpers import (
    CORPUS,
    MiB,
    convert_file,
    corpus_file,
    corpus_params,
    leftovers,
    qemu_img,
    qemu_info,
    random_layout,
    write_sparse_raw,
)

#: Raw outputs larger than this are checked for being all holes instead of hashed byte by byte
#: (sha256 runs at ~1 GB/s; the 127 GiB Virtual PC disk would take two minutes).
HASH_BUDGET = 16 << 30
SIZE = 6 * MiB + 3 * 512  # not a whole block, nor a whole MiB


def sparse_sha256(path: Path, size: int) -> str:
    """sha256 of a (sparse) file's first ``size`` bytes; holes are hashed from a zero buffer, not read."""
    digest, zero = hashlib.sha256(), memoryview(bytes(16 * MiB))

    def zeros(length: int) -> None:
        for start in range(0, length, len(zero)):
            digest.update(zero[: min(len(zero), length - start)])

    with open(path, "rb") as f:
        fd, position = f.fileno(), 0
        while position < size:
            try:
                data = min(os.lseek(fd, position, os.SEEK_DATA), size)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                data = size
            zeros(data - position)
            if data >= size:
                break
            position = min(os.lseek(fd, data, os.SEEK_HOLE), size)
            f.seek(data)
            for start in range(data, position, 4 * MiB):
                digest.update(f.read(min(4 * MiB, position - start)))
    return digest.hexdigest()


def has_data(path: Path) -> bool:
    with open(path, "rb") as f:
        try:
            os.lseek(f.fileno(), 0, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return False
            raise
    return True


def check_corpus_convert(row: dict[str, Any], cache: Path, tmp_path: Path) -> None:
    """Convert a corpus row to raw and compare with its expected hash (sparse-aware)."""
    out = tmp_path / "out.raw"
    result = convert_file(corpus_file(row, cache), out, "raw")
    assert result.source.virtual_size == row["expected_raw_size"] == out.stat().st_size
    if row["expected_raw_size"] > HASH_BUDGET:
        # Too large to hash in the test budget: the conversion must be all holes (see
        # test_huge_corpus_rows_hash_as_zeros, marked slow, for the hash itself).
        assert not has_data(out)
        return
    assert sparse_sha256(out, row["expected_raw_size"]) == row["expected_raw_sha256"]


def check_corpus_reject(row: dict[str, Any], cache: Path, tmp_path: Path, prefix: str) -> ImageError:
    with pytest.raises(ImageError) as caught:
        convert_file(corpus_file(row, cache), tmp_path / "out.raw", "raw")
    assert caught.value.reason.startswith(prefix)
    assert not list(leftovers(tmp_path)) and not (tmp_path / "out.raw").exists()
    return caught.value


def round_trip_every_format(image: Path, src: Path, tmp_path: Path) -> None:
    """``image`` -> each output format -> raw, bit-exact against ``src`` (new formats join by registry)."""
    expected = src.read_bytes()
    for fmt in output_formats():
        middle, back = tmp_path / f"mid.{fmt}", tmp_path / f"back-{fmt}.raw"
        convert_file(image, middle, fmt)
        convert_file(middle, back, "raw", input_format="raw" if fmt == "raw" else None)
        assert back.read_bytes()[: len(expected)] == expected, fmt
        assert not any(back.read_bytes()[len(expected) :]), fmt  # only padding (VHD sectors) after it


# ---------------------------------------------------------------------------------------------------
# qemu-made images
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("subformat", ["fixed", "dynamic"])
def test_qemu_made_vhd_round_trips_through_every_format(tmp_path: Path, subformat: str) -> None:
    src = tmp_path / "src.raw"
    write_sparse_raw(src, SIZE, [*random_layout(random.Random(subformat), SIZE, 12), (0, 4096)])
    image = tmp_path / "qemu.vhd"
    qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", f"subformat={subformat},force_size=on", src, image)
    round_trip_every_format(image, src, tmp_path)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32), count=st.integers(0, 20), subformat=st.sampled_from(["fixed", "dynamic"]),
       size=st.sampled_from([512, 2 * MiB, 5 * MiB + 512, 7 * MiB]))
def test_vmied_vhd_reads_back_in_qemu(tmp_path: Path, seed: int, count: int, subformat: str, size: int) -> None:
    src, out = tmp_path / "src.raw", tmp_path / "out.vhd"
    write_sparse_raw(src, size, random_layout(random.Random(seed), size, count), seed)
    convert_file(src, out, "vhd", input_format="raw", options={"subformat": subformat})
    info = qemu_info(out)
    # qemu counts a fixed VHD's footer as disk (its own fixed VHDs show the same); dynamic is exact
    assert info["virtual-size"] == size + (512 if subformat == "fixed" else 0)
    qemu_img("compare", "-f", "raw", "-F", "vpc", src, out)
    back = tmp_path / "back.raw"
    convert_file(out, back, "raw")
    assert back.read_bytes() == src.read_bytes()


def test_dynamic_writer_leaves_zero_blocks_unallocated(tmp_path: Path) -> None:
    src, out = tmp_path / "src.raw", tmp_path / "out.vhd"
    size = 16 * MiB
    write_sparse_raw(src, size, [(3 * MiB, 1000), (10 * MiB - 10, 20)])  # blocks 1, 4 and 5
    convert_file(src, out, "vhd", input_format="raw")
    raw = out.read_bytes()
    header = vhd.parse_dynamic_header(raw[512:1536])
    bat = struct.unpack(f">{header.max_table_entries}I", raw[1536 : 1536 + 4 * header.max_table_entries])
    assert [i for i, e in enumerate(bat) if e != vhd.BAT_UNUSED] == [1, 4, 5]
    assert all((e * 512 + 512) % 4096 == 0 for e in bat if e != vhd.BAT_UNUSED)  # data 4 KiB aligned
    assert raw[:512] == raw[-512:]
    # footer copy, header, one BAT sector, then three blocks each padded to put its data at 4 KiB, footer
    assert len(raw) == 3 * (4096 + 2 * MiB) + 512


def test_round_to_mib_pads_with_zeros(tmp_path: Path) -> None:
    src, out, back = tmp_path / "src.raw", tmp_path / "out.vhd", tmp_path / "back.raw"
    write_sparse_raw(src, 3 * MiB + 512, [(3 * MiB, 512)])
    for subformat in ("fixed", "dynamic"):
        convert_file(src, out, "vhd", input_format="raw", options={"subformat": subformat, "round_to_mib": "on"})
        result = convert_file(out, back, "raw")
        assert result.source.virtual_size == 4 * MiB
        assert back.read_bytes() == src.read_bytes() + bytes(MiB - 512)


def test_geometry_follows_the_spec() -> None:
    if not (CORPUS / "files/libyal-fragments").exists():
        pytest.skip("../shared/corpus is absent")
    footer = vhd.parse_footer((CORPUS / "files/libyal-fragments/libvhdi_file_footer.1").read_bytes())
    assert footer.current_size == 512 * MiB
    assert vhd.chs_geometry(footer.current_size) == (footer.cylinders, footer.heads, footer.sectors_per_track)
    assert vhd.chs_geometry(4 * MiB) == (120, 4, 17)
    assert vhd.chs_geometry(1 << 40) == (65535, 16, 255)  # saturated
    header = vhd.parse_dynamic_header(
        (CORPUS / "files/libyal-fragments/libvhdi_dynamic_disk_header.1").read_bytes())
    assert (header.table_offset, header.max_table_entries, header.block_size) == (0x600, 256, 2 * MiB)


# ---------------------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("row", corpus_params("convert", formats=("VHD ",)))
def test_corpus_converts(row: dict[str, Any], corpus_cache: Path, tmp_path: Path) -> None:
    check_corpus_convert(row, corpus_cache, tmp_path)


@pytest.mark.parametrize("row", corpus_params("reject", formats=("VHD ",)))
def test_corpus_rejects(row: dict[str, Any], corpus_cache: Path, tmp_path: Path) -> None:
    error = check_corpus_reject(row, corpus_cache, tmp_path, "vhd.")
    if row["file"] == "dfvfs/fat-differential.vhd":
        assert error.reason == "vhd.differencing"
        assert "C:\\Projects\\dfvfs\\test_data\\fat-parent.vhd" in error.message


def huge_rows() -> list[Any]:
    """Corpus convert rows of VHD/VHDX too large to hash in the normal run."""
    params = corpus_params("convert", formats=("VHD",))
    huge = [p for p in params if p.values[0] and p.values[0]["expected_raw_size"] > HASH_BUDGET]
    return huge or [pytest.param(None, marks=pytest.mark.skip(reason="no huge VHD rows in the corpus"))]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("VMIED_SLOW_TESTS"), reason="about two minutes of sha256: VMIED_SLOW_TESTS=1")
@pytest.mark.parametrize("row", huge_rows())
def test_huge_corpus_rows_hash_as_zeros(row: dict[str, Any]) -> None:
    """test_corpus_converts proves these rows convert to holes only; this proves their expected hash is
    that of zeros (sha256 of 127 GiB takes about two minutes, so it runs only when asked for)."""
    digest, zero = hashlib.sha256(), memoryview(bytes(64 * MiB))
    remaining = row["expected_raw_size"]
    while remaining:
        digest.update(zero[: min(remaining, len(zero))])
        remaining -= min(remaining, len(zero))
    assert digest.hexdigest() == row["expected_raw_sha256"]


# ---------------------------------------------------------------------------------------------------
# Hostile and broken images built here
# ---------------------------------------------------------------------------------------------------


def make_dynamic(
    size: int = 4 * MiB, block_size: int = 2 * MiB, entries: int | None = None, bat: list[int] | None = None,
    blocks: dict[int, bytes] | None = None, table_offset: int = 1536,
) -> bytearray:
    """A dynamic VHD: footer copy, header, BAT, then the given blocks (bitmap + data) in reverse order."""
    footer = vhd.build_footer(size, vhd.DISK_DYNAMIC, 512, 0, bytes(16))
    entries = -(-size // block_size) if entries is None else entries
    table = [vhd.BAT_UNUSED] * min(entries, 64) if bat is None else list(bat)
    body = bytearray(footer + vhd.build_dynamic_header(table_offset, entries, block_size))
    body += bytes(table_offset - len(body))
    table_at = len(body)
    body += bytes(4 * len(table))
    body += bytes(-len(body) % 512)
    for index, data in sorted((blocks or {}).items(), reverse=True):
        table[index] = len(body) // 512
        body += data
    body[table_at : table_at + 4 * len(table)] = struct.pack(f">{len(table)}I", *table)
    return body + footer


def refused(tmp_path: Path, image: bytes, reason: str) -> ImageError:
    path = tmp_path / "hostile.vhd"
    path.write_bytes(image)
    tracemalloc.start()
    try:
        with pytest.raises(ImageError) as caught:
            convert_file(path, tmp_path / "out.raw", "raw")
        assert tracemalloc.get_traced_memory()[1] < 64 * MiB
    finally:
        tracemalloc.stop()
    assert caught.value.reason == reason, caught.value.message
    return caught.value


def test_sector_bitmaps_are_honoured(tmp_path: Path) -> None:
    bitmap = bytearray(512)
    bitmap[0] = 0b10100000  # sectors 0 and 2 present, 1 and 3.. absent
    data = b"\xaa" * (2 * MiB)  # absent sectors hold garbage that must read as zero
    image = make_dynamic(blocks={1: bytes(bitmap) + data, 0: b"\xff" * 512 + data})
    (tmp_path / "b.vhd").write_bytes(image)
    convert_file(tmp_path / "b.vhd", tmp_path / "b.raw", "raw")
    out = (tmp_path / "b.raw").read_bytes()
    assert out[: 2 * MiB] == data
    assert out[2 * MiB : 2 * MiB + 1536] == b"\xaa" * 512 + bytes(512) + b"\xaa" * 512
    assert not any(out[2 * MiB + 1536 :])


def test_footers_not_identical(tmp_path: Path) -> None:
    image = make_dynamic()
    image[0x30] ^= 1  # the copy at offset 0 says another size (its own checksum is not even checked)
    assert "ClientError: Footers not identical" in refused(tmp_path, image, "vhd.footers").message


@pytest.mark.parametrize("block_size", [3 * MiB, 1 << 30, 0, 256])
def test_absurd_block_sizes(tmp_path: Path, block_size: int) -> None:
    refused(tmp_path, make_dynamic(block_size=block_size, entries=2, bat=[vhd.BAT_UNUSED] * 2), "vhd.block_size")


def test_huge_bat_past_the_end(tmp_path: Path) -> None:
    refused(tmp_path, make_dynamic(entries=0x40000001), "vhd.bat_outside")  # afl5's count


def test_more_blocks_than_vmied_reads(tmp_path: Path) -> None:
    refused(tmp_path, make_dynamic(size=1 << 50, block_size=512 * 1024, entries=1 << 31), "vhd.bat_size")


def test_bat_too_small(tmp_path: Path) -> None:
    refused(tmp_path, make_dynamic(size=8 * MiB, entries=2), "vhd.bat_size")


def test_bat_entry_past_the_end(tmp_path: Path) -> None:
    image = make_dynamic(bat=[0x00100000, vhd.BAT_UNUSED])
    assert "entry 0" in refused(tmp_path, image, "vhd.bat_entry").message


def test_overlapping_blocks(tmp_path: Path) -> None:
    image = make_dynamic(blocks={0: b"\xff" * 512 + bytes(2 * MiB)})
    bat_entry = image[1536:1540]
    image[1540:1544] = bat_entry  # block 1 aliases block 0
    refused(tmp_path, image, "vhd.bat_overlap")


def test_bad_checksums(tmp_path: Path) -> None:
    image = make_dynamic()
    image[512 + 100] ^= 1  # inside the dynamic header
    refused(tmp_path, image, "vhd.checksum")
    image = make_dynamic()
    image[-512 + 0x30] ^= 1
    image[0x30] ^= 1  # both footers agree, but their checksum does not
    refused(tmp_path, image, "vhd.checksum")


def test_differencing_and_unknown_types(tmp_path: Path) -> None:
    footer = bytearray(vhd.build_footer(MiB, vhd.DISK_DIFFERENCING, vhd.NO_DATA_OFFSET, 0, bytes(16)))
    error = refused(tmp_path, bytes(MiB) + footer, "vhd.differencing")
    assert isinstance(error, UnsupportedImage) and "differencing" in error.message
    footer = bytearray(vhd.build_footer(MiB, 5, vhd.NO_DATA_OFFSET, 0, bytes(16)))
    refused(tmp_path, bytes(MiB) + footer, "vhd.disk_type")


def test_truncated_files(tmp_path: Path) -> None:
    image = make_dynamic()
    refused(tmp_path, image[:-512], "vhd.footer_missing")
    refused(tmp_path, image[:-1], "vhd.footer_missing")
    footer = vhd.build_footer(4 * MiB, vhd.DISK_FIXED, vhd.NO_DATA_OFFSET, 0, bytes(16))
    refused(tmp_path, bytes(MiB) + footer, "vhd.truncated")


def test_check_functions_directly() -> None:
    with pytest.raises(CorruptImage):
        vhd.check_bat_entry(3, 0, 512 + 2 * MiB, 10 * MiB)  # offset 0 is the footer copy
    assert vhd.check_bat_entry(3, 4, 512 + 2 * MiB, 10 * MiB) == 2048
    assert vhd.check_block_size(2 * MiB) == 2 * MiB
    assert vhd.bitmap_size(2 * MiB) == 512 and vhd.bitmap_size(4 * 1024 * MiB // 16) == 512 * 128
    assert vhd.present_runs(b"\xf0\x0f", 16) == [(0, 4, True), (4, 8, False), (12, 4, True)]
    assert vhd.output_size(MiB + 1, False) == MiB + 512 and vhd.output_size(MiB + 1, True) == 2 * MiB


def test_writer_limits_and_options(tmp_path: Path) -> None:
    src = tmp_path / "huge.raw"
    with open(src, "wb") as f:
        f.truncate(2041 << 30)  # sparse: refused before any data moves
    with pytest.raises(UsageError, match="2040 GiB"):
        convert_file(src, tmp_path / "out.vhd", "vhd", input_format="raw")
    with pytest.raises(UsageError, match="subformat"):
        convert_file(src, tmp_path / "out.vhd", "vhd", input_format="raw", options={"subformat": "differencing"})
    assert not list(leftovers(tmp_path)) and not (tmp_path / "out.vhd").exists()
