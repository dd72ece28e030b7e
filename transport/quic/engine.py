"""The seam between our QUIC glue and the QUIC engine: what `QuicConnection` asks of it.

Two engines fill it, chosen by `QuicConfig.engine`:
- aioquic's sans-I/O `QuicConnection`, extended in `transport.quic.glue` (the fallback). Its
  per-packet Python work bounds one connection at Internet-size datagrams (about 65-90 MB per
  CPU-second per side here, engine alone: `benchmarks/quic_engines.py`).
- qh3's Rust connection core (`transport.quic.engine_qh3`, TLS in `transport.quic.glue_qh3`),
  the default where qh3 is installed: 5-20x less CPU per byte; its flow-control bound is per
  connection, and it probes the path MTU itself.
An engine takes datagrams and time in, gives datagrams and events out (classes named as
aioquic's `aioquic.quic.events`, with the same fields), never touches a socket or a clock, and
offers the flow-control and path MTU hooks below.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from aioquic.quic.events import QuicEvent
from cryptography import x509

from transport.quic.pmtu import PathMtuSearch

NetworkAddress = tuple[str, int]


@runtime_checkable
class QuicEngine(Protocol):
    """One QUIC connection's state machine, as `transport.quic.connection` drives it."""

    host_cid: bytes
    mtu_search: PathMtuSearch | None

    # -- datagrams, time and events (aioquic's sans-I/O interface) ------------------------
    def connect(self, addr: NetworkAddress, now: float) -> None: ...

    def receive_datagram(self, data: bytes, addr: NetworkAddress, now: float) -> None: ...

    def receive_segments(
        self, data: bytes, segment: int, addr: NetworkAddress, now: float
    ) -> None: ...

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, NetworkAddress]]: ...

    def get_timer(self) -> float | None: ...

    def handle_timer(self, now: float) -> None: ...

    def next_event(self) -> QuicEvent | None: ...

    # -- streams and the connection ---------------------------------------------------------
    def get_next_available_stream_id(self, is_unidirectional: bool = False) -> int: ...

    def send_stream_data(
        self, stream_id: int, data: bytes | memoryview, end_stream: bool = False
    ) -> None: ...

    def reset_stream(self, stream_id: int, error_code: int) -> None: ...

    def stop_stream(self, stream_id: int, error_code: int) -> None: ...

    def send_ping(self, uid: int) -> None: ...

    def close(
        self, error_code: int = 0, frame_type: int | None = None, reason_phrase: str = ""
    ) -> None: ...

    # -- what libp2p and our flow control need beyond aioquic's interface ---------------------
    def peer_certificate(self) -> tuple[x509.Certificate | None, int]: ...

    def send_buffer_size(self, stream_id: int) -> int: ...

    def consume(self, stream_id: int, nbytes: int) -> bool: ...

    def reader_needs(self, stream_id: int, needed: int) -> bool: ...

    def forget_stream(self, stream_id: int) -> None: ...

    # -- path MTU discovery ---------------------------------------------------------------
    @property
    def max_datagram_size(self) -> int: ...

    def mtu_probe(self, now: float) -> tuple[bytes, NetworkAddress] | None: ...

    def mtu_probe_refused(self, size: int) -> None: ...
