"""Every Cython kernel against its pure-Python twin, on the same inputs."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmied import _fastio_py as twin

fast = pytest.importorskip("vmied._fastio", reason="extension not built (VMIED_NO_EXTENSIONS build)")

buffers = st.one_of(
    st.binary(max_size=3000),
    st.builds(lambda n, pos, val: _poke(bytes(n), pos, val), st.integers(0, 5000), st.integers(0, 5000),
              st.integers(0, 255)),
)


def _poke(buf: bytes, position: int, value: int) -> bytes:
    if not buf:
        return buf
    position %= len(buf)
    return buf[:position] + bytes([value]) + buf[position + 1 :]


@given(buffers)
def test_is_zero_matches_twin(buf: bytes) -> None:
    assert fast.is_zero(buf) == twin.is_zero(buf) == (buf.count(0) == len(buf))


@given(buffers, st.sampled_from([1, 7, 16, 512, 4096]))
def test_zero_grains_matches_twin(buf: bytes, grain: int) -> None:
    expected = bytes(int(not any(buf[i : i + grain])) for i in range(0, len(buf), grain))
    assert fast.zero_grains(buf, grain) == twin.zero_grains(buf, grain) == expected


def test_zero_grains_rejects_bad_grain() -> None:
    for impl in (fast, twin):
        with pytest.raises(ValueError):
            impl.zero_grains(b"abc", 0)


def _stream(records: list[tuple[int, bytes]], tail: bytes) -> bytes:
    out = bytearray()
    for lba, data in records:
        out += struct.pack("<QI", lba, len(data)) + data
        out += bytes(-len(out) % 512)
    return bytes(out) + tail


@settings(max_examples=200)
@given(
    st.lists(st.tuples(st.integers(0, 2**40), st.binary(min_size=1, max_size=1200)), max_size=8),
    st.one_of(st.just(b""), st.binary(max_size=40), st.just(struct.pack("<QII", 4, 0, 1) + bytes(500))),
    st.integers(0, 200),
)
def test_scan_grain_markers_matches_twin(records: list[tuple[int, bytes]], tail: bytes, cut: int) -> None:
    buf = _stream(records, tail)
    buf = buf[: max(0, len(buf) - cut)]  # windows end anywhere, even inside a marker
    assert _scan(fast, buf, 1 << 20) == _scan(twin, buf, 1 << 20)


def _scan(impl: object, buf: bytes, max_data: int) -> object:
    try:
        return impl.scan_grain_markers(buf, max_data)  # type: ignore[attr-defined]
    except ValueError:
        return "refused"


@given(st.binary(min_size=12, max_size=600))
def test_scan_grain_markers_hostile_bytes(buf: bytes) -> None:
    assert _scan(fast, buf, 4096) == _scan(twin, buf, 4096)


def test_scan_grain_markers_refuses_oversized_grain() -> None:
    buf = struct.pack("<QI", 0, 10_000) + bytes(10_000)
    for impl in (fast, twin):
        with pytest.raises(ValueError):
            impl.scan_grain_markers(buf, 4096)


def test_scan_stops_at_metadata_marker() -> None:
    buf = _stream([(0, b"x" * 100), (128, b"y" * 600)], struct.pack("<QII", 4, 0, 1) + bytes(500))
    grains, consumed = twin.scan_grain_markers(buf, 4096)
    assert [(lba, size) for lba, _, size in grains] == [(0, 100), (128, 600)]
    assert consumed == 512 + 1024
    assert fast.scan_grain_markers(buf, 4096) == (grains, consumed)
