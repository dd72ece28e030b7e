"""Path liveness over real TCP on loopback: a silent path is closed, but our own event loop
being late (a stall of the whole process) is never blamed on the path."""

from __future__ import annotations

import asyncio
import time

from tests.transport.conftest import wait_until
from transport.identity import KeyPair
from transport.liveness import LivenessConfig, LoopLag, in_use
from transport.multiaddr import Multiaddr
from transport.multistream import select_outbound
from transport.protocols import ping
from transport.stream import Stream
from transport.swarm import Swarm

FAST = LivenessConfig(active_interval=0.05, suspect_after=0.1, dead_after=0.3)
HOLD = "/test/hold/1"


async def _hold(stream: Stream) -> None:
    await stream.read_to_end()
    await stream.close()


async def _pair(config: LivenessConfig) -> tuple[Swarm, Swarm]:
    a, b = Swarm(KeyPair.generate(), liveness=config), Swarm(KeyPair.generate(), liveness=config)
    for swarm in (a, b):
        await swarm.listen(Multiaddr.parse("/ip4/127.0.0.1/tcp/0"))
        swarm.set_stream_handler(HOLD, _hold)
        swarm.set_stream_handler(ping.PROTOCOL, ping.serve_ping)  # (a Node serves it)
    a.add_peer_addrs(b.peer_id, b.addrs)
    await a.connect(b.peer_id)
    return a, b


async def test_loop_lag_counts_a_blocked_loop() -> None:
    lag = LoopLag(tick=0.02)
    lag.start()
    try:
        await asyncio.sleep(0.05)
        before = lag.total()
        time.sleep(0.4)  # noqa: ASYNC251  (the point: the whole loop blocked)
        assert lag.total() - before >= 0.35  # seen at once, before the ticker ran again
        await asyncio.sleep(0.05)
        assert lag.total() - before >= 0.35
    finally:
        await lag.stop()


async def test_our_own_stall_longer_than_dead_after_keeps_the_path() -> None:
    a, b = await _pair(FAST)
    stalls = []

    async def answer_after_a_stall(stream: Stream) -> None:
        """Answers pings; one of them only after the whole process (both ends: one event loop)
        stood still for longer than `dead_after`, with that ping in flight, and a moment more
        (as an answer from another process, stalled too, comes after ours resumed)."""
        while data := await stream.readexactly(ping.PAYLOAD_SIZE):
            if not stalls:
                stalls.append(time.monotonic())
                time.sleep(3 * FAST.dead_after)  # noqa: ASYNC251  (the point: a stalled loop)
                await asyncio.sleep(FAST.suspect_after / 2)
            await stream.write(data)

    try:
        b.set_stream_handler(ping.PROTOCOL, answer_after_a_stall)
        stream = await a.open_stream(b.peer_id, [HOLD])  # in use: pinged every 50 ms
        connection = a.connection_to(b.peer_id)
        assert connection is not None
        await wait_until(lambda: bool(stalls))
        await asyncio.sleep(4 * FAST.dead_after)  # pings answered again since
        assert not connection.is_closed
        assert not getattr(connection, "suspect", False)
        await stream.write(b"still here")
        await stream.close()
    finally:
        await a.close()
        await b.close()


async def test_a_path_that_stops_answering_is_closed() -> None:
    a, b = await _pair(FAST)
    try:
        await a.open_stream(b.peer_id, [HOLD])
        connection = a.connection_to(b.peer_id)
        assert connection is not None
        (remote,) = b.connections_to(a.peer_id)

        def pinged() -> list[Stream]:
            return [s for s in remote.open_streams() if s.protocol == ping.PROTOCOL]

        await wait_until(lambda: len(pinged()) == 2)  # a's pings to b, and b's own
        b.remove_stream_handler(ping.PROTOCOL)  # b stops answering: new ping streams refused,
        for open_stream in pinged():  # and what arrives on the open one is never read
            open_stream._feed_data = lambda data: None  # type: ignore[method-assign]
        await wait_until(lambda: connection.is_closed, timeout=5.0)
        assert "path dead" in connection.closed.result()
    finally:
        await a.close()
        await b.close()


async def test_keepalive_pings_alone_do_not_keep_a_connection_busy() -> None:
    a, b = await _pair(FAST)
    try:
        connection = a.connection_to(b.peer_id)
        assert connection is not None
        stream = await a.open_stream(b.peer_id, [HOLD])
        await stream.close()
        await wait_until(
            lambda: any(s.protocol == ping.PROTOCOL for s in connection.open_streams())
        )
        await wait_until(
            lambda: all(s.protocol == ping.PROTOCOL for s in connection.open_streams())
        )
        assert not in_use(connection)
        probe = await connection.open_stream()
        await select_outbound(probe, [HOLD])
        assert in_use(connection)
        await probe.close()
    finally:
        await a.close()
        await b.close()
