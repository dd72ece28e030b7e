"""The compact data section of small codec messages: data blocks back to back, no Arrow IPC.

For a message whose data blocks are small (a few bytes values, small arrays), writing and
validating an Arrow IPC stream costs more than everything else in a call. Such a message
carries its blocks in this section instead (flag `FLAG_RAW_DATA` of `rpc.codec`), where
stream 0 would otherwise be::

    block count u32 | reserved u32 (0) | block length u64 x count
    block 0 | zero pad | block 1 | ...  (each block starts at a multiple of RAW_ALIGNMENT
                                         from the message start)
    [zero pad]                          (only if Arrow streams follow: the section then ends
                                         at a multiple of STREAM_ALIGNMENT, so their buffers,
                                         read zero-copy, stay aligned; else it ends with the
                                         last block)

Everything is little-endian. The reader derives every block's place from the lengths alone,
so a block can neither overlap another nor leave the section, and the pads must be zero: a
message has one encoding, and hides no bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from lattica_ray.rpc.codec_errors import LimitExceeded, MalformedMessage

RAW_DATA_MAX = 64 * 1024  # blocks totalling less than this travel raw; larger ones as Arrow IPC
RAW_ALIGNMENT = 64  # as the blocks of the Arrow data stream (codec_ipc.BLOCK_ALIGNMENT)
STREAM_ALIGNMENT = 8  # where an Arrow IPC stream after the section starts (Arrow's alignment)
_COUNT = struct.Struct("<II")
_ZEROS = bytes(RAW_ALIGNMENT)

Buffer = bytes | bytearray | memoryview


def raw_layout(
    sizes: Sequence[int], section_start: int, streams_follow: bool = False
) -> tuple[bytes, list[int], int]:
    """Where blocks of `sizes` go in a section written at `section_start`: the block table,
    the zero pad before each block, and the pad after the last one."""
    table = _COUNT.pack(len(sizes), 0) + struct.pack(f"<{len(sizes)}Q", *sizes)
    pads = []
    position = section_start + len(table)
    for size in sizes:
        pad = -position % RAW_ALIGNMENT
        pads.append(pad)
        position += pad + size
    return table, pads, -position % STREAM_ALIGNMENT if streams_follow else 0


def raw_section(
    blocks: Sequence[Buffer], section_start: int, streams_follow: bool = False
) -> bytes:
    """The section for `blocks`, to be written at offset `section_start` of the message
    (`streams_follow`: Arrow streams come after it, so its end is padded to align them)."""
    table, pads, tail = raw_layout([len(b) for b in blocks], section_start, streams_follow)
    parts: list[Buffer] = [table]
    for block, pad in zip(blocks, pads, strict=True):
        if pad:
            parts.append(_ZEROS[:pad])
        parts.append(block)
    if tail:
        parts.append(_ZEROS[:tail])
    return b"".join(parts)


def read_raw_section(
    message: memoryview, start: int, end: int, max_blocks: int, streams_follow: bool = False
) -> list[tuple[int, int]]:
    """(start, end) in `message` of each block of the section at `message[start:end]`,
    after checking the whole section; MalformedMessage or LimitExceeded otherwise."""
    if end - start < _COUNT.size:
        raise MalformedMessage("the raw data section is shorter than its block count")
    count, reserved = _COUNT.unpack_from(message, start)
    if reserved:
        raise MalformedMessage("the raw data section has non-zero reserved bits")
    if count > max_blocks:
        raise LimitExceeded("data block count", count, max_blocks, "max_buffers")
    if not count:
        raise MalformedMessage("the raw data section holds no block")
    position = start + _COUNT.size + 8 * count
    if position > end:
        raise MalformedMessage("the raw data section is truncated inside its block table")
    blocks = []
    for length in struct.unpack_from(f"<{count}Q", message, start + _COUNT.size):
        pad = -position % RAW_ALIGNMENT
        if pad and message[position : position + pad].tobytes() != _ZEROS[:pad]:
            raise MalformedMessage("a pad between raw data blocks is not zero")
        block_start = position + pad
        position = block_start + length
        if position > end:
            raise MalformedMessage("a raw data block runs past the end of the message")
        blocks.append((block_start, position))
    if streams_follow:
        pad = -position % STREAM_ALIGNMENT
        if any(message[position : min(position + pad, end)]):
            raise MalformedMessage("the pad after the raw data blocks is not zero")
        position += pad
    if position > end:
        raise MalformedMessage("the raw data section ends inside the pad after its blocks")
    if position != end:
        raise MalformedMessage(f"the raw data section has {end - position} bytes after its blocks")
    return blocks
