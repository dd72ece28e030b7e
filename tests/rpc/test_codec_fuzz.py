"""Fuzzing the decoder: mutated encodings (truncated, bit-flipped, overwritten, re-framed, with
edited trees) are either refused with a CodecError or decode to values that are safe to use:
every array lies inside the message (or in memory the decoder allocated), every Arrow value
passes full validation, and reading all of it does not crash."""

from __future__ import annotations

import json
import math
import os
import struct
import time
from unittest import mock

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lattica_ray.rpc import codec
from lattica_ray.rpc.codec import CodecError, CodecLimits, decode, encode

try:
    import torch
except ImportError:  # torch is optional
    torch = None

# A longer campaign: CODEC_FUZZ_EXAMPLES=50000 pytest tests/rpc/test_codec_fuzz.py
EXAMPLES = int(os.environ.get("CODEC_FUZZ_EXAMPLES", "1000"))
# Small enough that touching every element of a decoded (possibly broadcast) array is cheap.
LIMITS = CodecLimits(max_array_elements=1 << 20, max_message_bytes=1 << 24)
HEADER = struct.Struct("<4sBBHII")
EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # Arrow IPC end-of-stream marker
INTERESTING = [0, 1, -1, 2, 7, 8, 16, 63, 64, 255, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63,
               -(2**63), 2**64, 10**30]  # fmt: skip


def seed_values() -> list[object]:
    table = pa.table(
        {
            "i": pa.array([1, None, 3], pa.int32()),
            "s": ["a", None, "ccc"],
            "l": pa.array([[1, 2], None, []], pa.list_(pa.int8())),
            "d": pa.array(["x", "y", "x"]).dictionary_encode(),
            "st": pa.array([{"f": 1.5}, None, {"f": -0.0}]),
        }
    )
    seeds: list[object] = [
        {
            "a": np.arange(12, dtype=np.float32).reshape(3, 4).T,
            "b": [1, -2.5, None, True, "str", b"bytes", (np.float64(1.0),), math.nan, 2**70],
            "c": np.zeros((0, 3)),
            "d": bytearray(b"xy"),
            "e": np.broadcast_to(np.arange(3, dtype=np.int16), (4, 3))[:, ::-1],
        },
        {"table": table, "array": pa.array(["p", None, "r"])[1:], "batch": table.to_batches()[0]},
        {
            "chunked": pa.chunked_array([[1, 2], [3]]),
            "u": np.array(["ab", "c"]),
            "M": np.arange(2).astype("M8[s]"),
        },
        [1, "x", {"k": (1, 2), 3: None}, -(2**80), "\u2603" * 1100],
    ]  # fmt: skip
    if torch is not None:
        seeds.append(
            {
                "bf": torch.linspace(0, 1, 5, dtype=torch.bfloat16),
                "w": torch.arange(6.0).reshape(2, 3).t(),
                "x": torch.tensor([1, 2]).expand(3, 2),
            }
        )
    return seeds


def arrow_data_seed(value: object) -> bytes:
    """`value` encoded with its data blocks as an Arrow IPC stream, as large messages are."""
    with mock.patch.object(codec, "RAW_DATA_MAX", 0):
        message = b"".join(encode(value))
    assert message[5] == codec.FLAG_DATA_STREAM
    return message


# Small data blocks travel in the compact raw section; the Arrow data stream is fuzzed too.
SEEDS = [b"".join(encode(value)) for value in seed_values()]
SEEDS.append(arrow_data_seed(seed_values()[0]))


def split(message: bytes) -> tuple[int, object, list[bytes]] | None:
    """Flags, tree and streams of a message, or None if its framing is already broken."""
    try:
        _, _, flags, _, tree_length, count = HEADER.unpack_from(message)
        lengths = struct.unpack_from(f"<{count}Q", message, HEADER.size)
        tree_start = HEADER.size + 8 * count
        tree = json.loads(message[tree_start : tree_start + tree_length])
        position = tree_start + tree_length + (-tree_length % 8)
    except (struct.error, ValueError, MemoryError, OverflowError):
        return None
    streams = []
    for length in lengths:
        streams.append(message[position : position + length])
        position += length
    return flags, tree, streams


def join(flags: int, tree: object, streams: list[bytes]) -> bytes:
    text = json.dumps(tree).encode()
    header = HEADER.pack(b"LRAC", 1, flags, 0, len(text), len(streams))
    header += b"".join(struct.pack("<Q", len(stream)) for stream in streams)
    return header + text + bytes(-len(text) % 8) + b"".join(streams)


def tree_slots(node: object, found: list[tuple[list, int]]) -> list[tuple[list, int]]:
    """Every (list, index) in the tree that holds a number or a string."""
    if isinstance(node, list):
        for index, item in enumerate(node):
            if isinstance(item, list):
                tree_slots(item, found)
            else:
                found.append((node, index))
    return found


def mutate_bytes(draw: st.DrawFn, data: bytearray) -> bytearray:
    """One random edit of `data`: truncate, flip bits, overwrite, insert or delete bytes."""
    size = len(data)
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "insert", "delete", "int"]))
    if kind == "insert" or not size:
        position = draw(st.integers(0, size))
        data[position:position] = draw(st.binary(min_size=1, max_size=16))
    elif kind == "truncate":
        del data[draw(st.integers(0, size - 1)) :]
    elif kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, size - 1))] ^= 1 << draw(st.integers(0, 7))
    elif kind == "overwrite":
        position = draw(st.integers(0, size - 1))
        patch = draw(st.binary(min_size=1, max_size=16))
        data[position : position + len(patch)] = patch
    elif kind == "delete":
        position = draw(st.integers(0, size - 1))
        del data[position : position + draw(st.integers(1, 16))]
    else:  # an interesting little-endian integer where a length or offset may be
        position = draw(st.integers(0, size - 1))
        width = draw(st.sampled_from([2, 4, 8]))
        value = draw(st.sampled_from(INTERESTING)) % (1 << (8 * width))
        data[position : position + width] = value.to_bytes(width, "little")
    return data


