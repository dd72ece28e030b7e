"""Review of the RPC layer's fast paths: each shortcut must refuse and accept exactly what the
long way does.

- the one-step parse of a small call's request and reply (`receive_whole`) against the frame
  decoder, under every limit a service can be configured with, on valid and mutated bytes;
- the codec's remembered skeletons: a message that differs from the remembered one anywhere
  but in its data must decode as a full check decodes it (or be refused as it is);
- over real QUIC and TCP connections: a caller's `max_message_size` holds for a small reply.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lattica_ray import Node
from lattica_ray.rpc import DeadlineExceeded, RpcConfig, RpcService
from lattica_ray.rpc.codec import CodecError, CodecLimits, decode, encode
from lattica_ray.rpc.errors import RpcError
from lattica_ray.rpc.protocol import (
    CallKind,
    ClientCall,
    FrameType,
    Header,
    Message,
    ServerCall,
    Status,
    StatusCode,
    encode_frame,
    encode_header,
    encode_status,
    frame_prefix,
)
from tests.rpc.services import LISTEN, Peers, connected_services
from transport.quic import QuicConfig

WAIT = 10.0  # seconds any awaited event may take before the test fails


# -- the one-step parse against the frame decoder --------------------------------------------
def _events(call: ServerCall | ClientCall, pieces: list[bytes]) -> tuple[object, ...]:
    """What feeding `pieces` then the end of the stream gives: events, error, final state."""
    seen: list[object] = []
    try:
        for piece in pieces:
            for event in call.receive_data(piece):
                is_message = isinstance(event, Message)
                seen.append(("Message", bytes(event.payload)) if is_message else event)
        seen.append(("eof", call.receive_eof()))
    except RpcError as exc:
        seen.append((type(exc).__name__, str(exc)))
    return tuple(seen)


def _fast(call: ServerCall | ClientCall, data: bytes) -> tuple[object, ...]:
    return _events(call, [data])


def _slow(call: ServerCall | ClientCall, data: bytes) -> tuple[object, ...]:
    """The same bytes through the frame decoder: an empty first read is never whole."""
    return _events(call, [b"", data])


def _request(payload: bytes, metadata: dict[str, str], timeout: float | None) -> bytes:
    return (
        encode_header(Header("echo", CallKind.UNARY, timeout, metadata))
        + frame_prefix(FrameType.MESSAGE, len(payload))
        + payload
        + encode_frame(FrameType.END)
    )


def _reply(payload: bytes, status: Status) -> bytes:
    return frame_prefix(FrameType.MESSAGE, len(payload)) + payload + encode_status(status)


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Apply (kind, where, value) edits: 0 flips a byte, 1 inserts one, 2 deletes one."""
    out = bytearray(data)
    for kind, where, value in edits:
        if not out and kind != 1:
            continue
        at = where % (len(out) + (kind == 1))
        if kind == 0:
            out[at] ^= value or 1
        elif kind == 1:
            out.insert(at, value)
        else:
            del out[at]
    return bytes(out)


_EDITS = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 1 << 16), st.integers(0, 255)), max_size=3
)
_PAYLOADS = st.binary(max_size=300) | st.sampled_from([b"p" * 127, b"q" * 128, b"r" * 16383])
_MESSAGE_LIMITS = st.sampled_from([1 << 20, 16383, 300, 128, 127, 10, 0])
_CONTROL_LIMITS = st.sampled_from([64 * 1024, 127, 20, 5, 0])


@settings(max_examples=400, deadline=None)
@given(
    payload=_PAYLOADS,
    metadata=st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
    timeout=st.sampled_from([None, 1.5]),
    edits=_EDITS,
    message_limit=_MESSAGE_LIMITS,
    control_limit=_CONTROL_LIMITS,
)
def test_a_request_is_refused_and_taken_in_one_step_as_frame_by_frame(
    payload: bytes,
    metadata: dict[str, str],
    timeout: float | None,
    edits: list[tuple[int, int, int]],
    message_limit: int,
    control_limit: int,
) -> None:
    data = _mutate(_request(payload, metadata, timeout), edits)
    assert _fast(ServerCall(message_limit, control_limit), data) == _slow(
        ServerCall(message_limit, control_limit), data
    )


