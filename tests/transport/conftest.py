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


class LossyPath(asyncio.DatagramProtocol):
    """A UDP forwarder between one client and one server that drops datagrams above a size.

    Dial `address` instead of the server: the path in between carries datagrams of at most
    `drop_above` bytes (None: all), as a link with a small MTU and Don't Fragment would.
    """

    def __init__(self, server: tuple[str, int], drop_above: int | None = None) -> None:
        self.server = server
        self.drop_above = drop_above
        self.dropped: list[int] = []  # sizes of the datagrams dropped
        self.largest_passed = 0
        self._client: tuple[str, int] | None = None
        self._front: asyncio.DatagramTransport | None = None
        self._back: asyncio.DatagramTransport | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._front, _ = await loop.create_datagram_endpoint(
            lambda: _Side(self, toward_server=True), local_addr=("127.0.0.1", 0)
        )
        self._back, _ = await loop.create_datagram_endpoint(
            lambda: _Side(self, toward_server=False), local_addr=("127.0.0.1", 0)
        )
        self.address: tuple[str, int] = self._front.get_extra_info("sockname")[:2]

    def forward(self, data: bytes, source: tuple[str, int], toward_server: bool) -> None:
        if self.drop_above is not None and len(data) > self.drop_above:
            self.dropped.append(len(data))
            return
        self.largest_passed = max(self.largest_passed, len(data))
        if toward_server:
            self._client = source
            assert self._back is not None
            self._back.sendto(data, self.server)
        elif self._client is not None:
            assert self._front is not None
            self._front.sendto(data, self._client)

    def close(self) -> None:
        for side in (self._front, self._back):
            if side is not None:
                side.close()


class _Side(asyncio.DatagramProtocol):
    def __init__(self, path: LossyPath, toward_server: bool) -> None:
        self.path = path
        self.toward_server = toward_server

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.path.forward(data, addr, self.toward_server)


@pytest.fixture
async def lossy_path(endpoints: EndpointPair) -> AsyncIterator[LossyPath]:
    path = LossyPath(endpoints.server_address)
    await path.start()
    try:
        yield path
    finally:
        path.close()
