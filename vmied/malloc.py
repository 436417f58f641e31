"""glibc allocator settings for a process that churns multi-megabyte buffers.

Every stage of a conversion allocates and frees buffers of 1–8 MiB (read windows, inflated
extents, upload parts). glibc serves those with mmap and gives them back with munmap, so each new
buffer costs one page fault per 4 KiB: on an 8 GiB disk that is a quarter of a million faults and
about a second of system time per conversion. A fixed mmap threshold above the largest buffer keeps
them in the heap for reuse; a trim threshold of the same order returns memory once a burst is
over; two arenas keep worker threads from each growing a heap of their own (measured in
bench/RESULTS.md: system time halves and peak RSS drops).

Only glibc has ``mallopt``; elsewhere (musl, macOS) this is a no-op.
"""

from __future__ import annotations

import ctypes

from .io.base import MiB

# mallopt parameters from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

#: Above the largest buffer a stage allocates (S3 parts default to 8 MiB, windows to 4 MiB).
MMAP_THRESHOLD = 32 * MiB
#: Free heap above this much is handed back to the kernel.
TRIM_THRESHOLD = 64 * MiB
ARENAS = 2


def tune() -> bool:
    """Apply the settings; False where the C library has no mallopt."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library already loaded (no library search)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_ARENA_MAX, ARENAS)))
