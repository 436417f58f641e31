"""VHDX: qemu-made images read bit-exact and round-trip through every output format; what vmied writes
passes qemu-img check; log replay follows MS-VHDX §2.3; the corpus converts or is refused; hostile
images built here are refused with bounded memory."""

from __future__ import annotations

import asyncio
import random
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmied.errors import CorruptImage, ImageError, UnsupportedImage, UsageError
from vmied.formats import vhdx
from vmied.io.local import FileSource

from .helpers import (
    CORPUS,
    MiB,
    convert_file,
    corpus_params,
    qemu_img,
    qemu_info,
    random_layout,
    sha256_file,
    write_sparse_raw,
)
from .test_vhd import check_corpus_convert, check_corpus_reject, round_trip_every_format

SIZE = 6 * MiB + 4096
LOG_GUID = bytes(range(16))


# ---------------------------------------------------------------------------------------------------
# A VHDX builder for crafted images: any region offsets, block states, log entries
# ---------------------------------------------------------------------------------------------------


def log_entry(sequence: int, writes: list[tuple[int, bytes | int]], *, tail: int = 0, guid: bytes = LOG_GUID,
              flushed: int = 0, last: int = 0) -> bytes:
    """One log entry: a 4 KiB data sector per ``(offset, bytes)``, a zero descriptor per ``(offset, n)``."""
    descriptors, sectors = [], []
    for offset, what in writes:
        if isinstance(what, int):
            descriptors.append(vhdx.LOG_DESCRIPTOR.pack(b"zero", 0, what, offset, sequence))
            continue
        leading, body, trailing = struct.unpack("<Q4084sI", what)
        descriptors.append(vhdx.LOG_DESCRIPTOR.pack(b"desc", trailing, leading, offset, sequence))
        sectors.append(vhdx.LOG_DATA_SECTOR.pack(b"data", sequence >> 32, body, sequence & 0xFFFFFFFF))
    head_sectors = -(-(64 + 32 * len(descriptors)) // 4096)
    length = 4096 * (head_sectors + len(sectors))
    head = vhdx.LOG_ENTRY.pack(b"loge", 0, length, tail, sequence, len(descriptors), 0, guid, flushed, last)
    entry = bytearray((head + b"".join(descriptors)).ljust(4096 * head_sectors, b"\0") + b"".join(sectors))
    return vhdx.with_crc(entry, 4)


def build_vhdx(
    *, size: int = 4 * MiB, block_size: int = MiB, logical: int = 512, blocks: dict[int, bytes] | None = None,
    states: dict[int, int] | None = None, meta_at: int = 2 * MiB, bat_at: int = 3 * MiB,
    log: bytes = b"", log_guids: tuple[bytes, bytes] = (bytes(16), bytes(16)), sequences: tuple[int, int] = (1, 2),
    flags: int = 0, bat_length: int = MiB,
) -> bytearray:
    """A VHDX with the given payload ``blocks`` stored in reverse order after the BAT."""
    meta = vhdx.Metadata(block_size, False, size, logical, 4096, False)
    image = bytearray(vhdx.build_identifier())
    for sequence, log_guid in zip(sequences, log_guids, strict=True):
        header = bytearray(4096)
        vhdx.HEADER.pack_into(header, 0, b"head", 0, sequence, bytes(16), bytes(16), log_guid, 0, 1, MiB, MiB)
        image += vhdx.with_crc(header, 4).ljust(64 * 1024, b"\0")
    table = bytearray(vhdx.REGION_TABLE_SIZE)
    vhdx.REGION_HEADER.pack_into(table, 0, b"regi", 0, 2, 0)
    vhdx.REGION_ENTRY.pack_into(table, 16, vhdx.BAT_GUID, bat_at, bat_length, 1)
    vhdx.REGION_ENTRY.pack_into(table, 48, vhdx.METADATA_GUID, meta_at, MiB, 1)
    image += vhdx.with_crc(table, 4) * 2
    image += bytes(MiB - len(image)) + log.ljust(MiB, b"\0")
    end = max(meta_at, bat_at) + MiB
    image += bytes(end - len(image))
    metadata = bytearray(vhdx.build_metadata(meta, bytes(16)))
    struct.pack_into("<I", metadata, 64 * 1024 + 4, flags)  # the file parameters' flags
    image[meta_at : meta_at + MiB] = metadata
    bat = [0] * meta.bat_entries
    for index, data in sorted((blocks or {}).items(), reverse=True):
        bat[vhdx.bat_index(index, meta.chunk_ratio)] = len(image) // MiB << 20 | vhdx.PAYLOAD_FULLY_PRESENT
        image += data.ljust(block_size, b"\0")
    for index, state in (states or {}).items():
        bat[vhdx.bat_index(index, meta.chunk_ratio)] = state
    raw = struct.pack(f"<{len(bat)}Q", *bat)
    image[bat_at : bat_at + len(raw)] = raw
    return image


def read_image(tmp_path: Path, image: bytes, name: str = "built.vhdx") -> bytes:
    path = tmp_path / name
    path.write_bytes(image)
    out = tmp_path / (name + ".raw")
    convert_file(path, out, "raw")
    return out.read_bytes()


def refused(tmp_path: Path, image: bytes, reason: str) -> ImageError:
    path = tmp_path / "hostile.vhdx"
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


# ---------------------------------------------------------------------------------------------------
# qemu-made images and vmied-written ones
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", ["subformat=dynamic", "subformat=fixed", "block_size=1M,log_size=1M",
                                     "block_size=8M,block_state_zero=off"])
