"""The DHT on a `Host`: serves `/ipfs/kad/1.0.0`, runs lookups, keeps the table and records fresh.

Thin asyncio glue around `protocol.py` (codec, lookup, request handler), `routing.py` (table)
and `records.py` (validation and stores). Attach it to any `transport.host.Host`:

    dht = DHT(node, node.key, DHTConfig())
    await dht.start()
    await dht.bootstrap(["/ip4/203.0.113.7/udp/4001/quic-v1/p2p/12D3KooW..."])
    await dht.put("/lattica/actor/policy", b"...")
    value = await dht.get("/lattica/actor/policy")
    await dht.provide(ContentId.of(blob))
    providers = await dht.find_providers(cid)
    addrs = await dht.find_peer(peer_id)

To share one DHT with lattica SDK (rust-libp2p) nodes, which speak the same messages under
`/lattica/1.0.0` and store unsigned records (`dht.sdk`), opt in to both:

    DHTConfig(protocols=("/ipfs/kad/1.0.0", "/lattica/1.0.0"), sdk_records=True)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

from lattica_ray.dht.cid import ContentId
from lattica_ray.dht.config import DHTConfig, Mode
from lattica_ray.dht.errors import (
    InvalidRecord,
    MalformedMessage,
    NoPeersError,
    PeerNotFound,
    PutFailed,
    StoreFull,
)
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
    wire_ttl,
)
from lattica_ray.dht.records import (
    LATTICA_NAMESPACE,
    NamespacedValidator,
    ProviderStore,
    RecordStore,
    SignedRecord,
    Validator,
    namespace_of,
)
from lattica_ray.dht.routing import (
    DiversityFilter,
    RoutingTable,
    kad_id,
    random_key_with_cpl,
)
from lattica_ray.dht.sdk import SdkRecordValidator, SdkValue, decode_sdk_record, is_index_key
from transport.errors import MessageTooLarge, ProtocolNotSupported, StreamReset, TransportError
from transport.host import Host
from transport.identity import KeyPair, PeerId
from transport.multiaddr import Multiaddr
from transport.stream import Stream

log = logging.getLogger(__name__)

ResponseHook = Callable[[Lookup, PeerId, Message], None]
RECENT_PROBES = 4096  # peers remembered as recently probed, so one peer is not probed twice
PEER_PROTOCOLS = 16384  # peers whose kad protocol ID we remember (with several configured)
PROBE_QUEUE = 1024  # requesters waiting to be probed for table admission


@dataclass(frozen=True)
class FoundRecord:
    """A record a `get` found: the value and, for signed records, who wrote it and when."""

    key: bytes
    value: bytes
    author: PeerId | None
    created: float | None
    expires: float | None


@dataclass(frozen=True)
class PeerLookupResult:
    """What `lookup_peer` learned, with the cost of learning it (for the simulation)."""

    peer: PeerId
    addrs: list[Multiaddr]
    found: bool
    hops: int  # sequential requests until someone named the peer (0: it was in our table)
    queries: int
    failures: int


@dataclass
class DHTStats:
    """Counters, for logs, tests and the simulation."""

    requests_sent: int = 0
    request_failures: int = 0
    requests_served: int = 0
    refused_malformed: int = 0
    refused_records: int = 0
    refused_rate_limited: int = 0
    refused_busy: int = 0
    refused_blocked: int = 0
    peers_blocked: int = 0


def record_key(key: str | bytes) -> bytes:
    return key.encode("utf-8") if isinstance(key, str) else bytes(key)


def provider_key(cid: ContentId | bytes | str, any_key: bool = False) -> bytes:
    """The DHT key of provider records: the CID's multihash (as go and rust libp2p); with
    `any_key` (lattica SDK records on) also any bytes or string, as the SDK's providers use."""
    if isinstance(cid, ContentId):
        return cid.multihash
    key = cid.encode("utf-8") if isinstance(cid, str) and any_key else cid
    if not isinstance(key, bytes | bytearray | memoryview):
        raise TypeError("provider keys are ContentIds or their multihashes")
    key = bytes(key)
    if any_key and key:
        return key
    if not is_multihash(key):
        raise ValueError("provider keys are multihashes: pass a ContentId or its multihash")
    return key


