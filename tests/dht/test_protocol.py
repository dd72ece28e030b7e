"""Pure tests of the kad-dht wire codec, the lookup state machine and the request handler."""

from __future__ import annotations

import pytest

from lattica_ray.dht.errors import InvalidRecord, MalformedMessage
from lattica_ray.dht.pb import dht_pb2
from lattica_ray.dht.protocol import (
    DecodeLimits,
    KadServer,
    Lookup,
    Message,
    MessageType,
    PeerInfo,
    QueryState,
    Record,
    RecordQuery,
    ReferralLedger,
    TokenBuckets,
    decode_message,
    encode_message,
    is_multihash,
)
from lattica_ray.dht.records import NamespacedValidator, ProviderStore, RecordStore, SignedRecord
from lattica_ray.dht.routing import RoutingTable, kad_id, peer_kad_id
from tests.dht.conftest import key_pair
from transport.identity import PeerId
from transport.multiaddr import Multiaddr

LIMITS = DecodeLimits()
NOW = 1_700_000_000.0
ADDR = Multiaddr.parse("/ip4/10.1.2.3/udp/4001/quic-v1")


# -- codec ------------------------------------------------------------------------------------
def test_wire_bytes_follow_the_spec() -> None:
    """Field numbers and types as in the spec's protobuf (type=1, key=2, closerPeers=8...)."""
    assert encode_message(Message(MessageType.FIND_NODE, b"abc")) == b"\x08\x04\x12\x03abc"
    assert encode_message(Message(MessageType.PUT_VALUE, b"k")) == b"\x12\x01k"  # type 0: default
    peer = key_pair().peer_id
    encoded = encode_message(Message(MessageType.FIND_NODE, closer_peers=(PeerInfo(peer),)))
    entry = b"\x0a" + bytes([len(peer.multihash)]) + peer.multihash
    assert encoded == b"\x08\x04" + b"\x42" + bytes([len(entry)]) + entry


def test_round_trip_of_every_field() -> None:
    a, b = key_pair().peer_id, key_pair().peer_id
    message = Message(
        MessageType.GET_PROVIDERS,
        b"\x12\x20" + b"k" * 32,
        Record(b"key", b"value", "2024-01-01T00:00:00Z", publisher=a.multihash, ttl=3600),
        (PeerInfo(a, (ADDR,)),),
        (PeerInfo(b, (ADDR, Multiaddr.parse("/ip6/::1/udp/1/quic-v1"))),),
    )
    assert decode_message(encode_message(message), LIMITS) == message


def test_rust_libp2p_record_fields() -> None:
    """publisher = 666 and ttl = 777, as rust-libp2p (and so the lattica SDK) sends them."""
    publisher = key_pair().peer_id
    pb = dht_pb2.Message(type=0, key=b"k")
    pb.record.key, pb.record.value = b"k", b"v"
    pb.record.publisher, pb.record.ttl = publisher.multihash, 599
    wire = pb.SerializeToString()
    assert b"\xd2\x29" + bytes([len(publisher.multihash)]) in wire  # field 666, bytes
    assert b"\xc8\x30\xd7\x04" in wire  # field 777, varint 599
    decoded = decode_message(wire, LIMITS)
    assert decoded.record == Record(b"k", b"v", publisher=publisher.multihash, ttl=599)
    pb.record.publisher = b"not a peer id"
    with pytest.raises(MalformedMessage, match="publisher"):
        decode_message(pb.SerializeToString(), LIMITS)


def test_addresses_are_normalised_and_filtered() -> None:
    peer, other = key_pair().peer_id, key_pair().peer_id
    pb = dht_pb2.Message(type=4)
    entry = pb.closerPeers.add(id=peer.multihash)
    entry.addrs.append(ADDR.with_peer_id(peer).to_bytes())  # trailing /p2p/<self>: stripped
    entry.addrs.append(ADDR.with_peer_id(other).to_bytes())  # names someone else: dropped
    entry.addrs.append(b"\xff\xff\x03garbage")  # unknown protocol: skipped, not fatal
    relay = Multiaddr.parse(f"/ip4/1.2.3.4/udp/1/quic-v1/p2p/{other}/p2p-circuit")
    entry.addrs.append(relay.to_bytes())
    decoded = decode_message(pb.SerializeToString(), LIMITS)
    assert decoded.closer_peers[0].addrs == (ADDR, relay)
    assert decoded.closer_peers[0].dialable_addrs == [
        ADDR.with_peer_id(peer),
        relay.with_peer_id(peer),
    ]


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"\xff\xff\xff", "does not parse"),
        (b"\x08\x07", "unknown kad message type"),
        (dht_pb2.Message(type=4, key=b"k" * 2000).SerializeToString(), "key of 2000"),
        (
            dht_pb2.Message(type=0, record=dht_pb2.Record(value=b"v" * 70_000)).SerializeToString(),
            "record of 70000",
        ),
        (
            dht_pb2.Message(
                type=4, closerPeers=[dht_pb2.Message.Peer(id=b"\x00\x01x")]
            ).SerializeToString(),
            "invalid peer ID",
        ),
    ],
)
def test_malformed_messages_are_refused(data: bytes, reason: str) -> None:
    with pytest.raises(MalformedMessage, match=reason):
        decode_message(data, LIMITS)


