"""The `/lattica-ray/rpc/1` wire protocol: frames and per-call state machines, with no I/O.

One call is one stream (so calls never wait behind each other and need no shared writer lock).
Both directions are a sequence of frames::

    frame   = type:u8  length:uvarint  body[length]

    type    0x01 HEADER   client -> server, first frame: `CallHeader` protobuf (method, kind,
                          timeout in microseconds relative to receipt, string metadata)
            0x02 MESSAGE  either way: one codec-encoded message (Arrow IPC from `rpc.codec`)
            0x03 END      client -> server, empty: the client sends no more messages
            0x04 STATUS   server -> client, last frame: `CallStatus` protobuf (code, message,
                          error type and traceback as text)
            0x05 CANCEL   client -> server, empty: abandon the call (a stream reset does the same)

    client: HEADER  MESSAGE(arguments)  MESSAGE(request)*  END  [CANCEL]
    server: MESSAGE(response)*  STATUS

The first client message holds the call's arguments; client-streaming and bidirectional calls
follow it with request messages. Unary and client-streaming calls answer with exactly one
message before an OK status. The client keeps its side open after END until it has the STATUS,
so the server can still see CANCEL or a reset and cancel the handler; it closes (FIN) after.

A MESSAGE body is written as the codec's buffers one by one (never joined when large) and is
received into one buffer preallocated at the announced length, after the length was checked
against the limit, so decoding is zero-copy and an oversized message is refused before any of it
is buffered. Large transfers are streams of messages, so memory stays bounded by the stream's
flow-control window and the few messages in flight.

`ClientCall` and `ServerCall` turn bytes into events and events into bytes, and raise
`ProtocolError` when the peer breaks these rules; `lattica_ray.rpc.service` does the I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum, IntEnum

from google.protobuf.message import DecodeError

from lattica_ray.rpc.buffers import receive_buffers
from lattica_ray.rpc.errors import (
    ERROR_BY_CODE,
    MessageTooLarge,
    ProtocolError,
    RemoteError,
    RpcError,
    StatusCode,
)
from lattica_ray.rpc.pb import rpc_pb2
from transport.varint import VarintError, encode_varint, try_decode_varint

PROTOCOL_ID = "/lattica-ray/rpc/1"
MAX_CONTROL_FRAME_SIZE = 64 * 1024  # HEADER and STATUS bodies (metadata, tracebacks)
MAX_METHOD_NAME_LENGTH = 256
MAX_TRACEBACK_LENGTH = 16 * 1024  # a longer remote traceback is cut (it is diagnostics)
_MAX_PREFIX = 1 + 9  # type byte + the longest varint

LAZY_ALLOCATION_FROM = 1024 * 1024  # bodies this large get memory the OS commits as it fills

Buffer = bytes | bytearray | memoryview
ReceiveBuffer = bytearray | memoryview  # a received body: writable, one piece, exact length


class FrameType(IntEnum):
    HEADER = 0x01
    MESSAGE = 0x02
    END = 0x03
    STATUS = 0x04
    CANCEL = 0x05


_FRAME_TYPES = {int(t): t for t in FrameType}


class CallKind(IntEnum):
    """The shape of a call: who sends a stream of messages."""

    UNARY = 0
    SERVER_STREAM = 1
    CLIENT_STREAM = 2
    BIDI_STREAM = 3

    @property
    def client_streams(self) -> bool:
        return bool(self & 2)  # CLIENT_STREAM, BIDI_STREAM

    @property
    def server_streams(self) -> bool:
        return bool(self & 1)  # SERVER_STREAM, BIDI_STREAM


# -- events -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Header:
    """A call starts: which method, what shape, how long it may run, with what metadata."""

    method: str
    kind: CallKind
    timeout: float | None = None  # seconds, relative to receipt; None = no deadline
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Message:
    """One whole message; `payload` is the receive buffer itself, ready for zero-copy decode."""

    payload: ReceiveBuffer


@dataclass(frozen=True, slots=True)
class End:
    """The client sends no more messages."""


@dataclass(frozen=True, slots=True)
class Cancel:
    """The client abandoned the call."""

    reason: str = "cancelled by the caller"


@dataclass(frozen=True, slots=True)
class Status:
    """The call's outcome; the last frame from the server."""

    code: StatusCode
    message: str = ""
    error_type: str = ""
    traceback: str = ""

    @property
    def ok(self) -> bool:
        return self.code == StatusCode.OK

    def to_error(self, method: str = "", peer: object = None) -> RpcError:
        """The exception this status stands for on the caller's side (never unpickled)."""
        error_class = ERROR_BY_CODE.get(self.code, RemoteError)
        return error_class(
            self.message or f"call failed with status {self.code.name}",
            method=method,
            peer=peer,
            remote_type=self.error_type,
            remote_traceback=self.traceback,
        )


