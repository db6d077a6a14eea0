"""Freed block arrays go back to the operating system, so peak RSS follows the blocks in flight.

glibc serves allocations above its mmap threshold (128 KiB at start) with
``mmap`` and returns them to the system on ``free``. But each time such a
block is freed, glibc raises the threshold to its size (up to 32 MiB), and
from then on arrays of that size come from the per-thread heaps, which keep
freed memory. With block-sized arrays allocated and freed by a dozen
threads, resident memory then grows with the number of blocks a run has
seen rather than with those it holds: storing ``segment``'s result for an
8192² scene peaked 262 MiB above a 2048² one, and 122 MiB above it with
a fixed threshold (the blocks in flight held 106 MiB).

:func:`fixed_mmap_threshold` fixes the threshold (which also turns the
raising off), once per process, on glibc only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
THRESHOLD = 1 << 20  # arrays of 1 MiB and more: mmap'ed, returned on free

_done: bool | None = None


def fixed_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at 1 MiB for this process; False where that is not possible."""
    global _done
    if _done is None:
        _done = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _done = bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD))
            except (OSError, AttributeError):  # musl and other libcs have no mallopt
                _done = False
    return _done
