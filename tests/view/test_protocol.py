"""The view replica as a pure state machine: updates, write rules, equivocation, liveness, sync
helpers and wire framing. No network, no sleeps; time is a number passed in."""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Doc, Map, Text

from lattica_ray.view.config import ViewConfig
from lattica_ray.view.envelope import EquivocationProof, Heartbeat, SignedUpdate, derive_client_id
from lattica_ray.view.errors import (
    InvalidValue,
    MalformedMessage,
    MissingDependency,
    WriteRuleViolation,
)
from lattica_ray.view.models import (
    ActorChanged,
    ActorMethod,
    ActorRecord,
    MapChanged,
    MemberChanged,
    MemberRecord,
    MemberStatus,
    Misbehaviour,
    Resources,
)
from lattica_ray.view.pb import view_pb2
from lattica_ray.view.protocol import (
    ChunkAssembler,
    Outcome,
    ViewReplica,
    chunk_messages,
    decode_message,
    gossip_messages,
    parse_gossip,
)
from lattica_ray.view.yupdate import decode_update
from tests.view.helpers import FAST, Forger
from transport.identity import KeyPair, PeerId

T0 = 1_700_000_000.0
SENDER = KeyPair.from_seed(b"s" * 32).peer_id  # whoever relayed the update to us


def new_replica(
    key: KeyPair | None = None, incarnation: int = 1, config: ViewConfig = FAST, now: float = T0
) -> ViewReplica:
    return ViewReplica(
        key or KeyPair.generate(), config, incarnation=incarnation, now=now, rng=random.Random(1)
    )


def member(cluster: str = "lab", cpus: float = 4) -> MemberRecord:
    return MemberRecord(cluster_name=cluster, addrs=[], resources=Resources(cpus=cpus))


def actor(class_name: str = "Learner") -> ActorRecord:
    return ActorRecord(class_name=class_name, methods=[ActorMethod(name="act", kind="async")])


def deliver(
    target: ViewReplica,
    envelopes: list[SignedUpdate],
    sender: PeerId = SENDER,
    now: float = T0,
    fresh: bool = True,
) -> list[Outcome]:
    return [target.receive_update(e, sender, now, fresh=fresh) for e in envelopes]


def view_of(r: ViewReplica, now: float = T0) -> tuple[object, ...]:
    """Everything a reader sees, liveness aside."""
    members = [
        m.model_copy(update={"status": None, "last_heartbeat": None}) for m in r.members(now)
    ]
    maps = {name: r.map_entries(name) for name in r.map_names()}
    return members, r.actors(now, include_hidden=True), maps


def history() -> tuple[list[ViewReplica], list[SignedUpdate]]:
    """Three authors writing members, actors and a shared user-map key, some having seen others."""
    a, b, c = new_replica(), new_replica(), new_replica()
    log: list[SignedUpdate] = []

    def keep(envelope: SignedUpdate | None) -> SignedUpdate:
        assert envelope is not None
        log.append(envelope)
        return envelope

    for r in (a, b, c):
        keep(r.announce(member(), T0))
    keep(a.export_actor("learner", actor(), T0))
    keep(a.set_user("rl", "policy", 1, T0))
    deliver(b, log[:])  # b has seen a's policy=1: its write supersedes it
    keep(b.set_user("rl", "policy", 2, T0))
    keep(c.set_user("rl", "policy", 99, T0))  # concurrent with both
    keep(c.export_actor("worker", actor("Worker"), T0))
    keep(c.unexport_actor("worker", T0))
    keep(a.announce(member(cpus=64), T0))
    keep(b.set_user("rl", "temp", "x", T0))
    deliver(b, [e for e in log if e.author != b.peer_id])
    keep(b.delete_user("rl", "temp", T0))
    return [a, b, c], log


