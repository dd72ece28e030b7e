"""The DHT service over an in-memory network: tens of real nodes, the public API, bad peers."""

from __future__ import annotations

import asyncio
import random

import pytest

from lattica_ray.dht import (
    DHT,
    PROTOCOL_ID,
    ContentId,
    DHTConfig,
    InvalidRecord,
    NoPeersError,
    PeerNotFound,
    PutFailed,
)
from lattica_ray.dht.protocol import (
    DecodeLimits,
    Message,
    MessageType,
    PeerInfo,
    Record,
    decode_message,
    encode_message,
)
from lattica_ray.dht.records import SignedRecord
from lattica_ray.dht.sdk import SdkValue, SubkeyIndex
from tests.dht.conftest import DHTNet, key_pair
from transport.errors import StreamReset
from transport.identity import PeerId
from transport.memory_host import MemoryHost
from transport.multiaddr import Multiaddr
from transport.stream import Stream
from transport.varint import encode_varint

HOUR = 3600.0
KEY = "/lattica/actor/policy"


async def ask(host: MemoryHost, dht: DHT, message: Message) -> Message:
    """One hand-made request from a non-DHT host."""
    stream = await host.open_stream(dht.local, [PROTOCOL_ID])
    await stream.write_message(encode_message(message))
    answer = decode_message(await stream.read_message(), DecodeLimits())
    await stream.close()
    return answer


async def send_raw(host: MemoryHost, dht: DHT, payload: bytes) -> Stream:
    stream = await host.open_stream(dht.local, [PROTOCOL_ID])
    await stream.write(payload)
    return stream


# -- joining ----------------------------------------------------------------------------------
async def test_bootstrap_fills_every_table(dht_net: DHTNet) -> None:
    dhts = await dht_net.grow(25)
    for dht in dhts:
        assert len(dht.table) >= 15, dht.table.bucket_sizes()
    everyone = {d.local for d in dhts}
    assert set().union(*(set(d.table) for d in dhts)) == everyone


async def test_bootstrap_needs_a_reachable_peer_id(dht_net: DHTNet) -> None:
    lonely = await dht_net.add()
    with pytest.raises(ValueError, match="/p2p/"):
        await lonely.bootstrap(["/ip4/127.0.0.1/udp/1/quic-v1"])
    ghost = key_pair().peer_id
    with pytest.raises(NoPeersError, match="none of the 1 bootstrap peers"):
        await lonely.bootstrap([f"/ip4/127.0.0.1/udp/9/quic-v1/p2p/{ghost}"])
    with pytest.raises(NoPeersError, match="bootstrap"):
        await lonely.get(KEY)
    assert await lonely.bootstrap(lonely.host.addrs) == 0  # a first node, given itself: fine


# -- records ----------------------------------------------------------------------------------
async def test_put_replicates_to_the_k_closest_and_get_reads_it(dht_net: DHTNet) -> None:
    dhts = await dht_net.grow(30, DHTConfig(k=8))
    writer, reader = dhts[3], dhts[27]
    assert await writer.put(KEY, b"weights v1") == 8
    holders = [d for d in dhts if KEY.encode() in d.records]
    assert len(holders) == 9  # the 8 closest and the writer itself
    found = await reader.get_record(KEY)
    assert found is not None
    assert found.value == b"weights v1"
    assert found.author == writer.local
    assert found.expires == pytest.approx(dht_net.clock() + writer.config.record_ttl)


async def test_newest_record_wins_and_stale_holders_are_corrected(dht_net: DHTNet) -> None:
    dhts = await dht_net.grow(20, DHTConfig(get_quorum=19))
    writer = dhts[1]
    await writer.put(KEY, b"v1")
    dht_net.clock.advance(60)
    newer = SignedRecord.create(writer.key, KEY.encode(), b"v2", dht_net.clock(), HOUR).encode()
    few = dhts[2:5]
    for dht in few:  # only three peers heard of v2
        assert dht.records.put(KEY.encode(), newer, dht_net.clock())
    reader = dhts[10]
    assert await reader.get(KEY) == b"v2"
    stale = [d for d in dhts if d is not reader and d not in few and d is not writer]
    assert all(d.records.get(KEY.encode(), dht_net.clock()) == newer for d in stale)


