"""The RPC payload codec: values holding numpy arrays, torch tensors and Arrow data, as Arrow IPC.

`encode(obj)` gives the message as a list of buffers to write in order (array data is never
copied); `decode(message)` validates the whole message and gives the value back, its arrays and
tensors as zero-copy views over `message`. Nothing is pickled, ever.

Wire format (all integers little-endian), a header then Arrow IPC streams back to back::

    magic "LRAC" | version u8 | flags u8 | reserved u16 (0) | tree length u32 | stream count u32
    stream length u64 x count
    tree: ASCII JSON, zero-padded to a multiple of 8 bytes
    streams: each a complete Arrow IPC stream (schema, batches, end marker)

The tree is the value in pre-order, flat (so its nesting never recurses in a parser): `null`,
`true`/`false`, numbers and strings stand for themselves (a nan is `["F", its 64 bits]`, so
that sign and payload survive); a container is `["L"|"T"|"D", n]`
(list, tuple, dict) followed by its n items (n key/value pairs for a dict); a leaf names its
data. If flag bit 0 is set, stream 0 is the *data stream*: one record batch of one row whose
`large_binary` columns come in pairs, a zero pad (named "") that puts the next block 64-byte
aligned from the message start, then the block (named by its index); if flag bit 1 is set too
(blocks totalling under `RAW_DATA_MAX`), stream 0 is instead the compact section of
`codec_raw`, which costs no Arrow IPC to write or check. A block holds a numpy array
(`["N", block, dtype, shape, strides]`), numpy scalar (`"G"`), torch tensor (`["P", block, torch
dtype, shape, strides]`), bytes (`["B", block]`, bytearray `"Y"`) or a str longer than
`STR_INLINE_MAX` (`["S", block]`, UTF-8). An array's block is the
memory its view spans, so its strides survive exactly; a view with gaps is compacted first (see
`codec_layout`). Each pyarrow value is a stream of its own, after the data stream:
`["A"|"C"|"R"|"W", k]` for Array, ChunkedArray, RecordBatch, Table in stream k.

Decoded arrays and tensors are views over the message when it starts at a 16-byte aligned
address (any bytes or bytearray does); a block that an oddly placed message leaves misaligned
for its dtype is copied instead (torch kernels crash on misaligned complex128).

Python ints travel at any size up to `max_int_digits` decimal digits; floats exactly (also nan,
inf); dict keys may be str, int, float, bool, None, bytes or tuples of these. Subclasses of the
containers and scalars arrive as the base type (a namedtuple as a tuple, an IntEnum as an int).
"""

from __future__ import annotations

import json
import logging
import struct
import sys
import warnings
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from lattica_ray.rpc.codec_errors import (
    CodecError,
    LimitExceeded,
    MalformedMessage,
    UnsupportedType,
)
from lattica_ray.rpc.codec_ipc import (
    INLINE_MAX,
    Gather,
    check_field_names,
    data_batch,
    is_data_schema,
    read_stream,
    write_stream,
)
from lattica_ray.rpc.codec_layout import (
    TORCH_DTYPES,
    array_block,
    numpy_dtype,
    numpy_dtype_name,
    torch_to_numpy,
    view_block,
)
from lattica_ray.rpc.codec_raw import RAW_DATA_MAX, raw_layout, raw_section, read_raw_section

__all__ = [
    "CodecError",
    "CodecLimits",
    "LimitExceeded",
    "MalformedMessage",
    "UnsupportedType",
    "decode",
    "encode",
]

logger = logging.getLogger(__name__)

MAGIC = b"LRAC"
VERSION = 1
FLAG_DATA_STREAM = 0x01  # stream 0 carries the data blocks
FLAG_RAW_DATA = 0x02  # ... in the compact section of `codec_raw`, not as Arrow IPC
_KNOWN_FLAGS = FLAG_DATA_STREAM | FLAG_RAW_DATA
_HEADER = struct.Struct("<4sBBHII")
_LENGTH = struct.Struct("<Q")
_OFFSETS = struct.Struct("<qq")  # offsets buffer of a one-row large_binary column
_FLOAT, _FLOAT_BITS = struct.Struct("<d"), struct.Struct("<Q")

_LIST, _TUPLE, _DICT = "L", "T", "D"
_NAN = "F"  # ["F", bits]: a float nan, bit for bit
_NDARRAY, _NUMPY_SCALAR, _TORCH, _BYTES, _BYTEARRAY, _STR = "N", "G", "P", "B", "Y", "S"
STR_INLINE_MAX = 1024  # characters; a longer str travels as a UTF-8 block
_ARROW_ARRAY, _ARROW_CHUNKED, _ARROW_BATCH, _ARROW_TABLE = "A", "C", "R", "W"
_KEY_TYPES = (str, int, float, bool, type(None), bytes, tuple)
_TREE_JSON = json.JSONEncoder(separators=(",", ":"))  # one instance: json.dumps builds one a call