# ==================================================================== convergence
@settings(max_examples=25, deadline=None)
@given(st.randoms(use_true_random=False))
def test_same_updates_in_any_order_give_the_same_view(rnd: random.Random) -> None:
    _, log = history()
    reference = new_replica()
    deliver(reference, log)
    shuffled = new_replica()
    order = log[:]
    rnd.shuffle(order)
    deliver(shuffled, order)  # out-of-order ones wait, then apply as their predecessors arrive
    assert shuffled.digest() == reference.digest()
    assert view_of(shuffled) == view_of(reference)
    assert shuffled.document_entries() == reference.document_entries()
    assert shuffled.stats["pending_held"] >= 0 and shuffled._pending_count == 0


def test_history_resolves_as_documented() -> None:
    authors, log = history()
    observer = new_replica()
    assert set(deliver(observer, log)) == {Outcome.APPLIED}
    a, b, c = authors
    # b saw a's version 1 and wrote version 2; c wrote version 1 concurrently: version wins
    assert observer.map_get("rl", "policy").value == 2
    assert observer.map_get("rl", "policy").author == str(b.peer_id)
    assert observer.map_get("rl", "temp") is None  # deleted by a tombstone
    assert observer.map_get("rl", "policy", writers={str(c.peer_id)}).value == 99
    assert [x.name for x in observer.actors(T0)] == ["learner"]
    assert observer.member(str(a.peer_id), T0).resources.cpus == 64
    # what readers see (parsed as updates arrived) matches the document read afresh
    entries = observer.document_entries()
    assert len(entries["members"]) == 3
    for key, text in entries["members"].items():
        peer, incarnation = key.split("/")
        assert observer._members[peer][int(incarnation)] == MemberRecord.model_validate_json(text)
    assert sorted(entries["actors"]) == [f"{a.peer_id}/1/learner"]


# ==================================================================== forged and replayed
def test_forged_signature_is_refused_and_the_sender_loses_score() -> None:
    author, observer = new_replica(), new_replica()
    honest = author.announce(member(), T0)
    deliver(observer, [honest])
    before = view_of(observer)
    changed = author.announce(member(cpus=1000), T0)
    forged = dataclasses.replace(changed, signature=bytes(64))
    assert deliver(observer, [forged]) == [Outcome.REJECTED]
    assert view_of(observer) == before
    assert observer.score(SENDER) < 0
    assert any(isinstance(e, Misbehaviour) for e in observer.take_events())
    assert deliver(observer, [changed]) == [Outcome.APPLIED]  # the real one still gets in


def test_update_bytes_swapped_under_a_valid_signature_are_refused() -> None:
    author, observer = new_replica(), new_replica()
    first = author.announce(member(), T0)
    second = author.announce(member(cpus=8), T0)
    swapped = dataclasses.replace(second, update=first.update)
    assert deliver(observer, [first, swapped]) == [Outcome.APPLIED, Outcome.REJECTED]
    assert observer.stats["rejected_forged"] == 1


def test_replayed_old_update_is_dropped_and_changes_nothing() -> None:
    author, observer = new_replica(), new_replica()
    old = author.announce(member(cpus=1), T0)
    new = author.announce(member(cpus=2), T0)
    deliver(observer, [old, new])
    for fresh in (True, False):
        assert deliver(observer, [old], fresh=fresh) == [Outcome.DUPLICATE]
    assert observer.member(str(author.peer_id), T0).resources.cpus == 2
    assert observer.score(SENDER) == 0  # duplicates are normal in gossip: no penalty


# ==================================================================== write rules
def _victim_and_observer() -> tuple[ViewReplica, ViewReplica, list[SignedUpdate]]:
    victim, observer = new_replica(), new_replica()
    log = [victim.announce(member("victim"), T0), victim.export_actor("svc", actor(), T0)]
    deliver(observer, log)
    return victim, observer, log