def test_too_many_closer_peers_is_refused() -> None:
    pb = dht_pb2.Message(type=4)
    for _ in range(LIMITS.max_peers + 1):
        pb.closerPeers.add(id=key_pair().peer_id.multihash)
    with pytest.raises(MalformedMessage, match="closer peers exceed"):
        decode_message(pb.SerializeToString(), LIMITS)


def test_duplicate_peers_and_extra_addresses_are_trimmed() -> None:
    peer = key_pair().peer_id
    pb = dht_pb2.Message(type=4)
    for _ in range(3):
        entry = pb.closerPeers.add(id=peer.multihash)
        for port in range(1, 40):
            entry.addrs.append(Multiaddr.parse(f"/ip4/10.0.0.1/udp/{port}/quic-v1").to_bytes())
    decoded = decode_message(pb.SerializeToString(), LIMITS)
    assert len(decoded.closer_peers) == 1
    assert len(decoded.closer_peers[0].addrs) == LIMITS.max_addrs_per_peer


def test_multihash_keys() -> None:
    assert is_multihash(b"\x12\x20" + b"x" * 32)
    assert not is_multihash(b"\x12\x20" + b"x" * 31)
    assert not is_multihash(b"/lattica/actor/x")


# -- lookup -----------------------------------------------------------------------------------
class StaticNetwork:
    """Each peer knows its `known` nearest peers and as many random others (a Kademlia-like
    table) and answers with the k closest it knows."""

    def __init__(self, size: int, known: int, seed: int = 7) -> None:
        import random

        rng = random.Random(seed)
        self.peers = [key_pair().peer_id for _ in range(size)]
        self.knows = {
            p: list(
                dict.fromkeys(
                    self.truth(peer_kad_id(p), known + 1)[1:] + rng.sample(self.peers, known)
                )
            )
            for p in self.peers
        }

    def answer(self, peer: PeerId, target: int, k: int) -> list[PeerId]:
        return sorted(self.knows[peer], key=lambda p: peer_kad_id(p) ^ target)[:k]

    def truth(self, target: int, k: int) -> list[PeerId]:
        return sorted(self.peers, key=lambda p: peer_kad_id(p) ^ target)[:k]


def drive(lookup: Lookup, net: StaticNetwork, dead: frozenset[PeerId] = frozenset()) -> int:
    rounds = 0
    while not lookup.finished:
        batch = lookup.next_queries()
        if not batch:
            break
        assert len(batch) <= lookup.alpha_per_path * len(lookup.paths)
        rounds += 1
        for peer in batch:
            if peer in dead:
                lookup.on_failure(peer)
            else:
                lookup.on_response(peer, net.answer(peer, lookup.target, lookup.k))
    return rounds


@pytest.mark.parametrize("paths", [1, 3])
def test_lookup_finds_the_true_closest(paths: int) -> None:
    net = StaticNetwork(300, known=40)
    target = kad_id(b"some key")
    lookup = Lookup(target, net.knows[net.peers[0]], k=20, alpha=9, paths=paths)
    drive(lookup, net)
    assert lookup.finished
    assert lookup.closest() == net.truth(target, 20)


def test_lookup_survives_dead_peers_and_stops_when_the_closest_answered() -> None:
    net = StaticNetwork(300, known=40)
    target = kad_id(b"another key")
    dead = frozenset(net.peers[1::3])
    lookup = Lookup(target, net.knows[net.peers[0]], k=20, alpha=10)
    drive(lookup, net, dead)
    alive_truth = [p for p in net.truth(target, 60) if p not in dead][:20]
    found = lookup.closest()
    assert len(found) == 20 and not set(found) & dead
    assert found[:10] == alive_truth[:10]  # answers name dead peers too, so the tail may differ
    assert lookup.failures > 0