Event = Header | Message | End | Cancel | Status


# -- frames -----------------------------------------------------------------------------------
def frame_prefix(frame_type: FrameType, length: int) -> bytes:
    if length < 0x80:
        return bytes((frame_type, length))
    if length < 0x4000:  # a two-byte length: small messages, written inline
        return bytes((frame_type, length & 0x7F | 0x80, length >> 7))
    return bytes((frame_type,)) + encode_varint(length)


def encode_frame(frame_type: FrameType, body: bytes = b"") -> bytes:
    return frame_prefix(frame_type, len(body)) + body


class _Memo:
    """A bounded memo of pure encode/decode results: a caller repeats the same few calls, and
    their control frames need not go through protobuf each time. Emptied when full."""

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self.entries: dict[object, object] = {}

    def get(self, key: object) -> object:
        return self.entries.get(key)

    def put(self, key: object, value: object) -> None:
        if len(self.entries) >= self.size:
            self.entries.clear()
        self.entries[key] = value


_HEADER_FRAMES = _Memo()  # (method, kind, timeout) -> HEADER frame, calls without metadata
_HEADERS = _Memo()  # HEADER body -> its Header, for headers without metadata (immutable then)
_MEMO_BODY_MAX = 512  # bodies longer than this are not memoized


def encode_header(header: Header) -> bytes:
    """The HEADER frame of a call (ValueError for a bad method name or oversized metadata)."""
    key = None if header.metadata else (header.method, header.kind, header.timeout)
    if key is not None:
        frame = _HEADER_FRAMES.entries.get(key)
        if frame is not None:
            return frame  # type: ignore[return-value]
    frame = _encode_header(header)
    if key is not None:
        _HEADER_FRAMES.put(key, frame)
    return frame


def _encode_header(header: Header) -> bytes:
    if not header.method or len(header.method.encode()) > MAX_METHOD_NAME_LENGTH:
        raise ValueError(f"method name must be 1..{MAX_METHOD_NAME_LENGTH} bytes")
    message = rpc_pb2.CallHeader(
        method=header.method, kind=int(header.kind), metadata=header.metadata
    )
    if header.timeout is not None:
        message.timeout_us = max(0, math.ceil(header.timeout * 1_000_000))
    body = message.SerializeToString()
    if len(body) > MAX_CONTROL_FRAME_SIZE:
        raise ValueError(f"call header of {len(body)} bytes is too large (metadata too big?)")
    return encode_frame(FrameType.HEADER, body)


def encode_status(status: Status) -> bytes:
    if status is STATUS_OK or status == STATUS_OK:
        return _STATUS_OK_FRAME
    traceback = status.traceback
    if len(traceback) > MAX_TRACEBACK_LENGTH:
        traceback = "...\n" + traceback[-MAX_TRACEBACK_LENGTH:]
    message = rpc_pb2.CallStatus(
        code=int(status.code),
        message=status.message[:MAX_TRACEBACK_LENGTH],
        error_type=status.error_type[:MAX_METHOD_NAME_LENGTH],
        traceback=traceback,
    )
    return encode_frame(FrameType.STATUS, message.SerializeToString())


def decode_header(body: Buffer) -> Header:
    """The call header in a HEADER body, checked; ProtocolError if malformed."""
    key = bytes(body) if len(body) <= _MEMO_BODY_MAX else None
    header = _HEADERS.entries.get(key) if key is not None else None
    if header is not None:
        return header  # type: ignore[return-value]
    header = _decode_header(body)
    if key is not None and not header.metadata:
        _HEADERS.put(key, header)  # shared: its empty metadata must never be filled in
    return header


