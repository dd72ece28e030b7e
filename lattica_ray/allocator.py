"""Keep freed tensor buffers from staying resident: glibc's mmap threshold, pinned.

glibc serves an allocation above its mmap threshold (128 KiB at start) with its own mapping,
returned to the OS on free. But each such free raises the threshold to that size (up to
32 MiB), so from then on the multi-MiB message buffers of a bulk transfer come from the heap,
where freed ones stay resident below live small objects. Measured with
`benchmarks/rpc.py` (1 GiB in 4 MiB chunks over QUIC): peak RSS growth of the receiver 16 MiB
= 4x the chunk window with glibc's default, 8-10 MiB = 2.0-2.6x with the threshold pinned at
1 MiB, at the same throughput. Setting the threshold turns the adjustment off.

A user who set `MALLOC_MMAP_THRESHOLD_` (or runs another allocator) is left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

DEFAULT_MMAP_THRESHOLD = 1024 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
_pinned: int | None = None


def pin_mmap_threshold(nbytes: int = DEFAULT_MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `nbytes` for this process; True if it is now in force.

    Idempotent; False (and nothing changed) off glibc or when the environment set it."""
    global _pinned
    if _pinned is not None:
        return _pinned == nbytes
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to pin
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, nbytes) != 1:
        log.debug("mallopt refused an mmap threshold of %d bytes", nbytes)
        return False
    _pinned = nbytes
    return True
