"""Records that can be trusted: signed values, validators per namespace, and the local stores.

The kad-dht `Record` has no author or signature (the spec removed them), so trust lives in the
value, as IPNS does it:

- `/pk/<peer ID bytes>`: a libp2p public key; valid when it hashes to the peer ID in the key.
- `/lattica/<kind>/<name>`: a `SignedRecord` (pb/record.proto) with author, creation time,
  expiry and the author's Ed25519 signature over key, value and times. If `<name>` starts with
  a peer ID (`/lattica/actor/12D3KooW.../policy`), only that peer may write the key.

With `DHTConfig(sdk_records=True)` the keys in none of these namespaces go to a fallback, the
lattica SDK's unsigned records (`sdk.py`); our namespaces keep their rules.

Validators are pure: `validate(key, value, now)` raises `InvalidRecord` or returns the
record's own expiry; `select(key, values)` picks the best of several valid values (newest).
Times are Unix seconds, passed in by the caller so tests can move the clock.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from lattica_ray.dht.errors import InvalidRecord, StoreFull
from lattica_ray.dht.pb import record_pb2
from transport.errors import InvalidPeerId, InvalidSignature
from transport.identity import KeyPair, KeyType, PeerId, PublicKey
from transport.multiaddr import Multiaddr
from transport.varint import encode_varint

PK_NAMESPACE = b"pk"  # kad-dht spec: /pk/<peer ID> holds public keys
LATTICA_NAMESPACE = b"lattica"  # ours: signed records for actors, objects, ...
SIGNING_DOMAIN = b"lattica-ray/dht-record/1\x00"  # domain separation for record signatures


def namespace_of(key: bytes) -> bytes | None:
    """`pk` for `/pk/...`; None if the key has no `/<namespace>/` prefix."""
    if not key.startswith(b"/"):
        return None
    end = key.find(b"/", 1)
    if end <= 1:
        return None
    return key[1:end]


def pk_key(peer: PeerId) -> bytes:
    """The `/pk/` key of `peer`'s public key record (binary peer ID, as go-libp2p)."""
    return b"/pk/" + peer.multihash


def lattica_key(kind: str, name: str, owner: PeerId | None = None) -> bytes:
    """`/lattica/<kind>/<name>`, or `/lattica/<kind>/<owner>/<name>` writable only by `owner`."""
    if not kind or "/" in kind:
        raise ValueError(f"record kind must be a non-empty word without '/': {kind!r}")
    if not name:
        raise ValueError("record name must not be empty")
    middle = f"{owner}/" if owner is not None else ""
    return f"/lattica/{kind}/{middle}{name}".encode()


def owner_of(key: bytes) -> PeerId | None:
    """The peer a `/lattica/<kind>/<peer ID>/...` key belongs to; None for open keys."""
    parts = key.split(b"/", 4)
    if len(parts) < 4 or parts[3][:1] not in (b"1", b"Q"):
        return None
    try:
        return PeerId.from_string(parts[3].decode("ascii"))
    except (InvalidPeerId, UnicodeDecodeError):
        return None


# -- signed records -----------------------------------------------------------------------------
def signing_payload(
    key: bytes, value: bytes, author: bytes, created_ms: int, expires_ms: int
) -> bytes:
    """The exact bytes an author signs: length-prefixed fields, so no two records collide."""
    return b"".join(
        [
            SIGNING_DOMAIN,
            encode_varint(len(key)),
            key,
            encode_varint(len(value)),
            value,
            encode_varint(len(author)),
            author,
            struct.pack(">QQ", created_ms, expires_ms),
        ]
    )


