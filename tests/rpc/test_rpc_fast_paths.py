"""The RPC layer's fast paths over real QUIC and TCP connections on loopback.

A small unary call takes shortcuts on both sides: the caller's deadlines share one timer, and
the server answers a request that came whole without the machinery a streaming call needs.
Each test here checks that a shortcut keeps the behaviour of the long way: deadlines, errors
and tracebacks, handlers that suspend, a caller that cancels or resets.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from lattica_ray import Node
from lattica_ray.rpc import DeadlineExceeded, RpcConfig, RpcService

LISTEN = {"quic": "/ip4/127.0.0.1/udp/0/quic-v1", "tcp": "/ip4/127.0.0.1/tcp/0"}
WAIT = 10.0  # seconds any awaited event may take before the test fails


class Peers:
    """A client service and a server service on two connected nodes."""

    def __init__(self, client: RpcService, server: RpcService, server_node: Node) -> None:
        self.client, self.server, self.server_node = client, server, server_node
        self.peer = server_node.peer_id


@pytest.fixture(params=["quic", "tcp"])
async def peers(request: pytest.FixtureRequest) -> AsyncIterator[Peers]:
    listen = [LISTEN[request.param]]
    async with Node(listen=listen) as server_node, Node(listen=listen) as client_node:
        client_node.add_peer_addrs(server_node.peer_id, server_node.addrs)
        server = RpcService(server_node)
        client = RpcService(client_node, RpcConfig(deadline_grace=0.0))
        await server.start()
        await client.start()
        try:
            await client_node.connect(server_node.peer_id)
            yield Peers(client, server, server_node)
        finally:
            await client.stop()
            await server.stop()


async def hang_forever(started: asyncio.Event | None = None) -> None:
    if started is not None:
        started.set()
    await asyncio.Event().wait()


# -- the caller's deadlines: one timer for all calls in flight -------------------------------
async def test_each_call_expires_at_its_own_deadline(peers: Peers) -> None:
    """A later call with an earlier deadline re-arms the shared timer; calls that end first
    leave it; each waiting call fails at its own deadline, not another's."""
    peers.server.register("hang", hang_forever)

    @peers.server.method()
    async def echo(x: bytes) -> bytes:
        return x

    async def timed(timeout: float) -> float:
        began = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await peers.client.call(peers.peer, "hang", timeout=timeout)
        return time.monotonic() - began

    slow = asyncio.create_task(timed(3.0))  # armed first, for the latest deadline
    await asyncio.sleep(0)
    fast = asyncio.create_task(timed(0.2))
    for _ in range(20):  # calls that end early do not disturb the others' deadlines
        assert await peers.client.call(peers.peer, "echo", b"x", timeout=0.05) == b"x"
    middle = asyncio.create_task(timed(0.6))
    fast_took, middle_took, slow_took = await asyncio.wait_for(
        asyncio.gather(fast, middle, slow), WAIT
    )
    assert 0.2 <= fast_took < 1.0
    assert 0.6 <= middle_took < 1.5
    assert 3.0 <= slow_took < 3.0 + WAIT / 2
    assert peers.client.active_outbound_calls == 0


async def test_cancelling_a_caller_with_a_deadline_is_a_cancellation(peers: Peers) -> None:
    started = asyncio.Event()

    @peers.server.method()
    async def hang() -> None:
        await hang_forever(started)

    caller = asyncio.create_task(peers.client.call(peers.peer, "hang", timeout=WAIT))
    await asyncio.wait_for(started.wait(), WAIT)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert peers.client.active_outbound_calls == 0


async def test_a_deadline_inside_an_outer_timeout_is_told_apart(peers: Peers) -> None:
    """The call's own deadline is DeadlineExceeded even inside an outer asyncio.timeout; the
    outer timeout, when it comes first, is the outer's TimeoutError."""
    peers.server.register("hang", hang_forever)
    async with asyncio.timeout(WAIT):
        with pytest.raises(DeadlineExceeded):
            await peers.client.call(peers.peer, "hang", timeout=0.1)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await peers.client.call(peers.peer, "hang", timeout=WAIT)
    assert peers.client.active_outbound_calls == 0
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # no cancellation of ours left behind
