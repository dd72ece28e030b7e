"""The kad-dht protocol without I/O: message codec, the iterative lookup, the request handler.

- `encode_message` / `decode_message`: the spec's protobuf `Message` (pb/dht.proto), checked
  against explicit limits; anything malformed raises `MalformedMessage` and is refused whole.
- `Lookup`: the iterative search of the spec (alpha requests in flight, done when the k closest
  peers seen have answered), optionally split in S/Kademlia disjoint paths. It is told which
  peers answered and whom they named; it says whom to ask next.
- `KadServer`: answers one request from the routing table and the record/provider stores.
- `TokenBuckets`, `ReferralLedger`: per-peer rate limit, and the judge of peers that refer
  us to dead (fake) peers, which is how a FIND_NODE flood is recognised.
"""

from __future__ import annotations

import bisect
import enum
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property, lru_cache

from lattica_ray.dht.errors import InvalidRecord, MalformedMessage, StoreFull
from lattica_ray.dht.pb import dht_pb2
from lattica_ray.dht.records import ProviderStore, RecordStore, StoredRecord, Validator
from lattica_ray.dht.routing import RoutingTable, kad_id
from transport.errors import InvalidMultiaddr, InvalidPeerId
from transport.identity import PeerId
from transport.multiaddr import Multiaddr
from transport.varint import VarintError, decode_varint

log = logging.getLogger(__name__)

PROTOCOL_ID = "/ipfs/kad/1.0.0"  # kad-dht spec
MAX_WIRE_TTL = 0xFFFF_FFFF  # Record.ttl is a uint32 (rust-libp2p)
ALPHA = 10  # kad-dht spec: query concurrency


class MessageType(enum.IntEnum):
    PUT_VALUE = 0
    GET_VALUE = 1
    ADD_PROVIDER = 2
    GET_PROVIDERS = 3
    FIND_NODE = 4
    PING = 5


class ConnectionType(enum.IntEnum):
    NOT_CONNECTED = 0
    CONNECTED = 1
    CAN_CONNECT = 2
    CANNOT_CONNECT = 3


@dataclass(frozen=True)
class PeerInfo:
    """A peer named in a message: its ID and addresses (without the trailing `/p2p/<id>`)."""

    peer_id: PeerId
    addrs: tuple[Multiaddr, ...] = ()
    connection: ConnectionType = ConnectionType.NOT_CONNECTED

    @cached_property
    def dialable_addrs(self) -> list[Multiaddr]:
        """The addresses ending in `/p2p/<id>`, as `Host.add_peer_addrs` and dialers want them."""
        return [addr.with_peer_id(self.peer_id) for addr in self.addrs]


@dataclass(frozen=True)
class Record:
    """The kad-dht `Record`: a key and an opaque value (our signatures live in the value).

    `publisher` (peer ID bytes) and `ttl` (seconds left, 0: unknown) are rust-libp2p's
    extensions; we always send both, since the lattica SDK's record store expects a publisher
    (its source unwraps it).
    """

    key: bytes
    value: bytes
    time_received: str = ""
    publisher: bytes = b""
    ttl: int = 0


@dataclass(frozen=True)
class Message:
    type: MessageType
    key: bytes = b""
    record: Record | None = None
    closer_peers: tuple[PeerInfo, ...] = ()
    provider_peers: tuple[PeerInfo, ...] = ()


@dataclass(frozen=True)
class DecodeLimits:
    """What one message may carry; more is refused."""

    max_key_size: int = 1024
    max_record_size: int = 64 * 1024
    max_peers: int = 40
    max_provider_peers: int = 64
    max_addrs_per_peer: int = 16


# -- codec ----------------------------------------------------------------------------------------
# Peers and addresses repeat across messages; parsing a peer ID checks its embedded public key,
# so memoising these pure functions makes a 1,000-node simulation several times cheaper.
_peer_id_from_bytes = lru_cache(maxsize=1 << 16)(PeerId.from_bytes)
_multiaddr_from_bytes = lru_cache(maxsize=1 << 16)(Multiaddr.from_bytes)
_multiaddr_to_bytes = lru_cache(maxsize=1 << 16)(Multiaddr.to_bytes)


