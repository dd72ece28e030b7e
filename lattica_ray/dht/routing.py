"""The Kademlia routing table: XOR distance over SHA-256, k-buckets, and the diversity filter.

Pure logic, no I/O and no clock: callers pass `now`. The table keeps long-lived peers (a full
bucket's oldest entry is only replaced once a probe shows it dead, as the Kademlia paper
says), and admits peers through go-libp2p's IP diversity filter so that one operator's address
block cannot fill a bucket or the table (eclipse resistance).
"""

from __future__ import annotations

import enum
import hashlib
import heapq
import ipaddress
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache

from transport.identity import PeerId
from transport.multiaddr import Multiaddr

KEY_BITS = 256  # kad-dht spec: distance is XOR of SHA-256 digests
K_BUCKET_SIZE = 20  # kad-dht spec: k

# go-libp2p-kbucket peerdiversity: IPv4 blocks allocated whole as legacy class A networks are
# one group per /8, everything else is grouped by /16.
_LEGACY_CLASS_A = tuple(
    ipaddress.IPv4Network(cidr)
    for cidr in (
        "12.0.0.0/8",
        "17.0.0.0/8",
        "19.0.0.0/8",
        "38.0.0.0/8",
        "48.0.0.0/8",
        "53.0.0.0/8",
        "56.0.0.0/8",
        "73.0.0.0/8",
    )
)
IPV6_GROUP_PREFIX = 32  # go groups IPv6 by ASN; without an ASN table we use the /32 allocation


@lru_cache(maxsize=1 << 17)
def kad_id(key: bytes) -> int:
    """The point of `key` in the 256-bit Kademlia space: SHA-256 of the key bytes (spec)."""
    return int.from_bytes(hashlib.sha256(key).digest(), "big")


def peer_kad_id(peer: PeerId) -> int:
    return kad_id(peer.multihash)


def common_prefix_length(a: int, b: int) -> int:
    """Leading bits `a` and `b` share; 256 when equal. Bucket index of `b` in `a`'s table."""
    return KEY_BITS - (a ^ b).bit_length()


def random_key_with_cpl(local: int, cpl: int) -> bytes:
    """A random FIND_NODE key (shaped as a sha2-256 peer ID) whose point shares exactly `cpl`
    leading bits with `local`, for refreshing bucket `cpl`.

    SHA-256 cannot be inverted, so this draws keys until one lands in the bucket: 2^(cpl+1)
    draws on average, which is why refresh stops at a small cpl (go: 15).
    """
    if not 0 <= cpl < KEY_BITS:
        raise ValueError(f"cpl must be in [0, {KEY_BITS}), not {cpl}")
    shift = KEY_BITS - cpl - 1
    want = (local >> shift) ^ 1  # same prefix, then the next bit flipped
    while True:
        for _ in range(4096):
            candidate = b"\x12\x20" + os.urandom(32)
            if int.from_bytes(hashlib.sha256(candidate).digest(), "big") >> shift == want:
                return candidate


# -- diversity filter ---------------------------------------------------------------------------
def ip_group(addr: Multiaddr, exempt_private: bool) -> str | None:
    """The diversity group of the first IP in `addr`; "" if exempt; None if it has no IP."""
    for name, value in addr.components:
        if name not in ("ip4", "ip6") or value is None:
            continue
        ip = ipaddress.ip_address(value)
        if exempt_private and not ip.is_global:
            return ""
        if isinstance(ip, ipaddress.IPv4Address):
            if any(ip in net for net in _LEGACY_CLASS_A):
                return str(ipaddress.IPv4Network(f"{ip}/8", strict=False))
            return str(ipaddress.IPv4Network(f"{ip}/16", strict=False))
        return str(ipaddress.IPv6Network(f"{ip}/{IPV6_GROUP_PREFIX}", strict=False))
    return None


