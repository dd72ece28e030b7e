"""The cluster view's protocol, sans I/O: a replica that takes signed updates, heartbeats and timer
ticks in, and gives view changes, gossip to push and peers to sync with out.

Protocol `/lattica-ray/view/1`. Every message is one varint-length-prefixed `ViewMessage`:

- gossip push:  A -> B  Gossip*  (A closes)                      updates, heartbeats, proofs
- sync:         A -> B  SyncHello{digest of A's chain heads}
                B -> A  SyncVector{in_sync} (done)  |  SyncVector{B's heads}
                A -> B  SyncVector{A's heads}  SyncChunk*  SyncDone     what B lacks
                B -> A  SyncChunk*  SyncDone                               what A lacks

A chain is one run (incarnation) of one author: its updates are numbered 1, 2, 3, ... and applied in
that order; the "state vector" exchanged by sync is the head of every chain. Sync chunks carry the
concatenated, length-prefixed `SignedUpdate`s in the order the sender applied them, cut into
pieces of `sync_chunk_bytes`, so a large snapshot streams without being held whole on either side.

Every update is verified before it is applied (signature, then the write rules in `document.py`);
liveness travels in signed heartbeats outside the CRDT; an author that signs two different updates
with one number is caught, both envelopes kept as proof, and its later updates refused.

Nothing grows with time, only with what is written, and that is bounded too: a run that reaches
`compact_after_updates` starts a new run holding only its live entries, whose member entry says
`retires_older_runs`; every replica then forgets the older runs' updates (late copies are dropped as
`RETIRED`) and rebuilds its document without their items. A restarted node does the same with its
previous run, `gone_after` after first hearing of it, keeping that run's user-map values.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from lattica_ray.view.config import ViewConfig
from lattica_ray.view.document import (
    ACTORS,
    MEMBERS,
    USER,
    EntryChange,
    ViewDocument,
    chain_prefix,
)
from lattica_ray.view.envelope import (
    ChainId,
    EquivocationProof,
    Heartbeat,
    SignedUpdate,
    peer_name,
)
from lattica_ray.view.errors import (
    InvalidEnvelope,
    InvalidValue,
    MalformedMessage,
    MalformedUpdate,
    MissingDependency,
    ViewError,
    WriteRuleViolation,
)
from lattica_ray.view.models import (
    ActorChanged,
    ActorRecord,
    AuditRecord,
    EquivocationRecord,
    ExportedActor,
    MapChanged,
    MapEntry,
    Member,
    MemberChanged,
    MemberRecord,
    MemberStatus,
    Misbehaviour,
    UserRecord,
    ViewChange,
)
from lattica_ray.view.pb import view_pb2
from transport.errors import MessageTooLarge
from transport.identity import KeyPair, PeerId
from transport.varint import LengthPrefixedReader, encode_length_prefixed

log = logging.getLogger(__name__)

PROTOCOL_ID = "/lattica-ray/view/1"

RecordT = TypeVar("RecordT", bound=BaseModel)


class Outcome(StrEnum):
    """What became of one received update."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"  # already applied (a gossip copy or a replay): dropped
    PENDING = "pending"  # predecessors missing: held, gap being fetched
    REJECTED = "rejected"  # forged, out of rule, malformed or over a limit
    EQUIVOCATION = "equivocation"  # a second, different update with a used number
    BANNED = "banned"  # its author was caught equivocating
    RETIRED = "retired"  # from a run its author has since retired (compaction, restart)


@dataclass
class _Pending:
    update: SignedUpdate
    sender: PeerId
    since: float
    fresh: bool


@dataclass
class _Chain:
    id: ChainId
    applied: list[SignedUpdate] = field(default_factory=list)
    pending: dict[int, _Pending] = field(default_factory=dict)
    blocked: str | None = None  # why the next update was refused; the chain ends there

    @property
    def head(self) -> int:
        return len(self.applied)


@dataclass
class _Author:
    peer: PeerId
    first_seen: float
    incarnations: set[int] = field(default_factory=set)
    heartbeat: Heartbeat | None = None
    last_seen: float | None = None  # view-clock time of the last fresh heartbeat
    status: MemberStatus | None = None  # as last reported to subscribers
    proof: EquivocationProof | None = None
    gap: tuple[int, int, PeerId, float] | None = None  # (incarnation, head, told by, since)


