"""The RPC wire protocol without a network: frames, limits, and the per-call state machines."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lattica_ray.rpc import protocol as _protocol
from lattica_ray.rpc.errors import (
    DeadlineExceeded,
    InvalidArgument,
    MessageTooLarge,
    MethodNotFound,
    ProtocolError,
    RemoteError,
    ResourceExhausted,
    StatusCode,
)
from lattica_ray.rpc.protocol import (
    MAX_CONTROL_FRAME_SIZE,
    PROTOCOL_ID,
    CallKind,
    Cancel,
    ClientCall,
    End,
    FrameDecoder,
    FrameType,
    Header,
    Message,
    ServerCall,
    Status,
    decode_header,
    encode_frame,
    encode_header,
    encode_status,
    frame_prefix,
)

LIMIT = 1024


def test_protocol_id() -> None:
    assert PROTOCOL_ID == "/lattica-ray/rpc/1"


# -- frames -----------------------------------------------------------------------------------
def test_frame_layout_is_type_varint_length_body() -> None:
    assert encode_frame(FrameType.MESSAGE, b"abc") == b"\x02\x03abc"
    assert encode_frame(FrameType.END) == b"\x03\x00"
    assert frame_prefix(FrameType.MESSAGE, 300) == b"\x02\xac\x02"


frames_strategy = st.lists(
    st.one_of(
        st.binary(max_size=300).map(lambda b: (FrameType.MESSAGE, b)),
        st.just((FrameType.END, b"")),
        st.just((FrameType.CANCEL, b"")),
    ),
    max_size=20,
)


@given(frames=frames_strategy, cuts=st.lists(st.integers(min_value=0, max_value=10_000)))
def test_decoder_yields_the_same_frames_however_the_bytes_are_split(
    frames: list[tuple[FrameType, bytes]], cuts: list[int]
) -> None:
    wire = b"".join(encode_frame(t, body) for t, body in frames)
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    decoder = FrameDecoder(LIMIT)
    out = []
    for start, stop in itertools.pairwise(points):
        out += decoder.feed(wire[start:stop])
    assert [(t, bytes(b)) for t, b in out] == frames
    assert not decoder.mid_frame


def test_message_body_lands_in_one_buffer_of_the_announced_length() -> None:
    decoder = FrameDecoder(LIMIT)
    wire = encode_frame(FrameType.MESSAGE, bytes(range(200)))
    assert decoder.feed(wire[:4]) == []
    assert decoder.body_remaining == 200 - 1  # type + 2-byte varint, then 1 body byte
    (frame_type, body), *rest = decoder.feed(wire[4:])
    assert frame_type == FrameType.MESSAGE and not rest
    assert isinstance(body, bytearray) and len(body) == 200 and body == bytes(range(200))


def test_large_body_costs_memory_only_as_bytes_arrive() -> None:
    """A peer announcing 256 MiB and sending 1 KiB does not make us commit 256 MiB."""
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("needs Linux /proc/self/status")

    def rss() -> int:
        line = next(x for x in status.read_text().splitlines() if x.startswith("VmRSS"))
        return int(line.split()[1]) * 1024

    decoder = FrameDecoder(max_message_size=1 << 30)
    before = rss()
    decoder.feed(frame_prefix(FrameType.MESSAGE, 256 << 20) + b"x" * 1024)
    assert decoder.body_remaining == (256 << 20) - 1024
    assert rss() - before < 16 << 20
    [(_, body)] = decoder.feed(b"y" * decoder.body_remaining)
    assert len(body) == 256 << 20 and body[:1] == b"x" and body[-1:] == b"y"
    assert not memoryview(body).readonly  # decoded arrays over it are ordinary writable views


def test_oversized_message_refused_from_its_prefix_alone() -> None:
    decoder = FrameDecoder(max_message_size=1000)
    with pytest.raises(MessageTooLarge) as info:
        decoder.feed(frame_prefix(FrameType.MESSAGE, 1001))  # no body byte sent, none buffered
    assert info.value.size == 1001 and info.value.limit == 1000
    assert isinstance(info.value, ResourceExhausted)


def test_control_frames_have_their_own_limit() -> None:
    decoder = FrameDecoder(max_message_size=10**9)
    with pytest.raises(ProtocolError, match="HEADER frame"):
        decoder.feed(frame_prefix(FrameType.HEADER, MAX_CONTROL_FRAME_SIZE + 1))


@pytest.mark.parametrize(
    ("wire", "error"),
    [
        (b"\x09\x00", "unknown frame type 0x09"),
        (b"\x03\x01x", "END frame must be empty"),
        (b"\x05\x02xx", "CANCEL frame must be empty"),
        (b"\x02" + b"\xff" * 9 + b"\x01", "bad frame length"),
        (b"\x02\x80\x00", "bad frame length"),  # not minimally encoded
    ],
)
def test_malformed_frames_raise_protocol_error(wire: bytes, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        FrameDecoder(LIMIT).feed(wire)


# -- header and status ------------------------------------------------------------------------
def test_header_round_trips() -> None:
    header = Header("weights.get", CallKind.SERVER_STREAM, 1.5, {"trace": "abc"})
    frame = encode_header(header)
    [(frame_type, body)] = FrameDecoder(LIMIT).feed(frame)
    assert frame_type == FrameType.HEADER
    assert decode_header(body) == header


def test_header_without_timeout_has_no_deadline_and_tiny_timeouts_round_up() -> None:
    body = encode_header(Header("m", CallKind.UNARY))[2:]
    assert decode_header(body).timeout is None
    body = encode_header(Header("m", CallKind.UNARY, 1e-9))[2:]
    assert decode_header(body).timeout == 1e-6  # never rounded down to "already expired"


def test_memoized_control_frames_equal_the_protobuf_ones() -> None:
    """Headers without metadata and OK statuses skip protobuf after the first time: what
    comes out must not change, and metadata (which varies per call) is never memoized."""
    plain = Header("memo.echo", CallKind.UNARY, 30.0)
    first, again = encode_header(plain), encode_header(plain)
    assert first == again == _protocol._encode_header(plain)
    assert decode_header(first[2:]) == decode_header(again[2:]) == plain
    traced = [Header("memo.echo", CallKind.UNARY, 30.0, {"trace": str(i)}) for i in range(3)]
    frames = {encode_header(header) for header in traced}
    assert len(frames) == 3
    assert [decode_header(frame[2:]) for frame in sorted(frames)] == sorted(
        traced, key=lambda h: h.metadata["trace"]
    )
    ok = encode_status(Status(StatusCode.OK))
    assert ok == bytes((FrameType.STATUS, 0))
    [(_, body)] = FrameDecoder(LIMIT).feed(ok)
    assert _protocol.decode_status(body) == Status(StatusCode.OK)
    failed = Status(StatusCode.NOT_FOUND, "no such method", "KeyError", "Traceback...")
    [(_, body)] = FrameDecoder(LIMIT).feed(encode_status(failed))
    assert _protocol.decode_status(body) == failed


def test_header_rejects_bad_method_names_and_kinds() -> None:
    with pytest.raises(ValueError, match="method name"):
        encode_header(Header("", CallKind.UNARY))
    with pytest.raises(ValueError, match="method name"):
        encode_header(Header("x" * 300, CallKind.UNARY))
    # kind 7 on the wire: protobuf field 2 (varint) = 0x10 0x07, method "m" = 0x0a 0x01 'm'
    with pytest.raises(ProtocolError, match="unknown call kind 7"):
        decode_header(b"\x0a\x01m\x10\x07")
    with pytest.raises(ProtocolError, match="malformed call header"):
        decode_header(b"\x0a\x05m")


def test_status_maps_to_the_matching_error_class() -> None:
    assert isinstance(Status(StatusCode.NOT_FOUND, "no m").to_error("m"), MethodNotFound)
    assert isinstance(Status(StatusCode.DEADLINE_EXCEEDED).to_error(), DeadlineExceeded)
    assert isinstance(Status(StatusCode.INVALID_ARGUMENT).to_error(), InvalidArgument)
    error = Status(StatusCode.UNKNOWN, "boom", "ValueError", "Traceback...\nValueError").to_error(
        "m"
    )
    assert isinstance(error, RemoteError)
    assert error.remote_type == "ValueError" and error.message == "boom"
    assert "Traceback...\nValueError" in str(error) and error.method == "m"


def test_status_traceback_is_bounded_text() -> None:
    status = Status(StatusCode.UNKNOWN, "boom", "E", "x" * 100_000)
    [(_, body)] = FrameDecoder(LIMIT).feed(encode_status(status))
    call = ClientCall(Header("m", CallKind.SERVER_STREAM), LIMIT)
    [event] = call.receive_data(encode_frame(FrameType.STATUS, bytes(body)))
    assert isinstance(event, Status) and len(event.traceback) < 20_000
    assert event.traceback.endswith("x")


# -- server call ------------------------------------------------------------------------------
def client_bytes(kind: CallKind, *messages: bytes, end: bool = True) -> bytes:
    call = ClientCall(Header("m", kind), LIMIT)
    out = call.start()
    for message in messages:
        out += b"".join(bytes(b) for b in call.send_message([message]))
    if end:
        out += call.send_end()
    return out


def test_server_sees_header_arguments_end() -> None:
    server = ServerCall(LIMIT)
    events = server.receive_data(client_bytes(CallKind.UNARY, b"args"))
    assert events == [Header("m", CallKind.UNARY), Message(bytearray(b"args")), End()]
    assert server.receive_eof() == []  # closing after END is fine


def test_server_sees_a_client_stream() -> None:
    server = ServerCall(LIMIT)
    events = server.receive_data(client_bytes(CallKind.CLIENT_STREAM, b"a", b"r1", b"r2"))
    assert [type(e) for e in events] == [Header, Message, Message, Message, End]


def test_server_cancel_after_end_and_abandoned_call() -> None:
    server = ServerCall(LIMIT)
    server.receive_data(client_bytes(CallKind.UNARY, b"args"))
    assert server.receive_data(encode_frame(FrameType.CANCEL)) == [Cancel()]

    server = ServerCall(LIMIT)
    server.receive_data(client_bytes(CallKind.CLIENT_STREAM, b"a", b"r", end=False))
    [event] = server.receive_eof()  # closed without END: the caller gave up
    assert isinstance(event, Cancel) and "before the end" in event.reason


@pytest.mark.parametrize(
    ("wire", "error"),
    [
        (encode_frame(FrameType.MESSAGE, b"x"), "expected HEADER first"),
        (client_bytes(CallKind.UNARY, b"a", end=False) + encode_frame(FrameType.MESSAGE, b"b"),
         "unexpected MESSAGE"),
        (encode_header(Header("m", CallKind.UNARY)) + encode_frame(FrameType.END),
         "unexpected END"),
        (client_bytes(CallKind.UNARY, b"a") + encode_frame(FrameType.MESSAGE, b"b"),
         "unexpected MESSAGE"),
        (client_bytes(CallKind.UNARY, b"a") + encode_status(Status(StatusCode.OK)),
         "unexpected STATUS"),
        (client_bytes(CallKind.UNARY, b"a") + encode_header(Header("m", CallKind.UNARY)),
         "unexpected HEADER"),
    ],
)  # fmt: skip
def test_server_rejects_frames_out_of_order(wire: bytes, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        ServerCall(LIMIT).receive_data(wire)


def test_server_frames_replies_without_copying_payloads() -> None:
    server = ServerCall(LIMIT)
    payload = memoryview(bytearray(b"response"))
    chunks = server.send_message([payload])
    assert chunks[1] is payload  # the buffer itself is handed to the writer
    status = server.send_status(Status(StatusCode.OK))
    with pytest.raises(RuntimeError):
        server.send_message([b"late"])
    with pytest.raises(RuntimeError):
        server.send_status(Status(StatusCode.OK))
    assert status[0] == FrameType.STATUS


def test_send_refuses_a_message_over_the_limit() -> None:
    with pytest.raises(MessageTooLarge, match="message to send of 1025 bytes"):
        ServerCall(LIMIT).send_message([b"x" * 1000, b"y" * 25])


# -- client call ------------------------------------------------------------------------------
def server_bytes(*messages: bytes, status: Status | None = None) -> bytes:
    server = ServerCall(LIMIT)
    out = b""
    for message in messages:
        out += b"".join(bytes(b) for b in server.send_message([message]))
    return out + server.send_status(status or Status(StatusCode.OK))


def test_client_sees_response_then_status() -> None:
    client = ClientCall(Header("m", CallKind.UNARY), LIMIT)
    events = client.receive_data(server_bytes(b"result"))
    assert events == [Message(bytearray(b"result")), Status(StatusCode.OK)]
    assert client.receive_eof() == []


def test_client_sees_a_server_stream_and_an_error_status() -> None:
    client = ClientCall(Header("m", CallKind.SERVER_STREAM), LIMIT)
    failure = Status(StatusCode.UNKNOWN, "boom", "KeyError", "tb")
    events = client.receive_data(server_bytes(b"1", b"2", status=failure))
    assert events == [Message(bytearray(b"1")), Message(bytearray(b"2")), failure]


@pytest.mark.parametrize(
    ("kind", "wire", "error"),
    [
        (CallKind.UNARY, server_bytes(b"1", b"2"), "second response"),
        (CallKind.CLIENT_STREAM, server_bytes(), "ended OK without a response"),
        (CallKind.SERVER_STREAM, server_bytes() + encode_frame(FrameType.MESSAGE, b"x"),
         "after the call's status"),
        (CallKind.UNARY, encode_frame(FrameType.END), "unexpected END"),
    ],
)  # fmt: skip
def test_client_rejects_bad_replies(kind: CallKind, wire: bytes, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        ClientCall(Header("m", kind), LIMIT).receive_data(wire)


def test_client_needs_a_status_before_eof() -> None:
    client = ClientCall(Header("m", CallKind.SERVER_STREAM), LIMIT)
    client.receive_data(server_bytes(b"1")[:3])
    with pytest.raises(ProtocolError, match="without a status"):
        client.receive_eof()


def test_client_send_rules() -> None:
    unary = ClientCall(Header("m", CallKind.UNARY), LIMIT)
    with pytest.raises(RuntimeError, match="arguments message first"):
        unary.send_end()
    unary.send_message([b"args"])
    with pytest.raises(RuntimeError, match="sends one message"):
        unary.send_message([b"more"])
    unary.send_end()
    assert unary.ended
    streaming = ClientCall(Header("m", CallKind.BIDI_STREAM), LIMIT)
    for _ in range(3):
        streaming.send_message([b"r"])
    streaming.send_end()
    with pytest.raises(RuntimeError, match="after END"):
        streaming.send_message([b"late"])
    assert streaming.send_cancel() == b"\x05\x00"


def test_client_refuses_oversized_responses_before_buffering_them() -> None:
    client = ClientCall(Header("m", CallKind.UNARY), max_message_size=100)
    with pytest.raises(MessageTooLarge, match="received message of 101 bytes"):
        client.receive_data(frame_prefix(FrameType.MESSAGE, 101))


def test_call_kinds_say_who_streams() -> None:
    assert not CallKind.UNARY.client_streams and not CallKind.UNARY.server_streams
    assert CallKind.SERVER_STREAM.server_streams and not CallKind.SERVER_STREAM.client_streams
    assert CallKind.CLIENT_STREAM.client_streams and not CallKind.CLIENT_STREAM.server_streams
    assert CallKind.BIDI_STREAM.client_streams and CallKind.BIDI_STREAM.server_streams