class DiversityFilter:
    """go-libp2p's routing-table diversity rule: per address group, at most `max_per_bucket`
    peers in one bucket and `max_per_table` in the whole table.

    A peer belongs to the group of each of its addresses and must fit in all of them. A peer
    whose addresses carry no IP at all is refused (go does the same); loopback and private
    addresses are exempt when `exempt_private` (LANs and the in-memory test network).
    """

    def __init__(
        self, max_per_bucket: int = 2, max_per_table: int = 3, exempt_private: bool = True
    ):
        self.max_per_bucket = max_per_bucket
        self.max_per_table = max_per_table
        self.exempt_private = exempt_private
        self._table: dict[str, int] = {}
        self._bucket: dict[tuple[int, str], int] = {}

    def groups_for(self, addrs: Iterable[Multiaddr]) -> tuple[str, ...] | None:
        """The groups a peer with `addrs` counts in, or None if it cannot be grouped."""
        groups: list[str] = []
        seen_ip = False
        for addr in addrs:
            group = ip_group(addr, self.exempt_private)
            if group is None:
                continue
            seen_ip = True
            if group and group not in groups:
                groups.append(group)
        return tuple(groups) if seen_ip else None

    def allows(self, cpl: int, groups: tuple[str, ...]) -> bool:
        return all(
            self._table.get(g, 0) < self.max_per_table
            and self._bucket.get((cpl, g), 0) < self.max_per_bucket
            for g in groups
        )

    def add(self, cpl: int, groups: tuple[str, ...]) -> None:
        for g in groups:
            self._table[g] = self._table.get(g, 0) + 1
            self._bucket[(cpl, g)] = self._bucket.get((cpl, g), 0) + 1

    def remove(self, cpl: int, groups: tuple[str, ...]) -> None:
        for g in groups:
            self._table[g] -= 1
            if not self._table[g]:
                del self._table[g]
            self._bucket[(cpl, g)] -= 1
            if not self._bucket[(cpl, g)]:
                del self._bucket[(cpl, g)]

    def table_count(self, group: str) -> int:
        return self._table.get(group, 0)


# -- the table ----------------------------------------------------------------------------------
class AddResult(enum.Enum):
    ADDED = "added"
    UPDATED = "updated"  # already present: marked as seen
    BUCKET_FULL = "bucket full"  # kept as a replacement candidate
    REJECTED_SELF = "self"
    REJECTED_DIVERSITY = "diversity"
    REJECTED_BLOCKED = "blocked"


@dataclass(frozen=True)
class AddOutcome:
    result: AddResult
    probe: PeerId | None = None  # a stale entry the caller should probe, then report on


@dataclass
class TableEntry:
    peer: PeerId
    point: int
    added_at: float
    last_seen: float
    groups: tuple[str, ...] = ()
    failures: int = 0


@dataclass
class _Candidate:
    peer: PeerId
    groups: tuple[str, ...]
    seen: float


@dataclass
class KBucket:
    """Peers sharing `cpl` leading bits with us, oldest first, plus replacement candidates."""

    cpl: int
    entries: dict[PeerId, TableEntry] = field(default_factory=dict)
    replacements: OrderedDict[PeerId, _Candidate] = field(default_factory=OrderedDict)
    last_refreshed: float = 0.0

    def oldest(self) -> TableEntry:
        return min(self.entries.values(), key=lambda e: e.last_seen)


