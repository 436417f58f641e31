"""Pure-Python twins of the kernels in ``_fastio.pyx``: the reference they are tested against.

``VMIED_NO_EXTENSIONS=1`` makes vmied run on these alone. Keep each function's behaviour
identical to its Cython counterpart, including the error cases.
"""

from __future__ import annotations

import struct

from .extents import Buffer

_MARKER = struct.Struct("<QI")  # VMDK stream marker: lba (u64), size (u32)
SECTOR = 512


def is_zero(buf: Buffer) -> bool:
    """True when every byte of ``buf`` is zero."""
    view = memoryview(buf).cast("B")
    return not view or (view[0] == 0 and view[:-1] == view[1:])


def zero_grains(buf: Buffer, grain_size: int) -> bytes:
    """One flag byte per ``grain_size`` slice of ``buf`` (the last may be short): 1 if all zero."""
    if grain_size <= 0:
        raise ValueError("grain_size must be positive")
    view = memoryview(buf).cast("B")
    return bytes(int(is_zero(view[start : start + grain_size])) for start in range(0, len(view), grain_size))


def scan_grain_markers(buf: Buffer, max_data: int) -> tuple[list[tuple[int, int, int]], int]:
    """Parse consecutive VMDK stream grain markers from the start of ``buf``.

    ``buf`` starts at a sector boundary. Returns ``(grains, consumed)``: ``grains`` holds
    ``(lba, data_offset, data_size)`` per complete grain marker, ``consumed`` the sector-aligned
    bytes they occupy. Scanning stops at a metadata marker (size 0), at a marker whose data is not
    wholly in ``buf``, or at the end. A size above ``max_data`` raises ValueError.
    """
    view = memoryview(buf).cast("B")
    grains: list[tuple[int, int, int]] = []
    position = 0
    while position + _MARKER.size <= len(view):
        lba, size = _MARKER.unpack_from(view, position)
        if size == 0:
            break
        if size > max_data:
            raise ValueError(f"grain marker at {position} claims {size} bytes")
        end = position + _MARKER.size + size
        if end > len(view):
            break
        grains.append((lba, position + _MARKER.size, size))
        position = (end + SECTOR - 1) // SECTOR * SECTOR
    return grains, min(position, len(view))
