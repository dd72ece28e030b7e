"""The QUIC endpoint: ONE UDP socket that accepts and dials, demultiplexed by connection ID.

Using one socket (one local port) for both directions is what makes hole punching possible:
the NAT mapping the remote saw for our outbound packets is the one it dials back to.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable

from aioquic.buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.packet import (
    QuicPacketType,
    QuicProtocolVersion,
    encode_quic_version_negotiation,
    pull_quic_header,
)

from transport.errors import DialError, DialTimeout, HandshakeFailed, PeerUnreachable
from transport.identity import KeyPair, PeerId
from transport.multiaddr import Multiaddr, quic_multiaddr
from transport.quic.config import QuicConfig
from transport.quic.connection import Address, QuicConnection
from transport.quic.engine import QuicEngine
from transport.quic.glue import Libp2pQuicConnection
from transport.quic.pmtu import IPV4_HEADER, IPV6_HEADER, UDP_HEADER, PathMtuSearch, ladder
from transport.quic.udp import UdpSocket, route_mtu
from transport.tls import ALPN, make_certificate

log = logging.getLogger(__name__)

CONNECTION_ID_LENGTH = 8
SMALLEST_INITIAL_DATAGRAM = 1200  # RFC 9000 14.1: a client Initial is padded to this
SUPPORTED_VERSIONS = [QuicProtocolVersion.VERSION_1]  # "/quic-v1"

ConnectionCallback = Callable[[QuicConnection], None]


class QuicEndpoint:
    """Accepts and dials libp2p QUIC connections on one UDP socket."""

    def __init__(
        self,
        key: KeyPair,
        config: QuicConfig | None = None,
        on_connection: ConnectionCallback | None = None,
    ) -> None:
        self.key = key
        self.config = config or QuicConfig()
        self.on_connection = on_connection
        self.local_address: Address | None = None
        self.datagrams_dropped = 0
        self._socket = UdpSocket(
            self._datagram_received,
            self._flush_dirty,
            use_gso=self.config.udp_offload,
            use_gro=self.config.udp_offload,
            on_segments=self._segments_received,
        )
        self._dirty: set[QuicConnection] = set()
        self._by_cid: dict[bytes, QuicConnection] = {}
        self._connections: set[QuicConnection] = set()
        self._certificate, self._certificate_key = make_certificate(key)

    # -- lifecycle ------------------------------------------------------------------------
    async def listen(self, host: str, port: int = 0) -> Address:
        """Bind the endpoint's socket; returns the bound (host, port)."""
        if self._socket.is_open:
            raise RuntimeError("endpoint already bound")
        try:
            self.local_address = self._socket.bind(host, port)
        except OSError as exc:
            raise DialError(
                f"cannot bind UDP {host}:{port}: {exc.strerror or exc}; "
                "pick another port or address"
            ) from exc
        log.debug("QUIC endpoint listening on %s", self.listen_multiaddr)
        return self.local_address

    def listen_on_socket(self, sock: socket.socket) -> Address:
        """Serve an already bound UDP socket (one whose NAT mapping hole punching opened)."""
        if self._socket.is_open:
            raise RuntimeError("endpoint already bound")
        self.local_address = self._socket.adopt(sock)
        return self.local_address

    async def close(self) -> None:
        """Close every connection gracefully, then the socket."""
        for connection in list(self._connections):
            await connection.close("endpoint closing")
        self._socket.close()

    def abort(self) -> None:
        """Drop the socket without telling anyone, as a crashed process would (for tests)."""
        self._socket.close()

    @property
    def listen_multiaddr(self) -> Multiaddr | None:
        if self.local_address is None:
            return None
        return quic_multiaddr(self.local_address[0], self.local_address[1])

    def multiaddr_of(self, address: Address, peer: PeerId | None = None) -> Multiaddr:
        host = address[0]
        if host.startswith("::ffff:"):
            host = host[7:]
        return quic_multiaddr(host, address[1], peer)

    @property
    def connections(self) -> list[QuicConnection]:
        return list(self._connections)

    # -- dialing ----------------------------------------------------------------------------
    async def dial(
        self,
        address: Address,
        expected_peer: PeerId | None = None,
        timeout: float | None = None,
    ) -> QuicConnection:
        """Connect to `address`; the remote must prove it is `expected_peer` (when given)."""
        if not self._socket.is_open:
            raise DialError("endpoint is not listening; call listen() first")
        address = self._normalize_address(address)
        quic = self._engine(address)
        connection = QuicConnection(self, quic, address, True, expected_peer)
        self._register_cid(quic.host_cid, connection)
        self._connections.add(connection)
        quic.connect(address, now=asyncio.get_running_loop().time())
        connection._flush()
        timeout = timeout or self.config.handshake_timeout
        target = f"{address[0]}:{address[1]}" + (f" ({expected_peer})" if expected_peer else "")
        try:
            await asyncio.wait_for(asyncio.shield(connection.established), timeout)
        except TimeoutError:
            connection.abort("dial timed out")
            raise DialTimeout(
                f"no QUIC answer from {target} within {timeout:.1f} s: the peer is down, "
                "the address is wrong, or a firewall drops UDP"
            ) from None
        except HandshakeFailed as exc:
            connection.abort(str(exc))
            if not str(exc).startswith("connection refused"):
                raise
            raise HandshakeFailed(f"handshake with {target} failed: {exc}") from exc
        except asyncio.CancelledError:
            connection.abort("dial cancelled")
            raise
        return connection

    def send_raw(self, data: bytes, address: Address) -> None:
        """Send a datagram outside any connection (hole punching opens NAT mappings this way)."""
        self._sendto(data, self._normalize_address(address))

    # -- datagram plumbing ------------------------------------------------------------------
    def _sendto(self, data: bytes, address: Address) -> None:
        self._socket.sendto(data, address)

    def _send_batch(self, datagrams: list[bytes], address: Address) -> None:
        self._socket.send_batch(datagrams, address)

    def _send_probe(self, data: bytes, address: Address) -> bool:
        return self._socket.send_unfragmented(data, address)

    def _mtu_search(self, address: Address) -> PathMtuSearch | None:
        """The path MTU search of a new connection to `address` (None: probing is off)."""
        config = self.config
        if not config.pmtu_probing or not self._socket.can_send_unfragmented:
            return None
        sizes = ladder(config.max_datagram_size, self._probe_ceiling(address), _is_ipv6(address))
        return PathMtuSearch(base=config.max_datagram_size, candidates=sizes) if sizes else None

    def _probe_ceiling(self, address: Address) -> int:
        """The biggest datagram worth probing towards `address`: no bigger than the local
        interface could send unfragmented, nor than the configured maximum."""
        ceiling = self.config.max_probed_datagram_size
        mtu = route_mtu(address)
        if mtu is not None:
            header = IPV6_HEADER if _is_ipv6(address) else IPV4_HEADER
            ceiling = min(ceiling, mtu - UDP_HEADER - header)
        return ceiling

    def _flush_dirty(self) -> None:
        """End of a receive batch: each connection that got datagrams answers once."""
        dirty, self._dirty = self._dirty, set()
        for connection in dirty:
            connection._on_receive_batch_end()

    def _segments_received(self, data: bytes, segment: int, address: Address) -> None:
        """A receive-offload run: datagrams of `segment` bytes (the last may be shorter).

        When every one is a short-header packet of the same known connection (the usual case:
        the kernel only coalesces one UDP flow), the run goes to that connection whole;
        otherwise each datagram takes the ordinary path.
        """
        end = 1 + CONNECTION_ID_LENGTH
        cid = data[1:end]
        connection = None if data[0] & 0x80 else self._by_cid.get(cid)
        if connection is not None and all(
            not data[offset] & 0x80 and data[offset + 1 : offset + end] == cid
            for offset in range(segment, len(data), segment)
        ):
            connection.segments_received(data, segment, address)
            self._dirty.add(connection)
            return
        view = memoryview(data)
        for offset in range(0, len(data), segment):
            self._datagram_received(bytes(view[offset : offset + segment]), address)

    def _datagram_received(self, data: bytes, address: Address) -> None:
        # Fast path: a short-header (1-RTT) packet carries our fixed-length CID at bytes 1..8.
        if data and not data[0] & 0x80:
            connection = self._by_cid.get(data[1 : 1 + CONNECTION_ID_LENGTH])
            if connection is not None:
                connection.datagram_received(data, address)
                self._dirty.add(connection)
                return
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CONNECTION_ID_LENGTH)
        except ValueError:
            self.datagrams_dropped += 1
            log.debug("dropping a non-QUIC datagram from %s (%d bytes)", address, len(data))
            return
        connection = self._by_cid.get(header.destination_cid)
        if connection is not None:
            connection.datagram_received(data, address)
            self._dirty.add(connection)
            return
        if header.packet_type == QuicPacketType.VERSION_NEGOTIATION:
            return
        if header.version is not None and header.version not in SUPPORTED_VERSIONS:
            self._sendto(
                encode_quic_version_negotiation(
                    source_cid=header.destination_cid,
                    destination_cid=header.source_cid,
                    supported_versions=SUPPORTED_VERSIONS,
                ),
                address,
            )
            return
        if header.packet_type != QuicPacketType.INITIAL or len(data) < SMALLEST_INITIAL_DATAGRAM:
            self.datagrams_dropped += 1
            return
        if len(self._connections) >= self.config.max_connections:
            log.warning("refusing QUIC connection from %s: connection limit reached", address)
            self.datagrams_dropped += 1
            return
        self._accept(data, address, header.destination_cid)

    def _accept(self, data: bytes, address: Address, original_cid: bytes) -> None:
        quic = self._engine(address, original_cid)
        connection = QuicConnection(self, quic, address, False)
        self._connections.add(connection)
        self._register_cid(original_cid, connection)
        self._register_cid(quic.host_cid, connection)
        connection._handshake_timer = asyncio.get_running_loop().call_later(
            self.config.handshake_timeout, self._expire_handshake, connection
        )
        connection.datagram_received(data, address)
        self._dirty.add(connection)

    def _expire_handshake(self, connection: QuicConnection) -> None:
        if not connection.established.done():
            log.debug("inbound handshake from %s timed out", connection.remote_address)
            connection.abort("handshake timed out")

    def _engine(self, address: Address, original_cid: bytes | None = None) -> QuicEngine:
        """A new connection's engine: a client's, or (with `original_cid`) a server's."""
        config = self.config
        is_client = original_cid is None
        if config.engine == "qh3":
            from transport.quic.engine_qh3 import MAX_PROBED_DATAGRAM, Qh3Engine, qh3_configuration

            probing = config.pmtu_probing and self._socket.can_send_unfragmented
            ceiling = config.max_datagram_size
            if probing:
                ceiling = min(self._probe_ceiling(address), MAX_PROBED_DATAGRAM)
            return Qh3Engine(
                qh3_configuration(
                    is_client=is_client,
                    certificate=self._certificate,
                    private_key=self._certificate_key,
                    alpn=ALPN,
                    idle_timeout=config.idle_timeout,
                    max_datagram_size=max(ceiling, config.max_datagram_size),
                    probe_datagram_size=probing and ceiling > config.max_datagram_size,
                    # Half for qh3's core, half for what it delivered and was not read yet.
                    max_data=config.connection_window // 2,
                    max_stream_data=config.stream_window // 2,
                    connection_id_length=CONNECTION_ID_LENGTH,
                    supported_versions=list(SUPPORTED_VERSIONS),
                ),
                original_destination_connection_id=original_cid,
            )
        return Libp2pQuicConnection(
            configuration=self._configuration(is_client=is_client),
            original_destination_connection_id=original_cid,
            stream_window=config.stream_window,
            connection_window=config.connection_window,
            max_streams=config.max_streams,
            mtu_search=self._mtu_search(address),
        )

    def _configuration(self, is_client: bool) -> QuicConfiguration:
        config = self.config
        return QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[ALPN],
            certificate=self._certificate,
            private_key=self._certificate_key,
            verify_mode=ssl.CERT_NONE,  # we verify the libp2p certificate ourselves
            idle_timeout=config.idle_timeout,
            max_datagram_size=config.max_datagram_size,
            max_data=config.connection_window,
            max_stream_data=config.stream_window,
            supported_versions=list(SUPPORTED_VERSIONS),
            connection_id_length=CONNECTION_ID_LENGTH,
            congestion_control_algorithm=config.congestion_control,
        )

    def _normalize_address(self, address: Address) -> Address:
        host, port = address[0], address[1]
        if self.local_address is not None and ":" in self.local_address[0]:
            if ipaddress.ip_address(host).version == 4:
                host = f"::ffff:{host}"
        elif ipaddress.ip_address(host).version == 6:
            raise PeerUnreachable(f"cannot reach IPv6 {host} from an IPv4 socket")
        return (host, port)

    # -- connection bookkeeping ---------------------------------------------------------
    def _register_cid(self, cid: bytes, connection: QuicConnection) -> None:
        self._by_cid[cid] = connection

    def _unregister_cid(self, cid: bytes) -> None:
        self._by_cid.pop(cid, None)

    def _connection_established(self, connection: QuicConnection) -> None:
        timer = connection._handshake_timer
        if timer is not None:
            timer.cancel()
        if self.on_connection is not None:
            self.on_connection(connection)

    def _connection_terminated(self, connection: QuicConnection) -> None:
        timer = connection._handshake_timer
        if timer is not None:
            timer.cancel()
        self._connections.discard(connection)
        for cid in [cid for cid, owner in self._by_cid.items() if owner is connection]:
            del self._by_cid[cid]


def _is_ipv6(address: Address) -> bool:
    host = address[0]
    return ":" in host and not host.startswith("::ffff:")


__all__ = ["ConnectionCallback", "QuicEndpoint"]