async def test_a_stale_put_is_refused_by_peers_holding_a_newer_record(dht_net: DHTNet) -> None:
    dhts = await dht_net.grow(12)
    dht_net.clock.advance(60)
    await dhts[1].put(KEY, b"newer")
    dht_net.clock.advance(-60)  # the second writer's clock is a minute behind
    with pytest.raises(PutFailed, match="hold a newer record"):
        await dhts[2].put(KEY, b"older")
    assert await dhts[5].get(KEY) == b"newer"


async def test_invalid_puts_are_refused_before_anything_is_sent(dht_net: DHTNet) -> None:
    dhts = await dht_net.grow(5)
    sent = dhts[0].stats.requests_sent
    with pytest.raises(InvalidRecord, match="no validator"):
        await dhts[0].put("/ipns/name", b"v")
    with pytest.raises(InvalidRecord, match="exceeds"):
        await dhts[0].put(KEY, b"x" * (dhts[0].config.max_record_size + 1))
    assert dhts[0].stats.requests_sent == sent
    assert all(len(d.records) == 0 for d in dhts)


async def test_records_expire_and_are_republished(dht_net: DHTNet) -> None:
    config = DHTConfig(record_ttl=2 * HOUR, record_republish_interval=HOUR)
    dhts = await dht_net.grow(10, config)
    writer, reader = dhts[0], dhts[9]
    await writer.put(KEY, b"v")
    dht_net.clock.advance(2 * HOUR)
    assert await reader.get(KEY) is None  # expired everywhere
    await writer.republish_records()
    found = await reader.get_record(KEY)
    assert found is not None and found.value == b"v"
    assert found.created == pytest.approx(dht_net.clock(), abs=0.01)  # freshly re-signed


async def test_holders_replicate_when_replicas_die(dht_net: DHTNet) -> None:
    dhts = await dht_net.grow(30, DHTConfig(k=5))
    writer = dhts[0]
    await writer.put(KEY, b"v")

    def holders() -> list[DHT]:
        return [
            d for d in dhts if d is not writer and d.local in alive and KEY.encode() in d.records
        ]

    alive = {d.local for d in dhts}
    assert len(holders()) == 5
    for dead in holders()[:2]:
        dht_net.network.kill(dead.local)
        alive.discard(dead.local)
    assert len(holders()) == 3
    for survivor in holders():
        await survivor.replicate()
    assert len(holders()) >= 5  # back to k replicas


# -- providers --------------------------------------------------------------------------------
async def test_provide_and_find_providers(dht_net: DHTNet) -> None:
    dhts = await dht_net.grow(25)
    provider, seeker = dhts[4], dhts[20]
    cid = ContentId.of(b"policy weights, epoch 7")
    assert await provider.provide(cid) >= 1
    found = await seeker.find_providers(cid)
    assert [info.peer_id for info in found] == [provider.local]
    assert found[0].dialable_addrs == provider.host.addrs
    assert provider.host.addrs[0] in seeker.host.peer_addrs(provider.local)
    assert await seeker.find_providers(ContentId.of(b"nobody has this")) == []


def announced(dhts: list[DHT], cid: ContentId, provider: DHT, when: float) -> bool:
    """Does every node hold the provider announcement made at `when`?"""
    return all(
        any(
            r.peer == provider.local and r.received_at == when
            for r in d.providers.get(cid.multihash, when)
        )
        for d in dhts
    )


async def test_provider_records_expire_after_48h_unless_republished(dht_net: DHTNet) -> None:
    dhts = await dht_net.grow(12)
    provider, seeker = dhts[1], dhts[11]
    cid = ContentId.of(b"blob")
    await provider.provide(cid)
    assert announced(dhts, cid, provider, dht_net.clock())
    dht_net.clock.advance(22 * HOUR)
    await provider.republish_providers()  # what the 22 h timer does
    assert announced(dhts, cid, provider, dht_net.clock())
    dht_net.clock.advance(47 * HOUR)  # 69 h after the first announcement
    assert [i.peer_id for i in await seeker.find_providers(cid)] == [provider.local]
    dht_net.clock.advance(2 * HOUR)  # 49 h after the last one: gone
    assert await seeker.find_providers(cid) == []
    provider.stop_providing(cid)
    await provider.republish_providers()
    assert await seeker.find_providers(cid) == []