@settings(max_examples=400, deadline=None)
@given(
    payload=_PAYLOADS,
    status=st.sampled_from([Status(StatusCode.OK), Status(StatusCode.INTERNAL, "boom")]),
    edits=_EDITS,
    message_limit=_MESSAGE_LIMITS,
    control_limit=_CONTROL_LIMITS,
)
def test_a_reply_is_refused_and_taken_in_one_step_as_frame_by_frame(
    payload: bytes,
    status: Status,
    edits: list[tuple[int, int, int]],
    message_limit: int,
    control_limit: int,
) -> None:
    data = _mutate(_reply(payload, status), edits)
    header = Header("echo", CallKind.UNARY)
    assert _fast(ClientCall(header, message_limit, control_limit), data) == _slow(
        ClientCall(header, message_limit, control_limit), data
    )


def test_a_small_reply_over_the_callers_message_limit_is_refused_in_one_step_too() -> None:
    """The case the property above found: the one-step parse of a reply took a message over
    `max_message_size` (below 16 KiB, a two-byte length) that the frame decoder refuses."""
    data = _reply(b"a" * 200, Status(StatusCode.OK))
    call = ClientCall(Header("echo", CallKind.UNARY), 100)
    assert call.receive_whole(data) is None
    with pytest.raises(RpcError, match="exceeds the limit of 100 bytes"):
        call.receive_data(data)


def test_a_header_over_the_control_limit_is_refused_in_one_step_too() -> None:
    data = _request(b"x", {}, None)
    call = ServerCall(1 << 20, 4)
    assert call.receive_whole(data) is None
    with pytest.raises(RpcError, match="HEADER frame of 6 bytes exceeds 4"):
        call.receive_data(data)


# -- the codec's remembered skeletons ------------------------------------------------------------
def _message(value: object) -> bytes:
    return b"".join(bytes(part) for part in encode(value))


def _decoded(data: bytes | bytearray, limits: CodecLimits | None = None) -> object:
    try:
        return ("value", repr(decode(data, limits)))
    except CodecError as exc:
        return ("refused", type(exc).__name__)


_VALUES = st.one_of(
    st.binary(max_size=200),
    st.none(),
    st.tuples(st.tuples(*[st.binary(max_size=40)] * 2), st.just({})),
    st.tuples(st.lists(st.binary(max_size=40), max_size=4).map(tuple), st.just({})),
    st.lists(
        st.one_of(st.binary(max_size=20), st.text(max_size=10), st.integers(), st.none()),
        max_size=4,
    ),
    st.dictionaries(st.text(max_size=5), st.binary(max_size=20), max_size=3),
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_VALUES, edits=_EDITS.filter(bool))
def test_a_message_differing_from_a_remembered_skeleton_decodes_as_a_full_check_says(
    value: object, edits: list[tuple[int, int, int]]
) -> None:
    message = _message(value)
    for _ in range(2):  # learnt, then remembered by size for the next bytearray
        assert _decoded(bytearray(message)) == ("value", repr(value))
    mutated = _mutate(message, edits)
    full_check = _decoded(mutated, CodecLimits())  # limits of its own: no remembered skeleton
    assert _decoded(bytearray(mutated)) == full_check
    assert _decoded(bytes(mutated)) == full_check


# -- over real connections -----------------------------------------------------------------------
@pytest.fixture(params=["quic", "tcp"])
async def peers(request: pytest.FixtureRequest) -> AsyncIterator[Peers]:
    """A client that accepts messages up to 1000 bytes, and a server with the defaults."""
    async with connected_services(request.param, RpcConfig(max_message_size=1000)) as connected:
        yield connected


async def test_a_small_reply_over_the_callers_limit_fails_the_call(peers: Peers) -> None:
    """A reply of 2000 bytes comes whole in one read; the caller's limit is 1000: refused, as
    a reply of 20000 bytes (taken frame by frame) is."""

    @peers.server.method()
    async def blob(size: int) -> bytes:
        return b"b" * size

    assert await asyncio.wait_for(peers.client.call(peers.peer, "blob", 900), WAIT) == b"b" * 900
    for size in (2000, 20000):
        with pytest.raises(RpcError, match="exceeds the limit of 1000 bytes"):
            await asyncio.wait_for(peers.client.call(peers.peer, "blob", size), WAIT)


