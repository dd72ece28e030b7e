"""The Arrow codec on chosen values: round trips, zero-copy views, what is refused and why."""

from __future__ import annotations

import json
import math
import struct
from collections import OrderedDict, namedtuple
from enum import IntEnum

import numpy as np
import pyarrow as pa
import pytest

from lattica_ray.rpc.codec import (
    CodecError,
    CodecLimits,
    LimitExceeded,
    MalformedMessage,
    UnsupportedType,
    decode,
    encode,
)

try:
    import torch
except ImportError:  # torch is optional; its tests skip
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")


def roundtrip(value: object) -> object:
    return decode(bytearray(b"".join(encode(value))))


def craft(tree: list, streams: list[bytes] = (), *, flags: int | None = None) -> bytes:
    """A message with this tree and these Arrow streams, built by hand (for hostile cases)."""
    text = json.dumps(tree).encode()
    if flags is None:
        flags = 1 if streams else 0
    header = struct.pack("<4sBBHII", b"LRAC", 1, flags, 0, len(text), len(streams))
    header += b"".join(struct.pack("<Q", len(s)) for s in streams)
    return header + text + bytes(-len(text) % 8) + b"".join(streams)


def arrow_stream(schema: pa.Schema, batches: list[pa.RecordBatch], **options: object) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema, options=pa.ipc.IpcWriteOptions(**options)) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def data_stream(*blocks: bytes) -> bytes:
    """The data stream the codec writes: one row; per block a pad column "" and the block "<i>"."""
    columns, names = [], []
    for index, block in enumerate(blocks):
        columns += [pa.array([b""], pa.large_binary()), pa.array([block], pa.large_binary())]
        names += ["", str(index)]
    batch = pa.record_batch(columns, names=names)
    return arrow_stream(batch.schema, [batch])


def inside(value: np.ndarray, message: bytearray) -> bool:
    start = np.frombuffer(message, np.uint8).ctypes.data
    low, high = np.lib.array_utils.byte_bounds(value)
    return start <= low <= high <= start + len(message)


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -1,
        2**64 + 1,
        -(10**300),
        0.5,
        -0.0,
        math.inf,
        -math.inf,
        "",
        "héllo \u2603 \ud800",  # a lone surrogate survives
        b"",
        b"\x00\xff bytes",
        bytearray(b"mutable"),
        [],
        (),
        {},
        [1, [2, [3, []]]],
        (1, (2,), ()),
        {"a": 1, 2: "b", 3.5: None, None: 0, True: 1, b"k": 2, ("t", 1): 3},
        {"nested": {"list": [1, 2.0, "3", b"4", None, (5,)]}},
    ],
)
def test_plain_values_round_trip_with_their_types(value: object) -> None:
    out = roundtrip(value)
    assert out == value
    assert type(out) is type(value)
    assert repr(out) == repr(value)  # keeps -0.0 apart from 0.0, tuples apart from lists


@pytest.mark.parametrize("text", ["a" * 5000, "\u2603\ud800" * 3000, "x" * 1025])
def test_long_strings_round_trip_as_blocks(text: str) -> None:
    message = b"".join(encode({text: [text]}))
    assert len(message) < 3 * len(text.encode("utf-8", "surrogatepass")) + 2048
    assert decode(message) == {text: [text]}


def test_a_long_string_block_must_be_utf8() -> None:
    with pytest.raises(MalformedMessage, match="utf-8"):
        decode(craft([["S", 0]], [data_stream(b"\xff" * 2000)]))


def test_encoded_buffers_keep_their_arrays_alive() -> None:
    import gc

    buffers = encode([np.arange(100_000, dtype=np.int64)[::-1], np.full((300, 300), 7.0)])
    gc.collect()
    garbage = [np.ones(100_000, np.int64) for _ in range(20)]  # reuse freed memory, if any
    out = decode(b"".join(buffers))
    assert out[0].tolist() == list(range(99_999, -1, -1))
    assert (out[1] == 7.0).all()
    del garbage


