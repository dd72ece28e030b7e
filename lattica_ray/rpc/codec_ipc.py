"""Arrow IPC streams for the codec: written as a list of buffers without copying the data, and
read back from untrusted bytes only after checking what Arrow itself does not.

Arrow's IPC reader checks framing and flatbuffer structure, and `validate(full=True)` checks
offsets, lengths and indices of every array. Two things it would still do on request of the
sender, and which we refuse before reading: decompress a body (an lz4/zstd bomb of a few KiB can
ask for gigabytes) and byte-swap a big-endian stream (a copy). With both refused, every array read
is a view over the received bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from functools import lru_cache

import pyarrow as pa

from lattica_ray.rpc.codec_errors import LimitExceeded, MalformedMessage

# Segments smaller than this are copied into a neighbouring header segment; larger buffers are
# handed to the writer as they are.
INLINE_MAX = 64 * 1024

_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # Arrow IPC end-of-stream marker

# MessageHeader union tags (Arrow format/Message.fbs)
_SCHEMA, _DICTIONARY_BATCH, _RECORD_BATCH = 1, 2, 3
# Field slots in the Arrow flatbuffer tables we inspect (format/Message.fbs, Schema.fbs)
_MESSAGE_HEADER_TYPE, _MESSAGE_HEADER = 1, 2
_SCHEMA_ENDIANNESS = 0
_RECORD_BATCH_COMPRESSION = 3
_DICTIONARY_BATCH_DATA = 1

_READ_OPTIONS = pa.ipc.IpcReadOptions(use_threads=False)

# Data blocks start at multiples of this from the message start, so that arrays over a receive
# buffer from malloc (16-byte aligned) are aligned for every dtype (torch needs 16 for complex128).
BLOCK_ALIGNMENT = 64
_OFFSETS = struct.Struct("<qq")  # a one-row large_binary column's offsets buffer: 0, length
_ZEROS = pa.py_buffer(bytes(BLOCK_ALIGNMENT))


class Gather:
    """A write-only sink that keeps what pyarrow writes as segments, big buffers uncopied."""

    closed = False

    def __init__(self) -> None:
        self.segments: list[bytes | pa.Buffer | memoryview] = []
        self.size = 0

    def write(self, data: bytes | pa.Buffer) -> int:
        size = len(data)
        self.segments.append(memoryview(data) if size >= INLINE_MAX else data)
        self.size += size
        return size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def buffers(self, header: bytes) -> list[memoryview]:
        """`header` then everything written, with runs of small segments joined into one."""
        out: list[memoryview] = []
        run: list[bytes | pa.Buffer] = [header]
        for segment in self.segments:
            if isinstance(segment, memoryview):
                if run:
                    out.append(memoryview(b"".join(run)))
                    run = []
                out.append(segment)
            else:
                run.append(segment)
        if run:
            out.append(memoryview(b"".join(run)))
        return out


def write_stream(
    sink: Gather, schema: pa.Schema, batches: Iterable[pa.RecordBatch], *, small: bool
) -> int:
    """Append one IPC stream (schema, batches, end marker) to `sink`; returns its length.

    A `small` stream (no buffer worth passing uncopied) is written in C++ in one piece, which
    saves a Python call per Arrow buffer; it would be copied into a header segment anyway.
    """
    before = sink.size
    target = pa.BufferOutputStream() if small else pa.PythonFile(sink, mode="w")
    with pa.ipc.new_stream(target, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    if small:
        sink.write(target.getvalue())
    return sink.size - before


_U8, _I16, _U16, _I32, _U32 = (struct.Struct(f) for f in ("<B", "<h", "<H", "<i", "<I"))


def _u(kind: struct.Struct, buf: bytes, pos: int) -> int:
    if pos < 0 or pos + kind.size > len(buf):
        raise MalformedMessage("Arrow message metadata points outside itself")
    return kind.unpack_from(buf, pos)[0]


class _FlatTable:
    """Just enough of a flatbuffers table reader to look at three fields, bounds-checked."""

    def __init__(self, buf: bytes, pos: int) -> None:
        self.buf = buf
        self.pos = pos
        self.vtable = pos - _u(_I32, buf, pos)
        self.vtable_size = _u(_U16, buf, self.vtable)

    def field(self, slot: int) -> int:
        """Absolute position of a field, or 0 if the table does not have it."""
        entry = 4 + 2 * slot
        if entry + 2 > self.vtable_size:
            return 0
        offset = _u(_U16, self.buf, self.vtable + entry)
        return self.pos + offset if offset else 0

    def scalar(self, slot: int, kind: struct.Struct, default: int) -> int:
        where = self.field(slot)
        return _u(kind, self.buf, where) if where else default

    def table(self, slot: int) -> _FlatTable | None:
        where = self.field(slot)
        return _FlatTable(self.buf, where + _u(_U32, self.buf, where)) if where else None


def message_kind(metadata: bytes) -> int:
    """The header type of an IPC message, after refusing compression and big-endian schemas."""
    message = _FlatTable(metadata, _u(_U32, metadata, 0))
    kind = message.scalar(_MESSAGE_HEADER_TYPE, _U8, 0)
    header = message.table(_MESSAGE_HEADER)
    if header is None or kind not in (_SCHEMA, _DICTIONARY_BATCH, _RECORD_BATCH):
        raise MalformedMessage(f"Arrow IPC message of type {kind} is not allowed in a codec stream")
    if kind == _SCHEMA and header.scalar(_SCHEMA_ENDIANNESS, _I16, 0) != 0:
        raise MalformedMessage(
            "big-endian Arrow streams are refused (the codec sends little-endian)"
        )
    batch = header.table(_DICTIONARY_BATCH_DATA) if kind == _DICTIONARY_BATCH else header
    if batch is not None and batch.field(_RECORD_BATCH_COMPRESSION):
        raise MalformedMessage("compressed Arrow record batches are refused (decompression bomb)")
    return kind


def read_stream(
    stream: pa.Buffer, max_messages: int
) -> tuple[pa.Schema, list[pa.RecordBatch], int]:
    """Schema and fully validated batches of one IPC stream, and how many messages it held."""
    if stream.size < len(_EOS) or stream.slice(stream.size - len(_EOS)).to_pybytes() != _EOS:
        raise MalformedMessage("an Arrow stream does not end with the end-of-stream marker")
    source = pa.BufferReader(stream)
    reader = pa.ipc.MessageReader.open_stream(source)
    messages: list[pa.ipc.Message] = []
    kinds: list[int] = []
    while True:
        try:
            message = reader.read_next_message()
        except StopIteration:
            break
        if len(messages) >= max_messages:
            raise LimitExceeded(
                "Arrow IPC message count", len(messages) + 1, max_messages, "max_buffers"
            )
        kinds.append(message_kind(message.metadata.to_pybytes()))
        messages.append(message)
    if source.tell() != stream.size:
        raise MalformedMessage("an Arrow stream has bytes after its end-of-stream marker")
    if not kinds or kinds[0] != _SCHEMA or _SCHEMA in kinds[1:]:
        raise MalformedMessage("an Arrow stream must hold exactly one schema, first")
    if _DICTIONARY_BATCH in kinds:
        with pa.ipc.open_stream(stream, options=_READ_OPTIONS) as dictionary_reader:
            schema = dictionary_reader.schema
            batches = list(dictionary_reader)
    else:
        schema = pa.ipc.read_schema(messages[0])
        batches = [pa.ipc.read_record_batch(message, schema) for message in messages[1:]]
    for batch in batches:
        batch.validate(full=True)
    return schema, batches, len(messages)


def check_field_names(schema: pa.Schema) -> None:
    """Refuse field names (nested ones too) that are not UTF-8: Arrow allows any bytes, but
    pyarrow decodes a name whenever Python touches the field, failing there instead of here."""
    types = []
    try:
        for field in schema:
            _ = field.name
            types.append(field.type)
        while types:
            kind = types.pop()
            if isinstance(kind, pa.ExtensionType):
                types.append(kind.storage_type)
            elif isinstance(kind, pa.DictionaryType):
                types.append(kind.value_type)
            else:
                for index in range(kind.num_fields):
                    field = kind.field(index)
                    _ = field.name
                    types.append(field.type)
    except UnicodeDecodeError as exc:
        raise MalformedMessage(f"an Arrow field name is not UTF-8: {exc}") from exc


def _one_row_binary(data: pa.Buffer) -> pa.Array:
    offsets = pa.py_buffer(_OFFSETS.pack(0, data.size))
    return pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, data])


@lru_cache(maxsize=64)
def data_schema(blocks: int) -> pa.Schema:
    """The data stream's columns: per block an alignment pad named "", then the block "<i>"."""
    fields = []
    for index in range(blocks):
        fields.append(pa.field("", pa.large_binary(), nullable=False))
        fields.append(pa.field(str(index), pa.large_binary(), nullable=False))
    return pa.schema(fields)


