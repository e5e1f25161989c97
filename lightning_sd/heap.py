"""`retain_freed_memory`: keep freed CPU memory in the process's heap for the next step's tensors (glibc).

Why: a training step allocates and frees tensors of the same sizes every step (activations, the loss's
vocabulary-wide chunks, gradients). By default glibc serves every block above a threshold that adapts up to
32 MiB with a fresh memory mapping, and hands the heap's free top back to the OS once it exceeds a trim
threshold; either way the next step writes to fresh pages, and each page costs a fault and zeroing. With a
fixed mmap threshold of 256 MiB and a trim threshold of 2 GiB the same pages are reused step after step; the
peak does not grow (what is live at the peak is the same), but memory freed after the peak stays with the
process. Measurements: docs/performance.md ("Allocator settings").

Process-wide and one-way (glibc cannot return to its adaptive threshold); Linux with glibc only.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 << 20
TRIM_THRESHOLD = (2 << 30) - 1  # mallopt takes an int

__all__ = ["retain_freed_memory"]


def retain_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Set glibc's mmap threshold (blocks at least this large get their own mapping, returned to the OS when
    freed) and trim threshold (free heap top kept up to this size). Returns True when both were applied; False
    where there is no glibc `mallopt` (macOS, musl), or glibc refused a value."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)) == 1 and mallopt(M_TRIM_THRESHOLD, int(trim_threshold)) == 1
