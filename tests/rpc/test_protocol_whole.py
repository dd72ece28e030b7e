"""A small call's frames in one read (HEADER MESSAGE END to the server; MESSAGE and an OK
STATUS back) are parsed in one step: the events, the state after them and the errors must be
exactly those of the frames taken one by one."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lattica_ray.rpc.errors import RpcError
from lattica_ray.rpc.protocol import (
    CallKind,
    ClientCall,
    FrameType,
    Header,
    Message,
    ServerCall,
    Status,
    StatusCode,
    encode_frame,
    encode_header,
    encode_status,
    frame_prefix,
    whole_reply,
    whole_request,
)

MAX = 1 << 20


def outcome(call: ServerCall | ClientCall, pieces: list[bytes]) -> tuple[object, ...]:
    """The events of `pieces` fed in order (or the error), and the state after them."""
    events: list[object] = []
    try:
        for piece in pieces:
            events += [
                (type(e).__name__, bytes(e.payload)) if isinstance(e, Message) else e
                for e in call.receive_data(piece)
            ]
    except RpcError as exc:
        events.append((type(exc).__name__, str(exc)))
    state = call._phase if isinstance(call, ServerCall) else (call.status, call._messages_received)
    return tuple(events), state


def one_by_one(data: bytes) -> list[bytes]:
    """The same bytes, split so the one-step parse cannot apply (the first byte alone)."""
    return [data[:1], data[1:]] if data else []


def request(method: str, kind: CallKind, payload: bytes, metadata: dict[str, str]) -> bytes:
    return (
        encode_header(Header(method, kind, 1.5, metadata))
        + frame_prefix(FrameType.MESSAGE, len(payload))
        + payload
        + encode_frame(FrameType.END)
    )


@given(
    method=st.text(min_size=0, max_size=40),
    kind=st.sampled_from(CallKind),
    payload=st.binary(max_size=300) | st.sampled_from([b"x" * 127, b"y" * 128, b"z" * 16383]),
    metadata=st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
    cut=st.integers(0, 4),
    extra=st.sampled_from([b"", b"\x03\x00", b"\x05\x00", b"\x02\x00"]),
)
def test_a_request_in_one_piece_is_parsed_as_frame_by_frame(
    method: str, kind: CallKind, payload: bytes, metadata: dict[str, str], cut: int, extra: bytes
) -> None:
    try:
        data = request(method, kind, payload, metadata)
    except ValueError:  # an empty or overlong method name: build its frame by hand
        data = (
            encode_frame(FrameType.HEADER, method.encode()[:100])
            + encode_frame(FrameType.MESSAGE, payload)
            + encode_frame(FrameType.END)
        )
    data = data[: len(data) - cut] + extra
    for limit in (MAX, len(payload), max(len(payload) - 1, 0)):
        assert outcome(ServerCall(limit), [data]) == outcome(ServerCall(limit), one_by_one(data))


def test_the_one_step_parse_takes_a_small_call_and_nothing_else() -> None:
    small = request("echo", CallKind.UNARY, b"a" * 200, {})
    whole = whole_request(small, MAX)
    assert whole is not None and whole[0].method == "echo" and bytes(whole[1]) == b"a" * 200
    assert whole_request(small, 199) is None  # too large: the decoder refuses it
    assert whole_request(small[:-1], MAX) is None
    assert whole_request(small + b"\x05\x00", MAX) is None
    nonminimal = small.replace(bytes([FrameType.MESSAGE, 0xC8, 0x01]), bytes([2, 0xC8, 0x81, 0]))
    assert whole_request(nonminimal, MAX) is None
    assert whole_request(request("echo", CallKind.UNARY, b"b" * 16384, {}), MAX) is None


@given(
    kind=st.sampled_from(CallKind),
    payload=st.binary(max_size=300) | st.sampled_from([b"x" * 127, b"y" * 128, b"z" * 16383]),
    status=st.sampled_from([Status(StatusCode.OK), Status(StatusCode.INTERNAL, "boom")]),
    cut=st.integers(0, 3),
    extra=st.sampled_from([b"", b"\x04\x00", b"\x02\x00"]),
)
def test_a_reply_in_one_piece_is_parsed_as_frame_by_frame(
    kind: CallKind, payload: bytes, status: Status, cut: int, extra: bytes
) -> None:
    data = frame_prefix(FrameType.MESSAGE, len(payload)) + payload + encode_status(status)
    data = data[: len(data) - cut] + extra
    header = Header("echo", kind)
    assert outcome(ClientCall(header, MAX), [data]) == outcome(
        ClientCall(header, MAX), one_by_one(data)
    )


def test_a_second_reply_is_not_taken_in_one_step() -> None:
    reply = frame_prefix(FrameType.MESSAGE, 3) + b"abc" + encode_status(Status(StatusCode.OK))
    assert whole_reply(reply) is not None
    call = ClientCall(Header("echo", CallKind.UNARY), MAX)
    call.receive_data(frame_prefix(FrameType.MESSAGE, 1) + b"z")
    with pytest.raises(RpcError, match="second response"):
        call.receive_data(reply)


@pytest.mark.parametrize("kind", [CallKind.UNARY, CallKind.SERVER_STREAM])
@pytest.mark.parametrize("size", [0, 100, 127, 128, 5000])
def test_a_whole_request_is_the_frames_one_by_one(kind: CallKind, size: int) -> None:
    header = Header("echo", kind, 2.0)
    arguments = [memoryview(b"a" * size)]
    piece = ClientCall(header, MAX).start_whole(arguments, 1 << 16)
    by_frames = ClientCall(header, MAX)
    frames = [by_frames.start(), *by_frames.send_message(arguments), by_frames.send_end()]
    assert piece == b"".join(bytes(frame) for frame in frames)
    server = ServerCall(MAX)
    events = server.receive_data(piece)
    assert events[0] == header and bytes(events[1].payload) == b"a" * size  # type: ignore[union-attr]


def test_a_whole_request_only_below_its_limit_and_never_for_streaming_requests() -> None:
    header = Header("echo", CallKind.UNARY)
    arguments = [b"b" * 100]
    size = len(ClientCall(header, MAX).start_whole(arguments, 1 << 16) or b"")
    assert ClientCall(header, MAX).start_whole(arguments, size) is None  # not under the limit
    assert ClientCall(header, MAX).start_whole(arguments, size + 1) is not None
    streaming = ClientCall(Header("sum", CallKind.CLIENT_STREAM), MAX)
    assert streaming.start_whole(arguments, 1 << 16) is None
    with pytest.raises(RpcError, match="exceeds the limit"):
        ClientCall(header, 50).start_whole(arguments, 1 << 16)
    sent = ClientCall(header, MAX)
    sent.start_whole(arguments, 1 << 16)
    with pytest.raises(RuntimeError):
        sent.send_message(arguments)  # the call sent its arguments and END


def test_declining_to_take_a_read_whole_leaves_the_call_as_it_was() -> None:
    """receive_whole returns None and changes nothing when the read is not a whole request
    or reply: receive_data then sees the same call it would have."""
    request_part = request("echo", CallKind.UNARY, b"q" * 10, {})[:-2]  # no END yet
    server = ServerCall(MAX)
    assert server.receive_whole(request_part) is None
    assert outcome(server, [request_part]) == outcome(ServerCall(MAX), [request_part])
    assert server.receive_whole(request_part) is None  # not the first read any more
    reply_part = frame_prefix(FrameType.MESSAGE, 3) + b"abc"  # no status yet
    client = ClientCall(Header("echo", CallKind.UNARY), MAX)
    assert client.receive_whole(reply_part) is None
    assert outcome(client, [reply_part]) == outcome(
        ClientCall(Header("echo", CallKind.UNARY), MAX), [reply_part]
    )
    streaming = ClientCall(Header("count", CallKind.SERVER_STREAM), MAX)
    assert streaming.receive_whole(reply_part + encode_status(Status(StatusCode.OK))) is None
