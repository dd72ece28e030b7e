"""The Yjs update decoder against what pycrdt really produces, and against garbage."""

from __future__ import annotations

import pycrdt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, Text

from lattica_ray.view.errors import MalformedUpdate
from lattica_ray.view.yupdate import (
    CONTENT_ANY,
    CONTENT_DELETED,
    CONTENT_STRING,
    CONTENT_TYPE,
    ItemId,
    decode_state_vector,
    decode_update,
)


def capture(doc: Doc) -> list[bytes]:
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(event.update))
    return updates


def test_map_set_overwrite_and_delete() -> None:
    doc = Doc(client_id=7)
    updates = capture(doc)
    root = doc.get("members", type=Map)
    root["a"] = "one"
    root["a"] = "two"
    del root["a"]

    first = decode_update(updates[0])
    (item,) = first.structs
    assert (item.client, item.clock, item.length, item.content) == (7, 0, 1, CONTENT_ANY)
    assert (item.parent_name, item.parent_sub, item.origin) == ("members", "a", None)
    assert first.delete_set == {}

    second = decode_update(updates[1])
    (item,) = second.structs
    assert item.origin == ItemId(7, 0)  # overwriting builds on the old value
    assert item.parent_name is None and item.parent_sub is None  # implied by the origin
    assert second.delete_set == {7: [(0, 1)]}

    third = decode_update(updates[2])
    assert third.structs == [] and third.delete_set == {7: [(1, 1)]}


def test_text_length_counts_utf16_units_and_nested_types_are_seen() -> None:
    doc = Doc(client_id=9)
    updates = capture(doc)
    text = doc.get("notes", type=Text)
    text += "a😀b"  # the emoji is two UTF-16 code units
    root = doc.get("members", type=Map)
    root["nested"] = Map({"x": 1})

    (chars,) = decode_update(updates[0]).structs
    assert (chars.content, chars.length) == (CONTENT_STRING, 4)
    structs = decode_update(updates[1]).structs
    assert structs[0].content == CONTENT_TYPE and structs[0].parent_sub == "nested"
    assert structs[1].parent_id == ItemId(9, 4)  # the nested map's entry names its parent item


values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)

operations = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.sampled_from("abc"), values),
        st.tuples(st.just("del"), st.sampled_from("abc"), st.none()),
        st.tuples(st.just("text"), st.text(max_size=5), st.none()),
        st.tuples(st.just("push"), values, st.none()),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(operations)
def test_clock_ranges_match_pycrdt(ops: list[tuple[str, object, object]]) -> None:
    """Whatever pycrdt writes, our decoder finds the same clock ranges as pycrdt's own state."""
    doc = Doc(client_id=123456789012345)
    updates = capture(doc)
    root = doc.get("m", type=Map)
    text = doc.get("t", type=Text)
    array = doc.get("a", type=Array)
    for op, a, b in ops:
        if op == "set":
            root[a] = b
        elif op == "del":
            if a in root:
                del root[a]
        elif op == "text":
            text += a
        else:
            array.append(a)
    next_clock = 0
    for update in updates:  # each transaction continues exactly where the previous one ended
        decoded = decode_update(update)
        ranges = decoded.clock_ranges()
        if ranges:
            assert list(ranges) == [doc.client_id]
            start, end = ranges[doc.client_id]
            assert start == next_clock
            next_clock = end
        for clock, length in (r for ranges in decoded.delete_set.values() for r in ranges):
            assert 0 <= clock and clock + length <= next_clock
    if next_clock:
        assert decode_state_vector(pycrdt.get_state(doc.get_update())) == {
            doc.client_id: next_clock
        }
    whole = decode_update(doc.get_update())
    assert {c: e for c, (_, e) in whole.clock_ranges().items()} == decode_state_vector(
        doc.get_state()
    )
    assert all(s.content != CONTENT_DELETED or s.length > 0 for s in whole.structs)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_raises_only_malformed_update(data: bytes) -> None:
    try:
        decode_update(data)
    except MalformedUpdate:
        pass


def test_every_truncation_of_a_real_update_is_refused() -> None:
    doc = Doc(client_id=5)
    updates = capture(doc)
    doc.get("members", type=Map)["key"] = {"nested": [1, 2.5, "x", None, True]}
    update = updates[0]
    for cut in range(len(update)):
        with pytest.raises(MalformedUpdate):
            decode_update(update[:cut])
    with pytest.raises(MalformedUpdate):
        decode_update(update + b"\x00")
