"""Yamux (`/yamux/1.0.0`): many flow-controlled streams over one secure byte channel.

As the yamux spec (hashicorp/yamux spec.md, libp2p/specs yamux) says: 12-byte big-endian
headers (version 0, type, flags, stream ID, length); Data, Window Update, Ping and Go Away
frames; SYN/ACK/FIN/RST flags; the dialer ("client") opens odd stream IDs, the listener even;
every stream starts with a 256 KiB window. Our receive windows then grow (doubling, as
rust-yamux and go-yamux auto-tune) when a stream drains its window within a few round trips,
up to `max_stream_window`, so one stream can fill a long fat pipe.

`YamuxSession` is the protocol without I/O (bytes and calls in; bytes and events out; errors
raise `YamuxError` after queueing a GoAway). `YamuxConnection` binds it to a `ByteChannel`
(Noise over TCP or over a relayed stream) and hands out `YamuxStream`s with backpressure.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from transport.connection import DIRECT, Connection, InboundStreamCallback
from transport.errors import (
    ConnectionClosed,
    ProtocolViolation,
    StreamClosed,
    StreamReset,
    TransportError,
)
from transport.identity import PeerId
from transport.multiaddr import Multiaddr
from transport.stream import Stream

if TYPE_CHECKING:
    from transport.noise import ByteChannel

log = logging.getLogger(__name__)

PROTOCOL_ID = "/yamux/1.0.0"  # yamux spec: the multistream-select ID
VERSION = 0  # yamux spec
HEADER = struct.Struct(">BBHII")  # version, type, flags, stream ID, length
HEADER_LENGTH = HEADER.size  # 12

TYPE_DATA = 0x0  # yamux spec
TYPE_WINDOW_UPDATE = 0x1
TYPE_PING = 0x2
TYPE_GO_AWAY = 0x3
TYPE_NAMES = {0: "Data", 1: "WindowUpdate", 2: "Ping", 3: "GoAway"}

FLAG_SYN = 0x1  # yamux spec
FLAG_ACK = 0x2
FLAG_FIN = 0x4
FLAG_RST = 0x8

GO_AWAY_NORMAL = 0x0  # yamux spec
GO_AWAY_PROTOCOL_ERROR = 0x1
GO_AWAY_INTERNAL_ERROR = 0x2

SESSION_ID = 0  # yamux spec: stream 0 is the session (Ping, GoAway)
INITIAL_WINDOW = 256 * 1024  # yamux spec: every stream starts with a 256 KiB window
MAX_WINDOW = 2**32 - 1  # a window is a 32-bit quantity
MAX_STREAM_ID = 2**32 - 1
SMALL_WRITE = 64 * 1024  # writes up to this size (bytes) are sent at the end of the iteration
AUTOTUNE_RTTS = 4  # grow a window that the remote used up within this many round trips


class YamuxConfig(BaseModel):
    """Yamux settings; every limit is explicit."""

    model_config = {"frozen": True}

    initial_window: int = Field(
        INITIAL_WINDOW,
        ge=INITIAL_WINDOW,
        le=MAX_WINDOW,
        description="receive window each stream starts with (the spec's 256 KiB; more is "
        "announced in the SYN/ACK window update)",
    )
    max_stream_window: int = Field(
        16 * 1024 * 1024,
        ge=INITIAL_WINDOW,
        le=MAX_WINDOW,
        description="a stream's receive window may grow to this (auto-tuning for bulk data)",
    )
    max_connection_window: int = Field(
        128 * 1024 * 1024,
        ge=0,
        description="total growth of all stream windows above `initial_window` on one "
        "connection: bounds what a remote can make us buffer",
    )
    max_streams: int = Field(
        512, ge=1, description="open streams per connection (both directions); more are reset"
    )
    max_ack_backlog: int = Field(
        256,
        ge=1,
        description="streams we opened that the remote has not acknowledged yet (spec: 256); "
        "open_stream() waits beyond it",
    )
    max_frame_size: int = Field(
        65507,
        ge=1024,
        le=1024 * 1024,  # rust-yamux refuses bodies above 1 MiB
        description="body bytes per Data frame we send (65507: header + body fill one "
        "Noise message)",
    )
    write_chunk: int = Field(
        1024 * 1024,
        ge=65536,
        description="bytes a writer queues before checking the channel's backpressure",
    )
    keepalive_interval: float | None = Field(
        30.0, gt=0, description="send a Ping this often (go-yamux's default); None: never"
    )
    ping_timeout: float = Field(
        20.0, gt=0, description="close the connection if nothing arrives this long after a Ping"
    )
    measure_rtt: bool = Field(
        True, description="send a Ping at start; its round trip steers window auto-tuning"
    )
    close_timeout: float = Field(
        5.0, gt=0, description="seconds close() waits for queued data to leave"
    )


# -- errors -----------------------------------------------------------------------------------


class YamuxError(ProtocolViolation):
    """The remote broke the yamux rules; the connection is closed with a GoAway."""

    go_away_code = GO_AWAY_PROTOCOL_ERROR


class WindowViolation(YamuxError):
    """The remote sent more data on a stream than its receive window allowed."""


class StreamLimitReached(TransportError):
    """Opening a stream would exceed `max_streams`; close some streams or open a connection."""


# -- events -----------------------------------------------------------------------------------


@dataclass(slots=True)
class StreamOpened:
    """The remote opened a stream (SYN); it has been acknowledged."""

    stream_id: int


@dataclass(slots=True)
class DataReceived:
    """Part of a Data frame's body (delivered as it arrives, without waiting for the rest)."""

    stream_id: int
    data: bytes | memoryview