def test_qemu_made_vhdx_round_trips_through_every_format(tmp_path: Path, options: str) -> None:
    src = tmp_path / "src.raw"
    write_sparse_raw(src, SIZE, [*random_layout(random.Random(options), SIZE, 12), (SIZE - 4096, 4096)])
    image = tmp_path / "qemu.vhdx"
    qemu_img("convert", "-f", "raw", "-O", "vhdx", "-o", options, src, image)
    round_trip_every_format(image, src, tmp_path)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32), count=st.integers(0, 20), block=st.sampled_from(["1M", "2M", "32M", "256M"]),
       size=st.sampled_from([512, MiB, 5 * MiB + 512, 9 * MiB]))
def test_vmied_vhdx_passes_qemu_check(tmp_path: Path, seed: int, count: int, block: str, size: int) -> None:
    src, out, back = tmp_path / "src.raw", tmp_path / "out.vhdx", tmp_path / "back.raw"
    write_sparse_raw(src, size, random_layout(random.Random(seed), size, count), seed)
    convert_file(src, out, "vhdx", input_format="raw", options={"block_size": block})
    qemu_img("check", out)
    info = qemu_info(out)
    assert info["virtual-size"] == size
    assert info["cluster-size"] == vhdx.parse_block_size(block)
    qemu_img("compare", "-f", "raw", "-F", "vhdx", src, out)
    convert_file(out, back, "raw")
    assert back.read_bytes() == src.read_bytes()


def test_writer_layout_and_zero_blocks(tmp_path: Path) -> None:
    src, out = tmp_path / "src.raw", tmp_path / "out.vhdx"
    write_sparse_raw(src, 100 * MiB, [(40 * MiB, 10), (99 * MiB, 10)])  # blocks 1 and 3 of 32 MiB
    convert_file(src, out, "vhdx", input_format="raw")
    raw = out.read_bytes()
    bat = struct.unpack("<4Q", raw[3 * MiB : 3 * MiB + 32])
    assert [e & 7 for e in bat] == [0, 6, 0, 6]
    assert [e >> 20 for e in bat if e] == [4, 36]  # right after the 1 MiB BAT, 1 MiB aligned
    assert len(raw) == 4 * MiB + 2 * 32 * MiB


def test_empty_disk_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.raw").write_bytes(b"")
    with pytest.raises(UsageError, match="1 sector to 64 TiB"):  # qemu and Hyper-V cannot open one
        convert_file(tmp_path / "empty.raw", tmp_path / "out.vhdx", "vhdx", input_format="raw")


def test_block_size_option() -> None:
    assert vhdx.parse_block_size("64M") == 64 * MiB and vhdx.parse_block_size("1048576") == MiB
    for bad in ("3M", "512K", "1G", "lots"):
        with pytest.raises(Exception, match="block_size"):
            vhdx.parse_block_size(bad)


# ---------------------------------------------------------------------------------------------------
# Reading what other tools may write
# ---------------------------------------------------------------------------------------------------