def test_nan_round_trips() -> None:
    out = roundtrip([math.nan])
    assert math.isnan(out[0])


def test_subclasses_arrive_as_their_base_type() -> None:
    class Colour(IntEnum):
        RED = 1

    point = namedtuple("point", "x y")
    value = {"ordered": OrderedDict(a=1), "enum": Colour.RED, "point": point(1, 2)}
    out = roundtrip(value)
    assert out == {"ordered": {"a": 1}, "enum": 1, "point": (1, 2)}
    assert type(out["ordered"]) is dict and type(out["enum"]) is int and type(out["point"]) is tuple


def test_deep_nesting_does_not_recurse() -> None:
    limits = CodecLimits(max_depth=5000)
    deep: list = []
    for _ in range(4000):  # deeper than Python's recursion limit
        deep = [deep]
    out = decode(b"".join(encode(deep, limits=limits)), limits=limits)
    for _ in range(4000):
        assert type(out) is list and len(out) == 1
        out = out[0]
    assert out == []


# --------------------------------------------------------------------------- numpy


DTYPES = [
    "?",
    "i1",
    "u1",
    "<i2",
    "<u2",
    "<i4",
    "<u4",
    "<i8",
    "<u8",
    ">i4",
    ">f8",
    "<f2",
    "<f4",
    "<f8",
    "<c8",
    "<c16",
    "<M8[ns]",
    "<M8[D]",
    "<m8[10s]",
    "S3",
    "<U4",
]


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_supported_dtype_round_trips_bitwise(dtype: str) -> None:
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=np.dtype(dtype).itemsize * 6, dtype=np.uint8)
    if np.dtype(dtype).kind == "U":  # valid code points only
        raw = np.frombuffer(np.array(["abcd", "é", "", "xyz", "\u2603", "q"]).tobytes(), np.uint8)
    value = raw.view(dtype).reshape(2, 3)
    out = roundtrip(value)
    assert out.dtype == value.dtype and out.dtype.str == value.dtype.str
    assert out.shape == value.shape and out.strides == value.strides
    assert out.tobytes() == value.tobytes()


@pytest.mark.parametrize(
    "make",
    [
        lambda a: a,
        lambda a: np.asfortranarray(a),
        lambda a: a.T,
        lambda a: a.transpose(2, 0, 1),
        lambda a: a[::-1, :, ::-1],
        lambda a: a[1:2],
        lambda a: np.broadcast_to(a[:1, :1], (5, 3, 4)),
        lambda a: np.lib.stride_tricks.sliding_window_view(a.ravel(), 5),
        lambda a: a[0, 0, 0, ...],  # 0-d view
        lambda a: a[:0],
        lambda a: np.zeros((0, 3, 0), np.float32),
    ],
    ids=["C", "F", "T", "perm", "flip", "slab", "broadcast", "window", "0d", "empty", "empty2"],
)
def test_gap_free_layouts_keep_their_exact_strides_as_views(make) -> None:
    base = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    value = make(base)
    message = bytearray(b"".join(encode(value)))
    out = decode(message)
    assert out.dtype == value.dtype and out.shape == value.shape
    assert out.strides == value.strides
    assert np.array_equal(out, value)
    if out.size:
        assert inside(out, message), "the array is not a view over the message"


@pytest.mark.parametrize(
    ("make", "strides"),
    [
        (lambda a: a[:, ::2], (12, 4)),  # every other column of a C array: dense, C order
        (lambda a: np.asfortranarray(a)[::2], (4, 8)),  # F order survives compaction
        (lambda a: a[::-2], (-24, 4)),  # a reversed axis stays reversed
        (lambda a: np.broadcast_to(a[:, None, ::2], (4, 5, 3)), (12, 0, 4)),  # broadcast stays
    ],
    ids=["columns", "fortran", "reversed", "broadcast"],
)
def test_views_with_gaps_are_compacted_keeping_axis_order(make, strides) -> None:
    base = np.arange(4 * 6, dtype=np.float32).reshape(4, 6)
    value = make(base)
    out = roundtrip(value)
    assert out.strides == strides
    assert np.array_equal(out, value)