@dataclass(slots=True)
class StreamEnded:
    """The remote closed its side (FIN): no more data will come on this stream."""

    stream_id: int


@dataclass(slots=True)
class StreamResetByRemote:
    """The remote reset the stream (RST); it is forgotten."""

    stream_id: int


@dataclass(slots=True)
class SendWindowOpened:
    """The remote granted more credit: a blocked writer may continue."""

    stream_id: int


@dataclass(slots=True)
class StreamAcknowledged:
    """The remote acknowledged a stream we opened (ACK); the ACK backlog shrank."""

    stream_id: int


@dataclass(slots=True)
class PongReceived:
    """The answer to our Ping, with the measured round-trip time in seconds."""

    rtt: float


@dataclass(slots=True)
class GoAwayReceived:
    """The remote accepts no new streams; `code` != 0 means it saw an error."""

    code: int


Event = (
    StreamOpened
    | DataReceived
    | StreamEnded
    | StreamResetByRemote
    | SendWindowOpened
    | StreamAcknowledged
    | PongReceived
    | GoAwayReceived
)


# -- the protocol -------------------------------------------------------------------------


class _StreamState:
    """Flow-control and half-close state of one stream."""

    __slots__ = (
        "acknowledged",
        "buffered",
        "last_window_update",
        "local_closed",
        "outbound",
        "recv_credit",
        "recv_window",
        "remote_closed",
        "removed",
        "send_credit",
        "stream_id",
    )

    def __init__(self, stream_id: int, outbound: bool, recv_window: int, now: float) -> None:
        self.stream_id = stream_id
        self.outbound = outbound
        self.acknowledged = not outbound
        self.send_credit = INITIAL_WINDOW  # what we may still send
        self.recv_window = recv_window  # current receive window (grows by auto-tuning)
        self.recv_credit = recv_window  # what the remote may still send (after our SYN/ACK)
        self.buffered = 0  # received but not yet consumed by the application
        self.local_closed = False
        self.remote_closed = False
        self.removed = False
        self.last_window_update = now


def encode_header(frame_type: int, flags: int, stream_id: int, length: int) -> bytes:
    return HEADER.pack(VERSION, frame_type, flags, stream_id, length)