def test_payload_states(tmp_path: Path) -> None:
    garbage = b"\xee" * MiB
    states = {1: vhdx.PAYLOAD_UNDEFINED, 2: vhdx.PAYLOAD_ZERO, 3: vhdx.PAYLOAD_UNMAPPED}
    out = read_image(tmp_path, build_vhdx(size=5 * MiB, blocks={0: garbage, 4: b"\x01" * MiB}, states=states)
                     + garbage)
    assert out == garbage + bytes(3 * MiB) + b"\x01" * MiB


@pytest.mark.parametrize("logical", [512, 4096])
def test_regions_anywhere_and_blocks_larger_than_the_disk(tmp_path: Path, logical: int) -> None:
    data = random.Random(1).randbytes(MiB + 4096)
    image = build_vhdx(size=MiB + 4096, block_size=64 * MiB, logical=logical, meta_at=7 * MiB, bat_at=5 * MiB,
                       blocks={0: data})
    assert read_image(tmp_path, image) == data
    if logical == 512:  # qemu opens only 512-byte logical sectors
        path = tmp_path / "built.vhdx"
        assert qemu_info(path)["virtual-size"] == MiB + 4096
        qemu_img("compare", "-f", "raw", "-F", "vhdx", tmp_path / "built.vhdx.raw", path)


def test_chunk_ratio_and_sector_bitmap_entries(tmp_path: Path) -> None:
    # 1 MiB blocks, 512-byte sectors: 4096 payload entries, then a sector bitmap entry.
    meta = vhdx.Metadata(MiB, False, 4097 * MiB, 512, 512, False)
    assert meta.chunk_ratio == 4096 and meta.bat_entries == 4098
    assert vhdx.bat_index(4096, meta.chunk_ratio) == 4097
    image = build_vhdx(size=4097 * MiB, blocks={4096: b"\x07" * MiB, 0: b"\x05" * MiB})
    image[3 * MiB + 8 * 4096 : 3 * MiB + 8 * 4097] = struct.pack("<Q", 6 | 1 << 20)  # bitmap entry: ignored
    path = tmp_path / "c.vhdx"
    path.write_bytes(image)
    convert_file(path, tmp_path / "c.raw", "raw")
    with open(tmp_path / "c.raw", "rb") as f:
        assert f.read(MiB) == b"\x05" * MiB
        f.seek(4096 * MiB)
        assert f.read() == b"\x07" * MiB


def test_equal_header_sequence_numbers_are_accepted(tmp_path: Path) -> None:
    assert read_image(tmp_path, build_vhdx(sequences=(5, 5), blocks={0: b"\x01" * MiB}))[:MiB] == b"\x01" * MiB


def test_current_header_has_the_greater_sequence_number(tmp_path: Path) -> None:
    image = build_vhdx(sequences=(9, 3), blocks={0: b"\x01" * MiB}, log=log_entry(1, [(3 * MiB, 0x1000)]),
                       log_guids=(LOG_GUID, bytes(16)))
    # header 1 (sequence 9) carries the log GUID, so its log is replayed: the BAT page is zeroed.
    assert not any(read_image(tmp_path, image))
    image[64 * 1024 : 64 * 1024 + 4] = b"xxxx"  # header 1 invalid: header 2 (no log) is current
    assert read_image(tmp_path, image)[:MiB] == b"\x01" * MiB


# ---------------------------------------------------------------------------------------------------
# Log replay
# ---------------------------------------------------------------------------------------------------


def bat_page(entries: dict[int, int]) -> bytes:
    page = bytearray(4096)
    for index, value in entries.items():
        struct.pack_into("<Q", page, 8 * index, value)
    return bytes(page)


