"""Calls that end before the caller is done sending: refused, failed, or answered early.

Over QUIC (both engines, small windows), TCP (Yamux) and a relayed circuit: the caller gets
every response and the status the server sent (its reset of the stream comes only after the
status), the server drops what the caller still sends, and no such call leaves the
connection's flow-control credit used up: ordinary calls go on. A handler that raises
CancelledError itself is a clear `Cancelled`, never a lost path sent again; and stopping the
service does not wait for refusals still dropping a caller's requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from lattica_ray import Node
from lattica_ray.rpc import (
    Cancelled,
    MethodNotFound,
    PeerUnavailable,
    RemoteError,
    RpcService,
)
from lattica_ray.rpc.protocol import PROTOCOL_ID, CallKind, Header, encode_header
from lattica_ray.rpc.service import STOP_GRACE
from tests.rpc.services import LISTEN, Peers
from transport.errors import TransportError
from transport.nat.holepunch import DCUTR_PROTOCOL, EXTENDED_PROTOCOL
from transport.nat.relay import RelayConfig
from transport.quic import QuicConfig
from transport.stream import Stream

WAIT = 20.0  # seconds any awaited event may take before the test fails
WINDOW = 256 * 1024  # the QUIC stream window; the connection's is four of them
CHUNK = 64 * 1024
ROUNDS = 8  # each round leaves up to a stream window unread: 8 of them are 2 connection windows


def _quic(engine: str) -> QuicConfig:
    return QuicConfig(engine=engine, stream_window=WINDOW, connection_window=4 * WINDOW)


@contextlib.asynccontextmanager
async def _direct(path: str) -> AsyncIterator[Peers]:
    listen = [LISTEN["tcp" if path == "tcp" else "quic"]]
    quic = None if path == "tcp" else _quic(path)
    async with (
        Node(listen=listen, quic_config=quic) as server_node,
        Node(listen=listen, quic_config=quic) as client_node,
    ):
        client_node.add_peer_addrs(server_node.peer_id, server_node.addrs)
        await client_node.connect(server_node.peer_id)
        async with _services(client_node, server_node) as peers:
            yield peers


@contextlib.asynccontextmanager
async def _relayed() -> AsyncIterator[Peers]:
    """Caller -> relay -> server, hole punching refused on both ends: stays relayed."""
    listen = [LISTEN["quic"]]
    relay = RelayConfig(circuit_data=0, circuit_duration=0)
    async with (
        Node(listen=listen, relay=relay) as relay_node,
        Node(listen=listen) as server_node,
        Node(listen=listen) as client_node,
    ):
        for node in (server_node, client_node):
            node.remove_stream_handler(DCUTR_PROTOCOL)
            node.remove_stream_handler(EXTENDED_PROTOCOL)
        await server_node.reserve_relay(relay_node.addrs[0])
        circuit = [addr for addr in server_node.addrs if addr.is_relayed]
        client_node.add_peer_addrs(server_node.peer_id, circuit)
        await client_node.connect(server_node.peer_id)
        async with _services(client_node, server_node) as peers:
            yield peers
            connection = client_node.connection_to(server_node.peer_id)
            assert connection is not None and connection.path == "relayed"


@contextlib.asynccontextmanager
async def _services(client_node: Node, server_node: Node) -> AsyncIterator[Peers]:
    server, client = RpcService(server_node), RpcService(client_node)
    await server.start()
    await client.start()
    try:
        yield Peers(client, server, server_node)
    finally:
        await client.stop()
        await server.stop()


@pytest.fixture(params=["aioquic", "qh3", "tcp", "relayed"])
async def peers(request: pytest.FixtureRequest) -> AsyncIterator[Peers]:
    async with _relayed() if request.param == "relayed" else _direct(request.param) as pair:
        _serve_echo(pair.server)
        yield pair


def _serve_echo(server: RpcService) -> None:
    @server.method()
    async def echo(x: bytes) -> bytes:
        return x


async def _still_usable(peers: Peers) -> None:
    """An ordinary call of more than a stream window still gets through."""
    payload = b"e" * (WINDOW + 1000)
    assert await peers.client.call(peers.peer, "echo", payload, timeout=WAIT) == payload


async def endless_requests() -> AsyncIterator[bytes]:
    """Request chunks without end: only the server's answer stops the caller sending."""
    while True:
        yield b"r" * CHUNK


