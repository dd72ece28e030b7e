"""Pure tests of the routing table: distance, k-buckets, eviction policy, diversity filter."""

from __future__ import annotations

import hashlib

import pytest

from lattica_ray.dht.routing import (
    AddResult,
    DiversityFilter,
    RoutingTable,
    common_prefix_length,
    ip_group,
    kad_id,
    peer_kad_id,
    random_key_with_cpl,
)
from tests.dht.conftest import key_pair
from transport.identity import PeerId
from transport.multiaddr import Multiaddr

LOCAL = key_pair().peer_id
PUBLIC = [Multiaddr.parse("/ip4/127.0.0.1/udp/1/quic-v1")]  # exempt from diversity by default


def peers_in_bucket(table: RoutingTable, cpl: int, count: int) -> list[PeerId]:
    """Fresh peers that land in bucket `cpl` of `table`."""
    found: list[PeerId] = []
    while len(found) < count:
        peer = key_pair().peer_id
        if table.bucket_index(peer) == cpl:
            found.append(peer)
    return found


def addr(ip: str) -> list[Multiaddr]:
    return [Multiaddr.parse(f"/ip4/{ip}/udp/4001/quic-v1")]


def test_distance_is_xor_of_sha256() -> None:
    key = b"some key"
    assert kad_id(key) == int.from_bytes(hashlib.sha256(key).digest(), "big")
    assert peer_kad_id(LOCAL) == kad_id(LOCAL.multihash)
    assert common_prefix_length(0b1 << 255, 0b1 << 255) == 256
    assert common_prefix_length(0, 1 << 255) == 0
    assert common_prefix_length(0, 1) == 255


@pytest.mark.parametrize("cpl", [0, 1, 5, 9])
def test_random_key_lands_in_the_bucket(cpl: int) -> None:
    local = peer_kad_id(LOCAL)
    key = random_key_with_cpl(local, cpl)
    assert key[:2] == b"\x12\x20" and len(key) == 34  # shaped like a sha2-256 peer ID
    assert common_prefix_length(local, kad_id(key)) == cpl


def test_closest_orders_by_xor_distance() -> None:
    table = RoutingTable(LOCAL, k=20)
    peers = [key_pair().peer_id for _ in range(60)]
    for peer in peers:
        table.add(peer, PUBLIC, now=0.0)
    target = kad_id(b"target")
    in_table = list(table)
    expected = sorted(in_table, key=lambda p: peer_kad_id(p) ^ target)[:10]
    assert table.closest(target, 10) == expected
    assert expected[0] not in table.closest(target, 10, exclude=[expected[0]])
    assert len(table.closest(target, 10, exclude=[expected[0]])) == 10


def test_self_is_never_added() -> None:
    table = RoutingTable(LOCAL)
    assert table.add(LOCAL, PUBLIC, 0.0).result is AddResult.REJECTED_SELF
    assert len(table) == 0


def test_full_bucket_keeps_fresh_long_lived_peers() -> None:
    table = RoutingTable(LOCAL, k=3, stale_peer_age=600.0)
    old = peers_in_bucket(table, 0, 3)
    for peer in old:
        assert table.add(peer, PUBLIC, now=0.0).result is AddResult.ADDED
    newcomer = peers_in_bucket(table, 0, 1)[0]
    outcome = table.add(newcomer, PUBLIC, now=100.0)  # the old ones were seen 100 s ago
    assert outcome.result is AddResult.BUCKET_FULL
    assert outcome.probe is None  # fresh entries are not even probed
    assert newcomer not in table and all(p in table for p in old)


def test_stale_entry_is_probed_and_kept_when_alive() -> None:
    table = RoutingTable(LOCAL, k=2, stale_peer_age=600.0)
    a, b = peers_in_bucket(table, 0, 2)
    table.add(a, PUBLIC, now=0.0)
    table.add(b, PUBLIC, now=500.0)
    newcomer = peers_in_bucket(table, 0, 1)[0]
    outcome = table.add(newcomer, PUBLIC, now=1000.0)
    assert outcome.probe == a  # the least recently seen
    assert table.add(peers_in_bucket(table, 0, 1)[0], PUBLIC, now=1000.0).probe is None  # once
    table.probe_result(a, alive=True, now=1001.0)
    assert a in table and newcomer not in table


def test_dead_stale_entry_makes_room_for_the_newest_candidate() -> None:
    table = RoutingTable(LOCAL, k=2, stale_peer_age=600.0)
    a, b = peers_in_bucket(table, 0, 2)
    table.add(a, PUBLIC, now=0.0)
    table.add(b, PUBLIC, now=500.0)
    first, second = peers_in_bucket(table, 0, 2)
    assert table.add(first, PUBLIC, now=1000.0).probe == a
    table.add(second, PUBLIC, now=1001.0)
    table.probe_result(a, alive=False, now=1002.0)
    assert a not in table
    assert second in table  # the freshest candidate
    assert first not in table


def test_failures_remove_after_max_and_promote_replacement() -> None:
    table = RoutingTable(LOCAL, k=1, max_failures=2)
    a = peers_in_bucket(table, 0, 1)[0]
    table.add(a, PUBLIC, now=0.0)
    candidate = peers_in_bucket(table, 0, 1)[0]
    table.add(candidate, PUBLIC, now=1.0)
    assert not table.failed(a)
    table.seen(a, 2.0)  # an answer resets the count
    assert not table.failed(a)
    assert table.failed(a)
    assert a not in table and candidate in table


