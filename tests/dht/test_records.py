"""Pure tests of signed records, validators, the selector and the local stores."""

from __future__ import annotations

import dataclasses

import pytest

from lattica_ray.dht.errors import InvalidRecord, StoreFull
from lattica_ray.dht.records import (
    NamespacedValidator,
    ProviderStore,
    PublicKeyValidator,
    RecordStore,
    SignedRecord,
    SignedRecordValidator,
    lattica_key,
    owner_of,
    pk_key,
)
from tests.dht.conftest import key_pair
from transport.identity import KeyPair
from transport.multiaddr import Multiaddr

NOW = 1_700_000_000.0
HOUR = 3600.0
ALICE = key_pair()
MALLORY = key_pair()
KEY = b"/lattica/actor/policy"


@pytest.fixture
def validator() -> NamespacedValidator:
    return NamespacedValidator.default(
        max_ttl=48 * HOUR, max_clock_skew=300.0, max_key_size=256, max_value_size=1024
    )


def signed(
    value: bytes = b"v1",
    now: float = NOW,
    ttl: float = 36 * HOUR,
    key: bytes = KEY,
    author: KeyPair = ALICE,
) -> SignedRecord:
    return SignedRecord.create(author, key, value, now, ttl)


def test_signed_record_round_trips_and_validates(validator: NamespacedValidator) -> None:
    record = signed()
    decoded = SignedRecord.decode(record.encode())
    assert decoded == record
    assert decoded.author_id == ALICE.peer_id
    assert validator.validate(KEY, record.encode(), NOW) == pytest.approx(NOW + 36 * HOUR)


@pytest.mark.parametrize(
    "field, forged",
    [("value", b"evil"), ("created_ms", 1), ("expires_ms", 2), ("key", b"/lattica/actor/x")],
)
def test_any_change_breaks_the_signature(field: str, forged: object) -> None:
    record = dataclasses.replace(signed(), **{field: forged})
    with pytest.raises(InvalidRecord, match="forged"):
        record.verify()


def test_forged_author_is_refused(validator: NamespacedValidator) -> None:
    """Mallory signs, then claims Alice wrote it."""
    record = dataclasses.replace(signed(author=MALLORY), author=ALICE.public_key)
    with pytest.raises(InvalidRecord, match="forged"):
        validator.validate(KEY, record.encode(), NOW)


def test_unsigned_value_is_refused(validator: NamespacedValidator) -> None:
    with pytest.raises(InvalidRecord):
        validator.validate(KEY, b"just bytes", NOW)
    unsigned = dataclasses.replace(signed(), signature=b"").encode()
    with pytest.raises(InvalidRecord, match="unsigned"):
        validator.validate(KEY, unsigned, NOW)


def test_record_replayed_under_another_key_is_refused(validator: NamespacedValidator) -> None:
    with pytest.raises(InvalidRecord, match="another key"):
        validator.validate(b"/lattica/actor/other", signed().encode(), NOW)


def test_expired_record_is_refused(validator: NamespacedValidator) -> None:
    value = signed(ttl=HOUR).encode()
    validator.validate(KEY, value, NOW + HOUR - 1)
    with pytest.raises(InvalidRecord, match="expired"):
        validator.validate(KEY, value, NOW + HOUR)


def test_far_future_expiry_and_creation_are_refused(validator: NamespacedValidator) -> None:
    with pytest.raises(InvalidRecord, match="too far in the future"):
        validator.validate(KEY, signed(ttl=365 * 24 * HOUR).encode(), NOW)
    with pytest.raises(InvalidRecord, match="created in the future"):
        validator.validate(KEY, signed(now=NOW + HOUR).encode(), NOW)
    validator.validate(KEY, signed(now=NOW + 60).encode(), NOW)  # within the clock skew


def test_oversized_and_unknown_records_are_refused(validator: NamespacedValidator) -> None:
    with pytest.raises(InvalidRecord, match="exceeds"):
        validator.validate(KEY, signed(value=b"x" * 2000).encode(), NOW)
    long_key = b"/lattica/actor/" + b"k" * 300
    with pytest.raises(InvalidRecord, match="exceeds"):
        validator.validate(long_key, signed(key=long_key).encode(), NOW)
    with pytest.raises(InvalidRecord, match="no validator"):
        validator.validate(b"/ipns/whatever", b"v", NOW)
    with pytest.raises(InvalidRecord, match="no validator"):
        validator.validate(b"no-namespace", b"v", NOW)


def test_owned_keys_accept_only_their_owner(validator: NamespacedValidator) -> None:
    key = lattica_key("actor", "policy", owner=ALICE.peer_id)
    assert owner_of(key) == ALICE.peer_id
    assert owner_of(lattica_key("actor", "Quite-open")) is None
    validator.validate(key, signed(key=key).encode(), NOW)
    with pytest.raises(InvalidRecord, match="belongs to"):
        validator.validate(key, signed(key=key, author=MALLORY).encode(), NOW)


def test_public_key_records() -> None:
    validator = PublicKeyValidator()
    key = pk_key(ALICE.peer_id)
    assert validator.validate(key, ALICE.public_key.to_protobuf(), NOW) is None
    with pytest.raises(InvalidRecord, match="not the public key"):
        validator.validate(key, MALLORY.public_key.to_protobuf(), NOW)
    with pytest.raises(InvalidRecord, match="not a public key"):
        validator.validate(key, b"\xff\xff", NOW)
    with pytest.raises(InvalidRecord, match="peer ID"):
        validator.validate(b"/pk/nope", ALICE.public_key.to_protobuf(), NOW)


