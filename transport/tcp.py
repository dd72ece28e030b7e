"""The libp2p TCP transport: TCP, multistream-select, Noise XX (`/noise`), Yamux (`/yamux/1.0.0`).

Dialer and listener upgrade a raw byte pipe in the order every libp2p implementation does:
negotiate `/noise`, run the Noise XX handshake (which proves the remote's peer ID), negotiate
`/yamux/1.0.0` inside the encrypted channel, then multiplex. The dialer negotiates lazily (its
proposals travel with its first handshake bytes), so a connection costs the TCP handshake plus
1.5 round trips, and the dialer's first stream rides with the last handshake message.

`secure_and_mux()` performs the same upgrade over any `Stream` (a relayed circuit) or
`ByteChannel`; `TcpTransport` listens and dials `/ip4|ip6|dns*/HOST/tcp/PORT[/p2p/ID]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import socket
import struct
import time
import weakref
from collections.abc import Callable
from typing import cast

from pydantic import BaseModel, Field

from transport.connection import DIRECT, RELAYED
from transport.errors import (
    ConnectionClosed,
    DialTimeout,
    HandshakeFailed,
    InvalidMultiaddr,
    PeerUnreachable,
    TransportError,
)
from transport.identity import KeyPair, PeerId
from transport.multiaddr import Multiaddr
from transport.multistream import select_inbound, select_outbound
from transport.noise import (
    PROTOCOL_ID as NOISE_PROTOCOL_ID,
)
from transport.noise import (
    BufferedChannel,
    ByteChannel,
    NoiseHandshake,
    SecureChannel,
    StreamChannel,
    perform_handshake,
)
from transport.stream import Stream
from transport.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from transport.yamux import YamuxConfig, YamuxConnection

log = logging.getLogger(__name__)

ConnectionHandler = Callable[["TcpConnection"], None]
REUSE_PORT = hasattr(socket, "SO_REUSEPORT")  # listener and dials share a port (Linux, BSDs)
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
_LINGER_OFF = struct.pack("ii", 0, 0)
RELEASE_WAIT = 1.0  # seconds a dial from our listen port waits for a given-up one to close
HALF_OPEN_MEMORY = 180.0  # seconds a NAT may track an unanswered SYN (Linux conntrack: 120 s)


class TcpConfig(BaseModel):
    """Settings of the TCP transport; every limit is explicit."""

    model_config = {"frozen": True}

    dial_timeout: float = Field(10.0, gt=0, description="seconds for the TCP connect")
    handshake_timeout: float = Field(
        10.0, gt=0, description="seconds for /noise, the Noise handshake and /yamux/1.0.0"
    )
    max_pending_handshakes: int = Field(
        256, ge=1, description="inbound connections still upgrading; more are dropped at once"
    )
    write_buffer_high: int = Field(
        2 * 1024 * 1024,
        ge=65536,
        description="socket send buffer (bytes in asyncio's queue) above which writers wait",
    )
    write_buffer_low: int = Field(
        512 * 1024, ge=0, description="writers resume once the queue drains below this"
    )
    close_timeout: float = Field(
        5.0, gt=0, description="seconds a closing socket may take to send what is queued"
    )
    congestion_control: str | None = Field(
        "bbr",
        description="the kernel's TCP congestion control for our connections where it offers "
        "it (Linux TCP_CONGESTION; else its default): BBR's rate does not halve at a random "
        "loss (lab link, 20 ms RTT and 1% loss: BBR 20-28 MB/s, cubic 0.8). None: the default",
    )
    yamux: YamuxConfig = Field(default_factory=YamuxConfig)


def use_congestion_control(sock: socket.socket | None, name: str) -> bool:
    """Ask the kernel to run `name` on this TCP socket; False where it cannot (not Linux,
    not loaded, or not allowed to this user): the connection keeps the kernel's default."""
    option = getattr(socket, "TCP_CONGESTION", None)
    if sock is None or option is None:
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, name.encode())
    except OSError as exc:
        log.debug("TCP congestion control %r not available: %s", name, exc)
        return False
    return True


# -- addresses ------------------------------------------------------------------------------


