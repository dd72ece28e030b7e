"""Busy polling (transport.busy_poll): the spin window's rule, the selector on a real loop,
and the node's use of it.

Timing is never asserted tightly: where a test shows that the spin gives way to a timer, a
thread's wake-up or a signal, the window is 10 s, the bound 5 s and the spin never gives way to
other threads (`patient_spin`), so only a spin that ignores them fails, however loaded the
machine.
"""

from __future__ import annotations

import asyncio
import math
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lattica_ray import Node
from transport import busy_poll
from transport.busy_poll import BusyPollSelector, SpinWindow, Wait

US = 1000  # ns
LONG_US = 10_000_000  # a window no test may wait out: 10 s
LISTEN = ["/ip4/127.0.0.1/udp/0/quic-v1"]
GIL_LOSS_NS = int(sys.getswitchinterval() * 1e9)  # what a busy thread keeps the GIL for


# -- the window's rule (no I/O) -------------------------------------------------------------
def test_a_new_window_spins_the_limit_and_keeps_it_while_spins_catch() -> None:
    window = SpinWindow(200)
    assert window.window_ns == 200 * US
    for _ in range(10):
        window.record(80 * US, Wait.CAUGHT)
    assert window.window_ns == 200 * US
    assert (window.caught, window.woken, window.timers) == (10, 0, 0)


