"""A read-only decoder of Yjs v1 updates and state vectors, to inspect an update before applying it.

pycrdt applies updates but does not show what is inside them. The write rules need to know which
Yjs clients an update creates items for, which items it references (origins and parents), and which
items its delete set removes; this module reads exactly that from the lib0 encoding
(yjs `src/utils/encoding.js`, `UpdateDecoderV1`), and nothing more.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from lattica_ray.view.errors import MalformedUpdate

# Content references (yjs `contentRefs`); 0 is GC and 10 is Skip, which are not items.
GC = 0
CONTENT_DELETED = 1
CONTENT_JSON = 2
CONTENT_BINARY = 3
CONTENT_STRING = 4
CONTENT_EMBED = 5
CONTENT_FORMAT = 6
CONTENT_TYPE = 7
CONTENT_ANY = 8
CONTENT_DOC = 9
SKIP = 10

TYPE_XML_ELEMENT = 3  # yjs typeRefs that carry a node name
TYPE_XML_HOOK = 5

BIT_ORIGIN = 0x80
BIT_RIGHT_ORIGIN = 0x40
BIT_PARENT_SUB = 0x20
CONTENT_MASK = 0x1F

MAX_ANY_DEPTH = 32  # nesting of lib0 Any values we follow before calling the update malformed


@dataclass(frozen=True)
class ItemId:
    client: int
    clock: int


@dataclass(frozen=True)
class Struct:
    """One block of an update: an item, or a GC/Skip run."""

    client: int
    clock: int
    length: int
    content: int  # one of the content references above (GC and SKIP included)
    origin: ItemId | None = None
    right_origin: ItemId | None = None
    parent_name: str | None = None  # a root type, by name
    parent_id: ItemId | None = None  # a nested type, by the ID of the item holding it
    parent_sub: str | None = None  # the map key, when the parent is a map

    @property
    def end(self) -> int:
        return self.clock + self.length


@dataclass
class DecodedUpdate:
    structs: list[Struct] = field(default_factory=list)
    delete_set: dict[int, list[tuple[int, int]]] = field(
        default_factory=dict
    )  # client -> (clock, len)

    def clock_ranges(self) -> dict[int, tuple[int, int]]:
        """client -> (first clock, end clock) of the structs in this update."""
        ranges: dict[int, tuple[int, int]] = {}
        for s in self.structs:
            start, end = ranges.get(s.client, (s.clock, s.end))
            ranges[s.client] = (min(start, s.clock), max(end, s.end))
        return ranges


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise MalformedUpdate("update ends unexpectedly")
        value = self.data[self.pos]
        self.pos += 1
        return value

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise MalformedUpdate("update ends inside a field")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint(self) -> int:
        value = 0
        shift = 0
        while True:
            byte = self.byte()
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7
            if shift > 63:
                raise MalformedUpdate("varint longer than 64 bits")

    def int(self) -> int:
        """lib0 signed varint: sign in bit 6 of the first byte."""
        byte = self.byte()
        value = byte & 0x3F
        negative = bool(byte & 0x40)
        shift = 6
        while byte & 0x80:
            byte = self.byte()
            value |= (byte & 0x7F) << shift
            shift += 7
            if shift > 70:
                raise MalformedUpdate("signed varint too long")
        return -value if negative else value

    def string(self) -> str:
        raw = self.take(self.uint())
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedUpdate("string is not UTF-8") from exc

    def any(self, depth: int = 0) -> object:
        if depth > MAX_ANY_DEPTH:
            raise MalformedUpdate("value nested too deeply")
        tag = self.byte()
        if tag in (127, 126):
            return None
        if tag == 125:
            return self.int()
        if tag == 124:
            return struct.unpack(">f", self.take(4))[0]
        if tag == 123:
            return struct.unpack(">d", self.take(8))[0]
        if tag == 122:
            return struct.unpack(">q", self.take(8))[0]
        if tag in (121, 120):
            return tag == 120
        if tag == 119:
            return self.string()
        if tag == 118:
            return {self.string(): self.any(depth + 1) for _ in range(self._count())}
        if tag == 117:
            return [self.any(depth + 1) for _ in range(self._count())]
        if tag == 116:
            return self.take(self.uint())
        raise MalformedUpdate(f"unknown value tag {tag}")

    def _count(self) -> int:
        count = self.uint()
        if count > len(self.data) - self.pos:  # every element takes at least one byte
            raise MalformedUpdate("element count exceeds the update's size")
        return count

    def item_id(self) -> ItemId:
        return ItemId(self.uint(), self.uint())

    @property
    def done(self) -> bool:
        return self.pos >= len(self.data)


def _content_length(reader: _Reader, ref: int) -> int:
    """Skip one item's content; return its length in clock units."""
    if ref == CONTENT_DELETED:
        return reader.uint()
    if ref == CONTENT_JSON:
        count = reader._count()
        for _ in range(count):
            reader.string()
        return count
    if ref == CONTENT_BINARY:
        reader.take(reader.uint())
        return 1
    if ref == CONTENT_STRING:
        text = reader.string()
        return len(text.encode("utf-16-le")) // 2  # Yjs counts UTF-16 code units
    if ref == CONTENT_EMBED:
        reader.string()
        return 1
    if ref == CONTENT_FORMAT:
        reader.string()
        reader.string()
        return 1
    if ref == CONTENT_TYPE:
        type_ref = reader.uint()
        if type_ref in (TYPE_XML_ELEMENT, TYPE_XML_HOOK):
            reader.string()
        return 1
    if ref == CONTENT_ANY:
        count = reader._count()
        for _ in range(count):
            reader.any()
        return count
    if ref == CONTENT_DOC:
        reader.string()
        reader.any()
        return 1
    raise MalformedUpdate(f"unknown content reference {ref}")


