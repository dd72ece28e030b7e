"""The cluster view over real `Host` streams (in-memory network): sync, gossip, partitions,
liveness, restarts, attacks over the wire. The view clock is fake; tests move it and tick."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest
from pydantic import BaseModel

from lattica_ray.view import (
    PROTOCOL_ID,
    ActorChanged,
    ClusterView,
    InvalidValue,
    MapChanged,
    MemberChanged,
    MemberStatus,
    Resources,
    SubscriptionOverflow,
    ViewChange,
    ViewNotStarted,
    ViewSubscription,
)
from lattica_ray.view.envelope import SignedUpdate
from lattica_ray.view.pb import view_pb2
from lattica_ray.view.protocol import encode_message, gossip_messages
from tests.view.helpers import FAST, Forger, Mesh, converged, settle, wait_all
from transport.identity import KeyPair
from transport.varint import encode_length_prefixed


async def next_change(
    subscription: ViewSubscription, kind: type, change: str | None = None, timeout: float = 5.0
) -> ViewChange:
    """The next change of `kind` (and `change`), skipping others."""
    async with asyncio.timeout(timeout):
        async for event in subscription:
            if isinstance(event, kind) and (change is None or event.change == change):
                return event
    raise AssertionError("subscription ended")


def members_everywhere(views: list[ClusterView], count: int):
    return lambda: all(len(v.members()) == count for v in views)


def heard_all(views: list[ClusterView], target: dict) -> Callable[[], bool]:
    """Every view has every other's heartbeat numbered at least as in `target`."""

    def check() -> bool:
        for view in views:
            for peer, counter in target.items():
                author = view._replica._authors.get(peer)
                if peer != view.peer_id and (
                    author is None or author.heartbeat is None or author.heartbeat.counter < counter
                ):
                    return False
        return True

    return check


async def beat(mesh: Mesh, seconds: float, live: list[ClusterView]) -> None:
    """Move the clock a heartbeat at a time, waiting each time until `live` views heard each
    other (so only the views left out fall silent)."""
    for _ in range(round(seconds / FAST.heartbeat_interval)):
        mesh.tick(FAST.heartbeat_interval)
        target = {v.peer_id: v._replica._heartbeat_counter for v in live}
        await wait_all(live, heard_all(live, target))


async def test_members_converge_with_what_they_advertise(mesh: Mesh) -> None:
    a = await mesh.add(cluster_name="lab", resources={"cpus": 32, "gpus": 2})
    b = await mesh.add(cluster_name="home", resources=Resources(gpus=1, memory_bytes=2**34))
    c = await mesh.add(cluster_name="home")
    views = [a, b, c]
    await wait_all(views, lambda: converged(views)() and members_everywhere(views, 3)())
    seen = {m.peer_id: m for m in c.members()}
    assert seen[str(a.peer_id)].cluster_name == "lab"
    assert seen[str(a.peer_id)].resources.gpus == 2
    assert seen[str(b.peer_id)].resources.memory_bytes == 2**34
    assert seen[str(a.peer_id)].addrs == [str(x) for x in a.host.addrs]
    assert seen[str(a.peer_id)].versions["lattica-ray"]
    assert all(m.status == MemberStatus.ALIVE for m in seen.values())
    # what the view learned about addresses went to the host, for later dials
    assert c.host.inner._peer_addrs[a.peer_id] == a.host.addrs

    b.set_resources({"cpus": 8})
    await wait_all(views, lambda: c.member(b.peer_id).resources.cpus == 8)


async def test_actors_and_maps_reach_everyone_and_subscribers_hear_of_it(mesh: Mesh) -> None:
    a, b, c = await mesh.add_many(3)
    views = [a, b, c]
    await wait_all(views, members_everywhere(views, 3))
    async with c.subscribe() as changes:
        exported = a.export_actor("learner", "Learner", {"act": "async", "weights": "sync"})
        event = await next_change(changes, ActorChanged, "exported")
        assert event.actor == exported
        assert c.actor("learner").method("act").kind == "async"

        b.map("rl").set("policy_version", 7)
        event = await next_change(changes, MapChanged)
        assert (event.map, event.key, event.value, event.author) == (
            "rl",
            "policy_version",
            7,
            str(b.peer_id),
        )
        assert c.map("rl")["policy_version"] == 7

        assert a.unexport_actor("learner")
        event = await next_change(changes, ActorChanged, "unexported")
        assert c.actors() == [] and c.actor("learner") is None
    assert not a.unexport_actor("learner")