@dataclass(frozen=True)
class SignedRecord:
    """A value under a `/lattica/` key with its author, creation time, expiry and signature."""

    key: bytes
    value: bytes
    author: PublicKey
    created_ms: int
    expires_ms: int
    signature: bytes

    @classmethod
    def create(
        cls, key_pair: KeyPair, key: bytes, value: bytes, now: float, ttl: float
    ) -> SignedRecord:
        created_ms = int(now * 1000)
        expires_ms = created_ms + int(ttl * 1000)
        author = key_pair.public_key.to_protobuf()
        signature = key_pair.sign(signing_payload(key, value, author, created_ms, expires_ms))
        return cls(key, value, key_pair.public_key, created_ms, expires_ms, signature)

    @classmethod
    def decode(cls, data: bytes) -> SignedRecord:
        """Parse (not verify) a record; `InvalidRecord` if it is not one."""
        message = record_pb2.SignedRecord()
        try:
            message.ParseFromString(data)
        except Exception as exc:  # DecodeError and friends
            raise InvalidRecord(f"value is not a signed record: {exc}") from exc
        if not message.author or not message.signature:
            raise InvalidRecord("record is unsigned (no author or signature)")
        try:
            author = PublicKey.from_protobuf(message.author)
        except InvalidPeerId as exc:
            raise InvalidRecord(f"record author is not a public key: {exc}") from exc
        return cls(
            message.key,
            message.value,
            author,
            message.created_ms,
            message.expires_ms,
            message.signature,
        )

    def encode(self) -> bytes:
        return record_pb2.SignedRecord(
            key=self.key,
            value=self.value,
            author=self.author.to_protobuf(),
            created_ms=self.created_ms,
            expires_ms=self.expires_ms,
            signature=self.signature,
        ).SerializeToString(deterministic=True)

    @property
    def author_id(self) -> PeerId:
        return self.author.peer_id()

    @property
    def expires_at(self) -> float:
        return self.expires_ms / 1000

    def verify(self) -> None:
        """Raise `InvalidRecord` unless the author's signature covers every field."""
        if self.author.key_type != KeyType.Ed25519:
            raise InvalidRecord("record author must use an Ed25519 key")
        payload = signing_payload(
            self.key, self.value, self.author.to_protobuf(), self.created_ms, self.expires_ms
        )
        try:
            self.author.verify(self.signature, payload)
        except InvalidSignature as exc:
            raise InvalidRecord(f"forged record: signature does not verify ({exc})") from exc

    def rank(self) -> tuple[int, int, bytes]:
        """Newest wins; ties go to the later expiry, then the larger signature (stable)."""
        return (self.created_ms, self.expires_ms, self.signature)


# -- validators -----------------------------------------------------------------------------------
class Validator(Protocol):
    """Checks one namespace's records (kad-dht spec: `Validate` and `Select`)."""

    def validate(self, key: bytes, value: bytes, now: float) -> float | None:
        """Raise `InvalidRecord`, or return when the record expires (None: no own expiry)."""
        ...

    def select(self, key: bytes, values: Sequence[bytes]) -> int:
        """Index of the best of `values` (all already valid); must be stable."""
        ...


class PublicKeyValidator:
    """`/pk/<peer ID>`: the value is the public key whose hash is that peer ID."""

    def validate(self, key: bytes, value: bytes, now: float) -> float | None:
        if not key.startswith(b"/pk/"):
            raise InvalidRecord("public key records live under /pk/")
        try:
            peer = PeerId.from_bytes(key[4:])
        except InvalidPeerId as exc:
            raise InvalidRecord(f"/pk/ key does not hold a peer ID: {exc}") from exc
        try:
            public_key = PublicKey.from_protobuf(value)
        except InvalidPeerId as exc:
            raise InvalidRecord(f"/pk/ value is not a public key: {exc}") from exc
        if not peer.matches(public_key):
            raise InvalidRecord(f"/pk/ value is not the public key of {peer}")
        return None

    def select(self, key: bytes, values: Sequence[bytes]) -> int:
        return 0  # every valid value is the same key


class SignedRecordValidator:
    """`/lattica/...`: a `SignedRecord` for this key, signed by its author, within its life."""

    def __init__(self, max_ttl: float, max_clock_skew: float) -> None:
        self.max_ttl = max_ttl
        self.max_clock_skew = max_clock_skew

    def validate(self, key: bytes, value: bytes, now: float) -> float | None:
        return self.check(key, value, now).expires_at

    def check(self, key: bytes, value: bytes, now: float) -> SignedRecord:
        record = SignedRecord.decode(value)
        if record.key != key:
            raise InvalidRecord("record was signed for another key")
        parts = key.split(b"/")
        if len(parts) < 4 or not parts[2] or not all(parts[3:]):
            raise InvalidRecord("lattica keys look like /lattica/<kind>/<name>")
        now_ms = now * 1000
        skew_ms = self.max_clock_skew * 1000
        if record.expires_ms <= now_ms:
            raise InvalidRecord("record has expired")
        if record.created_ms > now_ms + skew_ms:
            raise InvalidRecord("record claims to be created in the future")
        if record.expires_ms < record.created_ms:
            raise InvalidRecord("record expires before it was created")
        if record.expires_ms > now_ms + (self.max_ttl * 1000) + skew_ms:
            raise InvalidRecord(
                f"record expiry is too far in the future (more than {self.max_ttl:.0f} s)"
            )
        owner = owner_of(key)
        if owner is not None and not owner.matches(record.author):
            raise InvalidRecord(f"key belongs to {owner}; the record's author is someone else")
        record.verify()
        return record

    def select(self, key: bytes, values: Sequence[bytes]) -> int:
        ranks = [SignedRecord.decode(v).rank() for v in values]
        return max(range(len(values)), key=ranks.__getitem__)


