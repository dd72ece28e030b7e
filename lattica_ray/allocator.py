"""Keep freed multi-MiB transfer buffers from staying resident: glibc's thresholds, fixed.

glibc serves an allocation above its mmap threshold (128 KiB at start) with its own mapping,
returned to the OS on free. But each such free raises the threshold to that size (up to
32 MiB) and the heap's trim threshold to twice that, so after the first 4 MiB chunk of a bulk
transfer every later one comes from the heap, and up to twice the biggest chunk stays resident
once freed. Fixing both thresholds ends that: buffers from 2 MiB up get their own mapping
(NumPy asks for huge pages from 4 MiB, so mapping them is cheap), and the heap keeps up to
8 MiB free for the 1 MiB read buffers to reuse. (Fixing only the mmap threshold is a trap: the
trim threshold then stays at 128 KiB, every freed read buffer goes back to the OS and the next
one faults its pages in again: making a 1 MiB bytes fell from ~20 to ~1 GB/s.)

Measured with the memory section of `benchmarks/rpc.py` (1 GiB in 4 MiB chunks over QUIC, the
peers started with these values in the environment): peak RSS growth 1.9-2.6x the chunk
window, against up to 4.1x with glibc's defaults, at the same throughput.

Off by default (`Node(tune_malloc=True)` turns it on): every NumPy temporary from 2 MiB up then
gets a fresh mapping, and array maths in the process runs 2-10x slower (`a*b+a` on 2-16 MiB
arrays, review of 0ba03a1); since received bodies come from `lattica_ray.rpc.buffers`, the
default allocator keeps the 1 GiB transfer at 2.2-2.4x the chunk window anyway (1.7-1.8x
tuned). For processes that move data and compute little (relays, a dedicated LatticaActor).

A user who set either threshold in the environment (MALLOC_*_ or GLIBC_TUNABLES), or runs
another allocator, is left alone. (One set with mallopt at run time cannot be seen: it is
overridden.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 2 * 1024 * 1024
TRIM_THRESHOLD = 8 * 1024 * 1024
_M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")  # GLIBC_TUNABLES
_fixed: bool | None = None


def fix_malloc_thresholds() -> bool:
    """Fix glibc's mmap and trim thresholds for this process; True if they are now in force.

    Idempotent; False (and nothing changed) off glibc or when the environment set either."""
    global _fixed
    if _fixed is not None:
        return _fixed
    _fixed = False
    if any(name in os.environ for name in _ENVIRONMENT):
        return False
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(tunable in tunables for tunable in _TUNABLES):  # the newer way to set them
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to fix
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # The trim threshold first: with only the mmap threshold fixed, it would stay at 128 KiB.
    if mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        log.debug("mallopt refused a trim threshold of %d bytes", TRIM_THRESHOLD)
        return False
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        log.debug("mallopt refused an mmap threshold of %d bytes", MMAP_THRESHOLD)
        return False
    _fixed = True
    return True
