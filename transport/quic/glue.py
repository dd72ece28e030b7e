"""The one place that reaches into aioquic's private state; each reach is tested.

- libp2p TLS needs mutual authentication, but aioquic requests a client certificate only
  through the private flag `tls._request_client_certificate`: we set it on server connections.
- The remote certificate (from which the peer ID comes) is the private `tls._peer_certificate`.
- Write backpressure needs the size of a stream's unacknowledged send buffer.
- aioquic doubles its receive windows as data *arrives*, whatever the application has read, so
  a slow reader makes memory grow without bound. We grant credit as the application *reads*
  (`consume`): receive memory per stream stays under one window. A stream let go with data
  unread (reset, refused) gives that data's credit back, and so does whatever arrives for it
  later: aioquic counts a stream's connection credit by its highest offset received, so ours
  follows that offset for such a stream (`forget_stream`).
- Path MTU discovery (`transport.quic.pmtu` decides): aioquic keeps one datagram size for the
  whole connection, in `_max_datagram_size` and in its congestion controller and pacer. We build
  padded PING probes ourselves, raise all three when a probe is acknowledged, keep lost probes
  out of congestion control, and watch lost big packets for black holes.
- aioquic writes a STREAM frame's length as a 2-byte varint, which overflows (and corrupts the
  frame) above 16,383 bytes: our STREAM frames use a varint of the length's own size.
- aioquic's pacer sizes a burst as 16 datagrams: a wake-up (timer, flush, system call) every
  21 kB at 1350 bytes, yet 1 MB bursts at 64 KiB. `BurstPacer` sizes it as 2 ms of data.
"""

from __future__ import annotations

import logging

from aioquic.buffer import Buffer, size_uint_var
from aioquic.quic import connection as aioquic_connection
from aioquic.quic.connection import END_STATES, QuicConnection
from aioquic.quic.packet import QuicFrameType, QuicPacketType, pull_quic_transport_parameters
from aioquic.quic.packet_builder import QuicDeliveryState, QuicPacketBuilder, QuicSentPacket
from aioquic.quic.recovery import K_MICRO_SECOND, QuicPacketPacer
from aioquic.tls import Epoch
from cryptography import x509

from transport.quic import congestion as _bdp  # noqa: F401  registers "bdp" with aioquic
from transport.quic.pmtu import PathMtuSearch

log = logging.getLogger(__name__)
NetworkAddress = tuple[str, int]
PACING_BURST_INTERVAL = 0.002  # seconds of data one burst may carry (as quinn's pacer)
MAX_PACING_BURST = 256 * 1024  # bytes per burst, well within the kernel's socket buffers
FORGOTTEN_PRUNE_AT = 64  # streams let go with data unread: drop those aioquic discarded


class BurstPacer(QuicPacketPacer):
    """aioquic's token-bucket pacer with bursts sized in time and bytes, not in datagrams.

    aioquic lets a burst carry 16 datagrams: 21 kB at 1350 bytes, so a sender wakes (timer,
    flush, system call) every 16 datagrams; but 1 MB at 64 KiB, more than a default socket
    buffer holds. Here a burst carries 2 ms of data at the pacing rate, at most 256 KiB and
    at least two datagrams. The rate is aioquic's (congestion window per RTT).
    """

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        super().update_rate(congestion_window=congestion_window, smoothed_rtt=smoothed_rtt)
        rtt = max(smoothed_rtt, K_MICRO_SECOND)
        burst = min(congestion_window * PACING_BURST_INTERVAL / rtt, MAX_PACING_BURST)
        burst = max(burst, 2 * self._max_datagram_size)
        self.bucket_max = burst * rtt / congestion_window
        self.bucket_time = min(self.bucket_time, self.bucket_max)