def _attacks(victim: ViewReplica, log: list[SignedUpdate]) -> dict[str, SignedUpdate]:
    v = f"{victim.peer_id}/{victim.incarnation}"
    fake = MemberRecord(cluster_name="hijacked").model_dump_json()
    attacks = {}

    def forger(seen: bool = False, **kwargs: object) -> Forger:
        f = Forger(**kwargs)  # type: ignore[arg-type]
        if seen:
            f.see(*log)
        return f

    f = forger()
    attacks["writes another member's entry"] = f.write(lambda r: r["members"].__setitem__(v, fake))
    f = forger(seen=True)
    attacks["overwrites another member's entry"] = f.write(
        lambda r: r["members"].__setitem__(v, fake)
    )
    f = forger(seen=True)
    attacks["deletes another member's actor"] = f.write(lambda r: r["actors"].pop(f"{v}/svc"))
    f = forger(client_id=derive_client_id(victim.peer_id, victim.incarnation))
    attacks["uses another author's client ID"] = f.write(
        lambda r: r["members"].__setitem__(f"{f.peer_id}/1", fake)
    )
    f = forger()
    attacks["writes a nested type"] = f.write(
        lambda r: r["members"].__setitem__(f.prefix, Map({"cluster_name": "x"}))
    )
    f = forger()
    attacks["writes another incarnation's key"] = f.write(
        lambda r: r["members"].__setitem__(f"{f.peer_id}/999", fake)
    )
    f = forger()
    attacks["writes an unknown root"] = f.write(
        lambda r: f.doc.get("evil", type=Map).__setitem__(f.prefix, "x")
    )
    f = forger()
    attacks["writes text content"] = f.write(
        lambda r: f.doc.get("members", type=Text).insert(0, "x")
    )
    return attacks


@pytest.mark.parametrize(
    "attack",
    [
        "writes another member's entry",
        "overwrites another member's entry",
        "deletes another member's actor",
        "uses another author's client ID",
        "writes a nested type",
        "writes another incarnation's key",
        "writes an unknown root",
        "writes text content",
    ],
)
def test_out_of_rule_updates_are_refused_and_the_honest_state_is_intact(attack: str) -> None:
    victim, observer, log = _victim_and_observer()
    before, entries = view_of(observer), observer.document_entries()
    envelope = _attacks(victim, log)[attack]
    assert deliver(observer, [envelope]) == [Outcome.REJECTED]
    assert view_of(observer) == before
    assert observer.document_entries() == entries
    assert observer.score(SENDER) < 0
    assert observer.stats["rejected_rule"] == 1
    # the honest author keeps writing, and it still applies
    assert deliver(observer, [victim.export_actor("svc2", actor(), T0)]) == [Outcome.APPLIED]


def test_a_refused_update_ends_its_chain() -> None:
    victim, observer, _ = _victim_and_observer()
    f = Forger()
    good = f.announce()
    bad = f.write(lambda r: r["members"].__setitem__(f"{victim.peer_id}/1", "x"))
    after = f.write(lambda r: r["actors"].__setitem__(f"{f.prefix}/a", actor().model_dump_json()))
    assert deliver(observer, [good, bad, after]) == [
        Outcome.APPLIED,
        Outcome.REJECTED,
        Outcome.REJECTED,
    ]


def test_the_copy_check_catches_an_effect_even_without_the_structural_check() -> None:
    """Defence in depth: applied to the probe copy first, a bad effect never reaches the view."""
    victim, observer, log = _victim_and_observer()
    entries = observer.document_entries()
    attack = _attacks(victim, log)["overwrites another member's entry"]
    doc = observer.document
    with pytest.raises(WriteRuleViolation, match="on a copy"):
        doc.apply(attack.update, decode_update(attack.update), attack.author)
    assert observer.document_entries() == entries
    # the probe was rebuilt from the real document: honest updates still go through
    assert deliver(observer, [victim.export_actor("svc3", actor(), T0)]) == [Outcome.APPLIED]


def test_the_copy_check_catches_pycrdt_holding_an_update_back() -> None:
    """The other safety net: if an update that pycrdt cannot integrate ever got past the structural
    check, the copy shows it (nothing integrated) and the real document is never touched."""
    author, observer = new_replica(), new_replica()
    first, second = author.announce(member(cpus=1), T0), author.announce(member(cpus=2), T0)
    doc = observer.document
    with pytest.raises(MissingDependency, match="holds the rest back"):
        doc.apply(second.update, decode_update(second.update), second.author)
    assert observer.document_entries()["members"] == {}
    assert deliver(observer, [first, second]) == [Outcome.APPLIED, Outcome.APPLIED]


