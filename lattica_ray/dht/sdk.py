"""Records of the `lattica` SDK (rust-libp2p), so our DHT can share records with its nodes.

The SDK stores values unsigned, in bincode 2 (`config::standard()`: little-endian, variable
length integers), under plain string keys:

- `<key>` and `<key>#<subkey>`: `ValueWithTime { value: Vec<u8>, expiration_time: f64 }`, the
  expiry in Unix seconds;
- `<key>#index`: `SubkeyIndex { subkeys: Vec<String>, expiration: f64 }`, the subkeys of `<key>`.

rust-libp2p's Kademlia refuses to read kad messages over 16 KiB: SDK nodes can neither store
nor fetch from us a record much above 16,000 bytes (measured: 16,300 passes, 17,000 does not),
while what they put reaches us at any size up to our `max_record_size`.

Anyone may overwrite such a record: there is no author to check. That is why
`SdkRecordValidator` is off unless `DHTConfig(sdk_records=True)`, and then only takes keys
outside our own signed namespaces (`/pk/`, `/lattica/`).

The SDK's Python `store()` pickles values before storing them. We never unpickle what the
network sends: `bytes_from_pickle` reads only the exact opcodes of a pickled `bytes` object and
refuses everything else; `pickle_of_bytes` writes what the SDK's `get()` turns back into bytes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from lattica_ray.dht.errors import InvalidRecord

INDEX_SUFFIX = b"#index"  # the SDK's key of a subkey list
MAX_SUBKEYS = 4096  # subkeys one index may list (ours: the SDK sets none)

# bincode 2 variable-length integers: below 251 one byte, else a marker and a little-endian int
_U16, _U32, _U64, _U128 = 251, 252, 253, 254
_MARKERS = {_U16: "<H", _U32: "<I", _U64: "<Q"}


class BincodeError(ValueError):
    """Bytes that are not the bincode this module expects."""


def encode_varint(value: int) -> bytes:
    """bincode 2's variable-length encoding of an unsigned integer (up to 2**64 - 1)."""
    if value < 0:
        raise ValueError("bincode varints are unsigned")
    if value < _U16:
        return bytes([value])
    if value <= 0xFFFF:
        return bytes([_U16]) + struct.pack("<H", value)
    if value <= 0xFFFF_FFFF:
        return bytes([_U32]) + struct.pack("<I", value)
    if value <= 0xFFFF_FFFF_FFFF_FFFF:
        return bytes([_U64]) + struct.pack("<Q", value)
    raise ValueError("bincode varints above 2**64 - 1 are not used here")


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def take(self, count: int) -> bytes:
        end = self.offset + count
        if count < 0 or end > len(self.data):
            raise BincodeError(f"truncated: wanted {count} bytes at offset {self.offset}")
        chunk = self.data[self.offset : end]
        self.offset = end
        return chunk

    def varint(self) -> int:
        marker = self.take(1)[0]
        if marker < _U16:
            return marker
        fmt = _MARKERS.get(marker)
        if fmt is None:  # 254 (u128) never fits a length; 255 is reserved
            raise BincodeError(f"unsupported varint marker {marker}")
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def byte_string(self) -> bytes:
        return self.take(self.varint())

    def f64(self) -> float:
        return struct.unpack("<d", self.take(8))[0]

    def end(self) -> None:
        if self.offset != len(self.data):
            raise BincodeError(f"{len(self.data) - self.offset} bytes left over")


@dataclass(frozen=True)
class SdkValue:
    """The SDK's `ValueWithTime`: a value and when it expires (Unix seconds)."""

    value: bytes
    expiration: float

    def encode(self) -> bytes:
        return encode_varint(len(self.value)) + self.value + struct.pack("<d", self.expiration)

    @classmethod
    def decode(cls, data: bytes) -> SdkValue:
        reader = _Reader(data)
        value = reader.byte_string()
        expiration = reader.f64()
        reader.end()
        return cls(value, expiration)


@dataclass(frozen=True)
class SubkeyIndex:
    """The SDK's `SubkeyIndex` under `<key>#index`: the subkeys stored as `<key>#<subkey>`."""

    subkeys: tuple[str, ...]
    expiration: float

    def encode(self) -> bytes:
        parts = [encode_varint(len(self.subkeys))]
        for subkey in self.subkeys:
            raw = subkey.encode("utf-8")
            parts += [encode_varint(len(raw)), raw]
        parts.append(struct.pack("<d", self.expiration))
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes) -> SubkeyIndex:
        reader = _Reader(data)
        count = reader.varint()
        if count > MAX_SUBKEYS:
            raise BincodeError(f"{count} subkeys exceed {MAX_SUBKEYS}")
        try:
            subkeys = tuple(reader.byte_string().decode("utf-8") for _ in range(count))
        except UnicodeDecodeError as exc:
            raise BincodeError(f"subkey is not UTF-8: {exc}") from exc
        expiration = reader.f64()
        reader.end()
        return cls(subkeys, expiration)


def is_index_key(key: bytes) -> bool:
    return key.endswith(INDEX_SUFFIX)