def tcp_multiaddr(host: str, port: int, peer_id: PeerId | None = None) -> Multiaddr:
    """`/ip4|ip6/<host>/tcp/<port>[/p2p/<id>]` for a socket address."""
    if host.startswith("::ffff:"):
        host = host[7:]
    host = host.split("%", 1)[0]  # drop an IPv6 scope
    family = "ip6" if ":" in host else "ip4"
    address = Multiaddr.parse(f"/{family}/{host}/tcp/{port}")
    return address.with_peer_id(peer_id) if peer_id is not None else address


def tcp_socket_address(address: Multiaddr) -> tuple[str, int, int]:
    """(host, port, socket family) of a direct TCP multiaddr; `InvalidMultiaddr` otherwise."""
    components = address.without_peer_id().components
    if (
        len(components) != 2
        or components[0][0] not in ("ip4", "ip6", "dns", "dns4", "dns6")
        or components[1][0] != "tcp"
    ):
        raise InvalidMultiaddr(
            f"{address} is not a direct TCP address (/ip4|ip6|dns*/HOST/tcp/PORT[/p2p/ID])"
        )
    kind, host = components[0]
    family = {"ip4": socket.AF_INET, "dns4": socket.AF_INET, "ip6": socket.AF_INET6}.get(
        kind, socket.AF_INET6 if kind == "dns6" else socket.AF_UNSPEC
    )
    return str(host), int(components[1][1] or 0), family


# -- the socket as a ByteChannel ------------------------------------------------------------


RECEIVE_BUFFER_SIZE = 1024 * 1024  # bytes one recv_into() may bring in at once
_receive_buffers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, memoryview] = (
    weakref.WeakKeyDictionary()
)


def _receive_buffer(loop: asyncio.AbstractEventLoop) -> memoryview:
    """The event loop's receive buffer, shared by all its TCP channels.

    Sharing is safe: asyncio fills it and calls `buffer_updated()` in one callback, and every
    receiver is done with the bytes (decrypted, or copied) when that callback returns.
    """
    buffer = _receive_buffers.get(loop)
    if buffer is None:
        buffer = _receive_buffers[loop] = memoryview(bytearray(RECEIVE_BUFFER_SIZE))
    return buffer


class TcpChannel(asyncio.BufferedProtocol, BufferedChannel):
    """An asyncio TCP socket as a `ByteChannel`: callbacks straight into Noise and Yamux.

    Reads go straight into a large reused buffer (no allocation per read); receivers see a
    view of it that is valid only during their `data_received()` call.
    """

    def __init__(self, config: TcpConfig) -> None:
        BufferedChannel.__init__(self)
        self.close_timeout = config.close_timeout
        self._config = config
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._closing = False
        self._abort_timer: asyncio.TimerHandle | None = None
        self._done: asyncio.Future[None] = self._loop.create_future()
        self.on_made: Callable[[TcpChannel], None] | None = None
        self._receive_buffer = _receive_buffer(self._loop)

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not registered as asyncio.Transport: no isinstance check)
        self._transport = cast(asyncio.Transport, transport)
        if self._config.congestion_control:
            use_congestion_control(
                transport.get_extra_info("socket"), self._config.congestion_control
            )
        transport.set_write_buffer_limits(
            high=self._config.write_buffer_high, low=self._config.write_buffer_low
        )
        if self.on_made is not None:
            self.on_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._receive_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self._deliver_data(self._receive_buffer[:nbytes])  # type: ignore[arg-type]

    def eof_received(self) -> bool:
        self._deliver_eof()
        return False  # close our side too: libp2p connections do not stay half-open

    def connection_lost(self, exc: Exception | None) -> None:
        self._writable.set()
        if self._abort_timer is not None:
            self._abort_timer.cancel()
        if exc is not None:
            self._deliver_lost(ConnectionClosed(f"TCP connection lost: {exc}"))
        elif not self._eof:
            self._deliver_lost(ConnectionClosed("TCP connection closed"))
        if not self._done.done():
            self._done.set_result(None)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # ByteChannel
    @property
    def socket_names(self) -> tuple[tuple[str, int], tuple[str, int]]:
        """(local, remote) socket addresses."""
        assert self._transport is not None
        return (
            self._transport.get_extra_info("sockname")[:2],
            self._transport.get_extra_info("peername")[:2],
        )

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._transport is not None and not self._closing:
            self._transport.write(data)

    async def drain(self) -> None:
        while not self._writable.is_set():
            await self._writable.wait()
        if self._lost is not None or self._done.done():
            raise ConnectionClosed(str(self._lost or "TCP connection closed"))

    @property
    def writable(self) -> bool:
        return self._writable.is_set()

    def close(self) -> None:
        if self._closing or self._transport is None:
            return
        self._closing = True
        self._transport.close()  # sends what is queued first
        if not self._done.done():
            self._abort_timer = self._loop.call_later(
                self.close_timeout, self.abort, "close timed out"
            )

    def abort(self, reason: str = "aborted") -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.abort()
        elif not self._done.done():
            self._done.set_result(None)

    def reset_on_close(self, enabled: bool) -> None:
        """Whether closing sends a RST (the socket is gone at once, with no TIME_WAIT).

        A plain close or abort ends gracefully (FIN), and the side that closes first holds the
        port pair in TIME_WAIT for a minute: a dial from our listen port to the same peer (the
        bootstrap's TCP dial after its QUIC dial won the race, a hole punch) could not use it."""
        if self._transport is None:
            return
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                linger = _LINGER_RESET if enabled else _LINGER_OFF
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._done)


