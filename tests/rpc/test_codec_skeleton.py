"""Remembered skeletons: a message shaped like one already checked in full (same header, tree
and block table) skips re-parsing them, and must still be refused wherever it differs."""

from __future__ import annotations

import numpy as np
import pytest

from lattica_ray.rpc import codec
from lattica_ray.rpc.codec import CodecLimits, decode, encode
from lattica_ray.rpc.codec_errors import LimitExceeded, MalformedMessage


def message(value: object) -> bytearray:
    return bytearray(b"".join(bytes(part) for part in encode(value)))


def skeleton_of(data: bytearray, limits: CodecLimits = codec.DEFAULT_LIMITS) -> object:
    key = codec._skeleton_key(memoryview(data))
    assert key is not None
    return codec._skeletons_for(limits).get(key)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (((b"a" * 100,), {}), ((b"b" * 100,), {})),
        (b"x" * 100, b"y" * 100),
        ("text", "text"),
        ([1, None, True, 2.5, b"ab", "s" * 2000], [1, None, True, 2.5, b"cd", "t" * 2000]),
        (np.arange(6, dtype=np.int16).reshape(2, 3), np.ones((2, 3), dtype=np.int16)),
        ({"k": b"12345"}, {"k": b"67890"}),
    ],
)
def test_a_known_skeleton_decodes_the_next_message_of_its_shape(
    first: object, second: object
) -> None:
    assert _equal(decode(message(first)), first)
    assert skeleton_of(message(first)) is not None  # learnt from the full check
    assert _equal(decode(message(second)), second)  # decoded from the skeleton
    assert _equal(decode(message(second)), second)


def test_a_non_zero_pad_between_blocks_is_refused_also_when_the_skeleton_is_known() -> None:
    value = [b"a" * 3, b"b" * 3]
    good = message(value)
    decode(good)
    assert skeleton_of(good) is not None
    first_block_end = good.index(b"aaa") + 3
    bad = bytearray(good)
    bad[first_block_end] = 1  # the pad that aligns the second block
    with pytest.raises(MalformedMessage, match="pad"):
        decode(bad)


def test_a_message_longer_or_shorter_than_its_skeleton_is_refused() -> None:
    good = message(b"z" * 40)
    decode(good)
    with pytest.raises(MalformedMessage):
        decode(good + b"\0" * 8)
    with pytest.raises(MalformedMessage):
        decode(good[:-1])


def test_skeletons_are_learnt_per_limits() -> None:
    strict = CodecLimits(max_message_bytes=64)
    data = message(b"q" * 100)
    decode(data)  # learnt under the default limits
    assert skeleton_of(data, strict) is None
    with pytest.raises(LimitExceeded, match="max_message_bytes"):
        decode(data, strict)


def test_a_malformed_message_teaches_nothing() -> None:
    data = message([b"m" * 5, b"n" * 5])
    data[-1:] = b""  # truncated: refused by the full check
    with pytest.raises(MalformedMessage):
        decode(data)
    assert codec._skeleton_key(memoryview(data)) not in codec._skeletons_for(codec.DEFAULT_LIMITS)


def _equal(a: object, b: object) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


def test_what_the_blocks_hold_is_checked_on_every_message() -> None:
    """Dict keys made of bytes, text and array layout live in the blocks, not the skeleton."""
    good = message({b"a": 1, b"b": 2})
    decode(good)
    skeleton = skeleton_of(good)
    assert skeleton is not None
    (_, _), (second, _) = skeleton.blocks
    forged = bytearray(good)
    forged[second] = ord("a")  # the same skeleton, two equal keys
    with pytest.raises(MalformedMessage, match="duplicate"):
        decode(forged)

    text = message("é" * 1500)  # a long str travels as a UTF-8 block
    decode(text)
    broken = bytearray(text)
    broken[-1] = 0xFF  # not UTF-8 any more
    with pytest.raises(MalformedMessage):
        decode(broken)


@pytest.mark.parametrize(
    "value",
    [b"", b"x" * 100, ((b"a" * 7, b"b" * 70), {}), [None, "s" * 1500, bytearray(b"y" * 65)], {}],
)
def test_a_remembered_layout_encodes_the_same_bytes_as_a_new_one(value: object) -> None:
    codec._small_layouts.clear()
    codec._shape_layouts.clear()
    fresh = message(value)
    assert codec._small_layouts  # learnt
    again = message(value)
    assert again == fresh
    codec._small_layouts.clear()
    codec._shape_layouts.clear()
    assert message(value) == fresh
    assert _equal(decode(again), value)


def remembered_by_size(data: bytearray) -> bool:
    for _ in range(3):  # learnt by the full check, then found by its key: now by its size
        decode(bytearray(data))
    return len(data) in codec._recent_by_size


def test_a_message_of_a_remembered_size_but_another_shape_is_decoded_as_its_own() -> None:
    first, second = [b"a" * 3, b"b" * 5], [b"c" * 9, b"d" * 5]  # same tree, other blocks
    assert len(message(first)) == len(message(second))
    assert remembered_by_size(message(first))
    assert decode(message(second)) == second
    assert decode(message(first)) == first


def test_a_non_zero_pad_is_refused_when_the_size_is_remembered() -> None:
    good = message([b"e" * 3, b"f" * 3])
    assert remembered_by_size(good)
    bad = bytearray(good)
    bad[good.index(b"eee") + 3] = 1  # the pad that aligns the second block
    with pytest.raises(MalformedMessage, match="pad"):
        decode(bad)


def test_a_changed_block_table_is_refused_when_the_size_is_remembered() -> None:
    good = message([b"g" * 3, b"h" * 3])
    assert remembered_by_size(good)
    bad = bytearray(good)
    table = good.index(b"ggg") - 64  # inside the header, tree or block table before the block
    bad[table] ^= 0xFF
    with pytest.raises(MalformedMessage):
        decode(bad)
    assert decode(memoryview(good)) == [b"g" * 3, b"h" * 3]  # other buffer types: the long way


@pytest.mark.parametrize(
    "value",
    [None, b"", b"v" * 100, ((), {}), ((b"w" * 10,), {}), ((b"x", b"", b"y" * 70), {})],
)
def test_values_of_bytes_only_decode_straight_from_a_remembered_size(value: object) -> None:
    data = message(value)
    assert remembered_by_size(data)
    assert codec._recent_by_size[len(data)][1].direct is not None  # the direct way is taken
    first, second = decode(bytearray(data)), decode(bytearray(data))
    assert first == second == value
    assert type(first) is type(value)
    if isinstance(first, tuple):  # each call gets arguments of its own
        assert first[1] is not second[1]
        assert all(type(arg) is bytes for arg in first[0])


def test_other_values_of_a_remembered_size_are_not_decoded_straight() -> None:
    value = ((b"x" * 10,), {"k": b"y"})
    assert remembered_by_size(message(value))
    assert codec._recent_by_size[len(message(value))][1].direct is None
    assert decode(message(value)) == value