def decode_sdk_record(key: bytes, value: bytes) -> SdkValue | SubkeyIndex:
    """The record under `key` as the SDK wrote it; `InvalidRecord` if it is not one."""
    try:
        if is_index_key(key):
            return SubkeyIndex.decode(value)
        return SdkValue.decode(value)
    except BincodeError as exc:
        kind = "SubkeyIndex" if is_index_key(key) else "ValueWithTime"
        raise InvalidRecord(f"not a lattica SDK {kind} record: {exc}") from exc


class SdkRecordValidator:
    """Unsigned SDK records: well-formed bincode, a UTF-8 key, an expiry in the future but not
    beyond `max_ttl` (plus clock skew). Of two valid records the later expiry wins."""

    def __init__(self, max_ttl: float, max_clock_skew: float) -> None:
        self.max_ttl = max_ttl
        self.max_clock_skew = max_clock_skew

    def validate(self, key: bytes, value: bytes, now: float) -> float | None:
        if not key:
            raise InvalidRecord("SDK record keys must not be empty")
        try:
            key.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRecord("SDK record keys are UTF-8 strings") from exc
        expiration = decode_sdk_record(key, value).expiration
        if not math.isfinite(expiration):
            raise InvalidRecord(f"SDK record expiry is not a time: {expiration}")
        if expiration <= now:
            raise InvalidRecord("SDK record has expired")
        if expiration > now + self.max_ttl + self.max_clock_skew:
            raise InvalidRecord(
                f"SDK record expiry is too far in the future (more than {self.max_ttl:.0f} s)"
            )
        return expiration

    def select(self, key: bytes, values: Sequence[bytes]) -> int:
        def rank(value: bytes) -> tuple[float, int, bytes]:
            record = decode_sdk_record(key, value)
            size = len(record.subkeys) if isinstance(record, SubkeyIndex) else 0
            return (record.expiration, size, value)

        ranks = [rank(v) for v in values]
        return max(range(len(values)), key=ranks.__getitem__)


# -- the SDK's Python layer: pickled bytes, read and written without pickle ------------------------
_PROTO, _FRAME, _MEMOIZE, _STOP = 0x80, 0x95, 0x94, ord(".")
_BINPUT, _LONG_BINPUT = ord("q"), ord("r")  # protocol 3 memoizes with these
_SHORT_BINBYTES, _BINBYTES, _BINBYTES8 = ord("C"), ord("B"), 0x8E


def _opcode(reader: _Reader) -> int:
    """The next opcode, skipping FRAME (a buffering hint: its length must fit the data)."""
    opcode = reader.take(1)[0]
    while opcode == _FRAME:
        if struct.unpack("<Q", reader.take(8))[0] > len(reader.data) - reader.offset:
            raise ValueError("pickle frame runs past the end of the data")
        opcode = reader.take(1)[0]
    return opcode


def bytes_from_pickle(blob: bytes) -> bytes:
    """The bytes inside `pickle.dumps(<bytes>)` (protocol 3 to 5), parsed by hand.

    Only that exact shape is accepted (PROTO, one BYTES opcode, its memo entry, STOP; FRAME
    hints anywhere between): anything else raises `ValueError`, so no pickle machinery ever
    sees network data.
    """
    reader = _Reader(blob)
    try:
        if _opcode(reader) != _PROTO or not 3 <= reader.take(1)[0] <= 5:
            raise ValueError("not a protocol 3-5 pickle")
        opcode = _opcode(reader)
        if opcode == _SHORT_BINBYTES:
            data = reader.take(reader.take(1)[0])
        elif opcode == _BINBYTES:
            data = reader.take(struct.unpack("<I", reader.take(4))[0])
        elif opcode == _BINBYTES8:
            data = reader.take(struct.unpack("<Q", reader.take(8))[0])
        else:
            raise ValueError(f"pickle holds something other than bytes (opcode {opcode:#x})")
        opcode = _opcode(reader)
        if opcode == _MEMOIZE:
            opcode = _opcode(reader)
        elif opcode in (_BINPUT, _LONG_BINPUT):
            reader.take(1 if opcode == _BINPUT else 4)
            opcode = _opcode(reader)
        if opcode != _STOP:
            raise ValueError(f"pickle holds more than one bytes object (opcode {opcode:#x})")
        reader.end()
    except BincodeError as exc:
        raise ValueError(f"truncated pickle: {exc}") from exc
    return data


def pickle_of_bytes(data: bytes) -> bytes:
    """A protocol 4 pickle of the `bytes` object `data`, written by hand: what the SDK's Python
    `get()` unpickles back into `data`. Below 64 KiB it is exactly `pickle.dumps(data, 4)`."""
    if len(data) < 256:
        body = bytes([_SHORT_BINBYTES, len(data)]) + data
    elif len(data) <= 0xFFFF_FFFF:
        body = bytes([_BINBYTES]) + struct.pack("<I", len(data)) + data
    else:
        body = bytes([_BINBYTES8]) + struct.pack("<Q", len(data)) + data
    body += bytes([_MEMOIZE, _STOP])
    framed = bytes([_FRAME]) + struct.pack("<Q", len(body)) + body if len(body) >= 4 else body
    return bytes([_PROTO, 4]) + framed
