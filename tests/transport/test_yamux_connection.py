"""YamuxConnection over in-memory streams: real streams, backpressure, resets, closing, death."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import pytest

from tests.transport.conftest import wait_until
from transport.connection import RELAYED
from transport.errors import ConnectionClosed, StreamReset
from transport.identity import KeyPair
from transport.memory import memory_stream_pair
from transport.noise import StreamChannel
from transport.stream import Stream
from transport.yamux import (
    FLAG_ACK,
    HEADER,
    INITIAL_WINDOW,
    TYPE_WINDOW_UPDATE,
    YamuxConfig,
    YamuxConnection,
    encode_header,
)

CONFIG = YamuxConfig(keepalive_interval=None)


class Pair:
    """Two YamuxConnections over a memory pipe; inbound streams land in queues."""

    def __init__(self, config: YamuxConfig = CONFIG) -> None:
        self.client_key, self.server_key = KeyPair.generate(), KeyPair.generate()
        self.client_raw, self.server_raw = memory_stream_pair()
        self.client = YamuxConnection(
            StreamChannel(self.client_raw), self.server_key.peer_id, True, config, path=RELAYED
        )
        self.server = YamuxConnection(
            StreamChannel(self.server_raw), self.client_key.peer_id, False, config
        )
        self.client_streams: asyncio.Queue[Stream] = asyncio.Queue()
        self.server_streams: asyncio.Queue[Stream] = asyncio.Queue()
        self.client.set_inbound_stream_callback(self.client_streams.put_nowait)
        self.server.set_inbound_stream_callback(self.server_streams.put_nowait)

    async def close(self) -> None:
        self.client.abort("test over")
        self.server.abort("test over")


@pytest.fixture
async def yamux_pair() -> AsyncIterator[Pair]:
    pair = Pair()
    try:
        yield pair
    finally:
        await pair.close()


async def _next(queue: asyncio.Queue[Stream]) -> Stream:
    async with asyncio.timeout(5):
        return await queue.get()


async def test_streams_both_ways(yamux_pair: Pair) -> None:
    pair = yamux_pair
    assert pair.client.path == RELAYED and pair.client.remote_peer == pair.server_key.peer_id
    outbound = await pair.client.open_stream()
    await outbound.write(b"from client")
    await outbound.close()
    inbound = await _next(pair.server_streams)
    assert inbound.remote_peer == pair.client_key.peer_id
    async with asyncio.timeout(5):
        assert await inbound.read_to_end() == b"from client"
        await inbound.write(b"from server")
        await inbound.close()
        assert await outbound.read_to_end() == b"from server"
    reverse = await pair.server.open_stream()
    await reverse.write(b"server-opened")
    incoming = await _next(pair.client_streams)
    async with asyncio.timeout(5):
        assert await incoming.readexactly(13) == b"server-opened"
    await wait_until(lambda: pair.client.stream_count == 1 and pair.server.stream_count == 1)


async def test_inbound_streams_wait_for_the_callback() -> None:
    client_raw, server_raw = memory_stream_pair()
    peer = KeyPair.generate().peer_id
    client = YamuxConnection(StreamChannel(client_raw), peer, True, CONFIG)
    server = YamuxConnection(StreamChannel(server_raw), peer, False, CONFIG)
    try:
        stream = await client.open_stream()
        await stream.write(b"early")
        await wait_until(lambda: len(server._pending_inbound) == 1)
        arrived: asyncio.Queue[Stream] = asyncio.Queue()
        server.set_inbound_stream_callback(arrived.put_nowait)
        inbound = await _next(arrived)
        async with asyncio.timeout(5):
            assert await inbound.readexactly(5) == b"early"
    finally:
        client.abort()
        server.abort()


async def test_writer_waits_for_a_slow_reader(yamux_pair: Pair) -> None:
    pair = yamux_pair
    outbound = await pair.client.open_stream()
    payload = bytes(range(256)) * 4096  # 1 MiB: four times the initial window
    writer = asyncio.ensure_future(outbound.write(payload))
    inbound = await _next(pair.server_streams)
    await wait_until(lambda: len(inbound._buffer) == INITIAL_WINDOW)
    await asyncio.sleep(0.05)  # give a broken flow control the chance to overrun the window
    assert not writer.done()
    assert len(inbound._buffer) == INITIAL_WINDOW  # never more than the window is buffered
    async with asyncio.timeout(5):
        assert await inbound.readexactly(len(payload)) == payload
        await writer


async def test_reset_reaches_the_reader_and_a_blocked_writer(yamux_pair: Pair) -> None:
    pair = yamux_pair
    outbound = await pair.client.open_stream()
    await outbound.write(b"x")
    inbound = await _next(pair.server_streams)
    blocked = asyncio.ensure_future(inbound.write(bytes(2 * INITIAL_WINDOW)))
    await wait_until(lambda: len(outbound._buffer) == INITIAL_WINDOW)
    outbound.reset("changed my mind")
    with pytest.raises(StreamReset, match="reset by remote peer"):
        async with asyncio.timeout(5):
            await blocked
    with pytest.raises(StreamReset, match="reset by remote peer"):
        await inbound.readexactly(10)
    with pytest.raises(StreamReset, match="changed my mind"):
        await outbound.write(b"more")
    await wait_until(lambda: pair.client.stream_count == 0 and pair.server.stream_count == 0)


async def test_close_ends_the_connection_for_both(yamux_pair: Pair) -> None:
    pair = yamux_pair
    outbound = await pair.client.open_stream()
    await outbound.write(b"hi")
    inbound = await _next(pair.server_streams)
    reader = asyncio.ensure_future(inbound.readexactly(100))
    async with asyncio.timeout(5):
        await pair.client.close()
        assert await pair.client.closed == "closed by local peer"
        reason = await pair.server.closed
    assert "closed" in reason
    with pytest.raises(StreamReset, match="connection closed"):
        await reader
    with pytest.raises(ConnectionClosed):
        await pair.server.open_stream()
    with pytest.raises(StreamReset, match="connection closed: closed by local peer"):
        await outbound.write(b"after close")


async def test_goaway_refuses_new_streams_but_keeps_open_ones() -> None:
    pair = Pair()
    try:
        old = await pair.client.open_stream()
        await old.write(b"a")
        inbound = await _next(pair.server_streams)
        pair.server._session.go_away()
        pair.server._flush()
        await wait_until(lambda: pair.client._session.remote_go_away)
        with pytest.raises(ConnectionClosed, match="GoAway"):
            await pair.client.open_stream()
        await old.write(b"b")
        async with asyncio.timeout(5):
            assert await inbound.readexactly(2) == b"ab"
    finally:
        await pair.close()


async def test_peer_dying_mid_stream_is_a_clear_error(yamux_pair: Pair) -> None:
    pair = yamux_pair
    outbound = await pair.client.open_stream()
    await outbound.write(b"partial")
    inbound = await _next(pair.server_streams)
    reading = asyncio.ensure_future(inbound.readexactly(1000))
    writing = asyncio.ensure_future(outbound.write(bytes(4 * INITIAL_WINDOW)))
    pair.client_raw.reset("process killed")  # the pipe breaks without a goodbye
    with pytest.raises(StreamReset, match="connection closed: connection lost"):
        async with asyncio.timeout(5):
            await reading
    with pytest.raises(StreamReset, match="connection closed"):
        async with asyncio.timeout(5):
            await writing
    async with asyncio.timeout(5):
        await pair.server.closed
        await pair.client.closed


async def test_protocol_violation_closes_with_goaway() -> None:
    raw, remote = memory_stream_pair()
    connection = YamuxConnection(StreamChannel(raw), KeyPair.generate().peer_id, False, CONFIG)
    try:
        await remote.write(encode_header(TYPE_WINDOW_UPDATE, 0, 0, 0) + b"trailing")
        async with asyncio.timeout(5):
            reason = await connection.closed
            sent = await remote.read_to_end()
        assert reason.startswith("protocol violation: WindowUpdate frame on stream 0")
        _, kind, _, _, code = HEADER.unpack_from(sent, len(sent) - 12)
        assert (kind, code) == (3, 1)  # GoAway, protocol error
    finally:
        connection.abort()


async def test_keepalive_closes_a_connection_whose_peer_went_silent() -> None:
    raw, remote = memory_stream_pair()  # nobody answers on `remote`
    config = YamuxConfig(keepalive_interval=0.05, ping_timeout=0.1, measure_rtt=False)
    connection = YamuxConnection(StreamChannel(raw), KeyPair.generate().peer_id, True, config)
    try:
        async with asyncio.timeout(5):
            reason = await connection.closed
        assert "no answer to a yamux Ping" in reason
    finally:
        connection.abort()
        remote.reset()


async def test_keepalive_does_not_close_a_live_connection() -> None:
    pair = Pair(YamuxConfig(keepalive_interval=0.02, ping_timeout=0.05))
    try:
        await wait_until(lambda: pair.client.rtt is not None)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 0.3  # several ping intervals and timeouts
        await wait_until(lambda: loop.time() > deadline)
        assert not pair.client.is_closed and not pair.server.is_closed
    finally:
        await pair.close()


async def test_open_stream_waits_while_the_ack_backlog_is_full() -> None:
    raw, remote = memory_stream_pair()
    config = YamuxConfig(keepalive_interval=None, measure_rtt=False, max_ack_backlog=2)
    connection = YamuxConnection(StreamChannel(raw), KeyPair.generate().peer_id, True, config)
    try:
        first = await connection.open_stream()
        await connection.open_stream()
        third = asyncio.ensure_future(connection.open_stream())
        await asyncio.sleep(0.01)
        assert not third.done()
        await remote.write(encode_header(TYPE_WINDOW_UPDATE, FLAG_ACK, first.stream_id, 0))
        async with asyncio.timeout(5):
            stream = await third
        assert stream.stream_id == 5
    finally:
        connection.abort()
        remote.reset()


async def test_many_concurrent_streams_stay_intact(yamux_pair: Pair) -> None:
    pair = yamux_pair

    async def echo_all() -> None:
        async with asyncio.TaskGroup() as group:
            for _ in range(100):
                stream = await _next(pair.server_streams)
                group.create_task(_echo(stream))

    async def _echo(stream: Stream) -> None:
        data = await stream.read_to_end(1 << 24)
        await stream.write(hashlib.sha256(data).digest())
        await stream.close()

    async def call(index: int) -> None:
        stream = await pair.client.open_stream()
        payload = bytes([index]) * (index * 5000)
        await stream.write(payload)
        await stream.close()
        assert await stream.read_to_end() == hashlib.sha256(payload).digest()

    async with asyncio.timeout(30):
        server = asyncio.ensure_future(echo_all())
        await asyncio.gather(*(call(index) for index in range(100)))
        await server
    await wait_until(lambda: pair.client.stream_count == 0 and pair.server.stream_count == 0)


async def test_message_larger_than_the_window_does_not_deadlock(yamux_pair: Pair) -> None:
    pair = yamux_pair
    outbound = await pair.client.open_stream()
    message = bytes(range(256)) * 6000  # ~1.5 MiB, six windows
    sender = asyncio.ensure_future(outbound.write_message(message))
    inbound = await _next(pair.server_streams)
    async with asyncio.timeout(5):
        assert await inbound.read_message(max_size=2 * len(message)) == message
        await sender


async def test_goaway_with_an_error_code_ends_the_connection() -> None:
    raw, remote = memory_stream_pair()
    connection = YamuxConnection(StreamChannel(raw), KeyPair.generate().peer_id, True, CONFIG)
    try:
        stream = await connection.open_stream()
        await remote.write(encode_header(3, 0, 0, 2))  # GoAway, internal error
        async with asyncio.timeout(5):
            reason = await connection.closed
        assert reason == "the remote ended the session: internal error"
        with pytest.raises(StreamReset, match="internal error"):
            await stream.read()
    finally:
        connection.abort()
        remote.reset()