def is_data_schema(schema: pa.Schema) -> bool:
    """Whether a received schema is `data_schema(n)`, checked without building one for n."""
    if len(schema) % 2:
        return False
    binary = pa.large_binary()
    return all(
        field.type == binary and field.name == ("" if index % 2 == 0 else str(index // 2))
        for index, field in enumerate(schema)
    )


@lru_cache(maxsize=64)
def _data_body_offset(blocks: int) -> int:
    """Where the batch body starts in a data stream: its metadata size depends only on the
    number of columns (flatbuffer structs of fixed width), so one dry run with empty blocks
    tells it for every message with that many blocks."""
    sink = Gather()
    schema = data_schema(blocks)
    empty = _one_row_binary(pa.py_buffer(b""))
    batch = pa.RecordBatch.from_arrays([empty] * len(schema), schema=schema)
    write_stream(sink, schema, [batch], small=True)
    return sink.size - len(_EOS) - len(schema) * _OFFSETS.size


def data_batch(blocks: list[pa.Buffer], stream_start: int) -> tuple[pa.Schema, pa.RecordBatch]:
    """The data stream's schema and batch for a stream written at `stream_start` in the message,
    each block preceded by the zero pad that puts it at a multiple of BLOCK_ALIGNMENT."""
    schema = data_schema(len(blocks))
    position = stream_start + _data_body_offset(len(blocks))
    offsets = pa.py_buffer(struct.pack(f"<{2 * len(blocks)}q", *_offset_pairs(blocks)))
    binary = pa.large_binary()
    columns = []
    for index, block in enumerate(blocks):
        # body order: pad offsets (16), pad bytes, block offsets (16), block bytes (to 8)
        pad = -(position + 2 * _OFFSETS.size) % BLOCK_ALIGNMENT
        columns.append(_PADS[pad // 8])
        columns.append(
            pa.Array.from_buffers(binary, 1, [None, offsets.slice(16 * index, 16), block])
        )
        position += 2 * _OFFSETS.size + pad + block.size + (-block.size % 8)
    return schema, pa.RecordBatch.from_arrays(columns, schema=schema)


def _offset_pairs(blocks: list[pa.Buffer]) -> Iterable[int]:
    for block in blocks:
        yield 0
        yield block.size


_PADS = [_one_row_binary(_ZEROS.slice(0, size)) for size in range(0, BLOCK_ALIGNMENT, 8)]