def _decode_header(body: Buffer) -> Header:
    message = rpc_pb2.CallHeader()
    try:
        message.ParseFromString(bytes(body))
    except DecodeError as exc:
        raise ProtocolError(f"malformed call header: {exc}") from exc
    if not message.method or len(message.method.encode()) > MAX_METHOD_NAME_LENGTH:
        raise ProtocolError(f"call header names no method, or one over {MAX_METHOD_NAME_LENGTH}B")
    try:
        kind = CallKind(message.kind)
    except ValueError:
        raise ProtocolError(f"unknown call kind {message.kind}") from None
    timeout = message.timeout_us / 1_000_000 if message.HasField("timeout_us") else None
    return Header(message.method, kind, timeout, dict(message.metadata))


def decode_status(body: Buffer) -> Status:
    if not len(body):  # OK, nothing else: protobuf writes no field at its default
        return STATUS_OK
    message = rpc_pb2.CallStatus()
    try:
        message.ParseFromString(bytes(body))
    except DecodeError as exc:
        raise ProtocolError(f"malformed call status: {exc}") from exc
    try:
        code = StatusCode(message.code)
    except ValueError:
        code = StatusCode.UNKNOWN
    return Status(code, message.message, message.error_type, message.traceback)


END = End()
_END_FRAME = encode_frame(FrameType.END)
_CANCEL_FRAME = encode_frame(FrameType.CANCEL)
STATUS_OK = Status(StatusCode.OK)
_STATUS_OK_FRAME = encode_frame(FrameType.STATUS, rpc_pb2.CallStatus().SerializeToString())


# -- a small unary call's frames in one piece: what the state machines see most -------------------
def _small_message_at(data: Buffer, pos: int, end: int) -> int | None:
    """Where the body of a MESSAGE frame at `pos` starts, if that frame ends exactly at `end`
    with a one- or two-byte (minimal) length; else None."""
    if pos + 2 > end or data[pos] != FrameType.MESSAGE:
        return None
    length = data[pos + 1]
    start = pos + 2
    if length >= 0x80:
        high = data[start] if start < end else 0
        if not 0 < high < 0x80:
            return None
        length, start = length & 0x7F | high << 7, start + 1
    return start if start + length == end else None


def whole_request(data: Buffer, max_message_size: int) -> tuple[Header, ReceiveBuffer] | None:
    """(header, arguments) if `data` is exactly HEADER MESSAGE END, a small call's request
    in one read, with a small header and message; None for anything else (the frame decoder
    then takes it, and finds what is wrong with it if anything is)."""
    end = len(data) - 2
    if end < 4 or data[0] != FrameType.HEADER or data[end] != FrameType.END or data[end + 1]:
        return None
    header_end = 2 + data[1]
    if data[1] >= 0x80:
        return None
    start = _small_message_at(data, header_end, end)
    if start is None or end - start > max_message_size:
        return None
    return decode_header(data[2:header_end]), bytearray(memoryview(data)[start:end])


def whole_reply(data: Buffer) -> ReceiveBuffer | None:
    """The response if `data` is exactly a small MESSAGE and an OK STATUS (the whole reply
    to a small call in one read), else None (the frame decoder then takes it)."""
    end = len(data) - len(_STATUS_OK_FRAME)
    if end < 2 or data[end] != FrameType.STATUS or data[end + 1]:
        return None
    start = _small_message_at(data, 0, end)
    return None if start is None else bytearray(memoryview(data)[start:end])