class YamuxSession:
    """One side of a yamux session, without I/O or clocks: `now` is passed in.

    Bytes from the remote go to `receive_data()`; what happened comes out of `next_event()`;
    bytes for the remote come out of `data_to_send()` (a list of buffers, in order; data
    frame bodies are views of the caller's buffers, so send them before reusing those).
    """

    def __init__(
        self, is_client: bool, config: YamuxConfig | None = None, now: float = 0.0
    ) -> None:
        self.config = config or YamuxConfig()
        self.is_client = is_client
        self._streams: dict[int, _StreamState] = {}
        self._next_stream_id = 1 if is_client else 2
        self._highest_remote_id = 0
        self._events: list[Event] = []
        self._outbox: list[bytes | memoryview] = []
        self._header = bytearray()  # a header split across receive_data() calls
        self._body_remaining = 0  # Data body bytes still to come for the current frame
        self._body_state: _StreamState | None = None
        self._body_fin = False
        self._window_growth = 0  # sum over streams of recv_window - initial_window
        self.ack_backlog = 0
        self.local_go_away = False
        self.remote_go_away = False
        self.remote_go_away_code: int | None = None
        self.error: YamuxError | None = None
        self.rtt: float | None = None
        self._ping_id = 0
        self._ping_sent_at: float | None = None
        self._last_received = self._now = now
        self._next_keepalive = (
            now + self.config.keepalive_interval if self.config.keepalive_interval else None
        )
        if self.config.measure_rtt:
            self.ping(now)

    # -- output ----------------------------------------------------------------------------
    def data_to_send(self) -> list[bytes | memoryview]:
        out, self._outbox = self._outbox, []
        return out

    def next_event(self) -> Event | None:
        return self._events.pop(0) if self._events else None

    def events(self) -> list[Event]:
        """Every pending event, oldest first (cheaper than next_event() in a loop)."""
        out, self._events = self._events, []
        return out

    def _frame(self, frame_type: int, flags: int, stream_id: int, length: int) -> None:
        self._outbox.append(HEADER.pack(VERSION, frame_type, flags, stream_id, length))

    # -- streams we open and use -----------------------------------------------------------
    @property
    def stream_count(self) -> int:
        return len(self._streams)

    def has_stream(self, stream_id: int) -> bool:
        return stream_id in self._streams

    @property
    def can_open_stream(self) -> bool:
        return (
            self.error is None
            and not self.remote_go_away
            and not self.local_go_away
            and len(self._streams) < self.config.max_streams
            and self.ack_backlog < self.config.max_ack_backlog
            and self._next_stream_id <= MAX_STREAM_ID
        )

    def open_stream(self, now: float = 0.0) -> int:
        """A new outbound stream; its SYN (with our larger window, if any) is queued."""
        if self.error is not None or self.local_go_away:
            raise ConnectionClosed("the yamux session is closed")
        if self.remote_go_away:
            raise ConnectionClosed("the remote sent GoAway: it accepts no new streams")
        if len(self._streams) >= self.config.max_streams:
            raise StreamLimitReached(
                f"{len(self._streams)} streams are open, the limit is {self.config.max_streams}"
            )
        if self.ack_backlog >= self.config.max_ack_backlog:
            raise StreamLimitReached(
                f"{self.ack_backlog} opened streams are not acknowledged yet "
                f"(limit {self.config.max_ack_backlog})"
            )
        stream_id = self._next_stream_id
        if stream_id > MAX_STREAM_ID:
            raise StreamLimitReached("stream IDs exhausted on this connection; open a new one")
        self._next_stream_id += 2
        state = _StreamState(stream_id, True, self.config.initial_window, now)
        self._streams[stream_id] = state
        self.ack_backlog += 1
        self._frame(
            TYPE_WINDOW_UPDATE, FLAG_SYN, stream_id, self.config.initial_window - INITIAL_WINDOW
        )
        return stream_id

    def _state(self, stream_id: int) -> _StreamState:
        state = self._streams.get(stream_id)
        if state is None:
            raise StreamReset(f"stream {stream_id} was reset or never existed")
        return state

    def send_credit(self, stream_id: int) -> int:
        """Bytes `send_data` would accept now on this stream."""
        state = self._streams.get(stream_id)
        return 0 if state is None else state.send_credit

    def send_data(self, stream_id: int, data: bytes | memoryview) -> int:
        """Queue as much of `data` as the stream's window allows; returns the bytes taken."""
        state = self._state(stream_id)
        if state.local_closed:
            raise StreamClosed(f"stream {stream_id}: write after close")
        size = min(len(data), state.send_credit)
        if not size:
            return 0
        view = memoryview(data)
        step = self.config.max_frame_size
        pack = HEADER.pack
        out = self._outbox
        for start in range(0, size, step):
            body = view[start : min(start + step, size)]
            out.append(pack(VERSION, TYPE_DATA, 0, stream_id, len(body)))
            out.append(body)
        state.send_credit -= size
        return size

    def close_stream(self, stream_id: int) -> None:
        """Half-close (FIN): we send nothing more; the remote may still send."""
        state = self._streams.get(stream_id)
        if state is None or state.local_closed:
            return
        state.local_closed = True
        self._frame(TYPE_WINDOW_UPDATE, FLAG_FIN, stream_id, 0)
        if state.remote_closed:
            self._remove(state)

    def reset_stream(self, stream_id: int) -> None:
        """Abort the stream both ways (RST) and forget it."""
        state = self._streams.get(stream_id)
        if state is None:
            return
        self._frame(TYPE_WINDOW_UPDATE, FLAG_RST, stream_id, 0)
        self._remove(state)

    def stream_consumed(self, stream_id: int, nbytes: int, now: float) -> None:
        """The application read `nbytes`: grant the remote more credit when worth a frame."""
        state = self._streams.get(stream_id)
        if state is None:
            return
        state.buffered -= nbytes
        if state.remote_closed:
            return  # the remote sends nothing more: no credit needed
        grant = state.recv_window - state.recv_credit - state.buffered
        if grant < state.recv_window // 2:
            return
        elapsed = now - state.last_window_update
        if self.rtt is not None and elapsed < AUTOTUNE_RTTS * self.rtt:
            grant += self._grow_window(state)
        state.last_window_update = now
        state.recv_credit += grant
        self._frame(TYPE_WINDOW_UPDATE, 0, stream_id, grant)

    def reader_needs(self, stream_id: int, needed: int) -> None:
        """The application waits for `needed` bytes at once: let the remote send that much.

        Without this, a read of more than the window (readexactly, a large message) waits for
        credit that only consuming would release. The window stays grown: the local reader
        chose the size, not the remote.
        """
        state = self._streams.get(stream_id)
        if state is None or state.remote_closed:
            return
        if needed <= state.buffered + state.recv_credit:
            return  # the remote may already send enough
        needed = min(needed, MAX_WINDOW)
        if needed > state.recv_window:
            self._window_growth += needed - state.recv_window
            state.recv_window = needed
        grant = state.recv_window - state.recv_credit - state.buffered
        if grant > 0:
            state.recv_credit += grant
            self._frame(TYPE_WINDOW_UPDATE, 0, stream_id, grant)

    def _grow_window(self, state: _StreamState) -> int:
        """Double the stream's window within the stream and connection limits."""
        budget = self.config.max_connection_window - self._window_growth
        target = min(state.recv_window * 2, self.config.max_stream_window)
        growth = max(0, min(target - state.recv_window, budget))
        state.recv_window += growth
        self._window_growth += growth
        return growth

    def _remove(self, state: _StreamState) -> None:
        if state.removed:
            return
        state.removed = True
        del self._streams[state.stream_id]
        self._window_growth -= state.recv_window - self.config.initial_window
        if not state.acknowledged:
            self.ack_backlog -= 1

    # -- session ---------------------------------------------------------------------------
    def ping(self, now: float) -> None:
        """Send a Ping (unless one is outstanding); its answer gives `rtt`."""
        if self._ping_sent_at is not None or self.error is not None:
            return
        self._ping_id = (self._ping_id + 1) & 0xFFFFFFFF
        self._ping_sent_at = now
        self._frame(TYPE_PING, FLAG_SYN, SESSION_ID, self._ping_id)

    def go_away(self, code: int = GO_AWAY_NORMAL) -> None:
        """Tell the remote we accept no new streams (and, with an error code, why we quit)."""
        if not self.local_go_away:
            self.local_go_away = True
            self._frame(TYPE_GO_AWAY, 0, SESSION_ID, code)

    def get_timer(self) -> float | None:
        """When `handle_timer` wants to run next (keepalive Ping or its timeout)."""
        if self.error is not None:
            return None
        deadlines = []
        if self._next_keepalive is not None:
            deadlines.append(self._next_keepalive)
        if self._ping_sent_at is not None:
            deadlines.append(
                max(self._ping_sent_at, self._last_received) + self.config.ping_timeout
            )
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> None:
        """Send the keepalive Ping; raise `ConnectionClosed` if the remote went silent."""
        if self.error is not None:
            return
        if self._ping_sent_at is not None:
            silent_since = max(self._ping_sent_at, self._last_received)
            if now >= silent_since + self.config.ping_timeout:
                raise ConnectionClosed(
                    f"keepalive: no answer to a yamux Ping in {self.config.ping_timeout:.0f} s; "
                    "the remote or the path is gone"
                )
        if self._next_keepalive is not None and now >= self._next_keepalive:
            assert self.config.keepalive_interval is not None
            self._next_keepalive = now + self.config.keepalive_interval
            if self._ping_sent_at is None:
                self.ping(now)

    # -- input -----------------------------------------------------------------------------
    def receive_data(self, data: bytes | memoryview, now: float = 0.0) -> None:
        """Parse frames; raise `YamuxError` (a GoAway is queued) if the remote broke the rules.

        Data bodies are handed out as views of `data`: pass immutable bytes, or consume the
        events before reusing the buffer.
        """
        if self.error is not None:
            return
        self._last_received = self._now = now
        try:
            self._parse(memoryview(data), now)
        except YamuxError as exc:
            self.error = exc
            self._outbox.append(HEADER.pack(VERSION, TYPE_GO_AWAY, 0, SESSION_ID, exc.go_away_code))
            self.local_go_away = True
            raise

    def _parse(self, view: memoryview, now: float) -> None:
        size = len(view)
        position = 0
        while position < size:
            if self._body_remaining:
                take = min(self._body_remaining, size - position)
                state = self._body_state
                if state is not None and not state.removed:
                    self._events.append(
                        DataReceived(state.stream_id, view[position : position + take])
                    )
                position += take
                self._body_remaining -= take
                if not self._body_remaining and self._body_fin and state is not None:
                    self._remote_fin(state)
                continue
            if self._header:
                need = HEADER_LENGTH - len(self._header)
                self._header += view[position : position + need]
                position += min(need, size - position)
                if len(self._header) < HEADER_LENGTH:
                    return
                header = bytes(self._header)
                self._header.clear()
                self._on_header(*HEADER.unpack(header), now)
            elif size - position >= HEADER_LENGTH:
                self._on_header(*HEADER.unpack_from(view, position), now)
                position += HEADER_LENGTH
            else:
                self._header += view[position:]
                return

    def _on_header(
        self, version: int, frame_type: int, flags: int, stream_id: int, length: int, now: float
    ) -> None:
        if version != VERSION:
            raise YamuxError(f"yamux frame with version {version}; only version 0 exists")
        if frame_type == TYPE_DATA:
            self._on_data(flags, stream_id, length)
        elif frame_type == TYPE_WINDOW_UPDATE:
            self._on_window_update(flags, stream_id, length)
        elif frame_type == TYPE_PING:
            self._on_ping(flags, stream_id, length, now)
        elif frame_type == TYPE_GO_AWAY:
            self._on_go_away(stream_id, length)
        else:
            raise YamuxError(f"unknown yamux frame type {frame_type:#x} (stream {stream_id})")

    def _is_remote_id(self, stream_id: int) -> bool:
        return (stream_id % 2 == 0) == self.is_client

    def _frame_stream(self, frame_type: int, flags: int, stream_id: int) -> _StreamState | None:
        """The stream a Data/WindowUpdate frame is for, once its flags are applied; None if the
        stream is gone or was refused (a Data body is then skipped)."""
        if stream_id == SESSION_ID:
            raise YamuxError(f"{TYPE_NAMES[frame_type]} frame on stream 0 (the session)")
        if flags & FLAG_SYN:
            state = self._open_remote(stream_id)
        else:
            state = self._streams.get(stream_id)
            if state is None:
                self._check_known(frame_type, stream_id)
        if state is None:
            return None
        if flags & FLAG_ACK and not state.acknowledged:
            state.acknowledged = True
            self.ack_backlog -= 1
            self._events.append(StreamAcknowledged(stream_id))
        if flags & FLAG_RST:
            self._remove(state)
            self._events.append(StreamResetByRemote(stream_id))
            return None
        return state

    def _check_known(self, frame_type: int, stream_id: int) -> None:
        """A frame for a stream we do not have: fine if it existed (a race with its end)."""
        if self._is_remote_id(stream_id):
            never_opened = stream_id > self._highest_remote_id
        else:
            never_opened = stream_id >= self._next_stream_id
        if never_opened:
            raise YamuxError(
                f"{TYPE_NAMES[frame_type]} frame for stream {stream_id}, which was never opened"
            )

    def _open_remote(self, stream_id: int) -> _StreamState | None:
        if not self._is_remote_id(stream_id):
            side = "listener" if self.is_client else "dialer"
            raise YamuxError(
                f"the remote opened stream {stream_id}, an ID reserved for our side ({side})"
            )
        if stream_id in self._streams:
            raise YamuxError(f"the remote opened stream {stream_id} twice")
        self._highest_remote_id = max(self._highest_remote_id, stream_id)
        if self.local_go_away or len(self._streams) >= self.config.max_streams:
            log.debug("refusing yamux stream %d: %d open", stream_id, len(self._streams))
            self._frame(TYPE_WINDOW_UPDATE, FLAG_RST, stream_id, 0)
            return None
        state = _StreamState(stream_id, False, self.config.initial_window, self._now)
        self._streams[stream_id] = state
        self._frame(
            TYPE_WINDOW_UPDATE, FLAG_ACK, stream_id, self.config.initial_window - INITIAL_WINDOW
        )
        self._events.append(StreamOpened(stream_id))
        return state

    def _on_data(self, flags: int, stream_id: int, length: int) -> None:
        state = self._frame_stream(TYPE_DATA, flags, stream_id)
        if state is not None:
            if state.remote_closed and length:
                raise YamuxError(f"Data on stream {stream_id} after the remote closed it (FIN)")
            if length > state.recv_credit:
                raise WindowViolation(
                    f"stream {stream_id}: a Data frame of {length} bytes exceeds the "
                    f"{state.recv_credit} bytes of window the remote had left"
                )
            state.recv_credit -= length
            state.buffered += length
        elif length > self.config.max_stream_window:
            raise YamuxError(
                f"Data frame of {length} bytes for gone stream {stream_id}: larger than any "
                "window we ever grant"
            )
        fin = bool(flags & FLAG_FIN)
        if length:
            self._body_remaining = length
            self._body_state = state
            self._body_fin = fin
        elif fin and state is not None:
            self._remote_fin(state)

    def _on_window_update(self, flags: int, stream_id: int, delta: int) -> None:
        state = self._frame_stream(TYPE_WINDOW_UPDATE, flags, stream_id)
        if state is None:
            return
        if delta:
            if state.send_credit + delta > MAX_WINDOW:
                raise YamuxError(
                    f"stream {stream_id}: window update of {delta} overflows the 32-bit window"
                )
            state.send_credit += delta
            self._events.append(SendWindowOpened(stream_id))
        if flags & FLAG_FIN:
            self._remote_fin(state)

    def _remote_fin(self, state: _StreamState) -> None:
        if state.remote_closed or state.removed:
            return
        state.remote_closed = True
        self._events.append(StreamEnded(state.stream_id))
        if state.local_closed:
            self._remove(state)

    def _on_ping(self, flags: int, stream_id: int, opaque: int, now: float) -> None:
        if flags & FLAG_SYN:
            self._frame(TYPE_PING, FLAG_ACK, SESSION_ID, opaque)
        elif flags & FLAG_ACK:
            if self._ping_sent_at is not None and opaque == self._ping_id:
                self.rtt = max(now - self._ping_sent_at, 1e-6)
                self._ping_sent_at = None
                self._events.append(PongReceived(self.rtt))
        else:
            raise YamuxError(f"Ping with neither SYN nor ACK (flags {flags:#x})")

    def _on_go_away(self, stream_id: int, code: int) -> None:
        if stream_id != SESSION_ID:
            raise YamuxError(f"GoAway on stream {stream_id}; it belongs on stream 0")
        self.remote_go_away = True
        self.remote_go_away_code = code
        self._events.append(GoAwayReceived(code))