def test_views_with_gaps_do_not_leak_the_bytes_between_elements() -> None:
    base = np.zeros((8, 16), np.uint8)
    base[:, 1:] = np.frombuffer(b"SECRET-PATTERN!", np.uint8)  # everything but column 0
    column = base[:, 0]
    assert not column.flags.contiguous
    message = b"".join(encode(column))
    assert b"SECRET" not in message
    assert decode(message).tolist() == [0] * 8


def test_64_mib_array_is_sent_and_received_without_a_copy() -> None:
    value = np.ones(16 << 20, np.float32)
    buffers = encode(value)
    assert any(np.shares_memory(np.frombuffer(b, np.uint8), value) for b in buffers)
    assert sum(len(b) for b in buffers) < value.nbytes + 4096
    assert len(buffers[0]) < 4096  # headers first
    message = bytearray(b"".join(buffers))
    out = decode(message)
    assert np.shares_memory(out, np.frombuffer(message, np.uint8))
    assert (out.ctypes.data - np.frombuffer(message, np.uint8).ctypes.data) % 64 == 0
    assert out.flags.writeable
    out[0] = 5  # writes land in the receive buffer
    assert decode(message)[0] == 5


def test_every_block_starts_64_byte_aligned_in_the_message() -> None:
    value = [np.arange(n, dtype=np.uint8) for n in (1, 7, 13, 64, 65, 1000)]
    value += [np.zeros(3, np.complex128), b"xyz", np.arange(5, dtype=np.float32)[::-1]]
    message = bytearray(b"".join(encode(value)))
    start = np.frombuffer(message, np.uint8).ctypes.data
    out = decode(message)
    for array in [*out[:-2], out[-1]]:  # all but the bytes
        low, _ = np.lib.array_utils.byte_bounds(array)
        assert (low - start) % 64 == 0


@pytest.mark.parametrize("misalignment", [1, 4, 8])
def test_a_misaligned_message_still_gives_aligned_arrays(misalignment: int) -> None:
    value = {"c": np.arange(6, dtype=np.complex128).reshape(2, 3).T, "f": np.arange(4.0)}
    message = b"".join(encode(value))
    buffer = bytearray(len(message) + misalignment)
    buffer[misalignment:] = message
    out = decode(memoryview(buffer)[misalignment:])
    for key, array in value.items():
        assert out[key].strides == array.strides and np.array_equal(out[key], array)
        assert out[key].ctypes.data % out[key].dtype.alignment == 0
        assert out[key].ctypes.data % min(out[key].itemsize, 16) == 0


@needs_torch
def test_a_misaligned_message_gives_torch_tensors_safe_to_compute_with() -> None:
    value = torch.arange(6, dtype=torch.float64).reshape(2, 3).to(torch.complex128)
    message = b"".join(encode(value))
    buffer = bytearray(len(message) + 8)
    buffer[8:] = message
    out = decode(memoryview(buffer)[8:])
    assert out.data_ptr() % 16 == 0
    assert torch.equal(out.clone(), value)  # copying a misaligned complex128 tensor segfaults


def test_arrays_over_read_only_messages_are_read_only() -> None:
    out = decode(b"".join(encode(np.arange(4))))
    assert not out.flags.writeable


def test_numpy_scalars_keep_their_type() -> None:
    value = [np.float32(1.5), np.int8(-3), np.datetime64("2020-01-01", "D"), np.str_("x")]
    out = roundtrip(value)
    assert [type(v) for v in out] == [type(v) for v in value]
    assert out == value


def test_memmap_arrives_as_a_plain_array(tmp_path) -> None:
    mapped = np.memmap(tmp_path / "m", np.int32, "w+", shape=(3,))
    mapped[:] = [1, 2, 3]
    out = roundtrip(mapped)
    assert type(out) is np.ndarray and out.tolist() == [1, 2, 3]


