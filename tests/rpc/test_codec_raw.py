"""The compact data section of small codec messages: round trips, and every malformed section
refused with a clear error before any block is used."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lattica_ray.rpc import codec
from lattica_ray.rpc.codec import FLAG_DATA_STREAM, FLAG_RAW_DATA, decode, encode
from lattica_ray.rpc.codec_errors import LimitExceeded, MalformedMessage
from lattica_ray.rpc.codec_raw import RAW_ALIGNMENT, RAW_DATA_MAX, raw_section, read_raw_section

HEADER = struct.Struct("<4sBBHII")


def read(section: bytes, prefix: int = 0, max_blocks: int = 1000) -> list[tuple[int, int]]:
    message = memoryview(bytes(prefix) + section)
    return read_raw_section(message, prefix, len(message), max_blocks)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.binary(max_size=200), min_size=1, max_size=20),
    st.integers(0, 200).map(lambda n: n * 8),  # sections start 8-byte aligned in a message
)
def test_blocks_round_trip_aligned(blocks: list[bytes], start: int) -> None:
    section = raw_section(blocks, start)
    message = bytes(start) + section
    places = read(section, start)
    assert [message[a:b] for a, b in places] == blocks
    assert all(a % RAW_ALIGNMENT == 0 for a, _ in places)


def table(*lengths: int, count: int | None = None, reserved: int = 0) -> bytes:
    count = len(lengths) if count is None else count
    return struct.pack(f"<II{len(lengths)}Q", count, reserved, *lengths)


@pytest.mark.parametrize(
    ("section", "error", "match"),
    [
        (b"\x01\x00", MalformedMessage, "shorter than its block count"),
        (table(0, reserved=1) + bytes(48), MalformedMessage, "reserved"),
        (table(), MalformedMessage, "holds no block"),
        (table(5, count=2), MalformedMessage, "truncated inside its block table"),
        (table(8) + bytes(48) + b"abc", MalformedMessage, "runs past the end"),
        (table(1) + b"\x00" * 47 + b"\x01" + b"x", MalformedMessage, "pad .* is not zero"),
        (table(1) + bytes(48) + b"xy", MalformedMessage, "1 bytes after its blocks"),
        (table(1, count=2000), LimitExceeded, "data block count"),
    ],
)
def test_malformed_sections_are_refused(section: bytes, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        read(section)


def flags_of(message: bytes) -> int:
    return HEADER.unpack_from(message)[2]


def test_small_data_travels_raw_and_large_data_as_arrow() -> None:
    small = (b"x" * 100, np.arange(10, dtype=np.complex128))
    message = b"".join(encode(small))
    assert flags_of(message) == FLAG_DATA_STREAM | FLAG_RAW_DATA
    assert b"ARROW" not in message and len(message) < 500
    out = decode(bytearray(message))
    assert out[0] == small[0] and np.array_equal(out[1], small[1])

    large = np.arange(RAW_DATA_MAX, dtype=np.uint8)
    message = b"".join(encode(large))
    assert flags_of(message) == FLAG_DATA_STREAM
    assert np.array_equal(decode(message), large)


def test_decoded_small_arrays_are_views_over_the_message() -> None:
    message = bytearray(b"".join(encode([np.arange(6, dtype=np.float32), b"ab"])))
    array, _ = decode(message)
    array[0] = 42.0  # a view: writing it writes the receive buffer
    assert decode(message)[0][0] == 42.0


def test_raw_flag_without_the_data_flag_is_refused() -> None:
    message = bytearray(b"".join(encode(b"abc")))
    message[5] = FLAG_RAW_DATA
    with pytest.raises(MalformedMessage, match="without the data stream flag"):
        decode(message)


def test_the_block_count_limit_applies_to_raw_sections() -> None:
    message = b"".join(encode([b"a", b"b", b"c"]))
    with pytest.raises(LimitExceeded, match="max_buffers"):
        decode(message, codec.CodecLimits(max_buffers=2))
