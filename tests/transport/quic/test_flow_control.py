"""Receive-side flow control on both QUIC engines, over real UDP on loopback.

What a slow reader may cost in memory, and that a reader who waits never waits on a stream
somebody else is not reading (no head-of-line blocking between streams).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Coroutine

import pytest

from tests.transport.conftest import EndpointPair, wait_until
from tests.transport.quic.engines import engine, engine_config
from transport.quic import QuicConfig, QuicConnection
from transport.stream import Stream

__all__ = ["engine"]

WINDOW = 256 * 1024


@pytest.fixture
def quic_config(engine: str) -> QuicConfig:
    return engine_config(engine, stream_window=WINDOW, connection_window=8 * WINDOW)


class Flows:
    """A dialed endpoint pair whose background writers are cancelled when the test ends."""

    def __init__(self, pair: EndpointPair, connection: QuicConnection) -> None:
        self.pair, self.connection = pair, connection
        self.tasks: list[asyncio.Future] = []

    def start(self, work: Coroutine) -> asyncio.Future:
        task = asyncio.ensure_future(work)
        self.tasks.append(task)
        return task

    async def inbound(self) -> Stream:
        return await asyncio.wait_for(self.pair.server_streams.get(), 5)

    async def stream_being_read(self) -> tuple[Stream, Stream]:
        """A stream (ours, the server's) whose first byte the server has read."""
        ours = await self.connection.open_stream()
        await ours.write(b"a")
        theirs = await self.inbound()
        assert await theirs.read(1) == b"a"
        return ours, theirs


@contextlib.asynccontextmanager
async def flows(quic_config: QuicConfig) -> AsyncIterator[Flows]:
    pair = EndpointPair(quic_config)
    await pair.start()
    state = None
    try:
        state = Flows(pair, await pair.dial())
        yield state
    finally:
        for task in state.tasks if state is not None else ():
            task.cancel()
        await pair.close()


async def _write_all(stream: Stream, payload: bytes) -> None:
    await stream.write(payload)
    await stream.close()


async def test_a_reader_that_does_not_read_holds_at_most_its_stream_window(
    quic_config: QuicConfig,
) -> None:
    """Credit follows what the application reads: a writer cannot flood a slow reader, on
    either engine (qh3 splits the window between its core and what Python holds)."""
    async with flows(quic_config) as f:
        total = 16 * WINDOW
        writer = f.start(_write_all(await f.connection.open_stream(), bytes(total)))
        inbound = await f.inbound()
        await wait_until(lambda: len(inbound._buffer) >= WINDOW // 4)
        # Nothing can be waited for here: the point is that nothing more arrives.
        await asyncio.sleep(0.3)
        assert len(inbound._buffer) <= WINDOW
        assert not writer.done()
        received = len(await inbound.read_to_end(max_size=total))
        await asyncio.wait_for(writer, 30)
        assert received == total


async def test_a_waiting_reader_is_not_blocked_by_a_stream_nobody_reads(
    quic_config: QuicConfig,
) -> None:
    """Two streams on one connection; the application reads the second to its end before it
    reads the first. The first stream's unread data must not stop the second's (on qh3 the
    credit for all streams comes from one queue of events)."""
    async with flows(quic_config) as f:
        first, second = await f.connection.open_stream(), await f.connection.open_stream()
        payloads = [os.urandom(12 * WINDOW), os.urandom(12 * WINDOW)]
        writers = [
            f.start(_write_all(stream, payload))
            for stream, payload in zip((first, second), payloads, strict=True)
        ]
        inbound = [await f.inbound(), await f.inbound()]
        async with asyncio.timeout(20):
            assert await inbound[1].read_to_end(max_size=len(payloads[1])) == payloads[1]
            assert await inbound[0].read_to_end(max_size=len(payloads[0])) == payloads[0]
            await asyncio.gather(*writers)


async def test_a_reader_waiting_before_an_unread_stream_refills_gets_its_data(
    quic_config: QuicConfig, engine: str
) -> None:
    """The server waits on stream A; only then does the unread stream B take the window again
    (its writer had been waiting for credit), and only then does A's data come. A's reader
    must get it: it waits on A, not on B (on qh3 as long as B's unread bytes stay below the
    connection window, which QUIC's connection-level credit allows them)."""
    async with flows(quic_config) as f:
        a, inbound_a = await f.stream_being_read()
        f.start((await f.connection.open_stream()).write(bytes(3 * WINDOW)))
        inbound_b = await f.inbound()
        await wait_until(lambda: len(inbound_b._buffer) >= WINDOW // 2)
        await asyncio.sleep(0.2)  # B's writer now waits for credit (nothing to wait for)
        held = len(inbound_b._buffer)
        reading = f.start(inbound_a.read(100))
        if engine == "qh3":  # events for all streams come in together: B's come in too
            await wait_until(lambda: len(inbound_b._buffer) > held)
            await asyncio.sleep(0.2)  # ... and what B's writer sent with that credit arrived
        await a.write(b"ping")
        assert await asyncio.wait_for(reading, 5) == b"ping"


async def test_a_waiting_reader_lets_an_unread_stream_take_at_most_the_connection_window(
    quic_config: QuicConfig,
) -> None:
    """While the server waits on A, the remote floods B, which nobody reads: what B holds
    stays within the connection window (qh3 gives credit for all streams from one queue, so
    a waiting reader lets B's events in, but not without bound)."""
    async with flows(quic_config) as f:
        _, inbound_a = await f.stream_being_read()
        f.start(inbound_a.read(100))
        flood = f.start((await f.connection.open_stream()).write(bytes(64 * WINDOW)))
        inbound_b = await f.inbound()
        await wait_until(lambda: len(inbound_b._buffer) >= WINDOW // 4)
        await asyncio.sleep(0.5)  # nothing to wait for: the point is that no more arrives
        assert len(inbound_b._buffer) <= 8 * WINDOW
        assert not flood.done()