@pytest.mark.parametrize(
    "value",
    [
        np.array([object()], dtype=object),
        np.zeros(2, dtype=[("a", "i4"), ("b", "f4")]),
        np.zeros(2, np.longdouble),
        np.ma.masked_array([1, 2], mask=[0, 1]),
        {1, 2},
        object(),
        memoryview(b"x"),
        {frozenset(): 1},
    ],
    ids=["object", "structured", "longdouble", "masked", "set", "object()", "memoryview", "key"],
)
def test_unsupported_values_are_refused_never_pickled(value: object) -> None:
    with pytest.raises(UnsupportedType):
        encode(value)


# --------------------------------------------------------------------------- torch


def same_tensor(got, expected) -> bool:
    """Bitwise equality (also for dtypes without comparison kernels, like complex32)."""
    expected = expected.detach().resolve_conj().resolve_neg()
    as_bytes = lambda t: t.reshape(-1).contiguous().view(torch.uint8)  # noqa: E731
    return got.dtype == expected.dtype and torch.equal(as_bytes(got), as_bytes(expected))


@needs_torch
@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_torch_tensors_round_trip_as_zero_copy_tensors() -> None:
    value = {
        "w": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),
        "bf": torch.linspace(-2, 2, 7, dtype=torch.bfloat16),
        "f8": torch.tensor([0.5, -1.0]).to(torch.float8_e4m3fn),
        "expand": torch.tensor([1, 2, 3]).expand(4, 3),
        "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(3.0, dtype=torch.float64),
        "grad": torch.ones(2, requires_grad=True),
        "conj": torch.tensor([1 + 2j]).conj(),
        "c32": torch.ones(2, dtype=torch.complex32),
        "u16": torch.tensor([65535], dtype=torch.uint16),
    }
    message = bytearray(b"".join(encode(value)))
    out = decode(message)
    start = np.frombuffer(message, np.uint8).ctypes.data
    for key, tensor in value.items():
        got = out[key]
        assert isinstance(got, torch.Tensor), key
        assert got.shape == tensor.shape and got.stride() == tensor.stride(), key
        assert same_tensor(got, tensor), key
        assert start <= got.data_ptr() < start + len(message), key
    assert not out["grad"].requires_grad


@needs_torch
def test_encoded_buffers_keep_temporary_tensors_alive() -> None:
    import gc

    buffers = encode(torch.arange(50_000, dtype=torch.float32).to(torch.bfloat16)[::2])
    gc.collect()
    out = decode(b"".join(buffers))
    assert out.dtype == torch.bfloat16 and out.shape == (25_000,)
    assert torch.equal(out, torch.arange(0, 50_000, 2, dtype=torch.float32).to(torch.bfloat16))


@needs_torch
def test_torch_tensor_with_gaps_is_compacted() -> None:
    value = torch.arange(24, dtype=torch.int16).reshape(4, 6)[:, ::3]
    out = roundtrip(value)
    assert out.stride() == (2, 1) and torch.equal(out, value)


@needs_torch
def test_sparse_and_meta_tensors_are_refused() -> None:
    with pytest.raises(UnsupportedType):
        encode(torch.eye(2).to_sparse())
    with pytest.raises(UnsupportedType):
        encode(torch.empty(2, device="meta"))


@pytest.mark.skipif(
    torch is None or not torch.cuda.is_available(), reason="no CUDA device on this machine"
)
def test_cuda_tensors_are_copied_to_host() -> None:
    value = torch.arange(6, device="cuda").reshape(2, 3)
    out = roundtrip(value)
    assert out.device.type == "cpu" and torch.equal(out, value.cpu())


# --------------------------------------------------------------------------- pyarrow