class RoutingTable:
    """k-buckets indexed by common prefix length with our point (256 buckets at most)."""

    def __init__(
        self,
        local: PeerId,
        k: int = K_BUCKET_SIZE,
        diversity: DiversityFilter | None = None,
        max_failures: int = 2,
        stale_peer_age: float = 600.0,
    ) -> None:
        self.local = local
        self.local_point = peer_kad_id(local)
        self.k = k
        self.diversity = diversity
        self.max_failures = max_failures
        self.stale_peer_age = stale_peer_age
        self._buckets: dict[int, KBucket] = {}
        self._entries: dict[PeerId, TableEntry] = {}
        self._blocked: dict[PeerId, float] = {}  # peer -> blocked until
        self._probing: set[PeerId] = set()

    # -- queries --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, peer: object) -> bool:
        return peer in self._entries

    def __iter__(self) -> Iterator[PeerId]:
        return iter(list(self._entries))

    def entry(self, peer: PeerId) -> TableEntry | None:
        return self._entries.get(peer)

    def bucket_index(self, peer: PeerId) -> int:
        return common_prefix_length(self.local_point, peer_kad_id(peer))

    def bucket(self, cpl: int) -> KBucket:
        bucket = self._buckets.get(cpl)
        if bucket is None:
            bucket = self._buckets[cpl] = KBucket(cpl)
        return bucket

    def bucket_sizes(self) -> dict[int, int]:
        return {cpl: len(b.entries) for cpl, b in sorted(self._buckets.items()) if b.entries}

    def closest(self, target: int, count: int, exclude: Iterable[PeerId] = ()) -> list[PeerId]:
        """The `count` peers nearest to the point `target`, nearest first."""
        excluded = set(exclude)
        nearest = heapq.nsmallest(
            count + len(excluded), self._entries.values(), key=lambda e: e.point ^ target
        )
        return [e.peer for e in nearest if e.peer not in excluded][:count]

    def has_room_for(self, peer: PeerId) -> bool:
        """Would `peer` enter without evicting anyone (ignoring diversity)?"""
        if peer == self.local or peer in self._entries:
            return False
        bucket = self._buckets.get(self.bucket_index(peer))
        return bucket is None or len(bucket.entries) < self.k

    def max_cpl(self) -> int:
        """The deepest non-empty bucket, -1 if the table is empty."""
        return max((cpl for cpl, b in self._buckets.items() if b.entries), default=-1)

    def buckets_to_refresh(self, now: float, interval: float, max_cpl: int) -> list[int]:
        """Buckets 0..min(deepest, max_cpl) not refreshed for `interval` seconds (go's rule)."""
        deepest = min(self.max_cpl(), max_cpl)
        return [
            cpl for cpl in range(deepest + 1) if now - self.bucket(cpl).last_refreshed >= interval
        ]

    def mark_refreshed(self, target: int, now: float) -> None:
        """A lookup for `target` ran: its bucket counts as refreshed."""
        cpl = common_prefix_length(self.local_point, target)
        if cpl < KEY_BITS:
            self.bucket(cpl).last_refreshed = now

    # -- blocklist ------------------------------------------------------------------------
    def block(self, peer: PeerId, until: float) -> None:
        """Drop `peer` and refuse it until `until` (a liar or a flooder)."""
        self._blocked[peer] = until
        self.remove(peer)
        for bucket in self._buckets.values():
            bucket.replacements.pop(peer, None)

    def is_blocked(self, peer: PeerId, now: float) -> bool:
        until = self._blocked.get(peer)
        if until is None:
            return False
        if now >= until:
            del self._blocked[peer]
            return False
        return True

    # -- changes --------------------------------------------------------------------------
    def add(self, peer: PeerId, addrs: Iterable[Multiaddr], now: float) -> AddOutcome:
        """A peer proved it serves the DHT (it answered us): admit it if the rules allow.

        `addrs` are its known addresses, used only for the diversity groups.
        """
        if peer == self.local:
            return AddOutcome(AddResult.REJECTED_SELF)
        if self.is_blocked(peer, now):
            return AddOutcome(AddResult.REJECTED_BLOCKED)
        entry = self._entries.get(peer)
        if entry is not None:
            entry.last_seen = now
            entry.failures = 0
            return AddOutcome(AddResult.UPDATED)
        cpl = self.bucket_index(peer)
        groups: tuple[str, ...] = ()
        if self.diversity is not None:
            found = self.diversity.groups_for(addrs)
            if found is None:
                return AddOutcome(AddResult.REJECTED_DIVERSITY)
            groups = found
        bucket = self.bucket(cpl)
        if len(bucket.entries) >= self.k:
            bucket.replacements[peer] = _Candidate(peer, groups, now)
            bucket.replacements.move_to_end(peer)
            while len(bucket.replacements) > self.k:
                bucket.replacements.popitem(last=False)
            oldest = bucket.oldest()
            if now - oldest.last_seen >= self.stale_peer_age and oldest.peer not in self._probing:
                self._probing.add(oldest.peer)
                return AddOutcome(AddResult.BUCKET_FULL, probe=oldest.peer)
            return AddOutcome(AddResult.BUCKET_FULL)
        if self.diversity is not None and not self.diversity.allows(cpl, groups):
            return AddOutcome(AddResult.REJECTED_DIVERSITY)
        self._insert(bucket, peer, groups, now)
        return AddOutcome(AddResult.ADDED)

    def _insert(self, bucket: KBucket, peer: PeerId, groups: tuple[str, ...], now: float) -> None:
        entry = TableEntry(peer, peer_kad_id(peer), now, now, groups)
        bucket.entries[peer] = entry
        bucket.replacements.pop(peer, None)
        self._entries[peer] = entry
        if self.diversity is not None:
            self.diversity.add(bucket.cpl, groups)

    def probe_result(self, peer: PeerId, alive: bool, now: float) -> None:
        """The outcome of a probe `add()` asked for: a dead entry makes room for a candidate."""
        self._probing.discard(peer)
        if alive:
            self.seen(peer, now)
        else:
            self.remove(peer)

    def seen(self, peer: PeerId, now: float) -> None:
        """`peer` answered a request: it is alive."""
        entry = self._entries.get(peer)
        if entry is not None:
            entry.last_seen = now
            entry.failures = 0

    def failed(self, peer: PeerId) -> bool:
        """A request to `peer` failed; returns True if it left the table."""
        entry = self._entries.get(peer)
        if entry is None:
            return False
        entry.failures += 1
        if entry.failures >= self.max_failures:
            self.remove(peer)
            return True
        return False

    def remove(self, peer: PeerId) -> bool:
        """Drop `peer`; the freshest replacement candidate that passes diversity takes its place."""
        entry = self._entries.pop(peer, None)
        self._probing.discard(peer)
        if entry is None:
            return False
        cpl = self.bucket_index(peer)
        bucket = self._buckets[cpl]
        del bucket.entries[peer]
        if self.diversity is not None:
            self.diversity.remove(cpl, entry.groups)
        while bucket.replacements:
            _, candidate = bucket.replacements.popitem(last=True)
            if self.diversity is None or self.diversity.allows(cpl, candidate.groups):
                self._insert(bucket, candidate.peer, candidate.groups, candidate.seen)
                break
        return True
