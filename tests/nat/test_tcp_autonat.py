"""AutoNAT over TCP on loopback: the server dials TCP addresses back from a fresh port and a
throwaway identity, so only an address strangers can reach counts as reachable."""

from __future__ import annotations

import socket

from lattica_ray import Node
from transport.connection import Connection
from transport.multiaddr import Multiaddr

TCP_ONLY = ["/ip4/127.0.0.1/tcp/0"]


def _closed_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_tcp_address_reachable_from_a_fresh_port_and_identity() -> None:
    async with Node(listen=TCP_ONLY) as server, Node(listen=TCP_ONLY) as client:
        await client.connect(server.addrs[0])
        dial_backs: list[Connection] = []
        client.swarm.add_connection_observer(dial_backs.append)
        listen = client.swarm.listen_addrs[0]
        dead_quic = Multiaddr.parse(f"/ip4/127.0.0.1/udp/{_closed_tcp_port()}/quic-v1")

        reachable, addr = await client.nat.autonat.check(server.peer_id, [dead_quic, listen])

        assert reachable and addr == listen
        assert len(dial_backs) == 1
        (dial_back,) = dial_backs
        assert dial_back.transport == "tcp" and not dial_back.is_initiator
        assert dial_back.remote_peer != server.peer_id  # a throwaway identity
        assert dial_back.remote_addr is not None
        server_port = server.swarm.listen_addrs[0].value_for("tcp")
        assert dial_back.remote_addr.value_for("tcp") != server_port  # a fresh port


async def test_unreachable_tcp_addresses_are_a_dial_error() -> None:
    # The client listens on no TCP port: it reaches the server from an ephemeral port, which
    # the server also tries (the address it sees us at); nothing answers there either.
    quic_only = ["/ip4/127.0.0.1/udp/0/quic-v1"]
    async with Node(listen=TCP_ONLY) as server, Node(listen=quic_only) as client:
        await client.connect(server.addrs[0])
        connection = client.connection_to(server.peer_id)
        assert connection is not None and connection.transport == "tcp"
        nobody = Multiaddr.parse(f"/ip4/127.0.0.1/tcp/{_closed_tcp_port()}")

        assert await client.nat.autonat.check(server.peer_id, [nobody]) == (False, None)
