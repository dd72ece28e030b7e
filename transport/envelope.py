"""libp2p signed envelopes (RFC 0002): a payload signed by a peer, bound to a domain.

Used for relay reservation vouchers; the signature covers varint-prefixed domain, payload
type and payload, so a signature made for one purpose can never be replayed for another.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from transport.errors import InvalidPeerId, InvalidSignature, ProtocolViolation
from transport.identity import KeyPair, PublicKey
from transport.pb import crypto_pb2, envelope_pb2
from transport.varint import encode_varint

MAX_ENVELOPE_SIZE = 64 * 1024


def _signing_buffer(domain: str, payload_type: bytes, payload: bytes) -> bytes:
    encoded_domain = domain.encode("utf-8")
    return b"".join(
        encode_varint(len(part)) + part for part in (encoded_domain, payload_type, payload)
    )


def seal(key: KeyPair, domain: str, payload_type: bytes, payload: bytes) -> bytes:
    """The wire form of an envelope carrying `payload`, signed by `key`."""
    public = crypto_pb2.PublicKey(Type=key.public_key.key_type, Data=key.public_key.raw)
    return envelope_pb2.Envelope(
        public_key=public,
        payload_type=payload_type,
        payload=payload,
        signature=key.sign(_signing_buffer(domain, payload_type, payload)),
    ).SerializeToString()


def open_envelope(data: bytes, domain: str, payload_type: bytes) -> tuple[PublicKey, bytes]:
    """(signer, payload) of a valid envelope of `payload_type`; raises otherwise."""
    if len(data) > MAX_ENVELOPE_SIZE:
        raise ProtocolViolation(f"envelope of {len(data)} bytes is too large")
    envelope = envelope_pb2.Envelope()
    try:
        envelope.ParseFromString(data)
        signer = PublicKey(envelope.public_key.Type, envelope.public_key.Data)
    except (DecodeError, InvalidPeerId) as exc:
        raise ProtocolViolation(f"malformed envelope: {exc}") from exc
    if envelope.payload_type != payload_type:
        raise ProtocolViolation(
            f"envelope carries payload type {envelope.payload_type.hex()}, "
            f"expected {payload_type.hex()}"
        )
    try:
        signer.verify(
            envelope.signature, _signing_buffer(domain, envelope.payload_type, envelope.payload)
        )
    except InvalidSignature as exc:
        raise InvalidSignature(f"envelope signature is invalid: {exc}") from exc
    return signer, envelope.payload
