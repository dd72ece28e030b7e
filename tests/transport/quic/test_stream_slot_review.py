"""Review of openers waiting for a stream slot (qh3: a remote allows 100 streams at once):
when the connection closes under them, they learn that the connection closed, so the swarm
takes another path or dials again instead of failing the call."""

from __future__ import annotations

import asyncio

import pytest

from tests.transport.conftest import EndpointPair
from tests.transport.quic.engines import engine_config
from transport.errors import ConnectionClosed

pytest.importorskip("qh3", reason="qh3 is not installed (the qh3 QUIC engine is optional)")

WAIT = 5.0


async def test_an_opener_waiting_for_a_slot_gets_connection_closed_when_it_closes() -> None:
    pair = EndpointPair(engine_config("qh3"))
    await pair.start()
    try:
        connection = await pair.dial()
        for _ in range(100):
            stream = await connection.open_stream()
            await stream.write(b"x")
        waiting = asyncio.ensure_future(connection.open_stream())
        await asyncio.sleep(0)  # it reached its wait (nothing else to wait for)
        assert not waiting.done()
        await connection.close()
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(waiting, WAIT)
    finally:
        await pair.close()