class Policy(BaseModel):
    version: int
    url: str


async def test_typed_user_maps(mesh: Mesh) -> None:
    a, b = await mesh.add_many(2)
    policies = a.map("rl", Policy)
    policies.set("current", Policy(version=3, url="s3://p/3"))
    with pytest.raises(InvalidValue):
        policies.set("bad", {"version": "three"})  # type: ignore[arg-type]
    b.map("rl").set("noise", "not a policy")  # another author's untyped value
    await wait_all([a, b], converged([a, b]))
    on_b = b.map("rl", Policy)
    assert on_b["current"] == Policy(version=3, url="s3://p/3")
    assert "noise" not in on_b.items()  # does not fit the model: skipped, not raised
    assert b.map("rl").get("noise") == "not a policy"
    trusted = b.map("rl", Policy, writers=[b.peer_id])
    assert trusted.get("current") is None  # only a wrote it
    assert on_b.entry("current").author == str(a.peer_id)
    assert b.audit_map("rl", "current").author == str(a.peer_id)
    assert a.map("rl").delete("current") and not a.map("rl").delete("current")
    await wait_all([a, b], lambda: "current" not in b.map("rl"))


async def test_partition_and_heal_lose_no_update(mesh: Mesh) -> None:
    views = await mesh.add_many(6)
    await wait_all(views, lambda: converged(views)() and members_everywhere(views, 6)())
    left, right = views[:3], views[3:]
    mesh.partition.split([v.peer_id for v in left], [v.peer_id for v in right])
    for i, view in enumerate(views):
        view.map("run").set(f"from-{i}", i)
        view.export_actor(f"actor-{i}", "Worker")
    await wait_all(left, converged(left))
    await wait_all(right, converged(right))
    assert left[0].digest() != right[0].digest()
    assert sorted(left[0].map("run").keys()) == ["from-0", "from-1", "from-2"]

    mesh.partition.heal()
    await settle(mesh, views, converged(views))  # anti-entropy picks gone members too
    for view in views:
        assert sorted(view.map("run").items().values()) == list(range(6))
        assert len(view.actors()) == 6


async def test_suspect_gone_and_back(mesh: Mesh) -> None:
    a, b, c = await mesh.add_many(3)
    views = [a, b, c]
    c.export_actor("svc", "Service")
    await wait_all(views, lambda: converged(views)() and len(a.actors()) == 1)
    mesh.partition.split([a.peer_id, b.peer_id], [c.peer_id])
    async with a.subscribe() as changes:
        await beat(mesh, FAST.suspect_after + 1, [a, b])
        event = await next_change(changes, MemberChanged, "suspect")
        assert event.member.peer_id == str(c.peer_id)
        assert a.member(b.peer_id).status == MemberStatus.ALIVE  # b kept beating
        assert a.actors()[0].name == "svc"  # suspect members keep their actors
        await beat(mesh, FAST.gone_after - FAST.suspect_after, [a, b])
        await next_change(changes, MemberChanged, "gone")
        await next_change(changes, ActorChanged, "hidden")
        assert a.actors() == [] and a.actors(include_hidden=True)[0].name == "svc"
        assert a.member(c.peer_id).status == MemberStatus.GONE

        mesh.partition.heal()
        mesh.tick(FAST.heartbeat_interval)  # c beats again (and a syncs with gone members)
        await next_change(changes, MemberChanged, "alive")
        await next_change(changes, ActorChanged, "visible")
        assert [x.name for x in a.actors()] == ["svc"]


async def test_graceful_stop_is_seen_at_once(mesh: Mesh) -> None:
    a, b = await mesh.add_many(2)
    await wait_all([a, b], members_everywhere([a, b], 2))
    await b.stop()
    await wait_all([a], lambda: a.member(b.peer_id).status == MemberStatus.GONE)


