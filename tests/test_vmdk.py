"""VMDK: every subformat qemu-img makes reads bit-exact; what vmied writes qemu reads back; refusals."""

from __future__ import annotations

import random
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmied.errors import CorruptImage, ImageError, UnsupportedImage
from vmied.formats import vmdk

from .helpers import (
    MiB,
    convert_file,
    corpus_file,
    corpus_params,
    leftovers,
    qemu_img,
    random_layout,
    sha256_file,
    write_sparse_raw,
)

QEMU_SUBFORMATS = ["monolithicSparse", "streamOptimized", "monolithicFlat", "twoGbMaxExtentSparse",
                   "twoGbMaxExtentFlat"]
layouts = st.one_of(
    st.just("empty"),
    st.just("full"),
    st.lists(st.tuples(st.integers(0, 6 * MiB), st.sampled_from([1, 512, 4096, 65536, 70000, 300000])),
             min_size=1, max_size=12),
)


def _make_raw(path: Path, size: int, layout: Any) -> None:
    if layout == "empty":
        write_sparse_raw(path, size, [])
    elif layout == "full":
        write_sparse_raw(path, size, [(0, size)])
    else:
        write_sparse_raw(path, size, [(o, min(n, size - o)) for o, n in layout if o < size])


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=layouts, size=st.sampled_from([6 * MiB, 6 * MiB + 512, 6 * MiB + 4096]))
def test_qemu_made_subformats_read_bit_exact(tmp_path: Path, layout: Any, size: int) -> None:
    src = tmp_path / "src.raw"
    _make_raw(src, size, layout)
    for subformat in QEMU_SUBFORMATS:
        image = tmp_path / f"{subformat}.vmdk"
        for stale in tmp_path.glob(f"{subformat}*"):
            stale.unlink()
        qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}", src, image)
        out = tmp_path / f"{subformat}.raw"
        result = convert_file(image, out, "raw")
        assert result.source.virtual_size == size
        assert out.read_bytes() == src.read_bytes(), subformat


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=layouts, size=st.sampled_from([6 * MiB, 6 * MiB + 512]))
def test_written_vmdk_passes_qemu_check_and_reads_back(tmp_path: Path, layout: Any, size: int) -> None:
    src = tmp_path / "src.raw"
    _make_raw(src, size, layout)
    for subformat in ("streamOptimized", "monolithicSparse"):
        out = tmp_path / f"{subformat}.vmdk"
        convert_file(src, out, "vmdk", input_format="raw", options={"subformat": subformat})
        qemu_img("check", out)
        assert "Images are identical" in qemu_img("compare", "-f", "raw", "-F", "vmdk", src, out)
        back = tmp_path / f"{subformat}.raw"
        convert_file(out, back, "raw")
        assert back.read_bytes() == src.read_bytes()


def test_multi_extent_descriptors(tmp_path: Path) -> None:
    """twoGbMaxExtent* with several extent files, data at both ends (sparse, so it stays fast)."""
    size = 2 * 1024 * MiB + 64 * MiB
    src = tmp_path / "src.raw"
    write_sparse_raw(src, size, [(0, 100_000), (2 * 1024 * MiB - 5000, 10_000), (size - 70_000, 70_000)])
    for subformat in ("twoGbMaxExtentSparse", "twoGbMaxExtentFlat"):
        image = tmp_path / f"{subformat}.vmdk"
        qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}", src, image)
        assert len(list(tmp_path.glob(f"{subformat}-*.vmdk"))) == 2
        out = tmp_path / f"{subformat}.raw"
        convert_file(image, out, "raw")
        assert sha256_file(out) == sha256_file(src)
        out.unlink()


def _descriptor(create_type: str, extents: str, extra: str = "") -> bytes:
    return (f'# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n{extra}'
            f'createType="{create_type}"\n\n# Extent description\n{extents}\n').encode()