class CodecLimits(BaseModel):
    """What a received message may ask of us; everything above is refused with LimitExceeded.

    `encode` applies the same limits, so a sender learns before sending what a receiver with
    the default limits would refuse.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_message_bytes: int = Field(1 << 30, gt=0, description="whole encoded message")
    max_depth: int = Field(64, gt=0, description="containers nested in containers")
    max_nodes: int = Field(1_000_000, gt=0, description="values in the tree, leaves included")
    max_buffers: int = Field(65_536, gt=0, description="data blocks plus Arrow IPC messages")
    max_string_length: int = Field(16 << 20, gt=0, description="characters in one str")
    max_tree_bytes: int = Field(64 << 20, gt=0, description="JSON value tree (parsed in memory)")
    max_int_digits: int = Field(
        4300, gt=0, description="decimal digits of one int (the interpreter's limit also applies)"
    )
    max_ndim: int = Field(32, gt=0, le=64, description="dimensions of one array or tensor")
    max_array_elements: int = Field(
        1 << 32, gt=0, description="elements of one array (broadcast views can claim many)"
    )


DEFAULT_LIMITS = CodecLimits()


# --------------------------------------------------------------------------- encoding


class _Encoder:
    """Flattens a value into tree nodes, data blocks and Arrow streams."""

    def __init__(self, limits: CodecLimits) -> None:
        self.limits = limits
        # pa.Buffer for array data; bytes for bytes, bytearray and long str values, which the
        # raw section writes as they are (a pyarrow call per small value costs a small call).
        self.blocks: list[pa.Buffer | bytes | bytearray] = []
        self.streams: list[tuple[pa.Schema, list[pa.RecordBatch]]] = []

    @property
    def data_size(self) -> int:
        return sum(len(block) for block in self.blocks)

    def flatten(self, obj: object) -> list[Any]:
        limits = self.limits
        nodes: list[Any] = []
        append = nodes.append
        stack: list[tuple[object, int]] = [(obj, 0)]
        pop = stack.pop
        push = stack.append
        while stack:
            item, depth = pop()
            kind = type(item)
            if kind is str:
                if len(item) > limits.max_string_length:
                    raise LimitExceeded(
                        "string length", len(item), limits.max_string_length, "max_string_length"
                    )
                if len(item) > STR_INLINE_MAX:  # long text skips JSON escaping, as a block
                    self.blocks.append(item.encode("utf-8", "surrogatepass"))
                    append([_STR, len(self.blocks) - 1])
                else:
                    append(item)
            elif kind is float and item != item:  # nan: JSON would lose its sign and payload
                append([_NAN, _FLOAT_BITS.unpack(_FLOAT.pack(item))[0]])
            elif item is None or kind is int or kind is float or kind is bool:
                append(item)
            elif kind is bytes:
                self.blocks.append(item)
                append([_BYTES, len(self.blocks) - 1])
            elif kind is list or kind is tuple or kind is dict:
                if depth >= limits.max_depth:
                    raise LimitExceeded(
                        "container nesting depth", depth + 1, limits.max_depth, "max_depth"
                    )
                if kind is dict:
                    append([_DICT, len(item)])
                    for key, value in reversed(item.items()):
                        if not isinstance(key, _KEY_TYPES):
                            raise UnsupportedType(
                                f"dict key of type {type(key).__name__} cannot be sent: keys "
                                "may be str, int, float, bool, None, bytes or tuples of these"
                            )
                        push((value, depth + 1))
                        push((key, depth + 1))
                else:
                    append([_LIST if kind is list else _TUPLE, len(item)])
                    for value in reversed(item):
                        push((value, depth + 1))
            else:
                normalized = self._leaf_or_base(item)
                if type(normalized) is list:
                    append(normalized)
                else:
                    push((normalized, depth))
            if len(nodes) > limits.max_nodes:
                raise LimitExceeded("value count", len(nodes), limits.max_nodes, "max_nodes")
        return nodes

    def _leaf_or_base(self, item: object) -> object:
        """The tree node of a leaf value, or a subclass instance as its base type."""
        if isinstance(item, np.ndarray):
            if isinstance(item, np.ma.MaskedArray):
                raise UnsupportedType("masked arrays cannot be sent (the mask would be lost)")
            return self._array(_NDARRAY, numpy_dtype_name(item.dtype), item)
        if isinstance(item, np.generic):
            array = np.asarray(item)  # b'' is an S0 scalar but an S1 array
            return self._array(_NUMPY_SCALAR, numpy_dtype_name(array.dtype), array)
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(item, torch.Tensor):
            name, array = torch_to_numpy(item)
            return self._array(_TORCH, name, array)
        if isinstance(item, bytes | bytearray):
            self.blocks.append(item)
            return [_BYTES if isinstance(item, bytes) else _BYTEARRAY, len(self.blocks) - 1]
        if isinstance(item, pa.Array | pa.ChunkedArray | pa.RecordBatch | pa.Table):
            return self._arrow(item)
        for base in (bool, int, float, str, dict, list, tuple):
            if isinstance(item, base):
                return base(item)  # type: ignore[call-overload]
        raise UnsupportedType(
            f"cannot encode a value of type {type(item).__module__}.{type(item).__qualname__}: "
            "the codec carries None, bool, int, float, str, bytes, list, tuple, dict, numpy "
            "arrays and scalars, torch tensors and pyarrow arrays/tables (never pickle)"
        )

    def _array(self, tag: str, dtype_name: str, array: np.ndarray) -> list[Any]:
        if array.ndim > self.limits.max_ndim:
            raise LimitExceeded("array rank", array.ndim, self.limits.max_ndim, "max_ndim")
        if array.size > self.limits.max_array_elements:
            raise LimitExceeded(
                "array element count",
                array.size,
                self.limits.max_array_elements,
                "max_array_elements",
            )
        array, block = array_block(array)
        self.blocks.append(block)
        return [tag, len(self.blocks) - 1, dtype_name, list(array.shape), list(array.strides)]

    def _arrow(self, value: pa.Array | pa.ChunkedArray | pa.RecordBatch | pa.Table) -> list[Any]:
        if isinstance(value, pa.RecordBatch | pa.Table):
            tag = _ARROW_BATCH if isinstance(value, pa.RecordBatch) else _ARROW_TABLE
            schema = value.schema
            batches = [value] if tag == _ARROW_BATCH else value.to_batches()
        else:
            schema = pa.schema([pa.field("values", value.type)])
            chunks = [value] if isinstance(value, pa.Array) else value.chunks
            tag = _ARROW_ARRAY if isinstance(value, pa.Array) else _ARROW_CHUNKED
            batches = [pa.RecordBatch.from_arrays([chunk], schema=schema) for chunk in chunks]
        self.streams.append((schema, batches))
        return [tag, len(self.streams) - 1]


def encode(obj: object, limits: CodecLimits | None = None) -> list[memoryview]:
    """The message for `obj`, as buffers to write in this order (large array data uncopied).

    The first buffer holds the header; `sum(len(b) for b in result)` is the message size. The
    buffers keep the arrays they view alive; do not modify those arrays until the message is sent.
    Raises UnsupportedType for values the codec does not carry, LimitExceeded past `limits`.
    """
    if limits is None or limits is DEFAULT_LIMITS:
        shape = _bytes_shape(obj)
        if shape is not None:
            layout = _shape_layouts.get(shape)
            if layout is not None:
                return [memoryview(_fill(layout, _shape_blocks(obj)))]
            return _encode_new_shape(obj, shape)
    return _encode(obj, limits or DEFAULT_LIMITS)


def _encode(obj: object, limits: CodecLimits) -> list[memoryview]:
    encoder = _Encoder(limits)
    nodes = encoder.flatten(obj)
    blocks = len(encoder.blocks)
    if blocks > limits.max_buffers:
        raise LimitExceeded("data block count", blocks, limits.max_buffers, "max_buffers")
    try:
        tree = _TREE_JSON.encode(nodes).encode("ascii")
    except ValueError as exc:  # an int above the interpreter's digit limit
        raise UnsupportedType(f"cannot encode the value: {exc}") from exc
    if len(tree) > limits.max_tree_bytes:
        raise LimitExceeded("value tree size", len(tree), limits.max_tree_bytes, "max_tree_bytes")
    if not encoder.streams and (not blocks or encoder.data_size < RAW_DATA_MAX):
        return [memoryview(_small_message(encoder, tree, limits))]
    streams = len(encoder.streams) + bool(blocks)
    padding = -len(tree) % 8
    header_size = _HEADER.size + _LENGTH.size * streams + len(tree) + padding
    sink = Gather()
    lengths: list[int] = []
    flags = 0
    if blocks and encoder.data_size < RAW_DATA_MAX:
        flags |= FLAG_DATA_STREAM | FLAG_RAW_DATA
        section = raw_section(encoder.blocks, header_size, streams_follow=bool(encoder.streams))
        sink.write(section)
        lengths.append(len(section))
    elif blocks:
        flags |= FLAG_DATA_STREAM
        buffers = [b if isinstance(b, pa.Buffer) else pa.py_buffer(b) for b in encoder.blocks]
        schema, batch = data_batch(buffers, header_size)
        # Blocks that would all be copied into header segments anyway: one copy, in C++.
        small = max(block.size for block in buffers) < INLINE_MAX
        lengths.append(write_stream(sink, schema, [batch], small=small))
    for schema, batches in encoder.streams:
        small = sum(batch.nbytes for batch in batches) < INLINE_MAX
        lengths.append(write_stream(sink, schema, batches, small=small))
    header = b"".join(
        (
            _HEADER.pack(MAGIC, VERSION, flags, 0, len(tree), len(lengths)),
            *(_LENGTH.pack(length) for length in lengths),
            tree,
            bytes(padding),
        )
    )
    size = len(header) + sink.size
    if size > limits.max_message_bytes:
        raise LimitExceeded("message size", size, limits.max_message_bytes, "max_message_bytes")
    return sink.buffers(header)


def _small_message(encoder: _Encoder, tree: bytes, limits: CodecLimits) -> bytes:
    """A message of no Arrow value and little data: header, tree, raw section, in one piece."""
    blocks = encoder.blocks
    key = (tree, *[len(block) for block in blocks])
    layout = _small_layouts.get(key)
    if layout is None:
        layout = _small_layout(tree, key[1:])
        if len(_small_layouts) >= _SMALL_LAYOUTS:
            _small_layouts.clear()
        _small_layouts[key] = layout
    size = layout[2]
    if size > limits.max_message_bytes:
        raise LimitExceeded("message size", size, limits.max_message_bytes, "max_message_bytes")
    return _fill(layout, blocks)


def _fill(layout: tuple[bytes, list[bytes], int], blocks: list[Any]) -> bytes:
    """A small message: its remembered layout with `blocks` in their places."""
    head, gaps, _ = layout
    if not blocks:
        return head
    if len(blocks) == 1:
        return head + blocks[0]
    parts = [head]
    for block, gap in zip(blocks, gaps, strict=True):
        parts.append(block)
        parts.append(gap)
    return b"".join(parts)


# -- values made of bytes only: a bytes result, the arguments (bytes, ..., {}) of a call ---------
# Their tree is decided by their shape (how many bytes values, where), so a shape seen once
# is encoded as a join of its remembered layout and the values: no flattening, no JSON.
_SHAPE_BYTES, _SHAPE_ARGUMENTS, _SHAPE_NONE = "B", "A", "N"


def _bytes_shape(obj: object) -> tuple[Any, ...] | None:
    """The shape of a small value of one of those forms (with its blocks' sizes), or None."""
    kind = type(obj)
    if kind is bytes:
        return (_SHAPE_BYTES, len(obj)) if len(obj) < RAW_DATA_MAX else None  # type: ignore[arg-type]
    if kind is tuple and len(obj) == 2:  # type: ignore[arg-type]
        args, kwargs = obj  # type: ignore[misc]
        if type(args) is not tuple or type(kwargs) is not dict or kwargs:
            return None
        shape: list[Any] = [_SHAPE_ARGUMENTS]
        total = 0
        for arg in args:
            if type(arg) is not bytes:
                return None
            shape.append(len(arg))
            total += len(arg)
        return tuple(shape) if total < RAW_DATA_MAX else None
    if obj is None:
        return (_SHAPE_NONE,)
    return None


def _shape_blocks(obj: Any) -> list[Any]:
    """The data blocks of a value `_bytes_shape` accepted, in tree order."""
    if type(obj) is bytes:
        return [obj]
    if obj is None:
        return []
    return list(obj[0])


def _encode_new_shape(obj: object, shape: tuple[Any, ...]) -> list[memoryview]:
    """Encode the first value of a shape the long way (every check), then remember its layout
    (the one `_small_message` used) for the next."""
    message = _encode(obj, DEFAULT_LIMITS)
    encoder = _Encoder(DEFAULT_LIMITS)
    tree = _TREE_JSON.encode(encoder.flatten(obj)).encode("ascii")
    layout = _small_layouts.get((tree, *shape[1:]))
    if layout is not None:
        if len(_shape_layouts) >= _SMALL_LAYOUTS:
            _shape_layouts.clear()
        _shape_layouts[shape] = layout
    return message


_shape_layouts: dict[tuple[Any, ...], tuple[bytes, list[bytes], int]] = {}


_SMALL_LAYOUTS = 256  # remembered layouts (emptied when full): callers repeat a few shapes
_small_layouts: dict[tuple[Any, ...], tuple[bytes, list[bytes], int]] = {}


def _small_layout(tree: bytes, sizes: tuple[int, ...]) -> tuple[bytes, list[bytes], int]:
    """A small message of `tree` and blocks of `sizes`, as (everything before the first block,
    the zero pad after each block, the message size): the blocks go in between."""
    padding = -len(tree) % 8
    if not sizes:
        head = _HEADER.pack(MAGIC, VERSION, 0, 0, len(tree), 0) + tree + bytes(padding)
        return head, [], len(head)
    section_start = _HEADER.size + _LENGTH.size + len(tree) + padding
    table, pads, _ = raw_layout(sizes, section_start)
    section_size = len(table) + sum(pads) + sum(sizes)
    head = b"".join(
        (
            _HEADER.pack(MAGIC, VERSION, FLAG_DATA_STREAM | FLAG_RAW_DATA, 0, len(tree), 1),
            _LENGTH.pack(section_size),
            tree,
            bytes(padding),
            table,
            bytes(pads[0]),
        )
    )
    gaps = [bytes(pad) for pad in pads[1:]] + [b""]
    return head, gaps, section_start + section_size


# --------------------------------------------------------------------------- decoding

# What a malformed message can make the parsers raise; all become MalformedMessage.
_PARSE_ERRORS = (
    pa.ArrowException,
    OSError,  # pyarrow's ArrowIOError is OSError itself ("buffer_index out of range")
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    OverflowError,
    struct.error,
    RecursionError,
)


class _Decoder:
    """Validates one message and rebuilds its value; used once."""

    def __init__(self, message: memoryview, limits: CodecLimits) -> None:
        self.message = message
        self._address: int | None = None  # of message[0] in memory, once asked
        self.limits = limits
        self.blocks: list[tuple[int, int]] = []  # (start, end) in message
        self.streams: list[tuple[pa.Schema, list[pa.RecordBatch]]] = []
        self.used_blocks: set[int] = set()
        self.used_streams: set[int] = set()
        self.tree: list[Any] | None = None  # the parsed tree, once `run` checked everything

    def run(self) -> object:
        limits = self.limits
        message = self.message
        size = len(message)
        if size > limits.max_message_bytes:
            raise LimitExceeded("message size", size, limits.max_message_bytes, "max_message_bytes")
        if size < _HEADER.size:
            raise MalformedMessage(f"message of {size} bytes is shorter than the codec header")
        magic, version, flags, reserved, tree_length, count = _HEADER.unpack_from(message)
        if magic != MAGIC:
            raise MalformedMessage(f"not a codec message (magic {bytes(magic)!r})")
        if version != VERSION:
            raise MalformedMessage(f"codec version {version} is not supported (this is {VERSION})")
        if flags & ~_KNOWN_FLAGS or reserved:
            raise MalformedMessage("unknown flags or non-zero reserved header bits")
        if flags & FLAG_RAW_DATA and not flags & FLAG_DATA_STREAM:
            raise MalformedMessage("the raw data flag is set without the data stream flag")
        if flags & FLAG_DATA_STREAM and not count:
            raise MalformedMessage("the data stream flag is set but the message has no stream")
        if count > limits.max_buffers:
            raise LimitExceeded("Arrow stream count", count, limits.max_buffers, "max_buffers")
        if tree_length > limits.max_tree_bytes:
            limit = limits.max_tree_bytes
            raise LimitExceeded("value tree size", tree_length, limit, "max_tree_bytes")
        tree_start = _HEADER.size + _LENGTH.size * count
        tree_end = tree_start + tree_length
        body = tree_end + (-tree_length % 8)
        if body > size:
            raise MalformedMessage("message is truncated inside its header")
        if any(message[tree_end:body]):
            raise MalformedMessage("header padding is not zero")
        lengths = struct.unpack_from(f"<{count}Q", message, _HEADER.size)
        if sum(lengths) != size - body:
            raise MalformedMessage(
                f"header announces {sum(lengths)} bytes of Arrow streams, message has {size - body}"
            )
        nodes = self._parse_tree(message[tree_start:tree_end])
        self._read_streams(body, lengths, flags)
        value = self._build(nodes)
        if len(self.used_blocks) != len(self.blocks) or len(self.used_streams) != len(self.streams):
            raise MalformedMessage("message carries data that its tree does not use")
        self.tree = nodes
        return value

    def _parse_tree(self, text: memoryview) -> list[Any]:
        # The interpreter's own digit limit (sys.get_int_max_str_digits) bounds the parse cost;
        # max_int_digits is checked on the parsed ints in _build.
        nodes = json.loads(bytes(text).decode("ascii"))
        if type(nodes) is not list:
            raise MalformedMessage("the value tree is not a list of nodes")
        if len(nodes) > self.limits.max_nodes:
            raise LimitExceeded("value count", len(nodes), self.limits.max_nodes, "max_nodes")
        return nodes

    def _read_streams(self, position: int, lengths: tuple[int, ...], flags: int) -> None:
        if not lengths:
            return
        whole: pa.Buffer | None = None  # only Arrow streams need it
        budget = self.limits.max_buffers
        has_data = bool(flags & FLAG_DATA_STREAM)
        for index, length in enumerate(lengths):
            if index == 0 and flags & FLAG_RAW_DATA:
                end = position + length
                more = len(lengths) > 1  # Arrow streams follow: the section's end is aligned
                self.blocks = read_raw_section(self.message, position, end, budget, more)
                budget -= len(self.blocks)
                position += length
                continue
            if whole is None:
                whole = pa.py_buffer(self.message)
                self._address = whole.address
            schema, batches, messages = read_stream(whole.slice(position, length), budget)
            budget -= messages
            if index == 0 and has_data:
                self._take_data_stream(schema, batches, whole.address, position, position + length)
            else:
                check_field_names(schema)
                self.streams.append((schema, batches))
            position += length

    def _take_data_stream(
        self, schema: pa.Schema, batches: list[pa.RecordBatch], base: int, start: int, end: int
    ) -> None:
        if len(batches) != 1 or batches[0].num_rows != 1 or not schema.names:
            raise MalformedMessage("the data stream must hold one batch of one row")
        if len(schema) // 2 > self.limits.max_buffers:
            count = len(schema) // 2
            raise LimitExceeded("data block count", count, self.limits.max_buffers, "max_buffers")
        if not is_data_schema(schema):
            raise MalformedMessage("data stream columns must be large_binary pads and blocks")
        for column in batches[0].columns[1::2]:
            if column.null_count:
                raise MalformedMessage("a data block is null")
            _, offsets, data = column.buffers()  # validated: offsets lie within data
            first, last = _OFFSETS.unpack_from(offsets, column.offset * 8)
            if last == first:  # Arrow may stand in its own empty buffer: nothing to read
                self.blocks.append((start, start))
                continue
            block_start = data.address + first - base
            block_end = block_start + last - first
            if not start <= block_start <= block_end <= end:
                raise MalformedMessage("a data block does not lie inside its stream")
            self.blocks.append((block_start, block_end))

    @property
    def address(self) -> int:
        """Where the message starts in memory (array views check their alignment with it)."""
        if self._address is None:
            self._address = pa.py_buffer(self.message).address
        return self._address

    def _take(self, index: object, pool: list[Any], used: set[int], what: str) -> Any:
        if type(index) is not int or not 0 <= index < len(pool):
            raise MalformedMessage(f"tree refers to {what} {index!r:.20}, which does not exist")
        if index in used:
            raise MalformedMessage(f"tree refers to {what} {index} twice")
        used.add(index)
        return pool[index]

    def _build(self, nodes: list[Any]) -> object:
        """The value from its pre-order nodes, with an explicit stack (no recursion)."""
        limits = self.limits
        max_string = limits.max_string_length
        int_bound = _int_bound(limits.max_int_digits)
        stack: list[list[Any]] = []  # [tag, items still expected, items]
        for position, node in enumerate(nodes):
            kind = type(node)
            if kind is list:
                if not node:
                    raise MalformedMessage("empty node in the value tree")
                tag = node[0]
                if tag == _LIST or tag == _TUPLE or tag == _DICT:
                    if len(stack) >= limits.max_depth:
                        raise LimitExceeded(
                            "container nesting depth", len(stack) + 1, limits.max_depth, "max_depth"
                        )
                    if len(node) != 2 or type(node[1]) is not int or node[1] < 0:
                        raise MalformedMessage(f"bad container node {node!r:.80}")
                    expected = node[1] * 2 if tag == _DICT else node[1]
                    if expected:
                        stack.append([tag, expected, []])
                        continue
                    value = _container(tag, [])
                else:
                    value = self._leaf(node)
            elif kind is str:
                if len(node) > max_string:
                    raise LimitExceeded("string length", len(node), max_string, "max_string_length")
                value = node
            elif kind is int:
                if not -int_bound < node < int_bound:
                    digits = len(str(abs(node)))
                    raise LimitExceeded(
                        "int digit count", digits, limits.max_int_digits, "max_int_digits"
                    )
                value = node
            elif node is None or kind is bool or kind is float:
                value = node
            else:
                raise MalformedMessage(f"unexpected node {node!r:.80} in the value tree")
            while stack:
                frame = stack[-1]
                frame[2].append(value)
                frame[1] -= 1
                if frame[1]:
                    break
                stack.pop()
                value = _container(frame[0], frame[2])
            else:
                if position != len(nodes) - 1:
                    raise MalformedMessage("the value tree has nodes after its root")
                return value
        raise MalformedMessage("the value tree is incomplete")

    def _leaf(self, node: list[Any]) -> object:
        tag = node[0]
        if tag in (_NDARRAY, _NUMPY_SCALAR, _TORCH):
            if len(node) != 5:
                raise MalformedMessage(f"bad array node {node!r:.80}")
            _, index, dtype_name, shape, strides = node
            start, end = self._take(index, self.blocks, self.used_blocks, "data block")
            if tag == _TORCH:
                return self._tensor(start, end, dtype_name, shape, strides)
            array = self._view(start, end, numpy_dtype(dtype_name), shape, strides)
            if tag == _NUMPY_SCALAR:
                if array.ndim:
                    raise MalformedMessage("a numpy scalar must have shape ()")
                return array[()]
            return array
        if tag == _NAN:
            if len(node) != 2 or type(node[1]) is not int or not 0 <= node[1] < 2**64:
                raise MalformedMessage(f"bad float node {node!r:.80}")
            return _FLOAT.unpack(_FLOAT_BITS.pack(node[1]))[0]
        if tag in (_BYTES, _BYTEARRAY, _STR):
            if len(node) != 2:
                raise MalformedMessage(f"bad bytes node {node!r:.80}")
            start, end = self._take(node[1], self.blocks, self.used_blocks, "data block")
            data = self.message[start:end]
            if tag != _STR:
                return bytes(data) if tag == _BYTES else bytearray(data)
            return self._text(data)
        if tag in (_ARROW_ARRAY, _ARROW_CHUNKED, _ARROW_BATCH, _ARROW_TABLE):
            if len(node) != 2:
                raise MalformedMessage(f"bad Arrow node {node!r:.80}")
            schema, batches = self._take(node[1], self.streams, self.used_streams, "Arrow stream")
            return _arrow_value(tag, schema, batches)
        raise MalformedMessage(f"unknown node {node!r:.80} in the value tree")

    def _text(self, data: memoryview) -> str:
        limit = self.limits.max_string_length
        if len(data) > 4 * limit:  # UTF-8 takes at most 4 bytes a character
            raise LimitExceeded("string length", len(data) // 4, limit, "max_string_length")
        text = str(data, "utf-8", "surrogatepass")
        if len(text) > limit:
            raise LimitExceeded("string length", len(text), limit, "max_string_length")
        return text

    def _view(
        self, start: int, end: int, dtype: np.dtype, shape: object, strides: object
    ) -> np.ndarray:
        return view_block(
            self.message,
            self.address,
            start,
            end,
            dtype,
            shape,
            strides,
            max_ndim=self.limits.max_ndim,
            max_elements=self.limits.max_array_elements,
        )

    def _tensor(self, start: int, end: int, name: object, shape: object, strides: object) -> Any:
        spec = TORCH_DTYPES.get(name) if isinstance(name, str) else None
        if spec is None:
            raise MalformedMessage(f"torch dtype {name!r:.40} is not one the codec sends")
        array = self._view(start, end, spec.storage, shape, strides)
        if any(stride < 0 or stride % array.itemsize for stride in array.strides):
            raise MalformedMessage(f"torch strides {array.strides} are not whole elements")
        try:
            import torch
        except ImportError as exc:
            raise UnsupportedType(
                "the message holds torch tensors but torch is not installed"
            ) from exc
        if array.flags.writeable:
            tensor = torch.from_numpy(array)
        else:  # a read-only receive buffer: torch warns that writing is undefined; it is ours
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                tensor = torch.from_numpy(array)
        return tensor.view(getattr(torch, spec.name)) if spec.needs_view else tensor


@lru_cache(maxsize=8)
def _int_bound(digits: int) -> int:
    return 10**digits


def _container(tag: str, items: list[Any]) -> object:
    if tag == _LIST:
        return items
    if tag == _TUPLE:
        return tuple(items)
    keys = items[0::2]
    if not all(isinstance(key, _KEY_TYPES) for key in keys):
        raise MalformedMessage("a dict key is not a str, int, float, bool, None, bytes or tuple")
    result = dict(zip(keys, items[1::2], strict=True))
    if len(result) != len(keys):
        raise MalformedMessage("a dict has duplicate keys")
    return result


def _arrow_value(tag: str, schema: pa.Schema, batches: list[pa.RecordBatch]) -> object:
    if tag == _ARROW_TABLE:
        return pa.Table.from_batches(batches, schema=schema)
    if tag == _ARROW_BATCH:
        if len(batches) != 1:
            raise MalformedMessage("a RecordBatch stream must hold exactly one batch")
        return batches[0]
    if len(schema) != 1:
        raise MalformedMessage("an Arrow array stream must have exactly one column")
    if tag == _ARROW_ARRAY:
        if len(batches) != 1:
            raise MalformedMessage("an Arrow array stream must hold exactly one batch")
        return batches[0].column(0)
    return pa.chunked_array([batch.column(0) for batch in batches], type=schema.field(0).type)


# -- remembered skeletons: a caller sends the same few shapes over and over --------------------
_SKELETON_MAX = 512  # bytes of header, tree and block table a remembered skeleton may have
_SKELETONS_PER_LIMITS = 256  # remembered skeletons (emptied when full)


class _Skeleton:
    """What a fully checked message without Arrow streams told about every message that
    starts with the same bytes (header, tree, block table): its size, where its blocks lie
    (only the zero pads between them are still to check), and how to build its value (the
    tree compiled into small functions, see `_compile`). Such a message is then decoded
    without parsing and checking all of that again."""

    __slots__ = ("blocks", "build", "direct", "pads", "size")

    def __init__(self, decoder: _Decoder, nodes: list[Any], table_end: int) -> None:
        self.size = len(decoder.message)
        self.blocks = decoder.blocks
        self.build = _compile(nodes, decoder.blocks)
        self.direct = _direct_builder(nodes, decoder.blocks)
        pads, position = [], table_end
        for start, end in decoder.blocks:
            if start > position:
                pads.append((position, start, bytes(start - position)))
            position = end
        self.pads = pads  # (start, end, the zeros that must be there)


Builder = Callable[["_Decoder"], object]


def _direct_builder(
    nodes: list[Any], blocks: list[tuple[int, int]]
) -> Callable[[bytearray], object] | None:
    """For the values `encode` takes its shortcut for (bytes, call arguments of bytes only,
    None: see `_bytes_shape`), a function that builds the value straight from the message
    (nothing in them needs checking beyond the skeleton); None for other trees."""
    if nodes == [None]:
        return lambda message: None
    if nodes == [[_BYTES, 0]]:
        ((start, end),) = blocks
        return lambda message: bytes(memoryview(message)[start:end])
    count = len(nodes) - 3
    if (
        count < 0
        or nodes[0] != [_TUPLE, 2]
        or nodes[1] != [_TUPLE, count]
        or nodes[-1] != [_DICT, 0]
        or nodes[2:-1] != [[_BYTES, index] for index in range(count)]
    ):
        return None
    if count == 1:
        ((start, end),) = blocks
        return lambda message: ((bytes(memoryview(message)[start:end]),), {})
    places = list(blocks)
    return lambda message: (tuple([bytes(memoryview(message)[s:e]) for s, e in places]), {})


def _compile(nodes: list[Any], blocks: list[tuple[int, int]]) -> Builder:
    """A function that builds the value of `nodes` (a tree `_Decoder._build` accepted) from a
    message with the same skeleton. What the tree alone decides was checked then (node shapes,
    depth, inline strings and ints, each block used once); what the blocks hold (text, array
    layout, dict keys made of bytes) is checked again on every message. No code is generated:
    only closures over the checked nodes."""
    stack: list[tuple[str, int, list[Builder]]] = []
    for node in nodes:
        if type(node) is list and node[0] in (_LIST, _TUPLE, _DICT):
            tag, count = node[0], node[1] * 2 if node[0] == _DICT else node[1]
            if count:
                stack.append((tag, count, []))
                continue
            build = _container_builder(tag, [])
        elif type(node) is list:
            build = _leaf_builder(node, blocks)
        else:
            build = _constant(node)
        while stack:
            tag, count, items = stack[-1]
            items.append(build)
            if len(items) < count:
                break
            stack.pop()
            build = _container_builder(tag, items)
        else:
            return build
    raise MalformedMessage("the value tree is incomplete")  # `_build` accepted it: never


def _constant(value: object) -> Builder:
    return lambda decoder: value  # None, bool, int, float, str: immutable


def _leaf_builder(node: list[Any], blocks: list[tuple[int, int]]) -> Builder:
    tag = node[0]
    if tag == _NAN:
        return _constant(_FLOAT.unpack(_FLOAT_BITS.pack(node[1]))[0])
    if tag == _BYTES:
        start, end = blocks[node[1]]
        return lambda decoder: bytes(decoder.message[start:end])
    if tag == _BYTEARRAY:
        start, end = blocks[node[1]]
        return lambda decoder: bytearray(decoder.message[start:end])
    if tag == _STR:
        start, end = blocks[node[1]]
        return lambda decoder: decoder._text(decoder.message[start:end])
    return lambda decoder: decoder._leaf(node)  # arrays, tensors: their checks every time


def _container_builder(tag: str, items: list[Builder]) -> Builder:
    if tag == _DICT:
        if not items:
            return lambda decoder: {}
        return lambda decoder: _container(_DICT, [item(decoder) for item in items])
    if len(items) == 1:  # the arguments of a one-argument call, a one-item list
        (only,) = items
        if tag == _TUPLE:
            return lambda decoder: (only(decoder),)
        return lambda decoder: [only(decoder)]
    if len(items) == 2:  # (args, kwargs) of every call
        first, second = items
        if tag == _TUPLE:
            return lambda decoder: (first(decoder), second(decoder))
        return lambda decoder: [first(decoder), second(decoder)]
    if tag == _TUPLE:
        return lambda decoder: tuple([item(decoder) for item in items])
    return lambda decoder: [item(decoder) for item in items]


_skeletons: dict[int, tuple[CodecLimits, dict[bytes, _Skeleton]]] = {}


def _skeleton_key(view: memoryview) -> bytes | None:
    """The bytes that decide a small message's skeleton (None: not a message to remember)."""
    if len(view) < _HEADER.size:
        return None
    _, _, flags, _, tree_length, count = _HEADER.unpack_from(view)
    body = _HEADER.size + _LENGTH.size * count + tree_length + (-tree_length % 8)
    if flags == 0 and count == 0:
        end = body
    elif flags == FLAG_DATA_STREAM | FLAG_RAW_DATA and count == 1 and body + 8 <= len(view):
        end = body + 8 + 8 * int.from_bytes(view[body : body + 4], "little")
    else:
        return None
    return bytes(view[:end]) if end <= _SKELETON_MAX and end <= len(view) else None


def _skeletons_for(limits: CodecLimits) -> dict[bytes, _Skeleton]:
    entry = _skeletons.get(id(limits))
    if entry is None or entry[0] is not limits:  # (the entry keeps its limits alive)
        if len(_skeletons) >= 16:
            _skeletons.clear()
        entry = _skeletons[id(limits)] = (limits, {})
    return entry[1]


# The skeleton last seen for each message size (default limits): a caller's messages of one
# size are usually of one shape, so a received bytearray is first checked against that one
# (a prefix comparison) before its skeleton key is computed.
_recent_by_size: dict[int, tuple[bytes, _Skeleton]] = {}


def _remember_by_size(key: bytes, skeleton: _Skeleton) -> None:
    if len(_recent_by_size) >= _SKELETONS_PER_LIMITS:
        _recent_by_size.clear()
    _recent_by_size[skeleton.size] = (key, skeleton)


def _has_skeleton(message: bytearray, key: bytes, skeleton: _Skeleton) -> bool:
    """`message` (of the skeleton's size) starts with its key and has zeros in its pads."""
    if not message.startswith(key):
        return False
    for start, _, zeros in skeleton.pads:
        if not message.startswith(zeros, start):
            return False
    return True


def _decode_known(view: memoryview, skeleton: _Skeleton, limits: CodecLimits) -> object:
    decoder = _Decoder(view, limits)
    decoder.blocks = skeleton.blocks
    return skeleton.build(decoder)


def decode(message: bytes | bytearray | memoryview, limits: CodecLimits | None = None) -> object:
    """The value in `message`, validated in full before anything of it is returned.

    Arrays and tensors are zero-copy views over `message`, so keep it unchanged while they are
    in use; bytes and str values are copies. Numpy arrays are writable only if `message` is;
    torch has no read-only tensors, so pass a writable buffer (a bytearray) if tensors are to be
    written in place. Raises a CodecError subclass for any malformed or over-limit message, and
    never reads outside `message`.
    """
    if type(message) is bytearray and (limits is None or limits is DEFAULT_LIMITS):
        recent = _recent_by_size.get(len(message))
        if recent is not None and _has_skeleton(message, *recent):
            skeleton = recent[1]
            if skeleton.direct is not None:
                return skeleton.direct(message)
            return _decode_known(memoryview(message), skeleton, DEFAULT_LIMITS)
    view = memoryview(message)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    limits = limits or DEFAULT_LIMITS
    try:
        key = _skeleton_key(view)
        if key is not None:
            known = _skeletons_for(limits)
            skeleton = known.get(key)
            if (
                skeleton is not None
                and len(view) == skeleton.size
                and all(view[start:end].tobytes() == zeros for start, end, zeros in skeleton.pads)
            ):
                if limits is DEFAULT_LIMITS:
                    _remember_by_size(key, skeleton)
                return _decode_known(view, skeleton, limits)
        decoder = _Decoder(view, limits)
        value = decoder.run()
        if key is not None and decoder.tree is not None and not decoder.streams:
            if len(known) >= _SKELETONS_PER_LIMITS:
                known.clear()
            known[key] = _Skeleton(decoder, decoder.tree, len(key))
        return value
    except CodecError:
        raise
    except _PARSE_ERRORS as exc:
        raise MalformedMessage(f"malformed codec message: {type(exc).__name__}: {exc}") from exc