class DHT:
    """A Kademlia DHT node speaking the libp2p kad-dht protocol over `host`."""

    def __init__(
        self,
        host: Host,
        key: KeyPair,
        config: DHTConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        validator: Validator | None = None,
    ) -> None:
        if key.peer_id != host.peer_id:
            raise ValueError("the DHT key must be the host's identity key")
        self.host = host
        self.key = key
        self.config = config = config or DHTConfig()
        self.local = host.peer_id
        self._clock = clock
        diversity = (
            DiversityFilter(
                config.max_peers_per_group_per_bucket,
                config.max_peers_per_group_per_table,
                config.diversity_exempt_private,
            )
            if config.diversity_filter
            else None
        )
        self.table = RoutingTable(
            self.local, config.k, diversity, config.max_failures, config.stale_peer_age
        )
        sdk = (
            SdkRecordValidator(config.max_record_ttl, config.max_clock_skew)
            if config.sdk_records
            else None
        )
        self.validator: Validator = validator or NamespacedValidator.default(
            config.max_record_ttl,
            config.max_clock_skew,
            config.max_key_size,
            config.max_record_size,
            fallback=sdk,
        )
        self.protocols = list(config.protocols)
        # With several protocol IDs, the one each peer accepted, so later streams skip the
        # multistream round trip of proposing the others (bounded, least recent dropped).
        self._peer_protocols: OrderedDict[PeerId, str] = OrderedDict()
        self.records = RecordStore(self.validator, config.max_records, config.record_ttl)
        self.providers = ProviderStore(
            config.provider_record_ttl,
            config.provider_addr_ttl,
            config.max_provider_keys,
            config.max_providers_per_key,
        )
        self.server = KadServer(
            self.local,
            self.table,
            self.records,
            self.providers,
            host.peer_addrs,
            lambda: host.addrs,
            config.k,
            config.max_addrs_per_peer,
            config.max_providers_per_response,
            config.peer_info_cache_ttl,
            is_connected=lambda peer: peer in host.connected_peers(),
            any_provider_key=config.sdk_records,
        )
        self.limits = DecodeLimits(
            config.max_key_size,
            config.max_record_size,
            config.max_closer_peers,
            max(config.max_providers_per_key, config.max_providers_per_response),
            config.max_addrs_per_peer,
        )
        self.stats = DHTStats()
        self._mode: Mode = config.mode
        self._rate = TokenBuckets(config.inbound_rate, config.inbound_burst)
        self._referrals = ReferralLedger(config.bad_referral_threshold, config.bad_referral_ratio)
        self._violations: OrderedDict[PeerId, int] = OrderedDict()
        self._recent_probes: OrderedDict[PeerId, float] = OrderedDict()
        self._probes = 0  # probe workers running
        self._probe_queue: OrderedDict[PeerId, None] = OrderedDict()
        self._inbound = 0
        self._authored: dict[bytes, bytes] = {}  # our records: key -> unsigned value
        self._provided: set[bytes] = set()  # multihashes we announce
        self._tasks: set[asyncio.Task[Any]] = set()  # periodic maintenance
        self._pending: set[asyncio.Task[Any]] = set()  # one-off work: probes
        self._started = False

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def mode(self) -> Mode:
        return self._mode

    def set_mode(self, mode: Mode) -> None:
        """Server: serve our kad protocol IDs (publicly reachable). Client: only ask, so peers
        that cannot reach us never put us in their tables. Call when reachability changes."""
        if mode not in ("client", "server"):
            raise ValueError(f"DHT mode is 'client' or 'server', not {mode!r}")
        if mode != self._mode:
            log.info("DHT %s switches to %s mode", self.local.short(), mode)
        self._mode = mode
        if self._started:
            self._apply_mode()

    def _apply_mode(self) -> None:
        for protocol in self.protocols:
            if self._mode == "server":
                self.host.set_stream_handler(protocol, self._serve)
            else:
                self.host.remove_stream_handler(protocol)

    async def start(self) -> None:
        """Serve (in server mode) and start the periodic refresh, republish and cleanup."""
        if self._started:
            return
        self._started = True
        self._apply_mode()
        config = self.config
        self._every(config.refresh_interval, self.refresh)
        self._every(config.cleanup_interval, self._cleanup)
        self._every(config.record_republish_interval, self.republish_records)
        self._every(config.provider_republish_interval, self.republish_providers)
        if config.record_replication_interval:
            self._every(config.record_replication_interval, self.replicate)

    async def stop(self) -> None:
        """Stop serving and cancel every background task; safe to call twice."""
        if self._started:
            self._started = False
            for protocol in self.protocols:
                self.host.remove_stream_handler(protocol)
        tasks = [*self._tasks, *self._pending]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    aclose = stop

    async def __aenter__(self) -> DHT:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _spawn(self, coro: Coroutine[Any, Any, Any], periodic: bool = False) -> None:
        tasks = self._tasks if periodic else self._pending
        task = asyncio.get_running_loop().create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def settle(self) -> None:
        """Wait until one-off background work (liveness probes of peers) has finished, so
        tests and simulations can observe a quiet table."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    def _every(self, interval: float, job: Callable[[], Awaitable[Any]]) -> None:
        async def loop() -> None:
            while True:
                await asyncio.sleep(interval)
                try:
                    await job()
                except (NoPeersError, PutFailed) as exc:
                    log.info("DHT %s: periodic %s: %s", self.local.short(), job.__name__, exc)
                except Exception:
                    log.exception("DHT %s: periodic %s failed", self.local.short(), job.__name__)

        self._spawn(loop(), periodic=True)

    # -- public API -----------------------------------------------------------------------
    async def bootstrap(
        self, peers: Iterable[Multiaddr | str], refresh_buckets: bool = True
    ) -> int:
        """Join the DHT through `peers` (multiaddrs ending in `/p2p/<id>`): look ourselves up
        starting from them, then refresh every bucket. Returns the routing table size."""
        targets: list[PeerId] = []
        for text in peers:
            addr = Multiaddr.parse(text)
            peer = addr.peer_id
            if peer is None:
                raise ValueError(f"bootstrap address {addr} needs a /p2p/<peer id> suffix")
            if peer != self.local:
                self.host.add_peer_addrs(peer, [addr])
                targets.append(peer)
        if not targets:
            log.info("DHT %s: no bootstrap peer other than ourselves", self.local.short())
            return len(self.table)
        request = Message(MessageType.FIND_NODE, self.local.multihash)
        lookup = await self._lookup(self.local.multihash, request, seeds=targets)
        for peer in targets:
            if lookup.state_of(peer) is QueryState.FAILED:
                log.warning("bootstrap peer %s did not answer", peer)
        if len(self.table) == 0:
            raise NoPeersError(
                f"none of the {len(targets)} bootstrap peers answered; check the addresses "
                "and that they run a DHT in server mode"
            )
        if refresh_buckets:
            await self.refresh(force=True, self_lookup=False)
        return len(self.table)

    async def put(self, key: str | bytes, value: bytes) -> int:
        """Store `value` under `key` at the k closest peers; returns how many stored it.

        `/lattica/...` values are signed with our key and expire after `record_ttl`; we
        republish them until the DHT stops. `/pk/<peer ID>` takes a public key as is. With
        `sdk_records`, other keys hold lattica SDK records: the value is wrapped with an expiry
        of `record_ttl` (under `<key>#index`, pass a `dht.sdk.SubkeyIndex` encoding instead).
        """
        key_bytes = record_key(key)
        now = self._clock()
        stored_value = self._seal(key_bytes, bytes(value), now)
        self.validator.validate(key_bytes, stored_value, now)  # raises InvalidRecord
        self._keep_own(key_bytes, stored_value, now)
        self._authored[key_bytes] = bytes(value)
        return await self._put_to_closest(key_bytes, stored_value)

    def _keep_own(self, key: bytes, value: bytes, now: float) -> None:
        """Our copy of our own record; a full store only costs us the local copy."""
        try:
            self.records.put(key, value, now, publisher=self.local.multihash)
        except StoreFull as exc:
            log.info("not keeping a local copy of %r: %s", key, exc)

    def _seal(self, key: bytes, value: bytes, now: float) -> bytes:
        if namespace_of(key) == LATTICA_NAMESPACE:
            return SignedRecord.create(self.key, key, value, now, self.config.record_ttl).encode()
        if self._is_sdk_key(key) and not is_index_key(key):
            return SdkValue(value, now + self.config.record_ttl).encode()
        return value

    def _is_sdk_key(self, key: bytes) -> bool:
        """Is `key` stored as a lattica SDK record (`sdk_records` on, not one of our keys)?"""
        validator = self.validator
        return isinstance(validator, NamespacedValidator) and isinstance(
            validator.find(key), SdkRecordValidator
        )

    async def get(self, key: str | bytes) -> bytes | None:
        """The best valid value under `key` (for signed records: the payload), or None."""
        found = await self.get_record(key)
        return found.value if found is not None else None

    async def get_record(self, key: str | bytes) -> FoundRecord | None:
        """Collect `get_quorum` valid answers, keep the newest, correct peers that had older."""
        key_bytes = record_key(key)
        local = self.records.get(key_bytes, self._clock())
        query = RecordQuery(key_bytes, self.validator, self.config.get_quorum, local)

        def on_response(lookup: Lookup, peer: PeerId, response: Message) -> None:
            if response.record is not None:
                query.on_record(peer, response.record, self._clock())
                if query.done:
                    lookup.stop()

        if not query.done:
            request = Message(MessageType.GET_VALUE, key_bytes)
            try:
                await self._lookup(key_bytes, request, on_response)
            except NoPeersError:
                if local is None:
                    raise
        if query.best is None:
            return None
        if query.outdated:  # entry correction (spec): a round trip more, only on disagreement
            await self._send_puts(key_bytes, query.best, sorted(query.outdated))
        if local is not None and local != query.best:
            try:
                self.records.put(key_bytes, query.best, self._clock())
            except (InvalidRecord, StoreFull) as exc:
                log.info("could not update our copy of %r: %s", key_bytes, exc)
        return self._found(key_bytes, query.best)

    def _found(self, key: bytes, value: bytes) -> FoundRecord:
        if namespace_of(key) == LATTICA_NAMESPACE:
            record = SignedRecord.decode(value)
            return FoundRecord(
                key, record.value, record.author_id, record.created_ms / 1000, record.expires_at
            )
        if self._is_sdk_key(key):
            sdk_record = decode_sdk_record(key, value)
            payload = sdk_record.value if isinstance(sdk_record, SdkValue) else value
            return FoundRecord(key, payload, None, None, sdk_record.expiration)
        return FoundRecord(key, value, None, None, None)

    async def provide(self, cid: ContentId | bytes | str) -> int:
        """Announce that we hold `cid` to the k peers closest to it; republished every 22 h.
        Returns how many peers took the announcement."""
        key = provider_key(cid, self.config.sdk_records)
        self.providers.add(key, self.local, self.host.addrs, self._clock())
        self._provided.add(key)
        return await self._announce(key)

    def stop_providing(self, cid: ContentId | bytes | str) -> None:
        """Stop republishing `cid`; the records at other peers expire by themselves."""
        key = provider_key(cid, self.config.sdk_records)
        self._provided.discard(key)
        self.providers.remove(key, self.local)

    async def _announce(self, key: bytes) -> int:
        peers = await self.get_closest_peers(key)
        me = self.server.peer_info(self.local)
        request = Message(MessageType.ADD_PROVIDER, key, provider_peers=(me,))
        results = await asyncio.gather(
            *(self._request(peer, request, expect_response=False) for peer in peers),
            return_exceptions=True,
        )
        sent = sum(1 for r in results if not isinstance(r, BaseException))
        if sent == 0:
            raise PutFailed(f"none of the {len(peers)} closest peers took the provider record")
        return sent

    async def find_providers(self, cid: ContentId | bytes | str, limit: int = 20) -> list[PeerInfo]:
        """Up to `limit` peers that provide `cid`, with their addresses (also given to the host)."""
        key = provider_key(cid, self.config.sdk_records)
        now = self._clock()
        found: dict[PeerId, PeerInfo] = {}
        for record in self.providers.get(key, now, limit):
            found[record.peer] = self.server.peer_info(record.peer, record.live_addrs(now) or None)

        def on_response(lookup: Lookup, peer: PeerId, response: Message) -> None:
            for info in response.provider_peers:
                if info.peer_id not in found:
                    found[info.peer_id] = info
                    if info.addrs and info.peer_id != self.local:
                        self.host.add_peer_addrs(info.peer_id, info.dialable_addrs)
            if len(found) >= limit:
                lookup.stop()

        if len(found) < limit:
            try:
                await self._lookup(key, Message(MessageType.GET_PROVIDERS, key), on_response)
            except NoPeersError:
                if not found:
                    raise
        return list(found.values())[:limit]

    async def find_peer(self, peer: PeerId) -> list[Multiaddr]:
        """Addresses of `peer` (direct or relayed), learned from the DHT and given to the host.
        Raises `PeerNotFound` if no one knows it."""
        result = await self.lookup_peer(peer)
        if not result.found:
            raise PeerNotFound(
                f"no DHT peer knows {peer} ({result.queries} asked, {result.failures} failed)"
            )
        return result.addrs

    async def lookup_peer(self, peer: PeerId) -> PeerLookupResult:
        """`find_peer` with its cost: hops, requests, failures."""
        if peer == self.local:
            return PeerLookupResult(peer, list(self.host.addrs), True, 0, 0, 0)
        addrs: list[Multiaddr] = []
        hops = 0
        found = False

        def on_response(lookup: Lookup, responder: PeerId, response: Message) -> None:
            nonlocal hops, found
            if responder == peer:  # it answered us itself: it was in our table all along
                found = True
                hops = max(0, (lookup.depth_of(peer) or 1) - 1)
                lookup.stop()
                return
            for info in response.closer_peers:
                if info.peer_id == peer and info.addrs:
                    found = True
                    hops = lookup.depth_of(responder) or 0
                    addrs.extend(a for a in info.dialable_addrs if a not in addrs)
                    lookup.stop()

        lookup = await self._lookup(
            peer.multihash, Message(MessageType.FIND_NODE, peer.multihash), on_response
        )
        if found and not addrs:
            addrs = list(self.host.peer_addrs(peer))
        if addrs:
            self.host.add_peer_addrs(peer, addrs)
        return PeerLookupResult(peer, addrs, found, hops, lookup.queries, lookup.failures)

    async def get_closest_peers(self, key: bytes) -> list[PeerId]:
        """The k peers closest to `key` that answered us, nearest first."""
        lookup = await self._lookup(key, Message(MessageType.FIND_NODE, key))
        return lookup.closest()

    # -- maintenance ----------------------------------------------------------------------
    async def refresh(self, force: bool = False, self_lookup: bool = True) -> None:
        """Look ourselves up, then a random key in every bucket not refreshed lately (go);
        `force` refreshes every bucket."""
        if self_lookup:
            await self.get_closest_peers(self.local.multihash)
        interval = 0.0 if force else self.config.refresh_interval
        for cpl in self.table.buckets_to_refresh(
            self._clock(), interval, self.config.refresh_max_cpl
        ):
            await self.get_closest_peers(random_key_with_cpl(self.table.local_point, cpl))

    async def republish_records(self) -> None:
        """Re-sign our records with a fresh expiry and store them at the k closest again."""
        for key, value in list(self._authored.items()):
            now = self._clock()
            sealed = self._seal(key, value, now)
            self._keep_own(key, sealed, now)
            try:
                await self._put_to_closest(key, sealed)
            except (NoPeersError, PutFailed) as exc:
                log.info("republishing %r: %s", key, exc)

    async def republish_providers(self) -> None:
        for key in list(self._provided):
            self.providers.add(key, self.local, self.host.addrs, self._clock())
            try:
                await self._announce(key)
            except (NoPeersError, PutFailed) as exc:
                log.info("re-announcing provider record %s: %s", key.hex()[:16], exc)

    async def replicate(self) -> None:
        """Re-put every record we hold to the k closest, so replicas survive churn."""
        for key, value in list(self.records.items(self._clock())):
            if key in self._authored:
                continue
            try:
                await self._put_to_closest(key, value, quorum=0)
            except NoPeersError:
                return

    async def _cleanup(self) -> None:
        now = self._clock()
        self.records.expire(now)
        self.providers.expire(now)
        self._referrals.decay()

    # -- requests -------------------------------------------------------------------------
    async def _request(
        self, peer: PeerId, message: Message, expect_response: bool = True
    ) -> Message | None:
        """One request on a new stream: send, read the answer, close. Raises on any failure."""
        self.stats.requests_sent += 1
        async with asyncio.timeout(self.config.request_timeout):
            stream = await self.host.open_stream(peer, self._protocols_for(peer))
            self._remember_protocol(peer, stream.protocol)
            try:
                await stream.write_message(encode_message(message))
                if not expect_response:
                    # No response is defined (ADD_PROVIDER); waiting for the remote to close
                    # its side tells us the request was read. Reset or EOF: either way, done.
                    await stream.close()
                    try:
                        await stream.read(1)
                    except StreamReset:
                        pass
                    return None
                data = await stream.read_message(self.config.max_message_size)
                await stream.close()
            except BaseException:
                stream.reset("request aborted")
                raise
        response = decode_message(data, self.limits)
        if response.type is not message.type:
            raise MalformedMessage(
                f"answered a {message.type.name} request with {response.type.name}"
            )
        return response

    def protocol_of(self, peer: PeerId) -> str | None:
        """The kad protocol ID `peer` last accepted from us (None: not known, or only one
        protocol is configured)."""
        return self._peer_protocols.get(peer)

    def _protocols_for(self, peer: PeerId) -> list[str]:
        """The kad protocol ID `peer` accepted last time, else all of ours in order."""
        known = self._peer_protocols.get(peer)
        return [known] if known is not None else self.protocols

    def _remember_protocol(self, peer: PeerId, protocol: str) -> None:
        if len(self.protocols) == 1 or protocol not in self.protocols:
            return
        self._peer_protocols[peer] = protocol
        self._peer_protocols.move_to_end(peer)
        if len(self._peer_protocols) > PEER_PROTOCOLS:
            self._peer_protocols.popitem(last=False)

    def _note_failure(self, peer: PeerId, exc: BaseException) -> None:
        self.stats.request_failures += 1
        if isinstance(exc, ProtocolNotSupported):
            self._peer_protocols.pop(peer, None)  # it may speak another of ours next time
            self.table.remove(peer)  # not (or no longer) a DHT server
        elif isinstance(exc, MalformedMessage | MessageTooLarge):
            log.warning("peer %s sent a bad kad response: %s", peer, exc)
            self._violation(peer)
            self.table.remove(peer)
        else:
            self.table.failed(peer)

    async def _send_puts(self, key: bytes, value: bytes, peers: list[PeerId]) -> tuple[int, int]:
        """PUT_VALUE to each of `peers`; returns (stored, kept a different record)."""
        request = Message(MessageType.PUT_VALUE, key, self._wire_record(key, value))
        results = await asyncio.gather(
            *(self._request(peer, request) for peer in peers), return_exceptions=True
        )
        stored = kept_other = 0
        for peer, result in zip(peers, results, strict=True):
            if isinstance(result, Message):
                if result.record is not None and result.record.value == value:
                    stored += 1
                else:
                    kept_other += 1
                    log.debug("peer %s kept a different record for %r", peer, key)
            elif isinstance(result, Exception):
                self._note_failure(peer, result)
        return stored, kept_other

    def _wire_record(self, key: bytes, value: bytes) -> Record:
        """`value` as a PUT_VALUE carries it: with the publisher and seconds left that
        rust-libp2p peers (the lattica SDK among them) store records with."""
        now = self._clock()
        stored = self.records.entry(key, now)
        if stored is not None and stored.value == value:
            return self.server.wire_record(key, stored, now)
        expires = self.validator.validate(key, value, now)
        ttl = wire_ttl(expires, now) if expires is not None else 0
        return Record(key, value, publisher=self.local.multihash, ttl=ttl)

    async def _put_to_closest(self, key: bytes, value: bytes, quorum: int | None = None) -> int:
        peers = await self.get_closest_peers(key)
        stored, kept_other = await self._send_puts(key, value, peers)
        needed = self.config.put_quorum if quorum is None else quorum
        if stored < needed:
            why = f"; {kept_other} hold a newer record" if kept_other else ""
            raise PutFailed(
                f"only {stored} of the {len(peers)} closest peers stored {key[:40]!r}{why}"
            )
        return stored

    # -- lookups --------------------------------------------------------------------------
    async def _lookup(
        self,
        key: bytes,
        request: Message,
        on_response: ResponseHook | None = None,
        seeds: list[PeerId] | None = None,
    ) -> Lookup:
        """Run the iterative lookup for `key`, from our k closest (or `seeds`), sending
        `request` to each peer it picks; `on_response` sees every answer and may stop it."""
        target = kad_id(key)
        seeds = seeds or self.table.closest(target, self.config.k)
        if not seeds:
            raise NoPeersError("the routing table is empty: call bootstrap() first")
        config = self.config
        lookup = Lookup(
            target, seeds, config.k, config.alpha, config.disjoint_paths, exclude=(self.local,)
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.lookup_timeout
        in_flight: dict[asyncio.Task[Message | None], PeerId] = {}
        addr_hints: dict[PeerId, list[Multiaddr]] = {}  # from responses; given to the host
        try:  # only for peers we ask, so a flood of fake peers does not fill its address book
            while not lookup.finished:
                for peer in lookup.next_queries():
                    hint = addr_hints.pop(peer, None)
                    if hint:
                        self.host.add_peer_addrs(peer, hint)
                    in_flight[loop.create_task(self._request(peer, request))] = peer
                remaining = deadline - loop.time()
                if not in_flight or remaining <= 0:
                    break
                done, _ = await asyncio.wait(
                    in_flight, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    peer = in_flight.pop(task)
                    self._on_lookup_answer(lookup, peer, task, on_response, addr_hints)
        finally:
            for task in in_flight:
                task.cancel()
            if in_flight:
                await asyncio.gather(*in_flight, return_exceptions=True)
        self.table.mark_refreshed(target, self._clock())
        return lookup

    def _on_lookup_answer(
        self,
        lookup: Lookup,
        peer: PeerId,
        task: asyncio.Task[Message | None],
        on_response: ResponseHook | None,
        addr_hints: dict[PeerId, list[Multiaddr]],
    ) -> None:
        exc = task.exception()
        referrer = lookup.referrer_of(peer)
        if exc is not None:
            lookup.on_failure(peer)
            self._note_failure(peer, exc)
            if referrer is not None and self._referrals.record(referrer, alive=False):
                dropped = lookup.forget_referrals(referrer)
                self._block(referrer, f"referred us to dead peers (dropped {dropped} more)")
            return
        response = task.result()
        assert response is not None
        if referrer is not None:
            self._referrals.record(referrer, alive=True)
        self._admit(peer)
        lookup.on_response(peer, self._learn(response, addr_hints))
        if on_response is not None:
            on_response(lookup, peer, response)

    def _learn(self, response: Message, addr_hints: dict[PeerId, list[Multiaddr]]) -> list[PeerId]:
        """Closer peers worth asking (not us, not the blocked, reachable), noting addresses."""
        now = self._clock()
        usable: list[PeerId] = []
        for info in response.closer_peers:
            peer = info.peer_id
            if peer == self.local or self.table.is_blocked(peer, now):
                continue
            if info.addrs:
                addr_hints.setdefault(peer, info.dialable_addrs)
            elif peer not in self.table and not self.host.peer_addrs(peer):
                continue  # no way to reach it
            usable.append(peer)
        return usable

    # -- routing table admission ----------------------------------------------------------
    def _admit(self, peer: PeerId) -> None:
        """`peer` answered a kad request, so it is a DHT server: offer it to the table."""
        now = self._clock()
        if peer in self.table:
            self.table.seen(peer, now)
            return
        outcome = self.table.add(peer, self.host.peer_addrs(peer), now)
        if outcome.probe is not None:
            self._spawn(self._probe_entry(outcome.probe))

    async def _ping(self, peer: PeerId) -> bool:
        """Is `peer` a live DHT server? (FIND_NODE for ourselves: every implementation has it.)"""
        try:
            await self._request(peer, Message(MessageType.FIND_NODE, self.local.multihash))
        except (TransportError, MalformedMessage, TimeoutError, EOFError, ConnectionError):
            return False
        return True

    async def _probe_entry(self, peer: PeerId) -> None:
        alive = await self._ping(peer)
        self.table.probe_result(peer, alive, self._clock())

    def _consider_requester(self, peer: PeerId) -> None:
        """A peer asked us something: if its bucket has room, check whether it serves the DHT
        too (client-mode peers do not) and table it. libp2p learns this from identify; we ask.
        Probes wait in a bounded queue, `max_concurrent_probes` at a time."""
        now = self._clock()
        if (
            peer in self.table
            or peer in self._probe_queue
            or not self.table.has_room_for(peer)
            or self.table.is_blocked(peer, now)
        ):
            return
        last = self._recent_probes.get(peer)
        if last is not None and now - last < self.config.stale_peer_age:
            return
        if len(self._probe_queue) >= PROBE_QUEUE:
            return  # a burst of strangers: the rest will ask again
        self._probe_queue[peer] = None
        if self._probes < self.config.max_concurrent_probes:
            self._probes += 1
            self._spawn(self._probe_requesters())

    async def _probe_requesters(self) -> None:
        try:
            while self._probe_queue:
                peer, _ = self._probe_queue.popitem(last=False)
                self._recent_probes[peer] = self._clock()
                self._recent_probes.move_to_end(peer)
                if len(self._recent_probes) > RECENT_PROBES:
                    self._recent_probes.popitem(last=False)
                if self.table.has_room_for(peer) and await self._ping(peer):
                    self._admit(peer)
        finally:
            self._probes -= 1

    # -- abuse ----------------------------------------------------------------------------
    def _violation(self, peer: PeerId) -> None:
        count = self._violations.pop(peer, 0) + 1
        self._violations[peer] = count
        if len(self._violations) > RECENT_PROBES:
            self._violations.popitem(last=False)
        if count >= self.config.max_violations:
            self._block(peer, f"{count} protocol violations")

    def _block(self, peer: PeerId, reason: str) -> None:
        if self.table.is_blocked(peer, self._clock()):
            return
        log.warning("DHT %s blocks peer %s: %s", self.local.short(), peer, reason)
        self.stats.peers_blocked += 1
        self.table.block(peer, self._clock() + self.config.block_duration)
        self._referrals.forget(peer)
        self._violations.pop(peer, None)

    # -- serving --------------------------------------------------------------------------
    async def _serve(self, stream: Stream) -> None:
        """Answer requests on one inbound stream until the peer closes it (spec: reuse ok)."""
        peer = stream.remote_peer
        if peer is None:
            stream.reset("unauthenticated stream")
            return
        if self.table.is_blocked(peer, self._clock()):
            self.stats.refused_blocked += 1
            stream.reset("blocked")
            return
        if self._inbound >= self.config.max_inbound_streams:
            self.stats.refused_busy += 1
            log.debug("DHT busy: refusing a stream from %s", peer)
            stream.reset("too many kad streams")
            return
        self._inbound += 1
        try:
            while await self._serve_one(stream, peer):
                pass
        finally:
            self._inbound -= 1

    async def _serve_one(self, stream: Stream, peer: PeerId) -> bool:
        """Read, check and answer one request; False when the stream is done."""
        try:
            async with asyncio.timeout(self.config.inbound_idle_timeout):
                data = await stream.read_message(self.config.max_message_size)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                log.info("peer %s closed a kad stream mid-message", peer)
            await stream.close()
            return False
        except MessageTooLarge as exc:
            self._refuse(peer, stream, f"oversized message: {exc}")
            return False
        except TimeoutError:
            stream.reset("idle")
            return False
        now = self._clock()
        if not self._rate.allow(peer, now):
            self.stats.refused_rate_limited += 1
            log.debug("rate limit: refusing kad requests from %s", peer)
            stream.reset("rate limited")
            return False
        try:
            request = decode_message(data, self.limits)
            response = self.server.handle(peer, request, now)
        except MalformedMessage as exc:
            self._refuse(peer, stream, f"malformed message: {exc}")
            return False
        except InvalidRecord as exc:
            self.stats.refused_records += 1
            self._refuse(peer, stream, f"invalid record: {exc}", count=False)
            return False
        except StoreFull as exc:  # our limit, not the peer's fault
            log.info("DHT %s cannot store for %s: %s", self.local.short(), peer, exc)
            stream.reset("store full")
            return False
        self.stats.requests_served += 1
        if response is not None:
            await stream.write_message(encode_message(response))
        self._consider_requester(peer)
        return True

    def _refuse(self, peer: PeerId, stream: Stream, reason: str, count: bool = True) -> None:
        if count:
            self.stats.refused_malformed += 1
        log.warning("DHT %s refused a request from %s: %s", self.local.short(), peer, reason)
        stream.reset("refused")
        self._violation(peer)
