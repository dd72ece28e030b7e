"""The swarm's dialer policy over real QUIC and TCP on loopback: every path kept, each measured,
small streams on the lowest RTT, bulk on the highest throughput, and a dead path's streams fail
clearly while the others (and new ones) carry on."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from tests.transport.conftest import wait_until
from transport.errors import StreamReset
from transport.identity import KeyPair
from transport.multiaddr import Multiaddr
from transport.multistream import select_outbound
from transport.stream import Stream
from transport.swarm import Swarm

ECHO = "/test/echo/1"
LISTEN = ["/ip4/127.0.0.1/udp/0/quic-v1", "/ip4/127.0.0.1/tcp/0"]


async def _echo(stream: Stream) -> None:
    while chunk := await stream.read(65536):
        await stream.write(chunk)
    await stream.close()


async def _connected_swarms() -> tuple[Swarm, Swarm]:
    a, b = Swarm(KeyPair.generate()), Swarm(KeyPair.generate())
    for swarm in (a, b):
        for addr in LISTEN:
            await swarm.listen(Multiaddr.parse(addr))
        swarm.set_stream_handler(ECHO, _echo)
    a.add_peer_addrs(b.peer_id, b.addrs)
    await a.connect(b.peer_id)
    return a, b


async def _close(*swarms: Swarm | None) -> None:
    for swarm in swarms:
        if swarm is not None:
            await swarm.close()


@pytest.fixture
async def two_paths() -> AsyncIterator[tuple[Swarm, Swarm]]:
    """Swarms a and b, connected over QUIC and over TCP (a first bulk stream asked for the
    second path), both paths measured."""
    a = b = None
    try:
        a, b = await _connected_swarms()
        stream = await a.open_stream(b.peer_id, [ECHO], bulk=True)
        await stream.close()
        assert {c.transport for c in a.connections_to(b.peer_id)} == {"quic", "tcp"}
        yield a, b
    finally:
        await _close(a, b)


async def test_the_first_bulk_stream_opens_and_measures_the_other_transport() -> None:
    a = b = None
    try:
        a, b = await _connected_swarms()
        (first,) = a.connections_to(b.peer_id)  # one path: small calls need no more
        small = await a.open_stream(b.peer_id, [ECHO])
        await small.close()
        assert a.connections_to(b.peer_id) == [first] and a.path_stats == {}

        bulk = await a.open_stream(b.peer_id, [ECHO], bulk=True)
        await bulk.close()
        connections = a.connections_to(b.peer_id)
        assert {c.transport for c in connections} == {"quic", "tcp"}
        for connection in connections:
            stats = a.path_stats[connection]
            assert stats.rtt is not None and 0 < stats.rtt < 1
            assert stats.throughput is not None and stats.throughput > 1e5, connection
        a._prune(b.peer_id)  # what runs once the duplicate grace is over: nothing to close
        await asyncio.sleep(0)
        assert all(not c.is_closed for c in connections)
        # b sees both paths too, and measures their round trips (its own direction)
        await wait_until(lambda: len(b.path_stats) == 2, timeout=15)
    finally:
        await _close(a, b)


async def test_small_streams_take_the_lowest_rtt_and_bulk_the_highest_throughput(
    two_paths,
) -> None:
    a, b = two_paths
    bulk = await a.open_stream(b.peer_id, [ECHO], bulk=True)
    small = await a.open_stream(b.peer_id, [ECHO])
    stats = {c: a.path_stats[c] for c in a.connections_to(b.peer_id)}
    fastest = max(stats, key=lambda c: stats[c].throughput or 0)
    quickest = min(stats, key=lambda c: stats[c].rtt or 1)
    assert bulk.connection is fastest  # type: ignore[attr-defined]
    assert small.connection is quickest  # type: ignore[attr-defined]
    for stream in (bulk, small):
        await stream.write(b"ping")
        await stream.close()
        assert await stream.read_to_end() == b"ping"


async def test_a_dead_path_fails_its_streams_clearly_and_the_other_path_carries_on(
    two_paths,
) -> None:
    a, b = two_paths
    tcp = next(c for c in a.connections_to(b.peer_id) if c.transport == "tcp")
    quic = next(c for c in a.connections_to(b.peer_id) if c.transport == "quic")
    on_tcp = await tcp.open_stream()
    on_quic = await quic.open_stream()
    for stream in (on_tcp, on_quic):
        await select_outbound(stream, [ECHO])
        await stream.write(b"before")
        assert await stream.readexactly(6) == b"before"

    tcp.abort("test: the path died")  # type: ignore[attr-defined]

    with pytest.raises(StreamReset, match="the path died"):
        await on_tcp.write(b"after")
        await on_tcp.readexactly(5)
    await on_quic.write(b"still here")  # in flight on the other path: not lost
    assert await on_quic.readexactly(10) == b"still here"
    await on_quic.close()
    assert await on_quic.read_to_end() == b""

    for bulk in (False, True):  # new streams take a live path: the one left (a bulk stream
        # may first dial TCP again, the transport it finds missing)
        stream = await a.open_stream(b.peer_id, [ECHO], bulk=bulk)
        assert not stream.connection.is_closed  # type: ignore[attr-defined]
        assert stream.connection is quic or (bulk and stream.connection is not tcp)  # type: ignore[attr-defined]
        await stream.write(b"new")
        await stream.close()
        assert await stream.read_to_end() == b"new"


async def test_listen_port_dials_turn_nagle_off_like_any_asyncio_socket() -> None:
    """A dial from the listen port builds its own socket; it must get TCP_NODELAY as asyncio
    gives every other one, or each small message on it may wait for a delayed ACK (~40 ms)."""
    a, b = Swarm(KeyPair.generate()), Swarm(KeyPair.generate())
    try:
        for swarm in (a, b):
            await swarm.listen(Multiaddr.parse("/ip4/127.0.0.1/tcp/0"))
        connection = await a.dial_addr(b.addrs[0])
        assert connection.local_addr is not None
        assert connection.local_addr.value_for("tcp") == a.listen_addrs[0].value_for("tcp")
        tcp_channel = connection._channel.raw  # type: ignore[attr-defined]  # (white box)
        sock = tcp_channel._transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        await a.close()
        await b.close()
