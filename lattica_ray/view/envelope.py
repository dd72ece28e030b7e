"""Signed envelopes: every CRDT update and every heartbeat carries its author's Ed25519 signature.

The signature covers a domain tag, the author's peer ID, the incarnation, the sequence number (or
heartbeat counter) and the SHA-256 of the update, in a fixed byte layout, so it never depends on how
protobuf chose to encode the message. Yjs client IDs are derived from (peer ID, incarnation): an
author cannot pick another author's client ID, and receivers check every item's client against it.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from functools import cached_property, lru_cache

from lattica_ray.view.errors import InvalidEnvelope, MalformedMessage
from lattica_ray.view.pb import view_pb2
from transport.errors import InvalidPeerId, InvalidSignature
from transport.identity import KeyPair, PeerId, PublicKey

UPDATE_DOMAIN = b"lattica-ray/view/update/1\x00"
HEARTBEAT_DOMAIN = b"lattica-ray/view/heartbeat/1\x00"
CLIENT_ID_DOMAIN = b"lattica-ray/view/client-id/1\x00"
CLIENT_ID_BITS = 53  # Yjs (JavaScript) keeps client IDs below 2**53


def derive_client_id(author: PeerId, incarnation: int) -> int:
    """The only Yjs client ID `author` may use during `incarnation`."""
    digest = hashlib.sha256(
        CLIENT_ID_DOMAIN + author.multihash + incarnation.to_bytes(8, "big")
    ).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << CLIENT_ID_BITS) - 1)


@lru_cache(maxsize=65_536)
def peer_name(peer: PeerId) -> str:
    """The base58 form of a peer ID, cached: it prefixes every document key and costs a bignum."""
    return str(peer)


@lru_cache(maxsize=4096)
def _public_key(author: PeerId) -> PublicKey:
    key = author.public_key()
    if key is None:
        raise InvalidEnvelope(f"author {author.short()} has no inline public key (not Ed25519)")
    return key


def _u64(value: int) -> bytes:
    return struct.pack(">Q", value)


def _author_bytes(author: PeerId) -> bytes:
    return bytes([len(author.multihash)]) + author.multihash


@lru_cache(maxsize=65_536)
def _peer(raw: bytes) -> PeerId:
    try:
        return PeerId.from_bytes(raw)
    except InvalidPeerId as exc:
        raise MalformedMessage(f"envelope author is not a peer ID: {exc}") from exc


@dataclass(frozen=True)
class ChainId:
    """One author's run: its updates are numbered 1, 2, 3, ... and use one Yjs client ID."""

    author: PeerId
    incarnation: int

    @cached_property
    def client_id(self) -> int:
        return derive_client_id(self.author, self.incarnation)

    def __str__(self) -> str:
        return f"{self.author.short()}#{self.incarnation}"


@dataclass(frozen=True)
class SignedUpdate:
    """A Yjs update wrapped with its author, incarnation, sequence number and signature."""

    author: PeerId
    incarnation: int
    seq: int
    update: bytes
    signature: bytes

    @classmethod
    def create(cls, key: KeyPair, incarnation: int, seq: int, update: bytes) -> SignedUpdate:
        unsigned = cls(key.peer_id, incarnation, seq, update, b"")
        return cls(key.peer_id, incarnation, seq, update, key.sign(unsigned.signing_bytes()))

    @cached_property
    def update_hash(self) -> bytes:
        return hashlib.sha256(self.update).digest()

    @property
    def chain(self) -> ChainId:
        return ChainId(self.author, self.incarnation)

    @property
    def client_id(self) -> int:
        return derive_client_id(self.author, self.incarnation)

    def signing_bytes(self) -> bytes:
        return (
            UPDATE_DOMAIN
            + _author_bytes(self.author)
            + _u64(self.incarnation)
            + _u64(self.seq)
            + self.update_hash
        )

    @cached_property
    def envelope_id(self) -> bytes:
        """What de-duplication and audit records key on: the hash of the signed fields."""
        return hashlib.sha256(self.signing_bytes()).digest()

    def verify(self) -> None:
        """Raise `InvalidEnvelope` unless the author signed exactly these fields."""
        if self.seq < 1:
            raise InvalidEnvelope("sequence numbers start at 1")
        try:
            _public_key(self.author).verify(self.signature, self.signing_bytes())
        except InvalidSignature as exc:
            raise InvalidEnvelope(
                f"update {self.chain}/{self.seq}: signature does not match the author"
            ) from exc

    def to_pb(self) -> view_pb2.SignedUpdate:
        return view_pb2.SignedUpdate(
            author=self.author.multihash,
            incarnation=self.incarnation,
            seq=self.seq,
            update=self.update,
            signature=self.signature,
        )

    @classmethod
    def from_pb(cls, message: view_pb2.SignedUpdate) -> SignedUpdate:
        return cls(
            _peer(message.author),
            message.incarnation,
            message.seq,
            bytes(message.update),
            bytes(message.signature),
        )

    def encode(self) -> bytes:
        return self.to_pb().SerializeToString(deterministic=True)

    @classmethod
    def decode(cls, data: bytes) -> SignedUpdate:
        message = view_pb2.SignedUpdate()
        try:
            message.ParseFromString(data)
        except Exception as exc:  # protobuf's DecodeError and friends
            raise MalformedMessage(f"not a SignedUpdate: {exc}") from exc
        return cls.from_pb(message)

    def __repr__(self) -> str:
        return f"SignedUpdate({self.chain}/{self.seq}, {len(self.update)} bytes)"