def test_arrow_values_round_trip() -> None:
    table = pa.table(
        {"a": [1, 2, None], "s": ["x", None, "zz"], "l": [[1], [], None]},
        metadata={"origin": "test"},
    )
    chunked = pa.chunked_array([[1, 2], [], [3]], pa.int16())
    value = {
        "table": pa.concat_tables([table, table]),
        "batch": table.to_batches()[0],
        "array": pa.array(["a", "b", "a"]).dictionary_encode(),
        "sliced": pa.array(range(10))[3:7],
        "chunked": chunked,
        "empty": pa.table({"x": pa.array([], pa.float32())}),
        "struct": pa.array([{"x": 1, "y": [1.5]}]),
    }
    out = roundtrip(value)
    for key, item in value.items():
        assert type(out[key]) is type(item), key
        assert out[key].equals(item), key
    assert out["table"].schema.metadata == {b"origin": b"test"}
    assert out["table"].num_rows == 6 and out["chunked"].num_chunks == 3


# --------------------------------------------------------------------------- limits


@pytest.mark.parametrize(
    ("value", "limits"),
    [
        (np.zeros(100, np.uint8), CodecLimits(max_message_bytes=64)),
        ([[[[]]]], CodecLimits(max_depth=3)),
        (list(range(10)), CodecLimits(max_nodes=5)),
        ([b"a", b"b", b"c"], CodecLimits(max_buffers=2)),
        ("x" * 11, CodecLimits(max_string_length=10)),
        ("é" * 2000, CodecLimits(max_string_length=1500)),  # a long str travels as a block
        (["x"] * 100, CodecLimits(max_tree_bytes=100)),
        (np.zeros((1,) * 5), CodecLimits(max_ndim=4)),
        (np.broadcast_to(np.zeros(1), (10, 10)), CodecLimits(max_array_elements=99)),
    ],
    ids=["size", "depth", "nodes", "buffers", "string", "long", "tree", "ndim", "elements"],
)
def test_limits_apply_on_both_sides(value: object, limits: CodecLimits) -> None:
    with pytest.raises(LimitExceeded):
        encode(value, limits=limits)
    message = b"".join(encode(value))
    with pytest.raises(LimitExceeded) as caught:
        decode(message, limits=limits)
    assert "CodecLimits." in str(caught.value)


def test_int_digit_limit() -> None:
    message = b"".join(encode(10**50))
    assert decode(message) == 10**50
    with pytest.raises(LimitExceeded):
        decode(message, limits=CodecLimits(max_int_digits=50))
    assert decode(message, limits=CodecLimits(max_int_digits=51)) == 10**50


def test_a_reference_cycle_is_caught_by_the_depth_limit() -> None:
    cycle: list = []
    cycle.append(cycle)
    with pytest.raises(LimitExceeded):
        encode(cycle)


def test_limits_reject_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        CodecLimits(max_depth=0)
    with pytest.raises(ValueError):
        CodecLimits(max_buffer=3)  # typo: unknown setting


# --------------------------------------------------------------------------- hostile messages


def test_crafted_helper_builds_what_the_codec_accepts() -> None:
    assert decode(craft([["L", 2], 1, "x"])) == [1, "x"]
    block = np.arange(3, dtype="<i4").tobytes()
    out = decode(craft([["N", 0, "<i4", [3], [4]]], [data_stream(block)]))
    assert out.tolist() == [0, 1, 2]


ARRAY_BLOCK = data_stream(np.arange(6, dtype="<f4").tobytes())