# -- server ended the call while the caller still sends ---------------------------------------
async def test_a_handler_that_fails_while_the_caller_streams(peers: Peers) -> None:
    """A client-streaming handler raises after its first request; the caller still streams
    (without end): it gets the handler's error, its requests stop, the connection lives."""

    @peers.server.method()
    async def first_only(requests: AsyncIterator[bytes]) -> int:
        async for _ in requests:
            raise ValueError("enough")
        return 0

    for _ in range(ROUNDS):
        with pytest.raises(RemoteError, match="enough") as raised:
            await peers.client.call(
                peers.peer, "first_only", requests=endless_requests(), timeout=WAIT
            )
        assert raised.value.remote_type == "ValueError"
    await _still_usable(peers)


async def test_a_handler_that_answers_before_the_requests_end(peers: Peers) -> None:
    """A client-streaming handler returns (OK, a response of several stream windows) after
    two requests: the caller gets all of it, although it resets the stream it still sends on."""
    answer = b"a" * (3 * WINDOW)

    @peers.server.method()
    async def two_then_answer(requests: AsyncIterator[bytes]) -> bytes:
        seen = 0
        async for _ in requests:
            seen += 1
            if seen == 2:
                return answer
        return b""

    for _ in range(ROUNDS):
        result = await peers.client.call(
            peers.peer, "two_then_answer", requests=endless_requests(), timeout=WAIT
        )
        assert result == answer
    await _still_usable(peers)


