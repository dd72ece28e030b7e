"""Busy polling: the event loop spins briefly on its selector before it sleeps.

Waking a sleeping thread is the largest single cost of a small call on a fast path: the kernel
must switch it in, and on a virtual machine an idle vCPU halts and is woken through the
hypervisor. Measured on loopback (`benchmarks/rpc.py`), the two wake-ups of a 100 B call (the
server's for the request, the caller's for the reply) took ~70 of its ~170 us. A loop that
polls its selector without blocking for a little while before it sleeps catches a packet that
is due within that while, with no wake-up at all; the kernel's `busy_poll` does the same for
NIC queues, and so do low-latency stacks (Seastar, DPDK, Aeron's busy-spin idle strategy).

Spinning costs CPU, so the window adapts the way the guest kernel's haltpoll governor does
(`SpinWindow`, no I/O): it grows while the loop's next event comes soon after it went idle (a
longer spin would have caught it), and shrinks while idle gaps are long. A node that is idle,
or serves calls further apart than the limit, does not spin; one in a quick exchange does.
Each spin step yields the CPU (`sched_yield`) so that a runnable thread on the same core goes
first.

Only loops that keep a `selectors` selector (asyncio's default loops on Unix) can spin; uvloop
and the proactor loop run as they are.
"""

from __future__ import annotations

import asyncio
import logging
import os
import selectors
import time
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_LIMIT_US = 200  # the longest spin: a round trip on loopback or a LAN, not a WAN's
LIMIT_VARIABLE = "LATTICA_RAY_BUSY_POLL_US"  # the default, for processes configured by others
GROW_START_US = 10  # the first window once an idle gap shows a spin would have paid
GROW = 2
SHRINK = 2


def default_limit_us() -> float:
    """`$LATTICA_RAY_BUSY_POLL_US` if set (0 turns spinning off), else `DEFAULT_LIMIT_US`."""
    value = os.environ.get(LIMIT_VARIABLE, "").strip()
    if not value:
        return DEFAULT_LIMIT_US
    try:
        limit = float(value)
    except ValueError:
        raise ValueError(
            f"${LIMIT_VARIABLE} must be microseconds (a number), got {value!r}"
        ) from None
    if not limit >= 0:
        raise ValueError(
            f"${LIMIT_VARIABLE} must be >= 0 (0 turns busy polling off), got {value!r}"
        )
    return limit


class SpinWindow:
    """How long the loop spins before it sleeps: the haltpoll rule, in nanoseconds.

    After each wait the loop reports how long it was idle until its next event (spin
    included) and whether it had to sleep. Not slept (the spin found the event, or the wait
    was shorter than the window): the window stays. Slept, and the event came within the
    limit: a longer spin would have caught it, so the window grows (x2, from
    `GROW_START_US`). Slept longer than the limit: it shrinks (/2, to 0 below the start
    value), so a loop that waits long does not spin at all.
    """

    def __init__(self, limit_us: float = DEFAULT_LIMIT_US) -> None:
        if limit_us < 0:
            raise ValueError(f"busy-poll limit must be >= 0 us, got {limit_us}")
        self.limit_ns = int(limit_us * 1000)
        self.start_ns = min(self.limit_ns, GROW_START_US * 1000)
        self.window_ns = self.limit_ns  # start spinning: a new node is usually about to talk
        self.spun = 0  # waits that ended while spinning (no sleep)
        self.slept = 0  # waits that slept

    def record(self, idle_ns: int, slept: bool) -> None:
        """The loop waited `idle_ns` for its next event (or timer); `slept` if it had to."""
        if not slept:
            self.spun += 1
            return
        self.slept += 1
        if idle_ns <= self.limit_ns:
            if self.window_ns < self.limit_ns:
                self.window_ns = min(self.limit_ns, max(self.window_ns * GROW, self.start_ns))
        elif self.window_ns:
            self.window_ns //= SHRINK
            if self.window_ns < self.start_ns:
                self.window_ns = 0


class BusyPollSelector(selectors.BaseSelector):
    """A selector that spins on `inner` for up to `window.window_ns` before a blocking wait.

    Everything but `select` goes to `inner` unchanged: the loop keeps its registrations.
    """

    def __init__(self, inner: selectors.BaseSelector, window: SpinWindow) -> None:
        self.inner = inner
        self.window = window
        self.users = 0  # nodes that asked for it on this loop (see `install`)
        # epoll's own poll answers "anything ready?" without building key lists.
        epoll = None
        if isinstance(inner, selectors.EpollSelector):
            epoll = getattr(inner, "_selector", None)
        self._ready_now: Callable[[], Any] = (
            (lambda: epoll.poll(0, 1)) if epoll is not None else (lambda: inner.select(0))
        )

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout <= 0:  # callbacks are ready: no wait to spin in
            return self.inner.select(timeout)
        started = now = time.perf_counter_ns()
        spin_until = started + self.window.window_ns
        if timeout is not None:
            spin_until = min(spin_until, started + int(timeout * 1e9))
        ready_now = self._ready_now
        while now < spin_until:
            if ready_now():
                self.window.record(time.perf_counter_ns() - started, slept=False)
                return self.inner.select(0)
            os.sched_yield()  # a runnable thread on this core goes first
            now = time.perf_counter_ns()
        if timeout is not None and now > started:
            timeout = max(0.0, timeout - (now - started) / 1e9)
            if timeout == 0.0:  # spun until the loop's next timer: no sleep either
                self.window.record(now - started, slept=False)
                return self.inner.select(0)
        ready = self.inner.select(timeout)
        self.window.record(time.perf_counter_ns() - started, slept=True)
        return ready

    # -- the rest is the inner selector's ---------------------------------------------------
    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self.inner.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self.inner.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self.inner.modify(fileobj, events, data)

    def get_key(self, fileobj: Any) -> selectors.SelectorKey:
        return self.inner.get_key(fileobj)

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self.inner.get_map()

    def close(self) -> None:
        self.inner.close()


def install(loop: asyncio.AbstractEventLoop, limit_us: float = DEFAULT_LIMIT_US) -> bool:
    """Make `loop` spin before it sleeps (shared by every node on it; see `uninstall`).

    False, and nothing changed, if `limit_us` is 0 or the loop keeps no selector we can wrap.
    """
    if limit_us <= 0:
        return False
    current = getattr(loop, "_selector", None)  # asyncio's selector loops keep it here
    if isinstance(current, BusyPollSelector):
        current.users += 1
        if limit_us * 1000 > current.window.limit_ns:  # the most patient node sets the limit
            current.window = SpinWindow(limit_us)
        return True
    if not isinstance(current, selectors.BaseSelector):
        log.debug("busy polling unavailable on %s: no selector to wrap", type(loop).__name__)
        return False
    wrapper = BusyPollSelector(current, SpinWindow(limit_us))
    wrapper.users = 1
    loop._selector = wrapper  # type: ignore[attr-defined]
    return True


def uninstall(loop: asyncio.AbstractEventLoop) -> None:
    """One node no longer asks for busy polling; the last one gives the loop its selector back."""
    current = getattr(loop, "_selector", None)
    if not isinstance(current, BusyPollSelector):
        return
    current.users -= 1
    if current.users <= 0:
        loop._selector = current.inner  # type: ignore[attr-defined]


def window_of(loop: asyncio.AbstractEventLoop) -> SpinWindow | None:
    """The loop's spin window (its counters show how often spinning paid), if it spins."""
    current = getattr(loop, "_selector", None)
    return current.window if isinstance(current, BusyPollSelector) else None
