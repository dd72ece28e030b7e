"""A QUIC connection lets go of a stream once it is done both ways (or reset), so a
long-lived connection does not keep every call it ever carried."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from tests.transport.conftest import EndpointPair, wait_until
from tests.transport.quic.engines import engine, engine_config
from transport.multistream import select_inbound, select_outbound
from transport.quic import QuicConfig, QuicConnection
from transport.stream import Stream

__all__ = ["engine"]  # the fixture the engine-parametrized `quic_config` below depends on


@pytest.fixture
def quic_config(engine: str) -> QuicConfig:
    """Every test here runs on each QUIC engine."""
    return engine_config(engine)


async def _serve_echo(endpoints: EndpointPair) -> asyncio.Task[None]:
    async def echo(stream: Stream) -> None:
        await select_inbound(stream, ["/echo/1"])
        await stream.write(await stream.read_to_end())
        await stream.close()

    async def serve() -> None:
        async with asyncio.TaskGroup() as group:
            while True:
                group.create_task(echo(await endpoints.server_streams.get()))

    return asyncio.get_running_loop().create_task(serve())


async def _open(connection: QuicConnection, request: bytes) -> Stream:
    stream = await connection.open_stream()
    await select_outbound(stream, ["/echo/1"])
    await stream.write(request)
    await stream.close()
    return stream


async def test_streams_done_both_ways_are_let_go_on_both_sides(endpoints: EndpointPair) -> None:
    connection = await endpoints.dial()
    server = await _serve_echo(endpoints)
    try:
        for index in range(50):
            stream = await _open(connection, b"call %d" % index)
            assert await stream.read_to_end() == b"call %d" % index
        server_side = endpoints.server_connections[0]
        await wait_until(lambda: connection.stream_count == 0 == server_side.stream_count)
        assert connection.open_streams() == []
    finally:
        server.cancel()


async def test_a_stream_stays_while_what_came_on_it_is_unread(endpoints: EndpointPair) -> None:
    connection = await endpoints.dial()
    server = await _serve_echo(endpoints)
    try:
        stream = await _open(connection, b"unread reply")
        await wait_until(lambda: stream._eof)  # the reply and the server's FIN are here
        assert connection.open_streams() == [stream]
        assert await stream.read(5) == b"unrea"
        assert connection.open_streams() == [stream]  # part of it still unread
        assert await stream.read_to_end() == b"d reply"
        assert connection.open_streams() == []
    finally:
        server.cancel()


async def test_a_stream_stays_until_our_side_is_closed(endpoints: EndpointPair) -> None:
    connection = await endpoints.dial()
    stream = await connection.open_stream()
    await select_outbound(stream, ["/echo/1"])
    await stream.write(b"hello")
    inbound = await endpoints.server_streams.get()
    await select_inbound(inbound, ["/echo/1"])
    assert await inbound.readexactly(5) == b"hello"
    await inbound.close()
    assert await stream.read() == b""  # the server's end, read: our side is still open
    assert connection.open_streams() == [stream]
    await stream.close()
    assert connection.open_streams() == []
    await wait_until(lambda: inbound._eof)
    assert endpoints.server_connections[0].open_streams() == []


async def test_late_data_for_a_stream_of_ours_is_not_a_new_inbound_stream(
    endpoints: EndpointPair,
) -> None:
    connection = await endpoints.dial()
    stream = await connection.open_stream()  # ID 0: a client-initiated stream
    connection._forget(stream.stream_id)
    connection._on_stream_data(
        SimpleNamespace(stream_id=stream.stream_id, data=b"x", end_stream=True)
    )
    assert connection.open_streams() == []
    assert endpoints.client_streams.empty()


async def test_small_writes_to_a_peer_that_does_not_read_wait_at_the_high_water_mark(
    engine: str,
) -> None:
    """A writer skips asking the engine for its send buffer while it has written less than
    the mark; past it, small writes wait for the buffer to drain as large ones do."""
    window = high_water = 65536
    pair = EndpointPair(
        engine_config(
            engine,
            stream_window=window,
            connection_window=window,
            send_buffer_high_water=high_water,
        )
    )
    await pair.start()
    writer = None
    try:
        connection = await pair.dial()
        stream = await connection.open_stream()
        written = 0

        async def write_small_pieces() -> None:
            nonlocal written
            for _ in range(4 * (window + high_water) // 1024):
                await stream.write(b"x" * 1024)
                written += 1024

        writer = asyncio.get_running_loop().create_task(write_small_pieces())
        inbound = await pair.server_streams.get()  # never read until the writer waits
        await wait_until(lambda: stream._drained is not None and not stream._drained.is_set())
        assert high_water <= written <= 2 * (window + high_water)
        received = 0
        while not writer.done() or received < written:
            received += len(await inbound.read())
        assert received == written == 4 * (window + high_water)
    finally:
        if writer is not None:
            writer.cancel()
        await pair.close()