class NamespacedValidator:
    """Dispatches by namespace, and refuses oversized or unknown-namespace records first."""

    def __init__(
        self,
        validators: dict[bytes, Validator],
        max_key_size: int,
        max_value_size: int,
        fallback: Validator | None = None,
    ) -> None:
        self.validators = dict(validators)
        self.max_key_size = max_key_size
        self.max_value_size = max_value_size
        self.fallback = fallback  # keys in none of our namespaces (off: refused)

    @classmethod
    def default(
        cls,
        max_ttl: float,
        max_clock_skew: float,
        max_key_size: int,
        max_value_size: int,
        fallback: Validator | None = None,
    ) -> NamespacedValidator:
        return cls(
            {
                PK_NAMESPACE: PublicKeyValidator(),
                LATTICA_NAMESPACE: SignedRecordValidator(max_ttl, max_clock_skew),
            },
            max_key_size,
            max_value_size,
            fallback,
        )

    def find(self, key: bytes) -> Validator | None:
        """The validator of `key`'s namespace, else the fallback (None: no one takes it)."""
        namespace = namespace_of(key)
        validator = self.validators.get(namespace) if namespace is not None else None
        return validator if validator is not None else self.fallback

    def validator_for(self, key: bytes) -> Validator:
        validator = self.find(key)
        if validator is None:
            raise InvalidRecord(
                f"no validator for key {key[:40]!r}: keys must start with one of "
                + ", ".join(f"/{ns.decode()}/" for ns in sorted(self.validators))
            )
        return validator

    def validate(self, key: bytes, value: bytes, now: float) -> float | None:
        if len(key) > self.max_key_size:
            raise InvalidRecord(f"key of {len(key)} bytes exceeds {self.max_key_size}")
        if len(value) > self.max_value_size:
            raise InvalidRecord(f"value of {len(value)} bytes exceeds {self.max_value_size}")
        return self.validator_for(key).validate(key, value, now)

    def select(self, key: bytes, values: Sequence[bytes]) -> int:
        return self.validator_for(key).select(key, values)


# -- local stores ---------------------------------------------------------------------------------
@dataclass
class StoredRecord:
    value: bytes
    received_at: float
    expires_at: float
    publisher: bytes = b""  # the original publisher's peer ID, as rust-libp2p tells it


