"""Values made of bytes only (a bytes result, a call's `(bytes, ..., {})` arguments, None) are
encoded from a remembered layout once their shape was seen: the bytes must be the same as the
long way's, and every limit still applies."""

from __future__ import annotations

import random

import pytest

from lattica_ray.rpc import codec
from lattica_ray.rpc.codec import DEFAULT_LIMITS, CodecLimits, LimitExceeded
from lattica_ray.rpc.codec_raw import RAW_DATA_MAX


def long_way(value: object) -> bytes:
    return b"".join(bytes(b) for b in codec._encode(value, DEFAULT_LIMITS))


def encoded(value: object) -> bytes:
    return b"".join(bytes(b) for b in codec.encode(value))


def shapes() -> list[object]:
    rng = random.Random(7)
    sizes = [0, 1, 7, 8, 63, 64, 100, 1000, RAW_DATA_MAX - 200, RAW_DATA_MAX]
    values: list[object] = [None, ((), {})]
    for size in sizes:
        values.append(rng.randbytes(size))
        for count in (1, 2, 3, 5):
            args = tuple(rng.randbytes(rng.choice(sizes) // count) for _ in range(count))
            values.append((args, {}))
    return values


@pytest.mark.parametrize("value", shapes(), ids=lambda v: repr(v)[:40])
def test_a_remembered_shape_encodes_as_the_long_way(value: object) -> None:
    first, again = encoded(value), encoded(value)  # the second comes from the layout
    assert first == again == long_way(value)
    assert codec.decode(bytearray(again)) == value


def test_other_contents_of_a_remembered_shape() -> None:
    """Same shape, other bytes: the layout is reused, the values are the new ones."""
    encoded(((b"a" * 100, b"b" * 3), {}))
    value = ((b"x" * 100, b"y" * 3), {})
    assert encoded(value) == long_way(value)
    assert codec.decode(bytearray(encoded(value))) == value


@pytest.mark.parametrize(
    "value",
    [
        ((b"x", "text"), {}),  # not bytes only
        ((b"x",), {"key": b"y"}),  # keyword arguments
        ([b"x"], {}),  # a list of arguments
        (bytearray(b"x"),),  # a bytearray is not bytes
        ((b"x", b"y", b"z"),),  # not (args, kwargs)
        type("Blob", (bytes,), {})(b"sub"),  # a bytes subclass arrives as bytes
    ],
)
def test_other_values_take_the_long_way(value: object) -> None:
    assert codec._bytes_shape(value) is None
    assert encoded(value) == long_way(value)


def test_limits_other_than_the_defaults_take_the_long_way() -> None:
    tight = CodecLimits(max_message_bytes=64)
    with pytest.raises(LimitExceeded):
        codec.encode(b"x" * 100, tight)
    encoded(b"y" * 100)  # remembered under the default limits ...
    with pytest.raises(LimitExceeded):  # ... which do not decide for other limits
        codec.encode(b"x" * 100, tight)
