"""The compact data section of small codec messages: round trips, and every malformed section
refused with a clear error before any block is used."""

from __future__ import annotations

import struct

import numpy as np
import pyarrow as pa
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


@pytest.mark.parametrize("data_length", range(1, 9))
def test_arrow_values_after_a_raw_section_stay_8_byte_aligned(data_length: int) -> None:
    """Arrow's buffers are read zero-copy: a raw section ending at an odd offset would leave
    every Arrow value behind it misaligned (a float64 buffer at an odd address)."""
    value = {"b": b"x" * data_length, "f": pa.array(np.arange(5, dtype=np.float64))}
    message = bytearray(b"".join(encode(value)))  # a bytearray starts 16-byte aligned
    assert flags_of(message) == FLAG_DATA_STREAM | FLAG_RAW_DATA
    out = decode(message)
    assert out["f"].buffers()[1].address % 8 == 0
    assert out["f"].to_pylist() == [0.0, 1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize(
    ("tail", "match"),
    [
        (bytes(5), None),  # 64 + 3 bytes of block, then 5 of pad: the section ends at 72
        (bytes(4), "ends inside the pad"),
        (bytes(4) + b"\x01", "pad after the raw data blocks is not zero"),
        (bytes(13), "8 bytes after its blocks"),
    ],
)
def test_a_section_before_arrow_streams_ends_in_an_exact_zero_pad(
    tail: bytes, match: str | None
) -> None:
    section = table(3) + bytes(48) + b"abc" + tail
    assert raw_section([b"abc"], 0, streams_follow=True) == table(3) + bytes(48) + b"abc" + bytes(5)
    message = memoryview(section)
    if match is None:
        assert read_raw_section(message, 0, len(section), 10, streams_follow=True) == [(64, 67)]
    else:
        with pytest.raises(MalformedMessage, match=match):
            read_raw_section(message, 0, len(section), 10, streams_follow=True)


def test_the_data_flag_without_any_stream_is_refused() -> None:
    message = bytearray(b"".join(encode([1, "two"])))
    assert flags_of(message) == 0
    for flags in (FLAG_DATA_STREAM, FLAG_DATA_STREAM | FLAG_RAW_DATA):
        message[5] = flags
        with pytest.raises(MalformedMessage, match="no stream"):
            decode(message)