@lru_cache(maxsize=1 << 16)
def bare_address(addr: Multiaddr, peer: PeerId) -> Multiaddr | None:
    """`addr` without a trailing `/p2p/<peer>`; None if it names another peer or is empty."""
    if addr.components and addr.components[-1][0] == "p2p":
        try:
            named = addr.peer_id
        except InvalidPeerId:
            return None
        if named != peer:
            return None
        addr = addr.without_peer_id()
    return addr if addr.components else None


def _encode_peer(info: PeerInfo, out: dht_pb2.Message.Peer) -> None:
    out.id = info.peer_id.multihash
    out.addrs.extend(_multiaddr_to_bytes(addr) for addr in info.addrs)
    if info.connection:
        out.connection = int(info.connection)


def encode_message(message: Message) -> bytes:
    """The protobuf bytes of `message` (the stream adds the varint length prefix)."""
    pb = dht_pb2.Message(type=int(message.type), key=message.key)
    if message.record is not None:
        pb.record.key = message.record.key
        pb.record.value = message.record.value
        if message.record.time_received:
            pb.record.timeReceived = message.record.time_received
        if message.record.publisher:
            pb.record.publisher = message.record.publisher
        if message.record.ttl:
            pb.record.ttl = message.record.ttl
    for info in message.closer_peers:
        _encode_peer(info, pb.closerPeers.add())
    for info in message.provider_peers:
        _encode_peer(info, pb.providerPeers.add())
    return pb.SerializeToString()


_PEER_CACHE: dict[tuple[bytes, tuple[bytes, ...], int, int], PeerInfo] = {}
PEER_CACHE_SIZE = 1 << 16


def _decode_peer(pb: dht_pb2.Message.Peer, limits: DecodeLimits) -> PeerInfo:
    """Decode one peer entry; the same entries recur in many responses, so they are memoised."""
    cache_key = (pb.id, tuple(pb.addrs), pb.connection, limits.max_addrs_per_peer)
    info = _PEER_CACHE.get(cache_key)
    if info is None:
        info = _decode_peer_entry(pb, limits)
        if len(_PEER_CACHE) >= PEER_CACHE_SIZE:
            _PEER_CACHE.clear()
        _PEER_CACHE[cache_key] = info
    return info


def _decode_peer_entry(pb: dht_pb2.Message.Peer, limits: DecodeLimits) -> PeerInfo:
    try:
        peer = _peer_id_from_bytes(pb.id)
    except InvalidPeerId as exc:
        raise MalformedMessage(f"peer entry has an invalid peer ID: {exc}") from exc
    addrs: list[Multiaddr] = []
    for raw in pb.addrs:
        if len(addrs) >= limits.max_addrs_per_peer:
            break
        try:
            addr = _multiaddr_from_bytes(raw)
        except InvalidMultiaddr:
            continue  # a transport we do not know (webrtc, ...): not an error, just not usable
        bare = bare_address(addr, peer)  # None: an address claiming to be someone else's
        if bare is not None and bare not in addrs:
            addrs.append(bare)
    connection = pb.connection if pb.connection in ConnectionType._value2member_map_ else 0
    return PeerInfo(peer, tuple(addrs), ConnectionType(connection))


def decode_message(data: bytes, limits: DecodeLimits) -> Message:
    """Parse and check one message; `MalformedMessage` says what is wrong with it."""
    pb = dht_pb2.Message()
    try:
        pb.ParseFromString(data)
    except Exception as exc:  # google.protobuf.message.DecodeError and friends
        raise MalformedMessage(f"not a kad message (protobuf does not parse): {exc}") from exc
    if pb.type not in MessageType._value2member_map_:
        raise MalformedMessage(f"unknown kad message type {pb.type}")
    if len(pb.key) > limits.max_key_size:
        raise MalformedMessage(f"key of {len(pb.key)} bytes exceeds {limits.max_key_size}")
    record = None
    if pb.HasField("record"):
        if len(pb.record.value) > limits.max_record_size:
            raise MalformedMessage(
                f"record of {len(pb.record.value)} bytes exceeds {limits.max_record_size}"
            )
        if len(pb.record.key) > limits.max_key_size:
            raise MalformedMessage(f"record key exceeds {limits.max_key_size} bytes")
        if pb.record.publisher:
            try:
                _peer_id_from_bytes(pb.record.publisher)
            except InvalidPeerId as exc:
                raise MalformedMessage(f"record publisher is not a peer ID: {exc}") from exc
        record = Record(
            pb.record.key,
            pb.record.value,
            pb.record.timeReceived,
            pb.record.publisher,
            pb.record.ttl,
        )
    if len(pb.closerPeers) > limits.max_peers:
        raise MalformedMessage(
            f"{len(pb.closerPeers)} closer peers exceed the limit of {limits.max_peers}"
        )
    if len(pb.providerPeers) > limits.max_provider_peers:
        raise MalformedMessage(
            f"{len(pb.providerPeers)} provider peers exceed {limits.max_provider_peers}"
        )
    return Message(
        MessageType(pb.type),
        pb.key,
        record,
        _dedupe(_decode_peer(p, limits) for p in pb.closerPeers),
        _dedupe(_decode_peer(p, limits) for p in pb.providerPeers),
    )