# -- the upgrade ----------------------------------------------------------------------------


class TcpConnection(YamuxConnection):
    """A libp2p connection over TCP: Noise-secured, Yamux-multiplexed."""

    transport = "tcp"


async def upgrade(
    channel: ByteChannel,
    key: KeyPair,
    is_initiator: bool,
    expected_peer: PeerId | None = None,
    config: YamuxConfig | None = None,
    *,
    connection_class: type[YamuxConnection] = YamuxConnection,
    local_addr: Multiaddr | None = None,
    remote_addr: Multiaddr | None = None,
    path: str = DIRECT,
    transport: str | None = None,
) -> YamuxConnection:
    """Negotiate `/noise`, authenticate, negotiate `/yamux/1.0.0`: a `Connection` over `channel`.

    Raises `PeerIdMismatch` if the remote is not `expected_peer`, `HandshakeFailed` for any
    other failure; the channel is aborted on every failure (and on cancellation).
    """
    prelude = channel.prelude
    try:
        if is_initiator:
            await select_outbound(prelude, [NOISE_PROTOCOL_ID])
        else:
            await select_inbound(prelude, [NOISE_PROTOCOL_ID])
        handshake = NoiseHandshake(key, is_initiator, expected_peer)
        await perform_handshake(prelude, handshake)
        secure = SecureChannel(channel, handshake.transport())
        if is_initiator:
            await select_outbound(secure.prelude, [YAMUX_PROTOCOL_ID])
        else:
            await select_inbound(secure.prelude, [YAMUX_PROTOCOL_ID])
    except HandshakeFailed as exc:
        channel.abort(str(exc))
        raise
    except (TransportError, EOFError, ConnectionError) as exc:
        channel.abort(str(exc))
        raise HandshakeFailed(f"connection upgrade (/noise, /yamux/1.0.0) failed: {exc}") from exc
    except BaseException:
        channel.abort("upgrade cancelled")
        raise
    assert handshake.remote_peer is not None
    if remote_addr is not None and not remote_addr.is_relayed:
        remote_addr = remote_addr.with_peer_id(handshake.remote_peer)
    return connection_class(
        secure,
        handshake.remote_peer,
        is_initiator,
        config,
        local_addr=local_addr,
        remote_addr=remote_addr,
        path=path,
        transport=transport,
    )