def mutate_tree(draw: st.DrawFn, tree: object) -> object:
    """Replace one number or string in the value tree (shapes, strides, indices, dtypes, tags)."""
    slots = tree_slots(tree, [])
    if slots:
        holder, index = draw(st.sampled_from(slots))
        holder[index] = draw(
            st.sampled_from(INTERESTING)
            | st.sampled_from(["<f4", "|O", "<c16", "L", "D", "N", "bfloat16", "", "x" * 9])
            | st.lists(st.sampled_from(INTERESTING), max_size=3)
        )
    return tree


@st.composite
def mutated_messages(draw: st.DrawFn) -> bytes:
    """A seed with one to three edits, mostly inside one part with the framing kept consistent
    (so the edit reaches the Arrow reader and the validators), sometimes anywhere."""
    seed = draw(st.sampled_from(SEEDS))
    flags, tree, streams = split(seed)
    streams = [bytearray(stream) for stream in streams]
    raw = None
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from(["stream", "stream", "stream", "tree", "order", "raw"]))
        if target == "stream" and streams:
            index = draw(st.integers(0, len(streams) - 1))
            streams[index] = mutate_bytes(draw, streams[index])
        elif target == "tree":
            tree = mutate_tree(draw, tree)
        elif target == "order" and len(streams) > 1:
            streams = draw(st.permutations(streams))
        elif target == "raw":
            raw = mutate_bytes(draw, bytearray(join(flags, tree, streams)))
    return bytes(raw) if raw is not None else join(flags, tree, streams)


def assert_safe(value: object, message: bytes) -> None:
    """Everything decoded lies in memory we may read, and reading all of it works."""
    start = np.frombuffer(message, np.uint8).ctypes.data
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, np.ndarray):
            low, high = np.lib.array_utils.byte_bounds(item)
            if item.size and not start <= low <= high <= start + len(message):
                owner = item
                while isinstance(owner.base, np.ndarray):
                    owner = owner.base
                assert owner.flags.owndata, "array outside the message over foreign memory"
                owner_low, owner_high = np.lib.array_utils.byte_bounds(owner)
                assert owner_low <= low <= high <= owner_high
            item.tobytes()  # read every element
        elif torch is not None and isinstance(item, torch.Tensor):
            item.clone()
        elif isinstance(item, pa.Array | pa.ChunkedArray | pa.RecordBatch | pa.Table):
            item.validate(full=True)
            if len(item) <= 10_000:
                item.to_pylist() if not isinstance(item, pa.Table | pa.RecordBatch) else (
                    item.to_pydict()
                )


def decode_safely(message: bytes) -> None:
    try:
        value = decode(message, limits=LIMITS)
    except CodecError:
        return
    assert_safe(value, message)


def test_the_seeds_decode() -> None:
    for message in SEEDS:
        assert_safe(decode(message, limits=LIMITS), message)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutated_messages())
def test_mutated_messages_are_refused_or_safe(message: bytes) -> None:
    decode_safely(message)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_are_refused(message: bytes) -> None:
    with pytest.raises(CodecError):
        decode(message, limits=LIMITS)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([s for s in SEEDS if split(s)[2]]), st.binary(min_size=1, max_size=512))
def test_random_bytes_behind_a_valid_header_are_refused(seed: bytes, tail: bytes) -> None:
    parts = split(seed)
    assert parts is not None
    flags, tree, streams = parts
    with pytest.raises(CodecError):
        decode(join(flags, tree, [tail] * len(streams)), limits=LIMITS)


@pytest.mark.parametrize("seed", range(len(SEEDS)))
def test_every_truncation_is_refused(seed: int) -> None:
    message = SEEDS[seed]
    for length in range(len(message)):
        with pytest.raises(CodecError):
            decode(message[:length], limits=LIMITS)


@pytest.mark.parametrize("seed", range(len(SEEDS)))
def test_every_truncated_stream_is_refused_or_safe(seed: int) -> None:
    """Truncations inside one Arrow stream, with the framing fixed up so the reader sees them."""
    flags, tree, streams = split(SEEDS[seed])
    for index, stream in enumerate(streams):
        for length in range(len(stream)):
            cut = stream[:length]
            with pytest.raises(CodecError):
                decode(join(flags, tree, [*streams[:index], cut, *streams[index + 1 :]]))
            patched = [*streams[:index], cut + EOS, *streams[index + 1 :]]
            decode_safely(join(flags, tree, patched))  # may end at a message boundary


@pytest.mark.parametrize("seed", [0, 1, -1], ids=["numpy", "arrow", "numpy-arrow-data"])
def test_every_single_bit_flip_is_refused_or_safe(seed: int) -> None:
    message = SEEDS[seed]
    slowest = 0.0
    for position in range(len(message)):
        for bit in range(8):
            flipped = bytearray(message)
            flipped[position] ^= 1 << bit
            began = time.perf_counter()
            decode_safely(bytes(flipped))
            slowest = max(slowest, time.perf_counter() - began)
    assert slowest < 2.0, f"a one-bit flip made decoding take {slowest:.2f} s"
