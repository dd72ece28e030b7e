"""The Ray face's pure logic: actor records, method tables, the value allow-list, envelopes,
content IDs, byte ranges and the object store. No Ray, no network."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lattica_ray.ray.errors import (
    ActorNotFound,
    MethodNotExported,
    RemoteActorError,
    UnsupportedValue,
)
from lattica_ray.ray.objects import ObjectStore
from lattica_ray.ray.protocol import (
    GLOBAL_REF_TAG,
    ActorRecord,
    GlobalRef,
    content_id,
    error_envelope,
    from_wire_value,
    method_table,
    ok_envelope,
    open_envelope,
    parse_content_id,
    payload_bytes,
    split_ranges,
    to_wire_value,
)


def test_method_table_exports_public_methods_with_their_kind():
    methods = [("act", False), ("rollouts", True), ("_hidden", False), ("__init__", False)]
    assert method_table(methods) == {"act": "unary", "rollouts": "stream"}
    assert method_table(methods, ["rollouts"]) == {"rollouts": "stream"}
    with pytest.raises(MethodNotExported, match=r"cannot export \['_hidden', 'nope'\]"):
        method_table(methods, ["_hidden", "nope"])


def test_actor_record_round_trip_and_validation():
    record = ActorRecord("policy", "lab", "12D3KooWpeer", {"act": "unary", "roll": "stream"})
    assert ActorRecord.from_wire(record.to_wire()) == record
    with pytest.raises(MethodNotExported, match="exported: \\['act', 'roll'\\]"):
        record.kind_of("train")
    for bad, message in [
        ([], "must be a mapping"),
        ({"name": "x", "cluster": "c", "owner": "o"}, "lacks 'methods'"),
        ({"name": "", "cluster": "c", "owner": "o", "methods": {}}, "name must be"),
        ({"name": "x", "cluster": "c", "owner": "o", "methods": {"m": "pickle"}}, "methods"),
    ]:
        with pytest.raises(ValueError, match=message):
            ActorRecord.from_wire(bad)


def test_allowed_values_pass_and_global_refs_are_tagged():
    ref = GlobalRef(content_id(b"w"), 1, ("peer",))
    value = {
        "a": np.zeros((2, 2), dtype=np.float32),
        "s": np.float64(1.5),
        "t": pa.table({"x": [1, 2]}),
        "nested": [1, "two", b"3", None, True, (4.0, ref)],
    }
    wire = to_wire_value(value)
    assert wire["nested"][5][1] == {GLOBAL_REF_TAG: [ref.cid, 1, ["peer"]]}
    back = from_wire_value(wire)
    assert back["nested"][5][1] == ref and back["a"] is value["a"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"f": print}, r"value\['f'\]: a builtins.builtin_function_or_method"),
        ([np.array([object()])], r"value\[0\]: a numpy.ndarray"),
        ({1: "x"}, "dict key 1 is not a str"),
        ({GLOBAL_REF_TAG: 1}, "is reserved"),
        (2**70, "does not fit in 64 bits"),
        ({1, 2}, "a builtins.set cannot cross clusters"),
    ],
)
def test_unsupported_values_are_refused_with_where_they_are(value, message):
    with pytest.raises(UnsupportedValue, match=message):
        to_wire_value(value)


def test_nesting_is_limited():
    deep: list = []
    for _ in range(10):
        deep = [deep]
    with pytest.raises(UnsupportedValue, match="deeper than 5"):
        to_wire_value(deep, max_depth=5)


def test_kept_values_pass_through_unchecked():
    marker = object()
    assert to_wire_value([marker], keep=lambda v: v is marker) == [marker]


def test_forged_global_refs_are_refused():
    with pytest.raises(ValueError, match="malformed global reference"):
        from_wire_value({GLOBAL_REF_TAG: ["bafk", -1, []]})
    with pytest.raises(ValueError, match="not a raw sha2-256 CIDv1"):
        from_wire_value({GLOBAL_REF_TAG: ["baaaa", 1, []]})


def test_payload_bytes_counts_array_data():
    assert payload_bytes([np.zeros(1000, dtype=np.float64), b"xy", {"k": "abc"}]) == 8005


def test_envelopes():
    assert open_envelope(ok_envelope([1])) == [1]
    with pytest.raises(RemoteActorError) as info:
        open_envelope(error_envelope("KeyError", "'w'", "Traceback..."), actor="p", method="m")
    assert (info.value.remote_type, info.value.actor) == ("KeyError", "p")
    assert "p.m raised KeyError: 'w'\n--- remote traceback ---\nTraceback..." in str(info.value)
    with pytest.raises(ActorNotFound, match="gone"):
        open_envelope(error_envelope("ActorNotFound", "gone"))
    with pytest.raises(RemoteActorError, match="malformed reply envelope"):
        open_envelope({"ok": 1, "error": 2})


def test_errors_pickle_with_their_fields():
    error = RemoteActorError.of("ValueError", "bad", "tb", actor="p", method="m", cluster="c")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is RemoteActorError and str(copy) == str(error)
    assert (copy.remote_type, copy.cluster) == ("ValueError", "c")


@given(st.binary(max_size=256))
def test_content_id_round_trip(data):
    cid = content_id(data)
    assert cid.startswith("bafkrei")
    assert len(parse_content_id(cid)) == 32


@given(st.integers(0, 10_000), st.integers(1, 3000))
def test_ranges_cover_the_object_exactly(size, chunk):
    ranges = split_ranges(size, chunk)
    assert sum(length for _, length in ranges) == size
    assert all(0 < length <= chunk for _, length in ranges)
    assert [offset for offset, _ in ranges] == list(range(0, size, chunk))


def test_object_store_evicts_cached_objects_but_never_pinned_ones():
    store = ObjectStore(cache_bytes=250)
    store.add("own", b"o" * 500, pinned=True)
    store.add("c1", b"1" * 100, pinned=False)
    store.add("c2", b"2" * 100, pinned=False)
    store.get("c1")  # c1 is now the most recently used
    assert store.add("c3", b"3" * 100, pinned=False) == ["c2"]
    assert "own" in store and "c1" in store and "c3" in store
    assert store.cached_bytes == 200
    assert store.read("own", 10, 5, max_length=64) == b"ooooo"
    with pytest.raises(ValueError, match="outside the object"):
        store.read("own", 499, 2, max_length=64)
    with pytest.raises(ValueError, match="exceeds the limit of 64"):
        store.read("own", 0, 65, max_length=64)
