"""Path MTU discovery over real sockets: loopback, a path that drops big datagrams, a black hole."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest
from aioquic.buffer import Buffer
from aioquic.quic.packet import pull_quic_transport_parameters, push_quic_transport_parameters

from tests.transport.conftest import EndpointPair, LossyPath, wait_until
from transport.identity import KeyPair
from transport.quic import QuicConfig, QuicConnection, QuicEndpoint
from transport.quic import endpoint as endpoint_module
from transport.quic.glue import Libp2pQuicConnection
from transport.quic.udp import route_mtu

BASE = 1200  # the smallest size QUIC allows: every path must carry it
LOOPBACK_CEILING = 65487  # QuicConfig.max_probed_datagram_size


@pytest.fixture
def quic_config() -> QuicConfig:
    return QuicConfig(
        engine="aioquic",  # our own path MTU search (qh3 probes by itself: test_qh3_endpoint)
        handshake_timeout=2.0,
        idle_timeout=5.0,
        keepalive_interval=1.0,
        max_datagram_size=BASE,
    )


async def _send_and_check(pair: EndpointPair, connection: QuicConnection, size: int) -> None:
    """A random payload each way over one new stream arrives intact."""
    payload = os.urandom(size)
    stream = await connection.open_stream()

    async def send() -> None:
        await stream.write(payload)
        await stream.close()

    sender = asyncio.ensure_future(send())
    try:
        inbound = await asyncio.wait_for(pair.server_streams.get(), 10)
        assert await asyncio.wait_for(inbound.read_to_end(max_size=size), 30) == payload
        await asyncio.wait_for(sender, 10)
        await inbound.write(payload[::-1])
        await inbound.close()
        assert await asyncio.wait_for(stream.read_to_end(max_size=size), 30) == payload[::-1]
    finally:
        sender.cancel()


def _search(connection: QuicConnection):
    search = connection.quic.mtu_search
    assert search is not None
    return search


async def test_loopback_carries_64_kib_datagrams_once_probed(endpoints: EndpointPair) -> None:
    connection = await endpoints.dial()
    await wait_until(lambda: connection.quic.max_datagram_size == LOOPBACK_CEILING)
    await wait_until(lambda: bool(endpoints.server_connections))
    server_side = endpoints.server_connections[0]
    await wait_until(lambda: server_side.quic.max_datagram_size == LOOPBACK_CEILING)
    sent_before = endpoints.client._socket.datagrams_sent
    await _send_and_check(endpoints, connection, 4 * 1024 * 1024)
    # The data really went in big datagrams: far fewer than at the base size.
    assert endpoints.client._socket.datagrams_sent - sent_before < 4 * 1024 * 1024 / BASE / 4
    assert _search(connection).searches == 1


async def test_a_path_that_drops_big_datagrams_stays_at_the_base_size(
    endpoints: EndpointPair, lossy_path: LossyPath
) -> None:
    lossy_path.drop_above = 1300
    connection = await endpoints.client.dial(lossy_path.address, endpoints.server_key.peer_id)
    await _send_and_check(endpoints, connection, 2 * 1024 * 1024)
    search = _search(connection)
    await wait_until(lambda: search.done, timeout=10)
    assert connection.quic.max_datagram_size == BASE
    assert search.searches == 0
    assert lossy_path.largest_passed <= 1300
    assert {65487, 8972, 1472} <= set(lossy_path.dropped)  # every size was tried, and lost
    await _send_and_check(endpoints, connection, 256 * 1024)  # and the connection still works


async def test_a_black_hole_after_the_raise_falls_back_and_loses_nothing(
    endpoints: EndpointPair, lossy_path: LossyPath
) -> None:
    connection = await endpoints.client.dial(lossy_path.address, endpoints.server_key.peer_id)
    await wait_until(lambda: connection.quic.max_datagram_size == LOOPBACK_CEILING)
    lossy_path.drop_above = 1300  # the route changed: big datagrams vanish from now on
    await _send_and_check(endpoints, connection, 1024 * 1024)
    search = _search(connection)
    assert search.black_holes == 1
    assert connection.quic.max_datagram_size == BASE


async def test_probing_respects_the_remote_max_udp_payload_size(
    endpoints: EndpointPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    serialize = Libp2pQuicConnection._serialize_transport_parameters

    def with_limit(self: Libp2pQuicConnection) -> bytes:
        data = serialize(self)
        if self._is_client:
            return data
        parameters = pull_quic_transport_parameters(Buffer(data=data))
        parameters.max_udp_payload_size = 1500
        buf = Buffer(capacity=4096)
        push_quic_transport_parameters(buf, parameters)
        return buf.data

    monkeypatch.setattr(Libp2pQuicConnection, "_serialize_transport_parameters", with_limit)
    connection = await endpoints.dial()
    search = _search(connection)
    await wait_until(lambda: search.done, timeout=10)
    assert connection.quic.max_datagram_size == 1472  # Ethernet, under the server's 1500


@pytest.mark.parametrize("size", [16500, 32768])
async def test_fixed_datagrams_above_16_kib_carry_stream_data_intact(size: int) -> None:
    """aioquic alone corrupts STREAM frames above 16,383 bytes (and the connection hangs)."""
    pair = EndpointPair(QuicConfig(engine="aioquic", max_datagram_size=size, pmtu_probing=False))
    await pair.start()
    try:
        connection = await pair.dial()
        assert connection.quic.mtu_search is None
        await _send_and_check(pair, connection, 1024 * 1024)
        assert connection.quic.max_datagram_size == size
    finally:
        await pair.close()


async def test_probing_off_keeps_the_configured_size(quic_config: QuicConfig) -> None:
    pair = EndpointPair(quic_config.model_copy(update={"pmtu_probing": False}))
    await pair.start()
    try:
        connection = await pair.dial()
        await _send_and_check(pair, connection, 256 * 1024)
        assert connection.quic.max_datagram_size == BASE
    finally:
        await pair.close()


@pytest.mark.skipif(sys.platform != "linux", reason="IP_MTU is a Linux socket option")
def test_the_local_route_caps_the_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    """No probe bigger than the interface toward the peer could send (it would only fail)."""
    assert route_mtu(("127.0.0.1", 9)) >= 65535
    endpoint = QuicEndpoint(
        KeyPair.generate(), QuicConfig(engine="aioquic", max_datagram_size=1350)
    )
    endpoint._socket._fragmentation_options = [(0, 0, 0)]  # as if bound: probes can be sent
    assert endpoint._mtu_search(("127.0.0.1", 9)).candidates == [LOOPBACK_CEILING, 8972, 1472]
    monkeypatch.setattr(endpoint_module, "route_mtu", lambda address: 1500)
    assert endpoint._mtu_search(("192.0.2.1", 9)).candidates == [1472]
    assert endpoint._mtu_search(("2001:db8::1", 9)).candidates == [1452]
    monkeypatch.setattr(endpoint_module, "route_mtu", lambda address: 1378)
    assert endpoint._mtu_search(("192.0.2.1", 9)) is None  # nothing above 1350 to try