async def test_restart_starts_a_new_run_that_adopts_and_retires_the_old(mesh: Mesh) -> None:
    a = await mesh.add()
    key = KeyPair.generate()
    b = await mesh.add(key=key, incarnation=1)
    b.export_actor("old-actor", "Old")
    b.map("rl").set("policy", 41)
    await wait_all([a, b], lambda: len(a.actors()) == 1 and "policy" in a.map("rl"))
    await b.stop()

    b2 = await mesh.add(key=key, incarnation=2)
    b2.export_actor("new-actor", "New")
    await wait_all(
        [a, b2],
        lambda: converged([a, b2])() and [x.name for x in a.actors()] == ["new-actor"],
    )
    assert a.member(key.peer_id).incarnation == 2
    assert a.map("rl")["policy"] == 41  # the old run's value, until the new run adopts it

    def old_run_gone() -> bool:
        entries = a._replica.document_entries()
        return not any(f"{key.peer_id}/1" in k for root in entries.values() for k in root)

    await beat(mesh, FAST.gone_after, [a, b2])  # the new run adopts the old one's values...
    await wait_all([a, b2], old_run_gone)  # ...and retires it: a rebuilt its document without it
    assert a.map("rl")["policy"] == 41
    assert a.audit_map("rl", "policy").incarnation == 2
    assert a._replica.stats["updates_retired"] == 3


async def test_forged_replayed_and_out_of_rule_updates_over_the_wire(mesh: Mesh) -> None:
    a, b = await mesh.add_many(2)
    a.export_actor("svc", "Service")
    await wait_all([a, b], converged([a, b]))
    honest = b._replica.document_entries()
    rogue_host = mesh.network.add_host()
    rogue = Forger(rogue_host.key)
    old = a._replica.envelope(a.peer_id, a.incarnation, 1)
    a.set_resources({"cpus": 99})
    await wait_all([a, b], converged([a, b]))
    honest = b._replica.document_entries()

    victim_key = f"{a.peer_id}/{a.incarnation}"
    rogue.see(*a._replica.updates_missing_from({}))
    attacks = [
        rogue.announce(),  # fine on its own
        rogue.write(lambda r: r["members"].__setitem__(victim_key, "{}")),  # out of rule
    ]
    forged = SignedUpdate.create(rogue.key, 1, 1, b"\x00\x00")
    forged = SignedUpdate(a.peer_id, a.incarnation, 99, forged.update, forged.signature)

    async def send(updates: list[SignedUpdate]) -> None:
        stream = await rogue_host.open_stream(b.peer_id, [PROTOCOL_ID])
        for frame in gossip_messages(updates, [], [], 100, FAST.max_message_bytes):
            await stream.write_message(frame)
        await stream.close()
        await stream.read_to_end()  # the view closes its side when done

    await send([old, *attacks, forged])  # a replay, a valid one, an out-of-rule, a forgery
    await wait_all([b], lambda: b.scores().get(str(rogue.peer_id), 0) < 0)
    assert b.member(a.peer_id).resources.cpus == 99  # the replay rolled nothing back
    entries = b._replica.document_entries()
    assert entries["members"][victim_key] == honest["members"][victim_key]
    assert entries["actors"] == honest["actors"]
    assert b._replica.stats["rejected_forged"] == 1 and b._replica.stats["rejected_rule"] == 1

    # a sender that keeps misbehaving is refused outright
    for _ in range(10):
        junk = SignedUpdate(a.peer_id, a.incarnation, 99, b"x", bytes(64))
        try:
            await send([junk])
        except Exception:
            break
    assert b._replica.is_refused(rogue.peer_id)
    stream = await rogue_host.open_stream(b.peer_id, [PROTOCOL_ID])
    await stream.write(encode_length_prefixed(encode_message(view_pb2.ViewMessage())))
    with pytest.raises(Exception, match="reset"):
        await stream.read_to_end()


async def test_malformed_message_costs_the_sender(mesh: Mesh) -> None:
    (a,) = await mesh.add_many(1)
    rogue_host = mesh.network.add_host()
    stream = await rogue_host.open_stream(a.peer_id, [PROTOCOL_ID])
    await stream.write(encode_length_prefixed(b"\xff\xff\xff"))
    with pytest.raises(Exception, match="reset"):
        await stream.read_to_end()
    assert a.scores()[str(rogue_host.peer_id)] == -FAST.penalty_malformed


