"""The per-packet work of a QUIC connection: no flush without a reason, credit only when due."""

from __future__ import annotations

import pytest
from aioquic.quic.configuration import QuicConfiguration

from tests.transport.conftest import EndpointPair, wait_until
from transport.quic.glue import Libp2pQuicConnection

WINDOW = 256 * 1024


def _connection(stream_window: int = WINDOW, connection_window: int = 8 * WINDOW):
    quic = Libp2pQuicConnection(
        configuration=QuicConfiguration(
            is_client=True, max_stream_data=stream_window, max_data=connection_window
        ),
        stream_window=stream_window,
        connection_window=connection_window,
        max_streams=16,
    )
    quic._get_or_create_stream_for_send(0)
    return quic


def test_reading_asks_for_a_flush_only_once_half_a_stream_window_is_read() -> None:
    quic = _connection()
    read = 0
    while not quic.consume(0, 4096):
        read += 4096
        assert read < WINDOW // 2
    assert read + 4096 >= WINDOW // 2


def test_reading_asks_for_a_flush_once_half_the_connection_window_is_read() -> None:
    quic = _connection(stream_window=WINDOW, connection_window=WINDOW)
    for stream_id in (4, 8):
        quic._get_or_create_stream_for_send(stream_id)
    # A little from each stream: no stream is due, the connection is.
    assert not quic.consume(0, WINDOW // 4)
    assert not quic.consume(4, WINDOW // 8)
    assert quic.consume(8, WINDOW // 8)


@pytest.mark.parametrize("rounds", [100])
async def test_an_echo_round_trip_costs_few_flushes(endpoints: EndpointPair, rounds: int) -> None:
    """A receive batch is answered in the flush that also carries the reply it woke up."""
    connection = await endpoints.dial()
    search = connection.quic.mtu_search
    await wait_until(lambda: search is None or search.done)
    stream = await connection.open_stream()
    await stream.write(b"hello")
    inbound = await endpoints.server_streams.get()
    assert await inbound.readexactly(5) == b"hello"
    server_side = endpoints.server_connections[0]
    flushes = 0
    for quic in (connection.quic, server_side.quic):
        original = quic.datagrams_to_send

        def counted(now: float, original=original) -> list:
            nonlocal flushes
            flushes += 1
            return original(now)

        quic.datagrams_to_send = counted  # type: ignore[method-assign]
    for _ in range(rounds):
        await stream.write(b"q" * 64)
        await inbound.readexactly(64)
        await inbound.write(b"r" * 64)
        await stream.readexactly(64)
    # One flush per side per round trip, plus a few for delayed ACKs (4.5 before batching).
    assert flushes <= 3 * rounds