@pytest.mark.parametrize(
    ("tree", "streams", "needle"),
    [
        ([["N", 0, "<f4", [7], [4]]], [ARRAY_BLOCK], "spans 28 bytes"),
        ([["N", 0, "<f4", [6], [8]]], [ARRAY_BLOCK], "leave gaps"),
        ([["N", 0, "<f4", [4, 2], [-8, 4]]], [ARRAY_BLOCK], "spans"),
        ([["N", 0, "<f4", [-6], [4]]], [ARRAY_BLOCK], "negative"),
        ([["N", 0, "<f4", [6], [4, 4]]], [ARRAY_BLOCK], "strides"),
        ([["N", 0, "<f4", [6], [2**70]]], [ARRAY_BLOCK], "out of range"),
        ([["N", 0, "|O", [6], [4]]], [ARRAY_BLOCK], "dtype"),
        ([["N", 0, "<M8[1ns]", [3], [8]]], [ARRAY_BLOCK], "canonical"),
        ([["N", 0, "V4", [6], [4]]], [ARRAY_BLOCK], "dtype"),
        ([["N", 1, "<f4", [6], [4]]], [ARRAY_BLOCK], "does not exist"),
        ([["L", 2], ["N", 0, "<f4", [6], [4]], ["B", 0]], [ARRAY_BLOCK], "twice"),
        ([1], [ARRAY_BLOCK], "does not use"),
        ([["P", 0, "float32", [3], [-4]]], [ARRAY_BLOCK], "spans"),
        ([["P", 0, "float32", [2], [2]]], [data_stream(bytes(6))], "whole elements"),
        ([["P", 0, "object", [6], [4]]], [ARRAY_BLOCK], "torch dtype"),
        ([["G", 0, "<f4", [6], [4]]], [ARRAY_BLOCK], "shape ()"),
        ([["X", 0]], [], "unknown node"),
        ([["L", 1]], [], "incomplete"),
        ([["L", -1]], [], "bad container"),
        ([1, 2], [], "after its root"),
        ([], [], "incomplete"),
        ([{"a": 1}], [], "unexpected node"),
        ({"a": 1}, [], "not a list"),
        ([["D", 2], "a", 1, "a", 2], [], "duplicate"),
        ([["D", 1], ["L", 0], 1], [], "dict key"),
        ([["D", 1], ["T", 1], ["L", 0], 1], [], "unhashable"),
        ([["A", 0]], [], "does not exist"),
    ],
)
def test_hostile_trees_are_refused_with_a_reason(tree, streams, needle) -> None:
    with pytest.raises(MalformedMessage, match=needle):
        decode(craft(tree, streams))


def test_compressed_arrow_streams_are_refused_before_decompression() -> None:
    if not pa.Codec.is_available("zstd"):
        pytest.skip("pyarrow built without zstd")
    batch = pa.record_batch([pa.array(np.zeros(1 << 20, np.int64))], names=["values"])
    bomb = arrow_stream(batch.schema, [batch], compression="zstd")
    assert len(bomb) < 1 << 16  # 8 MiB of zeros in a few KiB
    with pytest.raises(MalformedMessage, match="compressed"):
        decode(craft([["A", 0]], [bomb], flags=0))


def flatbuffer_message(header_type: int, header_slot: int, header_value: int) -> bytes:
    """An Arrow IPC Message flatbuffer whose header table sets one int16 field, by hand."""
    message_vtable = struct.pack("<5H", 10, 12, 0, 4, 8)  # version absent, type @4, header @8
    header_vtable = struct.pack(f"<{3 + header_slot}H", 6 + 2 * header_slot, 8,
                                *([0] * header_slot), 4)  # fmt: skip
    buffer = bytearray(64)
    struct.pack_into("<I", buffer, 0, 16)  # root: the Message table at 16
    buffer[4 : 4 + len(message_vtable)] = message_vtable
    struct.pack_into("<iBxxxI", buffer, 16, 16 - 4, header_type, 40 - 24)  # header table at 40
    buffer[28 : 28 + len(header_vtable)] = header_vtable
    struct.pack_into("<ih", buffer, 40, 40 - 28, header_value)
    return bytes(buffer)


def test_the_flatbuffer_check_sees_endianness_and_compression() -> None:
    from lattica_ray.rpc.codec_ipc import message_kind

    assert message_kind(flatbuffer_message(1, 0, 0)) == 1  # little-endian schema
    with pytest.raises(MalformedMessage, match="big-endian"):
        message_kind(flatbuffer_message(1, 0, 1))
    assert message_kind(flatbuffer_message(3, 0, 5)) == 3  # record batch, length set
    with pytest.raises(MalformedMessage, match="compressed"):
        message_kind(flatbuffer_message(3, 3, 1))  # record batch with a compression table
    with pytest.raises(MalformedMessage, match="not allowed"):
        message_kind(flatbuffer_message(4, 0, 0))  # a Tensor message
    with pytest.raises(MalformedMessage, match="outside"):
        message_kind(flatbuffer_message(1, 0, 0)[:30])


