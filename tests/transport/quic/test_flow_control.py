"""Receive-side flow control on both QUIC engines, over real UDP on loopback.

What a slow reader may cost in memory, and that a reader who waits never waits on a stream
somebody else is not reading (no head-of-line blocking between streams).
"""

from __future__ import annotations

import asyncio
import os

import pytest

from tests.transport.conftest import EndpointPair, wait_until
from tests.transport.quic.engines import engine, engine_config
from transport.quic import QuicConfig

__all__ = ["engine"]

WINDOW = 256 * 1024


@pytest.fixture
def quic_config(engine: str) -> QuicConfig:
    return engine_config(engine, stream_window=WINDOW, connection_window=8 * WINDOW)


async def _write_all(stream, payload: bytes) -> None:
    await stream.write(payload)
    await stream.close()


async def test_a_reader_that_does_not_read_holds_at_most_its_stream_window(
    quic_config: QuicConfig,
) -> None:
    """Credit follows what the application reads: a writer cannot flood a slow reader, on
    either engine (qh3 splits the window between its core and what Python holds)."""
    pair = EndpointPair(quic_config)
    await pair.start()
    writer = None
    try:
        connection = await pair.dial()
        stream = await connection.open_stream()
        total = 16 * WINDOW
        writer = asyncio.ensure_future(_write_all(stream, bytes(total)))
        inbound = await pair.server_streams.get()
        await wait_until(lambda: len(inbound._buffer) >= WINDOW // 4)
        # Nothing can be waited for here: the point is that nothing more arrives.
        await asyncio.sleep(0.3)
        assert len(inbound._buffer) <= WINDOW
        assert not writer.done()
        received = len(await inbound.read_to_end(max_size=total))
        await asyncio.wait_for(writer, 30)
        assert received == total
    finally:
        if writer is not None:
            writer.cancel()
        await pair.close()


async def test_a_waiting_reader_is_not_blocked_by_a_stream_nobody_reads(
    quic_config: QuicConfig,
) -> None:
    """Two streams on one connection; the application reads the second to its end before it
    reads the first. The first stream's unread data must not stop the second's (on qh3 the
    credit for all streams comes from one queue of events)."""
    pair = EndpointPair(quic_config)
    await pair.start()
    writers: list[asyncio.Future] = []
    try:
        connection = await pair.dial()
        first, second = await connection.open_stream(), await connection.open_stream()
        payloads = [os.urandom(12 * WINDOW), os.urandom(12 * WINDOW)]
        writers = [
            asyncio.ensure_future(_write_all(stream, payload))
            for stream, payload in zip((first, second), payloads, strict=True)
        ]
        await first.write(b"")  # both exist at the server before either is read
        inbound = [await pair.server_streams.get(), await pair.server_streams.get()]
        async with asyncio.timeout(20):
            assert await inbound[1].read_to_end(max_size=len(payloads[1])) == payloads[1]
            assert await inbound[0].read_to_end(max_size=len(payloads[0])) == payloads[0]
            await asyncio.gather(*writers)
    finally:
        for writer in writers:
            writer.cancel()
        await pair.close()
