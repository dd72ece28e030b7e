"""Large receive buffers, recycled: a big message lands in memory that is already mapped.

A fresh multi-MiB buffer costs a page fault for every page the message fills. On virtual
machines that hand freed memory back to the host (virtio-balloon free page reporting, as on
the machines here, about 2 s after a free) each of those faults goes to the host too: filling
a fresh 64 MiB buffer ran at ~0.45 GB/s against ~11 GB/s for one already mapped, 140 ms: as
long as the whole 64 MiB transfer. So bodies from `min_size` up come from this pool, and come
back to it when the last tensor decoded from them (they are views over the body) is gone.

Bounded: at most `max_bytes` of free buffers are kept (the least recently returned go first),
and buffers unused for `idle_seconds` are dropped at the next take or return. A buffer is
handed out only for a message of at least half its size.
"""

from __future__ import annotations

import ctypes
import threading
import time
import weakref
from collections import deque

import numpy as np

MIB = 1024 * 1024


class BufferPool:
    """Free receive buffers by size; `take` returns a writable byte view of exactly `length`."""

    def __init__(
        self, max_bytes: int = 256 * MIB, min_size: int = MIB, idle_seconds: float = 60.0
    ) -> None:
        self.max_bytes = max_bytes
        self.min_size = min_size
        self.idle_seconds = idle_seconds
        self._free: list[tuple[float, np.ndarray]] = []  # (returned at, buffer), oldest first
        self._free_bytes = 0
        self._lock = threading.Lock()
        # Buffers come back from finalizers, in any thread, and also inside this pool's own
        # locked code (a cyclic collection can start at any allocation there): so a return is
        # queued here and filed by whoever gets the lock, never waiting for it (`_settle`).
        self._returned: deque[tuple[float, np.ndarray]] = deque()
        self.reused = 0  # takes served from the pool (for tests and figures)

    @property
    def free_bytes(self) -> int:
        return self._free_bytes

    def take(self, length: int) -> memoryview:
        array = None
        if length >= self.min_size:
            array = self._reuse(length)
            self._settle()  # what came back while the lock was held
        if array is None:
            # Uninitialised: the OS commits pages as the message fills them.
            array = np.empty(length, dtype=np.uint8)
        # The body's owner is a ctypes array over the buffer: NumPy links a view of an ndarray
        # straight to the array that owns the memory, past any view in between, so only an
        # owner of another type is still referenced by every tensor decoded from the body.
        owner = (ctypes.c_ubyte * length).from_buffer(array)
        if len(array) >= self.min_size and self.max_bytes > 0:
            weakref.finalize(owner, self._give_back, array)
        return memoryview(owner).cast("B")

    def _reuse(self, length: int) -> np.ndarray | None:
        with self._lock:
            self._file_returned()  # and drops idle buffers
            best = None
            for index, (_, array) in enumerate(self._free):
                size = len(array)
                if length <= size <= 2 * length and (best is None or size < best[1]):
                    best = (index, size)
            if best is None:
                return None
            _, array = self._free.pop(best[0])
            self._free_bytes -= len(array)
            self.reused += 1
            return array

    def _give_back(self, array: np.ndarray) -> None:
        if len(array) <= self.max_bytes:
            self._returned.append((time.monotonic(), array))  # atomic: no lock needed
            self._settle()

    def _settle(self) -> None:
        """File queued returns if the lock is free; whoever holds it settles after release."""
        while self._returned and self._lock.acquire(blocking=False):
            try:
                self._file_returned()
            finally:
                self._lock.release()

    def _file_returned(self) -> None:
        """Drop idle buffers, then move queued returns into the pool, oldest dropped past
        `max_bytes` (lock held)."""
        self._drop_idle(time.monotonic())
        while self._returned:
            returned_at, array = self._returned.popleft()
            size = len(array)
            while self._free and self._free_bytes + size > self.max_bytes:
                _, dropped = self._free.pop(0)
                self._free_bytes -= len(dropped)
            self._free.append((returned_at, array))
            self._free_bytes += size

    def _drop_idle(self, now: float) -> None:
        while self._free and now - self._free[0][0] > self.idle_seconds:
            _, dropped = self._free.pop(0)
            self._free_bytes -= len(dropped)

    def clear(self) -> None:
        with self._lock:
            self._returned.clear()
            self._free.clear()
            self._free_bytes = 0


receive_buffers = BufferPool()
