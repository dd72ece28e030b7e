"""`Node` over real QUIC on loopback: bootstrap, identify, ping, key files, connection reuse."""

from __future__ import annotations

import asyncio
import logging
import os
import stat

import pytest

from lattica_ray import Node
from transport.errors import (
    ConnectionClosed,
    DialError,
    KeyFileError,
    PeerIdMismatch,
    PeerUnreachable,
    ProtocolNotSupported,
)
from transport.identity import KeyPair
from transport.multiaddr import Multiaddr
from transport.quic import QuicConfig
from transport.stream import Stream

LOOPBACK = ["/ip4/127.0.0.1/udp/0/quic-v1"]
IMPATIENT = QuicConfig(handshake_timeout=0.5)  # for dials that must fail


async def test_bootstrap_identify_and_ping_both_ways() -> None:
    async with Node(listen=LOOPBACK) as first:
        async with Node(listen=LOOPBACK, bootstrap=[first.addrs[0]]) as second:
            # (AutoNAT's dial-back comes from a throwaway identity and closes at once.)
            assert first.peer_id in second.connected_peers()
            info = second.identify_info(first.peer_id)
            assert info is not None
            assert info.protocol_version == "/lattica/1.0.0"
            assert info.agent_version.startswith("lattica-ray/")
            assert "/ipfs/ping/1.0.0" in info.protocols
            assert info.listen_addrs == [first.addrs[0].without_peer_id()]
            # The observed address is the address `first` saw second's packets come from.
            assert info.observed_addr == second.addrs[0].without_peer_id()
            assert 0 < await second.ping(first.peer_id) < 1.0
            # `first` learned how to reach `second` from identify, so it can ping back by ID.
            assert 0 < await first.ping(second.peer_id) < 1.0
            connection = second.connection_to(first.peer_id)
            assert connection is not None and connection.path == "direct"


async def test_addrs_carry_the_peer_id() -> None:
    async with Node(listen=LOOPBACK) as node:
        assert node.addrs
        for addr in node.addrs:
            assert addr.peer_id == node.peer_id
            assert addr.has("quic-v1")


async def test_many_streams_share_one_connection() -> None:
    async with Node(listen=LOOPBACK) as server, Node(listen=LOOPBACK) as client:
        await client.connect(server.addrs[0])
        rtts = await asyncio.gather(*(client.ping(server.peer_id) for _ in range(20)))
        assert all(rtt > 0 for rtt in rtts)
        assert len(client.swarm.connections_to(server.peer_id)) == 1


async def test_simultaneous_dials_settle_on_one_connection() -> None:
    async with Node(listen=LOOPBACK) as a, Node(listen=LOOPBACK) as b:
        a.add_peer_addrs(b.peer_id, b.addrs)
        b.add_peer_addrs(a.peer_id, a.addrs)
        await asyncio.gather(a.connect(b.peer_id), b.connect(a.peer_id))
        # Both sides pick the same connection for new streams, whatever the race gave.
        chosen_by_a = a.connection_to(b.peer_id)
        chosen_by_b = b.connection_to(a.peer_id)
        assert chosen_by_a is not None and chosen_by_b is not None
        assert chosen_by_a.is_initiator != chosen_by_b.is_initiator
        assert await a.ping(b.peer_id) > 0


async def test_unknown_protocol_is_a_clear_error() -> None:
    async with Node(listen=LOOPBACK) as server, Node(listen=LOOPBACK) as client:
        await client.connect(server.addrs[0])
        stream = await client.open_stream(server.peer_id, ["/no/such/protocol/1"])
        await stream.write(b"hello")
        with pytest.raises(ProtocolNotSupported, match="/no/such/protocol/1"):
            await stream.read()
        assert await client.ping(server.peer_id) > 0  # the connection is unharmed


async def test_unknown_peer_and_dead_address_fail_clearly() -> None:
    async with Node(listen=LOOPBACK, quic_config=IMPATIENT) as node:
        stranger = KeyPair.generate().peer_id
        with pytest.raises(PeerUnreachable, match="no known address"):
            await node.connect(stranger)
        dead = Multiaddr.parse(f"/ip4/127.0.0.1/udp/9/quic-v1/p2p/{stranger}")
        with pytest.raises(DialError):
            await node.swarm.dial_addr(dead)
        with pytest.raises(DialError, match="ourselves"):
            await node.connect(node.peer_id)