def test_log_replay_changes_bat_and_data_not_the_source(tmp_path: Path) -> None:
    blocks = {0: b"\x01" * MiB, 1: b"\x02" * MiB}
    block0, block1 = struct.unpack_from("<2Q", build_vhdx(size=4 * MiB, blocks=blocks), 3 * MiB)
    data_page = b"\x42" * 4096
    # entry 7 moves block 1 to block 2 in the BAT; entry 8 writes a page of block 0 and zeroes another
    log = (log_entry(7, [(3 * MiB, bat_page({0: block0, 2: block1}))], tail=0)
           + log_entry(8, [((block0 >> 20) * MiB + 8192, data_page), ((block0 >> 20) * MiB, 4096)], tail=0))
    image = build_vhdx(size=4 * MiB, blocks=blocks, log=log, log_guids=(LOG_GUID, LOG_GUID))
    path = tmp_path / "dirty.vhdx"
    path.write_bytes(image)
    before = sha256_file(path)
    out = read_image(tmp_path, image, "dirty.vhdx")
    expected_block = bytes(4096) + b"\x01" * 4096 + data_page + b"\x01" * (MiB - 3 * 4096)
    assert out == expected_block + bytes(MiB) + b"\x02" * MiB + bytes(MiB)
    assert sha256_file(path) == before


def test_log_active_sequence_rules() -> None:
    log = bytearray(MiB)
    first = log_entry(1, [(3 * MiB, 4096)], tail=0)
    second = log_entry(2, [(4 * MiB, 4096)], tail=0)
    log[: len(first)] = first
    log[len(first) : len(first) + len(second)] = second
    assert [e.sequence for e in vhdx.active_sequence(bytes(log), LOG_GUID)] == [1, 2]
    assert vhdx.active_sequence(bytes(log), bytes(16)) == []  # entries of another log GUID
    torn = bytearray(log)
    torn[len(first) + 200] ^= 1  # the second entry fails its CRC: the sequence ends at the first
    assert [e.sequence for e in vhdx.active_sequence(bytes(torn), LOG_GUID)] == [1]
    # a newer, separate sequence elsewhere in the log wins, from the entry its head names as tail
    newer = log_entry(10, [(5 * MiB, 4096)], tail=8 * 4096)
    log[8 * 4096 : 8 * 4096 + len(newer)] = newer
    assert [e.sequence for e in vhdx.active_sequence(bytes(log), LOG_GUID)] == [10]
    # a head whose tail is not in its chain makes an incomplete sequence
    orphan = log_entry(20, [(5 * MiB, 4096)], tail=100 * 4096)
    log[16 * 4096 : 16 * 4096 + len(orphan)] = orphan
    assert [e.sequence for e in vhdx.active_sequence(bytes(log), LOG_GUID)] == [10]


def test_log_entry_wrapping_the_end_of_the_log(tmp_path: Path) -> None:
    entry = log_entry(3, [(3 * MiB, bat_page({0: 0}))], tail=MiB - 4096)
    log = bytearray(MiB)
    log[MiB - 4096 :] = entry[:4096]
    log[: len(entry) - 4096] = entry[4096:]
    image = build_vhdx(size=2 * MiB, blocks={0: b"\x01" * MiB}, log=bytes(log), log_guids=(LOG_GUID, LOG_GUID))
    assert not any(read_image(tmp_path, image))


