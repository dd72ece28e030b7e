"""The cluster view on a `Host`: asyncio glue around `ViewReplica` (protocol.py).

Serves `/lattica-ray/view/1`, pushes gossip, runs syncs (on connect to a peer we do not know as
alive, when a gap shows, and periodically with a random member), and ticks the replica's timers.
Every decision is the replica's; this module only moves bytes and wakes tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

from pydantic import TypeAdapter, ValidationError

import lattica_ray
from lattica_ray.view.config import ViewConfig
from lattica_ray.view.envelope import EquivocationProof, peer_name
from lattica_ray.view.errors import (
    InvalidValue,
    MalformedMessage,
    SubscriptionOverflow,
    ViewError,
    ViewNotStarted,
)
from lattica_ray.view.models import (
    ActorMethod,
    ActorRecord,
    AuditRecord,
    EquivocationRecord,
    ExportedActor,
    MapEntry,
    Member,
    MemberRecord,
    MethodKind,
    Resources,
    ViewChange,
)
from lattica_ray.view.protocol import (
    PROTOCOL_ID,
    ChunkAssembler,
    Outcome,
    ViewReplica,
    chunk_messages,
    decode_message,
    done_message,
    gossip_messages,
    heads_from,
    hello_message,
    parse_gossip,
    vector_message,
)
from lattica_ray.view.status import status_text as render_status
from transport.errors import InvalidMultiaddr, TransportError
from transport.host import ConnectionEvent, Host, PeerConnected
from transport.identity import KeyPair, PeerId
from transport.multiaddr import Multiaddr
from transport.stream import Stream
from transport.varint import encode_length_prefixed

log = logging.getLogger(__name__)

T = TypeVar("T")
Clock = Callable[[], float]
STREAM_ERRORS = (TransportError, ViewError, EOFError, ConnectionError, TimeoutError)


def default_versions() -> dict[str, str]:
    return {"lattica-ray": lattica_ray.__version__, "python": platform.python_version()}


class ViewSubscription:
    """Async iterator of `ViewChange`s; raises `SubscriptionOverflow` if it fell too far behind."""

    def __init__(self, view: ClusterView, limit: int) -> None:
        self._view = view
        self._limit = limit
        self._queue: deque[ViewChange] = deque()
        self._wake = asyncio.Event()
        self._closed = False
        self._overflowed = False

    def _put(self, change: ViewChange) -> None:
        if self._closed or self._overflowed:
            return
        if len(self._queue) >= self._limit:
            self._overflowed = True
        else:
            self._queue.append(change)
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._view._subscriptions.discard(self)
        self._wake.set()

    def __aiter__(self) -> ViewSubscription:
        return self

    async def __anext__(self) -> ViewChange:
        while True:
            if self._queue:
                return self._queue.popleft()
            if self._overflowed:
                self.close()
                raise SubscriptionOverflow(
                    f"more than {self._limit} changes were not consumed; re-read the view and "
                    "subscribe again (or raise subscriber_queue)"
                )
            if self._closed:
                raise StopAsyncIteration
            self._wake.clear()
            await self._wake.wait()

    async def __aenter__(self) -> ViewSubscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


class UserMap(Generic[T]):
    """A named map of application state, e.g. an RL run's current policy version.

    Write rule: every author writes only its own namespace of the map (the document keys carry
    its peer ID), so `set` is always allowed and can never overwrite another node's entry. Readers
    merge the namespaces: for each key, the write with the highest (version, author) wins, where
    version is one more than the highest this writer had seen (a Lamport clock); a delete is a
    tombstone that wins the same way. Pass `writers` to trust only some authors' values.
    """

    def __init__(
        self,
        view: ClusterView,
        name: str,
        model: type[T] | None,
        writers: Iterable[PeerId | str] | None,
    ) -> None:
        self._view = view
        self.name = name
        self._adapter: TypeAdapter[Any] = TypeAdapter(model if model is not None else Any)
        self._writers = {str(w) for w in writers} if writers is not None else None

    def get(self, key: str, default: T | None = None) -> T | None:
        entry = self.entry(key)
        return entry.value if entry is not None else default

    def __getitem__(self, key: str) -> T:
        entry = self.entry(key)
        if entry is None:
            raise KeyError(key)
        return entry.value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.entry(key) is not None

    def entry(self, key: str) -> MapEntry | None:
        """The winning value with its author and version (value already validated)."""
        raw = self._view._replica.map_get(self.name, key, self._writers)
        return self._typed(raw) if raw is not None else None

    def items(self) -> dict[str, T]:
        return {key: entry.value for key, entry in self.entries().items()}

    def keys(self) -> list[str]:
        return list(self.entries())

    def entries(self) -> dict[str, MapEntry]:
        out = {}
        for key, raw in self._view._replica.map_entries(self.name, self._writers).items():
            typed = self._typed(raw)
            if typed is not None:
                out[key] = typed
        return out

    def set(self, key: str, value: T) -> None:
        try:
            plain = self._adapter.dump_python(self._adapter.validate_python(value), mode="json")
        except (ValidationError, ValueError, TypeError) as exc:
            raise InvalidValue(f"map {self.name!r}[{key!r}]: {exc}") from exc
        self._view._local(lambda now: self._view._replica.set_user(self.name, key, plain, now))

    def delete(self, key: str) -> bool:
        """Remove `key` for everyone; False if it was not set."""
        result = self._view._local(lambda now: self._view._replica.delete_user(self.name, key, now))
        return result is not None

    def _typed(self, entry: MapEntry) -> MapEntry | None:
        try:
            value = self._adapter.validate_python(entry.value)
        except ValidationError as exc:
            log.warning(
                "map %r key %r from %s does not fit the model: %s",
                self.name,
                entry.key,
                entry.author,
                exc,
            )
            return None
        return entry.model_copy(update={"value": value})


class ClusterView:
    """One node's signed, CRDT-replicated picture of the mesh: members, actors, user maps."""

    def __init__(
        self,
        host: Host,
        key: KeyPair,
        config: ViewConfig | None = None,
        *,
        cluster_name: str = "default",
        resources: Resources | Mapping[str, Any] | None = None,
        versions: Mapping[str, str] | None = None,
        clock: Clock = time.time,
        incarnation: int | None = None,
        seed: int | None = None,
    ) -> None:
        if key.peer_id != host.peer_id:
            raise ValueError("the view must sign with the host's own key")
        self.host = host
        self.config = config or ViewConfig()
        self.cluster_name = cluster_name
        self._resources = _resources(resources)
        self._versions = dict(versions) if versions is not None else default_versions()
        self._clock = clock
        self._rng = random.Random(seed)
        self._started_at = clock()
        self._replica = ViewReplica(
            key,
            self.config,
            incarnation=incarnation if incarnation is not None else time.time_ns(),
            now=clock(),
            rng=self._rng,
        )
        self.stats: Counter[str] = Counter()
        self._subscriptions: set[ViewSubscription] = set()
        self._changed = asyncio.Event()
        self._gossip_wake = asyncio.Event()
        self._sync_wake = asyncio.Event()
        self._sync_wanted: dict[PeerId, str] = {}
        self._syncing: set[PeerId] = set()
        self._last_sync: dict[PeerId, float] = {}
        self._streams = asyncio.Semaphore(self.config.max_concurrent_streams)
        self._tasks: set[asyncio.Task[None]] = set()
        self._running = False
        self._listener_added = False

    @property
    def peer_id(self) -> PeerId:
        return self._replica.peer_id

    @property
    def incarnation(self) -> int:
        """This run's number: a restart (default: the start time in ns) or a compaction
        starts a new one."""
        return self._replica.incarnation

    # ================================================================ lifecycle
    async def start(self) -> None:
        """Serve the protocol, announce ourselves, and sync with the peers the host knows."""
        if self._running:
            return
        self._running = True
        self.host.set_stream_handler(PROTOCOL_ID, self._handle_stream)
        if not self._listener_added:
            self.host.add_connection_listener(self._on_connection)
            self._listener_added = True
        self._announce()
        for peer in self.host.connected_peers():
            self._want_sync(peer, "connected at start")
        for loop in (self._timer_loop, self._gossip_loop, self._sync_loop):
            self._spawn(loop())
        self._dispatch()

    async def stop(self) -> None:
        """Say goodbye (a signed leaving heartbeat to a few peers), then stop every task."""
        if not self._running:
            return
        self._running = False
        self.host.remove_stream_handler(PROTOCOL_ID)
        goodbye = self._replica.leaving_heartbeat(self._clock())
        targets = self._replica.pick_gossip_peers(
            self.config.heartbeat_fanout, self.host.connected_peers(), self._clock()
        )
        frames = gossip_messages([], [goodbye], [], 1, self.config.max_message_bytes)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(self._push(peer, frames) for peer in targets)),
                min(1.0, self.config.request_timeout),
            )
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for subscription in list(self._subscriptions):
            subscription.close()
        self._changed.set()

    aclose = stop

    async def __aenter__(self) -> ClusterView:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # ================================================================ reading
    def members(self, *, include_gone: bool = True) -> list[Member]:
        members = self._replica.members(self._clock())
        if not include_gone:
            members = [m for m in members if m.status != "gone"]
        return members

    def member(self, peer: PeerId | str) -> Member | None:
        return self._replica.member(str(peer), self._clock())

    def actors(self, *, include_hidden: bool = False) -> list[ExportedActor]:
        """Exported actors; those of gone or misbehaving members are hidden unless asked for."""
        return self._replica.actors(self._clock(), include_hidden=include_hidden)

    def actor(self, name: str, *, cluster_name: str | None = None) -> ExportedActor | None:
        """The visible actor called `name` (in `cluster_name` if given); the most recently
        exported one if several members export that name."""
        found = [
            a
            for a in self.actors()
            if a.name == name and (cluster_name is None or a.cluster_name == cluster_name)
        ]
        return max(found, key=lambda a: (a.exported_at, a.owner), default=None)

    def map(
        self,
        name: str,
        model: type[T] | None = None,
        *,
        writers: Iterable[PeerId | str] | None = None,
    ) -> UserMap[T]:
        """The user map `name`, with values validated as `model` (any JSON value by default)."""
        return UserMap(self, name, model, writers)

    def map_names(self) -> list[str]:
        return self._replica.map_names()

    def subscribe(self) -> ViewSubscription:
        """Changes from now on: `async for change in view.subscribe(): ...`."""
        subscription = ViewSubscription(self, self.config.subscriber_queue)
        self._subscriptions.add(subscription)
        return subscription

    def audit_member(self, peer: PeerId | str) -> AuditRecord | None:
        """Who wrote the member entry we show, and the signed update that did."""
        return self._replica.audit_member(str(peer))

    def audit_actor(self, name: str, owner: PeerId | str) -> AuditRecord | None:
        return self._replica.audit_actor(name, str(owner))

    def audit_map(self, map_name: str, key: str) -> AuditRecord | None:
        return self._replica.audit_map(map_name, key)

    def equivocations(self) -> list[EquivocationRecord]:
        return self._replica.equivocations()

    def scores(self) -> dict[str, float]:
        return self._replica.scores()

    def status_text(self) -> str:
        """Members and actors as text tables (what `lattica-ray status` prints)."""
        return render_status(self.members(), self.actors(), self._clock())

    def digest(self) -> bytes:
        """Equal on two replicas exactly when they applied the same updates."""
        return self._replica.digest()

    def document_size(self) -> int:
        return self._replica.document.encoded_size()

    # ================================================================ writing
    def export_actor(
        self,
        name: str,
        class_name: str,
        methods: Mapping[str, MethodKind] | Iterable[ActorMethod | str] = (),
    ) -> ExportedActor:
        """Announce an actor callable from the mesh as `name`; re-exporting replaces it."""
        record = ActorRecord(
            class_name=class_name, methods=_methods(methods), exported_at=self._clock()
        )
        self._local(lambda now: self._replica.export_actor(name, record, now))
        return next(a for a in self._replica.own_actors() if a.name == name)

    def unexport_actor(self, name: str) -> bool:
        """Withdraw our actor `name`; False if we did not export it."""
        return self._local(lambda now: self._replica.unexport_actor(name, now)) is not None

    def set_resources(self, resources: Resources | Mapping[str, Any]) -> None:
        self._resources = _resources(resources)
        self._announce()

    def set_addrs(self, addrs: Iterable[Multiaddr | str] | None = None) -> None:
        """Re-advertise our addresses (the host's current ones by default)."""
        self._announce([str(a) for a in addrs] if addrs is not None else None)

    def _announce(self, addrs: list[str] | None = None) -> None:
        record = MemberRecord(
            cluster_name=self.cluster_name,
            addrs=addrs if addrs is not None else [str(a) for a in self.host.addrs],
            resources=self._resources,
            versions=self._versions,
            started_at=self._started_at,
        )
        self._local(lambda now: self._replica.announce(record, now))

    def _local(self, write: Callable[[float], T]) -> T:
        if not self._running:
            raise ViewNotStarted("start() the view before writing to it")
        result = write(self._clock())
        self._dispatch()
        return result

    # ================================================================ waiting, timers
    async def wait_changed(self) -> None:
        """Return at the next change of the view (update applied, heartbeat, status change)."""
        await self._changed.wait()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait until `predicate()` holds, re-checking after every change; TimeoutError if not."""
        async with asyncio.timeout(timeout):
            while not predicate():
                await self.wait_changed()

    def tick(self) -> None:
        """Run the timers now (the background loop does this every `tick_interval`)."""
        self._replica.handle_timer(self._clock())
        self._dispatch()

    async def join(self, peers: Iterable[PeerId]) -> int:
        """Sync with each of `peers` (bootstrap); returns how many syncs succeeded."""
        peers = list(peers)
        results = await asyncio.gather(
            *(self.sync_with(peer) for peer in peers), return_exceptions=True
        )
        for peer, result in zip(peers, results, strict=False):
            if isinstance(result, BaseException):
                log.info("join: sync with %s failed: %r", peer.short(), result)
        return sum(1 for r in results if not isinstance(r, BaseException))

    def _dispatch(self) -> None:
        replica = self._replica
        for change in replica.take_events():
            for subscription in list(self._subscriptions):
                subscription._put(change)
        if replica.has_gossip:
            self._gossip_wake.set()
        for peer, reason in replica.take_sync_requests().items():
            self._want_sync(peer, reason)
        for peer, addrs in replica.take_learned_addrs().items():
            parsed = []
            for text in addrs:
                try:
                    parsed.append(Multiaddr.parse(text))
                except InvalidMultiaddr:
                    log.debug("member %s advertises a bad address %r", peer.short(), text)
            if parsed:
                self.host.add_peer_addrs(peer, parsed)
        self._changed.set()
        self._changed = asyncio.Event()

    def _on_connection(self, event: ConnectionEvent) -> None:
        if not self._running or not isinstance(event, PeerConnected):
            return
        member = self._replica.member(peer_name(event.peer), self._clock())
        if member is None or member.status != "alive":
            self._want_sync(event.peer, "connected")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _timer_loop(self) -> None:
        while True:
            self.tick()
            await asyncio.sleep(self.config.tick_interval)

    # ================================================================ gossip
    async def _gossip_loop(self) -> None:
        fanout, heartbeat_fanout = self.config.gossip_fanout, self.config.heartbeat_fanout
        while True:
            await self._gossip_wake.wait()
            self._gossip_wake.clear()
            updates, heartbeats, proofs = self._replica.take_gossip()
            targets = self._replica.pick_gossip_peers(
                max(fanout, heartbeat_fanout), self.host.connected_peers(), self._clock()
            )
            if not targets:
                self._replica.requeue_gossip(updates, heartbeats, proofs)
                continue
            encoded: dict[tuple[bool, bool], list[bytes]] = {}  # the same frames for most targets
            for index, peer in enumerate(targets):
                which = (index < fanout, index < heartbeat_fanout)
                if which not in encoded:
                    encoded[which] = gossip_messages(
                        updates if which[0] else [],
                        heartbeats if which[1] else [],
                        proofs,
                        self.config.max_gossip_items,
                        self.config.max_message_bytes,
                    )
                if encoded[which]:
                    self._spawn(self._push(peer, encoded[which]))
            if self.config.gossip_batch_delay:
                await asyncio.sleep(self.config.gossip_batch_delay)

    async def _push(self, peer: PeerId, frames: list[bytes]) -> None:
        async with self._streams:
            try:
                stream = await asyncio.wait_for(
                    self.host.open_stream(peer, [PROTOCOL_ID]), self.config.request_timeout
                )
                try:
                    for frame in frames:
                        await asyncio.wait_for(
                            self._send(stream, frame, "gossip"), self.config.request_timeout
                        )
                    await stream.close()
                except BaseException:
                    stream.reset("gossip failed")
                    raise
            except STREAM_ERRORS as exc:
                log.debug("gossip to %s failed: %r", peer.short(), exc)
                self.stats["gossip_failed"] += 1
                self._replica.mark_unreachable(peer, self._clock())

    # ================================================================ sync
    def _want_sync(self, peer: PeerId, reason: str) -> None:
        if peer == self.peer_id:
            return
        self._sync_wanted.setdefault(peer, reason)
        self._sync_wake.set()

    async def _sync_loop(self) -> None:
        limit = self.config.max_concurrent_syncs
        while True:
            await self._sync_wake.wait()
            self._sync_wake.clear()
            now = time.monotonic()
            next_due: float | None = None
            for peer in list(self._sync_wanted):
                if len(self._syncing) >= limit:
                    break
                if peer in self._syncing:
                    continue
                due = self._last_sync.get(peer, -1e9) + self.config.sync_cooldown
                if due > now:
                    next_due = due if next_due is None else min(next_due, due)
                    continue
                reason = self._sync_wanted.pop(peer)
                self._syncing.add(peer)
                self._spawn(self._background_sync(peer, reason))
            if next_due is not None:
                asyncio.get_running_loop().call_later(next_due - now, self._sync_wake.set)

    async def _background_sync(self, peer: PeerId, reason: str) -> None:
        try:
            await self.sync_with(peer)
        except STREAM_ERRORS as exc:
            log.debug("sync with %s (%s) failed: %r", peer.short(), reason, exc)
            self.stats["syncs_failed"] += 1
            self._replica.mark_unreachable(peer, self._clock())
        finally:
            self._syncing.discard(peer)
            self._last_sync[peer] = time.monotonic()
            if self._sync_wanted:
                self._sync_wake.set()

    async def sync_with(self, peer: PeerId) -> tuple[int, int]:
        """Exchange chain heads with `peer` and the updates each side lacks.

        Returns (updates sent, updates received). Raises the transport's error if `peer` cannot
        be reached, `ViewError` if it breaks the protocol.
        """
        if not self._running:
            raise ViewNotStarted("start() the view before syncing")
        timeout = self.config.request_timeout
        self.stats["syncs_started"] += 1
        stream = await asyncio.wait_for(self.host.open_stream(peer, [PROTOCOL_ID]), timeout)
        try:
            await self._send(stream, hello_message(self._replica.digest()), "sync")
            reply = await self._read(stream, "vector")
            if reply.vector.in_sync:
                await stream.close()
                self.stats["syncs_in_sync"] += 1
                self._replica.mark_reachable(peer)
                return 0, 0
            theirs = heads_from(reply.vector, self.config.max_chains)
            await self._send(stream, vector_message(self._replica.heads()), "sync")
            sent = await self._send_updates(stream, theirs)
            received = await self._receive_updates(stream, peer)
            await stream.close()
        except BaseException:
            stream.reset("sync failed")
            raise
        self.stats["syncs_completed"] += 1
        self._replica.mark_reachable(peer)
        return sent, received

    async def _serve_sync(self, stream: Stream, peer: PeerId, hello: Any) -> None:
        if hello.hello.digest == self._replica.digest():
            await self._send(stream, vector_message(None), "sync")
            return
        await self._send(stream, vector_message(self._replica.heads()), "sync")
        message = await self._read(stream, "vector")
        theirs = heads_from(message.vector, self.config.max_chains)
        await self._receive_updates(stream, peer)
        await self._send_updates(stream, theirs)
        self.stats["syncs_served"] += 1

    async def _send_updates(self, stream: Stream, heads: dict[int, int]) -> int:
        updates = self._replica.updates_missing_from(heads)
        for chunk in chunk_messages(updates, self.config.sync_chunk_bytes):
            await asyncio.wait_for(self._send(stream, chunk, "sync"), self.config.request_timeout)
        await self._send(stream, done_message(len(updates), self._replica.proofs()), "sync")
        return len(updates)

    async def _receive_updates(self, stream: Stream, peer: PeerId) -> int:
        assembler = ChunkAssembler(self.config.max_update_bytes)
        applied = 0
        while True:
            message = await self._read(stream, "chunk", "done")
            if message.WhichOneof("body") == "done":
                assembler.finish(message.done.updates)
                for proof_pb in message.done.proofs:
                    self._replica.receive_proof(
                        EquivocationProof.from_pb(proof_pb), peer, self._clock()
                    )
                self._dispatch()
                return applied
            for update in assembler.feed(message.chunk.data):
                # The peer's own updates may be news to everyone (a newcomer's first entry):
                # forward those; the rest is old news that gossip already spread.
                fresh = update.author == peer
                outcome = self._replica.receive_update(update, peer, self._clock(), fresh=fresh)
                applied += outcome is Outcome.APPLIED
            self._dispatch()

    # ================================================================ inbound streams
    async def _handle_stream(self, stream: Stream) -> None:
        peer = stream.remote_peer
        if peer is None or self._replica.is_refused(peer):
            stream.reset("refused")
            return
        try:
            first = await self._read(stream, "gossip", "hello")
            if first.WhichOneof("body") == "hello":
                await self._serve_sync(stream, peer, first)
            else:
                self._receive_gossip(first, peer)
                while not stream.at_eof:
                    try:
                        message = await self._read(stream, "gossip")
                    except asyncio.IncompleteReadError as exc:
                        if exc.partial:
                            raise
                        break
                    self._receive_gossip(message, peer)
            await stream.close()
        except MalformedMessage as exc:
            self._replica.penalize_malformed(peer, str(exc))
            self._dispatch()
            stream.reset("malformed view message")
        except asyncio.IncompleteReadError as exc:
            log.debug("view stream from %s ended early: %r", peer.short(), exc)
            stream.reset("ended early")
        except (TransportError, ViewError, ConnectionError, TimeoutError) as exc:
            log.debug("view stream from %s failed: %r", peer.short(), exc)
            stream.reset("view stream failed")

    def _receive_gossip(self, message: Any, peer: PeerId) -> None:
        updates, heartbeats, proofs = parse_gossip(message.gossip, self.config.max_gossip_items)
        now = self._clock()
        for proof in proofs:
            self._replica.receive_proof(proof, peer, now)
        for update in updates:
            self._replica.receive_update(update, peer, now)
        for heartbeat in heartbeats:
            self._replica.receive_heartbeat(heartbeat, peer, now)
        self._dispatch()

    # ================================================================ framing
    async def _send(self, stream: Stream, data: bytes, kind: str) -> None:
        framed = encode_length_prefixed(data)
        await stream.write(framed)
        self.stats[f"bytes_sent_{kind}"] += len(framed)
        self.stats[f"messages_sent_{kind}"] += 1

    async def _read(self, stream: Stream, *expected: str) -> Any:
        data = await asyncio.wait_for(
            stream.read_message(self.config.max_message_bytes), self.config.request_timeout
        )
        message = decode_message(data)
        body = message.WhichOneof("body")
        if body not in expected:
            raise MalformedMessage(f"expected {' or '.join(expected)}, got {body}")
        return message


def _resources(resources: Resources | Mapping[str, Any] | None) -> Resources:
    if resources is None:
        return Resources()
    if isinstance(resources, Resources):
        return resources
    try:
        return Resources.model_validate(dict(resources))
    except ValidationError as exc:
        raise InvalidValue(f"bad resources: {exc}") from exc


def _methods(methods: Mapping[str, MethodKind] | Iterable[ActorMethod | str]) -> list[ActorMethod]:
    try:
        if isinstance(methods, Mapping):
            return [ActorMethod(name=n, kind=k) for n, k in methods.items()]
        return [m if isinstance(m, ActorMethod) else ActorMethod(name=m) for m in methods]
    except ValidationError as exc:
        raise InvalidValue(f"bad actor methods: {exc}") from exc
