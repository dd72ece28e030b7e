"""Peer identity: keys, peer IDs in both text forms, key files."""

from __future__ import annotations

import os
import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st

from transport.errors import InvalidPeerId, InvalidSignature, KeyFileError
from transport.identity import KeyPair, PeerId, PublicKey, load_or_create_key

# Seed 0 gives this peer ID in rust-libp2p and go-libp2p alike (identity multihash, base58btc).
SEED_ZERO_PEER_ID = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"


def test_known_peer_id_of_seed_zero() -> None:
    assert KeyPair.from_seed(bytes(32)).peer_id.to_string() == SEED_ZERO_PEER_ID


@given(st.binary(min_size=32, max_size=32))
def test_peer_id_text_round_trip(seed: bytes) -> None:
    peer = KeyPair.from_seed(seed).peer_id
    text = peer.to_string()
    assert text.startswith("12D3KooW")
    assert PeerId.from_string(text) == peer
    assert PeerId.from_bytes(peer.multihash) == peer
    assert peer.public_key() == KeyPair.from_seed(seed).public_key


def test_peer_id_cid_form_is_accepted() -> None:
    # The CIDv1 (libp2p-key, base32) form of the seed-zero peer ID.
    peer = PeerId.from_string(SEED_ZERO_PEER_ID)
    import base64

    cid = bytes([0x01, 0x72]) + peer.multihash
    text = "b" + base64.b32encode(cid).decode().lower().rstrip("=")
    assert PeerId.from_string(text) == peer


@pytest.mark.parametrize(
    "text",
    ["", "12D3KooW", "not-base58-0OIl", "Qm" + "1" * 44, "bafy" + "a" * 10, "z" * 200],
)
def test_malformed_peer_ids_are_refused(text: str) -> None:
    with pytest.raises(InvalidPeerId):
        PeerId.from_string(text)


def test_peer_ids_compare_and_hash_by_value() -> None:
    first, second = KeyPair.generate().peer_id, KeyPair.generate().peer_id
    assert PeerId.from_string(first.to_string()) == first
    assert len({first, second, PeerId.from_string(first.to_string())}) == 2
    assert sorted([first, second]) == sorted([second, first])


def test_signatures_verify_and_forgeries_do_not() -> None:
    key = KeyPair.generate()
    signature = key.sign(b"message")
    key.public_key.verify(signature, b"message")
    with pytest.raises(InvalidSignature):
        key.public_key.verify(signature, b"other message")
    with pytest.raises(InvalidSignature):
        KeyPair.generate().public_key.verify(signature, b"message")


def test_public_key_protobuf_round_trip_and_garbage() -> None:
    key = KeyPair.generate().public_key
    assert PublicKey.from_protobuf(key.to_protobuf()) == key
    for garbage in (b"", b"\x08\x01", b"\xff\xff\xff", b"\x08\x01\x12\x05short"):
        with pytest.raises(InvalidPeerId):
            PublicKey.from_protobuf(garbage)


def test_key_file_created_0600_and_reused(tmp_path) -> None:
    path = tmp_path / "sub" / "key"
    first = load_or_create_key(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_or_create_key(path).peer_id == first.peer_id


@pytest.mark.parametrize("content", [b"", b"garbage", b"\x08\x01\x12\x03abc", b"\x08\x00\x12\x00"])
def test_corrupt_key_file_is_an_error_never_replaced(tmp_path, content: bytes) -> None:
    path = tmp_path / "key"
    path.write_bytes(content)
    with pytest.raises(KeyFileError):
        load_or_create_key(path)
    assert path.read_bytes() == content


def test_private_key_protobuf_round_trip() -> None:
    key = KeyPair.generate()
    assert KeyPair.from_protobuf(key.to_protobuf()).peer_id == key.peer_id
