"""A small request and its answer over real QUIC: when the request leaves."""

from __future__ import annotations

import asyncio

import pytest

from tests.transport.conftest import EndpointPair, wait_until
from transport.multistream import select_inbound, select_outbound
from transport.quic import QuicConfig, QuicConnection


@pytest.fixture
def quic_config() -> QuicConfig:
    """No keep-alive or idle timer comes due while a test looks at what the loop runs."""
    return QuicConfig(handshake_timeout=2.0, idle_timeout=60.0, keepalive_interval=30.0)


async def _settled(endpoints: EndpointPair, connection: QuicConnection) -> None:
    """Until nothing is due on either side soon: no flush scheduled, no ACK or loss timer
    (their callbacks would run in the same loop turns as the flushes looked at)."""
    loop = asyncio.get_running_loop()

    def quiet(side: QuicConnection) -> bool:
        timer = side.quic.get_timer()
        return not side._flush_scheduled and (timer is None or timer > loop.time() + 5.0)

    await wait_until(lambda: all(quiet(c) for c in (connection, *endpoints.server_connections)))


async def _echo_server(endpoints: EndpointPair) -> asyncio.Task[None]:
    async def serve() -> None:
        while True:
            stream = await endpoints.server_streams.get()
            await select_inbound(stream, ["/echo/1"])
            await stream.write(await stream.read())

    return asyncio.get_running_loop().create_task(serve())


def _note_scheduled_flushes(connection: QuicConnection) -> list[bool]:
    """For each scheduled flush the loop runs: was it still due (nothing flushed since)?"""
    due: list[bool] = []
    original = connection._scheduled_flush

    def noted() -> None:
        due.append(connection._flush_scheduled)
        original()

    connection._scheduled_flush = noted  # type: ignore[method-assign]
    return due


async def test_a_reader_that_waits_sends_its_request_before_the_loop_turns(
    endpoints: EndpointPair,
) -> None:
    connection = await endpoints.dial()
    server = await _echo_server(endpoints)
    try:
        due = _note_scheduled_flushes(connection)
        for _ in range(3):
            stream = await connection.open_stream()
            await select_outbound(stream, ["/echo/1"])
            await _settled(endpoints, connection)
            due.clear()
            await stream.write(b"ping")
            assert connection._flush_scheduled
            assert await stream.read() == b"ping"  # the request left as the read began to wait
            assert due[0] is False  # the loop's own flush found nothing left to do
    finally:
        server.cancel()


async def test_with_other_callbacks_queued_the_flush_waits_for_them(
    endpoints: EndpointPair,
) -> None:
    connection = await endpoints.dial()
    server = await _echo_server(endpoints)
    try:
        due = _note_scheduled_flushes(connection)
        stream = await connection.open_stream()
        await select_outbound(stream, ["/echo/1"])
        await _settled(endpoints, connection)
        due.clear()
        await stream.write(b"ping")
        asyncio.get_running_loop().call_soon(lambda: None)  # another writer could run here
        assert await stream.read() == b"ping"
        assert due[0] is True  # the request went with the loop's flush, after that callback
    finally:
        server.cancel()
