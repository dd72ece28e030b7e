"""The Yamux session as a pure state machine: frames, windows, limits, keepalive, bad input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transport.errors import ConnectionClosed, StreamClosed, StreamReset
from transport.yamux import (
    FLAG_ACK,
    FLAG_FIN,
    FLAG_RST,
    FLAG_SYN,
    GO_AWAY_NORMAL,
    GO_AWAY_PROTOCOL_ERROR,
    HEADER,
    INITIAL_WINDOW,
    TYPE_DATA,
    TYPE_GO_AWAY,
    TYPE_PING,
    TYPE_WINDOW_UPDATE,
    DataReceived,
    GoAwayReceived,
    PongReceived,
    SendWindowOpened,
    StreamAcknowledged,
    StreamEnded,
    StreamLimitReached,
    StreamOpened,
    StreamResetByRemote,
    WindowViolation,
    YamuxConfig,
    YamuxError,
    YamuxSession,
    encode_header,
)

QUIET = YamuxConfig(measure_rtt=False, keepalive_interval=None)


def wire(session: YamuxSession) -> bytes:
    return b"".join(bytes(chunk) for chunk in session.data_to_send())


def frames(data: bytes) -> list[tuple[int, int, int, int]]:
    """(type, flags, stream, length) of each frame in `data` (Data bodies skipped)."""
    out, position = [], 0
    while position < len(data):
        _, kind, flags, stream_id, length = HEADER.unpack_from(data, position)
        out.append((kind, flags, stream_id, length))
        position += 12 + (length if kind == TYPE_DATA else 0)
    return out


def pair(config: YamuxConfig = QUIET) -> tuple[YamuxSession, YamuxSession]:
    return YamuxSession(True, config), YamuxSession(False, config)


def exchange(a: YamuxSession, b: YamuxSession, now: float = 0.0) -> None:
    """Deliver everything queued in both directions until quiet."""
    while True:
        to_b, to_a = wire(a), wire(b)
        if not to_b and not to_a:
            return
        b.receive_data(to_b, now)
        a.receive_data(to_a, now)


def received(session: YamuxSession, stream_id: int) -> bytes:
    return b"".join(
        bytes(event.data)
        for event in session.events()
        if isinstance(event, DataReceived) and event.stream_id == stream_id
    )


def test_opening_a_stream_sends_syn_and_gets_ack() -> None:
    client, server = pair()
    stream_id = client.open_stream()
    assert stream_id == 1 and client.ack_backlog == 1
    syn = wire(client)
    assert syn == encode_header(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0)
    server.receive_data(syn)
    assert server.events() == [StreamOpened(1)]
    ack = wire(server)
    assert frames(ack) == [(TYPE_WINDOW_UPDATE, FLAG_ACK, 1, 0)]
    client.receive_data(ack)
    assert client.events() == [StreamAcknowledged(1)]
    assert client.ack_backlog == 0
    assert server.open_stream() == 2  # the listener uses even IDs
    assert client.open_stream() == 3


def test_data_flows_both_ways_and_fin_closes_each_half() -> None:
    client, server = pair()
    stream_id = client.open_stream()
    assert client.send_data(stream_id, b"hello") == 5
    exchange(client, server)
    events = server.events()
    assert events[0] == StreamOpened(stream_id)
    assert [bytes(e.data) for e in events if isinstance(e, DataReceived)] == [b"hello"]
    server.send_data(stream_id, b"world")
    server.close_stream(stream_id)
    exchange(client, server)
    events = client.events()
    assert b"".join(bytes(e.data) for e in events if isinstance(e, DataReceived)) == b"world"
    assert StreamEnded(stream_id) in events
    with pytest.raises(StreamClosed):
        server.send_data(stream_id, b"more")
    assert client.has_stream(stream_id) and server.has_stream(stream_id)  # half-open
    client.close_stream(stream_id)
    exchange(client, server)
    assert StreamEnded(stream_id) in server.events()
    assert not client.has_stream(stream_id) and not server.has_stream(stream_id)


def test_larger_initial_window_is_announced_with_syn_and_ack() -> None:
    config = YamuxConfig(measure_rtt=False, keepalive_interval=None, initial_window=1 << 20)
    client, server = pair(config)
    stream_id = client.open_stream()
    syn = wire(client)
    assert frames(syn) == [(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, (1 << 20) - INITIAL_WINDOW)]
    server.receive_data(syn)
    client.receive_data(wire(server))
    assert server.send_credit(stream_id) == 1 << 20
    assert client.send_credit(stream_id) == 1 << 20


def test_window_limits_the_sender_until_the_reader_consumes() -> None:
    client, server = pair()
    stream_id = client.open_stream()
    assert client.send_data(stream_id, bytes(300_000)) == INITIAL_WINDOW
    assert client.send_credit(stream_id) == 0
    assert client.send_data(stream_id, b"more") == 0
    exchange(client, server)
    assert len(received(server, stream_id)) == INITIAL_WINDOW
    server.stream_consumed(stream_id, 100_000, now=1.0)
    assert wire(server) == b""  # less than half the window: not worth a frame yet
    server.stream_consumed(stream_id, 50_000, now=1.0)
    update = wire(server)
    assert frames(update) == [(TYPE_WINDOW_UPDATE, 0, stream_id, 150_000)]
    client.receive_data(update)
    assert SendWindowOpened(stream_id) in client.events()
    assert client.send_credit(stream_id) == 150_000


def test_data_frames_are_split_at_max_frame_size() -> None:
    config = YamuxConfig(measure_rtt=False, keepalive_interval=None, max_frame_size=1024)
    client, _ = pair(config)
    stream_id = client.open_stream()
    wire(client)
    client.send_data(stream_id, bytes(2500))
    assert [f[3] for f in frames(wire(client))] == [1024, 1024, 452]


def test_window_violation_is_a_protocol_error_with_goaway() -> None:
    client, server = pair()
    stream_id = client.open_stream()
    exchange(client, server)
    server.events()
    too_much = encode_header(TYPE_DATA, 0, stream_id, INITIAL_WINDOW + 1)
    with pytest.raises(WindowViolation, match="exceeds the 262144 bytes of window"):
        server.receive_data(too_much)
    assert frames(wire(server)) == [(TYPE_GO_AWAY, 0, 0, GO_AWAY_PROTOCOL_ERROR)]
    assert server.error is not None
    server.receive_data(b"ignored after the error")  # no more events, no exception
    assert server.events() == []


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (HEADER.pack(1, TYPE_DATA, 0, 1, 0), "version 1"),
        (HEADER.pack(0, 7, 0, 1, 0), "unknown yamux frame type 0x7"),
        (encode_header(TYPE_DATA, 0, 0, 5), "Data frame on stream 0"),
        (encode_header(TYPE_WINDOW_UPDATE, FLAG_SYN, 0, 0), "WindowUpdate frame on stream 0"),
        (encode_header(TYPE_WINDOW_UPDATE, FLAG_SYN, 2, 0), "reserved for our side"),
        (encode_header(TYPE_DATA, 0, 9, 3), "never opened"),
        (encode_header(TYPE_WINDOW_UPDATE, 0, 4, 1), "never opened"),
        (encode_header(TYPE_PING, 0, 0, 1), "neither SYN nor ACK"),
        (encode_header(TYPE_GO_AWAY, 0, 3, 0), "GoAway on stream 3"),
    ],
)
def test_malformed_frames_are_refused(frame: bytes, match: str) -> None:
    server = YamuxSession(False, QUIET)
    with pytest.raises(YamuxError, match=match):
        server.receive_data(frame)
    assert frames(wire(server))[-1] == (TYPE_GO_AWAY, 0, 0, GO_AWAY_PROTOCOL_ERROR)


def test_duplicate_syn_and_window_overflow_are_refused() -> None:
    server = YamuxSession(False, QUIET)
    server.receive_data(encode_header(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0))
    with pytest.raises(YamuxError, match="opened stream 1 twice"):
        server.receive_data(encode_header(TYPE_DATA, FLAG_SYN, 1, 0))
    server = YamuxSession(False, QUIET)
    server.receive_data(encode_header(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0))
    with pytest.raises(YamuxError, match="overflows the 32-bit window"):
        server.receive_data(encode_header(TYPE_WINDOW_UPDATE, 0, 1, 2**32 - 1))


def test_data_after_fin_is_refused() -> None:
    server = YamuxSession(False, QUIET)
    server.receive_data(encode_header(TYPE_DATA, FLAG_SYN | FLAG_FIN, 1, 0))
    assert StreamEnded(1) in server.events()
    with pytest.raises(YamuxError, match="after the remote closed it"):
        server.receive_data(encode_header(TYPE_DATA, 0, 1, 3) + b"abc")


def test_frames_for_a_finished_stream_are_skipped() -> None:
    client, server = pair()
    stream_id = client.open_stream()
    exchange(client, server)
    server.reset_stream(stream_id)  # the remote does not know yet and keeps sending
    client.send_data(stream_id, b"late data")
    late = wire(client)
    server.receive_data(late + encode_header(TYPE_WINDOW_UPDATE, 0, stream_id, 10))
    assert [e for e in server.events() if not isinstance(e, StreamOpened)] == []
    client.receive_data(wire(server))
    assert StreamResetByRemote(stream_id) in client.events()
    with pytest.raises(StreamReset):
        client.send_data(stream_id, b"x")


def test_headers_and_bodies_may_arrive_a_byte_at_a_time() -> None:
    client, server = pair()
    stream_id = client.open_stream()
    client.send_data(stream_id, b"split everywhere")
    client.close_stream(stream_id)
    data = wire(client)
    for byte in data:
        server.receive_data(bytes([byte]))
    events = server.events()
    assert events[0] == StreamOpened(stream_id)
    assert b"".join(bytes(e.data) for e in events if isinstance(e, DataReceived)) == (
        b"split everywhere"
    )
    assert events[-1] == StreamEnded(stream_id)


def test_rst_resets_the_stream_on_the_other_side() -> None:
    client, server = pair()
    stream_id = client.open_stream()
    exchange(client, server)
    server.events()
    client.reset_stream(stream_id)
    assert frames(wire(client)) == [(TYPE_WINDOW_UPDATE, FLAG_RST, stream_id, 0)]
    server.receive_data(encode_header(TYPE_WINDOW_UPDATE, FLAG_RST, stream_id, 0))
    assert server.events() == [StreamResetByRemote(stream_id)]
    assert not server.has_stream(stream_id) and not client.has_stream(stream_id)


def test_goaway_stops_new_streams_but_not_open_ones() -> None:
    client, server = pair()
    stream_id = client.open_stream()
    exchange(client, server)
    server.go_away(GO_AWAY_NORMAL)
    client.receive_data(wire(server))
    assert GoAwayReceived(GO_AWAY_NORMAL) in client.events()
    assert not client.can_open_stream
    with pytest.raises(ConnectionClosed, match="GoAway"):
        client.open_stream()
    client.send_data(stream_id, b"still fine")
    server.receive_data(wire(client))
    assert received(server, stream_id) == b"still fine"
    # New streams from the remote after our GoAway are refused with RST.
    server.receive_data(encode_header(TYPE_WINDOW_UPDATE, FLAG_SYN, 3, 0))
    assert frames(wire(server)) == [(TYPE_WINDOW_UPDATE, FLAG_RST, 3, 0)]


def test_stream_limit_resets_extra_inbound_streams_and_refuses_local_ones() -> None:
    config = YamuxConfig(measure_rtt=False, keepalive_interval=None, max_streams=2)
    server = YamuxSession(False, config)
    for stream_id in (1, 3, 5):
        server.receive_data(encode_header(TYPE_DATA, FLAG_SYN, stream_id, 4) + b"data")
    events = server.events()
    assert [e for e in events if isinstance(e, StreamOpened)] == [StreamOpened(1), StreamOpened(3)]
    assert not any(isinstance(e, DataReceived) and e.stream_id == 5 for e in events)
    assert frames(wire(server))[-1] == (TYPE_WINDOW_UPDATE, FLAG_RST, 5, 0)
    with pytest.raises(StreamLimitReached, match="limit is 2"):
        server.open_stream()


def test_ack_backlog_bounds_unacknowledged_streams() -> None:
    config = YamuxConfig(measure_rtt=False, keepalive_interval=None, max_ack_backlog=3)
    client, server = pair(config)
    for _ in range(3):
        client.open_stream()
    assert not client.can_open_stream
    with pytest.raises(StreamLimitReached, match="not acknowledged"):
        client.open_stream()
    exchange(client, server)
    assert client.ack_backlog == 0 and client.can_open_stream


def test_ping_is_answered_and_measures_rtt() -> None:
    client = YamuxSession(True, YamuxConfig(keepalive_interval=None), now=10.0)
    ping = wire(client)
    assert frames(ping) == [(TYPE_PING, FLAG_SYN, 0, 1)]
    server = YamuxSession(False, QUIET)
    server.receive_data(ping)
    pong = wire(server)
    assert pong == encode_header(TYPE_PING, FLAG_ACK, 0, 1)
    client.receive_data(encode_header(TYPE_PING, FLAG_ACK, 0, 99), now=10.01)  # not ours
    assert client.rtt is None
    client.receive_data(pong, now=10.025)
    assert client.events() == [PongReceived(pytest.approx(0.025))]
    assert client.rtt == pytest.approx(0.025)


def test_keepalive_pings_and_times_out_a_silent_remote() -> None:
    config = YamuxConfig(measure_rtt=False, keepalive_interval=10.0, ping_timeout=5.0)
    session = YamuxSession(True, config, now=0.0)
    assert session.get_timer() == 10.0
    session.handle_timer(10.0)
    assert frames(wire(session)) == [(TYPE_PING, FLAG_SYN, 0, 1)]
    assert session.get_timer() == 15.0
    session.receive_data(b"", now=13.0)  # anything received shows the remote is alive
    assert session.get_timer() == 18.0
    session.handle_timer(17.9)
    with pytest.raises(ConnectionClosed, match="no answer to a yamux Ping"):
        session.handle_timer(18.0)


def test_window_grows_when_drained_within_a_few_rtts() -> None:
    config = YamuxConfig(
        measure_rtt=False,
        keepalive_interval=None,
        max_stream_window=1 << 20,
        max_connection_window=(1 << 20) - INITIAL_WINDOW + 100_000,
    )
    client, server = pair(config)
    server.rtt = 0.010
    stream_id = client.open_stream()
    exchange(client, server)
    grants = []
    now = 0.0
    for _ in range(6):
        credit = client.send_credit(stream_id)
        client.send_data(stream_id, bytes(credit))
        server.receive_data(wire(client), now)
        now += 0.001  # the reader drains the window in 1 ms, far less than 4 RTTs
        server.stream_consumed(stream_id, credit, now)
        update = wire(server)
        grants.append(frames(update)[0][3])
        client.receive_data(update, now)
    assert grants == [2 * INITIAL_WINDOW] + [1 << 20] * 5  # doubled, then capped
    # A second stream may only grow by what the connection budget has left (100,000 bytes).
    other = client.open_stream()
    exchange(client, server)
    client.send_data(other, bytes(INITIAL_WINDOW))
    server.receive_data(wire(client), now)
    server.stream_consumed(other, INITIAL_WINDOW, now + 0.001)
    assert frames(wire(server))[0][3] == INITIAL_WINDOW + 100_000


def test_slow_reader_keeps_the_initial_window() -> None:
    client, server = pair()
    server.rtt = 0.010
    stream_id = client.open_stream()
    exchange(client, server)
    client.send_data(stream_id, bytes(INITIAL_WINDOW))
    server.receive_data(wire(client), 0.0)
    server.stream_consumed(stream_id, INITIAL_WINDOW, 1.0)  # a second: 100 RTTs
    assert frames(wire(server)) == [(TYPE_WINDOW_UPDATE, 0, stream_id, INITIAL_WINDOW)]


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 70_000), min_size=1, max_size=30),
    cut=st.integers(50, 20_000),  # byte-at-a-time has its own test
)
def test_many_streams_interleaved_arrive_intact(sizes: list[int], cut: int) -> None:
    client, server = pair()
    payloads = {}
    for index, size in enumerate(sizes):
        stream_id = client.open_stream()
        payloads[stream_id] = bytes([index % 256]) * size
    for stream_id, payload in payloads.items():
        assert client.send_data(stream_id, payload) == len(payload)
        client.close_stream(stream_id)
    data = wire(client)
    for start in range(0, len(data), cut):  # arbitrary chunking of the byte stream
        server.receive_data(data[start : start + cut])
    got: dict[int, bytearray] = {stream_id: bytearray() for stream_id in payloads}
    ended = set()
    for event in server.events():
        if isinstance(event, DataReceived):
            got[event.stream_id] += event.data
        elif isinstance(event, StreamEnded):
            ended.add(event.stream_id)
    assert {k: bytes(v) for k, v in got.items()} == payloads
    assert ended == set(payloads)


def test_a_reader_waiting_for_more_than_the_window_gets_credit() -> None:
    client, server = pair()
    stream_id = client.open_stream()
    exchange(client, server)
    client.send_data(stream_id, bytes(200_000))
    server.receive_data(wire(client))
    server.reader_needs(stream_id, 100_000)  # already reachable: nothing to send
    assert wire(server) == b""
    server.reader_needs(stream_id, 1_000_000)  # readexactly(1 MB) with 200 kB buffered
    update = wire(server)
    assert frames(update) == [(TYPE_WINDOW_UPDATE, 0, stream_id, 1_000_000 - INITIAL_WINDOW)]
    client.receive_data(update)
    assert client.send_credit(stream_id) == 1_000_000 - 200_000