def test_log_growing_the_file(tmp_path: Path) -> None:
    base = build_vhdx(size=2 * MiB)
    past = (len(base) // MiB + 1) * MiB
    log = log_entry(1, [(3 * MiB, bat_page({1: past | vhdx.PAYLOAD_FULLY_PRESENT})), (past, b"\x09" * 4096)],
                    last=past + MiB)
    out = read_image(tmp_path, build_vhdx(size=2 * MiB, log=log, log_guids=(LOG_GUID, LOG_GUID)))
    assert out == bytes(MiB) + b"\x09" * 4096 + bytes(MiB - 4096)


def test_log_refusals(tmp_path: Path) -> None:
    truncated = log_entry(1, [(3 * MiB, 4096)], flushed=1 << 40)
    refused(tmp_path, build_vhdx(log=truncated, log_guids=(LOG_GUID, LOG_GUID)), "vhdx.log_truncated")
    into_headers = log_entry(1, [(64 * 1024, 4096)])
    refused(tmp_path, build_vhdx(log=into_headers, log_guids=(LOG_GUID, LOG_GUID)), "vhdx.log_entry")
    # every sector starts an entry claiming the whole log: refused before (log size)^2 of CRC work
    claim = vhdx.LOG_ENTRY.pack(b"loge", 0, MiB, 0, 1, 0, 0, LOG_GUID, 0, 0).ljust(4096, b"\0")
    refused(tmp_path, build_vhdx(log=claim * 256, log_guids=(LOG_GUID, LOG_GUID)), "vhdx.log_entry")
    vhdx.check_log_work(claim * 256, bytes(16))  # entries of another log cost nothing


# ---------------------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("row", corpus_params("convert", formats=("VHDX",)))
def test_corpus_converts(row: dict[str, Any], corpus_cache: Path, tmp_path: Path) -> None:
    check_corpus_convert(row, corpus_cache, tmp_path)


@pytest.mark.parametrize("row", corpus_params("reject", formats=("VHDX",)))
def test_corpus_rejects(row: dict[str, Any], corpus_cache: Path, tmp_path: Path) -> None:
    check_corpus_reject(row, corpus_cache, tmp_path, "vhdx.")


# ---------------------------------------------------------------------------------------------------
# Hostile images
# ---------------------------------------------------------------------------------------------------


def test_bad_crcs(tmp_path: Path) -> None:
    image = build_vhdx()
    image[64 * 1024 + 100] ^= 1
    image[128 * 1024 + 100] ^= 1
    refused(tmp_path, image, "vhdx.header")
    image = build_vhdx()
    image[192 * 1024 + 100] ^= 1
    image[256 * 1024 + 100] ^= 1
    refused(tmp_path, image, "vhdx.region")
    image = build_vhdx(blocks={0: b"\x03" * MiB})
    image[192 * 1024 + 100] ^= 1  # only the first table is bad: the second is used
    assert read_image(tmp_path, image)[:MiB] == b"\x03" * MiB


@pytest.mark.parametrize("block_size", [3 * MiB, 512 * 1024, 1 << 30, 0])
def test_absurd_block_sizes(tmp_path: Path, block_size: int) -> None:
    image = build_vhdx()
    struct.pack_into("<I", image, 2 * MiB + 64 * 1024, block_size)
    refused(tmp_path, image, "vhdx.block_size")


def test_huge_disk_needs_a_huge_bat(tmp_path: Path) -> None:
    image = build_vhdx()
    struct.pack_into("<Q", image, 2 * MiB + 64 * 1024 + 8, 64 << 40)  # 64 TiB of 1 MiB blocks
    refused(tmp_path, image, "vhdx.bat_size")
    struct.pack_into("<Q", image, 2 * MiB + 64 * 1024 + 8, 1 << 62)
    refused(tmp_path, image, "vhdx.size")
    struct.pack_into("<Q", image, 2 * MiB + 64 * 1024 + 8, 1 << 40)  # BAT larger than its region
    refused(tmp_path, image, "vhdx.bat_size")


def test_block_offsets_past_the_end_and_overlapping(tmp_path: Path) -> None:
    image = build_vhdx(states={0: 1000 << 20 | vhdx.PAYLOAD_FULLY_PRESENT})
    assert "block 0" in refused(tmp_path, image, "vhdx.bat_entry").message
    image = build_vhdx(blocks={0: b"\x01"}, states={1: 4 << 20 | vhdx.PAYLOAD_FULLY_PRESENT})
    refused(tmp_path, image, "vhdx.bat_overlap")  # block 1 aliases block 0 (at 4 MiB)
    refused(tmp_path, build_vhdx(states={0: 4}), "vhdx.bat_entry")
    refused(tmp_path, build_vhdx(states={0: 0 << 20 | 6}), "vhdx.bat_entry")  # offset 0: the headers


def test_regions_out_of_bounds_or_overlapping(tmp_path: Path) -> None:
    refused(tmp_path, build_vhdx(meta_at=3 * MiB, bat_at=3 * MiB), "vhdx.region")
    refused(tmp_path, build_vhdx(bat_at=MiB), "vhdx.region")  # on top of the log
    image = build_vhdx()
    table = bytearray(image[192 * 1024 : 256 * 1024])
    vhdx.REGION_ENTRY.pack_into(table, 16, vhdx.BAT_GUID, 1 << 50, MiB, 1)
    image[192 * 1024 : 320 * 1024] = vhdx.with_crc(table, 4) * 2
    refused(tmp_path, image, "vhdx.region")


def test_differencing_and_partial_blocks(tmp_path: Path) -> None:
    error = refused(tmp_path, build_vhdx(flags=2), "vhdx.differencing")
    assert isinstance(error, UnsupportedImage)
    refused(tmp_path, build_vhdx(states={0: vhdx.PAYLOAD_PARTIALLY_PRESENT}), "vhdx.differencing")


def test_metadata_checks() -> None:
    meta = bytearray(vhdx.build_metadata(vhdx.Metadata(MiB, False, MiB, 512, 512, False), bytes(16)))
    assert vhdx.parse_metadata(bytes(meta)).block_size == MiB
    bad = bytearray(meta)
    struct.pack_into("<I", bad, 64 * 1024 + 8 + 8 + 16, 4000)  # logical sector size
    with pytest.raises(CorruptImage, match="sector"):
        vhdx.parse_metadata(bytes(bad))
    bad = bytearray(meta)
    struct.pack_into("<I", bad, 32 + 16, MiB)  # first item's offset: past the region
    with pytest.raises(CorruptImage, match="outside"):
        vhdx.parse_metadata(bytes(bad))
    bad = bytearray(meta)
    bad[32:48] = bytes(16)  # the file parameters item becomes an unknown required item
    with pytest.raises(UnsupportedImage):
        vhdx.parse_metadata(bytes(bad))
    assert vhdx.check_bat_entry(0, vhdx.PAYLOAD_ZERO | 99 << 20, MiB, 0) == 0
    with pytest.raises(CorruptImage):
        vhdx.check_bat_entry(0, 5, MiB, 10 * MiB)


writes = st.lists(st.tuples(st.integers(0, 31), st.integers(1, 4), st.booleans(), st.integers(1, 255)),
                  max_size=12)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=writes, reads=st.lists(st.tuples(st.integers(0, 40 * 4096), st.integers(0, 9000)), max_size=8))