# ==================================================================== gaps and pycrdt's silent hold
def test_pycrdt_holds_an_update_with_missing_predecessors_silently() -> None:
    """The trap: apply_update succeeds and nothing happens. The replica must not rely on it."""
    author = new_replica()
    first, second = author.announce(member(cpus=1), T0), author.announce(member(cpus=2), T0)
    raw = Doc()
    raw.apply_update(second.update)  # no error...
    assert raw.get("members", type=Map).to_py() == {}  # ...and no effect

    observer = new_replica()
    assert deliver(observer, [second]) == [Outcome.PENDING]
    assert observer.take_sync_requests() == {SENDER: f"gap before {second.chain}/2"}
    assert deliver(observer, [first]) == [Outcome.APPLIED]
    assert observer.member(str(author.peer_id), T0).resources.cpus == 2


def test_a_restarted_node_adopts_its_earlier_run_and_retires_it() -> None:
    key = KeyPair.generate()
    old = new_replica(key, incarnation=1)
    old_log = [
        old.announce(member(), T0),
        old.export_actor("svc", actor(), T0),
        old.set_user("rl", "policy", 5, T0),
    ]
    seen_old = _replica_with(old_log)
    new = new_replica(key, incarnation=2)
    new.announce(member(), T0)
    deliver(new, old_log[:2])  # the new run learns of the old one...
    new.handle_timer(T0 + FAST.gone_after / 2)
    deliver(new, old_log[2:], now=T0 + FAST.gone_after / 2)  # ...whose last update comes late
    assert new.document_entries()["members"].keys() == {f"{key.peer_id}/1", f"{key.peer_id}/2"}
    assert [a.name for a in new.actors(T0)] == []  # only the current run's actors are shown
    new.handle_timer(T0 + FAST.gone_after)  # adopted and retired now
    new_log = [u for u in new.take_gossip()[0] if u.chain == new.chain_id]  # (and forwards old)
    assert [u.seq for u in new_log] == list(range(1, len(new_log) + 1))
    entries = new.document_entries()
    assert list(entries["members"]) == [f"{key.peer_id}/2"] and entries["actors"] == {}
    assert new.map_get("rl", "policy").value == 5  # kept, under the new run
    assert new.map_get("rl", "policy").version == 1  # with its version

    never_saw_old = _replica_with(new_log)
    assert deliver(seen_old, new_log) == [Outcome.APPLIED] * len(new_log)
    for r in (seen_old, never_saw_old):
        assert r.document_entries() == entries
        assert r.digest() == new.digest()
        assert r.map_get("rl", "policy").value == 5
        assert [m.incarnation for m in r.members(T0) if m.peer_id == str(key.peer_id)] == [2]
    assert seen_old.stats["updates_retired"] == 3
    assert deliver(seen_old, old_log) == [Outcome.RETIRED] * 3  # late copies of the old run


def test_compaction_keeps_the_log_and_document_the_size_of_what_is_live() -> None:
    config = FAST.model_copy(update={"compact_after_updates": 50})
    author = new_replica(config=config)
    observer, late = new_replica(config=config), new_replica(config=config)
    author.announce(member(), T0)
    author.export_actor("svc", actor(), T0)
    deliver(observer, author.take_gossip()[0])
    author.take_events(), observer.take_events()
    sizes = []
    for round_ in range(6):
        for i in range(100):
            author.set_user("run", f"k{i % 10}", round_ * 100 + i, T0)
            author.handle_timer(T0)  # compacts once the run reaches 50 updates
        deliver(observer, author.take_gossip()[0])
        sizes.append((observer.document.encoded_size(), len(observer.updates_missing_from({}))))
    assert author.stats["compactions"] >= 10
    # nothing a reader sees changed but the values written: no actor or member churn reported
    for replica in (author, observer):
        kinds = {(type(e).__name__, getattr(e, "change", None)) for e in replica.take_events()}
        assert not any(kind == "ActorChanged" for kind, _ in kinds)
        assert ("MemberChanged", "updated") not in kinds
    assert observer.digest() == author.digest()
    assert max(n for _, n in sizes) <= 60  # updates held: one run, never the whole history
    assert max(b for b, _ in sizes) < 2 * min(b for b, _ in sizes)  # bytes do not creep up
    assert observer.map_entries("run") == author.map_entries("run")
    assert observer.map_get("run", "k9").value == 599
    assert [a.name for a in observer.actors(T0)] == ["svc"]
    assert observer.member(str(author.peer_id), T0).incarnation == author.incarnation
    # a newcomer syncing now receives only the live run
    missing = author.updates_missing_from(late.heads())
    assert len(missing) <= 60
    deliver(late, missing, fresh=False)
    assert late.document_entries() == author.document_entries()


