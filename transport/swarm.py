"""The swarm: every connection of a node, the dialer, and stream routing. Implements `Host`.

The swarm keeps every path a peer can be reached on: one connection per transport (QUIC, TCP)
among direct and hole-punched ones, relayed ones until a direct one exists. Dialing tries the
direct addresses at once; the first connection answers the caller (if a relay won, the direct
attempts go on in the background). The first bulk stream to a peer (`open_stream(...,
bulk=True)`) also dials its other transport, so both paths exist. Each direct path is measured
(`transport.paths`: round trips once a peer has two paths, throughput before the first bulk
stream): new streams take the healthy path with the lowest round trip, bulk streams the one with
the highest measured throughput. When a path dies, its streams fail with a clear error and new
ones take another path. Concurrent dials to one peer share one attempt, and NAT traversal plugs
in as extra dial strategies (relay, hole punching) tried after the direct addresses.

TCP dials leave from the port we listen on (SO_REUSEPORT), as hole punching needs and so that
NATs map the port peers reach us at; a dial that cannot (the port pair is taken, or both sides
dialed each other at the same instant) is retried once from a fresh port. Dials to a peer known
by relay addresses (behind a NAT or firewall) leave from a fresh port: only the hole puncher
uses the listen port toward such a peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import functools
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable

from transport.connection import DIRECT, HOLEPUNCHED, RELAYED, Connection
from transport.errors import (
    ConnectionClosed,
    DialError,
    HandshakeFailed,
    PeerIdMismatch,
    PeerUnreachable,
    TransportError,
)
from transport.handlers import StreamHandler, StreamHandlers
from transport.host import ConnectionListener, PeerConnected, PeerDisconnected
from transport.identity import KeyPair, PeerId
from transport.liveness import LivenessConfig, LivenessMonitor, in_use
from transport.multiaddr import Multiaddr, quic_socket_address
from transport.multistream import select_outbound
from transport.paths import (
    PROBE_PROTOCOL,
    PathConfig,
    PathStats,
    choose_path,
    probe_path,
    serve_probe,
)
from transport.quic import QuicConfig, QuicEndpoint
from transport.stream import Stream
from transport.tcp import TcpTransport, is_tcp_address, tcp_socket_address

log = logging.getLogger(__name__)

DialStrategy = Callable[[PeerId], Awaitable[Connection | None]]
_RESOLVING: contextvars.ContextVar[bool] = contextvars.ContextVar("resolving", default=False)
RELAY_DELAY = 0.5  # seconds direct dials get before relays are tried in parallel
DUPLICATE_GRACE = 2.0  # seconds a redundant connection may finish its streams before closing
MAX_ADDRS_PER_PEER = 32
# A TCP dial from our listen port failed for a reason a fresh port does not have.
PORT_CLASH = (errno.EADDRINUSE, errno.EADDRNOTAVAIL)


class Swarm:
    """Connections, dialing and stream routing for one identity."""

    def __init__(
        self,
        key: KeyPair,
        quic_config: QuicConfig | None = None,
        liveness: LivenessConfig | None = None,
        paths: PathConfig | None = None,
    ) -> None:
        self.key = key
        self.quic_config = quic_config or QuicConfig()
        self.paths = paths or PathConfig()
        self.path_stats: dict[Connection, PathStats] = {}
        self.handlers = StreamHandlers()
        self.handlers.set(PROBE_PROTOCOL, functools.partial(serve_probe, config=self.paths))
        self.endpoints: list[QuicEndpoint] = []
        self.dial_strategies: list[DialStrategy] = []
        # Where to learn a peer's addresses when we know none (the DHT's find_peer).
        self.address_resolvers: list[Callable[[PeerId], Awaitable[list[Multiaddr]]]] = []
        self.relay_delay = RELAY_DELAY
        self._peer_addrs: dict[PeerId, list[Multiaddr]] = {}
        self._connections: dict[PeerId, list[Connection]] = {}
        self._listeners: list[ConnectionListener] = []
        self._pending_dials: dict[PeerId, asyncio.Future[Connection]] = {}
        self._advertised: list[Multiaddr] = []
        self._addr_listeners: list[Callable[[], None]] = []
        self._closing = False
        self._punching: set[PeerId] = set()
        self._adopted: list[QuicEndpoint] = []
        self._connection_observers: list[Callable[[Connection], None]] = []
        self.liveness = LivenessMonitor(self._on_suspect, liveness)
        self.tcp: TcpTransport | None = None  # created when we listen on or dial a /tcp address
        self._background: set[asyncio.Task[object]] = set()  # dials finishing, path probes
        self._measuring: dict[PeerId, asyncio.Task[None]] = {}
        self._listen_port_dials: dict[PeerId, set[asyncio.Future[Connection]]] = {}
        self._prunes: dict[PeerId, asyncio.TimerHandle] = {}  # pending duplicate pruning

    # -- lifecycle ------------------------------------------------------------------------
    async def listen(self, addr: Multiaddr) -> Multiaddr:
        """Listen on `addr`: `/udp/PORT/quic-v1` (QUIC) or `/tcp/PORT` (TCP + Noise + Yamux);
        port 0 picks one. Returns the bound multiaddr."""
        if is_tcp_address(addr):
            return await self._tcp_transport().listen(addr.without_peer_id())
        if not addr.has("quic-v1"):
            raise DialError(
                f"cannot listen on {addr}: use /ip4/HOST/udp/PORT/quic-v1 or /ip4/HOST/tcp/PORT"
            )
        host, port = quic_socket_address(addr)
        endpoint = QuicEndpoint(self.key, self.quic_config, on_connection=self._add_connection)
        await endpoint.listen(host, port)
        self.endpoints.append(endpoint)
        assert endpoint.listen_multiaddr is not None
        return endpoint.listen_multiaddr

    async def close(self) -> None:
        self._closing = True
        for future in self._pending_dials.values():
            future.cancel()
        for handle in self._prunes.values():
            handle.cancel()
        self._prunes.clear()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.handlers.aclose()
        await self.liveness.aclose()
        if self.tcp is not None:
            await self.tcp.close()
        for endpoint in self.endpoints + self._adopted:
            await endpoint.close()
        self.endpoints.clear()
        self._adopted.clear()

    # -- hole punching support --------------------------------------------------------------
    def expect_holepunch(self, peer: PeerId, client: bool = True) -> None:
        """Direct connections with `peer` made from now on are hole-punched ones.

        If we are not the client of the punch, our ordinary TCP dials to `peer` from the
        listen port give way: each holds the very port pair the punch dials on, and would
        take the client's role if the punch's simultaneous open completed it. (As the client
        they are kept: they already are what the punch would dial.)"""
        self._punching.add(peer)
        if not client:
            for dial in self._listen_port_dials.pop(peer, set()):
                dial.cancel()

    def end_holepunch(self, peer: PeerId) -> None:
        self._punching.discard(peer)

    def adopt_endpoint(self, endpoint: QuicEndpoint) -> None:
        """Own an extra endpoint (a punched socket): its connections join the swarm."""
        endpoint.on_connection = self._add_connection
        self._adopted.append(endpoint)

    def main_endpoint(self, want_v6: bool = False) -> QuicEndpoint:
        return self._endpoint_for(
            Multiaddr.parse("/ip6/::1/udp/1/quic-v1" if want_v6 else "/ip4/127.0.0.1/udp/1/quic-v1")
        )

    def _tcp_transport(self) -> TcpTransport:
        if self.tcp is None:
            self.tcp = TcpTransport(self.key, on_connection=self._add_connection)
        return self.tcp

    @property
    def listen_addrs(self) -> list[Multiaddr]:
        quic = [e.listen_multiaddr for e in self.endpoints if e.listen_multiaddr is not None]
        return quic + (self.tcp.listen_addrs if self.tcp is not None else [])

    # -- Host -----------------------------------------------------------------------------
    @property
    def peer_id(self) -> PeerId:
        return self.key.peer_id

    @property
    def addrs(self) -> list[Multiaddr]:
        """Advertised addresses (set by the node; listen addresses until then), with /p2p."""
        base = self._advertised or self.listen_addrs
        return [addr.with_peer_id(self.peer_id) for addr in base]

    def set_advertised_addrs(self, addrs: list[Multiaddr]) -> None:
        advertised = [addr.without_peer_id() for addr in addrs]
        if advertised != self._advertised:
            self._advertised = advertised
            for listener in list(self._addr_listeners):
                listener()

    def add_addrs_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener` whenever our advertised addresses change (identify push uses it)."""
        self._addr_listeners.append(listener)

    def replace_peer_addrs(self, peer: PeerId, addrs: list[Multiaddr]) -> None:
        """Forget what we knew of `peer`'s addresses: it told us its current ones."""
        self._peer_addrs.pop(peer, None)
        self.add_peer_addrs(peer, addrs)

    async def open_stream(self, peer: PeerId, protocols: list[str], bulk: bool = False) -> Stream:
        """A stream to `peer` (dialing if needed). `bulk` marks a large transfer: it takes the
        path with the highest measured throughput instead of the lowest round trip."""
        # The usual stream: a healthy path exists, and connect() would pick the same one.
        connection = None if bulk else self._healthy_connection(peer)
        if connection is None:
            connection = await self.connect(peer)
            if bulk:
                await self._measured_for_bulk(peer)
            connection = self.connection_to(peer, bulk=bulk) or connection
        refused: set[Connection] = set()
        while True:
            connection.last_used = time.monotonic()  # type: ignore[attr-defined]  # liveness
            try:
                stream = await connection.open_stream()
                break
            except ConnectionClosed:
                # Closed, or closing (the remote sent GoAway: it prunes this duplicate):
                # another path, or a new dial.
                refused.add(connection)
                others = [c for c in self.connections_to(peer) if c not in refused]
                tie_break = {c: self._pair_order(c) for c in others}
                connection = choose_path(others, self.path_stats, tie_break, bulk) or (
                    await self.connect(peer)
                )
                if connection in refused:
                    raise
        await select_outbound(stream, protocols)
        return stream

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        self.handlers.set(protocol, handler)

    def remove_stream_handler(self, protocol: str) -> None:
        self.handlers.remove(protocol)

    def add_peer_addrs(self, peer: PeerId, addrs: list[Multiaddr]) -> None:
        known = self._peer_addrs.setdefault(peer, [])
        for addr in addrs:
            addr = addr.without_peer_id() if addr.peer_id == peer else addr
            if addr not in known:
                known.append(addr)
        del known[:-MAX_ADDRS_PER_PEER]

    def peer_addrs(self, peer: PeerId) -> list[Multiaddr]:
        return [addr.with_peer_id(peer) for addr in self._peer_addrs.get(peer, [])]

    def connected_peers(self) -> list[PeerId]:
        return sorted(peer for peer, conns in self._connections.items() if conns)

    def add_connection_listener(self, listener: ConnectionListener) -> None:
        self._listeners.append(listener)

    # -- connections ------------------------------------------------------------------------
    def connection_to(self, peer: PeerId, bulk: bool = False) -> Connection | None:
        """The connection new streams to `peer` use, if any: answering before suspect, direct
        before relayed, then the lowest measured RTT (the highest throughput if `bulk`)."""
        live = self.connections_to(peer)
        if len(live) < 2:  # nothing to choose (the usual case)
            return live[0] if live else None
        tie_break = {c: self._pair_order(c) for c in live}
        return choose_path(live, self.path_stats, tie_break, bulk)

    def _healthy_connection(self, peer: PeerId) -> Connection | None:
        best = self.connection_to(peer)
        return None if best is None or getattr(best, "suspect", False) else best

    def add_connection_observer(self, observer: Callable[[Connection], None]) -> None:
        """Call `observer` with every connection the swarm adopts (not only a peer's first)."""
        self._connection_observers.append(observer)

    def remove_connection_observer(self, observer: Callable[[Connection], None]) -> None:
        with contextlib.suppress(ValueError):
            self._connection_observers.remove(observer)

    def _on_suspect(self, connection: Connection) -> None:
        """A path stopped answering: find another one in the background."""
        peer = connection.remote_peer

        async def redial() -> None:
            try:
                await self.connect(peer)
            except (DialError, TimeoutError) as exc:
                log.info("no other path to %s yet: %s", peer, exc)

        if not self._closing:
            asyncio.get_running_loop().create_task(redial())

    def connections_to(self, peer: PeerId) -> list[Connection]:
        return [c for c in self._connections.get(peer, []) if not c.is_closed]

    def _pair_order(self, connection: Connection) -> int:
        """0 for the connection dialed by the smaller peer ID: both ends of a duplicate pair
        (two connections of one transport) agree which one stays."""
        dialed_by_smaller = (connection.is_initiator) == (self.peer_id < connection.remote_peer)
        return 0 if dialed_by_smaller else 1

    def _preference(self, connection: Connection) -> tuple[int, int, int]:
        """Which of two connections of one transport stays (lower is better)."""
        suspect = 1 if getattr(connection, "suspect", False) else 0
        relayed = 1 if connection.path == RELAYED or connection.is_closed else 0
        return (suspect, relayed, self._pair_order(connection))

    async def connect(self, target: PeerId | Multiaddr) -> Connection:
        """A connection to `target`: an existing one, or a new dial (shared by concurrent calls)."""
        if isinstance(target, Multiaddr):
            peer = target.peer_id
            if peer is None:
                return await self.dial_addr(target)
            self.add_peer_addrs(peer, [target])
        else:
            peer = target
        if peer == self.peer_id:
            raise DialError("refusing to dial ourselves")
        existing = self._healthy_connection(peer)
        if existing is not None:
            return existing
        pending = self._pending_dials.get(peer)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            pending.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._pending_dials[peer] = pending
            asyncio.get_running_loop().create_task(self._dial_peer_into(peer, pending))
        return await asyncio.shield(pending)

    async def _dial_peer_into(self, peer: PeerId, result: asyncio.Future[Connection]) -> None:
        try:
            connection = await self._dial_peer(peer)
        except BaseException as exc:  # handed to every waiter
            if not result.done():
                result.set_exception(exc if isinstance(exc, Exception) else DialError(repr(exc)))
        else:
            if not result.done():
                result.set_result(connection)
        finally:
            self._pending_dials.pop(peer, None)

    async def _dial_peer(self, peer: PeerId) -> Connection:
        """Dial with what we know; if we know nothing or it all fails, ask the resolvers (the
        DHT) for addresses and try once more."""
        if not self._peer_addrs.get(peer) and await self._resolve(peer):
            return await self._dial_known(peer)
        try:
            return await self._dial_known(peer)
        except PeerUnreachable:
            if not await self._resolve(peer):
                raise
            return await self._dial_known(peer)

    async def _resolve(self, peer: PeerId) -> bool:
        """Ask the resolvers; whether they taught us any new address.

        Dials made *by* a resolver (the DHT's own requests) never resolve again: no recursion.
        """
        if _RESOLVING.get():
            return False
        before = set(self._peer_addrs.get(peer, []))
        token = _RESOLVING.set(True)
        try:
            for resolve in self.address_resolvers:
                try:
                    self.add_peer_addrs(peer, await resolve(peer))
                except (TransportError, TimeoutError) as exc:
                    log.debug("resolving %s failed: %s", peer, exc)
        finally:
            _RESOLVING.reset(token)
        return bool(set(self._peer_addrs.get(peer, [])) - before)

    async def _dial_known(self, peer: PeerId) -> Connection:
        """Direct addresses at once; relays (and other strategies) from `relay_delay` on, or as
        soon as every direct attempt failed ("happy eyeballs"): the first connection wins.

        If a relay won, the direct attempts go on in the background: what they reach becomes
        a direct path. (A second direct path, on the other transport, is dialed when a bulk
        stream asks for the fastest path: every connection costs handshakes and keep-alives,
        and most peers only see small calls.)"""
        errors: list[str] = []
        mismatch: PeerIdMismatch | None = None  # the most telling failure: someone else is there
        direct = [
            a
            for a in self._peer_addrs.get(peer, [])
            if (a.has("quic-v1") or is_tcp_address(a)) and not a.is_relayed
        ]
        attempts: dict[asyncio.Future[Connection | None], str] = {}
        transports: dict[asyncio.Future[Connection | None], str] = {}
        for addr in direct:
            future = asyncio.ensure_future(self.dial_addr(addr, peer))
            attempts[future] = str(addr)
            transports[future] = "tcp" if is_tcp_address(addr) else "quic"
        strategies_started = False

        def start_strategies() -> None:
            nonlocal strategies_started
            strategies_started = True
            for strategy in self.dial_strategies:
                name = getattr(strategy, "__name__", repr(strategy))
                attempts[asyncio.ensure_future(strategy(peer))] = name

        if not attempts:
            start_strategies()
        try:
            while attempts:
                timeout = None if strategies_started else self.relay_delay
                done, _ = await asyncio.wait(
                    attempts, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    start_strategies()
                    continue
                for future in done:
                    label = attempts.pop(future)
                    try:
                        connection = future.result()
                    except (DialError, OSError) as exc:
                        if isinstance(exc, PeerIdMismatch):
                            mismatch = mismatch or exc
                        errors.append(f"{label}: {exc}")
                        log.debug("dial %s via %s failed: %s", peer.short(), label, exc)
                        continue
                    if connection is not None:
                        if connection.path == RELAYED:  # a direct path may still come
                            for other in list(attempts):
                                if other in transports:
                                    self._finish_in_background(other, peer, attempts.pop(other))
                        return connection
                if not attempts and not strategies_started:
                    start_strategies()
        finally:
            for future in attempts:
                future.cancel()
        if mismatch is not None and len(errors) == 1:
            raise mismatch
        if not errors:
            raise PeerUnreachable(
                f"no known address for {peer}; give a full multiaddr (/ip4/.../udp/PORT/"
                "quic-v1/p2p/ID) or a bootstrap node that knows it"
            )
        raise PeerUnreachable(f"could not reach {peer}: " + "; ".join(errors))

    def _finish_in_background(
        self, attempt: asyncio.Future[Connection | None], peer: PeerId, label: str
    ) -> None:
        """Let a dial go on after another one won: its connection joins as one more path."""

        async def finish() -> None:
            try:
                await attempt
            except (TransportError, OSError, TimeoutError) as exc:
                log.debug("second path to %s via %s failed: %s", peer.short(), label, exc)
            except asyncio.CancelledError:
                attempt.cancel()
                raise

        self._spawn(finish())

    def _spawn(self, coroutine: Awaitable[object]) -> asyncio.Task[object]:
        task = asyncio.get_running_loop().create_task(coroutine)  # type: ignore[arg-type]
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def tcp_dial_source(self, host: str) -> tuple[str, int] | None:
        """The (address, port) of our TCP listener to dial `host` from, if one suits."""
        if self.tcp is None:
            return None
        try:
            remote = ipaddress.ip_address(host)
        except ValueError:
            return None  # a DNS name: let the system pick
        for listen_addr in self.tcp.listen_addrs:
            local_host, port, _ = tcp_socket_address(listen_addr)
            local = ipaddress.ip_address(local_host)
            if local.version != remote.version:
                continue
            if not local.is_unspecified and local.is_loopback != remote.is_loopback:
                continue  # a loopback source cannot reach the network, nor the reverse
            return local_host, port
        return None

    async def _dial_tcp(self, addr: Multiaddr, peer: PeerId | None) -> Connection:
        """From our listen port; once more from a fresh port if the port pair is taken, or if
        the peer dialed us at the same instant (a TCP simultaneous open with both sides acting
        as the client fails the handshake)."""
        transport = self._tcp_transport()
        target = addr.without_peer_id()
        source = self.tcp_dial_source(tcp_socket_address(target)[0])
        if peer is not None and (
            peer in self._punching or any(a.is_relayed for a in self._peer_addrs.get(peer, []))
        ):
            # The hole puncher dials from the listen port. And a peer reached through relays
            # is behind a NAT or firewall: our SYN from the listen port would likely die
            # there, yet leave its NAT (or ours) tracking that port pair with this socket's
            # sequence numbers for minutes, and a later punch on the pair would fail.
            source = None
        if source is not None:
            attempt = asyncio.ensure_future(transport.dial(target, peer, local_address=source))
            dials = self._listen_port_dials.setdefault(peer, set())  # type: ignore[arg-type]
            dials.add(attempt)
            try:
                return await attempt
            except asyncio.CancelledError:
                if attempt.done() and not attempt.cancelled() and attempt.exception() is None:
                    # It connected in the very turn we were called off (another dial won):
                    # a path. Dropped unseen, it would hold the port pair (the next dial from
                    # the listen port would leave from a fresh port, showing no mapping).
                    self._add_connection(attempt.result())
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                raise PeerUnreachable(f"TCP dial to {addr} gave way to hole punching") from None
            except HandshakeFailed as exc:
                if isinstance(exc, PeerIdMismatch):
                    raise
                log.debug(
                    "TCP dial to %s from port %d: %s; again from a fresh port", addr, source[1], exc
                )
            except PeerUnreachable as exc:
                cause = exc.__cause__
                if not (isinstance(cause, OSError) and cause.errno in PORT_CLASH):
                    raise
                log.debug(
                    "TCP dial to %s from port %d: %s; from a fresh port", addr, source[1], exc
                )
            finally:
                attempt.cancel()
                dials.discard(attempt)
                if not dials and self._listen_port_dials.get(peer) is dials:  # type: ignore[arg-type]
                    del self._listen_port_dials[peer]  # type: ignore[arg-type]
        return await transport.dial(target, peer)

    async def dial_addr(self, addr: Multiaddr, peer: PeerId | None = None) -> Connection:
        """Dial one direct multiaddr, QUIC or TCP (the peer ID in it, or `peer`, is checked
        by the handshake)."""
        peer = peer or addr.peer_id
        if is_tcp_address(addr):
            try:
                connection = await self._dial_tcp(addr, peer)
            except (TransportError, OSError) as exc:
                if isinstance(exc, DialError):
                    raise
                raise PeerUnreachable(f"TCP dial to {addr} failed: {exc}") from exc
            self._add_connection(connection)  # (QUIC endpoints report dialed ones themselves)
            return connection
        if not addr.has("quic-v1"):
            raise DialError(f"cannot dial {addr}: no transport for it (QUIC-v1 or TCP)")
        endpoint = self._endpoint_for(addr)
        connection = await endpoint.dial(quic_socket_address(addr), peer)
        return connection

    def _endpoint_for(self, addr: Multiaddr) -> QuicEndpoint:
        want_v6 = addr.has("ip6")
        for endpoint in self.endpoints:
            local = endpoint.local_address
            if local is not None and (":" in local[0]) == want_v6:
                return endpoint
        if not self.endpoints:
            raise DialError("the node listens on no QUIC address, so it cannot dial")
        raise DialError(f"no {'IPv6' if want_v6 else 'IPv4'} endpoint to dial {addr} from")

    def add_connection(self, connection: Connection) -> None:
        """Adopt a connection made elsewhere (relayed circuits, TCP)."""
        self._add_connection(connection)

    def _add_connection(self, connection: Connection) -> None:
        if self._closing:
            asyncio.get_running_loop().create_task(connection.close("node stopping"))
            return
        peer = connection.remote_peer
        if connection.path == DIRECT and peer in self._punching:
            connection.path = HOLEPUNCHED

        def accept(stream: Stream, connection: Connection = connection) -> None:
            connection.last_used = time.monotonic()  # type: ignore[attr-defined]
            self.handlers.accept(stream)

        connection.set_inbound_stream_callback(accept)
        connection.add_close_callback(self._connection_closed)
        first = not self.connections_to(peer)
        self._connections.setdefault(peer, []).append(connection)
        if connection.path == DIRECT and connection.remote_addr is not None:
            if connection.is_initiator:
                self.add_peer_addrs(peer, [connection.remote_addr])
        log.debug("connected %r", connection)
        self.liveness.watch(connection)
        if first:
            self._emit(PeerConnected(peer, connection.path))
        for observer in list(self._connection_observers):
            observer(connection)
        self._schedule_prune(peer)
        if len(self._direct_paths(peer)) > 1 and self.paths.measure and not self._closing:
            self._schedule_measure(peer)  # round trips only: cheap (throughput when bulk asks)

    # -- measuring paths --------------------------------------------------------------------
    def _direct_paths(self, peer: PeerId) -> list[Connection]:
        return [c for c in self.connections_to(peer) if c.path != RELAYED]

    def _schedule_measure(self, peer: PeerId, throughput: bool = False) -> asyncio.Task[object]:
        """Measure `peer`'s direct paths in the background, one measurement at a time (a
        throughput measurement waits for a running RTT-only one, then runs)."""
        running = self._measuring.get(peer)
        if running is not None and not running.done() and not throughput:
            return running

        async def measure(previous: asyncio.Task[object] | None) -> None:
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)
            await self.measure_paths(peer, throughput)

        task = self._spawn(measure(running if running is not None and not running.done() else None))
        self._measuring[peer] = task  # type: ignore[assignment]
        task.add_done_callback(
            lambda done: (
                self._measuring.pop(peer, None) if self._measuring.get(peer) is done else None
            )
        )
        return task

    async def _measured_for_bulk(self, peer: PeerId) -> None:
        """Before a bulk stream: measure the throughput of `peer`'s direct paths if any lacks a
        recent measurement (bounded by the probe timeout; streams go on regardless)."""
        if not self.paths.measure or self.paths.probe_bytes == 0 or self._closing:
            return
        await self._dial_other_transports(peer)
        paths = [c for c in self._direct_paths(peer) if not getattr(c, "suspect", False)]
        if len(paths) < 2:
            return
        now = time.monotonic()
        stale = [
            c
            for c in paths
            if (stats := self.path_stats.get(c)) is None
            or stats.throughput is None
            or now - stats.measured_at > self.paths.remeasure_after
        ]
        if not stale:
            return
        task = self._schedule_measure(peer, throughput=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), self.paths.probe_timeout * len(paths))

    async def _dial_other_transports(self, peer: PeerId) -> None:
        """Direct connections on the transports we have none on yet, from the peer's known
        direct addresses (at once, bounded by the probe timeout; failures only logged)."""
        have = {c.transport for c in self._direct_paths(peer)}
        if not have:
            return  # relayed only: the hole puncher looks for direct paths
        other = [
            a
            for a in self._peer_addrs.get(peer, [])
            if not a.is_relayed
            and (a.has("quic-v1") or is_tcp_address(a))
            and ("tcp" if is_tcp_address(a) else "quic") not in have
        ]
        if not other:
            return
        dials = [asyncio.ensure_future(self.dial_addr(a, peer)) for a in other]
        done, pending = await asyncio.wait(
            dials, timeout=self.paths.probe_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        for dial in pending:
            dial.cancel()
        for dial in done:
            if not dial.cancelled() and dial.exception() is not None:
                log.debug("second path to %s: %s", peer.short(), dial.exception())

    async def measure_paths(
        self, peer: PeerId, throughput: bool = True
    ) -> dict[Connection, PathStats]:
        """Probe each direct connection to `peer`, one after another (so the probes do not
        compete): the round trip, and with `throughput` a round of `probe_bytes`. What was
        measured is also kept in `path_stats` for choosing paths."""
        measured: dict[Connection, PathStats] = {}
        if not self.paths.measure:
            return measured
        probe_bytes = self.paths.probe_bytes if throughput else 0
        for connection in self._direct_paths(peer):
            try:
                async with asyncio.timeout(self.paths.probe_timeout):
                    stream = await connection.open_stream()
                    try:
                        await select_outbound(stream, [PROBE_PROTOCOL])
                        stats = await probe_path(stream, self.paths.rtt_rounds, probe_bytes)
                    except BaseException:
                        stream.reset("path probe abandoned")
                        raise
            except (TransportError, TimeoutError, EOFError, ConnectionError) as exc:
                log.debug("probing %r failed: %r", connection, exc)
                continue
            if connection.is_closed:
                continue
            previous = self.path_stats.get(connection)
            if stats.throughput is None and previous is not None:
                stats.throughput = previous.throughput  # an RTT-only probe keeps the last rate
            self.path_stats[connection] = measured[connection] = stats
            log.info(
                "path %r: rtt %.2f ms, %s",
                connection,
                (stats.rtt or 0.0) * 1000,
                f"{stats.throughput / 1e6:.1f} MB/s" if stats.throughput else "rate not measured",
            )
        return measured

    def _schedule_prune(self, peer: PeerId) -> None:
        """One pending prune per peer: a prune that finds streams still running tries again
        once later (never once per connection: that doubled the timers every grace period)."""
        if peer in self._prunes or len(self.connections_to(peer)) < 2 or self._closing:
            return
        self._prunes[peer] = asyncio.get_running_loop().call_later(
            DUPLICATE_GRACE, self._prune, peer
        )

    def _prune(self, peer: PeerId) -> None:
        """Close redundant connections once their streams are done.

        One direct connection per transport stays (QUIC and TCP are different paths); of two
        of one transport, the side that dialed the loser closes it. A relayed connection goes
        once a healthy direct one exists (either side may close it).
        """
        self._prunes.pop(peer, None)
        live = self.connections_to(peer)
        direct = [c for c in live if c.path != RELAYED]
        keep = {
            min((c for c in direct if c.transport == transport), key=self._preference)
            for transport in {c.transport for c in direct}
        }
        healthy_direct = any(not getattr(c, "suspect", False) for c in direct)
        waiting = False
        for connection in live:
            if connection in keep:
                continue
            if connection.path == RELAYED:
                if not healthy_direct:
                    continue  # relays are the fallback: keep them all
            elif not connection.is_initiator:
                continue
            if not in_use(connection):
                asyncio.get_running_loop().create_task(connection.close("duplicate connection"))
            else:
                waiting = True
        if waiting:
            self._schedule_prune(peer)

    def _connection_closed(self, connection: Connection) -> None:
        self.path_stats.pop(connection, None)
        peer = connection.remote_peer
        remaining = [c for c in self._connections.get(peer, []) if c is not connection]
        remaining = [c for c in remaining if not c.is_closed]
        if remaining:
            self._connections[peer] = remaining
        else:
            self._connections.pop(peer, None)
            if peer is not None:
                self._emit(PeerDisconnected(peer))

    def _emit(self, event: PeerConnected | PeerDisconnected) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("connection listener failed on %s", event)