class FrameDecoder:
    """Splits bytes into (type, body) frames, checking each length before buffering the body.

    A body is received into a buffer allocated at its announced length, so a message is copied
    exactly once (from the transport into its final buffer). Large bodies use memory that is
    committed page by page as bytes arrive, so a peer that announces a big message and sends
    little of it costs little.
    """

    def __init__(self, max_message_size: int, max_control_size: int = MAX_CONTROL_FRAME_SIZE):
        self.max_message_size = max_message_size
        self.max_control_size = max_control_size
        self._prefix = bytearray()
        self._type: FrameType | None = None
        self._body: ReceiveBuffer | None = None
        self._filled = 0

    @property
    def body_remaining(self) -> int:
        """Bytes still missing from the frame being received (a hint for read sizes)."""
        return len(self._body) - self._filled if self._body is not None else 0

    @property
    def mid_frame(self) -> bool:
        return bool(self._prefix) or self._body is not None

    def feed(self, data: Buffer) -> list[tuple[FrameType, ReceiveBuffer]]:
        frames: list[tuple[FrameType, ReceiveBuffer]] = []
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        pos, end = 0, len(view)
        while pos < end:
            if self._body is None:
                prefix = None if self._prefix else self._parse_prefix(view, pos)
                if prefix is None:  # split across reads: collect it byte-exactly
                    pos = self._take_prefix(view, pos)
                    if self._body is None:
                        break
                else:
                    frame_type, length, pos = prefix
                    if length <= end - pos and length < LAZY_ALLOCATION_FROM:  # whole and small
                        frames.append((frame_type, bytearray(view[pos : pos + length])))
                        pos += length
                        continue
                    self._type, self._body, self._filled = frame_type, allocate(length), 0
            body = self._body
            take = min(len(body) - self._filled, end - pos)
            if take:
                body[self._filled : self._filled + take] = view[pos : pos + take]
                self._filled += take
                pos += take
            if self._filled == len(body):
                assert self._type is not None
                frames.append((self._type, body))
                self._body, self._type, self._filled = None, None, 0
        if self._body is not None and self._filled == len(self._body):  # zero-length frame
            assert self._type is not None
            frames.append((self._type, self._body))
            self._body, self._type, self._filled = None, None, 0
        return frames

    def _parse_prefix(self, data: Buffer, pos: int) -> tuple[FrameType, int, int] | None:
        """(type, checked body length, body start) of the frame at `pos`; None if truncated."""
        frame_type = _FRAME_TYPES.get(data[pos])
        if frame_type is None:
            raise ProtocolError(f"unknown frame type 0x{data[pos]:02x}")
        if pos + 1 < len(data) and data[pos + 1] < 0x80:  # a one-byte length (always minimal)
            length, start = data[pos + 1], pos + 2
        elif pos + 2 < len(data) and 0 < data[pos + 2] < 0x80:  # two bytes, minimal
            length, start = data[pos + 1] & 0x7F | data[pos + 2] << 7, pos + 3
        else:
            try:
                decoded = try_decode_varint(data, pos + 1)
            except VarintError as exc:
                raise ProtocolError(f"bad frame length: {exc}") from exc
            if decoded is None:
                return None
            length, start = decoded
        if frame_type == FrameType.MESSAGE:
            if length > self.max_message_size:
                raise MessageTooLarge(length, self.max_message_size, "received message")
        elif frame_type in (FrameType.END, FrameType.CANCEL):
            if length:
                raise ProtocolError(f"{frame_type.name} frame must be empty, got {length} bytes")
        elif length > self.max_control_size:
            raise ProtocolError(
                f"{frame_type.name} frame of {length} bytes exceeds {self.max_control_size}"
            )
        return frame_type, length, start

    def _take_prefix(self, view: memoryview, pos: int) -> int:
        """Consume prefix bytes from `view[pos:]`; set up the body once the prefix is whole."""
        had = len(self._prefix)
        self._prefix += view[pos : pos + _MAX_PREFIX - had]
        prefix = self._parse_prefix(self._prefix, 0)
        if prefix is None:
            return pos + len(self._prefix) - had
        frame_type, length, body_start = prefix
        self._prefix.clear()
        self._type, self._body, self._filled = frame_type, allocate(length), 0
        return pos + body_start - had


def allocate(length: int) -> ReceiveBuffer:
    """A writable buffer of `length` bytes; large ones from the pool of mapped buffers, or
    uninitialised (pages committed on write): `lattica_ray.rpc.buffers`."""
    if length < LAZY_ALLOCATION_FROM:
        return bytearray(length)
    return receive_buffers.take(length)


def _nbytes(buffers: Sequence[Buffer]) -> int:
    return sum(memoryview(b).nbytes for b in buffers)


def message_frame(buffers: Sequence[Buffer], max_message_size: int) -> list[Buffer]:
    """A MESSAGE frame as a list of buffers to write in order (the payload is not copied)."""
    if len(buffers) == 1:
        size = memoryview(buffers[0]).nbytes
    else:
        size = _nbytes(buffers)
    if size > max_message_size:
        raise MessageTooLarge(size, max_message_size, "message to send")
    return [frame_prefix(FrameType.MESSAGE, size), *buffers]


