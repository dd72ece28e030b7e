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
from tests.rpc.services import LISTEN, Peers, connected_services

WAIT = 10.0  # seconds any awaited event may take before the test fails


@pytest.fixture(params=["quic", "tcp"])
async def peers(request: pytest.FixtureRequest) -> AsyncIterator[Peers]:
    async with connected_services(request.param, RpcConfig(deadline_grace=0.0)) as connected:
        yield connected


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


# -- the server: a small unary call answered in the serving task, in one piece ---------------
async def test_a_whole_small_call_is_answered_with_one_send_over_quic() -> None:
    """Response, OK status and FIN leave in one STREAM frame: one send on the connection
    per call (it was two: the reply, then the FIN)."""
    listen = [LISTEN["quic"]]
    async with Node(listen=listen) as server_node, Node(listen=listen) as client_node:

        @server_node.rpc.method()
        async def echo(x: bytes) -> bytes:
            return x

        client_node.add_peer_addrs(server_node.peer_id, server_node.addrs)
        peer = server_node.peer_id
        assert await client_node.rpc.call(peer, "echo", b"up", timeout=WAIT) == b"up"
        connection = server_node.connection_to(client_node.peer_id)
        assert connection is not None
        sends: dict[int, list[tuple[int, bool]]] = {}  # stream -> (bytes, FIN) of each send
        original = connection._send

        def counting_send(stream_id: int, data: bytes, end_stream: bool = False) -> None:
            sends.setdefault(stream_id, []).append((len(data), end_stream))
            original(stream_id, data, end_stream)

        connection._send = counting_send  # type: ignore[method-assign]
        try:
            for _ in range(20):
                assert await client_node.rpc.call(peer, "echo", b"x" * 100, timeout=WAIT) == (
                    b"x" * 100
                )
        finally:
            del connection._send
        # (the node's own streams meanwhile, if any, carry no reply of 100 bytes and more)
        replies = [each for each in sends.values() if sum(size for size, _ in each) >= 100]
        assert len(replies) == 20, sends
        assert all(len(each) == 1 and each[0][1] for each in replies), sends


async def test_whole_small_calls_beside_a_client_streaming_call(peers: Peers) -> None:
    """The same method kinds answer alike whichever way the server takes: a small unary call
    (its request whole in the first read), a large one, a client-streaming call."""

    @peers.server.method()
    async def echo(x: bytes) -> bytes:
        return x

    @peers.server.method()
    async def joined(requests: AsyncIterator[bytes], prefix: bytes) -> bytes:
        return prefix + b"".join([r async for r in requests])

    async def parts() -> AsyncIterator[bytes]:
        for part in (b"a", b"b", b"c"):
            yield part

    big = bytes(range(256)) * 1024  # many reads: the long way
    for _ in range(3):
        assert await peers.client.call(peers.peer, "echo", b"small", timeout=WAIT) == b"small"
        assert await peers.client.call(peers.peer, "echo", big, timeout=WAIT) == big
        assert (
            await peers.client.call(peers.peer, "joined", b">", requests=parts(), timeout=WAIT)
            == b">abc"
        )
    assert peers.server.active_inbound_calls == 0


async def test_errors_from_a_whole_small_call_keep_type_message_and_traceback(
    peers: Peers,
) -> None:
    from lattica_ray.rpc import InvalidArgument, RemoteError

    @peers.server.method()
    async def fails(x: bytes) -> bytes:
        raise KeyError(f"no {x!r} here")

    @peers.server.method()
    async def refuses(x: bytes) -> bytes:
        raise InvalidArgument("x must be longer")

    @peers.server.method()
    async def echo(x: bytes) -> bytes:
        return x

    with pytest.raises(RemoteError, match="no b'key' here") as info:
        await peers.client.call(peers.peer, "fails", b"key", timeout=WAIT)
    assert info.value.remote_type == "KeyError"
    assert "in fails" in info.value.remote_traceback
    with pytest.raises(InvalidArgument, match="x must be longer"):
        await peers.client.call(peers.peer, "refuses", b"k", timeout=WAIT)
    assert await peers.client.call(peers.peer, "echo", b"after", timeout=WAIT) == b"after"


async def test_a_whole_small_call_whose_handler_suspends(peers: Peers) -> None:
    @peers.server.method()
    async def later(x: bytes) -> bytes:
        await asyncio.sleep(0.01)
        await asyncio.sleep(0)
        return x * 2

    results = await asyncio.wait_for(
        asyncio.gather(
            *(peers.client.call(peers.peer, "later", bytes([i]), timeout=WAIT) for i in range(20))
        ),
        WAIT,
    )
    assert results == [bytes([i]) * 2 for i in range(20)]
    assert peers.server.active_inbound_calls == 0


async def test_a_caller_that_gives_up_cancels_a_whole_small_call(peers: Peers) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    @peers.server.method()
    async def work(x: bytes) -> bytes:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return x

    @peers.server.method()
    async def echo(x: bytes) -> bytes:
        return x

    for _ in range(2):  # the caller is cancelled, then the caller's deadline passes
        started.clear()
        cancelled.clear()
        caller = asyncio.create_task(peers.client.call(peers.peer, "work", b"x", timeout=WAIT))
        await asyncio.wait_for(started.wait(), WAIT)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await asyncio.wait_for(cancelled.wait(), WAIT)
    started.clear()
    cancelled.clear()
    began = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await peers.client.call(peers.peer, "work", b"x", timeout=0.2)
    assert time.monotonic() - began < WAIT / 2
    await asyncio.wait_for(cancelled.wait(), WAIT)
    assert await peers.client.call(peers.peer, "echo", b"after", timeout=WAIT) == b"after"
    assert peers.server.active_inbound_calls == 0


async def test_the_server_enforces_the_deadline_of_a_whole_small_call(peers: Peers) -> None:
    """The server's own deadline status arrives (the caller waits past its deadline)."""
    cancelled = asyncio.Event()
    client = RpcService(peers.client.host, RpcConfig(deadline_grace=WAIT))
    await client.start()

    @peers.server.method()
    async def slow(x: bytes) -> bytes:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return x

    try:
        with pytest.raises(DeadlineExceeded, match="exceeded on the server"):
            await client.call(peers.peer, "slow", b"x", timeout=0.2)
        await asyncio.wait_for(cancelled.wait(), WAIT)
    finally:
        await client.stop()


async def test_a_whole_small_call_sees_its_context_before_and_after_it_waits(
    peers: Peers,
) -> None:
    from lattica_ray.rpc import RemoteError, current_call

    seen: list[tuple[object, ...]] = []

    @peers.server.method()
    async def look(x: bytes) -> bytes:
        before = current_call()
        seen.append((before.method, dict(before.metadata), before.time_remaining() is not None))
        before.metadata["scribble"] = "mine"  # a handler's own copy
        await asyncio.sleep(0.001)
        assert current_call() is before
        if x == b"fail":
            raise RuntimeError("failed after waiting")
        return x

    assert (
        await peers.client.call(peers.peer, "look", b"a", timeout=WAIT, metadata={"k": "v"}) == b"a"
    )
    assert await peers.client.call(peers.peer, "look", b"b") == b"b"
    assert await peers.client.call(peers.peer, "look", b"c") == b"c"
    assert seen == [("look", {"k": "v"}, True), ("look", {}, False), ("look", {}, False)]
    with pytest.raises(RemoteError, match="failed after waiting") as info:
        await peers.client.call(peers.peer, "look", b"fail", timeout=WAIT)
    assert info.value.remote_type == "RuntimeError"
    assert "in look" in info.value.remote_traceback
    assert peers.server.active_inbound_calls == 0