def test_vmfs_thick_and_zero_extents(tmp_path: Path) -> None:
    data = random.Random(3).randbytes(2 * MiB)
    (tmp_path / "disk-flat.vmdk").write_bytes(bytes(4096) + data)
    (tmp_path / "disk.vmdk").write_bytes(_descriptor(
        "vmfs", f'RW {len(data) // 512} VMFS "disk-flat.vmdk" 8\nRW 2048 ZERO'))
    out = tmp_path / "out.raw"
    convert_file(tmp_path / "disk.vmdk", out, "raw")
    assert out.read_bytes() == data + bytes(MiB)


def test_descriptor_quirks_crlf_comments_cp1252_trailing_spaces(tmp_path: Path) -> None:
    data = random.Random(4).randbytes(MiB)
    (tmp_path / "d-flat.vmdk").write_bytes(data)
    text = ('# Disk DescriptorFile  \r\nversion=1   \r\nencoding="windows-1252"\r\nCID=fffffffe\r\n'
            '# a comment between keys\r\nparentCID=ffffffff  \r\ncreateType="monolithicFlat"\r\n\r\n'
            'RW 2048 FLAT "d-flat.vmdk" 0   \r\n\r\nddb.comment = "caf\xe9"\r\n')
    (tmp_path / "d.vmdk").write_bytes(text.encode("cp1252"))
    out = tmp_path / "out.raw"
    convert_file(tmp_path / "d.vmdk", out, "raw")
    assert out.read_bytes() == data


# --- hand-built streams: what qemu-img cannot make -------------------------------------------------


def _stream(grains: dict[int, bytes], capacity: int, grain_sectors: int = 128, *,
            tables: bool = True, footer: bool = True, extra_marker: bool = False,
            bad: dict[int, bytes] | None = None) -> bytes:
    """A stream-optimized VMDK built from the spec's structures, grains given by grain index."""
    descriptor = _descriptor("streamOptimized", f'RW {capacity // 512} SPARSE "x.vmdk"').ljust(1024, b"\0")
    overhead = 4
    header = vmdk.SparseHeader(3, vmdk.FLAG_NEWLINE_TEST | vmdk.FLAG_COMPRESSED | vmdk.FLAG_MARKERS,
                               capacity // 512, grain_sectors, 1, 2, 512, 0, vmdk.GD_AT_END, overhead, 0,
                               vmdk.NEWLINE_CHARS, 1)
    out = bytearray(header.pack() + descriptor)
    out += bytes(overhead * 512 - len(out))
    for index in sorted(grains):
        payload = (bad or {}).get(index, zlib.compress(grains[index]))
        out += vmdk.stream_grain_record(index * grain_sectors, payload)
        if extra_marker:
            out += vmdk.metadata_marker(1, 7) + bytes(512)  # a marker type the spec does not define
    if tables:
        out += vmdk.metadata_marker(4, vmdk.MARKER_GT) + bytes(2048)
    if footer:
        out += vmdk.metadata_marker(1, vmdk.MARKER_FOOTER) + header.pack()
    out += vmdk.metadata_marker(0, vmdk.MARKER_EOS)
    return bytes(out)


