"""The kernels vmied runs: the Cython ones, or their Python twins under VMIED_NO_EXTENSIONS=1."""

from __future__ import annotations

import os

if os.environ.get("VMIED_NO_EXTENSIONS"):
    from ._fastio_py import is_zero, scan_grain_markers, zero_grains

    EXTENSION = False
else:
    from ._fastio import is_zero, scan_grain_markers, zero_grains

    EXTENSION = True

__all__ = ["EXTENSION", "is_zero", "scan_grain_markers", "zero_grains"]
