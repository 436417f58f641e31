"""Grain compression: zlib streams (RFC 1950) as VMDK stream grains and the snapshot store use.

Chosen by measurement on 2 cores (bench/RESULTS.md): libdeflate (the ``deflate`` package) inflates
about 3x faster than zlib, ISA-L (the ``isal`` package) deflates at level 1 about 10x faster than
zlib level 6 for about 10% more output. Both release the GIL for the whole call, so a batch of
grains handed to a worker thread keeps a core busy. Everything they write is plain zlib.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import deflate as _libdeflate
from isal import isal_zlib as _isal

from .errors import CorruptImage
from .extents import Buffer

_INFLATE_ERRORS = (zlib.error, ValueError, _libdeflate.DeflateError)
#: ISA-L level 1: the fastest level whose output stays within the size target.
DEFAULT_LEVEL = 1
#: What AWS reports for a grain that inflates to the wrong size.
BAD_LENGTH = "ClientError: Uncompressed data has invalid length"


def inflate(data: Buffer, expected: int) -> bytes | bytearray:
    """Inflate one zlib stream that must produce exactly ``expected`` bytes."""
    try:
        # libdeflate needs the output size and fails when the stream does not fill it exactly
        out: bytes | bytearray = _libdeflate.zlib_decompress(data, expected)
    except _INFLATE_ERRORS as exc:
        out = _inflate_diagnose(data, expected, exc)
    if len(out) != expected:
        raise CorruptImage(f"{BAD_LENGTH} (grain inflates to {len(out)} bytes, expected {expected})",
                           reason="grain.length")
    return out


def _inflate_diagnose(data: Buffer, expected: int, first: BaseException) -> bytes | bytearray:
    """Tell a grain of the wrong length from one that is not zlib data at all."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(bytes(data), expected + 1)
    except zlib.error as exc:
        raise CorruptImage(f"grain is not valid deflate data: {exc}", reason="grain.corrupt") from None
    if not inflater.eof and len(out) <= expected:
        raise CorruptImage(f"grain is not valid deflate data: {first}", reason="grain.corrupt")
    return out


def deflate(data: Buffer, level: int = DEFAULT_LEVEL) -> bytes:
    """Compress one grain as a zlib stream."""
    compressed: bytes = _isal.compress(data, level)
    return compressed


def inflate_grains(grains: Sequence[Buffer], grain_size: int, length: int) -> list[bytes | bytearray]:
    """Worker job: inflate the grains of a DEFLATED extent covering ``length`` bytes.

    Every grain must inflate to ``grain_size``, but the last grain of a disk whose size is not
    whole grains: writers disagree on whether it holds a whole grain or the remainder, so both are
    accepted and it is cut to the remainder.
    """
    last = length - grain_size * (len(grains) - 1)
    out = [inflate(grain, grain_size) for grain in grains[:-1]]
    if grains:
        if last == grain_size:
            out.append(inflate(grains[-1], grain_size))
        else:
            try:
                out.append(inflate(grains[-1], grain_size)[:last])
            except CorruptImage:
                out.append(inflate(grains[-1], last))
    return out


def inflate_extent(grains: Sequence[Buffer], grain_size: int, length: int) -> bytes:
    """Worker job: the grains of a DEFLATED extent inflated into one buffer (joined off the loop)."""
    return b"".join(inflate_grains(grains, grain_size, length))


def deflate_batch(grains: list[memoryview], level: int = DEFAULT_LEVEL) -> list[bytes]:
    return [deflate(grain, level) for grain in grains]