# -- asyncio ----------------------------------------------------------------------------------


class YamuxStream(Stream):
    """One yamux stream; writes wait for window credit and for the channel to drain."""

    def __init__(self, connection: YamuxConnection, stream_id: int) -> None:
        super().__init__(connection.remote_peer)
        self.connection = connection
        self.stream_id = stream_id
        self._send_ready = asyncio.Event()
        self._write_closed = False

    def _on_consumed(self, nbytes: int) -> None:
        self.connection._consumed(self, nbytes)

    def _on_waiting(self, needed: int) -> None:
        self.connection._reader_needs(self, needed)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._reset_reason is not None:
            raise StreamReset(self._reset_reason)
        if self._write_closed:
            raise StreamClosed("write after close()")
        await self.connection._write(self, data)

    async def close(self) -> None:
        if not self._write_closed:
            self._write_closed = True
            self.connection._close_stream(self)

    def reset(self, reason: str = "reset by local peer") -> None:
        if self._reset_reason is None:
            self._feed_reset(reason)
            self._send_ready.set()
            self.connection._reset_stream(self)

    def __repr__(self) -> str:
        return f"<YamuxStream {self.stream_id} {self.protocol or '?'} peer={self.remote_peer}>"


class YamuxConnection(Connection):
    """A `Connection` whose streams are yamux streams over a secure `ByteChannel`."""

    def __init__(
        self,
        channel: ByteChannel,
        remote_peer: PeerId,
        is_initiator: bool,
        config: YamuxConfig | None = None,
        *,
        local_addr: Multiaddr | None = None,
        remote_addr: Multiaddr | None = None,
        path: str = DIRECT,
        transport: str | None = None,
    ) -> None:
        super().__init__(remote_peer, local_addr, remote_addr, is_initiator, path)
        if transport is not None:
            self.transport = transport
        self.config = config or YamuxConfig()
        self._loop = asyncio.get_running_loop()
        self._channel = channel
        self._session = YamuxSession(is_initiator, self.config, self._loop.time())
        self._streams: dict[int, YamuxStream] = {}
        self._pending_inbound: list[YamuxStream] = []  # arrived before a callback was set
        self._backlog_open = asyncio.Event()
        self._backlog_open.set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._flush_scheduled = False
        self.bytes_received = 0
        channel.start(self)
        self._flush()

    # -- public ----------------------------------------------------------------------------
    @property
    def rtt(self) -> float | None:
        """The last yamux Ping round trip, in seconds (None before the first answer)."""
        return self._session.rtt

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    async def open_stream(self) -> YamuxStream:
        session = self._session
        while not session.can_open_stream:
            if self.is_closed:
                raise ConnectionClosed(
                    f"connection to {self.remote_peer} is closed: {self.closed.result()}"
                )
            if session.remote_go_away:
                raise ConnectionClosed(
                    f"{self.remote_peer} sent GoAway: it accepts no new streams on this "
                    "connection; open a new one"
                )
            if session.ack_backlog < self.config.max_ack_backlog:
                break  # the stream limit: open_stream() below says so
            self._backlog_open.clear()
            await self._backlog_open.wait()
        stream_id = session.open_stream(self._loop.time())
        stream = YamuxStream(self, stream_id)
        self._streams[stream_id] = stream
        self._schedule_flush()  # the SYN leaves with the first data written this iteration
        return stream

    def set_inbound_stream_callback(self, callback: InboundStreamCallback) -> None:
        super().set_inbound_stream_callback(callback)
        pending, self._pending_inbound = self._pending_inbound, []
        for stream in pending:
            if stream._reset_reason is None:
                callback(stream)

    def _deliver_inbound(self, stream: Stream) -> None:
        if self._inbound_callback is None:
            self._pending_inbound.append(stream)  # the owner has not attached yet
        else:
            self._inbound_callback(stream)

    async def close(self, reason: str = "closed by local peer") -> None:
        """GoAway, send what is queued, close; open streams are reset."""
        if not self.is_closed:
            self._session.go_away(GO_AWAY_NORMAL)
            self._flush()
            self._terminate(reason)
            self._channel.close()
        try:
            await asyncio.wait_for(self._channel.wait_closed(), self.config.close_timeout)
        except TimeoutError:
            self._channel.abort("close timed out")

    def abort(self, reason: str = "aborted") -> None:
        """Drop the connection at once, without a GoAway."""
        self._terminate(reason)
        self._channel.abort(reason)

    # -- ChannelReceiver -------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        """Every frame in `data` is handled (bodies copied into streams) before returning."""
        self.bytes_received += len(data)
        try:
            self._session.receive_data(data, self._loop.time())
        except YamuxError as exc:
            log.info("yamux: %s violated the protocol: %s", self.remote_peer, exc)
            self._process_events()
            self._flush()
            self._terminate(f"protocol violation: {exc}")
            self._channel.close()
            return
        self._process_events()
        self._schedule_flush()  # window updates leave with the replies the readers write

    def eof_received(self) -> None:
        if self._session.remote_go_away:
            self._terminate("the remote closed the connection")
        else:
            self._terminate("the remote closed the connection with no GoAway (did it crash?)")
        self._channel.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._terminate(f"connection lost: {exc}" if exc else "connection closed")

    # -- internals -------------------------------------------------------------------------
    def _process_events(self) -> None:
        streams = self._streams
        for event in self._session.events():
            if type(event) is DataReceived:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._feed_data(event.data)
            elif type(event) is SendWindowOpened:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._send_ready.set()
            elif type(event) is StreamOpened:
                stream = YamuxStream(self, event.stream_id)
                streams[event.stream_id] = stream
                self._deliver_inbound(stream)
            elif type(event) is StreamEnded:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._feed_eof()
                    self._forget_if_done(stream)
            elif type(event) is StreamResetByRemote:
                stream = streams.pop(event.stream_id, None)
                if stream is not None:
                    stream._feed_reset("reset by remote peer")
                    stream._send_ready.set()
                self._backlog_open.set()
            elif type(event) is StreamAcknowledged:
                self._backlog_open.set()
            elif type(event) is GoAwayReceived:
                self._on_go_away(event.code)
                if self.is_closed:
                    return  # an error GoAway ended the connection: later events are moot
            elif type(event) is PongReceived:
                log.debug("yamux rtt to %s: %.3f ms", self.remote_peer, event.rtt * 1000)

    def _on_go_away(self, code: int) -> None:
        self._backlog_open.set()  # open_stream() waiters must learn of it
        if code != GO_AWAY_NORMAL:
            kind = {
                GO_AWAY_PROTOCOL_ERROR: "protocol error",
                GO_AWAY_INTERNAL_ERROR: "internal error",
            }
            self._terminate(f"the remote ended the session: {kind.get(code, f'code {code}')}")
            self._channel.close()

    def _forget_if_done(self, stream: YamuxStream) -> None:
        if not self._session.has_stream(stream.stream_id):
            self._streams.pop(stream.stream_id, None)
            self._backlog_open.set()

    def _schedule_flush(self) -> None:
        """Send what is queued at the end of this loop iteration: the frames of one iteration
        (a SYN, a request, its FIN; a reply, its status, window updates) share one encrypted
        record and one system call instead of one each."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        if not self.is_closed:
            self._flush()

    def _flush(self) -> None:
        out = self._session.data_to_send()
        if out:
            self._channel.writelines(out)
        timer_at = self._session.get_timer()
        if timer_at != self._timer_at and not self.is_closed:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(timer_at, self._on_timer) if timer_at else None
            self._timer_at = timer_at

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        try:
            self._session.handle_timer(self._loop.time())
        except ConnectionClosed as exc:
            log.info("yamux: closing the connection to %s: %s", self.remote_peer, exc)
            self.abort(str(exc))
            return
        self._flush()

    def _terminate(self, reason: str) -> None:
        if self.is_closed:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for stream in list(self._streams.values()) + self._pending_inbound:
            stream._feed_reset(f"connection closed: {reason}")
            stream._send_ready.set()
        self._streams.clear()
        self._pending_inbound.clear()
        self._backlog_open.set()
        self._mark_closed(reason)

    async def _write(self, stream: YamuxStream, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        session = self._session
        channel = self._channel
        chunk = self.config.write_chunk
        stream_id = stream.stream_id
        small = type(data) is bytes and len(view) <= SMALL_WRITE
        while view:
            if stream._reset_reason is not None:
                raise StreamReset(stream._reset_reason)  # "connection closed: ..." if it died
            if not channel.writable:
                try:
                    await channel.drain()
                except ConnectionClosed as exc:
                    raise StreamReset(f"connection closed: {exc}") from None
                continue
            if not session.send_credit(stream_id):
                stream._send_ready.clear()
                await stream._send_ready.wait()
                continue
            sent = session.send_data(stream_id, view[:chunk])
            view = view[sent:]
            if small:  # immutable: it cannot change before the flush at the end of the iteration
                self._schedule_flush()
            else:
                self._flush()

    def _consumed(self, stream: YamuxStream, nbytes: int) -> None:
        if self.is_closed:
            return
        self._session.stream_consumed(stream.stream_id, nbytes, self._loop.time())
        self._schedule_flush()

    def _reader_needs(self, stream: YamuxStream, needed: int) -> None:
        if not self.is_closed:
            self._session.reader_needs(stream.stream_id, needed)
            self._schedule_flush()

    def _close_stream(self, stream: YamuxStream) -> None:
        if self.is_closed:
            return
        self._session.close_stream(stream.stream_id)
        self._forget_if_done(stream)
        self._schedule_flush()

    def _reset_stream(self, stream: YamuxStream) -> None:
        if self.is_closed:
            return
        self._session.reset_stream(stream.stream_id)
        self._streams.pop(stream.stream_id, None)
        self._backlog_open.set()
        self._schedule_flush()