@pytest.mark.parametrize("ended", [Wait.WOKEN, Wait.TIMER])
def test_long_waits_shrink_the_window_to_nothing(ended: Wait) -> None:
    window = SpinWindow(200)
    sizes = []
    for _ in range(6):
        window.record(5_000 * US, ended)  # 5 ms idle: spinning was wasted
        sizes.append(window.window_ns // US)
    assert sizes == [100, 50, 25, 12, 0, 0]


def test_short_waits_in_a_row_grow_the_window_back_to_the_limit() -> None:
    window = SpinWindow(200)
    for _ in range(5):
        window.record(5_000 * US, Wait.WOKEN)
    assert window.window_ns == 0
    sizes = []
    for _ in range(8):
        window.record(150 * US, Wait.WOKEN)  # a spin of 150 us would have caught it
        sizes.append(window.window_ns // US)
    # the first short wait after a long one is no evidence yet
    assert sizes == [0, 10, 20, 40, 80, 160, 200, 200]


def test_a_lone_short_wait_between_long_ones_does_not_keep_the_loop_spinning() -> None:
    """Calls further apart than the limit: each reply comes soon, the next call does not."""
    window = SpinWindow(200)
    for _ in range(100):
        window.record(90 * US, Wait.WOKEN)  # the reply
        window.record(800 * US, Wait.WOKEN)  # the next call
    assert window.window_ns == 0  # haltpoll's rule (grow, halve, grow...) kept it at 100-200 us


def test_the_loops_own_timers_halve_the_window() -> None:
    window = SpinWindow(200)
    sizes = []
    for _ in range(6):
        window.record(100 * US, Wait.TIMER)  # spinning never brings a timer forward
        sizes.append(window.window_ns // US)
    assert sizes == [100, 50, 25, 12, 0, 0]


def test_a_spin_that_lost_the_gil_stops_spinning_for_a_while_and_longer_each_time() -> None:
    ms = 1000 * US
    window = SpinWindow(200)

    def grows_at(now_ns: int) -> bool:
        window.window_ns = 0
        window.record(50 * US, Wait.WOKEN, now_ns)
        window.record(50 * US, Wait.WOKEN, now_ns)
        return window.window_ns > 0

    window.contended(0, GIL_LOSS_NS)
    assert (window.window_ns, window.yields_lost) == (0, 1)
    assert not grows_at(9 * ms) and grows_at(10 * ms)  # 10 ms without spinning
    window.contended(20 * ms, GIL_LOSS_NS)
    assert not grows_at(39 * ms) and grows_at(40 * ms)  # then 20 ms
    for _ in range(20):
        window.contended(100 * ms, GIL_LOSS_NS)
    assert not grows_at(1099 * ms) and grows_at(1100 * ms)  # at most 1 s
    window.contended(20_000 * ms, GIL_LOSS_NS)  # 10 s after the last: from scratch
    assert not grows_at(20_009 * ms) and grows_at(20_010 * ms)


def test_a_spin_that_lost_the_cpu_briefly_halves_the_window() -> None:
    window = SpinWindow(200)
    window.contended(0, 300 * US)  # the core went to another process (the peer, often)
    assert (window.window_ns, window.yields_lost, window.quiet_until_ns) == (100 * US, 1, 0)


def test_a_lower_limit_shrinks_the_window_and_a_higher_one_does_not_grow_it() -> None:
    window = SpinWindow(200)
    window.set_limit(50)
    assert (window.window_ns, window.limit_ns) == (50 * US, 50 * US)
    window.set_limit(400)
    assert (window.window_ns, window.limit_ns) == (50 * US, 400 * US)
    window.set_limit(50)
    assert (window.window_ns, window.limit_ns) == (50 * US, 50 * US)


def test_a_zero_limit_never_spins_and_a_negative_one_is_refused() -> None:
    window = SpinWindow(0)
    for idle in (0, 10 * US, 10_000 * US):
        window.record(idle, Wait.WOKEN)
        window.record(idle, Wait.WOKEN)
        assert window.window_ns == 0
    for bad in (-1, math.nan):
        with pytest.raises(ValueError, match=">= 0"):
            SpinWindow(bad)


@given(
    limit_us=st.integers(0, 2_000),
    events=st.lists(
        st.one_of(
            st.tuples(st.integers(0, 10_000_000), st.sampled_from(list(Wait))),
            st.just("contended"),
            st.integers(0, 2_000),  # a new limit
        ),
        max_size=60,
    ),
)
def test_the_window_stays_between_zero_and_the_limit(limit_us: int, events: list) -> None:
    window = SpinWindow(limit_us)
    waits = 0
    for event in events:
        if event == "contended":
            window.contended(0, GIL_LOSS_NS)
        elif isinstance(event, int):
            window.set_limit(event)
        else:
            window.record(*event)
            waits += 1
        assert 0 <= window.window_ns <= window.limit_ns
        assert window.window_ns == 0 or window.window_ns >= window.start_ns
    assert window.caught + window.woken + window.timers == waits


# -- the selector on a running loop ---------------------------------------------------------
_ECHO = """
import socket, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
while True:
    data, address = sock.recvfrom(2048)
    if data == b"stop":
        break
    time.sleep(0.0002)  # the loop is surely waiting by then
    sock.sendto(data, address)
"""


class _EchoProcess:
    """A UDP peer in another process that answers every datagram after ~0.2 ms (a fast server;
    a thread of ours would hand the GIL back and forth with the loop instead)."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _ECHO], stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        self.address = ("127.0.0.1", int(self.process.stdout.readline()))

    def stop(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"stop", self.address)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        assert self.process.stdout is not None
        self.process.stdout.close()


async def _ping_pong(rounds: int, echo: _EchoProcess) -> int:
    """Round trips to the echo process through the loop's reader; how many replies came."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    replies: asyncio.Queue[bytes] = asyncio.Queue()
    loop.add_reader(sock.fileno(), lambda: replies.put_nowait(sock.recv(2048)))
    try:
        for index in range(rounds):
            sock.sendto(index.to_bytes(4, "big"), echo.address)
            reply = await asyncio.wait_for(replies.get(), timeout=5)
            assert reply == index.to_bytes(4, "big")
    finally:
        loop.remove_reader(sock.fileno())
        sock.close()
    return rounds


@pytest.fixture
def echo():
    peer = _EchoProcess()
    try:
        yield peer
    finally:
        peer.stop()


@pytest.fixture
def spinning_loop():
    """This test's loop with busy polling on at `LONG_US`; given back even if the test fails."""
    installed: list[asyncio.AbstractEventLoop] = []

    def install(limit_us: float = LONG_US) -> SpinWindow:
        loop = asyncio.get_running_loop()
        assert busy_poll.install(loop, limit_us)
        installed.append(loop)
        window = busy_poll.window_of(loop)
        assert window is not None
        return window

    yield install
    for loop in installed:
        busy_poll.uninstall(loop)


@pytest.fixture
def patient_spin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Spins that never give way: on a loaded machine the CPU goes to others often, and a spin
    would stop for a while (see test_a_spin_gives_way_to_a_thread_that_wants_the_gil)."""
    monkeypatch.setattr(busy_poll, "CONTENDED_NS", 10**12)


async def test_the_spin_catches_replies_that_come_within_the_window(
    echo: _EchoProcess, spinning_loop, patient_spin: None
) -> None:
    # A generous limit: the echo process answers within 1 s however loaded the machine.
    window = spinning_loop(1_000_000)
    assert await _ping_pong(300, echo) == 300
    # Every wait for a reply ended in the spin (some replies come before the loop waits at
    # all, when the loop is slow to come round: then there was no wait).
    assert window.caught >= 1 and window.woken == 0, (window.caught, window.woken)


def test_the_spin_works_in_asyncio_debug_mode(echo: _EchoProcess, patient_spin: None) -> None:
    async def main() -> SpinWindow:
        loop = asyncio.get_running_loop()
        assert loop.get_debug()
        assert busy_poll.install(loop, 1_000_000)
        try:
            window = busy_poll.window_of(loop)
            assert window is not None
            assert await _ping_pong(100, echo) == 100
            return window
        finally:
            busy_poll.uninstall(loop)

    window = asyncio.run(main(), debug=True)
    assert window.caught >= 1 and window.woken == 0, (window.caught, window.woken)


async def test_a_due_timer_ends_the_spin(spinning_loop, patient_spin: None) -> None:
    loop = asyncio.get_running_loop()
    window = spinning_loop()
    assert window.window_ns == LONG_US * US
    fired = loop.create_future()
    loop.call_later(0.01, fired.set_result, None)
    started = loop.time()
    await asyncio.wait_for(fired, timeout=60)
    assert 0.01 <= loop.time() - started < 5  # not the 10 s window


async def test_a_wake_up_from_another_thread_ends_the_spin(
    spinning_loop, patient_spin: None
) -> None:
    loop = asyncio.get_running_loop()
    spinning_loop()
    woken = loop.create_future()
    timer = threading.Timer(0.01, loop.call_soon_threadsafe, (woken.set_result, None))
    started = loop.time()
    timer.start()
    try:
        await asyncio.wait_for(woken, timeout=60)
    finally:
        timer.cancel()
    assert loop.time() - started < 5


async def test_a_signal_ends_the_spin(spinning_loop, patient_spin: None) -> None:
    loop = asyncio.get_running_loop()
    spinning_loop()
    received = loop.create_future()
    loop.add_signal_handler(signal.SIGUSR1, received.set_result, None)
    timer = threading.Timer(0.01, os.kill, (os.getpid(), signal.SIGUSR1))
    started = loop.time()
    timer.start()
    try:
        await asyncio.wait_for(received, timeout=60)
    finally:
        timer.cancel()
        loop.remove_signal_handler(signal.SIGUSR1)
    assert loop.time() - started < 5


async def test_a_spin_gives_way_to_a_thread_that_wants_the_gil(spinning_loop) -> None:
    window = spinning_loop()
    stop = threading.Event()
    done = []

    def burn() -> None:  # pure Python: it holds the GIL until made to let go
        while not stop.is_set():
            done.append(sum(range(1000)))

    thread = threading.Thread(target=burn)
    thread.start()
    try:
        for _ in range(20):  # (on a loaded machine a spin may give way to another process first)
            window.window_ns = window.limit_ns
            await asyncio.sleep(0.05)  # one wait: the spin would go on until this timer
            if window.quiet_until_ns:
                break
    finally:
        stop.set()
        thread.join()
    assert window.yields_lost >= 1
    assert window.quiet_until_ns > 0  # it lost the GIL for ~5 ms: no spinning for a while
    assert done


async def test_waiting_for_timers_stops_the_spin(spinning_loop) -> None:
    window = spinning_loop(200)
    for _ in range(10):
        await asyncio.sleep(0.0001)  # each wait ends on the loop's timer, within the limit
    assert window.window_ns == 0
    assert window.timers >= 5


async def test_an_idle_loop_stops_spinning(spinning_loop) -> None:
    window = spinning_loop(200)
    for _ in range(8):  # eight idle waits of 20 ms each: 200 -> 100 -> ... -> 0 us
        await asyncio.sleep(0.02)
    assert window.window_ns == 0
    assert window.timers >= 5


async def test_nodes_on_one_loop_share_the_spin_and_the_last_gives_the_selector_back() -> None:
    loop = asyncio.get_running_loop()
    original = loop._selector  # type: ignore[attr-defined]
    assert not isinstance(original, BusyPollSelector)
    try:
        assert busy_poll.install(loop, 100)
        wrapper = loop._selector  # type: ignore[attr-defined]
        assert isinstance(wrapper, BusyPollSelector) and wrapper.inner is original
        assert busy_poll.install(loop, 300)  # the longer limit applies
        assert loop._selector is wrapper  # type: ignore[attr-defined]
        assert wrapper.window.limit_ns == 300 * US
        busy_poll.uninstall(loop, 300)  # ... until its node leaves
        assert loop._selector is wrapper  # type: ignore[attr-defined]
        assert wrapper.window.limit_ns == 100 * US
        busy_poll.uninstall(loop, 100)
        assert loop._selector is original  # type: ignore[attr-defined]
        assert busy_poll.window_of(loop) is None
        busy_poll.uninstall(loop)  # once more: nothing to give back, no error
        assert loop._selector is original  # type: ignore[attr-defined]
    finally:
        while busy_poll.window_of(loop) is not None:
            busy_poll.uninstall(loop)
        loop._selector = original  # type: ignore[attr-defined]


class _OtherWrapper(BusyPollSelector):
    """Someone else's selector wrapper (a tracer, say), installed after ours."""

    def select(self, timeout: float | None = None) -> list:
        return self.inner.select(timeout)


async def test_a_selector_wrapped_after_ours_stays_and_ours_stops_spinning() -> None:
    loop = asyncio.get_running_loop()
    original = loop._selector  # type: ignore[attr-defined]
    try:
        assert busy_poll.install(loop, 100)
        ours = loop._selector  # type: ignore[attr-defined]
        theirs = _OtherWrapper(ours, SpinWindow(0))
        loop._selector = theirs  # type: ignore[attr-defined]
        busy_poll.uninstall(loop, 100)
        assert loop._selector is theirs  # type: ignore[attr-defined]  # not cut out
        assert busy_poll.window_of(loop) is None and ours.window.limit_ns == 0
        assert busy_poll.install(loop, 100)  # ours spins again: no second wrapper
        assert loop._selector is theirs and theirs.inner is ours  # type: ignore[attr-defined]
        assert ours.window.limit_ns == 100 * US
        await asyncio.sleep(0.001)  # the loop runs through both
        busy_poll.uninstall(loop, 100)
    finally:
        loop._selector = original  # type: ignore[attr-defined]


def test_a_loop_on_another_thread_gets_its_selector_back_from_here() -> None:
    """A node stopped from another thread than its loop's (as the Ray face's loop thread)."""
    loop = asyncio.new_event_loop()
    original = loop._selector  # type: ignore[attr-defined]
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    try:

        async def install() -> bool:
            return busy_poll.install(loop, LONG_US)

        assert asyncio.run_coroutine_threadsafe(install(), loop).result(timeout=30)
        busy_poll.uninstall(loop, LONG_US)  # while the loop spins on its thread
        assert loop._selector is original  # type: ignore[attr-defined]
        answer = asyncio.run_coroutine_threadsafe(asyncio.sleep(0.001, "on"), loop)
        assert answer.result(timeout=30) == "on"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


def test_closing_a_loop_closes_the_selector_under_the_spin() -> None:
    loop = asyncio.new_event_loop()
    try:
        epoll = loop._selector._selector  # type: ignore[attr-defined]
        assert busy_poll.install(loop, 200)
        loop.run_until_complete(asyncio.sleep(0.001))
    finally:
        loop.close()
    assert epoll.closed
    busy_poll.uninstall(loop)  # a node stopping late: nothing to give back, no error
    assert not busy_poll.install(loop, 200)  # nor to wrap


async def test_a_zero_limit_installs_nothing_and_a_bad_one_is_refused() -> None:
    loop = asyncio.get_running_loop()
    original = loop._selector  # type: ignore[attr-defined]
    assert not busy_poll.install(loop, 0)
    assert loop._selector is original  # type: ignore[attr-defined]
    for bad in (-1, math.nan):
        with pytest.raises(ValueError, match=">= 0"):
            busy_poll.install(loop, bad)
    assert loop._selector is original  # type: ignore[attr-defined]


def test_a_loop_without_a_selector_runs_as_it_is() -> None:
    uvloop = pytest.importorskip("uvloop", reason="uvloop is the loop without a selector here")
    loop = uvloop.new_event_loop()
    try:
        assert not busy_poll.install(loop, 200)
        assert busy_poll.window_of(loop) is None
    finally:
        loop.close()


def test_the_wrapper_forwards_registrations_to_the_inner_selector() -> None:
    inner = selectors.DefaultSelector()
    wrapper = BusyPollSelector(inner, SpinWindow(100))
    reader, writer = socket.socketpair()
    try:
        key = wrapper.register(reader, selectors.EVENT_READ, "data")
        assert inner.get_key(reader) == key == wrapper.get_key(reader)
        assert list(wrapper.get_map()) == list(inner.get_map())
        writer.send(b"x")
        ready = wrapper.select(timeout=5)
        assert [(k.fileobj, events) for k, events in ready] == [(reader, selectors.EVENT_READ)]
        wrapper.modify(reader, selectors.EVENT_READ, "other")
        assert inner.get_key(reader).data == "other"
        wrapper.unregister(reader)
        assert reader not in inner.get_map()
        assert wrapper.select(timeout=0) == []
    finally:
        wrapper.close()
        reader.close()
        writer.close()


# -- the node -----------------------------------------------------------------------------
async def test_a_node_spins_by_default_and_stops_when_it_stops() -> None:
    loop = asyncio.get_running_loop()
    original = loop._selector  # type: ignore[attr-defined]
    async with Node(listen=LISTEN) as node:
        window = busy_poll.window_of(loop)
        assert window is not None and window.limit_ns == node.busy_poll_us * US > 0
    assert loop._selector is original  # type: ignore[attr-defined]


async def test_the_node_that_asked_for_the_longest_spin_takes_it_along_when_it_stops() -> None:
    loop = asyncio.get_running_loop()
    async with Node(listen=LISTEN, busy_poll_us=50):
        async with Node(listen=LISTEN, busy_poll_us=300):
            window = busy_poll.window_of(loop)
            assert window is not None and window.limit_ns == 300 * US
        window = busy_poll.window_of(loop)
        assert window is not None and window.limit_ns == 50 * US
        assert window.window_ns <= 50 * US
    assert busy_poll.window_of(loop) is None


async def test_a_node_with_busy_polling_off_leaves_the_loop_alone() -> None:
    loop = asyncio.get_running_loop()
    async with Node(listen=LISTEN, busy_poll_us=0):
        assert busy_poll.window_of(loop) is None
    for bad in (-5, math.nan):
        with pytest.raises(ValueError, match="busy_poll_us"):
            Node(busy_poll_us=bad)


def test_the_default_limit_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(busy_poll.LIMIT_VARIABLE, raising=False)
    assert busy_poll.default_limit_us() == busy_poll.DEFAULT_LIMIT_US
    monkeypatch.setenv(busy_poll.LIMIT_VARIABLE, "0")
    assert busy_poll.default_limit_us() == 0
    assert Node().busy_poll_us == 0
    monkeypatch.setenv(busy_poll.LIMIT_VARIABLE, "75.5")
    assert Node().busy_poll_us == 75.5
    assert Node(busy_poll_us=10).busy_poll_us == 10  # the argument wins
    for bad in ("fast", "-3", "nan"):
        monkeypatch.setenv(busy_poll.LIMIT_VARIABLE, bad)
        with pytest.raises(ValueError, match=busy_poll.LIMIT_VARIABLE):
            busy_poll.default_limit_us()