async def secure_and_mux(
    raw: Stream | ByteChannel,
    key: KeyPair,
    is_initiator: bool,
    expected_peer: PeerId | None = None,
    *,
    config: YamuxConfig | None = None,
    timeout: float | None = 10.0,
    local_addr: Multiaddr | None = None,
    remote_addr: Multiaddr | None = None,
    path: str = RELAYED,
    transport: str = "relay",
) -> YamuxConnection:
    """Turn a raw byte stream (a relayed circuit) into a libp2p `Connection` (Noise + Yamux).

    The roles follow `is_initiator` (the circuit's dialer, or the DCUtR-assigned one). On
    failure the raw stream is reset. `timeout` bounds the whole upgrade (`DialTimeout`).
    """
    channel = raw if isinstance(raw, ByteChannel) else StreamChannel(raw)
    try:
        return await asyncio.wait_for(
            upgrade(
                channel,
                key,
                is_initiator,
                expected_peer,
                config,
                local_addr=local_addr,
                remote_addr=remote_addr,
                path=path,
                transport=transport,
            ),
            timeout,
        )
    except TimeoutError as exc:
        raise DialTimeout(f"Noise/Yamux upgrade did not finish within {timeout} s") from exc


# -- the transport --------------------------------------------------------------------------


class TcpTransport:
    """Listens for and dials libp2p TCP connections with one identity `key`.

    Inbound connections that complete the upgrade go to `on_connection` (set at construction
    or with `set_connection_handler`); without a handler they are closed.
    """

    def __init__(
        self,
        key: KeyPair,
        config: TcpConfig | None = None,
        on_connection: ConnectionHandler | None = None,
    ) -> None:
        self.key = key
        self.config = config or TcpConfig()
        self._on_connection = on_connection
        # Remote (host, port)s whose inbound connections we upgrade as the client: a peer we
        # hole-punch with as DCUtR's client, whose SYN reached our listener (no simultaneous
        # open) while it takes the server role as DCUtR says. Set by the hole puncher.
        self.client_role_for: set[tuple[str, int]] = set()
        # Remote (host, port) -> when a dial from one of our listen ports to it ended with its
        # SYN unanswered (timed out or given up): NATs on the way may still track that port
        # pair, half-open, with that SYN's sequence number (Linux conntrack: 120 s). Read by
        # the hole puncher, which must then send its SYN on the pair before the peer's arrives.
        self.unanswered_syns: dict[tuple[str, int], float] = {}
        self._closing_dials: dict[tuple[str, int], asyncio.Future[None]] = {}
        self._servers: list[tuple[asyncio.Server, Multiaddr]] = []
        self._handshakes: set[asyncio.Task[None]] = set()
        self._connections: set[TcpConnection] = set()
        self._closed = False

    @property
    def peer_id(self) -> PeerId:
        return self.key.peer_id

    def set_connection_handler(self, handler: ConnectionHandler | None) -> None:
        self._on_connection = handler

    @property
    def listen_addrs(self) -> list[Multiaddr]:
        return [address for _, address in self._servers]

    @property
    def connections(self) -> list[TcpConnection]:
        return list(self._connections)

    async def listen(self, address: Multiaddr | str) -> Multiaddr:
        """Listen on `/ip4|ip6/HOST/tcp/PORT` (port 0: any); returns the bound address."""
        if self._closed:
            raise TransportError("the TCP transport is closed")
        address = Multiaddr.parse(address)
        host, port, _ = tcp_socket_address(address)
        if address.value_for("ip4") is None and address.value_for("ip6") is None:
            raise InvalidMultiaddr(f"listen on an IP address, not a DNS name: {address}")
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            self._inbound_channel,
            host,
            port,
            reuse_address=True,
            reuse_port=REUSE_PORT,  # our dials share the port: NATs map where we listen
            backlog=1024,
        )
        bound = server.sockets[0].getsockname()
        listen_addr = tcp_multiaddr(bound[0], bound[1])
        self._servers.append((server, listen_addr))
        log.info("TCP listening on %s", listen_addr.with_peer_id(self.peer_id))
        return listen_addr

    def _inbound_channel(self) -> TcpChannel:
        channel = TcpChannel(self.config)
        channel.on_made = self._accept
        return channel

    def _accept(self, channel: TcpChannel) -> None:
        if self._closed or len(self._handshakes) >= self.config.max_pending_handshakes:
            log.warning(
                "dropping inbound TCP connection: %d handshakes pending", len(self._handshakes)
            )
            channel.abort("too many pending handshakes")
            return
        task = asyncio.get_running_loop().create_task(self._upgrade_inbound(channel))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _upgrade_inbound(self, channel: TcpChannel) -> None:
        local, remote = channel.socket_names
        try:
            connection = await asyncio.wait_for(
                upgrade(
                    channel,
                    self.key,
                    tuple(remote) in self.client_role_for,
                    config=self.config.yamux,
                    connection_class=TcpConnection,
                    local_addr=tcp_multiaddr(*local),
                    remote_addr=tcp_multiaddr(*remote),
                ),
                self.config.handshake_timeout,
            )
        except (TransportError, TimeoutError) as exc:
            log.info("inbound TCP connection from %s:%d refused: %s", *remote, exc or "timeout")
            channel.abort("handshake failed")
            return
        assert isinstance(connection, TcpConnection)
        self._track(connection)
        if self._on_connection is None:
            log.info("no handler for inbound connections: closing %r", connection)
            await connection.close()
            return
        try:
            self._on_connection(connection)
        except Exception:
            log.exception("inbound connection handler failed")
            await connection.close()

    def _track(self, connection: TcpConnection) -> None:
        self._connections.add(connection)
        connection.add_close_callback(lambda c: self._connections.discard(c))  # type: ignore[arg-type]

    async def dial(
        self,
        address: Multiaddr | str,
        expected_peer: PeerId | None = None,
        *,
        local_address: tuple[str, int] | None = None,
        is_initiator: bool = True,
        on_syn_sent: Callable[[], None] | None = None,
    ) -> TcpConnection:
        """Connect to `address`; the remote must prove `expected_peer` (or the `/p2p/` ID).

        `local_address` dials from that (host, port), shared with our listener (SO_REUSEPORT):
        NATs then map the port peers reach us at, and hole punching (TCP simultaneous open)
        can work. `is_initiator=False` takes the Noise/Yamux responder role, as the side that
        is not the client of a hole-punched connection must (DCUtR). `on_syn_sent` (dials from
        `local_address` only) is called once the kernel has sent our SYN, before its answer:
        a hole puncher that must have its SYN out first waits for that.
        """
        if self._closed:
            raise TransportError("the TCP transport is closed")
        if on_syn_sent is not None and local_address is None:
            raise ValueError("on_syn_sent is for dials from a local_address")
        address = Multiaddr.parse(address)
        host, port, family = tcp_socket_address(address)
        in_address = address.peer_id
        if expected_peer is not None and in_address is not None and in_address != expected_peer:
            raise ValueError(f"{address} names peer {in_address}, not the expected {expected_peer}")
        expected_peer = expected_peer or in_address
        loop = asyncio.get_running_loop()
        closing = self._closing_dials.get((host, port))
        if local_address is not None and closing is not None:
            # Our previous dial there, given up an instant ago, still holds the port pair
            # until its socket closes (asyncio closes it on a later turn of the loop).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(closing), RELEASE_WAIT)
        try:
            connect = (
                loop.create_connection(lambda: TcpChannel(self.config), host, port, family=family)
                if local_address is None
                else self._connect_from(local_address, host, port, family, on_syn_sent)
            )
            _, channel = await asyncio.wait_for(connect, self.config.dial_timeout)
        except TimeoutError as exc:
            raise DialTimeout(
                f"TCP connect to {address} timed out after {self.config.dial_timeout} s"
            ) from exc
        except OSError as exc:
            raise PeerUnreachable(f"cannot reach {address}: {exc.strerror or exc}") from exc
        local, remote = channel.socket_names
        channel.reset_on_close(True)  # a dial given up (another won, timed out) leaves no trace
        try:
            connection = await asyncio.wait_for(
                upgrade(
                    channel,
                    self.key,
                    is_initiator,
                    expected_peer,
                    self.config.yamux,
                    connection_class=TcpConnection,
                    local_addr=tcp_multiaddr(*local),
                    remote_addr=tcp_multiaddr(*remote),
                ),
                self.config.handshake_timeout,
            )
        except TimeoutError as exc:
            self._releasing(remote, channel)
            raise DialTimeout(
                f"the libp2p handshake with {address} did not finish within "
                f"{self.config.handshake_timeout} s"
            ) from exc
        except BaseException:
            self._releasing(remote, channel)
            raise
        channel.reset_on_close(False)
        assert isinstance(connection, TcpConnection)
        self._track(connection)
        return connection

    async def _connect_from(
        self,
        local_address: tuple[str, int],
        host: str,
        port: int,
        family: int,
        on_syn_sent: Callable[[], None] | None = None,
    ) -> tuple[asyncio.BaseTransport, TcpChannel]:
        loop = asyncio.get_running_loop()
        if family == socket.AF_UNSPEC:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
        if not _is_ip_literal(host):
            resolved = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
            if not resolved:
                raise OSError(errno.EHOSTUNREACH, f"{host} did not resolve")
            family, host = resolved[0][0], resolved[0][4][0]
        # IPPROTO_TCP: asyncio turns Nagle off only for sockets that say so
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if REUSE_PORT:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setblocking(False)
            sock.bind(local_address)
        except BaseException:
            sock.close()
            raise
        try:
            await _sock_connect(sock, (host, port), on_syn_sent)
        except BaseException as exc:
            sock.close()
            if _syn_unanswered(exc):
                self._remember_unanswered((host, port))
            raise
        return await loop.create_connection(lambda: TcpChannel(self.config), sock=sock)

    def _releasing(self, remote: tuple[str, int], channel: TcpChannel) -> None:
        """A failed dial's socket closes soon: a new dial to `remote` waits for that."""
        remote = (remote[0], remote[1])
        closed = asyncio.ensure_future(channel.wait_closed())
        self._closing_dials[remote] = closed
        closed.add_done_callback(
            lambda done: (
                self._closing_dials.pop(remote, None)
                if self._closing_dials.get(remote) is done
                else None
            )
        )

    def _remember_unanswered(self, remote: tuple[str, int]) -> None:
        now = time.monotonic()
        for old in [r for r, t in self.unanswered_syns.items() if now - t > HALF_OPEN_MEMORY]:
            del self.unanswered_syns[old]
        self.unanswered_syns[remote] = now

    def syn_unanswered_lately(self, remote: tuple[str, int]) -> bool:
        """Whether a SYN from our listen port to `remote` went unanswered lately (see
        `unanswered_syns`)."""
        sent = self.unanswered_syns.get(remote)
        return sent is not None and time.monotonic() - sent <= HALF_OPEN_MEMORY

    async def close(self) -> None:
        """Stop listening, abandon pending handshakes, close every connection."""
        self._closed = True
        for server, _ in self._servers:
            server.close()
        for task in list(self._handshakes):
            task.cancel()
        await asyncio.gather(*self._handshakes, return_exceptions=True)
        await asyncio.gather(
            *(connection.close() for connection in list(self._connections)),
            return_exceptions=True,
        )
        for server, _ in self._servers:
            await server.wait_closed()
        self._servers.clear()