async def test_dead_bootstrap_peer_does_not_stop_start(caplog: pytest.LogCaptureFixture) -> None:
    stranger = KeyPair.generate().peer_id
    dead = f"/ip4/127.0.0.1/udp/9/quic-v1/p2p/{stranger}"
    caplog.set_level(logging.WARNING)
    async with Node(listen=LOOPBACK, bootstrap=[dead], quic_config=IMPATIENT) as node:
        assert node.connected_peers() == []
    assert any("bootstrap peer" in record.message for record in caplog.records)


def test_bootstrap_address_needs_a_peer_id() -> None:
    with pytest.raises(ValueError, match="must end in /p2p/"):
        Node(bootstrap=["/ip4/127.0.0.1/udp/4001/quic-v1"])


async def test_key_file_is_created_private_and_reused(tmp_path) -> None:
    key_file = tmp_path / "node.key"
    async with Node(listen=LOOPBACK, key_file=key_file) as first:
        peer_id = first.peer_id
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    async with Node(listen=LOOPBACK, key_file=key_file) as again:
        assert again.peer_id == peer_id


def test_corrupt_key_file_is_an_error_and_is_kept(tmp_path) -> None:
    key_file = tmp_path / "node.key"
    key_file.write_bytes(b"not a key")
    with pytest.raises(KeyFileError):
        Node(key_file=key_file)
    assert key_file.read_bytes() == b"not a key"


async def test_listen_on_a_taken_port_is_a_clear_error() -> None:
    async with Node(listen=LOOPBACK) as first:
        taken = first.addrs[0].without_peer_id()
        with pytest.raises(DialError, match="cannot bind"):
            async with Node(listen=[taken]):
                pass


async def test_stop_closes_connections_on_the_remote() -> None:
    async with Node(listen=LOOPBACK) as survivor:
        leaving = Node(listen=LOOPBACK, bootstrap=[survivor.addrs[0]])
        await leaving.start()
        connection = survivor.connection_to(leaving.peer_id)
        assert connection is not None
        await leaving.stop()
        async with asyncio.timeout(5):
            await connection.closed
        assert survivor.connected_peers() == []


async def test_tcp_transport_carries_the_same_protocols() -> None:
    """identify, ping and RPC run unchanged over TCP + Noise + Yamux."""
    async with Node(listen=["/ip4/127.0.0.1/tcp/0"]) as server, Node(listen=LOOPBACK) as client:
        tcp_addr = next(a for a in server.addrs if a.has("tcp"))
        await client.connect(tcp_addr)
        connection = client.connection_to(server.peer_id)
        assert connection is not None and connection.transport == "tcp"
        info = client.identify_info(server.peer_id)
        assert info is not None and info.observed_addr is not None
        assert info.observed_addr.has("tcp")
        assert await client.ping(server.peer_id) > 0

        @server.rpc.method("echo")
        async def echo(value: object) -> object:
            return value

        assert await client.rpc.call(server.peer_id, "echo", [1, "two", b"3"]) == [1, "two", b"3"]


async def test_dialing_the_wrong_peer_id_says_so() -> None:
    async with Node(listen=LOOPBACK) as server, Node(listen=LOOPBACK) as client:
        stranger = KeyPair.generate().peer_id
        wrong = server.addrs[0].with_peer_id(stranger)
        with pytest.raises(PeerIdMismatch) as caught:
            await client.connect(wrong)
        assert caught.value.actual == server.peer_id


async def test_connect_fails_fast_when_the_peer_hangs_up_during_identify() -> None:
    async with Node(listen=LOOPBACK) as server, Node(listen=LOOPBACK) as client:

        async def hang_up(stream: Stream) -> None:
            connection = server.connection_to(stream.remote_peer)
            await connection.close("we do not like your protocol version")

        server.set_stream_handler("/ipfs/id/1.0.0", hang_up)
        started = asyncio.get_running_loop().time()
        with pytest.raises(ConnectionClosed, match="during identify"):
            await client.connect(server.addrs[0])
        assert asyncio.get_running_loop().time() - started < 5


async def test_nodes_of_named_clusters_share_the_view() -> None:
    async with Node(listen=LOOPBACK, cluster="lab") as first:
        async with Node(listen=LOOPBACK, bootstrap=[first.addrs[0]], cluster="home") as second:
            assert first.view is not None and second.view is not None
            first.view.export_actor("learner", "Learner", {"act": "async"})
            await second.view.wait_until(lambda: second.view.actor("learner") is not None, 10)
            members = {m.peer_id: m.cluster_name for m in second.view.members()}
            assert members[str(first.peer_id)] == "lab"
    async with Node(listen=LOOPBACK) as plain:
        assert plain.view is None  # no cluster name: not a member