def _dedupe(peers: Iterable[PeerInfo]) -> tuple[PeerInfo, ...]:
    out: dict[PeerId, PeerInfo] = {}
    for info in peers:
        out.setdefault(info.peer_id, info)
    return tuple(out.values())


def wire_ttl(expires_at: float, now: float) -> int:
    """Whole seconds left until `expires_at`, at least 1 (0 means "no expiry" on the wire)."""
    return min(MAX_WIRE_TTL, max(1, math.ceil(expires_at - now)))


def is_multihash(key: bytes) -> bool:
    """Provider keys are multihashes (`<code> <length> <digest>`), as go-libp2p checks."""
    try:
        _, offset = decode_varint(key)
        length, offset = decode_varint(key, offset)
    except VarintError:
        return False
    return length == len(key) - offset and length > 0


# -- the iterative lookup -------------------------------------------------------------------------
class QueryState(enum.Enum):
    WAITING = "waiting"
    IN_FLIGHT = "in flight"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(eq=False)
class _Candidate:
    peer: PeerId
    distance: int
    depth: int  # requests in sequence needed to reach this peer (seeds: 1)
    referrer: PeerId | None  # who named it first (None: our own table)
    path: int
    state: QueryState = QueryState.WAITING


class _Path:
    def __init__(self) -> None:
        self.candidates: list[_Candidate] = []  # by distance to the target
        self.in_flight = 0


