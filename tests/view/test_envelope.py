"""Signed envelopes: what the signature covers, and the client IDs derived from peer IDs."""

from __future__ import annotations

import dataclasses

import pytest

from lattica_ray.view.envelope import (
    CLIENT_ID_BITS,
    EquivocationProof,
    Heartbeat,
    SignedUpdate,
    derive_client_id,
)
from lattica_ray.view.errors import InvalidEnvelope, MalformedMessage
from lattica_ray.view.pb import view_pb2
from transport.identity import KeyPair

KEY = KeyPair.from_seed(b"a" * 32)
OTHER = KeyPair.from_seed(b"b" * 32)


def test_signed_update_round_trips_and_verifies() -> None:
    update = SignedUpdate.create(KEY, 42, 3, b"\x01\x02")
    update.verify()
    decoded = SignedUpdate.decode(update.encode())
    assert decoded == update
    decoded.verify()
    assert decoded.client_id == derive_client_id(KEY.peer_id, 42)


@pytest.mark.parametrize(
    "change",
    [
        {"update": b"\x01\x03"},  # the bytes the hash covers
        {"seq": 4},
        {"incarnation": 43},
        {"author": OTHER.peer_id},  # claims someone else wrote it
        {"signature": b"\x00" * 64},
    ],
)
def test_any_change_breaks_the_signature(change: dict[str, object]) -> None:
    forged = dataclasses.replace(SignedUpdate.create(KEY, 42, 3, b"\x01\x02"), **change)
    with pytest.raises(InvalidEnvelope):
        forged.verify()


def test_sequence_numbers_start_at_one() -> None:
    with pytest.raises(InvalidEnvelope, match="start at 1"):
        SignedUpdate.create(KEY, 1, 0, b"").verify()


def test_garbage_is_malformed_not_a_crash() -> None:
    with pytest.raises(MalformedMessage):
        SignedUpdate.decode(b"\xff\xff\xff")
    bad_author = view_pb2.SignedUpdate(author=b"\x99junk", seq=1).SerializeToString()
    with pytest.raises(MalformedMessage, match="not a peer ID"):
        SignedUpdate.decode(bad_author)


def test_client_ids_differ_per_author_and_incarnation_and_fit_javascript() -> None:
    ids = {derive_client_id(k.peer_id, i) for k in (KEY, OTHER) for i in (1, 2, 3)}
    assert len(ids) == 6
    assert all(0 <= i < 2**CLIENT_ID_BITS for i in ids)
    assert derive_client_id(KEY.peer_id, 1) == derive_client_id(KEY.peer_id, 1)


def test_heartbeat_signature_covers_every_field() -> None:
    beat = Heartbeat.create(KEY, 1, 5, 1_700_000_000_000, 9, leaving=False)
    beat.verify()
    assert Heartbeat.from_pb(beat.to_pb()) == beat
    for change in ({"counter": 6}, {"timestamp_ms": 1}, {"head_seq": 10}, {"leaving": True}):
        with pytest.raises(InvalidEnvelope):
            dataclasses.replace(beat, **change).verify()
    newer = Heartbeat.create(KEY, 1, 6, 0, 9)
    restarted = Heartbeat.create(KEY, 2, 1, 0, 0)
    assert newer.is_newer_than(beat) and restarted.is_newer_than(newer)
    assert not beat.is_newer_than(newer)


def test_equivocation_proof_needs_two_valid_different_updates() -> None:
    first = SignedUpdate.create(KEY, 1, 2, b"one")
    second = SignedUpdate.create(KEY, 1, 2, b"two")
    EquivocationProof(first, second).verify()
    with pytest.raises(InvalidEnvelope, match="the same"):
        EquivocationProof(first, first).verify()
    with pytest.raises(InvalidEnvelope, match="different numbers"):
        EquivocationProof(first, SignedUpdate.create(KEY, 1, 3, b"two")).verify()
    with pytest.raises(InvalidEnvelope):  # a forged second half proves nothing
        EquivocationProof(first, dataclasses.replace(second, signature=b"\x00" * 64)).verify()
    assert EquivocationProof.from_pb(EquivocationProof(first, second).to_pb()).second == second