async def _sock_connect(
    sock: socket.socket, address: tuple[str, int], on_syn_sent: Callable[[], None] | None
) -> None:
    """Connect a non-blocking socket; `on_syn_sent()` runs as soon as the SYN is sent, before
    any answer (asyncio's `sock_connect` tells nobody)."""
    error = sock.connect_ex(address)
    if error not in (0, errno.EINPROGRESS):
        raise OSError(error, os.strerror(error))
    if on_syn_sent is not None:
        on_syn_sent()
    if error == 0:
        return
    loop = asyncio.get_running_loop()
    writable: asyncio.Future[None] = loop.create_future()
    loop.add_writer(sock.fileno(), lambda: writable.done() or writable.set_result(None))
    try:
        await writable
    finally:
        loop.remove_writer(sock.fileno())
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, os.strerror(error))


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _syn_unanswered(exc: BaseException) -> bool:
    """Whether a failed connect left its SYN unanswered (a refusal is an answer; a port pair
    already taken sends nothing)."""
    if isinstance(exc, ConnectionRefusedError):
        return False
    return not (isinstance(exc, OSError) and exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL))


def is_tcp_address(address: Multiaddr) -> bool:
    """True for a direct TCP multiaddr this transport can dial."""
    try:
        tcp_socket_address(address)
    except InvalidMultiaddr:
        return False
    return True
