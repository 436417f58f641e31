# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Measured hot loops, with the GIL released. Each has a twin in ``_fastio_py.py``.

Deflate and inflate are not here: the isal (ISA-L) and deflate (libdeflate) packages already
release the GIL for the whole call and were measured fastest (bench/RESULTS.md), so ``codec.py``
batches grains into them from the worker threads.
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcmp

cdef enum:
    SECTOR = 512
    MARKER_SIZE = 12


cdef inline bint _all_zero(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    # A zero first 16 bytes, then the buffer compared with itself shifted by 16: memcmp is
    # vectorised by libc, so this runs at memory bandwidth without a hand-written SIMD loop.
    cdef Py_ssize_t head = 16 if n > 16 else n
    cdef Py_ssize_t i
    for i in range(head):
        if p[i]:
            return False
    if n <= 16:
        return True
    return memcmp(p, p + 16, n - 16) == 0


cdef inline uint64_t _le(const uint8_t* p, int width) noexcept nogil:
    # VMDK structures are little-endian on disk whatever the host is
    cdef uint64_t value = 0
    cdef int i
    for i in range(width - 1, -1, -1):
        value = (value << 8) | p[i]
    return value


def is_zero(const uint8_t[::1] buf not None) -> bool:
    cdef bint result
    with nogil:
        result = _all_zero(&buf[0], buf.shape[0]) if buf.shape[0] else True
    return result


def zero_grains(const uint8_t[::1] buf not None, Py_ssize_t grain_size) -> bytes:
    if grain_size <= 0:
        raise ValueError("grain_size must be positive")
    cdef Py_ssize_t n = buf.shape[0]
    cdef Py_ssize_t count = (n + grain_size - 1) // grain_size
    cdef bytearray flags = bytearray(count)
    cdef uint8_t[::1] out = flags
    cdef Py_ssize_t i, start, length
    with nogil:
        for i in range(count):
            start = i * grain_size
            length = grain_size if start + grain_size <= n else n - start
            out[i] = _all_zero(&buf[start], length)
    return bytes(flags)


def scan_grain_markers(const uint8_t[::1] buf not None, uint64_t max_data):
    cdef Py_ssize_t n = buf.shape[0]
    cdef Py_ssize_t position = 0
    cdef uint64_t lba
    cdef uint32_t size
    cdef Py_ssize_t end
    grains = []
    while position + MARKER_SIZE <= n:
        lba = _le(&buf[position], 8)
        size = <uint32_t>_le(&buf[position + 8], 4)
        if size == 0:
            break
        if size > max_data:
            raise ValueError(f"grain marker at {position} claims {size} bytes")
        end = position + MARKER_SIZE + size
        if end > n:
            break
        grains.append((lba, position + MARKER_SIZE, size))
        position = (end + SECTOR - 1) // SECTOR * SECTOR
    return grains, min(position, n)