# -- call state machines ----------------------------------------------------------------------
class _Phase(Enum):
    AWAIT_HEADER = "awaiting header"
    AWAIT_ARGUMENTS = "awaiting arguments"
    AWAIT_END = "awaiting end of requests"
    STREAMING = "receiving requests"
    ENDED = "requests ended"
    CANCELLED = "cancelled"


class ServerCall:
    """The server's side of one call: checks the client's frames, frames the replies."""

    def __init__(self, max_message_size: int, max_control_size: int = MAX_CONTROL_FRAME_SIZE):
        self.max_message_size = max_message_size
        self.max_control_size = max_control_size
        self._decoder: FrameDecoder | None = None  # made for the first read not taken whole
        self._phase = _Phase.AWAIT_HEADER
        self.header: Header | None = None
        self.status_sent = False

    @property
    def receiving(self) -> bool:
        """True while the client may still send messages or END."""
        return self._phase in (_Phase.AWAIT_HEADER, _Phase.AWAIT_ARGUMENTS, _Phase.STREAMING)

    @property
    def body_remaining(self) -> int:
        return 0 if self._decoder is None else self._decoder.body_remaining

    def receive_whole(self, data: Buffer) -> tuple[Header, ReceiveBuffer] | None:
        """(header, arguments) if `data`, the call's first bytes, is its whole request (see
        `whole_request`), as `receive_data` would have given them (with END after); else None
        and nothing was received (give `data` to `receive_data`)."""
        if self._decoder is not None or self._phase is not _Phase.AWAIT_HEADER:
            return None
        if len(data) > 1 and data[1] > self.max_control_size:
            return None  # a HEADER over its limit: the frame decoder refuses it
        whole = whole_request(data, self.max_message_size)
        if whole is not None:
            self.header = whole[0]
            self._phase = _Phase.ENDED
        return whole

    def receive_data(self, data: Buffer) -> list[Event]:
        decoder = self._decoder
        if decoder is None:
            whole = self.receive_whole(data)
            if whole is not None:  # what the frames would give, one by one
                return [whole[0], Message(whole[1]), END]
            decoder = self._decoder = FrameDecoder(self.max_message_size, self.max_control_size)
        return [self._on_frame(t, body) for t, body in decoder.feed(data)]

    def receive_eof(self) -> list[Event]:
        """The client closed its side: fine after END, an abandoned call before it."""
        if self._phase in (_Phase.ENDED, _Phase.CANCELLED):
            return []
        self._phase = _Phase.CANCELLED
        return [Cancel("the caller closed its side before the end of its requests")]

    def _on_frame(self, frame_type: FrameType, body: ReceiveBuffer) -> Event:
        phase = self._phase
        if frame_type == FrameType.CANCEL and phase != _Phase.AWAIT_HEADER:
            self._phase = _Phase.CANCELLED
            return Cancel()
        if phase == _Phase.AWAIT_HEADER:
            if frame_type != FrameType.HEADER:
                raise ProtocolError(f"expected HEADER first, got {frame_type.name}")
            self.header = decode_header(body)
            self._phase = _Phase.AWAIT_ARGUMENTS
            return self.header
        assert self.header is not None
        if frame_type == FrameType.MESSAGE and phase in (_Phase.AWAIT_ARGUMENTS, _Phase.STREAMING):
            if phase == _Phase.AWAIT_ARGUMENTS:
                streaming = self.header.kind.client_streams
                self._phase = _Phase.STREAMING if streaming else _Phase.AWAIT_END
            return Message(body)
        if frame_type == FrameType.END and phase in (_Phase.AWAIT_END, _Phase.STREAMING):
            self._phase = _Phase.ENDED
            return END
        raise ProtocolError(f"unexpected {frame_type.name} frame while {phase.value}")

    def send_message(self, buffers: Sequence[Buffer]) -> list[Buffer]:
        if self.status_sent:
            raise RuntimeError("message after the call's status")
        return message_frame(buffers, self.max_message_size)

    def send_status(self, status: Status) -> bytes:
        if self.status_sent:
            raise RuntimeError("the call's status was already sent")
        self.status_sent = True
        return encode_status(status)