# -- peer routing -----------------------------------------------------------------------------
async def test_find_peer_returns_addresses_and_tells_the_host(dht_net: DHTNet) -> None:
    dhts = await dht_net.grow(25)
    seeker, target = dhts[0], dhts[24]
    relay_addr = Multiaddr.parse(
        f"/ip4/10.9.9.9/udp/4001/quic-v1/p2p/{dhts[5].local}/p2p-circuit/p2p/{target.local}"
    )
    for dht in dhts[1:]:  # everyone also knows a relayed address of the target
        dht.host.add_peer_addrs(target.local, [relay_addr])
    dht_net.clock.advance(seeker.config.peer_info_cache_ttl)  # responses may lag that much
    addrs = await seeker.find_peer(target.local)
    assert set(addrs) == {*target.host.addrs, relay_addr}
    assert relay_addr in seeker.host.peer_addrs(target.local)
    with pytest.raises(PeerNotFound):
        await seeker.find_peer(key_pair().peer_id)


# -- client and server mode -------------------------------------------------------------------
async def test_client_nodes_query_but_are_never_added(dht_net: DHTNet) -> None:
    servers = await dht_net.grow(15)
    client = await dht_net.add(DHTConfig(mode="client"))
    await client.bootstrap([servers[0].host.addrs[0]])
    await client.put(KEY, b"from a client")
    assert await servers[9].get(KEY) == b"from a client"
    await client.refresh(force=True)
    for server in servers:
        await server.settle()
    assert not any(client.local in s.table for s in servers)

    client.set_mode("server")  # it became reachable
    dht_net.clock.advance(servers[0].config.stale_peer_age)  # they probed it as a client
    await client.refresh(force=True)  # the servers it asks probe it back ...
    for server in servers:
        await server.settle()
    assert any(client.local in s.table for s in servers)  # ... and now find a DHT server


async def test_server_turning_client_leaves_tables(dht_net: DHTNet) -> None:
    dhts = await dht_net.grow(15)
    leaver, other = dhts[7], dhts[0]
    assert leaver.local in other.table
    leaver.set_mode("client")
    await other.get_closest_peers(leaver.local.multihash)
    assert leaver.local not in other.table
    with pytest.raises(ValueError, match="client"):
        leaver.set_mode("peer")  # type: ignore[arg-type]


# -- other kad protocol IDs and lattica SDK records --------------------------------------------
SDK_KAD = "/lattica/1.0.0"  # the lattica SDK's Kademlia protocol ID


async def test_one_dht_across_two_protocol_ids(dht_net: DHTNet) -> None:
    """A node serving both IDs joins peers that speak only one of them into one DHT."""
    bridge = await dht_net.add(DHTConfig(protocols=(PROTOCOL_ID, SDK_KAD)))
    ipfs_only = await dht_net.add()
    sdk_only = await dht_net.add(DHTConfig(protocols=(SDK_KAD,)))
    for dht in (ipfs_only, sdk_only):
        await dht.bootstrap(bridge.host.addrs, refresh_buckets=False)
    await bridge.settle()  # it probes those who asked it, before tabling them
    assert bridge.protocol_of(ipfs_only.local) == PROTOCOL_ID
    assert bridge.protocol_of(sdk_only.local) == SDK_KAD
    assert set(bridge.table) == {ipfs_only.local, sdk_only.local}

    assert await ipfs_only.put(KEY, b"from /ipfs/kad") == 1  # the bridge; the other: no match
    assert sdk_only.local not in ipfs_only.table
    entry = bridge.records.entry(KEY.encode(), dht_net.clock())
    assert entry is not None and entry.publisher == ipfs_only.local.multihash
    assert await sdk_only.get(KEY) == b"from /ipfs/kad"

    other = "/lattica/actor/other"
    assert await sdk_only.put(other, b"from /lattica/1.0.0") == 1
    assert await ipfs_only.get(other) == b"from /lattica/1.0.0"
    # Once known, a peer's protocol is proposed alone (no multistream round trip per request).
    proposed: list[list[str]] = []
    open_stream = bridge.host.open_stream

    async def recording_open_stream(peer: PeerId, protocols: list[str]) -> Stream:
        proposed.append(list(protocols))
        return await open_stream(peer, protocols)

    bridge.host.open_stream = recording_open_stream  # type: ignore[method-assign]
    assert set(await bridge.get_closest_peers(b"anything")) == {ipfs_only.local, sdk_only.local}
    assert sorted(proposed) == [[PROTOCOL_ID], [SDK_KAD]]


