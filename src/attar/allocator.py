"""glibc malloc settings for training: keep memory a step frees for the next step instead of returning it.

Why: a training step frees and re-allocates the same activation and gradient buffers every step. With glibc's
defaults, freed memory above the trim threshold (and every block above the mmap threshold) goes back to the system,
and the next step takes it again as fresh pages that the kernel must zero: on the Fashion-MNIST KD step that was
~27,000 minor page faults per step and a quarter of the step's CPU time (docs/benchmarks.md, vs torchdistill).
Raising both thresholds keeps those buffers in the process, where the next step reuses them; the high-water mark
of the process stays what the step needs. Linux with glibc only; elsewhere nothing changes.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value on 64-bit: bigger blocks still map and unmap
_TRIM_THRESHOLD = 2**30
_done = False


def keep_freed_memory() -> bool:
    """Set the thresholds once per process; True when glibc took them."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    _done = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _done