def test_replayed_file_matches_writes_applied_in_order(
    tmp_path: Path, changes: list[tuple[int, int, bool, int]], reads: list[tuple[int, int]]
) -> None:
    """The overlay reads exactly like a copy of the file with every logged write applied in order."""
    path = tmp_path / "file"
    path.write_bytes(random.Random(0).randbytes(24 * 4096))  # the log may grow it to 40 pages
    model = bytearray(path.read_bytes()) + bytes(16 * 4096)
    entry_writes: list[tuple[int, int, bytes | None]] = []
    for page, count, is_data, fill in changes:
        offset = page * 4096
        if is_data:
            entry_writes.append((offset, 4096, bytes([fill]) * 4096))
            model[offset : offset + 4096] = bytes([fill]) * 4096
        else:
            entry_writes.append((offset, 4096 * count, None))
            model[offset : offset + 4096 * count] = bytes(4096 * count)
    entry = vhdx.LogEntry(0, 4096, 0, 1, 0, 0, tuple(entry_writes))

    async def check() -> None:
        source = await FileSource.open(str(path))
        try:
            view = vhdx.ReplayedFile(source, 40 * 4096)
            view.apply([entry])
            for offset, length in reads:
                length = min(length, 40 * 4096 - offset)
                assert await view.read(offset, length, "test") == bytes(model[offset : offset + length])
        finally:
            await source.close()

    asyncio.run(check())


def test_structures_against_windows_fragments() -> None:
    """Fragments that libvhdi's author extracted from Windows-made VHDX files parse as Windows meant."""
    fragments = CORPUS / "files" / "libyal-fragments"
    if not fragments.exists():
        pytest.skip("../shared/corpus is absent")
    header = vhdx.parse_header((fragments / "libvhdi_image_header.1").read_bytes())  # CRC-32C checked
    assert header == vhdx.Header(6, bytes(16), MiB, MiB)
    entry = vhdx.REGION_ENTRY.unpack((fragments / "libvhdi_region_table_entry.1").read_bytes())
    assert entry == (vhdx.BAT_GUID, 3 * MiB, MiB, 1)
    assert vhdx.METADATA_HEADER.unpack((fragments / "libvhdi_metadata_table_header.1").read_bytes()) == (
        vhdx.METADATA_SIGNATURE, 0, 5)
    item = vhdx.METADATA_ENTRY.unpack((fragments / "libvhdi_metadata_table_entry.1").read_bytes())
    assert item == (vhdx.FILE_PARAMETERS, 64 * 1024, 8, vhdx.META_IS_REQUIRED)
    assert (fragments / "libvhdi_file_identifier.1").read_bytes()[:8] == vhdx.FILE_ID_SIGNATURE
