"""Review of receive-side flow control: a reader that started waiting before a stream nobody
reads filled the window again still gets its data (both engines, real UDP on loopback)."""

from __future__ import annotations

import asyncio

import pytest

from tests.transport.conftest import EndpointPair, wait_until
from tests.transport.quic.engines import engine, engine_config
from transport.quic import QuicConfig

__all__ = ["engine"]

WINDOW = 256 * 1024


@pytest.fixture
def quic_config(engine: str) -> QuicConfig:
    return engine_config(engine, stream_window=WINDOW, connection_window=8 * WINDOW)


async def test_a_reader_waiting_before_an_unread_stream_refills_gets_its_data(
    quic_config: QuicConfig, engine: str
) -> None:
    """The server waits on stream A; only then does the unread stream B take the window again
    (its writer had been waiting for credit), and only then does A's data come. A's reader
    must get it: it waits on A, not on B (on qh3 as long as B's unread bytes stay below the
    connection window, which QUIC's connection-level credit allows them)."""
    pair = EndpointPair(quic_config)
    await pair.start()
    flood = None
    try:
        connection = await pair.dial()
        a = await connection.open_stream()
        await a.write(b"a")
        inbound_a = await pair.server_streams.get()
        assert await inbound_a.read(1) == b"a"
        b = await connection.open_stream()
        flood = asyncio.ensure_future(b.write(bytes(3 * WINDOW)))
        inbound_b = await pair.server_streams.get()
        await wait_until(lambda: len(inbound_b._buffer) >= WINDOW // 2)
        await asyncio.sleep(0.2)  # B's writer now waits for credit (nothing to wait for)
        held = len(inbound_b._buffer)
        reading = asyncio.ensure_future(inbound_a.read(100))
        if engine == "qh3":  # events for all streams come in together: B's come in too
            await wait_until(lambda: len(inbound_b._buffer) > held)
            await asyncio.sleep(0.2)  # ... and what B's writer sent with that credit arrived
        await a.write(b"ping")
        assert await asyncio.wait_for(reading, 5) == b"ping"
    finally:
        if flood is not None:
            flood.cancel()
        await pair.close()


async def test_a_waiting_reader_lets_an_unread_stream_take_at_most_the_connection_window(
    quic_config: QuicConfig,
) -> None:
    """While the server waits on A, the remote floods B, which nobody reads: what B holds
    stays within the connection window (qh3 gives credit for all streams from one queue, so
    a waiting reader lets B's events in, but not without bound)."""
    pair = EndpointPair(quic_config)
    await pair.start()
    flood = None
    try:
        connection = await pair.dial()
        a = await connection.open_stream()
        await a.write(b"a")
        inbound_a = await pair.server_streams.get()
        assert await inbound_a.read(1) == b"a"
        reading = asyncio.ensure_future(inbound_a.read(100))
        b = await connection.open_stream()
        flood = asyncio.ensure_future(b.write(bytes(64 * WINDOW)))
        inbound_b = await pair.server_streams.get()
        await wait_until(lambda: len(inbound_b._buffer) >= WINDOW // 4)
        await asyncio.sleep(0.5)  # nothing to wait for: the point is that no more arrives
        assert len(inbound_b._buffer) <= 8 * WINDOW
        assert not flood.done()
        reading.cancel()
    finally:
        if flood is not None:
            flood.cancel()
        await pair.close()