class Lookup:
    """One iterative Kademlia search for the peers closest to `target` (a point, not a key).

    With `paths` > 1 the seeds are dealt round-robin to disjoint paths and a peer is asked by
    one path only (S/Kademlia), so a liar can steer at most the paths it is on.
    """

    def __init__(
        self,
        target: int,
        seeds: Iterable[PeerId],
        k: int,
        alpha: int = ALPHA,
        paths: int = 1,
        exclude: Iterable[PeerId] = (),
    ) -> None:
        self.target = target
        self.k = k
        self.paths = [_Path() for _ in range(paths)]
        self.alpha_per_path = max(1, alpha // paths)
        self._candidates: dict[PeerId, _Candidate] = {}
        self._excluded = set(exclude)
        self.stopped = False
        self.queries = 0
        self.failures = 0
        ordered = sorted(set(seeds) - self._excluded, key=lambda p: kad_id(p.multihash) ^ target)
        for index, peer in enumerate(ordered):
            self._add(peer, 1, None, index % paths)

    def _add(self, peer: PeerId, depth: int, referrer: PeerId | None, path: int) -> None:
        candidate = _Candidate(peer, kad_id(peer.multihash) ^ self.target, depth, referrer, path)
        self._candidates[peer] = candidate
        bisect.insort(self.paths[path].candidates, candidate, key=lambda c: c.distance)

    def next_queries(self) -> list[PeerId]:
        """Peers to ask now: the closest not yet asked, within alpha in flight per path."""
        if self.stopped:
            return []
        chosen: list[PeerId] = []
        for path in self.paths:
            live = 0
            for candidate in path.candidates:
                if path.in_flight >= self.alpha_per_path:
                    break
                if candidate.state is QueryState.FAILED:
                    continue
                live += 1
                if live > self.k:
                    break
                if candidate.state is QueryState.WAITING:
                    candidate.state = QueryState.IN_FLIGHT
                    path.in_flight += 1
                    self.queries += 1
                    chosen.append(candidate.peer)
        return chosen

    def _path_done(self, path: _Path) -> bool:
        live = 0
        for candidate in path.candidates:
            if candidate.state is QueryState.FAILED:
                continue
            if candidate.state is not QueryState.SUCCEEDED:
                return False
            live += 1
            if live >= self.k:
                return True
        return True

    @property
    def finished(self) -> bool:
        """Stopped, or each path has heard back from the k closest peers it knows (spec)."""
        return self.stopped or all(self._path_done(path) for path in self.paths)

    def on_response(self, peer: PeerId, closer: Iterable[PeerId]) -> None:
        candidate = self._candidates.get(peer)
        if candidate is None or candidate.state is not QueryState.IN_FLIGHT:
            return
        candidate.state = QueryState.SUCCEEDED
        self.paths[candidate.path].in_flight -= 1
        for named in closer:
            if named not in self._candidates and named not in self._excluded:
                self._add(named, candidate.depth + 1, peer, candidate.path)

    def on_failure(self, peer: PeerId) -> None:
        candidate = self._candidates.get(peer)
        if candidate is None or candidate.state is not QueryState.IN_FLIGHT:
            return
        candidate.state = QueryState.FAILED
        self.paths[candidate.path].in_flight -= 1
        self.failures += 1

    def forget_referrals(self, referrer: PeerId) -> int:
        """Drop the not-yet-asked peers that `referrer` named (it was judged a liar)."""
        dropped = 0
        for candidate in self._candidates.values():
            if candidate.referrer == referrer and candidate.state is QueryState.WAITING:
                candidate.state = QueryState.FAILED
                dropped += 1
        return dropped

    def stop(self) -> None:
        """Finish early (a value or enough providers were found)."""
        self.stopped = True

    def closest(self, count: int | None = None) -> list[PeerId]:
        """Peers that answered, nearest first."""
        answered = [c for c in self._candidates.values() if c.state is QueryState.SUCCEEDED]
        answered.sort(key=lambda c: c.distance)
        return [c.peer for c in answered[: self.k if count is None else count]]

    def referrer_of(self, peer: PeerId) -> PeerId | None:
        candidate = self._candidates.get(peer)
        return candidate.referrer if candidate is not None else None

    def depth_of(self, peer: PeerId) -> int | None:
        candidate = self._candidates.get(peer)
        return candidate.depth if candidate is not None else None

    def state_of(self, peer: PeerId) -> QueryState | None:
        candidate = self._candidates.get(peer)
        return candidate.state if candidate is not None else None


# -- collecting values --------------------------------------------------------------------------
class RecordQuery:
    """The value side of a GET_VALUE lookup (spec, "Getting values"): validate each answer,
    keep the best by the namespace's selector, remember who returned worse (to correct them),
    and say when `quorum` valid answers are in. Our own stored copy counts as one answer.
    """

    def __init__(
        self, key: bytes, validator: Validator, quorum: int, local: bytes | None = None
    ) -> None:
        self.key = key
        self.validator = validator
        self.quorum = quorum
        self.best = local
        self.answers = 1 if local is not None else 0
        self.holders: set[PeerId] = set()  # peers that returned `best`
        self.outdated: set[PeerId] = set()  # peers that returned something worse or invalid

    @property
    def done(self) -> bool:
        return self.answers >= self.quorum

    def on_record(self, peer: PeerId, record: Record, now: float) -> None:
        if record.key != self.key or not record.value:
            log.info("peer %s answered GET_VALUE with another key's record", peer)
            return
        try:
            self.validator.validate(self.key, record.value, now)
        except InvalidRecord as exc:
            log.info("peer %s returned an invalid record for %r: %s", peer, self.key, exc)
            self.outdated.add(peer)
            return
        self.answers += 1
        if self.best is None or record.value == self.best:
            self.best = record.value
            self.holders.add(peer)
        elif self.validator.select(self.key, [self.best, record.value]) == 1:
            self.outdated |= self.holders
            self.holders = {peer}
            self.best = record.value
        else:
            self.outdated.add(peer)


# -- serving requests -----------------------------------------------------------------------------
def _connected_target(
    key: bytes, requester: PeerId, is_connected: Callable[[PeerId], bool]
) -> PeerId | None:
    """The peer a FIND_NODE key names, if it is a peer we are connected to (not the asker)."""
    try:
        peer = PeerId.from_bytes(key)
    except (InvalidPeerId, ValueError):
        return None
    return peer if peer != requester and is_connected(peer) else None


class KadServer:
    """Answers one request from the routing table and stores. Raises `InvalidRecord` on a bad
    PUT_VALUE and `MalformedMessage` on a request that breaks the spec; returns None for
    ADD_PROVIDER, which has no response.
    """

    def __init__(
        self,
        local: PeerId,
        table: RoutingTable,
        records: RecordStore,
        providers: ProviderStore,
        addrs_of: Callable[[PeerId], list[Multiaddr]],
        own_addrs: Callable[[], list[Multiaddr]],
        k: int,
        max_addrs_per_peer: int = 16,
        max_providers_per_response: int = 20,
        peer_info_ttl: float = 10.0,
        is_connected: Callable[[PeerId], bool] = lambda peer: False,
        any_provider_key: bool = False,
    ) -> None:
        self.local = local
        # Provider keys are multihashes (go, rust libp2p); the lattica SDK uses any string.
        self.any_provider_key = any_provider_key
        self.table = table
        self.is_connected = is_connected
        self.records = records
        self.providers = providers
        self.addrs_of = addrs_of
        self.own_addrs = own_addrs
        self.k = k
        self.max_addrs_per_peer = max_addrs_per_peer
        self.max_providers_per_response = max_providers_per_response
        self.peer_info_ttl = peer_info_ttl
        self._peer_infos: dict[PeerId, tuple[float, PeerInfo]] = {}

    def table_peer_info(self, peer: PeerId, now: float) -> PeerInfo:
        """`peer_info` for a peer we name in responses, memoised for `peer_info_ttl` seconds
        (the same table entries go into most responses)."""
        cached = self._peer_infos.get(peer)
        if cached is not None and now - cached[0] < self.peer_info_ttl:
            return cached[1]
        info = self.peer_info(peer)
        if len(self._peer_infos) >= PEER_CACHE_SIZE:
            self._peer_infos.clear()
        self._peer_infos[peer] = (now, info)
        return info

    def peer_info(self, peer: PeerId, addrs: Iterable[Multiaddr] | None = None) -> PeerInfo:
        known = (
            addrs
            if addrs is not None
            else (self.own_addrs() if peer == self.local else self.addrs_of(peer))
        )
        stripped: list[Multiaddr] = []
        for addr in known:
            bare = bare_address(addr, peer)
            if bare is not None and bare not in stripped:
                stripped.append(bare)
            if len(stripped) >= self.max_addrs_per_peer:
                break
        return PeerInfo(peer, tuple(stripped))

    def closer_peers(self, key: bytes, requester: PeerId, now: float) -> tuple[PeerInfo, ...]:
        if key == self.local.multihash:
            return (self.peer_info(self.local),)  # exact match: just us (spec)
        closest = self.table.closest(kad_id(key), self.k, exclude=(requester,))
        # A peer in client mode (behind a NAT) is in no routing table, yet those it is connected
        # to can vouch for its (relay) addresses: as go-libp2p does, answer with it first.
        target = _connected_target(key, requester, self.is_connected)
        if target is not None and target not in closest:
            closest = [target, *closest[: self.k - 1]]
        infos = (self.table_peer_info(peer, now) for peer in closest)
        return tuple(info for info in infos if info.addrs)  # no address: of no use (as go)

    def handle(self, sender: PeerId, request: Message, now: float) -> Message | None:
        kind = request.type
        if kind is MessageType.PING:
            return Message(MessageType.PING)
        if kind is MessageType.FIND_NODE:
            closer = self.closer_peers(request.key, sender, now)
            return Message(kind, request.key, closer_peers=closer)
        if kind is MessageType.GET_VALUE:
            stored = self.records.entry(request.key, now)
            record = self.wire_record(request.key, stored, now) if stored is not None else None
            return Message(
                kind, request.key, record, closer_peers=self.closer_peers(request.key, sender, now)
            )
        if kind is MessageType.PUT_VALUE:
            return self._put_value(sender, request, now)
        if kind is MessageType.GET_PROVIDERS:
            self._check_provider_key(kind, request.key)
            found = self.providers.get(request.key, now, self.max_providers_per_response)
            providers = tuple(self.peer_info(p.peer, p.live_addrs(now) or None) for p in found)
            return Message(
                kind,
                request.key,
                closer_peers=self.closer_peers(request.key, sender, now),
                provider_peers=providers,
            )
        if kind is MessageType.ADD_PROVIDER:
            self._add_provider(sender, request, now)
            return None
        raise MalformedMessage(f"unexpected request type {kind.name}")

    def _put_value(self, sender: PeerId, request: Message, now: float) -> Message:
        record = request.record
        if record is None:
            raise MalformedMessage("PUT_VALUE without a record")
        if record.key != request.key:
            raise MalformedMessage("PUT_VALUE record key differs from the message key")
        # A record without a publisher is vouched for by whoever sent it.
        publisher = record.publisher or sender.multihash
        if self.records.put(record.key, record.value, now, publisher, record.ttl or None):
            return Message(MessageType.PUT_VALUE, request.key, Record(record.key, record.value))
        # We hold a better record: answer with it, so the writer sees it is stale.
        ours = self.records.entry(record.key, now)
        assert ours is not None
        return Message(MessageType.PUT_VALUE, request.key, Record(record.key, ours.value))

    def wire_record(self, key: bytes, stored: StoredRecord, now: float) -> Record:
        """`stored` as we send it: with its publisher (us if unknown) and the seconds it has
        left, which rust-libp2p peers use (and the lattica SDK needs)."""
        return Record(
            key,
            stored.value,
            publisher=stored.publisher or self.local.multihash,
            ttl=wire_ttl(stored.expires_at, now),
        )

    def _check_provider_key(self, kind: MessageType, key: bytes) -> None:
        if self.any_provider_key:
            if not key:
                raise MalformedMessage(f"{kind.name} without a key")
        elif not is_multihash(key):
            raise MalformedMessage(f"{kind.name} key is not a multihash")

    def _add_provider(self, sender: PeerId, request: Message, now: float) -> None:
        self._check_provider_key(MessageType.ADD_PROVIDER, request.key)
        others = 0
        for info in request.provider_peers:
            if info.peer_id != sender:
                others += 1  # only a peer itself may say it provides something (spec)
            elif not self.providers.add(request.key, sender, info.addrs, now):
                raise StoreFull("provider store is full")
        if others:
            log.info("ignored %d providers that %s announced for others", others, sender)


# -- abuse controls -------------------------------------------------------------------------------
class TokenBuckets:
    """Per-peer token bucket: `rate` requests per second sustained, `burst` at once."""

    def __init__(self, rate: float, burst: int, max_peers: int = 65536) -> None:
        self.rate = rate
        self.burst = burst
        self.max_peers = max_peers
        self._buckets: OrderedDict[PeerId, tuple[float, float]] = OrderedDict()

    def allow(self, peer: PeerId, now: float) -> bool:
        tokens, last = self._buckets.pop(peer, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[peer] = (tokens, now)
        if len(self._buckets) > self.max_peers:
            self._buckets.popitem(last=False)
        return allowed


class ReferralLedger:
    """Counts, per responder, how many peers it named answered or were dead.

    A responder that names mostly dead peers (at least `threshold` of them, and a share of at
    least `ratio`) is flooding us with fake closer peers: an eclipse attempt.
    """

    def __init__(self, threshold: int, ratio: float, max_peers: int = 65536) -> None:
        self.threshold = threshold
        self.ratio = ratio
        self.max_peers = max_peers
        self._counts: OrderedDict[PeerId, list[int]] = OrderedDict()

    def record(self, referrer: PeerId, alive: bool) -> bool:
        """Note one referral's outcome; True if `referrer` is now judged a flooder."""
        counts = self._counts.pop(referrer, [0, 0])
        counts[0 if alive else 1] += 1
        self._counts[referrer] = counts
        if len(self._counts) > self.max_peers:
            self._counts.popitem(last=False)
        good, bad = counts
        return bad >= self.threshold and bad >= self.ratio * (good + bad)

    def forget(self, peer: PeerId) -> None:
        self._counts.pop(peer, None)

    def decay(self) -> None:
        """Halve every count, so old behaviour fades (called once per cleanup interval)."""
        for peer in list(self._counts):
            good, bad = self._counts[peer]
            if good < 2 and bad < 2:
                del self._counts[peer]
            else:
                self._counts[peer] = [good // 2, bad // 2]
