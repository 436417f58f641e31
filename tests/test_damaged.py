"""Damaged images of every input format: converted, or refused by name; never anything else.

Each format's image is made once from a small sparse disk (by qemu-img; the OVA by vmied) and then
damaged at random: bytes overwritten, a piece of the file repeated elsewhere, the file cut short. The
checksums of VHD footers and headers and of VHDX headers and region tables are made right again in
half of the examples, so that the damage reaches the tables behind them. A conversion must then
either succeed or raise an :class:`ImageError` and leave no partial output: no other exception, no
hang (a conversion gets 60 seconds), no large allocation.
"""

from __future__ import annotations

import functools
import random
import signal
import struct
import tempfile
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import convert_file, leftovers, qemu_img, random_layout, write_sparse_raw
from vmied.errors import ImageError
from vmied.formats.vhd import vhd_checksum
from vmied.formats.vhdx import with_crc

MiB = 1 << 20
SIZE = 2 * MiB

#: qemu-img convert arguments for each damaged image (None: made by vmied).
IMAGES: dict[str, list[str] | None] = {
    "stream.vmdk": ["-O", "vmdk", "-o", "subformat=streamOptimized"],
    "sparse.vmdk": ["-O", "vmdk", "-o", "subformat=monolithicSparse"],
    "dynamic.vhd": ["-O", "vpc", "-o", "subformat=dynamic"],
    "disk.vhdx": ["-O", "vhdx", "-o", "block_size=1M"],
    "compressed.qcow2": ["-O", "qcow2", "-c", "-o", "cluster_size=4k"],
    "disk.ova": None,
}

#: (offset, size) of each VHDX structure with a CRC-32C in its bytes 4-8: both headers, both region tables.
VHDX_CHECKED = ((64 * 1024, 4096), (128 * 1024, 4096), (192 * 1024, 65536), (256 * 1024, 65536))


@functools.cache
def intact(name: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        source, image = Path(tmp) / "src.raw", Path(tmp) / name
        write_sparse_raw(source, SIZE, random_layout(random.Random(3), SIZE, 12), seed=3)
        arguments = IMAGES[name]
        if arguments is None:
            convert_file(source, image, "ova", input_format="raw")
        else:
            qemu_img("convert", "-f", "raw", *arguments, source, image)
        return image.read_bytes()


#: (offset from the start or, negative, from the end; size; where its checksum is) of each checksummed
#: VHD structure: the footer copy, the footer, the dynamic header.
VHD_CHECKED = ((0, 512, 64), (-512, 512, 64), (512, 1024, 36))


def fix_checksums(name: str, image: bytearray) -> None:
    if name.endswith(".vhd") and len(image) >= 1536:
        for offset, size, checksum_at in VHD_CHECKED:
            at = offset % len(image)
            struct.pack_into(">I", image, at + checksum_at, vhd_checksum(image[at : at + size], checksum_at))
    if name.endswith(".vhdx"):
        for at, size in VHDX_CHECKED:
            if at + size <= len(image):
                image[at : at + size] = with_crc(image[at : at + size], 4)


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """A TimeoutError (not an ImageError: the test fails) if the block runs longer."""
    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def regions(name: str, image: bytes) -> list[tuple[int, int]]:
    """Where damage tells most: the start (headers, descriptors, first tables), the end (footers, grain
    directories), the whole file, and for VHDX each region its region table lists (BAT, metadata),
    and the first 64 bytes of each (its first entries)."""
    found = [(0, min(len(image), 64 * 1024)), (max(0, len(image) - 4096), len(image)), (0, len(image))]
    if name.endswith(".vhdx"):
        table = 192 * 1024
        (count,) = struct.unpack_from("<I", image, table + 8)
        for entry in range(count):
            offset, length = struct.unpack_from("<QI", image, table + 16 + 32 * entry + 16)
            found += [(offset, min(offset + 64, len(image))), (offset, min(offset + length, len(image)))]
    return found


#: Values that bounds checks get wrong: zero, one, powers of two and their neighbours, all ones.
EDGES = [0, 1, 4, 5, 7, 0x80, 0xFF, 0x200, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 1 << 40, (1 << 63) - 1, (1 << 64) - 1]
#: A patch: bytes, an edge value as a little- or big-endian 4- or 8-byte integer, or a copy (negative).
patch = (st.binary(min_size=1, max_size=8)
         | st.builds(lambda value, form: struct.pack(form, value & (1 << 8 * struct.calcsize(form)) - 1),
                     st.sampled_from(EDGES), st.sampled_from(["<I", ">I", "<Q", ">Q"]))
         | st.integers(1, 64).map(lambda n: -n))
damage = st.lists(st.tuples(st.integers(0, 15), st.integers(0, 1 << 22), patch), max_size=6)
#: The file cut short in one example of five.
cuts = st.integers(0, 4).flatmap(lambda k: st.none() if k else st.integers(1, 1 << 22))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patches=damage, cut=cuts, fixed=st.booleans())
@pytest.mark.parametrize("name", list(IMAGES))
def test_damaged_images_are_converted_or_refused_by_name(name: str, patches: list[tuple[int, int, bytes | int]],
                                                         cut: int | None, fixed: bool) -> None:
    """A patch is bytes written at an offset in one of the :func:`regions`, or (a negative length) that
    many bytes of the file copied there from another place; ``cut`` truncates the file."""
    damaged = bytearray(intact(name))
    hot = regions(name, damaged)
    for region, offset, patch in patches:
        first, end = hot[region % len(hot)]
        start = first + offset % (end - first)
        if isinstance(patch, int):
            origin = (offset * 7919) % len(damaged)
            patch = bytes(damaged[origin : origin - patch])
        damaged[start : start + len(patch)] = patch[: len(damaged) - start]
    if cut is not None:
        del damaged[max(1, cut % len(damaged)):]
    if fixed:
        fix_checksums(name, damaged)
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / name
        image.write_bytes(damaged)
        tracemalloc.start()
        try:
            with time_limit(60):
                convert_file(image, Path(tmp) / "out.raw", "raw")
        except ImageError:
            assert not list(leftovers(Path(tmp)))
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peak < 64 * MiB  # the tables of a 2 MiB disk, whatever the damage claims