def test_an_update_touching_its_authors_earlier_run_is_refused() -> None:
    key = KeyPair.generate()
    first, second = Forger(key, incarnation=1), Forger(key, incarnation=2)
    old = first.announce()
    second.see(old)
    observer = _replica_with([old, second.announce()])
    edit = second.write(lambda r: r["members"].pop(first.prefix))
    assert deliver(observer, [edit]) == [Outcome.REJECTED]
    assert observer.stats["rejected_rule"] == 1


def test_the_pending_buffer_is_bounded() -> None:
    config = FAST.model_copy(update={"pending_per_chain": 4, "pending_total": 6})
    a, b, observer = new_replica(), new_replica(), new_replica(config=config)
    a_log = [a.announce(member(), T0)] + [a.set_user("m", str(i), i, T0) for i in range(20)]
    b_log = [b.announce(member(), T0)] + [b.set_user("m", str(i), i, T0) for i in range(20)]
    deliver(observer, a_log[1:] + b_log[1:])  # every first update missing: nothing applies
    assert observer._pending_count == 6
    assert max(len(c.pending) for c in observer._chains.values()) == 4
    assert observer.stats["pending_dropped"] == 40 - 6
    deliver(observer, [a_log[0], b_log[0]])
    # what was dropped comes again (sync) and is accepted: it was not marked as seen
    deliver(observer, a_log + b_log)
    assert observer.digest() == _replica_with(a_log + b_log).digest()


def test_held_updates_expire() -> None:
    author, observer = new_replica(), new_replica()
    first, second = author.announce(member(), T0), author.announce(member(cpus=2), T0)
    deliver(observer, [second])
    observer.handle_timer(T0 + FAST.pending_ttl + 1)
    assert observer._pending_count == 0 and observer.stats["pending_expired"] == 1
    assert deliver(observer, [first, second], now=T0 + 100) == [Outcome.APPLIED, Outcome.APPLIED]


def _replica_with(log: list[SignedUpdate]) -> ViewReplica:
    r = new_replica()
    deliver(r, log)
    return r


# ==================================================================== equivocation
def test_equivocation_is_caught_with_proof_and_the_author_refused() -> None:
    key = KeyPair.generate()
    honest_run = new_replica(key)
    first = [honest_run.announce(member(), T0), honest_run.export_actor("svc", actor(), T0)]
    twin = Forger(key)  # the same key and incarnation, signing something else as number 2
    twin.see(first[0])
    twin.seq = 1
    conflicting = twin.write(
        lambda r: r["actors"].__setitem__(f"{twin.prefix}/other", actor().model_dump_json())
    )
    assert conflicting.seq == first[1].seq and conflicting.update != first[1].update

    observer = new_replica()
    deliver(observer, first)
    assert deliver(observer, [conflicting]) == [Outcome.EQUIVOCATION]
    (record,) = observer.equivocations()
    proof = EquivocationProof(SignedUpdate.decode(record.first), SignedUpdate.decode(record.second))
    proof.verify()  # both envelopes kept, and they prove it to anyone
    assert {proof.first.update, proof.second.update} == {first[1].update, conflicting.update}
    assert observer.member(str(key.peer_id), T0).misbehaving
    assert observer.actors(T0) == []  # hidden
    events = observer.take_events()
    assert any(isinstance(e, MemberChanged) and e.change == "misbehaving" for e in events)
    assert any(isinstance(e, ActorChanged) and e.change == "hidden" for e in events)
    later = honest_run.set_user("m", "k", 1, T0)
    assert deliver(observer, [later]) == [Outcome.BANNED]
    assert observer.take_gossip()[2] == [proof]  # spread, so others refuse the author too

    # the proof convinces a replica that never saw the second update
    other = _replica_with(first)
    assert other.receive_proof(proof, SENDER, T0)
    assert other.member(str(key.peer_id), T0).misbehaving
    assert not other.receive_proof(proof, SENDER, T0)  # once is enough