def test_selector_picks_the_newest_and_is_stable() -> None:
    validator = SignedRecordValidator(max_ttl=48 * HOUR, max_clock_skew=300)
    old = signed(b"old", now=NOW).encode()
    new = signed(b"new", now=NOW + 10).encode()
    other_author_newest = signed(b"newest", now=NOW + 20, author=MALLORY).encode()
    assert validator.select(KEY, [old, new]) == 1
    assert validator.select(KEY, [new, old]) == 0
    assert validator.select(KEY, [old, other_author_newest, new]) == 1
    a, b = signed(b"a").encode(), signed(b"b").encode()  # same time: a stable tie-break
    assert [a, b][validator.select(KEY, [a, b])] == [b, a][validator.select(KEY, [b, a])]


# -- stores -----------------------------------------------------------------------------------
def test_record_store_keeps_the_better_record(validator: NamespacedValidator) -> None:
    store = RecordStore(validator, max_records=10, max_age=36 * HOUR)
    old, new = signed(b"old").encode(), signed(b"new", now=NOW + 5).encode()
    assert store.put(KEY, new, NOW + 5)
    assert not store.put(KEY, old, NOW + 6)  # stale: refused, ours kept
    assert store.get(KEY, NOW + 6) == new
    with pytest.raises(InvalidRecord):
        store.put(KEY, b"garbage", NOW)
    assert store.get(KEY, NOW + 6) == new  # bad input lost nothing


def test_record_store_expires_by_record_and_by_age(validator: NamespacedValidator) -> None:
    store = RecordStore(validator, max_records=10, max_age=2 * HOUR)
    store.put(KEY, signed(ttl=HOUR).encode(), NOW)
    store.put(pk_key(ALICE.peer_id), ALICE.public_key.to_protobuf(), NOW)
    assert store.get(KEY, NOW + HOUR - 1) is not None
    assert store.get(KEY, NOW + HOUR) is None  # its own expiry
    assert store.get(pk_key(ALICE.peer_id), NOW + 2 * HOUR - 1) is not None
    assert store.expire(NOW + 2 * HOUR) == 1  # /pk/ has no expiry of its own: max_age
    assert len(store) == 0


def test_record_store_keeps_the_publisher_and_honours_a_shorter_wire_ttl(
    validator: NamespacedValidator,
) -> None:
    store = RecordStore(validator, max_records=10, max_age=36 * HOUR)
    publisher = ALICE.peer_id.multihash
    store.put(KEY, signed(ttl=HOUR).encode(), NOW, publisher=publisher, ttl=60)
    entry = store.entry(KEY, NOW)
    assert entry is not None and entry.publisher == publisher
    assert entry.expires_at == NOW + 60  # the sender's ttl is shorter than the record's hour
    assert store.get(KEY, NOW + 60) is None
    store.put(KEY, signed(ttl=HOUR).encode(), NOW, ttl=2 * HOUR)  # longer: the record's own
    entry = store.entry(KEY, NOW)
    assert entry is not None and entry.expires_at == NOW + HOUR


def test_record_store_is_bounded(validator: NamespacedValidator) -> None:
    store = RecordStore(validator, max_records=2, max_age=HOUR)
    for name in (b"a", b"b"):
        key = b"/lattica/x/" + name
        store.put(key, signed(key=key).encode(), NOW)
    key = b"/lattica/x/c"
    with pytest.raises(StoreFull, match="full"):
        store.put(key, signed(key=key).encode(), NOW)
    assert len(store) == 2


def test_provider_records_expire_after_their_ttl() -> None:
    store = ProviderStore(ttl=48 * HOUR, addr_ttl=24 * HOUR, max_keys=10, max_providers_per_key=5)
    addrs = [Multiaddr.parse("/ip4/10.0.0.1/udp/1/quic-v1")]
    store.add(b"key", ALICE.peer_id, addrs, NOW)
    store.add(b"key", MALLORY.peer_id, [], NOW + HOUR)
    assert [r.peer for r in store.get(b"key", NOW + 2 * HOUR)] == [MALLORY.peer_id, ALICE.peer_id]
    record = store.get(b"key", NOW + 25 * HOUR)[1]
    assert record.live_addrs(NOW + 25 * HOUR) == []  # addresses go stale before the record
    assert [r.peer for r in store.get(b"key", NOW + 48 * HOUR)] == [MALLORY.peer_id]
    store.add(b"key", MALLORY.peer_id, [], NOW + 48 * HOUR)  # republished: lives on
    assert [r.peer for r in store.get(b"key", NOW + 90 * HOUR)] == [MALLORY.peer_id]
    assert store.get(b"key", NOW + 96 * HOUR) == []


def test_provider_store_limits() -> None:
    store = ProviderStore(ttl=HOUR, addr_ttl=HOUR, max_keys=1, max_providers_per_key=2)
    assert store.add(b"k1", ALICE.peer_id, [], NOW)
    assert store.add(b"k1", MALLORY.peer_id, [], NOW)
    assert not store.add(b"k1", key_pair().peer_id, [], NOW)  # per-key limit
    assert not store.add(b"k2", ALICE.peer_id, [], NOW)  # key limit
    assert store.add(b"k2", ALICE.peer_id, [], NOW + HOUR)  # once k1 expired