@dataclass(frozen=True)
class Heartbeat:
    """A signed 'I am alive', gossiped outside the CRDT so the document never grows with time."""

    author: PeerId
    incarnation: int
    counter: int
    timestamp_ms: int
    head_seq: int
    leaving: bool
    signature: bytes

    @classmethod
    def create(
        cls,
        key: KeyPair,
        incarnation: int,
        counter: int,
        timestamp_ms: int,
        head_seq: int,
        leaving: bool = False,
    ) -> Heartbeat:
        unsigned = cls(key.peer_id, incarnation, counter, timestamp_ms, head_seq, leaving, b"")
        return cls(
            key.peer_id,
            incarnation,
            counter,
            timestamp_ms,
            head_seq,
            leaving,
            key.sign(unsigned.signing_bytes()),
        )

    @property
    def chain(self) -> ChainId:
        return ChainId(self.author, self.incarnation)

    def signing_bytes(self) -> bytes:
        return (
            HEARTBEAT_DOMAIN
            + _author_bytes(self.author)
            + _u64(self.incarnation)
            + _u64(self.counter)
            + _u64(self.timestamp_ms)
            + _u64(self.head_seq)
            + (b"\x01" if self.leaving else b"\x00")
        )

    def verify(self) -> None:
        try:
            _public_key(self.author).verify(self.signature, self.signing_bytes())
        except InvalidSignature as exc:
            raise InvalidEnvelope(
                f"heartbeat {self.chain}/{self.counter}: signature does not match the author"
            ) from exc

    def is_newer_than(self, other: Heartbeat | None) -> bool:
        if other is None:
            return True
        return (self.incarnation, self.counter) > (other.incarnation, other.counter)

    def to_pb(self) -> view_pb2.Heartbeat:
        return view_pb2.Heartbeat(
            author=self.author.multihash,
            incarnation=self.incarnation,
            counter=self.counter,
            timestamp_ms=self.timestamp_ms,
            head_seq=self.head_seq,
            leaving=self.leaving,
            signature=self.signature,
        )

    @classmethod
    def from_pb(cls, message: view_pb2.Heartbeat) -> Heartbeat:
        return cls(
            _peer(message.author),
            message.incarnation,
            message.counter,
            message.timestamp_ms,
            message.head_seq,
            message.leaving,
            bytes(message.signature),
        )


@dataclass(frozen=True)
class EquivocationProof:
    """Two valid signatures by one author over different updates with the same number."""

    first: SignedUpdate
    second: SignedUpdate

    @property
    def author(self) -> PeerId:
        return self.first.author

    def verify(self) -> None:
        a, b = self.first, self.second
        if (a.author, a.incarnation, a.seq) != (b.author, b.incarnation, b.seq):
            raise InvalidEnvelope("equivocation proof: the updates have different numbers")
        if a.update_hash == b.update_hash:
            raise InvalidEnvelope("equivocation proof: the updates are the same")
        a.verify()
        b.verify()

    def to_pb(self) -> view_pb2.EquivocationProof:
        return view_pb2.EquivocationProof(first=self.first.to_pb(), second=self.second.to_pb())

    @classmethod
    def from_pb(cls, message: view_pb2.EquivocationProof) -> EquivocationProof:
        return cls(SignedUpdate.from_pb(message.first), SignedUpdate.from_pb(message.second))
