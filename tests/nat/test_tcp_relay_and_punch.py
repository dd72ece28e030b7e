"""Relay and hole punching over TCP on loopback: nodes that speak no QUIC at all.

A node whose network drops UDP holds its relay slot over TCP and is reachable through it;
DCUtR then upgrades the relayed connection to a direct TCP one, each side dialing from its
listen port (a simultaneous open, or one SYN meeting the other's listener), with A (the side
that dialed the relayed connection) as the client of Noise and Yamux.
"""

from __future__ import annotations

import asyncio
import select
import socket
import time

from lattica_ray import Node
from transport.connection import HOLEPUNCHED, RELAYED
from transport.identity import KeyPair
from transport.multiaddr import Multiaddr
from transport.stream import Stream

TCP_ONLY = ["/ip4/127.0.0.1/tcp/0"]
PROTOCOL = "/test/echo/1"


async def _echo(stream: Stream) -> None:
    await stream.write(await stream.read_to_end(max_size=1 << 24))
    await stream.close()


async def _wait_for_path(node: Node, peer, path: str, timeout: float = 10.0) -> None:
    """Until `node`'s punching with `peer` gives a direct connection (waits for that event)."""
    outcome = await node.nat.wait_direct(peer, timeout)
    assert (outcome.status, outcome.path) == ("direct", path), outcome


async def test_tcp_only_peer_is_reached_through_a_relay_then_punched_directly() -> None:
    async with Node(listen=TCP_ONLY, use_relays=False) as relay:
        async with Node(listen=TCP_ONLY) as hidden, Node(listen=TCP_ONLY) as caller:
            hidden.set_stream_handler(PROTOCOL, _echo)
            await hidden.reserve_relay(relay.addrs[0])
            reservation_path = hidden.connection_to(relay.peer_id)
            assert reservation_path is not None and reservation_path.transport == "tcp"
            circuit = [a for a in hidden.addrs if a.is_relayed]
            assert circuit and "/tcp/" in str(circuit[0]), hidden.addrs
            caller.add_peer_addrs(hidden.peer_id, circuit)  # the ONLY address it knows

            stream = await caller.open_stream(hidden.peer_id, [PROTOCOL])
            first = caller.connection_to(hidden.peer_id)
            assert first is not None and first.path == RELAYED
            await stream.write(b"through the relay")
            await stream.close()
            assert await stream.read_to_end() == b"through the relay"

            # DCUtR over the relayed connection: both sides end on one direct TCP connection.
            await _wait_for_path(caller, hidden.peer_id, HOLEPUNCHED)
            await _wait_for_path(hidden, caller.peer_id, HOLEPUNCHED)
            direct = caller.connection_to(hidden.peer_id)
            back = hidden.connection_to(caller.peer_id)
            assert direct is not None and back is not None
            assert direct.transport == back.transport == "tcp"
            # A (the caller dialed the relayed connection) is the client; B the server.
            assert direct.is_initiator and not back.is_initiator
            assert hidden.nat.holepuncher.punch_state(caller.peer_id).ours == 1  # B punched, once
            # Both dialed from their listen ports: the connection joins the two listen ports.
            assert direct.local_addr is not None and direct.remote_addr is not None
            assert direct.local_addr.value_for("tcp") == caller.swarm.listen_addrs[0].value_for(
                "tcp"
            )
            assert direct.remote_addr.without_peer_id() == hidden.swarm.listen_addrs[0]

            relayed_before = relay.relay_server.bytes_relayed
            stream = await caller.open_stream(hidden.peer_id, [PROTOCOL])
            payload = bytes(range(256)) * 4096
            await stream.write(payload)
            await stream.close()
            assert await stream.read_to_end(max_size=1 << 24) == payload
            # Not through the relay (background traffic there, a ping or so, is a few bytes).
            assert relay.relay_server.bytes_relayed - relayed_before < len(payload) // 100


async def test_when_only_the_servers_syn_gets_through_the_client_keeps_its_role() -> None:
    """B's SYN reaches A's listener (A's own SYN was lost): A upgrades that inbound connection
    as the client, B as the server, as DCUtR assigned; no handshake with two servers."""
    async with Node(listen=TCP_ONLY, use_relays=False) as relay:
        async with Node(listen=TCP_ONLY) as hidden, Node(listen=TCP_ONLY) as caller:
            await hidden.reserve_relay(relay.addrs[0])
            await caller.connect(relay.addrs[0])
            assert caller.swarm.tcp is not None
            lost: list[str] = []

            async def syn_lost(address, *args, **kwargs):
                lost.append(str(address))
                await asyncio.Event().wait()  # never answered, as a SYN a NAT dropped

            caller.swarm.tcp.dial = syn_lost  # type: ignore[method-assign]
            caller.add_peer_addrs(hidden.peer_id, [a for a in hidden.addrs if a.is_relayed])
            await caller.ping(hidden.peer_id)

            await _wait_for_path(caller, hidden.peer_id, HOLEPUNCHED)
            await _wait_for_path(hidden, caller.peer_id, HOLEPUNCHED)
            assert lost  # the caller did try
            direct = caller.connection_to(hidden.peer_id)
            back = hidden.connection_to(caller.peer_id)
            assert direct is not None and back is not None
            assert direct.is_initiator and not back.is_initiator
            assert caller.swarm.tcp.client_role_for == set()  # only while punching
            assert await caller.ping(hidden.peer_id) > 0


async def test_a_side_whose_nat_may_be_stale_has_its_syn_out_before_it_goes_on() -> None:
    """A SYN of ours to the peer's address went unanswered lately, so our NAT may track that
    port pair half-open: our punch SYN must have LEFT before we send SYNC (or our reply), not
    merely be scheduled; the peer answers SYNC within a millisecond on a short path, and its
    SYN reaching our NAT first kills the punch (tests/nat/test_tcp_punch_stale_entry.py)."""
    with socket.create_server(("127.0.0.1", 0)) as their_listener:
        port = their_listener.getsockname()[1]
        async with Node(listen=TCP_ONLY, use_relays=False) as node:
            assert node.swarm.tcp is not None
            node.swarm.tcp.unanswered_syns[("127.0.0.1", port)] = time.monotonic()
            their_addr = Multiaddr.parse(f"/ip4/127.0.0.1/tcp/{port}")
            await node.nat.holepuncher._dial_first_if_stale(
                KeyPair.generate().peer_id, [their_addr], client=True
            )
            # Blocking on purpose: no task of ours runs meanwhile, so the SYN must be out.
            arrived, _, _ = select.select([their_listener], [], [], 2.0)
            assert arrived, "the punch SYN had not left when DCUtR would go on"
            accepted, source = their_listener.accept()
            accepted.close()
            assert str(source[1]) == node.swarm.tcp.listen_addrs[0].value_for("tcp")  # listen port
