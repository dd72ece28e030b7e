"""Unsigned varints and length-prefixed framing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from transport.errors import MessageTooLarge
from transport.varint import (
    LengthPrefixedReader,
    VarintError,
    VarintTruncated,
    decode_varint,
    encode_length_prefixed,
    encode_varint,
    try_decode_varint,
)


@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_round_trip(value: int) -> None:
    encoded = encode_varint(value)
    assert decode_varint(encoded) == (value, len(encoded))


def test_known_encodings() -> None:
    assert encode_varint(0) == b"\x00"
    assert encode_varint(127) == b"\x7f"
    assert encode_varint(128) == b"\x80\x01"
    assert encode_varint(300) == b"\xac\x02"


def test_truncated_and_overlong_varints() -> None:
    with pytest.raises(VarintTruncated):
        decode_varint(b"\x80")
    assert try_decode_varint(b"\x80") is None
    with pytest.raises(VarintError):
        decode_varint(b"\xff" * 10 + b"\x01")
    with pytest.raises(ValueError):
        encode_varint(-1)


@given(st.lists(st.binary(max_size=300), max_size=10), st.integers(min_value=1, max_value=7))
def test_reader_reassembles_messages_split_anywhere(messages: list[bytes], step: int) -> None:
    wire = b"".join(encode_length_prefixed(m) for m in messages)
    reader = LengthPrefixedReader(max_size=1000)
    out: list[bytes] = []
    for offset in range(0, len(wire), step):
        out.extend(reader.feed(wire[offset : offset + step]))
    assert out == messages
    assert reader.pending == 0


def test_reader_refuses_oversized_messages_before_buffering() -> None:
    reader = LengthPrefixedReader(max_size=10)
    with pytest.raises(MessageTooLarge):
        reader.feed(encode_varint(11))
