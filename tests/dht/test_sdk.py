"""The lattica SDK's record formats (bincode), its opt-in validator, and pickled bytes by hand."""

from __future__ import annotations

import math
import pickle
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lattica_ray.dht import InvalidRecord
from lattica_ray.dht.records import NamespacedValidator, SignedRecord
from lattica_ray.dht.sdk import (
    BincodeError,
    SdkRecordValidator,
    SdkValue,
    SubkeyIndex,
    bytes_from_pickle,
    encode_varint,
    pickle_of_bytes,
)
from tests.dht.conftest import key_pair

NOW = 1_700_000_000.0
HOUR = 3600.0


# -- bincode ------------------------------------------------------------------------------------
def test_value_bytes_match_what_the_sdk_sent() -> None:
    """Bytes an SDK node (1.0.21) put on the wire in the interop scenario."""
    expiration = 1795617188.9038076
    wire = bytes([18]) + b"put by lattica-ray" + struct.pack("<d", expiration)
    assert SdkValue(b"put by lattica-ray", expiration).encode() == wire
    assert SdkValue.decode(wire) == SdkValue(b"put by lattica-ray", expiration)
    index = bytes([1, 3]) + b"one" + struct.pack("<d", expiration)
    assert SubkeyIndex.decode(index) == SubkeyIndex(("one",), expiration)
    assert SubkeyIndex(("one",), expiration).encode() == index


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"),
        (250, b"\xfa"),
        (251, b"\xfb\xfb\x00"),
        (0xFFFF, b"\xfb\xff\xff"),
        (0x10000, b"\xfc\x00\x00\x01\x00"),
        (0x1_0000_0000, b"\xfd" + (1 << 32).to_bytes(8, "little")),
    ],
)
def test_bincode_varint(value: int, encoded: bytes) -> None:
    assert encode_varint(value) == encoded


@given(st.binary(max_size=70_000), st.floats(allow_nan=False))
def test_value_round_trips(value: bytes, expiration: float) -> None:
    assert SdkValue.decode(SdkValue(value, expiration).encode()) == SdkValue(value, expiration)


@given(st.lists(st.text(max_size=300), max_size=20), st.floats(allow_nan=False))
def test_index_round_trips(subkeys: list[str], expiration: float) -> None:
    index = SubkeyIndex(tuple(subkeys), expiration)
    assert SubkeyIndex.decode(index.encode()) == index


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", "truncated"),
        (b"\x05abc" + bytes(8), "truncated"),  # says 5 bytes, holds 3 + the f64
        (b"\x01a" + bytes(7), "truncated"),  # f64 cut short
        (b"\x01a" + bytes(8) + b"!", "left over"),
        (b"\xfe" + bytes(24), "marker"),  # u128 length
        (b"\xfd" + (1 << 40).to_bytes(8, "little") + bytes(8), "truncated"),
    ],
)
def test_malformed_values_are_refused(data: bytes, error: str) -> None:
    with pytest.raises(BincodeError, match=error):
        SdkValue.decode(data)


def test_index_refuses_bad_utf8_and_too_many_subkeys() -> None:
    with pytest.raises(BincodeError, match="UTF-8"):
        SubkeyIndex.decode(b"\x01\x01\xff" + bytes(8))
    with pytest.raises(BincodeError, match="exceed"):
        SubkeyIndex.decode(encode_varint(1_000_000) + bytes(8))


# -- the validator ------------------------------------------------------------------------------
@pytest.fixture
def sdk() -> SdkRecordValidator:
    return SdkRecordValidator(max_ttl=48 * HOUR, max_clock_skew=300)


def test_valid_records_expire_when_they_say(sdk: SdkRecordValidator) -> None:
    value = SdkValue(b"v", NOW + 600).encode()
    assert sdk.validate(b"model-weights", value, NOW) == NOW + 600
    index = SubkeyIndex(("a", "b"), NOW + 60).encode()
    assert sdk.validate(b"peers#index", index, NOW) == NOW + 60