class Libp2pQuicConnection(QuicConnection):
    """aioquic's `QuicConnection` with client certificates, reader-driven flow control, path
    MTU probing and deeper pacing bursts (the `QuicEngine` of `transport.quic.engine`)."""

    def __init__(
        self,
        *args,
        stream_window: int,
        connection_window: int,
        max_streams: int,
        mtu_search: PathMtuSearch | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._loss._pacer = BurstPacer(max_datagram_size=self._max_datagram_size)
        # aioquic fixes the remote's concurrent bidirectional streams at 128.
        self._local_max_streams_bidi.value = max_streams
        self._local_max_streams_bidi.sent = max_streams
        self._stream_window = stream_window
        self._connection_window = connection_window
        self._consumed: dict[int, int] = {}
        self._consumed_total = 0
        self._reserved: dict[int, int] = {}  # offsets a waiting reader asked to be granted
        self._reserved_total = 0
        # Streams let go before aioquic discarded them -> the offset credited so far: their
        # bytes count as read by offset, whenever they arrive (no event of theirs counts).
        self._forgotten: dict[int, int] = {}
        self.mtu_search = mtu_search
        self._mtu_probes: dict[int, int] = {}  # packet number -> probed size, while in flight
        self._mtu_path: NetworkAddress | None = None  # the path the search is about
        if mtu_search is not None:
            self._watch_losses()

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if not self._is_client:
            # libp2p tls spec: "servers MUST require client authentication".
            self.tls._request_client_certificate = True

    def receive_segments(self, data: bytes, segment: int, addr: NetworkAddress, now: float) -> None:
        """A receive-offload run of datagrams of `segment` bytes: aioquic takes them one by one."""
        view = memoryview(data)
        for offset in range(0, len(data), segment):
            self.receive_datagram(bytes(view[offset : offset + segment]), addr, now)

    # -- what the endpoint reads ----------------------------------------------------------
    def peer_certificate(self) -> tuple[x509.Certificate | None, int]:
        """The remote's leaf certificate and the length of the chain it sent."""
        certificate = self.tls._peer_certificate
        chain = getattr(self.tls, "_peer_certificate_chain", [])
        return certificate, (1 + len(chain)) if certificate is not None else 0

    def get_next_available_stream_id(self, is_unidirectional: bool = False) -> int:
        """The ID of a new local stream, reserved at once.

        aioquic only moves to the next ID once data is sent on a stream, so two streams opened
        before either sends would share one ID (and one stream on the wire)."""
        stream_id = super().get_next_available_stream_id(is_unidirectional)
        self._get_or_create_stream_for_send(stream_id)
        return stream_id

    def send_buffer_size(self, stream_id: int) -> int:
        """Bytes written to the stream but not yet acknowledged by the remote."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        return len(stream.sender._buffer)

    def consume(self, stream_id: int, nbytes: int) -> bool:
        """The application has read `nbytes` more of `stream_id`: credit may be granted.

        True if that is enough for a MAX_STREAM_DATA or MAX_DATA update (the rules below).
        """
        if stream_id in self._forgotten:
            return False  # credited by offset as it arrived (`_credit_forgotten`)
        consumed = self._consumed.get(stream_id, 0) + nbytes
        self._consumed[stream_id] = consumed
        self._consumed_total += nbytes
        if (
            self._consumed_total + self._connection_window - self._local_max_data.value
            >= self._connection_window // 2
        ):
            return True
        stream = self._streams.get(stream_id)
        return stream is not None and (
            consumed + self._stream_window - stream.max_stream_data_local
            >= self._stream_window // 2
        )

    def reader_needs(self, stream_id: int, needed: int) -> bool:
        """A reader waits for `needed` unread bytes: grant that much even beyond the window.

        Without it a reader waiting for more than one window (readexactly, a big message)
        and the remote writer, out of credit, would wait for each other forever. True if
        this needs a MAX_STREAM_DATA or MAX_DATA update.
        """
        target = self._consumed.get(stream_id, 0) + needed
        if target <= self._reserved.get(stream_id, 0):
            return False
        self._reserved[stream_id] = target
        self._reserved_total = max(self._reserved_total, self._consumed_total + needed)
        stream = self._streams.get(stream_id)
        return self._reserved_total > self._local_max_data.value or (
            stream is not None and target > stream.max_stream_data_local
        )

    def forget_stream(self, stream_id: int) -> None:
        """The application let the stream go: what it received and did not read, and what
        still arrives for it, counts as read (or each reset with unread data would shrink
        the connection's window for good)."""
        consumed = self._consumed.pop(stream_id, 0)
        self._reserved.pop(stream_id, None)
        stream = self._streams.get(stream_id)
        if stream is None or stream_id in self._forgotten or not stream.max_stream_data_local:
            return
        receiver = stream.receiver
        if receiver.is_finished and receiver.highest_offset <= consumed:
            return  # all of it read: nothing more can arrive
        if len(self._forgotten) >= FORGOTTEN_PRUNE_AT:
            streams = self._streams
            self._forgotten = {i: o for i, o in self._forgotten.items() if i in streams}
        self._forgotten[stream_id] = consumed
        self._credit_forgotten(stream_id)

    def _credit_forgotten(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        highest = stream.receiver.highest_offset
        credited = self._forgotten[stream_id]
        if highest > credited:
            self._consumed_total += highest - credited
            self._forgotten[stream_id] = highest

    def _handle_stream_frame(self, context, frame_type: int, buf: Buffer) -> None:  # type: ignore[override]
        self._handle_frame_of_forgotten(super()._handle_stream_frame, context, frame_type, buf)

    def _handle_reset_stream_frame(self, context, frame_type: int, buf: Buffer) -> None:  # type: ignore[override]
        self._handle_frame_of_forgotten(
            super()._handle_reset_stream_frame, context, frame_type, buf
        )

    def _handle_frame_of_forgotten(self, handle, context, frame_type: int, buf: Buffer) -> None:
        """aioquic's handling of a STREAM or RESET_STREAM frame; one for a stream let go
        credits what it adds (its offset moved)."""
        if not self._forgotten:
            handle(context, frame_type, buf)
            return
        start = buf.tell()
        stream_id = buf.pull_uint_var()
        buf.seek(start)
        handle(context, frame_type, buf)
        if stream_id in self._forgotten:
            self._credit_forgotten(stream_id)

    # -- flow control: credit follows what the application read ---------------------------
    def _write_stream_limits(self, builder, space, stream) -> None:  # type: ignore[override]
        if not stream.max_stream_data_local:
            return  # a locally opened unidirectional stream: nothing to grant
        target = self._consumed.get(stream.stream_id, 0) + self._stream_window
        # Batch updates: grant once half a window has been read since the last grant.
        if target - stream.max_stream_data_local < self._stream_window // 2:
            target = stream.max_stream_data_local
        target = max(target, self._reserved.get(stream.stream_id, 0))  # a waiting reader
        if target > stream.max_stream_data_local:
            stream.max_stream_data_local = target
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA,
                capacity=aioquic_connection.MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=self._on_max_stream_data_delivery,
                handler_args=(stream,),
            )
            buf.push_uint_var(stream.stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local

    def _write_connection_limits(self, builder, space) -> None:  # type: ignore[override]
        max_data = self._local_max_data
        target = self._consumed_total + self._connection_window
        if target - max_data.value < self._connection_window // 2:
            target = max_data.value
        target = max(target, self._reserved_total)
        if target > max_data.value:
            max_data.value = target
        # Keep aioquic's own doubling from firing: it would grant credit nobody has read.
        saved_used = max_data.used
        max_data.used = 0
        try:
            super()._write_connection_limits(builder, space)
        finally:
            max_data.used = saved_used

    # -- path MTU discovery ---------------------------------------------------------------
    @property
    def max_datagram_size(self) -> int:
        """The UDP payload size this connection sends now."""
        return self._max_datagram_size

    def mtu_probe(self, now: float) -> tuple[bytes, NetworkAddress] | None:
        """A padded PING of the next size worth probing, registered as sent; or None."""
        search = self.mtu_search
        if (
            search is None
            or not self._handshake_confirmed
            or self._state in END_STATES
            or self._close_pending
        ):
            return None
        path = self._network_paths[0]
        if path.addr != self._mtu_path:
            if self._mtu_path is not None:  # a new path: it has proven nothing yet
                search.reset()
                self._set_datagram_size(search.size)
            self._mtu_path = path.addr
        if not path.is_validated:
            return None
        size = search.next_probe(now)
        if size is None:
            return None
        builder = QuicPacketBuilder(
            host_cid=self.host_cid,
            is_client=self._is_client,
            max_datagram_size=size,
            packet_number=self._packet_number,
            peer_cid=self._peer_cid.cid,
            peer_token=self._peer_token,
            quic_logger=self._quic_logger,
            spin_bit=self._spin_bit,
            version=self._version,
        )
        builder.start_packet(QuicPacketType.ONE_RTT, self._cryptos[Epoch.ONE_RTT])
        packet_number = builder.packet_number
        builder.start_frame(
            QuicFrameType.PING,
            handler=self._on_mtu_probe_delivery,
            handler_args=(size,),
        )
        padding = builder.remaining_buffer_space
        builder.start_frame(QuicFrameType.PADDING, capacity=padding).push_bytes(bytes(padding - 1))
        self._mtu_probes[packet_number] = size
        datagrams = self._flush_builder(
            builder=builder, network_path=path, peer_cid=self._peer_cid.cid, now=now
        )
        return datagrams[0]

    def mtu_probe_refused(self, size: int) -> None:
        """The local system could not send a probe of `size` (bigger than the interface)."""
        if self.mtu_search is not None:
            self.mtu_search.size_refused(size)

    def _on_mtu_probe_delivery(self, delivery: QuicDeliveryState, size: int) -> None:
        search = self.mtu_search
        if search is None:
            return
        if delivery == QuicDeliveryState.ACKED:
            if search.probe_acked(size):
                log.debug("path to %s carries %d-byte datagrams", self._mtu_path, size)
                self._set_datagram_size(size)
        else:
            search.probe_lost(size)

    def _set_datagram_size(self, size: int) -> None:
        self._max_datagram_size = size
        congestion = self._loss._cc
        if hasattr(congestion, "_max_datagram_size"):
            congestion._max_datagram_size = size
        if hasattr(congestion, "additive_increase_factor"):  # cubic: one segment
            congestion.additive_increase_factor = size
        self._loss._pacer._max_datagram_size = size

    def _watch_losses(self) -> None:
        """Keep probes away from congestion control; tell the search about big packets.

        A probe is in flight for loss detection (its PTO, its ACK), but neither takes nor
        grows the congestion window, and its loss is no congestion (RFC 9000 section 14.4).
        aioquic calls the controller for every in-flight packet once when it is sent and
        once when it is acknowledged, lost or expired: those calls are where a probe leaves
        `_mtu_probes` (its delivery handler, which tells the search, may run earlier).
        """
        congestion = self._loss._cc
        sent, acked, lost, expired = (
            congestion.on_packet_sent,
            congestion.on_packet_acked,
            congestion.on_packets_lost,
            congestion.on_packets_expired,
        )
        search = self.mtu_search
        assert search is not None
        probes = self._mtu_probes

        def on_packet_sent(*, packet: QuicSentPacket) -> None:
            if packet.packet_number not in probes:
                sent(packet=packet)

        def on_packet_acked(*, now: float, packet: QuicSentPacket) -> None:
            if probes.pop(packet.packet_number, None) is None:
                search.packet_acked(packet.sent_bytes, packet.sent_time)
                acked(now=now, packet=packet)

        def on_packets_lost(*, now: float, packets: list[QuicSentPacket]) -> None:
            data = [p for p in packets if probes.pop(p.packet_number, None) is None]
            if data:
                lost(now=now, packets=data)
                self._check_black_hole(data)

        def on_packets_expired(*, packets: list[QuicSentPacket]) -> None:
            data = [p for p in packets if probes.pop(p.packet_number, None) is None]
            expired(packets=data)
            self._check_black_hole(data)

        congestion.on_packet_sent = on_packet_sent
        congestion.on_packet_acked = on_packet_acked
        congestion.on_packets_lost = on_packets_lost
        congestion.on_packets_expired = on_packets_expired

    def _check_black_hole(self, packets: list[QuicSentPacket]) -> None:
        search = self.mtu_search
        if search is None or not packets:
            return
        if search.packets_lost([(p.sent_bytes, p.sent_time or 0.0) for p in packets]):
            log.info(
                "path to %s stopped carrying big datagrams: back to %d bytes",
                self._mtu_path,
                search.size,
            )
            self._set_datagram_size(search.size)

    def _parse_transport_parameters(self, data: bytes, from_session_ticket: bool = False) -> None:
        super()._parse_transport_parameters(data, from_session_ticket)
        if self.mtu_search is not None:
            parameters = pull_quic_transport_parameters(Buffer(data=data))
            if parameters.max_udp_payload_size is not None:
                self.mtu_search.limit(parameters.max_udp_payload_size)

    # -- frames aioquic writes or reads slowly ----------------------------------------------
    def _write_stream_frame(self, builder, space, stream, max_offset: int) -> int:  # type: ignore[override]
        sender = stream.sender
        offset_size = size_uint_var(sender.next_offset) if sender.next_offset else 0
        # type byte, stream ID, offset, and a length of up to 4 bytes (payloads < 1 GiB)
        overhead = 1 + size_uint_var(stream.stream_id) + offset_size + 4
        highest_before = sender.highest_offset
        frame = sender.get_frame(builder.remaining_flight_space - overhead, max_offset)
        if frame is None:
            return 0
        frame_type = QuicFrameType.STREAM_BASE | 2  # LEN bit
        if frame.offset:
            frame_type |= 4  # OFF bit
        if frame.fin:
            frame_type |= 1  # FIN bit
        end = frame.offset + len(frame.data)
        buf = builder.start_frame(
            frame_type,
            capacity=overhead,
            handler=sender.on_data_delivery,
            handler_args=(frame.offset, end, frame.fin),
        )
        buf.push_uint_var(stream.stream_id)
        if frame.offset:
            buf.push_uint_var(frame.offset)
        buf.push_uint_var(len(frame.data))
        buf.push_bytes(frame.data)
        if self._quic_logger is not None:
            builder.quic_logger_frames.append(
                self._quic_logger.encode_stream_frame(frame, stream_id=stream.stream_id)
            )
        return sender.highest_offset - highest_before

    def _handle_padding_frame(self, context, frame_type: int, buf: Buffer) -> None:  # type: ignore[override]
        # aioquic steps through padding byte by byte in Python: 3 ms for a 64 KiB probe.
        start = buf.tell()
        rest = buf.data_slice(start, buf.capacity)
        buf.seek(start + len(rest) - len(rest.lstrip(b"\0")))
        if self._quic_logger is not None:
            context.quic_logger_frames.append(self._quic_logger.encode_padding_frame())
