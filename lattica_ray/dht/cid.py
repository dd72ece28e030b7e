"""Content IDs for the object directory: CIDv1, codec `raw`, multihash sha2-256.

Why SHA-256 and not BLAKE3: it is what every libp2p DHT keys provider records on (go and rust
put `cid.Hash()`, the multihash, in ADD_PROVIDER), so IPFS tooling and the `lattica` SDK
understand our keys; `hashlib` ships it with SHA-NI acceleration (about 1.5-2 GB/s on one core,
and it releases the GIL, so large objects hash on a worker thread); and it needs no extra
dependency. BLAKE3 is faster only with its own package and several cores, and an object is
hashed once when it is put, next to a network transfer that is far slower than either hash.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

import base58

from lattica_ray.dht.errors import InvalidContentId
from transport.varint import VarintError, decode_varint, encode_varint

CID_V1 = 0x01  # multicodec "cidv1"
CODEC_RAW = 0x55  # multicodec "raw": the bytes themselves
CODEC_DAG_PB = 0x70  # multicodec "dag-pb": implied by CIDv0
MULTIHASH_SHA2_256 = 0x12  # multicodec "sha2-256"
SHA2_256_LENGTH = 32
MULTIBASE_BASE32 = "b"  # multibase prefix: RFC 4648 base32, lower case, no padding


@dataclass(frozen=True, order=True)
class ContentId:
    """A CID: `multihash` is what the DHT keys provider records on."""

    multihash: bytes
    codec: int = CODEC_RAW

    @classmethod
    def of(cls, data: bytes | bytearray | memoryview) -> ContentId:
        """The CID of `data` (hashing a large object? run this in `asyncio.to_thread`)."""
        digest = hashlib.sha256(data).digest()
        return cls(bytes([MULTIHASH_SHA2_256, SHA2_256_LENGTH]) + digest)

    @classmethod
    def from_bytes(cls, data: bytes) -> ContentId:
        """Binary CIDv1 (`0x01 <codec> <multihash>`) or a bare CIDv0 sha2-256 multihash."""
        if len(data) == 34 and data[0] == MULTIHASH_SHA2_256 and data[1] == SHA2_256_LENGTH:
            return cls(bytes(data), CODEC_DAG_PB)
        try:
            version, offset = decode_varint(data)
            if version != CID_V1:
                raise InvalidContentId(f"unsupported CID version {version}")
            codec, offset = decode_varint(data, offset)
            code, body = decode_varint(data, offset)
            length, body = decode_varint(data, body)
        except VarintError as exc:
            raise InvalidContentId(f"malformed CID: {exc}") from exc
        if len(data) - body != length:
            raise InvalidContentId("CID multihash length does not match its digest")
        if code == MULTIHASH_SHA2_256 and length != SHA2_256_LENGTH:
            raise InvalidContentId("a sha2-256 multihash carries 32 bytes")
        return cls(bytes(data[offset:]), codec)

    @classmethod
    def parse(cls, text: str) -> ContentId:
        """`bafkrei...` (CIDv1, base32) or `Qm...` (CIDv0, base58btc)."""
        if not isinstance(text, str) or not text:
            raise InvalidContentId(f"not a CID: {text!r}")
        if text.startswith("Qm") and len(text) == 46:
            try:
                return cls.from_bytes(base58.b58decode(text))
            except ValueError as exc:
                raise InvalidContentId(f"not base58btc: {text!r}") from exc
        if not text.startswith(MULTIBASE_BASE32):
            raise InvalidContentId(f"CID {text!r}: only base32 ('b...') and 'Qm...' are read")
        body = text[1:].upper()
        try:
            raw = base64.b32decode(body + "=" * (-len(body) % 8))
        except ValueError as exc:
            raise InvalidContentId(f"not base32: {text!r}") from exc
        return cls.from_bytes(raw)

    def to_bytes(self) -> bytes:
        return encode_varint(CID_V1) + encode_varint(self.codec) + self.multihash

    def __str__(self) -> str:
        encoded = base64.b32encode(self.to_bytes()).decode("ascii").rstrip("=").lower()
        return MULTIBASE_BASE32 + encoded

    def __repr__(self) -> str:
        return f"ContentId({str(self)!r})"

    def verify(self, data: bytes | bytearray | memoryview) -> bool:
        """Do `data` hash to this CID? (For fetched objects: never trust a provider.)"""
        if self.multihash[0] != MULTIHASH_SHA2_256:
            raise InvalidContentId("only sha2-256 content IDs can be verified")
        return hashlib.sha256(data).digest() == self.multihash[2:]