def test_arrow_field_names_must_be_utf8() -> None:
    table = pa.table({"zzname": [1]})
    stream = arrow_stream(table.schema, table.to_batches())
    broken = stream.replace(b"zzname", b"\xffzname")
    with pytest.raises(MalformedMessage, match="UTF-8"):
        decode(craft([["W", 0]], [broken], flags=0))


def test_data_stream_of_the_wrong_shape_is_refused() -> None:
    batch = pa.record_batch([pa.array([b"ab", b"cd"], pa.large_binary())], names=["0"])
    with pytest.raises(MalformedMessage, match="one row"):
        decode(craft([["B", 0]], [arrow_stream(batch.schema, [batch])]))
    batch = pa.record_batch([pa.array([b"ab"], pa.binary())], names=["0"])
    with pytest.raises(MalformedMessage, match="large_binary"):
        decode(craft([["B", 0]], [arrow_stream(batch.schema, [batch])]))


def test_arrow_leaf_streams_must_match_their_kind() -> None:
    batch = pa.record_batch([pa.array([1]), pa.array([2])], names=["a", "b"])
    two_columns = arrow_stream(batch.schema, [batch])
    with pytest.raises(MalformedMessage, match="one column"):
        decode(craft([["A", 0]], [two_columns], flags=0))
    with pytest.raises(MalformedMessage, match="exactly one batch"):
        decode(craft([["R", 0]], [arrow_stream(batch.schema, [batch, batch])], flags=0))
    assert decode(craft([["W", 0]], [two_columns], flags=0)).num_rows == 1


def test_invalid_arrow_data_is_caught_by_full_validation() -> None:
    # A string array whose offsets go backwards: legal IPC framing, invalid array.
    offsets = pa.py_buffer(struct.pack("<3i", 0, 3, 1))  # decreasing
    bad = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(b"abcd")])
    batch = pa.RecordBatch.from_arrays([bad], names=["values"])
    with pytest.raises(MalformedMessage):
        decode(craft([["A", 0]], [arrow_stream(batch.schema, [batch])], flags=0))


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda m: b"XXXX" + m[4:], "magic"),
        (lambda m: m[:4] + b"\x02" + m[5:], "version"),
        (lambda m: m[:5] + b"\x80" + m[6:], "flags"),
        (lambda m: m[:10], "shorter"),
        (lambda m: m[:-1], "announces"),
        (lambda m: m + b"\x00" * 8, "announces"),
    ],
)
def test_broken_headers_are_refused(mutate, needle) -> None:
    message = b"".join(encode({"a": np.arange(3)}))
    with pytest.raises(MalformedMessage, match=needle):
        decode(mutate(message))


def test_nothing_is_pickled_either_way(monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle used")

    for name in ("dumps", "loads", "dump", "load", "Pickler", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    value = {
        "array": np.arange(6.0).reshape(2, 3).T,
        "scalar": np.float16(2),
        "table": pa.table({"a": pa.array(["x", "y"]).dictionary_encode()}),
        "nested": [(1, 2.5, None, b"b", "s" * 2000, {3: [True]})],
    }
    if torch is not None:
        value["tensor"] = torch.ones(3, dtype=torch.bfloat16)
    out = roundtrip(value)
    assert np.array_equal(out["array"], value["array"])
    assert out["nested"] == value["nested"]


def test_all_codec_errors_are_value_errors() -> None:
    assert issubclass(CodecError, ValueError)
    for error in (LimitExceeded, MalformedMessage, UnsupportedType):
        assert issubclass(error, CodecError)
