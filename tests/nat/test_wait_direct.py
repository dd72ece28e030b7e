"""`NatManager.wait_direct` over real QUIC on loopback, through a relay: it ends on the event
that matters (a direct connection, or every punch attempt of both sides over), and says why."""

from __future__ import annotations

import asyncio

from lattica_ray import Node
from transport.connection import HOLEPUNCHED, RELAYED
from transport.nat.holepunch import DCUTR_PROTOCOL, EXTENDED_PROTOCOL

LOOPBACK = ["/ip4/127.0.0.1/udp/0/quic-v1"]


async def _hidden(relay: Node, node: Node) -> list:
    await node.reserve_relay(relay.addrs[0])
    circuit = [a for a in node.addrs if a.is_relayed]
    assert circuit, node.addrs
    return circuit


async def test_the_dialer_waits_for_the_punch_the_other_side_starts() -> None:
    async with Node(listen=LOOPBACK, use_relays=False) as relay:
        async with Node(listen=LOOPBACK) as hidden, Node(listen=LOOPBACK) as caller:
            caller.add_peer_addrs(hidden.peer_id, await _hidden(relay, hidden))
            await caller.connect(hidden.peer_id)
            # Nothing has been punched yet on this side: the request is still to come from B.
            assert caller.connection_to(hidden.peer_id).path == RELAYED
            outcome = await caller.nat.wait_direct(hidden.peer_id, 10.0)
            assert outcome.status == "direct", outcome
            assert outcome.path == HOLEPUNCHED and outcome.theirs == 1 and outcome.ours == 0


async def test_a_refused_request_waits_for_the_other_sides_punch() -> None:
    """Relayed connections both ways make both peers DCUtR's B: the smaller peer ID's request
    goes ahead, the other's is refused. The refused side used to retry at once, spending its
    three attempts within milliseconds, and `wait_direct` took that as the end although the
    other side's punch was still to come; the refused side now waits for that punch.

    On loopback either order happens; the requests are held so that the refusing one occurs:
    the larger side asks while the smaller side's own request is under way."""
    async with Node(listen=LOOPBACK, use_relays=False) as relay:
        async with Node(listen=LOOPBACK) as one, Node(listen=LOOPBACK) as other:
            small, large = sorted((one, other), key=lambda node: node.peer_id)
            small.add_peer_addrs(large.peer_id, await _hidden(relay, large))
            large.add_peer_addrs(small.peer_id, await _hidden(relay, small))
            large_asked = asyncio.Event()
            serve = small.nat.holepuncher._serve

            async def serve_then_tell(stream):
                try:
                    await serve(stream)
                finally:
                    large_asked.set()

            for protocol in (DCUTR_PROTOCOL, EXTENDED_PROTOCOL):
                small.swarm.set_stream_handler(protocol, serve_then_tell)
            small_open, large_open = small.swarm.open_stream, large.swarm.open_stream

            async def small_asks_second(peer, protocols):
                if {DCUTR_PROTOCOL, EXTENDED_PROTOCOL} & set(protocols):
                    await large_asked.wait()
                return await small_open(peer, protocols)

            async def large_asks_while_small_does(peer, protocols):
                if {DCUTR_PROTOCOL, EXTENDED_PROTOCOL} & set(protocols):
                    while small.nat.holepuncher.punch_state(large.peer_id).ours == 0:
                        await small.nat.holepuncher.next_change(large.peer_id)
                return await large_open(peer, protocols)

            small.swarm.open_stream = small_asks_second  # type: ignore[method-assign]
            large.swarm.open_stream = large_asks_while_small_does  # type: ignore[method-assign]
            # Each dials the other through the relay at the same moment: both are B.
            await asyncio.gather(small.connect(large.peer_id), large.connect(small.peer_id))
            small.nat.holepuncher.upgrade_soon(large.peer_id)
            large.nat.holepuncher.upgrade_soon(small.peer_id)
            outcomes = await asyncio.gather(
                small.nat.wait_direct(large.peer_id, 10.0),
                large.nat.wait_direct(small.peer_id, 10.0),
            )
            assert [o.status for o in outcomes] == ["direct", "direct"], outcomes
            assert outcomes[1].theirs == 1, outcomes  # the large side answered the small's punch
            # One request of its own (refused), then it waited: no attempt spent on a refusal.
            assert large.nat.holepuncher.punch_state(small.peer_id).ours == 1


async def test_no_connection_is_a_failure_with_its_reason() -> None:
    async with Node(listen=LOOPBACK) as one, Node(listen=LOOPBACK) as other:
        outcome = await one.nat.wait_direct(other.peer_id, 1.0)
        assert (outcome.status, outcome.path, outcome.reason) == ("failed", "none", "no connection")


async def test_a_direct_connection_answers_at_once() -> None:
    async with Node(listen=LOOPBACK) as one, Node(listen=LOOPBACK) as other:
        await one.connect(other.addrs[0])
        outcome = await asyncio.wait_for(one.nat.wait_direct(other.peer_id, 10.0), 1.0)
        assert (outcome.status, outcome.path) == ("direct", "direct")


async def test_punching_that_ended_before_the_call_gets_one_more_round() -> None:
    """A relayed connection whose punching failed earlier (at start-up, say) stays relayed
    for good unless someone asks again: `wait_direct` asks once more rather than report the
    old failure (that made the NAT matrix see a pair stay relayed within milliseconds)."""
    async with Node(listen=LOOPBACK, use_relays=False) as relay:
        async with Node(listen=LOOPBACK) as hidden, Node(listen=LOOPBACK) as caller:
            for protocol in (DCUTR_PROTOCOL, EXTENDED_PROTOCOL):  # the first round must fail
                caller.swarm.remove_stream_handler(protocol)
            caller.add_peer_addrs(hidden.peer_id, await _hidden(relay, hidden))
            await caller.connect(hidden.peer_id)
            first = await hidden.nat.wait_direct(caller.peer_id, 10.0)
            assert (first.status, first.path, first.ours) == ("failed", RELAYED, 3), first
            caller.nat.holepuncher.start()  # it answers punches again
            again = await hidden.nat.wait_direct(caller.peer_id, 10.0)
            assert (again.status, again.path, again.ours) == ("direct", HOLEPUNCHED, 1), again