async def test_sdk_records_are_off_by_default(dht_net: DHTNet) -> None:
    strict = await dht_net.add()
    with pytest.raises(InvalidRecord, match="no validator"):
        await strict.put("model-weights", b"v")
    value = SdkValue(b"v", dht_net.clock() + 60).encode()
    stream = await send_raw(
        dht_net.raw_host(),
        strict,
        _framed(Message(MessageType.PUT_VALUE, b"k", Record(b"k", value))),
    )
    with pytest.raises(StreamReset):
        await stream.read_message()
    assert len(strict.records) == 0 and strict.stats.refused_records == 1


async def test_sdk_records_round_trip_and_expire(dht_net: DHTNet) -> None:
    config = DHTConfig(sdk_records=True)
    writer, reader = await dht_net.grow(2, config)
    now = dht_net.clock()
    assert await writer.put("model-weights", b"v1") == 1
    stored = reader.records.get(b"model-weights", now)
    assert stored is not None
    assert SdkValue.decode(stored) == SdkValue(b"v1", now + config.record_ttl)  # the SDK's form
    found = await reader.get_record("model-weights")
    assert found is not None and found.value == b"v1" and found.author is None
    assert found.expires == now + config.record_ttl
    # Signed namespaces keep their rules next to the unsigned SDK records.
    assert await writer.put(KEY, b"signed") == 1
    assert (await reader.get_record(KEY)).author == writer.local  # type: ignore[union-attr]

    # A record as an SDK node writes it: expiring in a minute, honoured by every holder.
    sdk_node = dht_net.raw_host()
    value = SdkValue(b"short-lived", now + 60).encode()
    answer = await ask(
        sdk_node, reader, Message(MessageType.PUT_VALUE, b"job", Record(b"job", value))
    )
    assert answer.record is not None and answer.record.value == value
    index = SubkeyIndex(("a", "b"), now + 60).encode()
    await ask(
        sdk_node, reader, Message(MessageType.PUT_VALUE, b"job#index", Record(b"job#index", index))
    )
    assert await writer.get("job") == b"short-lived"
    found = await writer.get_record("job#index")
    assert found is not None and SubkeyIndex.decode(found.value).subkeys == ("a", "b")
    dht_net.clock.advance(61)
    assert await writer.get("job") is None
    assert await reader.get("job#index") is None
    assert await reader.get("model-weights") == b"v1"  # its own expiry is hours away


async def test_string_provider_keys_only_with_sdk_records(dht_net: DHTNet) -> None:
    """The SDK announces providers under plain strings; go and rust libp2p use multihashes."""
    strict = await dht_net.add()
    with pytest.raises(ValueError, match="multihash"):
        await strict.provide(b"job-42")
    requester = dht_net.raw_host()
    for kind in (MessageType.ADD_PROVIDER, MessageType.GET_PROVIDERS):
        stream = await send_raw(requester, strict, _framed(Message(kind, b"job-42")))
        with pytest.raises(StreamReset):
            await stream.read_message()
    assert strict.stats.refused_malformed == 2

    provider = await dht_net.add(DHTConfig(sdk_records=True))
    seeker = await dht_net.add(DHTConfig(sdk_records=True))
    await seeker.bootstrap(provider.host.addrs)
    await provider.settle()
    assert await provider.provide("job-42") == 1
    assert [info.peer_id for info in await seeker.find_providers("job-42")] == [provider.local]
    assert await seeker.find_providers(b"job-42") == await seeker.find_providers("job-42")


