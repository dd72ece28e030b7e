"""Nodes reachable over QUIC and TCP: both paths kept, RPC marks large and streaming calls as
bulk, so they go by measured throughput while small calls go by round trip."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest

from lattica_ray import Node
from lattica_ray.rpc.errors import RpcError
from transport.connection import Connection
from transport.errors import TransportError

BOTH = ["/ip4/127.0.0.1/udp/0/quic-v1", "/ip4/127.0.0.1/tcp/0"]


async def test_rpc_bulk_calls_measure_and_take_the_fastest_path() -> None:
    async with Node(listen=BOTH) as server, Node(listen=BOTH) as client:

        @server.rpc.method()
        async def echo(x: object) -> object:
            return x

        @server.rpc.method()
        async def total(requests: AsyncIterator[np.ndarray]) -> int:
            return sum([int(r.sum()) async for r in requests])

        client.add_peer_addrs(server.peer_id, server.addrs)
        await client.connect(server.peer_id)
        swarm = client.swarm

        def paths():
            return swarm.connections_to(server.peer_id)

        assert len(paths()) == 1  # one path is enough for small calls
        assert await client.rpc.call(server.peer_id, "echo", "small") == "small"
        assert len(paths()) == 1 and swarm.path_stats == {}  # not a bulk call

        big = np.arange(4 << 20, dtype=np.uint8)  # a bulk call: both paths, measured
        assert np.array_equal(await client.rpc.call(server.peer_id, "echo", big), big)
        assert {c.transport for c in paths()} == {"quic", "tcp"}
        measured = {c: swarm.path_stats[c].throughput for c in paths()}
        assert all(rate is not None and rate > 0 for rate in measured.values()), measured
        fastest = max(measured, key=lambda c: measured[c] or 0)
        assert swarm.connection_to(server.peer_id, bulk=True) is fastest

        async def chunks() -> AsyncIterator[np.ndarray]:
            for _ in range(3):
                yield np.ones(1000, dtype=np.uint8)

        assert await client.rpc.call(server.peer_id, "total", requests=chunks()) == 3000


async def _measured_bulk_path(server: Node, client: Node, big: np.ndarray) -> Connection:
    """Serve `echo`, connect over QUIC and TCP, measure both with a bulk echo of `big`: the
    path bulk calls now take."""

    @server.rpc.method()
    async def echo(x: object) -> object:
        return x

    client.add_peer_addrs(server.peer_id, server.addrs)
    await client.connect(server.peer_id)
    assert np.array_equal(await client.rpc.call(server.peer_id, "echo", big), big)
    assert {c.transport for c in client.swarm.connections_to(server.peer_id)} == {"quic", "tcp"}
    bulk_path = client.swarm.connection_to(server.peer_id, bulk=True)
    assert bulk_path is not None
    return bulk_path


async def test_a_call_in_flight_on_a_path_that_dies_fails_clearly_and_the_next_takes_another() -> (
    None
):
    """A call in flight is not moved to another path: its method may already be running (RPC
    cannot know it is idempotent), so the caller gets a clear error at once, never a hang; the
    path left carries the next calls."""
    async with Node(listen=BOTH) as server, Node(listen=BOTH) as client:
        started, release = asyncio.Event(), asyncio.Event()

        @server.rpc.method()
        async def hold(x: object) -> object:
            started.set()
            await release.wait()
            return x

        big = np.arange(4 << 20, dtype=np.uint8)
        bulk_path = await _measured_bulk_path(server, client, big)

        call = asyncio.ensure_future(client.rpc.call(server.peer_id, "hold", big))
        async with asyncio.timeout(10):
            await started.wait()
        bulk_path.abort("test: the path died")  # type: ignore[attr-defined]
        with pytest.raises((RpcError, TransportError), match="the path died"):
            async with asyncio.timeout(5):
                await call
        release.set()

        assert await client.rpc.call(server.peer_id, "echo", "small") == "small"
        assert np.array_equal(await client.rpc.call(server.peer_id, "echo", big), big)
        left = client.swarm.connections_to(server.peer_id)
        assert bulk_path not in left and left, left


async def test_an_idempotent_call_in_flight_on_a_path_that_dies_is_sent_again_on_another() -> None:
    """`idempotent=True` is the caller's promise that running the method twice is harmless: the
    call survives the death of its path, answered over the path that is left."""
    async with Node(listen=BOTH) as server, Node(listen=BOTH) as client:
        first_started, release = asyncio.Event(), asyncio.Event()
        runs = 0

        @server.rpc.method()
        async def lookup(x: object) -> object:
            nonlocal runs
            runs += 1
            if runs == 1:  # the first run hangs on the path that is about to die
                first_started.set()
                await release.wait()
            return x

        big = np.arange(4 << 20, dtype=np.uint8)
        bulk_path = await _measured_bulk_path(server, client, big)
        assert len(client.swarm.connections_to(server.peer_id)) == 2

        call = asyncio.ensure_future(
            client.rpc.call(server.peer_id, "lookup", big, idempotent=True, timeout=20)
        )
        try:
            async with asyncio.timeout(10):
                await first_started.wait()
            bulk_path.abort("test: the path died")  # type: ignore[attr-defined]
            async with asyncio.timeout(10):
                assert np.array_equal(await call, big)
        finally:
            release.set()
            call.cancel()
        assert runs == 2
        assert bulk_path not in client.swarm.connections_to(server.peer_id)