def decode_update(update: bytes) -> DecodedUpdate:
    """Parse a Yjs v1 update; `MalformedUpdate` if it is truncated, padded or inconsistent."""
    reader = _Reader(update)
    decoded = DecodedUpdate()
    seen_clients: set[int] = set()
    for _ in range(reader._count()):
        count = reader._count()
        client = reader.uint()
        clock = reader.uint()
        if client in seen_clients:
            raise MalformedUpdate(f"client {client} appears twice in the struct section")
        seen_clients.add(client)
        for _ in range(count):
            info = reader.byte()
            ref = info & CONTENT_MASK
            if ref in (GC, SKIP):
                length = reader.uint()
                decoded.structs.append(Struct(client, clock, length, ref))
            else:
                origin = reader.item_id() if info & BIT_ORIGIN else None
                right_origin = reader.item_id() if info & BIT_RIGHT_ORIGIN else None
                parent_name = parent_id = parent_sub = None
                if origin is None and right_origin is None:
                    if reader.uint() == 1:
                        parent_name = reader.string()
                    else:
                        parent_id = reader.item_id()
                    if info & BIT_PARENT_SUB:
                        parent_sub = reader.string()
                length = _content_length(reader, ref)
                decoded.structs.append(
                    Struct(
                        client,
                        clock,
                        length,
                        ref,
                        origin,
                        right_origin,
                        parent_name,
                        parent_id,
                        parent_sub,
                    )
                )
            if length <= 0:
                raise MalformedUpdate("a struct of length 0")
            clock += length
    for _ in range(reader._count()):
        client = reader.uint()
        ranges = [(reader.uint(), reader.uint()) for _ in range(reader._count())]
        if client in decoded.delete_set:
            raise MalformedUpdate(f"client {client} appears twice in the delete set")
        decoded.delete_set[client] = ranges
    if not reader.done:
        raise MalformedUpdate(f"{len(update) - reader.pos} bytes after the delete set")
    return decoded


def decode_state_vector(data: bytes) -> dict[int, int]:
    """A Yjs state vector (client -> next clock), as `Doc.get_state()` encodes it."""
    reader = _Reader(data)
    state = {}
    for _ in range(reader._count()):
        client = reader.uint()
        state[client] = reader.uint()
    if not reader.done:
        raise MalformedUpdate("bytes after the state vector")
    return state
