"""One QUIC connection: drives the QUIC engine and turns its events into streams.

The endpoint feeds datagrams in; this class feeds the engine (`transport.quic.engine`),
flushes what it wants to send (coalesced: once per loop iteration), keeps its timer, sends
keep-alive PINGs, checks the remote's libp2p certificate when the handshake completes, and
maps QUIC streams to `QuicStream`s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from transport.connection import Connection
from transport.errors import (
    ConnectionClosed,
    HandshakeFailed,
    PeerIdMismatch,
    StreamError,
)
from transport.identity import PeerId
from transport.multiaddr import Multiaddr, quic_multiaddr
from transport.quic.engine import QuicEngine
from transport.quic.stream import ERROR_CODE_RESET, QuicStream
from transport.tls import ALPN, InvalidCertificate, verify_certificate

if TYPE_CHECKING:
    from transport.quic.endpoint import QuicEndpoint

log = logging.getLogger(__name__)

Address = tuple[str, int]
ERROR_CODE_AUTH = 0x1  # application close code: the remote failed libp2p authentication


def _is_bidirectional(stream_id: int) -> bool:
    return stream_id & 0x2 == 0


class RemoteStreamIds:
    """Which of the remote's bidirectional stream IDs have been seen: data for one seen
    before that we no longer know is late data of a stream let go (we reset it, its data
    was in flight), not a new inbound stream.

    Kept as the next ID never seen and the IDs below it not seen yet (skipped: opened
    implicitly, RFC 9000 3.2), which the streams we allow the remote bound.
    """

    def __init__(self, first: int) -> None:
        self._next = first
        self._skipped: set[int] = set()

    def first_seen(self, stream_id: int) -> bool:
        """True the first time `stream_id` (one of the remote's bidirectional IDs) comes."""
        if stream_id >= self._next:
            self._skipped.update(range(self._next, stream_id, 4))
            self._next = stream_id + 4
            return True
        if stream_id in self._skipped:
            self._skipped.discard(stream_id)
            return True
        return False


class QuicConnection(Connection):
    """A libp2p QUIC connection (transport "quic")."""

    transport = "quic"

    def __init__(
        self,
        endpoint: QuicEndpoint,
        quic: QuicEngine,
        remote_address: Address,
        is_initiator: bool,
        expected_peer: PeerId | None = None,
    ) -> None:
        super().__init__(
            remote_peer=expected_peer,  # type: ignore[arg-type]  # known after the handshake
            local_addr=endpoint.listen_multiaddr,
            remote_addr=None,
            is_initiator=is_initiator,
        )
        self.endpoint = endpoint
        self.quic = quic
        self.remote_address = remote_address
        self.expected_peer = expected_peer
        self.established: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Inbound handshakes that fail have no waiter: mark their error as seen.
        self.established.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._loop = asyncio.get_running_loop()
        # Streams in use: a stream leaves once reset, or done both ways (FIN sent, the
        # remote's FIN received and everything read), so a long-lived connection does not
        # keep every call it carried. The engine sends nothing more for such a stream.
        self._streams: dict[int, QuicStream] = {}
        self._local_id_bit = 0 if is_initiator else 1  # RFC 9000 2.1: 0 client, 1 server
        self._remote_ids = RemoteStreamIds(first=1 - self._local_id_bit)
        self._drain_waiters: set[QuicStream] = set()
        self._send_high_water = endpoint.config.send_buffer_high_water
        self._stream_slot: asyncio.Future[None] | None = None  # openers wait for MAX_STREAMS
        self._flush_scheduled = False
        self._in_events = False  # handling the engine's events (its callers flush after)
        self._sent_in_events = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._last_activity = self._loop.time()
        self._keepalive: asyncio.TimerHandle | None = None
        self._ping_uid = 0
        self._terminated = False
        self.close_reason = ""  # why it ended, once `_terminated`
        self.bytes_received = 0
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._handlers = self._event_handlers()

    # -- endpoint side ----------------------------------------------------------------------
    def datagram_received(self, data: bytes, address: Address) -> None:
        """Feed one datagram; the endpoint calls `_on_receive_batch_end` once its batch ends."""
        now = self._loop.time()
        self._last_activity = now
        self.bytes_received += len(data)
        self.quic.receive_datagram(data, address, now)

    def segments_received(self, data: bytes, segment: int, address: Address) -> None:
        """Feed a receive-offload run of datagrams of `segment` bytes, in one buffer."""
        now = self._loop.time()
        self._last_activity = now
        self.bytes_received += len(data)
        self.quic.receive_segments(data, segment, address, now)

    def _on_receive_batch_end(self) -> None:
        """Handle what the batch of datagrams produced; answer them all at once, soon.

        The answer waits for the readers this batch woke up: a reply they write (and the credit
        for what they read) goes out in that one flush, and no empty flush sits on the path of
        a request and its reply. (ACKs keep aioquic's delay: riding on the reply, they would put
        their processing on that path too, which measured slower.) Replies that handlers of new
        streams wrote while the events were handled (`StreamHandlers` starts them at once) go
        now: nothing is left to wait for.
        """
        if self._process_events():
            self._flush()
        else:
            self._schedule_flush()

    def _flush(self) -> None:
        """Send what aioquic has ready and make sure its timer will fire."""
        self._flush_scheduled = False
        if self._terminated:
            return  # closed or aborted: what was due went out before
        now = self._loop.time()
        quic = self.quic
        datagrams = quic.datagrams_to_send(now)
        if datagrams:
            self._send_datagrams(datagrams)
        if quic.mtu_search is not None:
            probe = quic.mtu_probe(now)
            if probe is not None and not self.endpoint._send_probe(*probe):
                quic.mtu_probe_refused(len(probe[0]))
        timer_at = quic.get_timer()
        # Re-arm only for an earlier deadline: the loss-detection deadline moves later with
        # every packet sent, and a timer that fires early just re-arms (see `_on_timer`).
        if timer_at is not None and (self._timer_at is None or timer_at < self._timer_at):
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(timer_at, self._on_timer)
            self._timer_at = timer_at
        if self._drain_waiters:
            self._wake_drained()
        if self._stream_slot is not None:
            self._wake_stream_openers()

    def _send_datagrams(self, datagrams: list[tuple[bytes, Address]]) -> None:
        """Hand datagrams to the socket in runs per address (the socket batches each run)."""
        address = datagrams[0][1]
        run: list[bytes] = []
        for data, to in datagrams:
            if to != address:
                self.endpoint._send_batch(run, address)
                run, address = [], to
            run.append(data)
        self.endpoint._send_batch(run, address)

    def _schedule_flush(self) -> None:
        """Flush at the end of this loop iteration: the writes of one iteration share packets."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._scheduled_flush)

    def _flush_before_waiting(self) -> None:
        """A reader is about to wait, likely for the answer to what was just written: flush
        now if the scheduled flush is all the loop has left to run (nothing could add to it),
        instead of a loop turn later. With other callbacks queued (other writers), the flush
        stays scheduled, so their writes share its packets."""
        if self._in_events:
            return  # a handler started by `_process_events`: its caller flushes right after
        ready = getattr(self._loop, "_ready", None)  # asyncio's queue of runnable callbacks
        if ready is not None and len(ready) == 1:
            self._process_events()  # as the scheduled flush would, which then finds it done
            self._flush()

    def _scheduled_flush(self) -> None:
        if self._flush_scheduled:  # else a receive batch has flushed since
            self._process_events()  # what an engine let through as the reader read
            self._flush()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self._terminated:
            return
        now = self._loop.time()
        due = self.quic.get_timer()
        if due is None:
            return
        if due > now:  # armed for a deadline that has moved later
            self._timer = self._loop.call_at(due, self._on_timer)
            self._timer_at = due
            return
        self.quic.handle_timer(now)
        self._process_events()
        self._flush()

    # -- engine events ------------------------------------------------------------------
    def _event_handlers(self) -> dict[str, Callable]:
        """Handlers by event class name: aioquic's and qh3's events share names and fields."""
        return {
            "StreamDataReceived": self._on_stream_data,
            "StreamReset": self._on_stream_reset,
            "StopSendingReceived": self._on_stop_sending,
            "HandshakeCompleted": self._on_handshake_completed,
            "ConnectionIdIssued": lambda event: self.endpoint._register_cid(
                event.connection_id, self
            ),
            "ConnectionIdRetired": lambda event: self.endpoint._unregister_cid(event.connection_id),
            "ConnectionTerminated": lambda event: self._on_terminated(
                event.reason_phrase or f"error code {event.error_code:#x}", event.error_code
            ),
        }

    def _process_events(self) -> bool:
        """Handle what the engine has to say; True if streams were written to meanwhile (by
        handlers of new streams): the caller flushes then, no flush is scheduled for them."""
        handlers = self._handlers
        self._in_events = True
        self._sent_in_events = False
        try:
            while (event := self.quic.next_event()) is not None:
                handler = handlers.get(type(event).__name__)
                if handler is not None:
                    handler(event)
        finally:
            self._in_events = False
        return self._sent_in_events

    def _on_stream_reset(self, event) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream._feed_reset("reset by remote peer")
            self._forget(event.stream_id)

    def _on_stop_sending(self, event) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream._remote_stopped_sending()

    def _on_handshake_completed(self, event) -> None:
        if event.alpn_protocol != ALPN:
            # RFC 9001 8.1; qh3's client accepts a server that chose no ALPN at all.
            self._fail_handshake(
                HandshakeFailed(f"the remote negotiated ALPN {event.alpn_protocol!r}, not {ALPN!r}")
            )
            return
        certificate, chain_length = self.quic.peer_certificate()
        try:
            if certificate is None:
                raise InvalidCertificate("the remote sent no certificate (libp2p needs mutual TLS)")
            peer = verify_certificate(certificate, chain_length)
        except InvalidCertificate as exc:
            log.info("refusing QUIC connection from %s: %s", self.remote_address, exc)
            self._fail_handshake(exc)
            return
        if self.expected_peer is not None and peer != self.expected_peer:
            self._fail_handshake(PeerIdMismatch(self.expected_peer, peer))
            return
        self.remote_peer = peer
        self.remote_addr = self.endpoint.multiaddr_of(self.remote_address, peer)
        self._arm_keepalive()
        if not self.established.done():
            self.established.set_result(None)
        self.endpoint._connection_established(self)

    def _fail_handshake(self, error: HandshakeFailed) -> None:
        if not self.established.done():
            self.established.set_exception(error)
        self.quic.close(error_code=ERROR_CODE_AUTH, reason_phrase=str(error)[:200])
        self._flush()

    def _on_stream_data(self, event) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            stream_id = event.stream_id
            if self._terminated:  # closed meanwhile (a handler started at once closed it)
                return
            if not self.established.done() or self.established.exception() is not None:
                self._discard(event)  # data before authentication: ignore
                return
            if not _is_bidirectional(stream_id):
                # libp2p QUIC uses bidirectional streams only.
                self.quic.stop_stream(stream_id, ERROR_CODE_RESET)
                self._discard(event)
                return
            if stream_id & 1 == self._local_id_bit or not self._remote_ids.first_seen(stream_id):
                # ours, or the remote's reset or done with: late data of a stream let go
                self._discard(event)
                return
            stream = QuicStream(self, stream_id)
            self._streams[event.stream_id] = stream
            # Its first bytes before its handler, which may start at once and read them.
            if event.data:
                stream._feed_data(event.data)
            if event.end_stream:
                stream._feed_eof()
            self._deliver_inbound(stream)
            return
        if event.data:
            stream._feed_data(event.data)
        if event.end_stream:
            stream._feed_eof()

    def _discard(self, event) -> None:
        """Data nobody will read counts as read: its flow-control credit goes back."""
        if event.data and self.quic.consume(event.stream_id, len(event.data)):
            self._schedule_flush()
        self.quic.forget_stream(event.stream_id)

    def _on_terminated(self, reason: str, error_code: int = 0) -> None:
        if self._terminated:
            return
        self._terminated = True
        self.close_reason = reason
        for handle in (self._timer, self._keepalive):
            if handle is not None:
                handle.cancel()
        self._timer = self._keepalive = None
        self._timer_at = None
        if not self.established.done():
            self.established.set_exception(HandshakeFailed(f"connection refused: {reason}"))
        for stream in list(self._streams.values()):
            stream._connection_lost(reason)
        self._streams.clear()
        self._wake_drained()
        self._wake_stream_openers()
        self.endpoint._connection_terminated(self)
        self._mark_closed(reason)

    # -- keep-alive -------------------------------------------------------------------------
    def _arm_keepalive(self) -> None:
        interval = self.endpoint.config.keepalive_interval
        self._keepalive = self._loop.call_later(interval, self._on_keepalive)

    def _on_keepalive(self) -> None:
        if self._terminated:
            return
        interval = self.endpoint.config.keepalive_interval
        if self._loop.time() - self._last_activity >= interval * 0.9:
            self._ping_uid += 1
            self.quic.send_ping(self._ping_uid)
            self._flush()
        self._keepalive = self._loop.call_later(interval, self._on_keepalive)

    # -- streams ------------------------------------------------------------------------
    async def open_stream(self) -> QuicStream:
        if self.is_closed:
            raise ConnectionClosed(f"connection to {self.remote_peer} is closed")
        if not self.established.done():
            await self.established
        try:
            stream_id = self.quic.get_next_available_stream_id()
        except ValueError:  # the remote's concurrent stream limit (qh3 raises it)
            stream_id = await self._next_stream_id()
        stream = QuicStream(self, stream_id)
        self._streams[stream_id] = stream
        return stream

    async def _next_stream_id(self) -> int:
        """A stream ID once the remote allows one more stream, within `stream_slot_timeout`."""
        deadline = self._loop.time() + self.endpoint.config.stream_slot_timeout
        while True:
            try:
                return self.quic.get_next_available_stream_id()
            except ValueError as exc:
                slot = not self.is_closed and await self._wait_stream_slot(deadline)
                if self.is_closed:  # the swarm tries another path or dials again
                    raise ConnectionClosed(f"connection to {self.remote_peer} closed") from exc
                if not slot:
                    raise StreamError(
                        f"cannot open a stream to {self.remote_peer}: {exc} (no stream closed "
                        f"within {self.endpoint.config.stream_slot_timeout:g} s; "
                        "QuicConfig.stream_slot_timeout)"
                    ) from exc

    async def _wait_stream_slot(self, deadline: float) -> bool:
        """Wait for what the remote sends next (it may allow more streams); False at the
        deadline. As QUIC intends: an opener over the limit waits, it is not refused."""
        if self._stream_slot is None:
            self._stream_slot = self._loop.create_future()
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.shield(self._stream_slot)
        except TimeoutError:
            return False
        return not self.is_closed

    def _wake_stream_openers(self) -> None:
        slot, self._stream_slot = self._stream_slot, None
        if slot is not None and not slot.done():
            slot.set_result(None)

    def _send(self, stream_id: int, data: bytes | memoryview, end_stream: bool = False) -> None:
        try:
            self.quic.send_stream_data(stream_id, data, end_stream)
        except (ValueError, RuntimeError) as exc:  # stream finished or reset under us
            raise StreamError(f"cannot send on stream {stream_id}: {exc}") from exc
        if self._in_events:
            self._sent_in_events = True  # `_process_events`'s caller flushes
        else:
            self._schedule_flush()

    def _reset_stream(self, stream_id: int) -> None:
        try:
            self.quic.reset_stream(stream_id, ERROR_CODE_RESET)
            self.quic.stop_stream(stream_id, ERROR_CODE_RESET)
        except ValueError:
            pass  # already finished on both sides
        self._forget(stream_id)
        self._schedule_flush()

    def _forget(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)
        self.quic.forget_stream(stream_id)

    def _consume(self, stream_id: int, nbytes: int) -> None:
        if self.quic.consume(stream_id, nbytes):  # flow-control credit is due to the remote
            self._schedule_flush()

    def _reader_needs(self, stream_id: int, needed: int) -> None:
        if self.quic.reader_needs(stream_id, needed):
            self._schedule_flush()

    def _send_buffer_below_high_water(self, stream_id: int) -> bool:
        return self.quic.send_buffer_size(stream_id) < self._send_high_water

    def _watch_drain(self, stream: QuicStream) -> None:
        self._drain_waiters.add(stream)

    def _wake_drained(self) -> None:
        for stream in list(self._drain_waiters):
            if self._terminated or self._send_buffer_below_high_water(stream.stream_id):
                self._drain_waiters.discard(stream)
                stream._wake_writer()

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    # -- closing ------------------------------------------------------------------------
    async def close(self, reason: str = "closed by local peer") -> None:
        if self._terminated:
            return
        self.quic.close(error_code=0, reason_phrase=reason[:200])
        self._flush()
        # aioquic terminates after its draining period; the caller need not wait for it.
        self._on_terminated(reason)

    def abort(self, reason: str) -> None:
        """Drop the connection without telling the remote (dial timeouts, endpoint shutdown)."""
        self._on_terminated(reason)

    @property
    def remote_multiaddr(self) -> Multiaddr:
        host, port = self.remote_address[:2]
        return quic_multiaddr(host, port, self.remote_peer)