async def test_large_state_streams_to_a_newcomer_in_chunks(mesh: Mesh) -> None:
    config = FAST.model_copy(update={"sync_chunk_bytes": 1024})
    a = await mesh.add(config)
    methods = {f"method_{i:03d}": "async" for i in range(40)}
    for i in range(30):
        a.export_actor(f"actor-{i}", "BigActor", methods)
    sent_before = a.stats["messages_sent_sync"]
    b = await mesh.add(config)  # joins a: one sync
    await wait_all([a, b], converged([a, b]))
    assert len(b.actors()) == 30
    assert b.actors()[0].methods == a.actors()[0].methods
    assert a.stats["messages_sent_sync"] - sent_before > 30  # many 1 KiB chunks, not one message


async def test_sync_between_equal_replicas_is_one_round_trip(mesh: Mesh) -> None:
    a, b = await mesh.add_many(2)
    await wait_all([a, b], converged([a, b]))
    before = a.stats["bytes_sent_sync"]
    assert await a.sync_with(b.peer_id) == (0, 0)
    assert a.stats["bytes_sent_sync"] - before < 64  # just the digest


async def test_subscriber_that_falls_behind_is_told(mesh: Mesh) -> None:
    config = FAST.model_copy(update={"subscriber_queue": 2})
    a = await mesh.add(config)
    subscription = a.subscribe()
    for i in range(5):
        a.map("m").set(str(i), i)
    assert isinstance(await anext(subscription), MapChanged)
    assert isinstance(await anext(subscription), MapChanged)
    with pytest.raises(SubscriptionOverflow):
        await anext(subscription)


async def test_subscriptions_end_when_the_view_stops(mesh: Mesh) -> None:
    a = await mesh.add()
    subscription = a.subscribe()
    await a.stop()
    with pytest.raises(StopAsyncIteration):
        await anext(subscription)
    with pytest.raises(ViewNotStarted):
        a.map("m").set("k", 1)


async def test_heartbeats_keep_the_document_and_traffic_flat(mesh: Mesh) -> None:
    views = await mesh.add_many(3)
    await wait_all(views, lambda: converged(views)() and members_everywhere(views, 3)())
    sizes = [v.document_size() for v in views]

    async def rounds(count: int) -> int:
        before = sum(v.stats["bytes_sent_gossip"] + v.stats["bytes_sent_sync"] for v in views)
        await beat(mesh, count * FAST.heartbeat_interval, views)
        after = sum(v.stats["bytes_sent_gossip"] + v.stats["bytes_sent_sync"] for v in views)
        return after - before

    first = await rounds(100)
    second = await rounds(100)
    assert [v.document_size() for v in views] == sizes
    assert second < first * 1.5  # per-round traffic does not grow with the run's length
    assert all(m.status == MemberStatus.ALIVE for m in views[0].members())


@pytest.mark.parametrize("count", [20])
async def test_many_nodes_converge_after_random_concurrent_updates(mesh: Mesh, count: int) -> None:
    views = await mesh.add_many(count)
    rng = random.Random(7)
    await settle(mesh, views, lambda: converged(views)() and members_everywhere(views, count)())
    for i, view in enumerate(views):
        choice = rng.randrange(3)
        if choice == 0:
            view.set_resources({"cpus": rng.randrange(64)})
        elif choice == 1:
            view.export_actor(f"a{i}", "W")
        else:
            view.map("run").set(f"k{rng.randrange(5)}", i)
    await settle(mesh, views, converged(views))
    reference = views[0]
    for view in views[1:]:
        assert view.actors() == reference.actors()
        assert view.map("run").items() == reference.map("run").items()


async def test_status_text_lists_members_and_actors(mesh: Mesh) -> None:
    a, b = await mesh.add_many(2)
    a.export_actor("learner", "Learner", {"act": "async"})
    await wait_all([a, b], lambda: len(b.actors()) == 1 and len(b.members()) == 2)
    text = b.status_text()
    members, actors = text.split("\n\n")
    assert members.splitlines()[0].split()[:3] == ["PEER", "CLUSTER", "STATUS"]
    assert str(a.peer_id) in members and str(b.peer_id) in members
    assert "learner" in actors and "act(async)" in actors
