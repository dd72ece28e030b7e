"""Peer identity: Ed25519 keys, libp2p peer IDs, and the persistent key file.

A peer ID is the multihash of the protobuf-encoded public key (peer-ids spec): the identity
multihash when the encoding is at most 42 bytes (every Ed25519 key), SHA-256 otherwise, shown
in base58btc ("12D3KooW...").
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import base58
from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from transport.errors import InvalidPeerId, InvalidSignature, KeyFileError
from transport.pb import crypto_pb2

MULTIHASH_IDENTITY = 0x00  # multicodec table
MULTIHASH_SHA2_256 = 0x12  # multicodec table
MAX_INLINE_KEY_LENGTH = 42  # peer-ids spec: keys up to 42 bytes are inlined with identity
CIDV1_LIBP2P_KEY = 0x72  # multicodec "libp2p-key", for the CIDv1 text form of peer IDs

KeyType = crypto_pb2.KeyType


def _raw_public(key: ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class PublicKey:
    """A libp2p public key. Ed25519 (ours), ECDSA P-256 and secp256k1 (other peers) verify."""

    __slots__ = ("_verifier", "key_type", "raw")

    def __init__(self, key_type: int, raw: bytes) -> None:
        self.key_type = key_type
        self.raw = raw
        self._verifier: ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | None = None
        try:
            if key_type == KeyType.Ed25519:
                if len(raw) != 32:
                    raise InvalidPeerId(f"an Ed25519 public key is 32 bytes, not {len(raw)}")
                self._verifier = ed25519.Ed25519PublicKey.from_public_bytes(raw)
            elif key_type == KeyType.Secp256k1:  # peer-ids spec: compressed point, 33 bytes
                self._verifier = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), raw)
            elif key_type == KeyType.ECDSA:  # peer-ids spec: DER SubjectPublicKeyInfo
                loaded = serialization.load_der_public_key(raw)
                if isinstance(loaded, ec.EllipticCurvePublicKey):
                    self._verifier = loaded
        except ValueError as exc:
            raise InvalidPeerId(f"malformed {KeyType.Name(key_type)} public key: {exc}") from exc

    @classmethod
    def from_ed25519(cls, key: ed25519.Ed25519PublicKey) -> PublicKey:
        return cls(KeyType.Ed25519, _raw_public(key))

    @classmethod
    def from_protobuf(cls, data: bytes) -> PublicKey:
        """Parse the protobuf `PublicKey` message (as found in identify and TLS certificates)."""
        message = crypto_pb2.PublicKey()
        try:
            message.ParseFromString(data)
        except Exception as exc:  # protobuf raises DecodeError or RuntimeWarning-derived errors
            raise InvalidPeerId(f"malformed protobuf PublicKey: {exc}") from exc
        if not message.IsInitialized():
            raise InvalidPeerId("protobuf PublicKey lacks its Type or Data field")
        return cls(message.Type, message.Data)

    def to_protobuf(self) -> bytes:
        """Deterministic encoding: field 1 then field 2, as the peer-ids spec requires."""
        return crypto_pb2.PublicKey(Type=self.key_type, Data=self.raw).SerializeToString(
            deterministic=True
        )

    def verify(self, signature: bytes, message: bytes) -> None:
        """Raise `InvalidSignature` unless `signature` is this key's signature of `message`."""
        if self._verifier is None:
            raise InvalidSignature(
                f"key type {KeyType.Name(self.key_type)} is not supported for signatures; "
                "lattica-ray peers use Ed25519"
            )
        try:
            if isinstance(self._verifier, ed25519.Ed25519PublicKey):
                self._verifier.verify(signature, message)
            else:  # libp2p ECDSA and secp256k1 signatures: DER, over SHA-256
                self._verifier.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        except _CryptoInvalidSignature as exc:
            raise InvalidSignature(
                f"{KeyType.Name(self.key_type)} signature does not match the key"
            ) from exc

    def peer_id(self) -> PeerId:
        return PeerId.from_public_key(self)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, PublicKey)
            and self.key_type == other.key_type
            and self.raw == other.raw
        )

    def __hash__(self) -> int:
        return hash((self.key_type, self.raw))