def test_a_fake_proof_costs_the_sender() -> None:
    author, observer = new_replica(), new_replica()
    envelope = author.announce(member(), T0)
    fake = EquivocationProof(envelope, dataclasses.replace(envelope, update=b"x"))
    assert not observer.receive_proof(fake, SENDER, T0)
    assert observer.score(SENDER) < 0 and observer.equivocations() == []


# ==================================================================== liveness
def test_suspect_then_gone_then_back() -> None:
    author, observer = new_replica(), new_replica()
    deliver(observer, [author.announce(member(), T0), author.export_actor("svc", actor(), T0)])
    peer = str(author.peer_id)
    observer.take_events()

    def status(now: float) -> MemberStatus:
        observer.handle_timer(now)
        return observer.member(peer, now).status

    assert status(T0 + FAST.suspect_after - 1) == MemberStatus.ALIVE
    assert status(T0 + FAST.suspect_after + 1) == MemberStatus.SUSPECT
    assert [a.name for a in observer.actors(T0 + FAST.suspect_after + 1)] == ["svc"]
    gone_at = T0 + FAST.gone_after + 1
    assert status(gone_at) == MemberStatus.GONE
    assert observer.actors(gone_at) == []
    assert [a.name for a in observer.actors(gone_at, include_hidden=True)] == ["svc"]
    changes = [(type(e).__name__, e.change) for e in observer.take_events()]
    assert changes == [
        ("MemberChanged", "suspect"),
        ("MemberChanged", "gone"),
        ("ActorChanged", "hidden"),
    ]

    author.handle_timer(gone_at + 1)  # it comes back and beats
    (beat,) = author.take_gossip()[1]
    assert observer.receive_heartbeat(beat, SENDER, gone_at + 1)
    assert observer.member(peer, gone_at + 1).status == MemberStatus.ALIVE
    assert observer.member(peer, gone_at + 1).last_heartbeat == pytest.approx(gone_at + 1)
    assert [a.name for a in observer.actors(gone_at + 1)] == ["svc"]
    changes = [(type(e).__name__, e.change) for e in observer.take_events()]
    assert changes == [("MemberChanged", "alive"), ("ActorChanged", "visible")]


def test_stale_heartbeat_is_no_sign_of_life() -> None:
    author, observer = new_replica(), new_replica()
    deliver(observer, [author.announce(member(), T0)])
    author.handle_timer(T0)
    (beat,) = author.take_gossip()[1]
    late = T0 + FAST.gone_after + FAST.max_clock_skew + 1
    assert not observer.receive_heartbeat(beat, SENDER, late)  # not forwarded either
    assert observer.stats["heartbeats_stale"] == 1
    observer.handle_timer(late)
    assert observer.member(str(author.peer_id), late).status == MemberStatus.GONE


def test_leaving_heartbeat_marks_gone_at_once() -> None:
    author, observer = new_replica(), new_replica()
    deliver(observer, [author.announce(member(), T0)])
    assert observer.receive_heartbeat(author.leaving_heartbeat(T0), SENDER, T0)
    assert observer.member(str(author.peer_id), T0).status == MemberStatus.GONE


def test_forged_and_duplicate_heartbeats() -> None:
    author, observer = new_replica(), new_replica()
    author.handle_timer(T0)
    (beat,) = author.take_gossip()[1]
    forged = dataclasses.replace(beat, counter=beat.counter + 1)
    assert not observer.receive_heartbeat(forged, SENDER, T0)
    assert observer.score(SENDER) < 0
    assert observer.receive_heartbeat(beat, SENDER, T0)
    assert not observer.receive_heartbeat(beat, SENDER, T0)  # de-duplicated: not forwarded again
    assert observer.take_gossip()[1] == [beat]


