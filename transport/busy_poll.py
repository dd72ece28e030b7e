"""Busy polling: the event loop spins briefly on its selector before it sleeps.

Waking a sleeping thread is the largest single cost of a small call on a fast path: the kernel
must switch it in, and on a virtual machine an idle vCPU halts and is woken through the
hypervisor. Measured on loopback (`benchmarks/rpc.py`), the two wake-ups of a 100 B call (the
server's for the request, the caller's for the reply) took ~70 of its ~170 us. A loop that
polls its selector without blocking for a little while before it sleeps catches a packet that
is due within that while, with no wake-up at all; the kernel's `busy_poll` does the same for
NIC queues, and so do low-latency stacks (Seastar, DPDK, Aeron's busy-spin idle strategy).

Spinning costs CPU, so the window adapts, after the guest kernel's haltpoll governor but
stingier (`SpinWindow`, no I/O): it grows while short idle gaps follow each other (a longer spin
would have caught the next event) and drops to 0 on a long one or while the loop only waits for
its own timers. A node that is idle, or serves calls further apart than the limit, does not
spin; one in a quick exchange does. Each spin step yields the CPU (`sched_yield`) so that a
runnable thread on the same core goes first, and a step that comes back late (the CPU or the
GIL went to another thread, which wants them) ends the spin.

Only loops that keep a `selectors` selector (asyncio's default loops on Unix) can spin; uvloop
and the proactor loop run as they are.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import selectors
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_LIMIT_US = 200  # the longest spin: a round trip on loopback or a LAN, not a WAN's
LIMIT_VARIABLE = "LATTICA_RAY_BUSY_POLL_US"  # the default, for processes configured by others
GROW_START_US = 10  # the first window once an idle gap shows a spin would have paid
GROW = 2
# A spin step (a poll and a yield) takes ~2 us; one that took this long lost the CPU to another
# runnable thread (or the GIL to one of ours): spinning on only delays them, and us.
CONTENDED_NS = 50_000
GIL_LOST_SHARE = 0.8  # a loss this share of the GIL's switch interval: a thread took the GIL
BACKOFF_MIN_NS = 10_000_000  # no spinning for this long after a spin gave way, doubling ...
BACKOFF_MAX_NS = 1_000_000_000  # ... up to this while spins keep giving way
BACKOFF_FORGET_NS = 10_000_000_000  # a spin that gives way after this long starts over


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


class Wait(enum.Enum):
    """How one wait of the loop ended."""

    CAUGHT = "caught"  # I/O came while the loop spun: no sleep, no wake-up
    WOKEN = "woken"  # the loop slept and I/O woke it
    TIMER = "timer"  # nothing came: the loop's own next timer ended the wait


class SpinWindow:
    """How long the loop spins before it sleeps: haltpoll's rule, in nanoseconds, made stingier.

    After each wait the loop reports how it ended (`Wait`) and how long it was idle (spin
    included); waits within the limit are short, the others long.

    - caught: the window stays.
    - woken after a short wait, the second short wait in a row: a longer spin would have caught
      it, so the window grows (x2, from `GROW_START_US`, up to the limit). A lone short wait
      between long ones is no evidence (haltpoll grows on it).
    - a long wait, or one the loop's own timer ended (a spin never brings a timer forward):
      the window halves (to 0 below the start value).
    - a spin that gave way to another thread (`contended`): see there.

    Against haltpoll's rule alone (`benchmarks/busy_poll.py`, 100 B calls on loopback, CPU per
    call on/off): the same p50 gain back to back (0.60x vs 0.63x), 1.1-1.5x the CPU at a call
    every 0.3 ms (haltpoll 1.5-2.3x) and 1.0-1.1x at one every 1 ms (1.1-1.6x, where spinning
    gains nothing), and no repeated 5 ms GIL stalls beside a busy Python thread.
    """

    def __init__(self, limit_us: float = DEFAULT_LIMIT_US) -> None:
        self.limit_ns = self.start_ns = self.window_ns = 0
        self.set_limit(limit_us)
        self.window_ns = self.limit_ns  # start spinning: a new node is usually about to talk
        self.short_waits = 0  # waits in a row that ended within the limit
        self.caught = 0  # waits that ended while spinning (no sleep)
        self.woken = 0  # waits that slept until I/O came
        self.timers = 0  # waits that ended on the loop's timer
        self.spin_ns = 0  # time spent spinning (CPU burnt, whether it paid or not)
        self.yields_lost = 0  # spins cut short because another thread took the CPU or GIL
        self.quiet_until_ns = 0  # no growth before (see `contended`)
        self._backoff_ns = 0
        self._contended_at: int | None = None

    def set_limit(self, limit_us: float) -> None:
        """Spin at most `limit_us` from now on (0: never); the window shrinks to fit."""
        if not limit_us >= 0:
            raise ValueError(f"busy-poll limit must be >= 0 us, got {limit_us}")
        self.limit_ns = int(limit_us * 1000)
        self.start_ns = min(self.limit_ns, GROW_START_US * 1000)
        self.window_ns = min(self.window_ns, self.limit_ns)
        if 0 < self.window_ns < self.start_ns:  # (a window under 1 us grew with the limit)
            self.window_ns = self.start_ns

    def _shrink(self) -> None:
        self.window_ns //= 2
        if self.window_ns < self.start_ns:
            self.window_ns = 0

    def contended(self, now_ns: int, lost_ns: int) -> None:
        """A spin step lost the CPU or the GIL for `lost_ns`: another thread wants them, so the
        spin stops (as the kernel's own busy poll stops on `need_resched()`).

        A loss of about the GIL's switch interval (`sys.getswitchinterval()`, 5 ms) is a busy
        Python thread of ours: it took the GIL the spin let go of, and the loop had to wait that
        long to get it back. Spinning beside one must stay rare, so the window then stays 0 for
        10 ms, twice as long after each such loss, up to 1 s, from scratch once 10 s passed
        without one. A shorter loss (the core went to another process for a while, often the
        peer of a loopback exchange) ends this spin and halves the window.
        """
        self.yields_lost += 1
        if lost_ns < sys.getswitchinterval() * 1e9 * GIL_LOST_SHARE:
            self._shrink()
            return
        self.window_ns = self.short_waits = 0
        if self._contended_at is None or now_ns - self._contended_at > BACKOFF_FORGET_NS:
            self._backoff_ns = 0
        self._backoff_ns = min(BACKOFF_MAX_NS, max(BACKOFF_MIN_NS, self._backoff_ns * 2))
        self._contended_at = now_ns
        self.quiet_until_ns = now_ns + self._backoff_ns

    def record(self, idle_ns: int, ended: Wait, now_ns: int = 0) -> None:
        """The loop waited `idle_ns` (spin included) and the wait ended as `ended`, at `now_ns`
        (`time.perf_counter_ns()`)."""
        if ended is Wait.CAUGHT:
            self.caught += 1
            self.short_waits += 1
            return
        if ended is Wait.TIMER:
            self.timers += 1
        else:
            self.woken += 1
        if idle_ns > self.limit_ns or ended is Wait.TIMER:
            if idle_ns > self.limit_ns:
                self.short_waits = 0
            self._shrink()
        else:
            quiet = now_ns < self.quiet_until_ns  # (see `contended`)
            if self.short_waits and not quiet and self.window_ns < self.limit_ns:
                self.window_ns = min(self.limit_ns, max(self.window_ns * GROW, self.start_ns))
            self.short_waits += 1


class BusyPollSelector(selectors.BaseSelector):
    """A selector that spins on `inner` for up to `window.window_ns` before a blocking wait.

    Everything but `select` goes to `inner` unchanged: the loop keeps its registrations.
    `limits` are the spin limits its users asked for (see `install`); the largest applies.
    """

    def __init__(self, inner: selectors.BaseSelector, window: SpinWindow) -> None:
        self.inner = inner
        self.window = window
        self.limits: list[float] = []
        # epoll's own poll answers "anything ready?" without building key lists.
        epoll = None
        if isinstance(inner, selectors.EpollSelector):
            epoll = getattr(inner, "_selector", None)
        self._ready_now: Callable[[], Any] = (
            (lambda: epoll.poll(0, 1)) if epoll is not None else (lambda: inner.select(0))
        )

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        window = self.window
        if not window.limit_ns or (timeout is not None and timeout <= 0):
            return self.inner.select(timeout)  # off, or callbacks are ready: nothing to spin for
        started = now = time.perf_counter_ns()
        spin_until = started + window.window_ns
        timer_at = None if timeout is None else started + int(timeout * 1e9)
        if timer_at is not None:
            spin_until = min(spin_until, timer_at)  # never past the loop's next timer
        ready_now, clock = self._ready_now, time.perf_counter_ns
        while now < spin_until:
            # Both calls let go of the GIL, and the yield of the CPU: when either comes back
            # late, another thread got it and wants it (if we caught I/O, only thanks to that).
            ready = ready_now()
            polled = clock()
            if polled - now > CONTENDED_NS:
                window.contended(polled, polled - now)
                now = polled
                break
            if ready:
                window.spin_ns += polled - started
                window.record(polled - started, Wait.CAUGHT, polled)
                return self.inner.select(0)
            os.sched_yield()  # a runnable thread on this core goes first
            now = clock()
            if now - polled > CONTENDED_NS:
                window.contended(now, now - polled)
                break
        window.spin_ns += now - started
        if timer_at is not None:
            timeout = max(0.0, (timer_at - now) / 1e9)
        ready = self.inner.select(timeout)
        if not ready:
            ended = Wait.TIMER
        else:
            ended = Wait.CAUGHT if timeout == 0.0 else Wait.WOKEN
        ended_at = clock()
        window.record(ended_at - started, ended, ended_at)
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


# Our selector of each loop, even when something else wrapped it after us (then it stays in
# place, spinning or not, for it cannot be cut out of their chain).
_spinners: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, BusyPollSelector] = (
    weakref.WeakKeyDictionary()
)
_lock = threading.Lock()  # nodes may start and stop on other threads than the loop's


def install(loop: asyncio.AbstractEventLoop, limit_us: float = DEFAULT_LIMIT_US) -> bool:
    """Make `loop` spin up to `limit_us` before it sleeps; every node on a loop calls this, and
    the largest limit asked for applies until its node calls `uninstall`.

    False, and nothing changed, if `limit_us` is 0 or the loop keeps no selector we can wrap.
    """
    if not limit_us >= 0:
        raise ValueError(f"busy-poll limit must be >= 0 us, got {limit_us}")
    if limit_us == 0 or loop.is_closed():
        return False
    with _lock:
        spinner = _spinners.get(loop)
        if spinner is None:
            current = getattr(loop, "_selector", None)  # asyncio's selector loops keep it here
            if not isinstance(current, selectors.BaseSelector):
                log.debug(
                    "busy polling unavailable on %s: no selector to wrap", type(loop).__name__
                )
                return False
            spinner = BusyPollSelector(current, SpinWindow(0))
            loop._selector = spinner  # type: ignore[attr-defined]
            _spinners[loop] = spinner
        if not spinner.limits:
            spinner.window = SpinWindow(limit_us)  # a fresh start, as a new node's
        spinner.limits.append(limit_us)
        spinner.window.set_limit(max(spinner.limits))
        return True


def uninstall(loop: asyncio.AbstractEventLoop, limit_us: float | None = None) -> None:
    """A node that installed `limit_us` (None: the largest still asked for) no longer spins;
    after the last one the loop gets its selector back."""
    with _lock:
        spinner = _spinners.get(loop)
        if spinner is None or not spinner.limits:
            return
        limits = spinner.limits
        limits.remove(limit_us if limit_us in limits else max(limits))
        spinner.window.set_limit(max(limits, default=0))
        if limits:
            return
        if getattr(loop, "_selector", None) is spinner:
            loop._selector = spinner.inner  # type: ignore[attr-defined]
            del _spinners[loop]
        elif not loop.is_closed():
            log.debug("busy polling off on %s; its selector stays wrapped by another", loop)


def window_of(loop: asyncio.AbstractEventLoop) -> SpinWindow | None:
    """The loop's spin window (its counters show how often spinning paid), if it spins."""
    spinner = _spinners.get(loop)
    return spinner.window if spinner is not None and spinner.limits else None
