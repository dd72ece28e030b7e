"""Noise XX and the libp2p handshake as pure state machines: vectors, identity, bad input."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from transport.errors import HandshakeFailed, PeerIdMismatch
from transport.identity import KeyPair
from transport.noise import (
    MAX_MESSAGE_LENGTH,
    MAX_PLAINTEXT_LENGTH,
    STATIC_KEY_SIGNATURE_PREFIX,
    NoiseError,
    NoiseHandshake,
    NoiseTransport,
    XXHandshakeState,
    encode_frame,
    make_handshake_payload,
)
from transport.pb import noise_pb2

# cacophony's vector for Noise_XX_25519_ChaChaPoly_SHA256 (also shipped by snow and noise-c).
VECTOR = {
    "prologue": "4a6f686e2047616c74",
    "init_static": "e61ef9919cde45dd5f82166404bd08e38bceb5dfdfded0a34c8df7ed542214d1",
    "init_ephemeral": "893e28b9dc6ca8d611ab664754b8ceb7bac5117349a4439a6b0569da977c464a",
    "resp_static": "4a3acbfdb163dec651dfa3194dece676d437029c62a408b4c5ea9114246e4893",
    "resp_ephemeral": "bbdb4cdbd309f1a1f2e1456967fe288cadd6f712d65dc7b7793d5e63da6b375b",
    "handshake_hash": "c8e5f64e846193be2a834104c2a009868d6c9f3bd3c186299888b488b2f1f58e",
    "messages": [
        (
            "4c756477696720766f6e204d69736573",
            "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c7944"
            "4c756477696720766f6e204d69736573",
        ),
        (
            "4d757272617920526f746862617264",
            "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f144808843"
            "81cbad1f276e038c48378ffce2b65285e08d6b68aaa3629a5a8639392490e5b9"
            "bd5269c2f1e4f488ed8831161f19b7815528f8982ffe09be9b5c412f8a0db50f"
            "8814c7194e83f23dbd8d162c9326ad",
        ),
        (
            "462e20412e20486179656b",
            "c7195ffacac1307ff99046f219750fc47693e23c3cb08b89c2af808b444850a8"
            "0ae475b9df0f169ae80a89be0865b57f58c9fea0d4ec82a286427402f113e4b6"
            "ae769a1d95941d49b25030",
        ),
        ("4361726c204d656e676572", "96763ed773f8e47bb3712f0e29b3060ffc956ffc146cee53d5e1df"),
        (
            "4a65616e2d426170746973746520536179",
            "3e40f15f6f3a46ae446b253bf8b1d9ffb6ed9b174d272328ff91a7e2e5c79c07f5",
        ),
        (
            "457567656e2042f6686d20766f6e2042617765726b",
            "eb3f3515110702e047a6c9da4478b6ead94873c11c0f2d710ddb3f09fce024b3a58502ae3f",
        ),
    ],
}


def _key(name: str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(bytes.fromhex(VECTOR[name]))  # type: ignore[arg-type]


def test_xx_matches_the_cacophony_vector() -> None:
    prologue = bytes.fromhex(VECTOR["prologue"])  # type: ignore[arg-type]
    initiator = XXHandshakeState(True, _key("init_static"), prologue, _key("init_ephemeral"))
    responder = XXHandshakeState(False, _key("resp_static"), prologue, _key("resp_ephemeral"))
    messages = VECTOR["messages"]
    for index, (payload_hex, ciphertext_hex) in enumerate(messages[:3]):
        sender, receiver = (initiator, responder) if index % 2 == 0 else (responder, initiator)
        payload = bytes.fromhex(payload_hex)
        message = sender.write_message(payload)
        assert message.hex() == ciphertext_hex
        assert receiver.read_message(message) == payload
    assert initiator.complete and responder.complete
    assert initiator.handshake_hash.hex() == VECTOR["handshake_hash"]
    assert responder.handshake_hash == initiator.handshake_hash
    init_send, init_recv = initiator.split()
    resp_send, resp_recv = responder.split()
    for index, (payload_hex, ciphertext_hex) in enumerate(messages[3:], start=3):
        send, recv = (init_send, resp_recv) if index % 2 == 0 else (resp_send, init_recv)
        payload = bytes.fromhex(payload_hex)
        ciphertext = send.encrypt_with_ad(None, payload)
        assert ciphertext.hex() == ciphertext_hex
        assert recv.decrypt_with_ad(None, ciphertext) == payload


def test_xx_refuses_messages_out_of_turn() -> None:
    initiator = XXHandshakeState(True, X25519PrivateKey.generate())
    with pytest.raises(HandshakeFailed, match="out of turn"):
        initiator.read_message(bytes(32))
    initiator.write_message(b"")
    with pytest.raises(HandshakeFailed, match="not our turn"):
        initiator.write_message(b"")


# -- the libp2p handshake -------------------------------------------------------------------


def _run(initiator: NoiseHandshake, responder: NoiseHandshake) -> None:
    """Shuttle bytes until both are complete (or one raises)."""
    for _ in range(4):
        responder.receive_data(initiator.data_to_send())
        initiator.receive_data(responder.data_to_send())
        if initiator.complete and responder.complete:
            return


def test_handshake_authenticates_both_peer_ids() -> None:
    alice, bob = KeyPair.generate(), KeyPair.generate()
    initiator = NoiseHandshake(alice, True, expected_peer=bob.peer_id)
    responder = NoiseHandshake(bob, False)
    _run(initiator, responder)
    assert initiator.remote_peer == bob.peer_id
    assert responder.remote_peer == alice.peer_id
    assert initiator.remote_public_key == bob.public_key
    assert initiator.handshake_hash == responder.handshake_hash
    one, two = initiator.transport(), responder.transport()
    assert two.decrypt(one.encrypt(b"ping")) == [b"ping"]
    assert one.decrypt(two.encrypt(b"pong")) == [b"pong"]


def test_message_sizes_and_payload_on_the_wire() -> None:
    alice, bob = KeyPair.generate(), KeyPair.generate()
    initiator, responder = NoiseHandshake(alice, True), NoiseHandshake(bob, False)
    first = initiator.data_to_send()
    assert int.from_bytes(first[:2], "big") == len(first) - 2 == 32  # "-> e", empty payload
    responder.receive_data(first)
    second = responder.data_to_send()
    # e (32) + encrypted s (48) + encrypted payload (protobuf + 16)
    payload_size = len(make_handshake_payload(bob, bytes(32)))
    assert len(second) == 2 + 32 + 48 + payload_size + 16


def test_handshake_tolerates_any_chunking() -> None:
    alice, bob = KeyPair.generate(), KeyPair.generate()
    initiator, responder = NoiseHandshake(alice, True), NoiseHandshake(bob, False)
    for byte in initiator.data_to_send():
        responder.receive_data(bytes([byte]))
    reply = responder.data_to_send()
    for index in range(0, len(reply), 7):
        initiator.receive_data(reply[index : index + 7])
    # The third message and the first transport message arrive in one chunk.
    early = initiator.transport().encrypt(b"early")
    responder.receive_data(initiator.data_to_send() + bytes(early))
    assert responder.complete and responder.remote_peer == alice.peer_id
    assert responder.transport().decrypt(b"") == [b"early"]  # kept past the handshake


def test_dialing_the_wrong_peer_fails_before_revealing_us() -> None:
    alice, bob, carol = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()
    initiator = NoiseHandshake(alice, True, expected_peer=carol.peer_id)
    responder = NoiseHandshake(bob, False)
    responder.receive_data(initiator.data_to_send())
    with pytest.raises(PeerIdMismatch) as failure:
        initiator.receive_data(responder.data_to_send())
    assert failure.value.expected == carol.peer_id and failure.value.actual == bob.peer_id
    assert initiator.data_to_send() == b""  # our identity (message 3) is never sent
    assert not initiator.complete
    with pytest.raises(PeerIdMismatch):  # the failure sticks
        initiator.receive_data(b"\x00")


def _forge(responder: NoiseHandshake, payload: bytes) -> None:
    """Make `responder` send `payload` instead of its honest one."""
    responder._payload = payload


def _static_public(handshake: NoiseHandshake) -> bytes:
    return handshake._state.s_public


def test_signature_over_another_static_key_is_refused() -> None:
    alice, mallory = KeyPair.generate(), KeyPair.generate()
    initiator, responder = NoiseHandshake(alice, True), NoiseHandshake(mallory, False)
    _forge(
        responder,
        make_handshake_payload(
            mallory, X25519PrivateKey.generate().public_key().public_bytes_raw()
        ),
    )
    responder.receive_data(initiator.data_to_send())
    with pytest.raises(HandshakeFailed, match="signature over its Noise static key"):
        initiator.receive_data(responder.data_to_send())


def test_someone_elses_identity_key_is_refused() -> None:
    alice, bob, mallory = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()
    initiator, responder = NoiseHandshake(alice, True), NoiseHandshake(mallory, False)
    # Claims Bob's identity, but can only sign with Mallory's key.
    forged = noise_pb2.NoiseHandshakePayload(
        identity_key=bob.public_key.to_protobuf(),
        identity_sig=mallory.sign(STATIC_KEY_SIGNATURE_PREFIX + _static_public(responder)),
    )
    _forge(responder, forged.SerializeToString())
    responder.receive_data(initiator.data_to_send())
    with pytest.raises(HandshakeFailed, match="does not verify"):
        initiator.receive_data(responder.data_to_send())
    assert initiator.remote_peer is None


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"", "lacks the identity key"),
        (b"\xff\xff\xff", "malformed Noise handshake payload"),
        (
            noise_pb2.NoiseHandshakePayload(
                identity_key=b"\x08\x01\x12\x03abc", identity_sig=b"x" * 64
            ).SerializeToString(),
            "invalid identity key",
        ),
    ],
)
def test_malformed_payloads_are_refused(payload: bytes, match: str) -> None:
    initiator = NoiseHandshake(KeyPair.generate(), True)
    responder = NoiseHandshake(KeyPair.generate(), False)
    _forge(responder, payload)
    responder.receive_data(initiator.data_to_send())
    with pytest.raises(HandshakeFailed, match=match):
        initiator.receive_data(responder.data_to_send())


def test_initiator_payload_is_checked_too() -> None:
    alice, bob = KeyPair.generate(), KeyPair.generate()
    initiator, responder = NoiseHandshake(alice, True), NoiseHandshake(bob, False)
    _forge(initiator, make_handshake_payload(alice, bytes(32)))  # signs the wrong static key
    responder.receive_data(initiator.data_to_send())
    initiator.receive_data(responder.data_to_send())
    with pytest.raises(HandshakeFailed, match="does not verify"):
        responder.receive_data(initiator.data_to_send())
    assert not responder.complete


def test_truncated_and_tampered_messages_are_refused() -> None:
    initiator = NoiseHandshake(KeyPair.generate(), True)
    responder = NoiseHandshake(KeyPair.generate(), False)
    responder.receive_data(initiator.data_to_send())
    second = responder.data_to_send()[2:]
    truncated = NoiseHandshake(KeyPair.generate(), True)
    with pytest.raises(HandshakeFailed, match="message 2 is truncated"):
        truncated.receive_data(encode_frame(second[:70]))
    tampered = bytearray(second)
    tampered[40] ^= 1  # inside the encrypted static key
    with pytest.raises(HandshakeFailed, match="failed authentication"):
        initiator.receive_data(encode_frame(bytes(tampered)))


def test_first_message_shorter_than_a_key_is_refused() -> None:
    responder = NoiseHandshake(KeyPair.generate(), False)
    with pytest.raises(HandshakeFailed, match="message 1 is truncated"):
        responder.receive_data(encode_frame(b"\x01" * 31))


def test_low_order_public_key_is_refused() -> None:
    initiator = NoiseHandshake(KeyPair.generate(), True)
    initiator.data_to_send()
    # An all-zero X25519 point makes every DH result zero; cryptography refuses it.
    with pytest.raises(HandshakeFailed, match="invalid X25519 public key"):
        initiator.receive_data(encode_frame(bytes(32) + bytes(48 + 16 + 40)))


def test_transport_before_completion_is_an_error() -> None:
    handshake = NoiseHandshake(KeyPair.generate(), True)
    with pytest.raises(HandshakeFailed, match="not complete"):
        handshake.transport()


# -- transport messages ---------------------------------------------------------------------


def _transport_pair() -> tuple[NoiseTransport, NoiseTransport]:
    initiator = NoiseHandshake(KeyPair.generate(), True)
    responder = NoiseHandshake(KeyPair.generate(), False)
    _run(initiator, responder)
    return initiator.transport(), responder.transport()


def test_large_writes_are_split_into_maximal_messages() -> None:
    sender, receiver = _transport_pair()
    data = bytes(range(256)) * 1024  # 256 KiB
    frames = bytes(sender.encrypt(data))
    lengths, position = [], 0
    while position < len(frames):
        length = int.from_bytes(frames[position : position + 2], "big")
        lengths.append(length)
        position += 2 + length
    assert lengths[:-1] == [MAX_MESSAGE_LENGTH] * (len(lengths) - 1)
    assert sum(length - 16 for length in lengths) == len(data)
    assert b"".join(receiver.decrypt(frames)) == data
    assert sender.encrypt(b"") == bytearray()


@settings(max_examples=50, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3 * MAX_PLAINTEXT_LENGTH), min_size=1, max_size=5),
    cuts=st.lists(st.integers(1, 70000), max_size=20),
)
def test_decryption_does_not_depend_on_how_bytes_arrive(sizes: list[int], cuts: list[int]) -> None:
    sender, receiver = _transport_pair()
    messages = [bytes([index % 251]) * size for index, size in enumerate(sizes)]
    wire = b"".join(bytes(sender.encrypt(message)) for message in messages)
    received, position = [], 0
    for cut in [*cuts, len(wire)]:
        received += receiver.decrypt(memoryview(wire)[position : position + cut])
        position += cut
        if position >= len(wire):
            break
    assert b"".join(received) == b"".join(messages)
    assert receiver.pending == 0


def test_tampered_replayed_and_short_messages_are_refused() -> None:
    sender, receiver = _transport_pair()
    frame = bytes(sender.encrypt(b"hello"))
    tampered = bytearray(frame)
    tampered[-1] ^= 0x80
    with pytest.raises(NoiseError, match="failed authentication"):
        receiver.decrypt(bytes(tampered))

    sender, receiver = _transport_pair()
    frame = bytes(sender.encrypt(b"hello"))
    assert receiver.decrypt(frame) == [b"hello"]
    with pytest.raises(NoiseError, match="failed authentication"):
        receiver.decrypt(frame)  # replay: the nonce has moved on

    with pytest.raises(NoiseError, match="shorter than its tag"):
        _transport_pair()[1].decrypt(b"\x00\x05hello")


def test_frames_longer_than_noise_allows_cannot_be_built() -> None:
    with pytest.raises(NoiseError, match="exceeds 65535"):
        encode_frame(bytes(MAX_MESSAGE_LENGTH + 1))