@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        (b"k", SdkValue(b"v", NOW).encode(), "expired"),
        (b"k", SdkValue(b"v", NOW + 49 * HOUR).encode(), "too far in the future"),
        (b"k", SdkValue(b"v", math.inf).encode(), "not a time"),
        (b"k", SdkValue(b"v", math.nan).encode(), "not a time"),
        (b"\xff\xfe", SdkValue(b"v", NOW + 60).encode(), "UTF-8"),
        (b"", SdkValue(b"v", NOW + 60).encode(), "empty"),
        (b"k", b"\x01", "ValueWithTime"),
        (b"k#index", SdkValue(b"v", NOW + 60).encode(), "SubkeyIndex"),  # a value, not a list
    ],
)
def test_bad_records_are_refused(
    sdk: SdkRecordValidator, key: bytes, value: bytes, error: str
) -> None:
    with pytest.raises(InvalidRecord, match=error):
        sdk.validate(key, value, NOW)


def test_the_later_expiry_wins(sdk: SdkRecordValidator) -> None:
    older = SdkValue(b"old", NOW + 60).encode()
    newer = SdkValue(b"new", NOW + 120).encode()
    assert sdk.select(b"k", [older, newer]) == 1
    assert sdk.select(b"k", [newer, older]) == 0
    fewer = SubkeyIndex(("a",), NOW + 60).encode()
    more = SubkeyIndex(("a", "b"), NOW + 60).encode()
    assert sdk.select(b"k#index", [fewer, more]) == 1


def test_sdk_records_are_off_unless_asked_for_and_never_touch_our_namespaces(
    sdk: SdkRecordValidator,
) -> None:
    value = SdkValue(b"v", NOW + 60).encode()
    strict = NamespacedValidator.default(48 * HOUR, 300, 1024, 65536)
    with pytest.raises(InvalidRecord, match="no validator"):
        strict.validate(b"model-weights", value, NOW)
    compat = NamespacedValidator.default(48 * HOUR, 300, 1024, 65536, fallback=sdk)
    assert compat.validate(b"model-weights", value, NOW) == NOW + 60
    assert compat.validate(b"/other/ns", value, NOW) == NOW + 60
    # Our signed namespace keeps its rules: an unsigned SDK value is still refused there.
    with pytest.raises(InvalidRecord, match="signed"):
        compat.validate(b"/lattica/actor/a", value, NOW)
    signed = SignedRecord.create(key_pair(), b"/lattica/actor/a", b"v", NOW, HOUR).encode()
    assert compat.validate(b"/lattica/actor/a", signed, NOW) == NOW + HOUR
    with pytest.raises(InvalidRecord, match="exceeds"):
        compat.validate(b"big", SdkValue(bytes(70_000), NOW + 60).encode(), NOW)


# -- pickled bytes, without pickle ---------------------------------------------------------------
@given(st.binary(max_size=300_000), st.sampled_from([3, 4, 5]))
def test_bytes_from_pickle_reads_what_pickle_writes(data: bytes, protocol: int) -> None:
    assert bytes_from_pickle(pickle.dumps(data, protocol=protocol)) == data


@given(st.binary(max_size=70_000))
def test_pickle_of_bytes_is_what_pickle_writes(data: bytes) -> None:
    ours = pickle_of_bytes(data)
    if len(data) < 64 * 1024:
        assert ours == pickle.dumps(data, protocol=4)
    assert pickle.loads(ours) == data  # our own bytes, made in this test
    assert bytes_from_pickle(ours) == data


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("this must never run",))


@pytest.mark.parametrize(
    "blob",
    [
        pickle.dumps("text"),
        pickle.dumps([b"x"]),
        pickle.dumps((b"a", b"b")),
        pickle.dumps(bytearray(b"x")),
        pickle.dumps(_Evil()),
        pickle.dumps(b"x", protocol=2),
        pickle.dumps(b"x")[:-1],
        pickle.dumps(b"x") + b".",
        b"\x80\x04\x95" + (1 << 40).to_bytes(8, "little") + b"C\x01x\x94.",
        b"",
    ],
)
def test_anything_but_pickled_bytes_is_refused_unread(
    blob: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError):
        bytes_from_pickle(blob)
    assert "must never run" not in capsys.readouterr().out