def _grains(grain_bytes: int, indexes: list[int]) -> dict[int, bytes]:
    rng = random.Random(sum(indexes))
    return {i: rng.randbytes(grain_bytes // 2) + bytes(grain_bytes // 2) for i in indexes}


def _expected(grains: dict[int, bytes], capacity: int, grain_bytes: int) -> bytes:
    disk = bytearray(capacity)
    for index, data in grains.items():
        disk[index * grain_bytes : (index + 1) * grain_bytes] = data[: capacity - index * grain_bytes]
    return bytes(disk)


@pytest.mark.parametrize("grain_sectors", [8, 16, 128, 256])
@pytest.mark.parametrize("shape", ["full", "no-tables-no-footer", "unknown-markers"])
def test_hand_built_streams(tmp_path: Path, grain_sectors: int, shape: str) -> None:
    grain_bytes = grain_sectors * 512
    capacity = grain_bytes * 40
    grains = _grains(grain_bytes, [0, 1, 2, 7, 20, 39])
    image = tmp_path / "s.vmdk"
    image.write_bytes(_stream(grains, capacity, grain_sectors, tables=shape == "full",
                              footer=shape == "full", extra_marker=shape == "unknown-markers"))
    out = tmp_path / "s.raw"
    convert_file(image, out, "raw")
    assert out.read_bytes() == _expected(grains, capacity, grain_bytes)


def test_grain_of_wrong_inflated_length_is_refused(tmp_path: Path) -> None:
    grains = _grains(65536, [0, 3])
    image = tmp_path / "bad.vmdk"
    image.write_bytes(_stream(grains, 65536 * 8, bad={3: zlib.compress(bytes(1000))}))
    with pytest.raises(CorruptImage, match="ClientError: Uncompressed data has invalid length"):
        convert_file(image, tmp_path / "out.raw", "raw")
    assert not (tmp_path / "out.raw").exists()
    assert not list(leftovers(tmp_path))


def test_grain_that_is_not_deflate_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "bad.vmdk"
    image.write_bytes(_stream(_grains(65536, [1]), 65536 * 4, bad={1: b"not deflate data at all"}))
    with pytest.raises(CorruptImage, match="not valid deflate"):
        convert_file(image, tmp_path / "out.raw", "raw")


def test_out_of_order_stream_is_refused(tmp_path: Path) -> None:
    data = bytearray(_stream(_grains(65536, [5]), 65536 * 8))
    grains = _grains(65536, [2])
    data[-512:-512] = vmdk.stream_grain_record(2 * 128, zlib.compress(grains[2]))
    image = tmp_path / "order.vmdk"
    image.write_bytes(bytes(data))
    with pytest.raises(CorruptImage, match="out of order"):
        convert_file(image, tmp_path / "out.raw", "raw")


def test_truncated_stream_is_refused(tmp_path: Path) -> None:
    data = _stream(_grains(65536, [0, 1]), 65536 * 4, tables=False, footer=False)
    image = tmp_path / "cut.vmdk"
    image.write_bytes(data[: 2048 + 700])
    with pytest.raises(CorruptImage):
        convert_file(image, tmp_path / "out.raw", "raw")


def _sparse_header(**changes: int) -> bytes:
    fields = dict(version=1, flags=3, capacity=2048, grain_size=128, descriptor_offset=0, descriptor_size=0,
                  gtes_per_gt=512, rgd_offset=1, gd_offset=2, overhead=128, unclean_shutdown=0,
                  newline_chars=vmdk.NEWLINE_CHARS, compress_algorithm=0)
    fields.update(changes)
    return vmdk.SparseHeader(**fields).pack()  # type: ignore[arg-type]


@pytest.mark.parametrize(("changes", "reason"), [
    ({"capacity": 1 << 60}, "vmdk.capacity"),
    ({"grain_size": 100}, "vmdk.grain-size"),
    ({"grain_size": 1 << 20}, "vmdk.grain-size"),
    ({"gtes_per_gt": 0}, "vmdk.gt-size"),
    ({"version": 9}, "vmdk.version"),
    ({"descriptor_offset": 1, "descriptor_size": 4096}, "vmdk.descriptor-size"),
    ({"descriptor_offset": 1000, "descriptor_size": 1}, "vmdk.descriptor-offset"),
    ({"gd_offset": 10**9}, "vmdk.gd-offset"),
    ({"capacity": 1 << 36, "gtes_per_gt": 1, "grain_size": 1}, "vmdk.gd-size"),
])
def test_hostile_sparse_headers_are_refused(tmp_path: Path, changes: dict[str, int], reason: str) -> None:
    image = tmp_path / "h.vmdk"
    image.write_bytes(_sparse_header(**changes) + bytes(128 * 512))
    with pytest.raises(ImageError) as caught:
        convert_file(image, tmp_path / "out.raw", "raw")
    assert caught.value.reason == reason


def test_grain_table_entry_past_the_end_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "h.vmdk"
    gd = struct.pack("<I", 3) + bytes(508)
    gt = struct.pack("<I", 10**6) + bytes(2044)
    image.write_bytes(_sparse_header(rgd_offset=0, gd_offset=2, flags=1) + bytes(512) + gd + gt + bytes(60000))
    with pytest.raises(CorruptImage, match="beyond the end"):
        convert_file(image, tmp_path / "out.raw", "raw")


@pytest.mark.parametrize(("text", "reason", "message"), [
    (_descriptor("monolithicSparse", 'RW 8 SPARSE "a.vmdk"').replace(b"parentCID=ffffffff", b"parentCID=1234abcd")
     + b'parentFileNameHint="base.vmdk"\n', "vmdk.delta", "base.vmdk"),
    (_descriptor("vmfsSparse", 'RW 8 VMFSSPARSE "a-delta.vmdk"'), "vmdk.create-type", "vmfsSparse"),
    (_descriptor("seSparse", 'RW 8 SESPARSE "a-sesparse.vmdk"'), "vmdk.create-type", "SEsparse"),
    (_descriptor("vmfsRawDeviceMap", 'RW 8 VMFSRDM "a-rdm.vmdk"'), "vmdk.create-type", "raw device"),
    (_descriptor("vmfs", 'RW 8 VMFSRDM "a-rdm.vmdk"'), "vmdk.extent-type", "raw device"),
    (_descriptor("monolithicFlat", 'RW 8 FLAT "../etc/passwd" 0'), "path.outside", "passwd"),
    (_descriptor("monolithicFlat", 'RW 8 FLAT "/etc/passwd" 0'), "path.outside", "passwd"),
    (_descriptor("monolithicFlat", 'RW 8 FLAT "sub/x.vmdk" 0'), "path.outside", "sub/x.vmdk"),
    (_descriptor("monolithicFlat", 'RW 99999 FLAT "small-flat.vmdk" 0'), "vmdk.extent-outside", "beyond"),
    (_descriptor("monolithicFlat", 'RW 8 FLAT "small-flat.vmdk" 999999'), "vmdk.extent-outside", "beyond"),
    (_descriptor("fancyNewType", 'RW 8 FLAT "small-flat.vmdk" 0'), "vmdk.create-type", "fancyNewType"),
    (b"# Disk DescriptorFile\n" + b"# padding\n" * 120_000, "vmdk.descriptor-size", "cap"),
])
def test_descriptor_refusals(tmp_path: Path, text: bytes, reason: str, message: str) -> None:
    (tmp_path / "small-flat.vmdk").write_bytes(bytes(8 * 512))
    (tmp_path / "d.vmdk").write_bytes(text)
    with pytest.raises(ImageError, match=message) as caught:
        convert_file(tmp_path / "d.vmdk", tmp_path / "out.raw", "raw")
    assert caught.value.reason == reason
    assert not (tmp_path / "out.raw").exists()


def test_declared_format_must_match_content(tmp_path: Path) -> None:
    src = tmp_path / "a.raw"
    write_sparse_raw(src, MiB, random_layout(random.Random(1), MiB, 3))
    qemu_img("convert", "-f", "raw", "-O", "vmdk", src, tmp_path / "a.vmdk")
    with pytest.raises(UnsupportedImage, match="declared qcow2 but its content is vmdk"):
        convert_file(tmp_path / "a.vmdk", tmp_path / "out.raw", "raw", input_format="qcow2")


# --- corpus ------------------------------------------------------------------------------------


@pytest.mark.parametrize("row", corpus_params("convert", formats=("VMDK", "RAW")))
def test_corpus_converts(row: dict[str, Any], tmp_path: Path, corpus_cache: Path) -> None:
    image = corpus_file(row, corpus_cache)
    out = tmp_path / "out.raw"
    convert_file(image, out, "raw", input_format="raw" if row["format"].startswith("raw") else None)
    assert out.stat().st_size == row["expected_raw_size"]
    assert sha256_file(out) == row["expected_raw_sha256"]


@pytest.mark.parametrize("row", [p for p in corpus_params("reject", "reject-unsupported")
                                 if p.values[0] is None or "vmdk" in p.values[0]["file"]
                                 or p.values[0]["category"] == "reject-unsupported"])
def test_corpus_refuses(row: dict[str, Any], tmp_path: Path, corpus_cache: Path) -> None:
    image = corpus_file(row, corpus_cache)
    with pytest.raises(ImageError) as caught:
        convert_file(image, tmp_path / "out.raw", "raw")
    assert caught.value.message
    if row["category"] == "reject-unsupported":
        assert "unsupported input format" in caught.value.message
    assert not list(leftovers(tmp_path))