class ClientCall:
    """The caller's side of one call: frames the requests, checks the server's frames."""

    def __init__(
        self,
        header: Header,
        max_message_size: int,
        max_control_size: int = MAX_CONTROL_FRAME_SIZE,
    ) -> None:
        self.header = header
        self.max_message_size = max_message_size
        self.max_control_size = max_control_size
        self._decoder: FrameDecoder | None = None  # made for the first read not taken whole
        self._messages_sent = 0
        self._messages_received = 0
        self.ended = False  # END sent
        self.status: Status | None = None

    @property
    def body_remaining(self) -> int:
        return 0 if self._decoder is None else self._decoder.body_remaining

    def start(self) -> bytes:
        return encode_header(self.header)

    def send_message(self, buffers: Sequence[Buffer]) -> list[Buffer]:
        if self.ended:
            raise RuntimeError("message after END")
        if self._messages_sent and not self.header.kind.client_streams:
            raise RuntimeError(f"a {self.header.kind.name} call sends one message")
        self._messages_sent += 1
        return message_frame(buffers, self.max_message_size)

    def start_whole(self, buffers: Sequence[Buffer], below: int) -> bytes | None:
        """HEADER, the arguments `buffers` and END in one piece, for a call that sends nothing
        after its arguments (not client-streaming) when that piece is under `below` bytes; None
        otherwise (then `start`, `send_message` and `send_end`)."""
        if self.header.kind.client_streams:
            return None
        size = memoryview(buffers[0]).nbytes if len(buffers) == 1 else _nbytes(buffers)
        if size >= below:
            return None
        head = encode_header(self.header)
        prefix = frame_prefix(FrameType.MESSAGE, size)
        if len(head) + len(prefix) + size + len(_END_FRAME) >= below:
            return None
        if size > self.max_message_size:
            raise MessageTooLarge(size, self.max_message_size, "message to send")
        self._messages_sent = 1
        self.ended = True
        return b"".join((head, prefix, *buffers, _END_FRAME))

    def send_end(self) -> bytes:
        if self.ended or not self._messages_sent:
            raise RuntimeError("END needs the arguments message first, and only once")
        self.ended = True
        return _END_FRAME

    def send_cancel(self) -> bytes:
        return _CANCEL_FRAME

    def receive_whole(self, data: Buffer) -> ReceiveBuffer | None:
        """The response if `data`, the first bytes from the server, is the whole reply to a
        call with one response (see `whole_reply`): as `receive_data` would have given it,
        with an OK status after. Else None and nothing was received (give `data` to
        `receive_data`)."""
        if (
            self._decoder is not None
            or self.status is not None
            or self._messages_received
            or self.header.kind.server_streams
        ):
            return None
        response = whole_reply(data)
        if response is not None and len(response) > self.max_message_size:
            return None  # over the caller's limit: the frame decoder refuses it
        if response is not None:
            self._messages_received = 1
            self.status = STATUS_OK
        return response

    def receive_data(self, data: Buffer) -> list[Event]:
        decoder = self._decoder
        if decoder is None:
            response = self.receive_whole(data)
            if response is not None:  # what the frames would give, one by one
                return [Message(response), STATUS_OK]
            decoder = self._decoder = FrameDecoder(self.max_message_size, self.max_control_size)
        return [self._on_frame(t, body) for t, body in decoder.feed(data)]

    def receive_eof(self) -> list[Event]:
        if self.status is None:
            raise ProtocolError("the server closed the stream without a status")
        return []

    def _on_frame(self, frame_type: FrameType, body: ReceiveBuffer) -> Event:
        if self.status is not None:
            raise ProtocolError(f"{frame_type.name} frame after the call's status")
        single_response = not self.header.kind.server_streams
        if frame_type == FrameType.MESSAGE:
            if single_response and self._messages_received:
                raise ProtocolError(f"second response to a {self.header.kind.name} call")
            self._messages_received += 1
            return Message(body)
        if frame_type == FrameType.STATUS:
            status = decode_status(body)
            if status.ok and single_response and not self._messages_received:
                raise ProtocolError(f"{self.header.kind.name} call ended OK without a response")
            self.status = status
            return status
        raise ProtocolError(f"unexpected {frame_type.name} frame from the server")