def test_blocked_peer_is_refused_until_the_block_ends() -> None:
    table = RoutingTable(LOCAL)
    peer = key_pair().peer_id
    table.add(peer, PUBLIC, 0.0)
    table.block(peer, until=100.0)
    assert peer not in table
    assert table.add(peer, PUBLIC, 50.0).result is AddResult.REJECTED_BLOCKED
    assert table.add(peer, PUBLIC, 100.0).result is AddResult.ADDED


def test_buckets_to_refresh_follow_the_deepest_bucket() -> None:
    table = RoutingTable(LOCAL, k=20)
    for peer in peers_in_bucket(table, 0, 2) + peers_in_bucket(table, 3, 1):
        table.add(peer, PUBLIC, 0.0)
    assert table.buckets_to_refresh(now=1000.0, interval=600.0, max_cpl=15) == [0, 1, 2, 3]
    assert table.buckets_to_refresh(now=1000.0, interval=600.0, max_cpl=1) == [0, 1]
    table.mark_refreshed(random_key_target(table, 2), now=900.0)
    assert table.buckets_to_refresh(now=1000.0, interval=600.0, max_cpl=15) == [0, 1, 3]


def random_key_target(table: RoutingTable, cpl: int) -> int:
    return kad_id(random_key_with_cpl(table.local_point, cpl))


# -- diversity filter ---------------------------------------------------------------------------
def test_ip_groups_follow_go_libp2p() -> None:
    assert ip_group(addr("5.6.7.8")[0], True) == "5.6.0.0/16"
    assert ip_group(addr("12.34.56.78")[0], True) == "12.0.0.0/8"  # legacy class A
    assert ip_group(addr("192.168.1.2")[0], True) == ""  # private: exempt
    assert ip_group(addr("192.168.1.2")[0], False) == "192.168.0.0/16"
    assert ip_group(Multiaddr.parse("/ip6/2001:4860::1/udp/1/quic-v1"), True) == "2001:4860::/32"
    assert ip_group(Multiaddr.parse("/dns4/example.org/udp/1/quic-v1"), True) is None


def test_at_most_two_per_group_per_bucket() -> None:
    table = RoutingTable(LOCAL, k=20, diversity=DiversityFilter(2, 3))
    same_bucket = peers_in_bucket(table, 0, 3)
    results = [table.add(p, addr(f"5.6.{i}.1"), 0.0).result for i, p in enumerate(same_bucket)]
    assert results == [AddResult.ADDED, AddResult.ADDED, AddResult.REJECTED_DIVERSITY]
    other = peers_in_bucket(table, 0, 1)[0]
    assert table.add(other, addr("5.7.0.1"), 0.0).result is AddResult.ADDED  # another /16


def test_at_most_three_per_group_per_table() -> None:
    table = RoutingTable(LOCAL, k=20, diversity=DiversityFilter(2, 3))
    spread = [peers_in_bucket(table, cpl, 1)[0] for cpl in range(4)]
    results = [table.add(p, addr(f"5.6.0.{i + 1}"), 0.0).result for i, p in enumerate(spread)]
    assert results[:3] == [AddResult.ADDED] * 3
    assert results[3] is AddResult.REJECTED_DIVERSITY
    assert table.diversity is not None and table.diversity.table_count("5.6.0.0/16") == 3
    table.remove(spread[0])  # leaving frees the slot
    assert table.add(spread[3], addr("5.6.0.4"), 0.0).result is AddResult.ADDED


def test_peer_with_one_crowded_address_is_refused() -> None:
    table = RoutingTable(LOCAL, k=20, diversity=DiversityFilter(2, 3))
    for i, peer in enumerate(peers_in_bucket(table, 0, 2)):
        table.add(peer, addr(f"5.6.0.{i + 1}"), 0.0)
    mixed = peers_in_bucket(table, 0, 1)[0]
    both = addr("9.9.9.9") + addr("5.6.0.9")
    assert table.add(mixed, both, 0.0).result is AddResult.REJECTED_DIVERSITY


def test_peer_without_ip_address_is_refused_and_private_ones_are_exempt() -> None:
    table = RoutingTable(LOCAL, k=20, diversity=DiversityFilter(2, 3))
    assert table.add(key_pair().peer_id, [], 0.0).result is AddResult.REJECTED_DIVERSITY
    lan = [table.add(key_pair().peer_id, addr("10.0.0.1"), 0.0).result for _ in range(10)]
    assert lan == [AddResult.ADDED] * 10


def test_promoted_replacement_must_pass_diversity() -> None:
    table = RoutingTable(LOCAL, k=2, diversity=DiversityFilter(2, 3))
    a, b = peers_in_bucket(table, 0, 2)
    table.add(a, addr("9.9.9.9"), 0.0)
    table.add(b, addr("5.6.0.2"), 0.0)
    table.add(peers_in_bucket(table, 1, 1)[0], addr("5.6.0.3"), 0.0)
    table.add(peers_in_bucket(table, 2, 1)[0], addr("5.6.0.4"), 0.0)  # 5.6/16 is full (3)
    crowded, fine = peers_in_bucket(table, 0, 2)
    table.add(fine, addr("7.7.7.7"), 1.0)  # bucket 0 is full: both become candidates
    table.add(crowded, addr("5.6.0.5"), 2.0)
    table.remove(a)
    assert crowded not in table  # the freshest candidate, but its group is full
    assert fine in table