@dataclass(frozen=True, order=True)
class PeerId:
    """A libp2p peer ID: the multihash bytes, compared and hashed by value."""

    multihash: bytes

    @classmethod
    def from_public_key(cls, key: PublicKey) -> PeerId:
        encoded = key.to_protobuf()
        if len(encoded) <= MAX_INLINE_KEY_LENGTH:
            return cls(bytes([MULTIHASH_IDENTITY, len(encoded)]) + encoded)
        return cls(bytes([MULTIHASH_SHA2_256, 32]) + hashlib.sha256(encoded).digest())

    @classmethod
    def from_bytes(cls, data: bytes) -> PeerId:
        _check_multihash(data)
        return cls(bytes(data))

    @classmethod
    def from_string(cls, text: str) -> PeerId:
        """Parse base58btc ("12D3KooW...", "Qm...") or CIDv1 base32 ("bafz...")."""
        if not isinstance(text, str) or not text:
            raise InvalidPeerId(f"not a peer ID: {text!r}")
        if text.startswith(("1", "Q")):
            try:
                data = base58.b58decode(text)
            except ValueError as exc:
                raise InvalidPeerId(f"not base58btc: {text!r}") from exc
            return cls.from_bytes(data)
        if text.startswith("b"):
            return cls._from_cid(text)
        raise InvalidPeerId(
            f"not a peer ID: {text!r} (expected base58btc '12D3KooW...' or CIDv1 'bafz...')"
        )

    @classmethod
    def _from_cid(cls, text: str) -> PeerId:
        import base64

        body = text[1:].upper()
        try:
            data = base64.b32decode(body + "=" * (-len(body) % 8))
        except ValueError as exc:
            raise InvalidPeerId(f"not a base32 CID: {text!r}") from exc
        if len(data) < 2 or data[0] != 0x01 or data[1] != CIDV1_LIBP2P_KEY:
            raise InvalidPeerId(f"CID {text!r} is not a CIDv1 libp2p-key")
        return cls.from_bytes(data[2:])

    def to_string(self) -> str:
        return base58.b58encode(self.multihash).decode("ascii")

    def public_key(self) -> PublicKey | None:
        """The public key inlined in an identity multihash, or None for hashed (long) keys."""
        if self.multihash[0] != MULTIHASH_IDENTITY:
            return None
        return PublicKey.from_protobuf(self.multihash[2:])

    def matches(self, key: PublicKey) -> bool:
        return PeerId.from_public_key(key) == self

    def __str__(self) -> str:
        return self.to_string()

    def __repr__(self) -> str:
        return f"PeerId({self.to_string()!r})"

    def short(self) -> str:
        """The last six characters, as libp2p logs show peers."""
        return "*" + self.to_string()[-6:]


def _check_multihash(data: bytes) -> None:
    if len(data) < 2:
        raise InvalidPeerId("peer ID multihash is too short")
    code, length = data[0], data[1]
    if code == MULTIHASH_IDENTITY:
        if length != len(data) - 2 or length > MAX_INLINE_KEY_LENGTH:
            raise InvalidPeerId("identity multihash length does not match its content")
        PublicKey.from_protobuf(data[2:])  # an inlined key must parse
    elif code == MULTIHASH_SHA2_256:
        if length != 32 or len(data) != 34:
            raise InvalidPeerId("sha2-256 multihash must carry 32 bytes")
    else:
        raise InvalidPeerId(f"unsupported multihash code 0x{code:02x} in peer ID")


class KeyPair:
    """An Ed25519 identity key pair: signs handshakes and records."""

    def __init__(self, private_key: ed25519.Ed25519PrivateKey) -> None:
        self.private_key = private_key
        self.public_key = PublicKey.from_ed25519(private_key.public_key())
        self.peer_id = PeerId.from_public_key(self.public_key)

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(ed25519.Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> KeyPair:
        """Deterministic keys for tests and simulations (32-byte seed)."""
        return cls(ed25519.Ed25519PrivateKey.from_private_bytes(seed))

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)

    def to_protobuf(self) -> bytes:
        """The libp2p PrivateKey message: Ed25519 data is the 32-byte seed then the public key."""
        seed = self.private_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return crypto_pb2.PrivateKey(
            Type=KeyType.Ed25519, Data=seed + self.public_key.raw
        ).SerializeToString(deterministic=True)

    @classmethod
    def from_protobuf(cls, data: bytes) -> KeyPair:
        message = crypto_pb2.PrivateKey()
        try:
            message.ParseFromString(data)
        except Exception as exc:
            raise KeyFileError(f"not a libp2p PrivateKey protobuf: {exc}") from exc
        if not message.IsInitialized():
            raise KeyFileError("PrivateKey protobuf lacks its Type or Data field")
        if message.Type != KeyType.Ed25519:
            raise KeyFileError(
                f"key type {KeyType.Name(message.Type)} is not supported; use an Ed25519 key"
            )
        if len(message.Data) not in (32, 64):
            raise KeyFileError(f"Ed25519 private key data is {len(message.Data)} bytes, not 64")
        pair = cls.from_seed(message.Data[:32])
        if len(message.Data) == 64 and message.Data[32:] != pair.public_key.raw:
            raise KeyFileError("Ed25519 private key does not match the public key stored with it")
        return pair


def load_or_create_key(path: str | os.PathLike[str]) -> KeyPair:
    """Load the identity at `path`, or create it (mode 0600) if the file does not exist.

    A file that exists but cannot be parsed raises `KeyFileError`: replacing it would silently
    change the node's peer ID, which every peer and record that knows it depends on.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return _create_key_file(path)
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc}") from exc
    try:
        return KeyPair.from_protobuf(data)
    except KeyFileError as exc:
        raise KeyFileError(
            f"key file {path} is corrupt ({exc}); restore it from a backup, or move it away "
            "to create a new identity (the peer ID will change)"
        ) from exc


def _create_key_file(path: Path) -> KeyPair:
    pair = KeyPair.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load_or_create_key(path)  # another process created it first: use theirs
    except OSError as exc:
        raise KeyFileError(f"cannot create key file {path}: {exc}") from exc
    with os.fdopen(fd, "wb") as handle:
        handle.write(pair.to_protobuf())
        handle.flush()
        os.fsync(handle.fileno())
    return pair