def test_alpha_bounds_requests_in_flight() -> None:
    seeds = [key_pair().peer_id for _ in range(30)]
    lookup = Lookup(kad_id(b"t"), seeds, k=20, alpha=10)
    first = lookup.next_queries()
    assert len(first) == 10
    assert lookup.next_queries() == []  # nothing more until someone answers
    lookup.on_response(first[0], [])
    assert len(lookup.next_queries()) == 1


def test_disjoint_paths_never_share_a_peer() -> None:
    net = StaticNetwork(200, known=30)
    lookup = Lookup(kad_id(b"x"), net.knows[net.peers[0]], k=10, alpha=6, paths=3)
    drive(lookup, net)
    owners: dict[PeerId, int] = {}
    for index, path in enumerate(lookup.paths):
        for candidate in path.candidates:
            assert owners.setdefault(candidate.peer, index) == index


def test_depth_and_referrer_are_tracked_and_referrals_can_be_dropped() -> None:
    seed = key_pair().peer_id
    named = [key_pair().peer_id for _ in range(5)]
    lookup = Lookup(kad_id(b"t"), [seed], k=20, alpha=1)
    assert lookup.next_queries() == [seed]
    lookup.on_response(seed, named)
    assert lookup.depth_of(seed) == 1 and lookup.depth_of(named[0]) == 2
    assert lookup.referrer_of(named[0]) == seed
    assert lookup.forget_referrals(seed) == 5
    assert lookup.next_queries() == []
    assert lookup.finished
    assert lookup.state_of(named[0]) is QueryState.FAILED


def test_stop_ends_the_lookup() -> None:
    lookup = Lookup(kad_id(b"t"), [key_pair().peer_id for _ in range(3)], k=20)
    lookup.next_queries()
    lookup.stop()
    assert lookup.finished and lookup.next_queries() == []


# -- server -----------------------------------------------------------------------------------
@pytest.fixture
def server() -> KadServer:
    me = key_pair()
    table = RoutingTable(me.peer_id, k=20)
    for _ in range(40):
        table.add(key_pair().peer_id, [ADDR], NOW)
    validator = NamespacedValidator.default(48 * 3600, 300, 1024, 65536)
    return KadServer(
        me.peer_id,
        table,
        RecordStore(validator, 100, 36 * 3600),
        ProviderStore(48 * 3600, 24 * 3600, 100, 10),
        addrs_of=lambda peer: [ADDR.with_peer_id(peer)],
        own_addrs=lambda: [ADDR.with_peer_id(me.peer_id)],
        k=20,
    )


def test_find_node_returns_the_k_closest_but_not_the_requester(server: KadServer) -> None:
    key = b"\x12\x20" + b"t" * 32
    everyone = server.table.closest(kad_id(key), 40)
    requester = everyone[0]
    response = server.handle(requester, Message(MessageType.FIND_NODE, key), NOW)
    assert response is not None
    assert [p.peer_id for p in response.closer_peers] == everyone[1:21]
    assert response.closer_peers[0].addrs == (ADDR,)
    exact = server.handle(requester, Message(MessageType.FIND_NODE, server.local.multihash), NOW)
    assert exact is not None and [p.peer_id for p in exact.closer_peers] == [server.local]


def test_put_and_get_value(server: KadServer) -> None:
    author = key_pair()
    key = b"/lattica/actor/a"
    old = SignedRecord.create(author, key, b"old", NOW, 3600).encode()
    new = SignedRecord.create(author, key, b"new", NOW + 1, 3600).encode()
    sender = key_pair().peer_id
    put = server.handle(sender, Message(MessageType.PUT_VALUE, key, Record(key, new)), NOW + 1)
    assert put is not None and put.record == Record(key, new)  # echoed: stored
    stale = server.handle(sender, Message(MessageType.PUT_VALUE, key, Record(key, old)), NOW + 1)
    assert stale is not None and stale.record == Record(key, new)  # ours is newer
    got = server.handle(sender, Message(MessageType.GET_VALUE, key), NOW + 2)
    assert got is not None and len(got.closer_peers) == 20
    # rust-libp2p's fields: the publisher (the sender, since its put named none), seconds left
    assert got.record == Record(key, new, publisher=sender.multihash, ttl=3599)
    missing = server.handle(sender, Message(MessageType.GET_VALUE, b"/lattica/x/y"), NOW)
    assert missing is not None and missing.record is None


