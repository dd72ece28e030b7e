"""libp2p QUIC-v1 transport on aioquic's sans-I/O connection, with our own datagram glue."""

from transport.quic.config import QuicConfig
from transport.quic.connection import QuicConnection
from transport.quic.endpoint import QuicEndpoint
from transport.quic.stream import QuicStream

__all__ = ["QuicConfig", "QuicConnection", "QuicEndpoint", "QuicStream"]
