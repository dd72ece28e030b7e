"""The one place that reaches into aioquic's private state; each reach is tested.

- libp2p TLS needs mutual authentication, but aioquic requests a client certificate only
  through the private flag `tls._request_client_certificate`: we set it on server connections.
- The remote certificate (from which the peer ID comes) is the private `tls._peer_certificate`.
- Write backpressure needs the size of a stream's unacknowledged send buffer.
- aioquic doubles its receive windows as data *arrives*, whatever the application has read, so
  a slow reader makes memory grow without bound. We grant credit as the application *reads*
  (`consume`): receive memory per stream stays under one window.
"""

from __future__ import annotations

from aioquic.quic import connection as aioquic_connection
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicFrameType
from cryptography import x509


class Libp2pQuicConnection(QuicConnection):
    """aioquic's `QuicConnection` with client certificates and reader-driven flow control."""

    def __init__(
        self, *args, stream_window: int, connection_window: int, max_streams: int, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        # aioquic fixes the remote's concurrent bidirectional streams at 128.
        self._local_max_streams_bidi.value = max_streams
        self._local_max_streams_bidi.sent = max_streams
        self._stream_window = stream_window
        self._connection_window = connection_window
        self._consumed: dict[int, int] = {}
        self._consumed_total = 0

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if not self._is_client:
            # libp2p tls spec: "servers MUST require client authentication".
            self.tls._request_client_certificate = True

    # -- what the endpoint reads ----------------------------------------------------------
    def peer_certificate(self) -> tuple[x509.Certificate | None, int]:
        """The remote's leaf certificate and the length of the chain it sent."""
        certificate = self.tls._peer_certificate
        chain = getattr(self.tls, "_peer_certificate_chain", [])
        return certificate, (1 + len(chain)) if certificate is not None else 0

    def send_buffer_size(self, stream_id: int) -> int:
        """Bytes written to the stream but not yet acknowledged by the remote."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        return len(stream.sender._buffer)

    def consume(self, stream_id: int, nbytes: int) -> None:
        """The application has read `nbytes` more of `stream_id`: credit may be granted."""
        self._consumed[stream_id] = self._consumed.get(stream_id, 0) + nbytes
        self._consumed_total += nbytes

    def forget_stream(self, stream_id: int) -> None:
        self._consumed.pop(stream_id, None)

    # -- flow control: credit follows what the application read ---------------------------
    def _write_stream_limits(self, builder, space, stream) -> None:  # type: ignore[override]
        if not stream.max_stream_data_local:
            return  # a locally opened unidirectional stream: nothing to grant
        target = self._consumed.get(stream.stream_id, 0) + self._stream_window
        # Batch updates: grant once half a window has been read since the last grant.
        if target - stream.max_stream_data_local >= self._stream_window // 2:
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
        if target - max_data.value >= self._connection_window // 2:
            max_data.value = target
        # Keep aioquic's own doubling from firing: it would grant credit nobody has read.
        saved_used = max_data.used
        max_data.used = 0
        try:
            super()._write_connection_limits(builder, space)
        finally:
            max_data.used = saved_used