class RecordStore:
    """Records this node holds (for others and its own), validated on the way in.

    A record is kept until its own expiry or `max_age` after it arrived, whichever is first
    (go-libp2p: MaxRecordAge), and never longer.
    """

    def __init__(self, validator: Validator, max_records: int, max_age: float) -> None:
        self.validator = validator
        self.max_records = max_records
        self.max_age = max_age
        self._records: dict[bytes, StoredRecord] = {}

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, key: object) -> bool:
        return key in self._records

    def put(
        self,
        key: bytes,
        value: bytes,
        now: float,
        publisher: bytes = b"",
        ttl: float | None = None,
    ) -> bool:
        """Store `value` if valid and not worse than what we hold; False if ours is better.

        `publisher` (a peer ID) and `ttl` (seconds, a bound on top of the record's own expiry)
        are what rust-libp2p peers send along. Raises `InvalidRecord` for invalid values and
        `StoreFull` at `max_records`.
        """
        own_expiry = self.validator.validate(key, value, now)
        expires_at = now + self.max_age
        if own_expiry is not None:
            expires_at = min(expires_at, own_expiry)
        if ttl:
            expires_at = min(expires_at, now + ttl)
        current = self._live(key, now)
        if current is not None and current.value != value:
            if self.validator.select(key, [current.value, value]) == 0:
                return False
        if current is None and len(self._records) >= self.max_records:
            self.expire(now)
            if len(self._records) >= self.max_records:
                raise StoreFull(f"record store is full ({self.max_records} records)")
        self._records[key] = StoredRecord(value, now, expires_at, publisher)
        return True

    def _live(self, key: bytes, now: float) -> StoredRecord | None:
        stored = self._records.get(key)
        if stored is not None and stored.expires_at <= now:
            del self._records[key]
            return None
        return stored

    def get(self, key: bytes, now: float) -> bytes | None:
        stored = self._live(key, now)
        return stored.value if stored is not None else None

    def entry(self, key: bytes, now: float) -> StoredRecord | None:
        """The live record under `key` with its expiry and publisher."""
        return self._live(key, now)

    def items(self, now: float) -> Iterator[tuple[bytes, bytes]]:
        for key in list(self._records):
            value = self.get(key, now)
            if value is not None:
                yield key, value

    def remove(self, key: bytes) -> None:
        self._records.pop(key, None)

    def expire(self, now: float) -> int:
        dead = [k for k, r in self._records.items() if r.expires_at <= now]
        for key in dead:
            del self._records[key]
        return len(dead)


@dataclass
class ProviderRecord:
    """`peer` says it provides the content under the key, until `expires_at`."""

    peer: PeerId
    addrs: list[Multiaddr]
    received_at: float
    expires_at: float
    addrs_expire_at: float

    def live_addrs(self, now: float) -> list[Multiaddr]:
        return self.addrs if now < self.addrs_expire_at else []


@dataclass
class _ProviderSet:
    by_peer: dict[PeerId, ProviderRecord] = field(default_factory=dict)


class ProviderStore:
    """Provider records by key, expiring after `ttl` (48 h) unless their owner re-announces."""

    def __init__(
        self, ttl: float, addr_ttl: float, max_keys: int, max_providers_per_key: int
    ) -> None:
        self.ttl = ttl
        self.addr_ttl = addr_ttl
        self.max_keys = max_keys
        self.max_providers_per_key = max_providers_per_key
        self._keys: dict[bytes, _ProviderSet] = {}

    def __len__(self) -> int:
        return sum(len(s.by_peer) for s in self._keys.values())

    def add(self, key: bytes, peer: PeerId, addrs: Iterable[Multiaddr], now: float) -> bool:
        """Record (or refresh) `peer` as a provider of `key`; False when a limit refuses it."""
        providers = self._keys.get(key)
        if providers is None:
            if len(self._keys) >= self.max_keys:
                self.expire(now)
                if len(self._keys) >= self.max_keys:
                    return False
            providers = self._keys[key] = _ProviderSet()
        if peer not in providers.by_peer and len(providers.by_peer) >= self.max_providers_per_key:
            self._expire_set(providers, now)
            if len(providers.by_peer) >= self.max_providers_per_key:
                return False
        providers.by_peer[peer] = ProviderRecord(
            peer, list(addrs), now, now + self.ttl, now + self.addr_ttl
        )
        return True

    def get(self, key: bytes, now: float, limit: int | None = None) -> list[ProviderRecord]:
        """Live providers of `key`, most recently announced first."""
        providers = self._keys.get(key)
        if providers is None:
            return []
        self._expire_set(providers, now)
        if not providers.by_peer:
            del self._keys[key]
            return []
        ordered = sorted(providers.by_peer.values(), key=lambda r: r.received_at, reverse=True)
        return ordered if limit is None else ordered[:limit]

    def remove(self, key: bytes, peer: PeerId) -> None:
        providers = self._keys.get(key)
        if providers is not None:
            providers.by_peer.pop(peer, None)
            if not providers.by_peer:
                del self._keys[key]

    @staticmethod
    def _expire_set(providers: _ProviderSet, now: float) -> None:
        for peer in [p for p, r in providers.by_peer.items() if r.expires_at <= now]:
            del providers.by_peer[peer]

    def expire(self, now: float) -> int:
        before = len(self)
        for key in list(self._keys):
            self._expire_set(self._keys[key], now)
            if not self._keys[key].by_peer:
                del self._keys[key]
        return before - len(self)