def test_heartbeat_showing_a_gap_triggers_a_sync_with_its_sender_after_grace() -> None:
    author, observer = new_replica(), new_replica()
    deliver(observer, [author.announce(member(), T0)])
    author.set_user("m", "k", 1, T0)  # gossip of this one is lost
    author.handle_timer(T0)
    (beat,) = author.take_gossip()[1]
    relay = KeyPair.generate().peer_id
    observer.take_sync_requests()
    observer.receive_heartbeat(beat, relay, T0)
    observer.handle_timer(T0 + FAST.gap_grace / 2)
    assert relay not in observer.take_sync_requests()  # gossip may still bring it
    observer.handle_timer(T0 + FAST.gap_grace + 1)
    assert relay in observer.take_sync_requests()


def test_heartbeats_never_grow_the_document_or_the_state() -> None:
    a, b = new_replica(), new_replica()
    deliver(b, [a.announce(member(), T0)])
    deliver(a, [b.announce(member(), T0)])
    size_a, size_b = a.document.encoded_size(), b.document.encoded_size()
    for i in range(5000):
        now = T0 + i * FAST.heartbeat_interval
        a.handle_timer(now)
        for beat in a.take_gossip()[1]:
            assert b.receive_heartbeat(beat, a.peer_id, now)
        b.handle_timer(now)
        b.take_gossip()
    assert a.document.encoded_size() == size_a and b.document.encoded_size() == size_b
    assert b.stats["heartbeats_received"] == 5000
    assert len(b._authors) == 2 and len(b._seen) == 2  # one entry per author, nothing per beat
    assert b.member(str(a.peer_id), now).status == MemberStatus.ALIVE


# ==================================================================== audit and user maps
def test_audit_names_the_signed_update_that_wrote_each_entry() -> None:
    authors, log = history()
    observer = _replica_with(log)
    a, b, _ = authors
    for record, author in [
        (observer.audit_member(str(a.peer_id)), a),
        (observer.audit_actor("learner", str(a.peer_id)), a),
        (observer.audit_map("rl", "policy"), b),
    ]:
        assert record is not None and record.author == str(author.peer_id)
        envelope = SignedUpdate.decode(record.envelope)
        envelope.verify()
        assert envelope in log
        assert envelope.update_hash.hex() == record.update_hash
    # the member entry was last written by a's second announce, not its first
    assert observer.audit_member(str(a.peer_id)).seq == 4
    assert observer.audit_map("rl", "temp") is not None  # the tombstone has a writer too


def test_map_changes_are_reported_with_the_winner() -> None:
    a, observer = new_replica(), new_replica()
    deliver(observer, [a.announce(member(), T0)])
    observer.take_events()
    deliver(observer, [a.set_user("rl", "policy", {"version": 3}, T0)])
    (event,) = [e for e in observer.take_events() if isinstance(e, MapChanged)]
    assert (event.map, event.key, event.value, event.author) == (
        "rl",
        "policy",
        {"version": 3},
        str(a.peer_id),
    )


def test_local_writes_are_validated() -> None:
    r = new_replica()
    with pytest.raises(InvalidValue, match="max_name_length"):
        r.set_user("m", "k" * 1000, 1, T0)
    with pytest.raises(InvalidValue, match="non-empty"):
        r.export_actor("", actor(), T0)
    with pytest.raises(InvalidValue, match="max_value_bytes"):
        r.set_user("m", "k", "x" * (FAST.max_value_bytes + 1), T0)
    assert r.unexport_actor("never-exported", T0) is None
    assert r.delete_user("m", "absent", T0) is None


# ==================================================================== sync helpers and wire
def test_missing_updates_come_in_the_order_they_were_applied() -> None:
    _, log = history()
    full = _replica_with(log)
    assert full.updates_missing_from(full.heads()) == []
    partial = _replica_with(log[:5])
    missing = full.updates_missing_from(partial.heads())
    assert missing == log[5:]
    deliver(partial, missing)
    assert partial.digest() == full.digest()