async def test_a_bidirectional_call_that_ends_with_an_error(peers: Peers) -> None:
    """Responses, then an error status, while the caller still streams: every response and
    then the error arrive (the last response large, the status right behind it)."""
    last = b"z" * (2 * WINDOW)

    @peers.server.method()
    async def answer_then_fail(requests: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        count = 0
        async for _ in requests:
            count += 1
            yield b"%d" % count
            if count == 3:
                yield last
                raise KeyError("done here")

    for _ in range(ROUNDS):
        got: list[bytes] = []
        with pytest.raises(RemoteError, match="done here"):
            async with asyncio.timeout(WAIT):
                async for item in peers.client.stream(
                    peers.peer, "answer_then_fail", requests=endless_requests(), timeout=WAIT
                ):
                    got.append(item)
        assert got == [b"1", b"2", b"3", last]
    await _still_usable(peers)


async def test_a_server_stream_that_ends_with_an_error(peers: Peers) -> None:
    """A server-streaming call (its request whole and ended) whose handler fails after a
    large response: the response and the error arrive, and the caller closes cleanly."""
    big = b"s" * (3 * WINDOW)

    @peers.server.method()
    async def big_then_fail(n: int) -> AsyncIterator[bytes]:
        for _ in range(n):
            yield big
        raise RuntimeError("after the big ones")

    for _ in range(ROUNDS):
        got: list[bytes] = []
        with pytest.raises(RemoteError, match="after the big ones"):
            async with asyncio.timeout(WAIT):
                async for item in peers.client.stream(peers.peer, "big_then_fail", 2):
                    got.append(item)
        assert got == [big, big]
    await _still_usable(peers)


async def test_refused_streaming_calls(peers: Peers) -> None:
    """Client-streaming and bidirectional calls to a method that is not there: refused, the
    caller's requests stopped, the connection usable."""
    for _ in range(ROUNDS // 2):
        with pytest.raises(MethodNotFound):
            await peers.client.call(peers.peer, "nosuch", requests=endless_requests(), timeout=WAIT)
        with pytest.raises(MethodNotFound):
            async with asyncio.timeout(WAIT):
                async for _ in peers.client.stream(
                    peers.peer, "nosuch", requests=endless_requests()
                ):
                    pass
    await _still_usable(peers)


# -- stopping while a refusal drops the caller's requests ---------------------------------------
async def test_stop_does_not_wait_for_a_refusal_dropping_requests() -> None:
    """A caller (not ours) that never ends its refused request: the server's stop() cuts the
    refusal at once instead of waiting for it (STOP_GRACE, or status_timeout)."""
    async with _direct("aioquic") as peers:
        stream = await peers.client.host.open_stream(peers.peer, [PROTOCOL_ID])
        await stream.write(encode_header(Header("nosuch", CallKind.UNARY, None, {})))
        assert b"no method 'nosuch'" in await asyncio.wait_for(stream.read(65536), WAIT)
        began = time.monotonic()
        await peers.server.stop()
        assert time.monotonic() - began < STOP_GRACE / 2
        with pytest.raises(TransportError):  # the refusal was cut: it reads no more
            async with asyncio.timeout(WAIT):
                while True:
                    await stream.write(b"q" * CHUNK)


async def test_a_refusal_made_while_stopping_is_delivered_without_delaying_stop() -> None:
    """A call whose header completes while the server stops: it is refused (the server is
    stopping), the caller gets that status, and stop() does not wait for the caller to end
    its side (it never does here)."""
    async with _direct("aioquic") as peers:
        server = peers.server
        arrived = asyncio.Event()

        async def serve(stream: Stream) -> None:
            arrived.set()
            await server._serve_stream(stream)

        peers.server_node.set_stream_handler(PROTOCOL_ID, serve)
        header = encode_header(Header("echo", CallKind.UNARY, None, {}))
        stream = await peers.client.host.open_stream(peers.peer, [PROTOCOL_ID])
        await stream.write(header[:3])  # the server waits for the rest of the header
        await asyncio.wait_for(arrived.wait(), WAIT)
        began = time.monotonic()
        stopping = asyncio.create_task(server.stop())
        await asyncio.sleep(0)  # (stop() takes its first step: the service is stopping)
        assert server._stopping
        await stream.write(header[3:])
        assert b"the server is stopping" in await asyncio.wait_for(stream.read(65536), WAIT)
        await asyncio.wait_for(stopping, WAIT)
        assert time.monotonic() - began < STOP_GRACE / 2


# -- a handler that raises CancelledError itself ------------------------------------------------
@pytest.fixture
async def quic_peers() -> AsyncIterator[Peers]:
    async with _direct("aioquic") as pair:
        _serve_echo(pair.server)
        yield pair


async def test_a_handler_raising_cancelled_error_is_a_clear_error_sent_once(
    quic_peers: Peers,
) -> None:
    """Async (at once, and after waiting), plain `def` and streaming handlers that raise
    CancelledError: the caller gets Cancelled (not a lost path), and an idempotent call is
    not sent again."""
    server, peers = quic_peers.server, quic_peers
    runs: list[str] = []

    @server.method()
    async def at_once() -> None:
        runs.append("at_once")
        raise asyncio.CancelledError

    @server.method()
    async def after_waiting() -> None:
        runs.append("after_waiting")
        await asyncio.sleep(0)
        raise asyncio.CancelledError

    @server.method()
    def in_a_thread() -> None:
        runs.append("in_a_thread")
        raise asyncio.CancelledError

    @server.method()
    async def streaming() -> AsyncIterator[int]:
        runs.append("streaming")
        yield 1
        raise asyncio.CancelledError

    @server.method()
    async def reading(requests: AsyncIterator[int]) -> int:
        runs.append("reading")
        async for _ in requests:
            raise asyncio.CancelledError
        return 0

    for name in ("at_once", "after_waiting", "in_a_thread"):
        with pytest.raises(Cancelled, match="cancelled on the server") as raised:
            await peers.client.call(peers.peer, name, timeout=WAIT, idempotent=True)
        assert not isinstance(raised.value, PeerUnavailable)
    got = []
    with pytest.raises(Cancelled, match="cancelled on the server"):
        async with asyncio.timeout(WAIT):
            async for item in peers.client.stream(peers.peer, "streaming", timeout=WAIT):
                got.append(item)
    assert got == [1]

    async def one() -> AsyncIterator[int]:
        yield 1

    with pytest.raises(Cancelled, match="cancelled on the server"):
        await peers.client.call(peers.peer, "reading", requests=one(), timeout=WAIT)
    assert runs == ["at_once", "after_waiting", "in_a_thread", "streaming", "reading"]
    # the service serves on: no task of its was left cancelled
    assert await peers.client.call(peers.peer, "echo", b"x", timeout=WAIT) == b"x"
    assert server.active_inbound_calls == 0


async def test_a_handler_cancelled_by_the_deadline_is_still_deadline_exceeded(
    quic_peers: Peers,
) -> None:
    """Our own cancellation (the call's deadline) still reads as DeadlineExceeded, not as a
    handler that cancelled itself."""
    from lattica_ray.rpc import DeadlineExceeded

    @quic_peers.server.method()
    async def hang() -> None:
        await asyncio.Event().wait()

    with pytest.raises(DeadlineExceeded):
        await quic_peers.client.call(quic_peers.peer, "hang", timeout=0.2)
