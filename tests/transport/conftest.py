"""Fixtures for transport tests: QUIC endpoints on loopback, torn down even on failure."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from transport.identity import KeyPair
from transport.quic import QuicConfig, QuicConnection, QuicEndpoint
from transport.stream import Stream


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for `condition` to hold (checked every 5 ms), failing after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110  (a condition on state we do not own)
            await asyncio.sleep(0.005)


class EndpointPair:
    """A dialer and a listener endpoint; inbound streams of the listener land in a queue."""

    def __init__(self, config: QuicConfig) -> None:
        self.client_key = KeyPair.generate()
        self.server_key = KeyPair.generate()
        self.server_streams: asyncio.Queue[Stream] = asyncio.Queue()
        self.client_streams: asyncio.Queue[Stream] = asyncio.Queue()
        self.server_connections: list[QuicConnection] = []
        self.client = QuicEndpoint(self.client_key, config, self._on_client_connection)
        self.server = QuicEndpoint(self.server_key, config, self._on_server_connection)

    def _on_server_connection(self, connection: QuicConnection) -> None:
        self.server_connections.append(connection)
        connection.set_inbound_stream_callback(self.server_streams.put_nowait)

    def _on_client_connection(self, connection: QuicConnection) -> None:
        connection.set_inbound_stream_callback(self.client_streams.put_nowait)

    async def start(self) -> None:
        await self.client.listen("127.0.0.1")
        self.server_address = await self.server.listen("127.0.0.1")

    async def dial(self) -> QuicConnection:
        return await self.client.dial(self.server_address, self.server_key.peer_id)

    async def close(self) -> None:
        await self.client.close()
        await self.server.close()


@pytest.fixture
def quic_config() -> QuicConfig:
    return QuicConfig(handshake_timeout=2.0, idle_timeout=5.0, keepalive_interval=1.0)


@pytest.fixture
async def endpoints(quic_config: QuicConfig) -> AsyncIterator[EndpointPair]:
    pair = EndpointPair(quic_config)
    await pair.start()
    try:
        yield pair
    finally:
        await pair.close()
