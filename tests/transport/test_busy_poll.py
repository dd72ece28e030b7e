"""Busy polling (transport.busy_poll): the spin window's rule, the selector on a real loop,
and the node's use of it."""

from __future__ import annotations

import asyncio
import selectors
import socket
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lattica_ray import Node
from transport import busy_poll
from transport.busy_poll import BusyPollSelector, SpinWindow

US = 1000  # ns


# -- the window's rule (no I/O) -------------------------------------------------------------
def test_a_new_window_spins_the_limit_and_keeps_it_while_spins_pay() -> None:
    window = SpinWindow(200)
    assert window.window_ns == 200 * US
    for _ in range(10):
        window.record(80 * US, slept=False)
    assert window.window_ns == 200 * US
    assert (window.spun, window.slept) == (10, 0)


def test_long_idle_waits_shrink_the_window_to_nothing() -> None:
    window = SpinWindow(200)
    sizes = []
    for _ in range(6):
        window.record(5_000 * US, slept=True)  # 5 ms idle: spinning was wasted
        sizes.append(window.window_ns // US)
    assert sizes == [100, 50, 25, 12, 0, 0]


def test_short_sleeps_grow_the_window_back_to_the_limit() -> None:
    window = SpinWindow(200)
    for _ in range(5):
        window.record(5_000 * US, slept=True)
    assert window.window_ns == 0
    sizes = []
    for _ in range(6):
        window.record(150 * US, slept=True)  # a spin of 150 us would have caught it
        sizes.append(window.window_ns // US)
    assert sizes == [10, 20, 40, 80, 160, 200]


def test_a_zero_limit_never_spins_and_a_negative_one_is_refused() -> None:
    window = SpinWindow(0)
    for idle in (0, 10 * US, 10_000 * US):
        window.record(idle, slept=True)
        assert window.window_ns == 0
    with pytest.raises(ValueError, match=">= 0"):
        SpinWindow(-1)


@given(
    limit_us=st.integers(0, 2_000),
    waits=st.lists(st.tuples(st.integers(0, 10_000_000), st.booleans()), max_size=60),
)
def test_the_window_stays_between_zero_and_the_limit(
    limit_us: int, waits: list[tuple[int, bool]]
) -> None:
    window = SpinWindow(limit_us)
    for idle_ns, slept in waits:
        window.record(idle_ns, slept)
        assert 0 <= window.window_ns <= window.limit_ns
        assert window.window_ns == 0 or window.window_ns >= window.start_ns
    assert window.spun + window.slept == len(waits)


# -- the selector on a running loop ---------------------------------------------------------
class _EchoThread:
    """A UDP peer in another thread that answers every datagram at once (a fast server)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address = self.sock.getsockname()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            data, address = self.sock.recvfrom(2048)
            if data == b"stop":
                return
            self.sock.sendto(data, address)

    def stop(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"stop", self.address)
        self.thread.join(timeout=5)
        self.sock.close()


async def _ping_pong(rounds: int, echo: _EchoThread) -> int:
    """Round trips to the echo thread through the loop's reader; how many replies came."""
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
    peer = _EchoThread()
    yield peer
    peer.stop()


async def test_the_spin_catches_replies_that_come_within_the_window(echo: _EchoThread) -> None:
    loop = asyncio.get_running_loop()
    # A generous limit: the echo thread answers within microseconds, and within 20 ms
    # even on a loaded machine.
    assert busy_poll.install(loop, limit_us=20_000)
    try:
        window = busy_poll.window_of(loop)
        assert window is not None
        assert await _ping_pong(300, echo) == 300
        # (some waits may still sleep: a reply can come before the loop waits at all)
        assert window.spun >= 150, (window.spun, window.slept)
    finally:
        busy_poll.uninstall(loop)


async def test_timers_fire_on_time_while_the_loop_spins(echo: _EchoThread) -> None:
    loop = asyncio.get_running_loop()
    assert busy_poll.install(loop, limit_us=50_000)  # longer than the timer below
    try:
        fired = loop.create_future()
        started = loop.time()
        loop.call_later(0.005, lambda: fired.set_result(loop.time()))
        at = await asyncio.wait_for(fired, timeout=5)
        assert 0.005 <= at - started < 1.0
        assert await _ping_pong(20, echo) == 20  # and I/O still comes through after it
    finally:
        busy_poll.uninstall(loop)


async def test_an_idle_loop_stops_spinning() -> None:
    loop = asyncio.get_running_loop()
    assert busy_poll.install(loop, limit_us=200)
    try:
        window = busy_poll.window_of(loop)
        assert window is not None and window.window_ns == 200 * US
        for _ in range(8):  # eight idle waits of 20 ms each: 200 -> 100 -> ... -> 0 us
            await asyncio.sleep(0.02)
        assert window.window_ns == 0
        assert window.slept >= 5
    finally:
        busy_poll.uninstall(loop)


async def test_nodes_on_one_loop_share_the_spin_and_the_last_gives_the_selector_back() -> None:
    loop = asyncio.get_running_loop()
    original = loop._selector  # type: ignore[attr-defined]
    assert not isinstance(original, BusyPollSelector)
    assert busy_poll.install(loop, 100)
    wrapper = loop._selector  # type: ignore[attr-defined]
    assert isinstance(wrapper, BusyPollSelector) and wrapper.inner is original
    assert busy_poll.install(loop, 300)  # the longer limit wins
    assert loop._selector is wrapper and wrapper.window.limit_ns == 300 * US  # type: ignore[attr-defined]
    busy_poll.uninstall(loop)
    assert loop._selector is wrapper  # type: ignore[attr-defined]
    busy_poll.uninstall(loop)
    assert loop._selector is original  # type: ignore[attr-defined]
    assert busy_poll.window_of(loop) is None
    busy_poll.uninstall(loop)  # once more: nothing to give back, no error
    assert loop._selector is original  # type: ignore[attr-defined]


async def test_a_zero_limit_installs_nothing() -> None:
    loop = asyncio.get_running_loop()
    original = loop._selector  # type: ignore[attr-defined]
    assert not busy_poll.install(loop, 0)
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
    async with Node(listen=["/ip4/127.0.0.1/udp/0/quic-v1"]) as node:
        window = busy_poll.window_of(loop)
        assert window is not None and window.limit_ns == node.busy_poll_us * US > 0
    assert loop._selector is original  # type: ignore[attr-defined]


async def test_a_node_with_busy_polling_off_leaves_the_loop_alone() -> None:
    loop = asyncio.get_running_loop()
    async with Node(listen=["/ip4/127.0.0.1/udp/0/quic-v1"], busy_poll_us=0):
        assert busy_poll.window_of(loop) is None
    with pytest.raises(ValueError, match="busy_poll_us"):
        Node(busy_poll_us=-5)


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
