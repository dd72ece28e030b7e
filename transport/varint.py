"""Unsigned varints (multiformats unsigned-varint) and varint-length-prefixed framing."""

from __future__ import annotations

from transport.errors import MessageTooLarge, ProtocolViolation

MAX_VARINT_BYTES = 9  # unsigned-varint spec: at most 9 bytes (63 bits)


class VarintError(ProtocolViolation):
    """A varint is truncated, too long, or not minimally encoded."""


class VarintTruncated(VarintError):
    """The bytes end inside a varint: more are needed."""


def encode_varint(value: int) -> bytes:
    if value < 0:
        raise ValueError("varints are unsigned")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int]:
    """Decode one varint at `offset`; return (value, offset after it). Raises on truncation."""
    value = 0
    shift = 0
    for index in range(offset, min(len(data), offset + MAX_VARINT_BYTES)):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if byte == 0 and index > offset:
                raise VarintError("varint is not minimally encoded")
            return value, index + 1
        shift += 7
    if len(data) - offset >= MAX_VARINT_BYTES:
        raise VarintError(f"varint longer than {MAX_VARINT_BYTES} bytes")
    raise VarintTruncated("varint is truncated")


def try_decode_varint(
    data: bytes | bytearray | memoryview, offset: int = 0
) -> tuple[int, int] | None:
    """Like `decode_varint`, but None when more bytes are needed (for incremental parsers)."""
    try:
        return decode_varint(data, offset)
    except VarintTruncated:
        return None


def encode_length_prefixed(message: bytes) -> bytes:
    return encode_varint(len(message)) + message


class LengthPrefixedReader:
    """Sans-I/O splitter of varint-length-prefixed messages, with a size limit.

    Feed bytes with `feed()`, take whole messages from `messages()`. A length above `max_size`
    raises `MessageTooLarge` before any of the body is buffered.
    """

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        out: list[bytes] = []
        while True:
            header = try_decode_varint(self._buffer)
            if header is None:
                return out
            length, start = header
            if length > self.max_size:
                raise MessageTooLarge(length, self.max_size)
            if len(self._buffer) - start < length:
                return out
            out.append(bytes(self._buffer[start : start + length]))
            del self._buffer[: start + length]

    @property
    def pending(self) -> int:
        """Bytes held that do not yet form a whole message."""
        return len(self._buffer)