# -- refused calls and the connection's flow-control credit --------------------------------------
@pytest.mark.parametrize("engine", ["aioquic", "qh3"])
async def test_refused_large_calls_leave_the_connection_usable(engine: str) -> None:
    """A call the server refuses (no such method) before reading its large arguments: the
    server drops what still comes and the caller resets the stream once the refusal arrives.
    The arguments must not use up the connection's receive window for good: ordinary calls
    go on (20 refusals of three stream windows each are ~15 connection windows)."""
    config = QuicConfig(engine=engine, stream_window=256 * 1024, connection_window=1 << 20)
    listen = [LISTEN["quic"]]
    async with (
        Node(listen=listen, quic_config=config) as server_node,
        Node(listen=listen, quic_config=config) as client_node,
    ):
        client_node.add_peer_addrs(server_node.peer_id, server_node.addrs)
        server, client = RpcService(server_node), RpcService(client_node)
        await server.start()
        await client.start()
        try:

            @server.method()
            async def echo(x: bytes) -> bytes:
                return x

            big = b"a" * (768 * 1024)  # three stream windows: most of it unread when refused
            for _ in range(20):
                with pytest.raises(RpcError, match="no method 'nosuch'"):
                    await client.call(server_node.peer_id, "nosuch", big, timeout=WAIT)
                assert await client.call(server_node.peer_id, "echo", b"e" * 50_000, timeout=3) == (
                    b"e" * 50_000
                )
        finally:
            await client.stop()
            await server.stop()


# -- a handler that calls back at once, from inside the receive callback --------------------------
@pytest.fixture(params=["quic", "tcp"])
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[tuple[RpcService, RpcService]]:
    """Two nodes, each serving RPC: (the caller's service, the server's service)."""
    listen = [LISTEN[request.param]]
    async with Node(listen=listen) as server_node, Node(listen=listen) as client_node:
        client_node.add_peer_addrs(server_node.peer_id, server_node.addrs)
        server, client = RpcService(server_node), RpcService(client_node)
        await server.start()
        await client.start()
        try:
            await client_node.connect(server_node.peer_id)
            yield client, server
        finally:
            await client.stop()
            await server.stop()


async def test_a_handler_that_calls_the_caller_back_before_it_waits(
    pair: tuple[RpcService, RpcService],
) -> None:
    """The handler's first step (run at once, inside the event handling of the datagram that
    brought the request) opens calls back over the same connection: they leave, are answered,
    and the first call gets its reply; many of them at once too."""
    client, server = pair
    caller = client.host.peer_id

    @client.method()
    async def pong(x: bytes) -> bytes:
        return x + b"!"

    @server.method()
    async def ping_back(x: bytes) -> bytes:
        return await server.call(caller, "pong", x, timeout=WAIT)

    peer = server.host.peer_id
    assert await client.call(peer, "ping_back", b"hi", timeout=WAIT) == b"hi!"
    replies = await asyncio.wait_for(
        asyncio.gather(*(client.call(peer, "ping_back", b"%d" % i) for i in range(50))), WAIT
    )
    assert replies == [b"%d!" % i for i in range(50)]


async def test_a_task_whose_calls_expired_is_not_left_cancelling(
    pair: tuple[RpcService, RpcService],
) -> None:
    """Deadlines cancel the caller's task and take the cancellation back: after expired calls
    (one of them inside an outer timeout that does not fire) the task has no cancellation
    pending, and an outer timeout that does fire later is still a TimeoutError."""
    client, server = pair
    peer = server.host.peer_id

    @server.method()
    async def hang() -> None:
        await asyncio.Event().wait()

    task = asyncio.current_task()
    assert task is not None
    for _ in range(3):
        with pytest.raises(DeadlineExceeded):
            await client.call(peer, "hang", timeout=0.05)
    async with asyncio.timeout(WAIT):
        with pytest.raises(DeadlineExceeded):
            await client.call(peer, "hang", timeout=0.05)
    assert task.cancelling() == 0
    await asyncio.sleep(0)  # no cancellation left to be delivered here
    with pytest.raises(TimeoutError) as raised:
        async with asyncio.timeout(0.1):
            await client.call(peer, "hang", timeout=WAIT)
    assert not isinstance(raised.value, DeadlineExceeded)
    assert task.cancelling() == 0