# -- bad input --------------------------------------------------------------------------------
async def test_malformed_and_oversized_messages_are_refused(dht_net: DHTNet) -> None:
    dhts = await dht_net.grow(10)
    victim = dhts[0]
    table_before = set(victim.table)
    attacker = dht_net.raw_host()

    stream = await send_raw(attacker, victim, encode_varint(5) + b"\xff\xff\xff\xff\xff")
    with pytest.raises(StreamReset):
        await stream.read_message()
    stream = await send_raw(attacker, victim, encode_varint(50 * 1024 * 1024))  # "50 MB follow"
    with pytest.raises(StreamReset):
        await stream.read_message()
    assert victim.stats.refused_malformed == 2
    assert set(victim.table) == table_before

    # the node keeps serving honest peers
    answer = await ask(dht_net.raw_host(), victim, Message(MessageType.FIND_NODE, b"key"))
    assert len(answer.closer_peers) == 9

    # a third violation gets the attacker blocked: its streams are reset at once
    stream = await send_raw(attacker, victim, encode_varint(2) + b"\x08\x63")  # type 99
    with pytest.raises(StreamReset):
        await stream.read_message()
    stream = await send_raw(attacker, victim, encode_message(Message(MessageType.PING)))
    with pytest.raises(StreamReset):
        await stream.read_message()
    assert victim.stats.refused_blocked == 1


async def test_forged_huge_and_far_future_records_are_refused(dht_net: DHTNet) -> None:
    dhts = await dht_net.grow(5)
    victim = dhts[0]
    attacker = dht_net.raw_host()
    honest = key_pair()
    now = dht_net.clock()
    key = KEY.encode()
    forged = SignedRecord.create(honest, key, b"honest", now, HOUR)
    forged = SignedRecord(key, b"evil", forged.author, *forged_times(forged), forged.signature)
    far_future = SignedRecord.create(honest, key, b"forever", now, 10 * 365 * 24 * HOUR)
    for value in (forged.encode(), far_future.encode(), b"unsigned"):
        stream = await send_raw(
            attacker,
            victim,
            _framed(Message(MessageType.PUT_VALUE, key, Record(key, value))),
        )
        with pytest.raises(StreamReset):
            await stream.read_message()
    huge = Message(MessageType.PUT_VALUE, key, Record(key, b"x" * 100_000))
    stream = await send_raw(dht_net.raw_host(), victim, _framed(huge))
    with pytest.raises(StreamReset):
        await stream.read_message()
    assert victim.stats.refused_records == 3
    assert victim.stats.refused_malformed == 1
    assert len(victim.records) == 0


def forged_times(record: SignedRecord) -> tuple[int, int]:
    return record.created_ms, record.expires_ms


def _framed(message: Message) -> bytes:
    body = encode_message(message)
    return encode_varint(len(body)) + body


async def test_a_full_store_refuses_without_blaming_the_peer(dht_net: DHTNet) -> None:
    full = await dht_net.add(DHTConfig(max_records=1))
    writer = dht_net.raw_host()
    now = dht_net.clock()
    for index in range(5):
        key = f"/lattica/actor/{index}".encode()
        value = SignedRecord.create(key_pair(), key, b"v", now, HOUR).encode()
        stream = await writer.open_stream(full.local, [PROTOCOL_ID])
        await stream.write_message(
            encode_message(Message(MessageType.PUT_VALUE, key, Record(key, value)))
        )
        if index == 0:
            assert decode_message(await stream.read_message(), DecodeLimits()).record is not None
        else:
            with pytest.raises(StreamReset):
                await stream.read_message()
    assert len(full.records) == 1
    assert not full.table.is_blocked(writer.peer_id, now)
    assert full.stats.refused_records == 0