def test_bad_puts_are_refused(server: KadServer) -> None:
    key = b"/lattica/actor/a"
    sender = key_pair().peer_id
    with pytest.raises(InvalidRecord):
        server.handle(sender, Message(MessageType.PUT_VALUE, key, Record(key, b"unsigned")), NOW)
    with pytest.raises(MalformedMessage, match="without a record"):
        server.handle(sender, Message(MessageType.PUT_VALUE, key), NOW)
    other = SignedRecord.create(key_pair(), b"/lattica/x/y", b"v", NOW, 60).encode()
    with pytest.raises(MalformedMessage, match="differs"):
        server.handle(
            sender, Message(MessageType.PUT_VALUE, key, Record(b"/lattica/x/y", other)), NOW
        )
    assert len(server.records) == 0


def test_providers_are_only_accepted_from_themselves(server: KadServer) -> None:
    key = b"\x12\x20" + b"c" * 32
    sender, liar_victim = key_pair().peer_id, key_pair().peer_id
    request = Message(
        MessageType.ADD_PROVIDER,
        key,
        provider_peers=(PeerInfo(sender, (ADDR,)), PeerInfo(liar_victim, (ADDR,))),
    )
    assert server.handle(sender, request, NOW) is None  # ADD_PROVIDER has no response
    response = server.handle(key_pair().peer_id, Message(MessageType.GET_PROVIDERS, key), NOW)
    assert response is not None
    assert [p.peer_id for p in response.provider_peers] == [sender]
    assert response.provider_peers[0].addrs == (ADDR,)
    with pytest.raises(MalformedMessage, match="multihash"):
        server.handle(sender, Message(MessageType.ADD_PROVIDER, b"/not/a/cid"), NOW)


def test_ping(server: KadServer) -> None:
    assert server.handle(key_pair().peer_id, Message(MessageType.PING), NOW) == Message(
        MessageType.PING
    )


# -- abuse controls ---------------------------------------------------------------------------
def test_token_bucket() -> None:
    buckets = TokenBuckets(rate=2.0, burst=3)
    peer = key_pair().peer_id
    assert [buckets.allow(peer, 0.0) for _ in range(4)] == [True, True, True, False]
    assert buckets.allow(peer, 0.5)  # one token back after half a second
    assert not buckets.allow(peer, 0.5)
    assert buckets.allow(key_pair().peer_id, 0.5)  # others are not affected


def test_referral_ledger_judges_mostly_dead_referrals() -> None:
    ledger = ReferralLedger(threshold=10, ratio=0.8)
    honest, liar = key_pair().peer_id, key_pair().peer_id
    verdicts = [ledger.record(honest, alive=(i % 3 != 0)) for i in range(60)]  # 1/3 dead
    assert not any(verdicts)
    assert [ledger.record(liar, alive=False) for _ in range(10)][-1]
    ledger.decay()
    ledger.decay()
    assert not ledger.record(liar, alive=False)  # old behaviour fades


# -- collecting values ------------------------------------------------------------------------
def test_record_query_keeps_the_best_and_remembers_who_was_behind() -> None:
    validator = NamespacedValidator.default(48 * 3600, 300, 1024, 65536)
    author = key_pair()
    key = b"/lattica/actor/a"
    v1 = SignedRecord.create(author, key, b"v1", NOW, 3600).encode()
    v2 = SignedRecord.create(author, key, b"v2", NOW + 1, 3600).encode()
    a, b, c, d = (key_pair().peer_id for _ in range(4))
    query = RecordQuery(key, validator, quorum=4, local=v1)
    assert query.answers == 1 and not query.done
    query.on_record(a, Record(key, v1), NOW + 2)
    query.on_record(b, Record(key, v2), NOW + 2)  # newer: a (and our copy) are now behind
    query.on_record(c, Record(key, b"forged"), NOW + 2)  # invalid: corrected, not counted
    query.on_record(d, Record(b"/lattica/actor/other", v2), NOW + 2)  # wrong key: ignored
    assert query.best == v2 and query.holders == {b}
    assert query.outdated == {a, c}
    assert query.answers == 3 and not query.done
    query.on_record(d, Record(key, v1), NOW + 2)
    assert query.done and query.best == v2 and query.outdated == {a, c, d}
