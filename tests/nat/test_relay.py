"""Circuit relay v2 over real QUIC on loopback: reservations, relayed connections, limits."""

from __future__ import annotations

import asyncio

import pytest

from lattica_ray import Node
from transport.errors import TransportError
from transport.nat.relay import RelayConfig, RelayError
from transport.nat.relay.protocol import Status
from transport.stream import Stream

LOOPBACK = ["/ip4/127.0.0.1/udp/0/quic-v1"]


async def _sink(stream: Stream) -> None:
    received = len(await stream.read_to_end(max_size=1 << 30))
    await stream.write_message(str(received).encode())
    await stream.close()


async def test_reserve_then_connect_through_the_relay() -> None:
    async with Node(listen=LOOPBACK) as relay:
        async with Node(listen=LOOPBACK) as hidden, Node(listen=LOOPBACK) as caller:
            await hidden.reserve_relay(relay.addrs[0])
            circuit = [a for a in hidden.addrs if a.is_relayed]
            assert circuit, hidden.addrs
            assert str(circuit[0]).startswith(str(relay.addrs[0]) + "/p2p-circuit/p2p/")
            # The caller knows ONLY the circuit address of the hidden peer.
            caller.add_peer_addrs(hidden.peer_id, circuit)
            rtt = await caller.ping(hidden.peer_id)
            assert rtt > 0
            connection = caller.connection_to(hidden.peer_id)
            assert connection is not None and connection.path == "relayed"
            back = hidden.connection_to(caller.peer_id)
            assert back is not None and back.path == "relayed"
            # identify ran over the relayed connection too
            info = caller.identify_info(hidden.peer_id)
            assert info is not None and info.agent_version.startswith("lattica-ray")
            assert relay.relay_server.bytes_relayed > 0


async def test_connect_without_reservation_is_refused_with_the_spec_status() -> None:
    async with Node(listen=LOOPBACK) as relay, Node(listen=LOOPBACK) as caller:
        async with Node(listen=LOOPBACK) as stranger:
            with pytest.raises(RelayError) as caught:
                await caller.relay_client.connect_through(relay.addrs[0], stranger.peer_id)
            assert caught.value.status == Status.NO_RESERVATION


async def test_relay_full_refuses_reservations() -> None:
    async with Node(listen=LOOPBACK, relay=RelayConfig(max_reservations=1)) as relay:
        async with Node(listen=LOOPBACK) as first, Node(listen=LOOPBACK) as second:
            await first.reserve_relay(relay.addrs[0])
            await second.connect(relay.addrs[0])
            with pytest.raises(RelayError) as caught:
                await second.relay_client.reserve(relay.peer_id)
            assert caught.value.status == Status.RESERVATION_REFUSED


async def test_disabled_relay_does_not_speak_hop() -> None:
    async with Node(listen=LOOPBACK, relay=RelayConfig(enabled=False)) as relay:
        async with Node(listen=LOOPBACK) as client:
            await client.connect(relay.addrs[0])
            with pytest.raises(TransportError):
                await client.relay_client.reserve(relay.peer_id)


async def test_data_limit_cuts_the_circuit() -> None:
    limit = 64 * 1024
    async with Node(listen=LOOPBACK, relay=RelayConfig(circuit_data=limit)) as relay:
        async with Node(listen=LOOPBACK) as hidden, Node(listen=LOOPBACK) as caller:
            hidden.set_stream_handler("/sink/1", _sink)
            await hidden.reserve_relay(relay.addrs[0])
            caller.add_peer_addrs(hidden.peer_id, [a for a in hidden.addrs if a.is_relayed])
            stream = await caller.open_stream(hidden.peer_id, ["/sink/1"])
            connection = caller.connection_to(hidden.peer_id)
            with pytest.raises((TransportError, EOFError)):
                async with asyncio.timeout(20):
                    await stream.write(bytes(4 * limit))
                    await stream.close()
                    await stream.read_message()
            async with asyncio.timeout(10):
                await connection.closed


async def test_large_transfer_through_an_unlimited_relay() -> None:
    size = 8 * 1024 * 1024
    config = RelayConfig(circuit_data=0, circuit_duration=0)
    async with Node(listen=LOOPBACK, relay=config) as relay:
        async with Node(listen=LOOPBACK) as hidden, Node(listen=LOOPBACK) as caller:
            hidden.set_stream_handler("/sink/1", _sink)
            await hidden.reserve_relay(relay.addrs[0])
            caller.add_peer_addrs(hidden.peer_id, [a for a in hidden.addrs if a.is_relayed])
            stream = await caller.open_stream(hidden.peer_id, ["/sink/1"])
            await stream.write(bytes(size))
            await stream.close()
            assert int(await stream.read_message()) == size