async def test_rate_limit_refuses_floods(dht_net: DHTNet) -> None:
    victim = await dht_net.add(DHTConfig(inbound_rate=1.0, inbound_burst=5))
    flooder = dht_net.raw_host()
    stream = await flooder.open_stream(victim.local, [PROTOCOL_ID])
    answered = 0
    with pytest.raises(StreamReset):
        for _ in range(20):
            await stream.write_message(encode_message(Message(MessageType.PING)))
            await stream.read_message()
            answered += 1
    assert answered == 5
    assert victim.stats.refused_rate_limited == 1


# -- eclipse attempts -------------------------------------------------------------------------
def serve_fake_closer_peers(host: MemoryHost) -> list[PeerInfo]:
    """An attacker that answers every request with 20 peers that do not exist."""
    rng = random.Random(5)
    fakes = [
        PeerInfo(
            key_pair().peer_id,
            (Multiaddr.parse(f"/ip4/5.5.{rng.randrange(256)}.{rng.randrange(256)}/udp/1/quic-v1"),),
        )
        for _ in range(200)
    ]

    async def handler(stream: Stream) -> None:
        while True:
            try:
                request = decode_message(await stream.read_message(), DecodeLimits())
            except (asyncio.IncompleteReadError, StreamReset):
                return
            answer = Message(request.type, request.key, closer_peers=tuple(rng.sample(fakes, 20)))
            await stream.write_message(encode_message(answer))

    host.set_stream_handler(PROTOCOL_ID, handler)
    return fakes


@pytest.mark.parametrize("paths", [1, 3])
async def test_peer_flooding_fake_closer_peers_is_blocked(dht_net: DHTNet, paths: int) -> None:
    dhts = await dht_net.grow(20)
    attacker = dht_net.raw_host()
    fakes = {info.peer_id for info in serve_fake_closer_peers(attacker)}
    victim = await dht_net.add(DHTConfig(disjoint_paths=paths))
    await victim.bootstrap([attacker.addrs[0], dhts[0].host.addrs[0]])
    real = {d.local for d in dhts}
    for index in range(10):
        closest = await victim.get_closest_peers(f"key {index}".encode())
        assert set(closest) <= real  # the lookup still ends at real peers
    assert victim.table.is_blocked(attacker.peer_id, dht_net.clock())
    assert victim.stats.peers_blocked == 1
    assert not fakes & set(victim.table)
    assert set(victim.table) <= real


async def test_diversity_filter_limits_one_address_block(dht_net: DHTNet) -> None:
    dhts = await dht_net.grow(20)
    victim = await dht_net.add(DHTConfig(diversity_exempt_private=False))
    for index, dht in enumerate(dhts):  # all of them appear to live in 5.6.0.0/16 ...
        victim.host.add_peer_addrs(
            dht.local, [Multiaddr.parse(f"/ip4/5.6.0.{index}/udp/1/quic-v1")]
        )
    await victim.bootstrap([dhts[0].host.addrs[0]])
    assert 1 <= len(victim.table) <= 3  # ... so at most 3 enter the table
    for cpl, size in victim.table.bucket_sizes().items():
        assert size <= 2, cpl


async def test_idle_and_excess_streams_are_closed(dht_net: DHTNet) -> None:
    victim = await dht_net.add(DHTConfig(max_inbound_streams=1, inbound_idle_timeout=0.2))
    squatter = dht_net.raw_host()
    idle = await squatter.open_stream(victim.local, [PROTOCOL_ID])
    await idle.write_message(encode_message(Message(MessageType.PING)))
    assert (await idle.read_message()) == encode_message(Message(MessageType.PING))
    second = await squatter.open_stream(victim.local, [PROTOCOL_ID])
    await second.write_message(encode_message(Message(MessageType.PING)))
    with pytest.raises(StreamReset):  # one kad stream at a time: refused
        await second.read_message()
    assert victim.stats.refused_busy == 1
    async with asyncio.timeout(5):
        with pytest.raises(StreamReset):  # the idle one is closed after 0.2 s of silence
            await idle.read_message()