class ViewReplica:
    """One node's replica of the cluster view. Pure: no sockets, no sleeps, time passed in."""

    def __init__(
        self,
        key: KeyPair,
        config: ViewConfig,
        *,
        incarnation: int,
        now: float,
        rng: random.Random | None = None,
    ) -> None:
        self.key = key
        self.peer_id = key.peer_id
        self.config = config
        self.incarnation = incarnation
        self.chain_id = ChainId(self.peer_id, incarnation)
        self.document = ViewDocument(self.chain_id.client_id)
        self.stats: Counter[str] = Counter()
        self._rng = rng or random.Random()
        self._me = peer_name(self.peer_id)
        self._chains: dict[ChainId, _Chain] = {}
        self._clients: dict[int, _Chain] = {}
        self._authors: dict[PeerId, _Author] = {}
        self._authors_by_name: dict[str, _Author] = {}
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._apply_order: dict[bytes, int] = {}  # envelope ID -> position, never reused
        self._applied_count = 0
        self._writers: dict[tuple[str, str], SignedUpdate] = {}
        # Parsed document entries, kept in step with the document by its change events.
        self._members: dict[str, dict[int, MemberRecord]] = {}
        self._actors: dict[str, dict[int, dict[str, ActorRecord]]] = {}
        self._user: dict[str, dict[str, dict[tuple[str, int], UserRecord]]] = {}
        self._scores: dict[PeerId, float] = {}
        self._unreachable: dict[PeerId, float] = {}
        self._pending_count = 0
        self._heartbeat_counter = 0
        self._next_heartbeat = now
        self._next_sweep = now
        self._gossip_pool: list[PeerId] | None = None  # members worth gossiping to, cached
        self._member_peers: list[PeerId] | None = None
        self._proofs: list[EquivocationProof] = []
        self._next_anti_entropy = now + config.anti_entropy_interval * self._rng.uniform(0.5, 1)
        self._older_run_seen: float | None = None  # when we learned of an earlier run of ours
        self._retired_below: dict[PeerId, int] = {}  # author -> runs below this are retired
        self._retiring: dict[PeerId, int] = {}  # retirements applied, not yet carried out
        self._retired_since_rebuild = 0  # updates forgotten whose items the document still holds
        self._quiet = False  # while compacting: report the net change once, at the end
        self._digest: bytes | None = None
        # outputs
        self._events: list[ViewChange] = []
        self._gossip_updates: list[SignedUpdate] = []
        self._gossip_heartbeats: list[Heartbeat] = []
        self._gossip_proofs: list[EquivocationProof] = []
        self._sync_requests: dict[PeerId, str] = {}
        self._learned_addrs: dict[PeerId, list[str]] = {}
        self._register_chain(self.chain_id)
        self._author(self.peer_id, now, create=True)

    # ================================================================ local writes
    def announce(self, record: MemberRecord, now: float) -> SignedUpdate | None:
        """Write (or rewrite) our own member entry."""
        known = self._members.get(self._me, {}).get(self.incarnation)
        if known is not None and known.retires_older_runs:
            record = record.model_copy(update={"retires_older_runs": True})
        envelope = self._write(
            [(MEMBERS, chain_prefix(self.peer_id, self.incarnation), record)], now
        )
        return envelope

    def _own_chains(self) -> list[_Chain]:
        return [c for c in self._chains.values() if c.id.author == self.peer_id]

    def export_actor(self, name: str, record: ActorRecord, now: float) -> SignedUpdate | None:
        self._check_name(name, "actor name")
        return self._write(
            [(ACTORS, self._actor_key(self._me, self.incarnation, name), record)], now
        )

    def unexport_actor(self, name: str, now: float) -> SignedUpdate | None:
        """Remove our actor `name`; None if we did not export it."""
        key = self._actor_key(self._me, self.incarnation, name)
        if name not in self._actors.get(self._me, {}).get(self.incarnation, {}):
            return None
        return self._write([(ACTORS, key, None)], now)

    def set_user(self, map_name: str, key: str, value: Any, now: float) -> SignedUpdate | None:
        return self._write_user(map_name, key, value, False, now)

    def delete_user(self, map_name: str, key: str, now: float) -> SignedUpdate | None:
        """Write a tombstone that hides every author's older value of `key`."""
        if self.map_get(map_name, key) is None:
            return None
        return self._write_user(map_name, key, None, True, now)

    def _write_user(
        self, map_name: str, key: str, value: Any, deleted: bool, now: float
    ) -> SignedUpdate | None:
        self._check_name(map_name, "map name")
        self._check_name(key, "map key")
        entries = self._user.get(map_name, {}).get(key, {})
        version = 1 + max((r.version for r in entries.values()), default=0)
        record = UserRecord(value=value, version=version, deleted=deleted)
        changes: list[tuple[str, str, BaseModel | None]] = [
            (USER, self._user_key(self._me, self.incarnation, map_name, key), record)
        ]
        for peer, incarnation in entries:  # our older runs' values of this key are now noise
            if peer == self._me and incarnation != self.incarnation:
                changes.append((USER, self._user_key(peer, incarnation, map_name, key), None))
        return self._write(changes, now)

    def _write(
        self, changes: list[tuple[str, str, BaseModel | None]], now: float
    ) -> SignedUpdate | None:
        encoded: list[tuple[str, str, str | None]] = []
        for root, key, record in changes:
            if record is None:
                encoded.append((root, key, None))
                continue
            try:
                text = record.model_dump_json()
            except (ValueError, TypeError) as exc:
                raise InvalidValue(f"cannot store {type(record).__name__}: {exc}") from exc
            if len(text) > self.config.max_value_bytes:
                raise InvalidValue(
                    f"{root} entry is {len(text)} bytes of JSON, over max_value_bytes="
                    f"{self.config.max_value_bytes}"
                )
            encoded.append((root, key, text))
        update, entry_changes = self.document.write(encoded)
        if not update:
            return None
        chain = self._chains[self.chain_id]
        envelope = SignedUpdate.create(self.key, self.incarnation, chain.head + 1, update)
        self._remember_seen(envelope.envelope_id)
        self._record_applied(chain, envelope, entry_changes, now)
        self._gossip_updates.append(envelope)
        self.stats["updates_created"] += 1
        self._retire(now)
        return envelope

    # ================================================================ received updates
    def receive_update(
        self, envelope: SignedUpdate, sender: PeerId, now: float, *, fresh: bool = True
    ) -> Outcome:
        """Verify, check and apply one update. `fresh` ones (gossip) are forwarded once applied."""
        self.stats["updates_received"] += 1
        if len(envelope.update) > self.config.max_update_bytes:
            self._penalize(sender, self.config.penalty_malformed, "update over max_update_bytes")
            return Outcome.REJECTED
        if envelope.incarnation < self._retired_below.get(envelope.author, 0):
            self.stats["retired"] += 1
            return Outcome.RETIRED
        if fresh and envelope.envelope_id in self._seen:
            self.stats["duplicates"] += 1
            return Outcome.DUPLICATE
        author = self._authors.get(envelope.author)
        if author is not None and author.proof is not None:
            self.stats["banned"] += 1
            return Outcome.BANNED
        chain = self._chains.get(envelope.chain)
        if chain is not None:
            known = self._known_update(chain, envelope.seq)
            if known is not None:
                if known.update_hash == envelope.update_hash:
                    self.stats["duplicates"] += 1
                    self._remember_seen(envelope.envelope_id)
                    return Outcome.DUPLICATE
                return self._equivocation(known, envelope, sender, now)
            if chain.blocked is not None:
                self.stats["after_blocked"] += 1
                return Outcome.REJECTED
        try:
            envelope.verify()
        except InvalidEnvelope as exc:
            self.stats["rejected_forged"] += 1
            self._penalize(sender, self.config.penalty_invalid, str(exc), envelope.author)
            return Outcome.REJECTED
        if envelope.chain == self.chain_id:
            log.error(
                "received update %s/%d for our own current chain that we never wrote: is this "
                "key running twice?",
                envelope.chain,
                envelope.seq,
            )
            return Outcome.REJECTED
        if chain is None:
            chain = self._new_chain(envelope.chain, now)
            if chain is None:
                return Outcome.REJECTED
        self._remember_seen(envelope.envelope_id)
        if envelope.seq > chain.head + 1:
            self._hold(chain, envelope, sender, now, fresh)
            return Outcome.PENDING
        outcome = self._try_apply(chain, envelope, sender, now, fresh)
        if outcome is Outcome.APPLIED:
            self._drain(now)
        return outcome

    def _known_update(self, chain: _Chain, seq: int) -> SignedUpdate | None:
        if 1 <= seq <= chain.head:
            return chain.applied[seq - 1]
        pending = chain.pending.get(seq)
        return pending.update if pending is not None else None

    def _try_apply(
        self, chain: _Chain, envelope: SignedUpdate, sender: PeerId, now: float, fresh: bool
    ) -> Outcome:
        try:
            decoded = self.document.check(
                envelope.update,
                envelope.author,
                envelope.incarnation,
                chain.id.client_id,
                self._owner_of,
            )
            changes = self.document.apply(envelope.update, decoded, envelope.author)
        except MissingDependency as exc:
            log.debug("update %s/%d held: %s", chain.id, envelope.seq, exc)
            self._hold(chain, envelope, sender, now, fresh)
            return Outcome.PENDING
        except (WriteRuleViolation, MalformedUpdate) as exc:
            chain.blocked = str(exc)
            kind = "rule" if isinstance(exc, WriteRuleViolation) else "malformed"
            self.stats[f"rejected_{kind}"] += 1
            self._penalize(
                sender,
                self.config.penalty_invalid,
                f"update {chain.id}/{envelope.seq}: {exc}",
                envelope.author,
            )
            return Outcome.REJECTED
        self._record_applied(chain, envelope, changes, now)
        self.stats["updates_applied"] += 1
        if fresh:
            self._gossip_updates.append(envelope)
        if envelope.author == self.peer_id and envelope.incarnation < self.incarnation:
            if self._older_run_seen is None:
                self._older_run_seen = now
        return Outcome.APPLIED

    def _record_applied(
        self, chain: _Chain, envelope: SignedUpdate, changes: list[EntryChange], now: float
    ) -> None:
        chain.applied.append(envelope)
        self._apply_order[envelope.envelope_id] = self._applied_count
        self._applied_count += 1
        self._digest = None
        author = self._author(envelope.author, now, create=True)
        if author is not None:
            author.incarnations.add(envelope.incarnation)
        self._absorb(envelope, changes, now)
        own_key = chain_prefix(envelope.author, envelope.incarnation)
        for change in changes:
            if change.root == MEMBERS and change.key == own_key and change.value is not None:
                record = _parse_record(MemberRecord, change.value)
                if record is not None and record.retires_older_runs:
                    retiring = max(self._retiring.get(envelope.author, 0), envelope.incarnation)
                    self._retiring[envelope.author] = retiring

    def _drain(self, now: float) -> None:
        """Apply held updates whose predecessors have arrived, until nothing moves."""
        progress = True
        while progress and self._pending_count:
            progress = False
            for chain in [c for c in self._chains.values() if c.pending]:
                held = chain.pending.get(chain.head + 1)
                if held is None or chain.blocked is not None:
                    continue
                del chain.pending[held.update.seq]
                self._pending_count -= 1
                outcome = self._try_apply(chain, held.update, held.sender, now, held.fresh)
                if outcome is Outcome.APPLIED:
                    progress = True
        self._retire(now)

    def _hold(
        self, chain: _Chain, envelope: SignedUpdate, sender: PeerId, now: float, fresh: bool
    ) -> None:
        if envelope.seq in chain.pending:
            return
        self._request_sync(sender, f"gap before {chain.id}/{envelope.seq}")
        if (
            len(chain.pending) >= self.config.pending_per_chain
            or self._pending_count >= self.config.pending_total
        ):
            self.stats["pending_dropped"] += 1
            self._seen.pop(envelope.envelope_id, None)  # let a later copy in again
            return
        chain.pending[envelope.seq] = _Pending(envelope, sender, now, fresh)
        self._pending_count += 1
        self.stats["pending_held"] += 1

    def _new_chain(self, chain_id: ChainId, now: float) -> _Chain | None:
        if len(self._chains) >= self.config.max_chains:
            log.warning("refusing chain %s: already tracking max_chains chains", chain_id)
            self.stats["chains_refused"] += 1
            return None
        other = self._clients.get(chain_id.client_id)
        if other is not None:
            log.warning("chain %s derives the client ID of %s: refused", chain_id, other.id)
            self.stats["chains_refused"] += 1
            return None
        if self._author(chain_id.author, now, create=True) is None:
            return None
        return self._register_chain(chain_id)

    def _register_chain(self, chain_id: ChainId) -> _Chain:
        chain = _Chain(chain_id)
        self._chains[chain_id] = chain
        self._clients[chain_id.client_id] = chain
        return chain

    def _owner_of(self, client_id: int) -> PeerId | None:
        chain = self._clients.get(client_id)
        return chain.id.author if chain is not None else None

    # ================================================================ runs: adopt, retire, compact
    def _adopt_older_runs(self, now: float) -> None:
        """Our node ran before (a restart): keep that run's user-map values under this run, and
        retire it, so nothing ever has to hold or edit its items again. Done `gone_after` after
        we first heard of it, so that its last updates have had time to reach us."""
        if not any(c.id.incarnation < self.incarnation for c in self._own_chains()):
            self._older_run_seen = None
            return
        current = self._members.get(self._me, {}).get(self.incarnation)
        if current is None:
            return  # not announced yet: the next tick tries again
        changes: list[tuple[str, str, BaseModel | None]] = []
        for map_name, key, record in self._own_user_records():
            if self._user.get(map_name, {}).get(key, {}).get((self._me, self.incarnation)) is None:
                changes.append(
                    (USER, self._user_key(self._me, self.incarnation, map_name, key), record)
                )
        changes.append(
            (
                MEMBERS,
                chain_prefix(self.peer_id, self.incarnation),
                current.model_copy(update={"retires_older_runs": True}),
            )
        )
        self._write_batches(changes, now)

    def _own_user_records(self) -> list[tuple[str, str, UserRecord]]:
        """Our latest record of every user-map key we wrote, in any of our runs."""
        out = []
        for map_name, keys in self._user.items():
            for key, entries in keys.items():
                ours = [(i, r) for (p, i), r in entries.items() if p == self._me]
                if ours:
                    _, record = max(ours, key=lambda pair: (pair[1].version, pair[0]))
                    out.append((map_name, key, record))
        return out

    def compact(self, now: float) -> SignedUpdate | None:
        """Start a new run that holds only our live entries, and retire the old run's log.

        Every update we ever wrote stays in every replica's log and document until the run that
        wrote it is retired; a fresh run re-writes our member entry, actors and user-map values
        (same versions) in a few updates and retires all earlier runs, so the log and the
        document shrink back to what is live. Returns the last update of the new run.
        """
        member_record = self._members.get(self._me, {}).get(self.incarnation)
        if member_record is None:
            return None
        actors = dict(self._actors.get(self._me, {}).get(self.incarnation, {}))
        user = self._own_user_records()
        before = self._projection(self._me, {(m, k) for m, k, _ in user}, now)
        self._quiet = True
        try:
            last = self._start_run_with(member_record, actors, user, now)
        finally:
            self._quiet = False
        self._report(self.peer_id, before, self._projection(self._me, set(before[2]), now))
        self.stats["compactions"] += 1
        return last

    def _start_run_with(
        self,
        member_record: MemberRecord,
        actors: dict[str, ActorRecord],
        user: list[tuple[str, str, UserRecord]],
        now: float,
    ) -> SignedUpdate | None:
        self.incarnation = max(c.id.incarnation for c in self._own_chains()) + 1
        self.chain_id = ChainId(self.peer_id, self.incarnation)
        self._register_chain(self.chain_id)
        self._retiring[self.peer_id] = self.incarnation
        self._retire(now, rebuild_as=self.chain_id.client_id)
        changes: list[tuple[str, str, BaseModel | None]] = [
            (ACTORS, self._actor_key(self._me, self.incarnation, name), record)
            for name, record in actors.items()
        ]
        changes += [
            (USER, self._user_key(self._me, self.incarnation, map_name, key), record)
            for map_name, key, record in user
        ]
        changes.append(
            (
                MEMBERS,
                chain_prefix(self.peer_id, self.incarnation),
                member_record.model_copy(update={"retires_older_runs": True}),
            )
        )
        return self._write_batches(changes, now)

    def _write_batches(
        self, changes: list[tuple[str, str, BaseModel | None]], now: float
    ) -> SignedUpdate | None:
        """Write in updates of at most half `max_update_bytes` of JSON; the last change last."""
        budget = self.config.max_update_bytes // 2
        batch: list[tuple[str, str, BaseModel | None]] = []
        size = 0
        last = None
        for index, change in enumerate(changes):
            record = change[2]
            cost = len(record.model_dump_json()) + len(change[1]) + 32 if record else 64
            if batch and (size + cost > budget or index == len(changes) - 1):
                last = self._write(batch, now) or last
                batch, size = [], 0
            batch.append(change)
            size += cost
        if batch:
            last = self._write(batch, now) or last
        return last

    def _retire(self, now: float, rebuild_as: int | None = None) -> None:
        """Carry out retirements: forget the retired runs' updates and entries at once; rebuild
        the document without them (a Yjs document cannot drop items, a new one can leave them
        out) once enough has been retired to pay for it, so retiring stays cheap per update."""
        if not self._retiring and rebuild_as is None:
            return
        retiring, self._retiring = self._retiring, {}
        dropped: dict[PeerId, list[_Chain]] = {}
        for author, below in retiring.items():
            if below <= self._retired_below.get(author, 0):
                continue
            self._retired_below[author] = below
            for chain in list(self._chains.values()):
                if chain.id.author == author and chain.id.incarnation < below:
                    dropped.setdefault(author, []).append(chain)
        before = {a: self._projection(peer_name(a), self._user_keys_of(a), now) for a in dropped}
        for author, chains in dropped.items():
            state = self._authors.get(author)
            for chain in chains:
                self._pending_count -= len(chain.pending)
                del self._chains[chain.id]
                self._clients.pop(chain.id.client_id, None)
                for envelope in chain.applied:
                    self._apply_order.pop(envelope.envelope_id, None)
                if state is not None:
                    state.incarnations.discard(chain.id.incarnation)
                self._purge_run(peer_name(author), chain.id.incarnation)
                self._retired_since_rebuild += len(chain.applied)
                self.stats["updates_retired"] += len(chain.applied)
        if rebuild_as is not None:
            self._rebuild(rebuild_as)
        elif self._retired_since_rebuild >= max(64, len(self._apply_order) // 4):
            self._rebuild(self.document.client_id)
        self._gossip_pool = self._member_peers = None
        self._digest = None
        for author, old in before.items():
            self._report(author, old, self._projection(peer_name(author), set(old[2]), now))

    def _purge_run(self, peer: str, incarnation: int) -> None:
        """Drop a retired run's parsed entries (its items stay in the document until rebuilt)."""
        runs = self._members.get(peer, {})
        runs.pop(incarnation, None)
        if not runs:
            self._members.pop(peer, None)
        actor_runs = self._actors.get(peer, {})
        actor_runs.pop(incarnation, None)
        if not actor_runs:
            self._actors.pop(peer, None)
        for map_name in list(self._user):
            keys = self._user[map_name]
            for key in list(keys):
                keys[key].pop((peer, incarnation), None)
                if not keys[key]:
                    del keys[key]
            if not keys:
                del self._user[map_name]
        prefix = f"{peer}/{incarnation}"
        for root, key in [k for k in self._writers if _in_run(k[1], prefix)]:
            del self._writers[(root, key)]

    def _user_keys_of(self, author: PeerId) -> set[tuple[str, str]]:
        name = peer_name(author)
        return {
            (map_name, key)
            for map_name, keys in self._user.items()
            for key, entries in keys.items()
            if any(peer == name for peer, _ in entries)
        }

    def _rebuild(self, client_id: int) -> None:
        """A fresh document from the updates we keep, replayed in the order we applied them."""
        live = sorted(
            (e for chain in self._chains.values() for e in chain.applied),
            key=lambda e: self._apply_order[e.envelope_id],
        )
        self.document = ViewDocument(client_id)
        self._members.clear()
        self._actors.clear()
        self._user.clear()
        self._writers.clear()
        self._apply_order = {}
        self._retired_since_rebuild = 0
        broken: set[ChainId] = set()
        for envelope in live:
            chain_id = envelope.chain
            if chain_id in broken:
                continue
            try:
                decoded = self.document.check(
                    envelope.update,
                    envelope.author,
                    envelope.incarnation,
                    chain_id.client_id,
                    self._owner_of,
                )
                changes = self.document.apply(envelope.update, decoded, envelope.author)
            except ViewError as exc:  # each was checked when it first arrived: a bug if it fails
                log.error("rebuilding the view: %s no longer applies: %s", envelope, exc)
                chain = self._chains[chain_id]  # keep the chain consistent: sync refetches
                del chain.applied[envelope.seq - 1 :]
                broken.add(chain_id)
                continue
            self._apply_order[envelope.envelope_id] = self._applied_count
            self._applied_count += 1
            for change in changes:
                if change.value is not None:
                    self._writers[(change.root, change.key)] = envelope
                self._absorb_entry(change)
        self._gossip_pool = self._member_peers = None
        self._digest = None
        self.stats["rebuilds"] += 1

    # ================================================================ equivocation, scores
    def _equivocation(
        self, known: SignedUpdate, envelope: SignedUpdate, sender: PeerId, now: float
    ) -> Outcome:
        proof = EquivocationProof(known, envelope)
        try:
            proof.verify()
        except InvalidEnvelope as exc:
            self.stats["rejected_forged"] += 1
            self._penalize(sender, self.config.penalty_invalid, str(exc), envelope.author)
            return Outcome.REJECTED
        self._convict(proof, sender, now)
        return Outcome.EQUIVOCATION

    def receive_proof(self, proof: EquivocationProof, sender: PeerId, now: float) -> bool:
        """A proof gossiped by someone else; True if it was new and valid."""
        author = self._authors.get(proof.author)
        if author is not None and author.proof is not None:
            return False
        try:
            proof.verify()
        except InvalidEnvelope as exc:
            self._penalize(sender, self.config.penalty_invalid, f"bad proof: {exc}")
            return False
        self._convict(proof, sender, now)
        return True

    def _convict(self, proof: EquivocationProof, sender: PeerId, now: float) -> None:
        author = self._author(proof.author, now, create=True)
        if author is None or author.proof is not None:
            return
        self.stats["equivocations"] += 1
        before = self._visible_actors(peer_name(proof.author), now)
        author.proof = proof
        self._proofs.append(proof)
        log.warning(
            "%s signed two different updates numbered %s/%d: refusing its updates from now on",
            proof.author.short(),
            proof.first.chain,
            proof.first.seq,
        )
        self._events.append(
            Misbehaviour(
                sender=peer_name(sender),
                author=peer_name(proof.author),
                reason=f"equivocation: two updates signed as {proof.first.chain}/{proof.first.seq}",
            )
        )
        member = self.member(peer_name(proof.author), now)
        if member is not None:
            self._events.append(MemberChanged(change="misbehaving", member=member))
        for actor in before.values():
            self._events.append(ActorChanged(change="hidden", actor=actor))
        for chain in self._chains.values():
            if chain.id.author == proof.author:
                self._pending_count -= len(chain.pending)
                chain.pending.clear()
        self._gossip_proofs.append(proof)

    def _penalize(
        self, sender: PeerId, amount: float, reason: str, author: PeerId | None = None
    ) -> None:
        score = self._scores.get(sender, 0.0) - amount
        self._scores[sender] = score
        self._gossip_pool = None
        log.warning("refused from %s: %s (score now %.0f)", sender.short(), reason, score)
        self._events.append(
            Misbehaviour(
                sender=peer_name(sender),
                author=peer_name(author) if author else None,
                reason=reason,
            )
        )

    def penalize_malformed(self, sender: PeerId, reason: str) -> None:
        """The service could not decode what `sender` sent."""
        self.stats["rejected_malformed"] += 1
        self._penalize(sender, self.config.penalty_malformed, reason)

    def score(self, peer: PeerId) -> float:
        return self._scores.get(peer, 0.0)

    def scores(self) -> dict[str, float]:
        return {peer_name(peer): score for peer, score in self._scores.items()}

    def is_refused(self, peer: PeerId) -> bool:
        """Senders whose score fell to `ban_score`: their streams are reset, no gossip to them."""
        return self._scores.get(peer, 0.0) <= self.config.ban_score

    # ================================================================ heartbeats and timers
    def receive_heartbeat(self, heartbeat: Heartbeat, sender: PeerId, now: float) -> bool:
        """True if the heartbeat was new, valid and fresh (and is to be forwarded)."""
        if heartbeat.author == self.peer_id:
            return False
        if heartbeat.incarnation < self._retired_below.get(heartbeat.author, 0):
            return False
        author = self._authors.get(heartbeat.author)
        if author is not None and not heartbeat.is_newer_than(author.heartbeat):
            self.stats["heartbeat_duplicates"] += 1
            return False
        try:
            heartbeat.verify()
        except InvalidEnvelope as exc:
            self.stats["rejected_forged"] += 1
            self._penalize(sender, self.config.penalty_invalid, str(exc), heartbeat.author)
            return False
        author = self._author(heartbeat.author, now, create=True)
        if author is None:
            return False
        self.stats["heartbeats_received"] += 1
        author.heartbeat = heartbeat
        age = now - heartbeat.timestamp_ms / 1000
        if age > self.config.gone_after + self.config.max_clock_skew:
            self.stats["heartbeats_stale"] += 1
            return False
        author.last_seen = now
        chain = self._chains.get(heartbeat.chain)
        head = chain.head if chain is not None else 0
        if heartbeat.head_seq > head and author.proof is None:
            author.gap = (heartbeat.incarnation, heartbeat.head_seq, sender, now)
        self._refresh_status(author, now)
        self._gossip_heartbeats.append(heartbeat)
        return True

    def handle_timer(self, now: float) -> None:
        """Heartbeat when due, re-evaluate liveness, schedule anti-entropy, expire held updates."""
        if now >= self._next_heartbeat:
            self._heartbeat_counter += 1
            self._gossip_heartbeats.append(
                Heartbeat.create(
                    self.key,
                    self.incarnation,
                    self._heartbeat_counter,
                    int(now * 1000),
                    self._chains[self.chain_id].head,
                )
            )
            self._next_heartbeat = now + self.config.heartbeat_interval
        if now >= self._next_sweep:
            self._next_sweep = now + self.config.heartbeat_interval / 4
            self._sweep(now)
        if now >= self._next_anti_entropy:
            self._next_anti_entropy = now + self.config.anti_entropy_interval * self._rng.uniform(
                0.75, 1.25
            )
            peer = self.pick_anti_entropy_peer()
            if peer is not None:
                self._request_sync(peer, "anti-entropy")
        if (
            self._older_run_seen is not None
            and now - self._older_run_seen >= self.config.gone_after
        ):
            self._adopt_older_runs(now)
        if self._chains[self.chain_id].head >= self.config.compact_after_updates:
            self.compact(now)
        if self._pending_count:
            self._expire_pending(now)
        for peer in [p for p, until in self._unreachable.items() if until <= now]:
            del self._unreachable[peer]
            self._gossip_pool = None

    def _sweep(self, now: float) -> None:
        """Liveness of every member, gaps that heartbeats showed and gossip did not fill, and
        authors known only from heartbeats that fell silent (so sybil heartbeats cost nothing
        lasting)."""
        silent: list[_Author] = []
        for author in self._authors.values():
            if author.peer != self.peer_id and not author.incarnations and author.proof is None:
                last = author.last_seen if author.last_seen is not None else author.first_seen
                if now - last > self.config.gone_after:
                    silent.append(author)
                    continue
            self._refresh_status(author, now)
            if author.gap is not None:
                incarnation, head, told_by, since = author.gap
                chain = self._chains.get(ChainId(author.peer, incarnation))
                if chain is not None and chain.head >= head:
                    author.gap = None
                elif now - since >= self.config.gap_grace:
                    self._request_sync(told_by, f"heartbeat of {author.peer.short()} shows gap")
                    author.gap = None
        for author in silent:
            del self._authors[author.peer]
            del self._authors_by_name[peer_name(author.peer)]

    def leaving_heartbeat(self, now: float) -> Heartbeat:
        """A last heartbeat saying we are going: receivers mark us gone without waiting."""
        self._heartbeat_counter += 1
        return Heartbeat.create(
            self.key,
            self.incarnation,
            self._heartbeat_counter,
            int(now * 1000),
            self._chains[self.chain_id].head,
            leaving=True,
        )

    def _expire_pending(self, now: float) -> None:
        for chain in self._chains.values():
            for seq, held in list(chain.pending.items()):
                if now - held.since > self.config.pending_ttl:
                    del chain.pending[seq]
                    self._pending_count -= 1
                    self._seen.pop(held.update.envelope_id, None)
                    self.stats["pending_expired"] += 1

    def _status(self, author: _Author, now: float) -> MemberStatus:
        if author.peer == self.peer_id:
            return MemberStatus.ALIVE
        if author.heartbeat is not None and author.heartbeat.leaving:
            return MemberStatus.GONE
        last = author.last_seen if author.last_seen is not None else author.first_seen
        age = now - last
        if age < self.config.suspect_after:
            return MemberStatus.ALIVE
        if age < self.config.gone_after:
            return MemberStatus.SUSPECT
        return MemberStatus.GONE

    def _refresh_status(self, author: _Author, now: float) -> None:
        peer = peer_name(author.peer)
        if peer not in self._members:
            return
        status = self._status(author, now)
        if status == author.status:
            return
        previous, author.status = author.status, status
        self._gossip_pool = None
        if previous is None:
            return  # the member was just added: `joined` was reported
        member = self.member(peer, now)
        if member is None:
            return
        self._events.append(MemberChanged(change=status.value, member=member))
        if MemberStatus.GONE in (previous, status) and author.proof is None:
            change = "hidden" if status == MemberStatus.GONE else "visible"
            for actor in self._member_actors(peer):
                self._events.append(ActorChanged(change=change, actor=actor))

    def _author(self, peer: PeerId, now: float, *, create: bool) -> _Author | None:
        author = self._authors.get(peer)
        if author is None and create:
            if len(self._authors) >= self.config.max_chains:
                self.stats["authors_refused"] += 1
                return None
            author = self._authors[peer] = _Author(peer, first_seen=now)
            self._authors_by_name[peer_name(peer)] = author
        return author

    # ================================================================ peers
    def known_peers(self) -> list[PeerId]:
        """Every member in the view other than us, in a stable order."""
        if self._member_peers is None:
            self._member_peers = sorted(
                a.peer
                for a in self._authors.values()
                if a.peer != self.peer_id and peer_name(a.peer) in self._members
            )
        return self._member_peers

    def pick_gossip_peers(self, count: int, extra: Iterable[PeerId], now: float) -> list[PeerId]:
        """Up to `count` random members that are not gone, refused or recently unreachable;
        `extra` peers (connected, not yet in the view) fill in while the view is small."""
        if self._gossip_pool is None:
            self._gossip_pool = [
                a.peer
                for a in self._authors.values()
                if a.peer != self.peer_id
                and peer_name(a.peer) in self._members
                and a.status != MemberStatus.GONE
                and not self.is_refused(a.peer)
                and a.peer not in self._unreachable
            ]
        pool = self._gossip_pool
        if len(pool) < count:
            known = set(pool)
            pool = pool + sorted(
                p
                for p in set(extra)
                if p not in known
                and p != self.peer_id
                and not self.is_refused(p)
                and p not in self._unreachable
            )
        return self._rng.sample(pool, min(count, len(pool)))

    def pick_anti_entropy_peer(self, extra: Iterable[PeerId] = ()) -> PeerId | None:
        """Any member, gone ones included: that is how the halves of a healed partition meet."""
        pool = [p for p in self.known_peers() if not self.is_refused(p)]
        pool.extend(p for p in extra if p != self.peer_id and not self.is_refused(p))
        return self._rng.choice(pool) if pool else None

    def mark_unreachable(self, peer: PeerId, now: float) -> None:
        self._unreachable[peer] = now + self.config.unreachable_backoff
        self._gossip_pool = None

    def mark_reachable(self, peer: PeerId) -> None:
        if self._unreachable.pop(peer, None) is not None:
            self._gossip_pool = None

    def _request_sync(self, peer: PeerId, reason: str) -> None:
        if peer != self.peer_id and not self.is_refused(peer):
            self._sync_requests.setdefault(peer, reason)

    # ================================================================ outputs
    def take_events(self) -> list[ViewChange]:
        events, self._events = self._events, []
        return events

    def take_gossip(
        self,
    ) -> tuple[list[SignedUpdate], list[Heartbeat], list[EquivocationProof]]:
        out = (self._gossip_updates, self._gossip_heartbeats, self._gossip_proofs)
        self._gossip_updates, self._gossip_heartbeats, self._gossip_proofs = [], [], []
        return out

    def requeue_gossip(
        self,
        updates: list[SignedUpdate],
        heartbeats: list[Heartbeat],
        proofs: list[EquivocationProof],
    ) -> None:
        """Keep what could not be pushed (no peer known yet) for the next flush, within limits."""
        limit = self.config.max_gossip_items
        self._gossip_updates = (updates + self._gossip_updates)[-limit:]
        latest: dict[PeerId, Heartbeat] = {}
        for heartbeat in heartbeats + self._gossip_heartbeats:
            if heartbeat.is_newer_than(latest.get(heartbeat.author)):
                latest[heartbeat.author] = heartbeat
        self._gossip_heartbeats = list(latest.values())[-limit:]
        self._gossip_proofs = (proofs + self._gossip_proofs)[-limit:]

    @property
    def has_gossip(self) -> bool:
        return bool(self._gossip_updates or self._gossip_heartbeats or self._gossip_proofs)

    def take_sync_requests(self) -> dict[PeerId, str]:
        requests, self._sync_requests = self._sync_requests, {}
        return requests

    def take_learned_addrs(self) -> dict[PeerId, list[str]]:
        learned, self._learned_addrs = self._learned_addrs, {}
        return learned

    # ================================================================ sync
    def heads(self) -> dict[int, int]:
        """Chain heads by Yjs client ID: the view's state vector."""
        return {c.id.client_id: c.head for c in self._chains.values() if c.head}

    def digest(self) -> bytes:
        """SHA-256 of the sorted heads: equal digests mean equal sets of applied updates."""
        if self._digest is None:
            hasher = hashlib.sha256()
            for client, head in sorted(self.heads().items()):
                hasher.update(client.to_bytes(8, "big") + head.to_bytes(8, "big"))
            self._digest = hasher.digest()
        return self._digest

    def updates_missing_from(self, heads: dict[int, int]) -> list[SignedUpdate]:
        """What a replica with `heads` lacks, in the order we applied it (dependencies first)."""
        missing: list[SignedUpdate] = []
        for chain in self._chains.values():
            theirs = heads.get(chain.id.client_id, 0)
            if chain.head > theirs:
                missing.extend(chain.applied[theirs:])
        missing.sort(key=lambda u: self._apply_order[u.envelope_id])
        return missing

    def proofs(self) -> list[EquivocationProof]:
        return list(self._proofs)

    def envelope(self, author: PeerId, incarnation: int, seq: int) -> SignedUpdate | None:
        chain = self._chains.get(ChainId(author, incarnation))
        if chain is None or not 1 <= seq <= chain.head:
            return None
        return chain.applied[seq - 1]

    # ================================================================ reading
    def members(self, now: float) -> list[Member]:
        out = [self.member(peer, now) for peer in sorted(self._members)]
        return [m for m in out if m is not None]

    def member(self, peer: str, now: float) -> Member | None:
        runs = self._members.get(peer)
        if not runs:
            return None
        incarnation = max(runs)
        record = runs[incarnation]
        author = self._authors_by_name.get(peer)
        heartbeat = author.heartbeat if author is not None else None
        last_heartbeat = heartbeat.timestamp_ms / 1000 if heartbeat is not None else None
        if peer == self._me:
            last_heartbeat = now
        return Member(
            peer_id=peer,
            cluster_name=record.cluster_name,
            addrs=record.addrs,
            resources=record.resources,
            versions=record.versions,
            incarnation=incarnation,
            started_at=record.started_at,
            status=self._status(author, now) if author is not None else MemberStatus.ALIVE,
            last_heartbeat=last_heartbeat,
            misbehaving=author is not None and author.proof is not None,
        )

    def actors(self, now: float, *, include_hidden: bool = False) -> list[ExportedActor]:
        """Exported actors by (name, owner). Hidden: those of gone or misbehaving members."""
        out: list[ExportedActor] = []
        for peer in sorted(self._actors):
            if include_hidden:
                out.extend(self._member_actors(peer))
            else:
                out.extend(self._visible_actors(peer, now).values())
        return sorted(out, key=lambda a: (a.name, a.owner))

    def own_actors(self) -> list[ExportedActor]:
        return self._member_actors(self._me)

    def _member_actors(self, peer: str) -> list[ExportedActor]:
        """The actors of the member's current run, visible or not."""
        runs = self._members.get(peer)
        if not runs:
            return []
        incarnation = max(runs)
        cluster = runs[incarnation].cluster_name
        actors = self._actors.get(peer, {}).get(incarnation, {})
        return [
            ExportedActor(
                name=name,
                owner=peer,
                cluster_name=cluster,
                class_name=record.class_name,
                methods=record.methods,
                exported_at=record.exported_at,
            )
            for name, record in sorted(actors.items())
        ]

    def _visible_actors(self, peer: str, now: float) -> dict[str, ExportedActor]:
        author = self._authors_by_name.get(peer)
        if author is None or author.proof is not None:
            return {}
        if self._status(author, now) == MemberStatus.GONE:
            return {}
        return {a.name: a for a in self._member_actors(peer)}

    def map_entries(self, map_name: str, writers: set[str] | None = None) -> dict[str, MapEntry]:
        """Every live key of a user map, each resolved across authors (last writer wins)."""
        out: dict[str, MapEntry] = {}
        for key in sorted(self._user.get(map_name, {})):
            entry = self.map_get(map_name, key, writers)
            if entry is not None:
                out[key] = entry
        return out

    def map_get(self, map_name: str, key: str, writers: set[str] | None = None) -> MapEntry | None:
        winner = self._resolve(map_name, key, writers)
        if winner is None:
            return None
        (peer, _), record = winner
        if record.deleted:
            return None
        return MapEntry(key=key, value=record.value, author=peer, version=record.version)

    def map_names(self) -> list[str]:
        return sorted(self._user)

    def _resolve(
        self, map_name: str, key: str, writers: set[str] | None = None
    ) -> tuple[tuple[str, int], UserRecord] | None:
        entries = self._user.get(map_name, {}).get(key, {})
        best: tuple[tuple[str, int], UserRecord] | None = None
        for (peer, incarnation), record in entries.items():
            if writers is not None and peer not in writers:
                continue
            author = self._authors_by_name.get(peer)
            if author is not None and author.proof is not None:
                continue
            rank = (record.version, peer, incarnation)
            if best is None or rank > (best[1].version, *best[0]):
                best = ((peer, incarnation), record)
        return best

    # ================================================================ audit
    def audit_member(self, peer: str) -> AuditRecord | None:
        runs = self._members.get(peer)
        if not runs:
            return None
        incarnation = max(runs)
        return self._audit(MEMBERS, f"{peer}/{incarnation}")

    def audit_actor(self, name: str, owner: str) -> AuditRecord | None:
        runs = self._members.get(owner)
        if not runs:
            return None
        return self._audit(ACTORS, self._actor_key(owner, max(runs), name))

    def audit_map(self, map_name: str, key: str) -> AuditRecord | None:
        winner = self._resolve(map_name, key)
        if winner is None:
            return None
        (peer, incarnation), _ = winner
        return self._audit(USER, self._user_key(peer, incarnation, map_name, key))

    def _audit(self, root: str, key: str) -> AuditRecord | None:
        envelope = self._writers.get((root, key))
        if envelope is None:
            return None
        return AuditRecord(
            entry=f"{root}[{key}]",
            author=peer_name(envelope.author),
            incarnation=envelope.incarnation,
            seq=envelope.seq,
            update_hash=envelope.update_hash.hex(),
            envelope_id=envelope.envelope_id.hex(),
            envelope=envelope.encode(),
        )

    def equivocations(self) -> list[EquivocationRecord]:
        return [
            EquivocationRecord(
                author=peer_name(proof.author),
                incarnation=proof.first.incarnation,
                seq=proof.first.seq,
                first=proof.first.encode(),
                second=proof.second.encode(),
            )
            for proof in self.proofs()
        ]

    # ================================================================ caches and change events
    def _absorb(self, envelope: SignedUpdate, changes: list[EntryChange], now: float) -> None:
        """Bring the parsed entries in step with the document; report what readers now see."""
        peer = peer_name(envelope.author)
        map_keys = {
            (parsed[2], parsed[3])
            for c in changes
            if c.root == USER and (parsed := _parse_user_key(c.key))
        }
        before = self._projection(peer, map_keys, now)
        for change in changes:
            if change.value is None:
                self._writers.pop((change.root, change.key), None)
            else:
                self._writers[(change.root, change.key)] = envelope
            self._absorb_entry(change)
        self._report(envelope.author, before, self._projection(peer, map_keys, now))

    def _projection(
        self, peer: str, map_keys: set[tuple[str, str]], now: float
    ) -> tuple[Member | None, dict[str, ExportedActor], dict[tuple[str, str], MapEntry | None]]:
        """What readers see of one author's entries (and of the given user-map keys)."""
        entries = {(m, k): self.map_get(m, k) for m, k in map_keys}
        return self.member(peer, now), self._visible_actors(peer, now), entries

    def _report(
        self,
        author_id: PeerId,
        before: tuple[Member | None, dict[str, ExportedActor], dict[tuple[str, str], Any]],
        after: tuple[Member | None, dict[str, ExportedActor], dict[tuple[str, str], Any]],
    ) -> None:
        if self._quiet:
            return
        member_before, actors_before, user_before = before
        member_after, actors_after, user_after = after
        author = self._authors.get(author_id)
        if member_after is not None and author is not None and author.status is None:
            author.status = member_after.status
        if member_after is not None and member_after != member_before:
            if member_before is None:
                change_kind = "joined"
            elif member_before.incarnation != member_after.incarnation:
                change_kind = "restarted"
            else:
                change_kind = "updated"
            self._events.append(MemberChanged(change=change_kind, member=member_after))
            learned = member_after.addrs
            if member_after.peer_id != self._me and learned != (
                member_before.addrs if member_before else None
            ):
                self._learned_addrs[author_id] = learned
        for name, actor in actors_after.items():
            old = actors_before.get(name)
            if old is None:
                self._events.append(ActorChanged(change="exported", actor=actor))
            elif old != actor:
                self._events.append(ActorChanged(change="updated", actor=actor))
        for name, actor in actors_before.items():
            if name not in actors_after:
                self._events.append(ActorChanged(change="unexported", actor=actor))
        for (map_name, key), old_entry in user_before.items():
            new_entry = user_after[(map_name, key)]
            if new_entry != old_entry:
                self._events.append(
                    MapChanged(
                        map=map_name,
                        key=key,
                        value=new_entry.value if new_entry else None,
                        deleted=new_entry is None,
                        author=new_entry.author if new_entry else peer_name(author_id),
                    )
                )

    def _absorb_entry(self, change: EntryChange) -> None:
        if change.root == MEMBERS:
            parsed = _parse_member_key(change.key)
            if parsed is None:
                return
            peer, incarnation = parsed
            runs = self._members.setdefault(peer, {})
            self._gossip_pool = self._member_peers = None
            record = _parse_record(MemberRecord, change.value)
            if record is None:
                runs.pop(incarnation, None)
                if not runs:
                    del self._members[peer]
            else:
                runs[incarnation] = record
        elif change.root == ACTORS:
            parsed_actor = _parse_actor_key(change.key)
            if parsed_actor is None:
                return
            peer, incarnation, name = parsed_actor
            runs_a = self._actors.setdefault(peer, {})
            actors = runs_a.setdefault(incarnation, {})
            actor = _parse_record(ActorRecord, change.value)
            if actor is None:
                actors.pop(name, None)
                if not actors:
                    del runs_a[incarnation]
                if not runs_a:
                    del self._actors[peer]
            else:
                actors[name] = actor
        elif change.root == USER:
            parsed_user = _parse_user_key(change.key)
            if parsed_user is None:
                return
            peer, incarnation, map_name, key = parsed_user
            keys = self._user.setdefault(map_name, {})
            entries = keys.setdefault(key, {})
            value = _parse_record(UserRecord, change.value)
            if value is None:
                entries.pop((peer, incarnation), None)
                if not entries:
                    del keys[key]
                if not keys:
                    del self._user[map_name]
            else:
                entries[(peer, incarnation)] = value

    # ================================================================ helpers
    def _remember_seen(self, envelope_id: bytes) -> None:
        self._seen[envelope_id] = None
        if len(self._seen) > self.config.seen_cache_size:
            self._seen.popitem(last=False)

    def _check_name(self, name: str, what: str) -> None:
        if not isinstance(name, str) or not name:
            raise InvalidValue(f"{what} must be a non-empty string, got {name!r}")
        if len(name) > self.config.max_name_length:
            raise InvalidValue(f"{what} is {len(name)} characters, over max_name_length")

    @staticmethod
    def _actor_key(peer: str, incarnation: int, name: str) -> str:
        return f"{peer}/{incarnation}/{name}"

    @staticmethod
    def _user_key(peer: str, incarnation: int, map_name: str, key: str) -> str:
        return f"{peer}/{incarnation}/" + json.dumps([map_name, key], separators=(",", ":"))

    def document_entries(self) -> dict[str, dict[str, str]]:
        """The document's entries of live runs, read directly (for checks that what readers see
        tells the truth); retired runs' items may linger in the document until it is rebuilt."""
        out = {}
        for root in (MEMBERS, ACTORS, USER):
            entries = self.document.entries(root)
            out[root] = {k: v for k, v in entries.items() if not self._retired_key(k)}
        return out

    def _retired_key(self, key: str) -> bool:
        peer, _, rest = key.partition("/")
        incarnation = rest.split("/", 1)[0]
        author = self._authors_by_name.get(peer)
        if author is None or not incarnation.isdigit():
            return False
        return int(incarnation) < self._retired_below.get(author.peer, 0)


# ==================================================================== document keys and records
def _in_run(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + "/")


def _parse_member_key(key: str) -> tuple[str, int] | None:
    peer, _, incarnation = key.partition("/")
    return (peer, int(incarnation)) if incarnation.isdigit() else None


def _parse_actor_key(key: str) -> tuple[str, int, str] | None:
    parts = key.split("/", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2]:
        return None
    return parts[0], int(parts[1]), parts[2]


def _parse_user_key(key: str) -> tuple[str, int, str, str] | None:
    parts = key.split("/", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    try:
        map_name, user_key = json.loads(parts[2])
    except (ValueError, TypeError):
        return None
    if not isinstance(map_name, str) or not isinstance(user_key, str):
        return None
    return parts[0], int(parts[1]), map_name, user_key


def _parse_record(model: type[RecordT], text: str | None) -> RecordT | None:
    if text is None:
        return None
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        log.warning("ignoring a %s that does not parse: %s", model.__name__, exc)
        return None


# ==================================================================== wire messages
def encode_message(message: view_pb2.ViewMessage) -> bytes:
    return message.SerializeToString()


def decode_message(data: bytes) -> view_pb2.ViewMessage:
    message = view_pb2.ViewMessage()
    try:
        message.ParseFromString(data)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise MalformedMessage(f"not a view message: {exc}") from exc
    if message.WhichOneof("body") is None:
        raise MalformedMessage("view message has no body (unknown message type?)")
    return message


def hello_message(digest: bytes) -> bytes:
    return encode_message(view_pb2.ViewMessage(hello=view_pb2.SyncHello(digest=digest)))


def vector_message(heads: dict[int, int] | None) -> bytes:
    """Our heads, or None to say the digests matched and there is nothing to exchange."""
    if heads is None:
        return encode_message(view_pb2.ViewMessage(vector=view_pb2.SyncVector(in_sync=True)))
    return encode_message(
        view_pb2.ViewMessage(
            vector=view_pb2.SyncVector(
                heads=[view_pb2.ChainHead(client_id=c, seq=s) for c, s in sorted(heads.items())]
            )
        )
    )


def heads_from(vector: view_pb2.SyncVector, limit: int) -> dict[int, int]:
    if len(vector.heads) > limit:
        raise MalformedMessage(f"sync vector lists {len(vector.heads)} chains, over {limit}")
    return {head.client_id: head.seq for head in vector.heads}


def chunk_messages(updates: Iterable[SignedUpdate], chunk_bytes: int) -> Iterator[bytes]:
    """`SyncChunk` messages carrying the length-prefixed updates, `chunk_bytes` at a time."""
    buffer = bytearray()
    for update in updates:
        buffer += encode_length_prefixed(update.encode())
        while len(buffer) >= chunk_bytes:
            piece, buffer = bytes(buffer[:chunk_bytes]), buffer[chunk_bytes:]
            yield encode_message(view_pb2.ViewMessage(chunk=view_pb2.SyncChunk(data=piece)))
    if buffer:
        yield encode_message(view_pb2.ViewMessage(chunk=view_pb2.SyncChunk(data=bytes(buffer))))


def done_message(count: int, proofs: list[EquivocationProof]) -> bytes:
    return encode_message(
        view_pb2.ViewMessage(
            done=view_pb2.SyncDone(updates=count, proofs=[p.to_pb() for p in proofs])
        )
    )


class ChunkAssembler:
    """Reassembles `SignedUpdate`s from sync chunks as they arrive, each size-checked."""

    def __init__(self, max_update_bytes: int) -> None:
        self._reader = LengthPrefixedReader(max_update_bytes + 512)  # room for the envelope
        self.count = 0

    def feed(self, chunk: bytes) -> list[SignedUpdate]:
        try:
            frames = self._reader.feed(chunk)
        except MessageTooLarge as exc:
            raise MalformedMessage(f"sync carries an oversized update: {exc}") from exc
        updates = [SignedUpdate.decode(frame) for frame in frames]
        self.count += len(updates)
        return updates

    def finish(self, announced: int) -> None:
        if self._reader.pending:
            raise MalformedMessage(f"sync ended inside an update ({self._reader.pending} bytes)")
        if announced != self.count:
            raise MalformedMessage(f"sync announced {announced} updates, carried {self.count}")


def gossip_messages(
    updates: list[SignedUpdate],
    heartbeats: list[Heartbeat],
    proofs: list[EquivocationProof],
    max_items: int,
    max_bytes: int,
) -> list[bytes]:
    """Gossip frames holding everything given, each within the item and byte limits."""
    frames: list[bytes] = []
    current = view_pb2.Gossip()
    size = 0
    items = 0

    def flush() -> None:
        nonlocal current, size, items
        if items:
            frames.append(encode_message(view_pb2.ViewMessage(gossip=current)))
        current, size, items = view_pb2.Gossip(), 0, 0

    for proof in proofs:
        pb = proof.to_pb()
        if items >= max_items or size + pb.ByteSize() + 16 > max_bytes:
            flush()
        current.proofs.append(pb)
        size += pb.ByteSize() + 16
        items += 1
    for update in updates:
        pb_u = update.to_pb()
        if items >= max_items or size + pb_u.ByteSize() + 16 > max_bytes:
            flush()
        current.updates.append(pb_u)
        size += pb_u.ByteSize() + 16
        items += 1
    for heartbeat in heartbeats:
        pb_h = heartbeat.to_pb()
        if items >= max_items or size + pb_h.ByteSize() + 16 > max_bytes:
            flush()
        current.heartbeats.append(pb_h)
        size += pb_h.ByteSize() + 16
        items += 1
    flush()
    return frames


def parse_gossip(
    gossip: view_pb2.Gossip, max_items: int
) -> tuple[list[SignedUpdate], list[Heartbeat], list[EquivocationProof]]:
    total = len(gossip.updates) + len(gossip.heartbeats) + len(gossip.proofs)
    if total > max_items:
        raise MalformedMessage(f"gossip frame carries {total} items, over {max_items}")
    try:
        return (
            [SignedUpdate.from_pb(u) for u in gossip.updates],
            [Heartbeat.from_pb(h) for h in gossip.heartbeats],
            [EquivocationProof.from_pb(p) for p in gossip.proofs],
        )
    except ValueError as exc:
        raise MalformedMessage(f"gossip frame: {exc}") from exc