def test_sync_chunks_carry_large_updates_in_pieces() -> None:
    author = new_replica(config=FAST.model_copy(update={"max_value_bytes": 200_000}))
    updates = [
        author.announce(member(), T0),
        author.set_user("blob", "k", "x" * 100_000, T0),
        author.set_user("blob", "j", 1, T0),
    ]
    chunks = list(chunk_messages(updates, 4096))
    assert len(chunks) > 20
    assembler = ChunkAssembler(FAST.max_update_bytes)
    received = []
    for chunk in chunks:
        message = decode_message(chunk)
        assert len(message.chunk.data) <= 4096
        received += assembler.feed(message.chunk.data)
    assembler.finish(len(updates))
    assert received == updates
    with pytest.raises(MalformedMessage, match="announced"):
        assembler.finish(5)
    small = ChunkAssembler(50_000)
    with pytest.raises(MalformedMessage, match="oversized"):
        for chunk in chunks:
            small.feed(decode_message(chunk).chunk.data)
    cut = ChunkAssembler(FAST.max_update_bytes)
    cut.feed(decode_message(chunks[0]).chunk.data)
    with pytest.raises(MalformedMessage, match="inside an update"):
        cut.finish(0)


def test_gossip_frames_respect_limits() -> None:
    _, log = history()
    beats = [Heartbeat.create(KeyPair.generate(), 1, 1, 0, 0) for _ in range(5)]
    frames = gossip_messages(log, beats, [], max_items=4, max_bytes=100_000)
    assert len(frames) == -(-(len(log) + 5) // 4)
    parsed = [parse_gossip(decode_message(f).gossip, 4) for f in frames]
    assert [u for p in parsed for u in p[0]] == log
    assert [h for p in parsed for h in p[1]] == beats
    with pytest.raises(MalformedMessage, match="over 2"):
        parse_gossip(decode_message(frames[0]).gossip, 2)


@pytest.mark.parametrize("data", [b"\xff\xff", b"", view_pb2.ViewMessage().SerializeToString()])
def test_undecodable_messages_are_malformed(data: bytes) -> None:
    with pytest.raises(MalformedMessage):
        decode_message(data)


def test_authors_known_only_from_heartbeats_are_forgotten_when_silent() -> None:
    observer = new_replica()
    for _ in range(50):  # heartbeats from keys that never write anything
        stranger = new_replica()
        stranger.handle_timer(T0)
        (beat,) = stranger.take_gossip()[1]
        observer.receive_heartbeat(beat, SENDER, T0)
    assert len(observer._authors) == 51
    observer.handle_timer(T0 + FAST.gone_after + 1)
    assert len(observer._authors) == 1  # just ourselves


@settings(max_examples=15, deadline=None)
@given(st.randoms(use_true_random=False))
def test_compacting_authors_in_any_delivery_order(rnd: random.Random) -> None:
    """Several authors compacting while their updates arrive shuffled: every replica ends with
    the authors' own picture, refuses nothing, and logs no error."""
    config = FAST.model_copy(update={"compact_after_updates": 12})
    authors = [new_replica(config=config) for _ in range(3)]
    log: list[SignedUpdate] = []
    for author in authors:
        log.append(author.announce(member(), T0))
        author.take_gossip()
    for i in range(40):
        author = rnd.choice(authors)
        if i % 7 == 0:
            author.export_actor(f"a{i}", actor(), T0)
        else:
            author.set_user("run", f"k{i % 5}", i, T0)
        author.handle_timer(T0)
        log += author.take_gossip()[0]
    for author in authors:  # the authors see each other, in order
        deliver(author, [u for u in log if u.author != author.peer_id])
    shuffled = log[:]
    rnd.shuffle(shuffled)
    observer = new_replica(config=config)
    deliver(observer, shuffled)
    deliver(observer, log, fresh=False)  # what sync would bring for anything dropped
    assert observer.stats["rejected_rule"] == 0 and observer.stats["rejected_malformed"] == 0
    for author in authors:
        assert view_of(author) == view_of(observer)
        assert author.digest() == observer.digest()
