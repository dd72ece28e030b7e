"""Hole punching over a relayed connection: libp2p DCUtR, and our extension for symmetric NATs.

DCUtR (`/libp2p/dcutr`): the side that accepted the relayed connection (B) sends CONNECT with
its observed addresses and times the answer; A answers with its own; B sends SYNC and waits half
the RTT; then A dials B's addresses (QUIC client) while B sprays random UDP at A's addresses,
so both NATs hold a mapping for the other at the same moment. Both transports are punched at
once: over TCP both sides dial each other's TCP addresses from their listen port (a TCP
simultaneous open: each SYN opens its own NAT for the other's), and on the connection that
results A is the client of Noise and Yamux (DCUtR spec); a SYN that lands on a listener instead
gives an ordinary connection with the dialer as client, which agrees. Each transport that gets
through becomes a path of its own.

That works when both NATs map endpoint-independently. When one side's NAT is symmetric
(endpoint-dependent mapping: a fresh random port per destination), the addresses it was observed
at are useless to the other side, so our extension (`/lattica-ray/holepunch/1`, the same
messages plus each side's mapping behaviour) swaps the roles: the symmetric side S dials, and
the other side E opens its filter for S:
- E sends to S's IP (enough for address-restricted filtering), and
- a birthday search for port-restricted filtering: S opens many sockets, each sending one probe
  to E (one fresh NAT mapping each), while E sprays packets at many random ports of S's IP;
  a socket that receives E's packet holds a mapping E's NAT now lets in, and S dials from it.
With 192 sockets and 4,096 sprayed ports over a 64K port range, ~12 hits are expected per
attempt (a miss is ~e^-12); each attempt uses fresh sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from transport.connection import HOLEPUNCHED, RELAYED, Connection
from transport.errors import (
    InvalidMultiaddr,
    PeerIdMismatch,
    PeerUnreachable,
    ProtocolViolation,
    StreamReset,
    TransportError,
)
from transport.identity import PeerId
from transport.multiaddr import Multiaddr, quic_socket_address
from transport.nat.pb import holepunch_pb2
from transport.nat.punch_tracker import DCUTR_ATTEMPTS, PunchState, PunchTracker
from transport.nat.reachability import Mapping
from transport.quic import QuicEndpoint
from transport.stream import Stream
from transport.swarm import Swarm
from transport.tcp import is_tcp_address, tcp_socket_address

log = logging.getLogger(__name__)

DCUTR_PROTOCOL = "/libp2p/dcutr"  # DCUtR spec
EXTENDED_PROTOCOL = "/lattica-ray/holepunch/1"
MAX_MESSAGE_SIZE = 4096  # DCUtR spec
ATTEMPTS = DCUTR_ATTEMPTS  # DCUtR spec: the inbound peer tries three times
PUNCH_TIMEOUT = 5.0  # seconds one attempt may take
SPRAY_INTERVAL = (0.010, 0.200)  # DCUtR spec: random UDP every 10-200 ms
BIRTHDAY_SOCKETS = 192
BIRTHDAY_SPRAY = 4096
PORT_RANGE = (1024, 65535)
TCP_REDIAL = 0.1  # seconds between TCP punch dials that failed at once (refused, port taken)
FIRST_SYN_WAIT = 2.0  # seconds a side that dials first waits for its SYN to leave (> RELEASE_WAIT)

HolePunch = holepunch_pb2.HolePunch


def _retrieve(task: asyncio.Task) -> None:
    """Mark a background dial's failure as seen (it is logged where it is awaited)."""
    if not task.cancelled():
        task.exception()


class PunchImpossible(TransportError):
    """No hole punch can work between these two NATs (both map endpoint-dependently)."""


class PunchRefused(TransportError):
    """The peer reset our punch request unanswered: its own punch with us goes ahead."""


@dataclass
class _PunchDial:
    """One TCP punch dial from our listen port (it outlives the punch that started it)."""

    task: asyncio.Task[Connection]
    first_syn: asyncio.Future[None]  # done once our first SYN is out, or the first try failed


def _punch_addrs(raw: list[bytes]) -> list[Multiaddr]:
    """The direct QUIC and TCP addresses among those a peer sent (at most 16 looked at)."""
    addrs = []
    for item in raw[:16]:
        try:
            addr = Multiaddr.from_bytes(item)
            if not is_tcp_address(addr):
                quic_socket_address(addr)
        except InvalidMultiaddr:
            continue
        addrs.append(addr)
    return addrs


def _quic(addrs: list[Multiaddr]) -> list[Multiaddr]:
    return [a for a in addrs if a.has("quic-v1")]


def _tcp(addrs: list[Multiaddr]) -> list[Multiaddr]:
    return [a for a in addrs if is_tcp_address(a)]


def _on_shared_transports(theirs: list[Multiaddr], ours: list[Multiaddr]) -> list[Multiaddr]:
    """Their addresses on transports we offered too: the other side punches only those."""
    return (_quic(theirs) if _quic(ours) else []) + (_tcp(theirs) if _tcp(ours) else [])


def choose_dialer(our_mapping: str, their_mapping: str, we_are_a: bool) -> bool | None:
    """Whether we dial (QUIC client); None when neither can (both symmetric).

    DCUtR: A (the side that dialed the relayed connection) dials. Our extension: the side
    behind an endpoint-dependent (symmetric) NAT dials, since only it can make a mapping
    toward the other's stable address.
    """
    ours_symmetric = our_mapping == Mapping.ENDPOINT_DEPENDENT
    theirs_symmetric = their_mapping == Mapping.ENDPOINT_DEPENDENT
    if ours_symmetric and theirs_symmetric:
        return None
    if ours_symmetric != theirs_symmetric:
        return ours_symmetric
    return we_are_a


class HolePuncher:
    """Upgrades relayed connections to direct ones. Both protocols, both roles."""

    def __init__(
        self,
        swarm: Swarm,
        observed_addrs: Callable[[], list[Multiaddr]],
        mapping: Callable[[], Mapping],
        supports_extension: Callable[[PeerId], bool],
    ) -> None:
        self.swarm = swarm
        self._observed_addrs = observed_addrs
        self._mapping = mapping
        self._supports_extension = supports_extension
        self._running: dict[PeerId, asyncio.Task[Connection | None]] = {}
        self._serving: dict[PeerId, asyncio.Future[None]] = {}  # punches we answer (as A)
        self._tcp_dials: dict[tuple[PeerId, str], _PunchDial] = {}
        self.results: dict[PeerId, str] = {}  # peer -> "holepunched" / "failed: ..."
        # peer -> punches run with it, in either role: more than one means an earlier one missed
        self.punches: dict[PeerId, int] = {}
        self.tracker = PunchTracker()
        self._change_waiters: dict[PeerId, list[asyncio.Future[None]]] = {}

    def start(self) -> None:
        self.swarm.set_stream_handler(DCUTR_PROTOCOL, self._serve)
        self.swarm.set_stream_handler(EXTENDED_PROTOCOL, self._serve)

    async def stop(self) -> None:
        for dial in list(self._tcp_dials.values()):
            dial.task.cancel()
        for task in self._running.values():
            task.cancel()
        for task in list(self._running.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._running.clear()

    # -- what is under way with a peer (both roles) -------------------------------------------
    def punch_state(self, peer: PeerId) -> PunchState:
        return self.tracker.state(peer, asyncio.get_running_loop().time())

    def expect_request(self, peer: PeerId) -> None:
        """A relayed connection with `peer` came up: a punch (of theirs or ours) should follow."""
        self.tracker.expect_request(peer, asyncio.get_running_loop().time())
        self._changed(peer)

    def next_change(self, peer: PeerId) -> asyncio.Future[None]:
        """Done at the next change of `peer`'s punch state (an attempt started or ended)."""
        waiter = asyncio.get_running_loop().create_future()
        waiters = self._change_waiters.setdefault(peer, [])
        waiters[:] = [w for w in waiters if not w.done()]  # (those given up on)
        waiters.append(waiter)
        return waiter

    def _changed(self, peer: PeerId) -> None:
        for waiter in self._change_waiters.pop(peer, []):
            if not waiter.done():
                waiter.set_result(None)

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _our_addrs(self) -> list[Multiaddr]:
        """Where peers saw us, QUIC and TCP; our listen addresses if nobody told us (a LAN).

        A transport nobody saw us on is left out once others were seen: a network that drops
        UDP shows up as TCP-only observations, and nobody wastes a punch on its QUIC port.
        """
        observed = [a for a in self._observed_addrs() if a.has("quic-v1") or is_tcp_address(a)]
        if observed:
            return observed
        return [a for a in self.swarm.listen_addrs if a.has("quic-v1") or is_tcp_address(a)]

    # -- B: the side that accepted the relayed connection starts -----------------------------
    def upgrade_soon(self, peer: PeerId) -> asyncio.Task[Connection | None]:
        """Start (or join) the upgrade of our relayed connection to `peer`."""
        task = self._running.get(peer)
        if task is None or task.done():
            self.tracker.upgrade_started(peer, self._now())  # (under way from now on)
            task = asyncio.get_running_loop().create_task(self.upgrade(peer))
            self._running[peer] = task
            self._changed(peer)
        return task

    def may_ask(self, peer: PeerId) -> bool:
        """Whether we may start a punch with `peer`: DCUtR lets the side that accepted the
        relayed connection (B) ask; a peer speaking our extension answers either side."""
        relayed = [c for c in self.swarm.connections_to(peer) if c.path == RELAYED]
        return any(not c.is_initiator for c in relayed) or (
            bool(relayed) and self._supports_extension(peer)
        )

    async def upgrade(self, peer: PeerId) -> Connection | None:
        """Up to three DCUtR attempts; the direct connection, or None (the relay stays)."""
        self.tracker.upgrade_started(peer, self._now())
        self._changed(peer)
        outcome = "failed: cancelled"
        try:
            connection, outcome = await self._attempts_as_b(peer)
            return connection
        finally:
            self.results[peer] = outcome
            self.tracker.upgrade_ended(peer, outcome, self._now())
            self._changed(peer)

    async def _attempts_as_b(self, peer: PeerId) -> tuple[Connection | None, str]:
        last_error = "no attempt"
        for attempt in range(1, ATTEMPTS + 1):
            serving = self._serving.get(peer)
            if serving is not None:  # the peer's own punch request went ahead: see how it ends
                await asyncio.shield(serving)
            existing = self.swarm.connection_to(peer)
            if existing is None:  # (a retry would dial the peer again just to punch)
                return None, f"failed: the connection to upgrade is gone ({last_error})"
            healthy = not getattr(existing, "suspect", False)
            if healthy and existing.path != RELAYED:
                return existing, existing.path
            self.tracker.attempt_started(peer, self._now())
            self._changed(peer)
            try:
                connection = await self._attempt_as_b(peer)
            except PunchImpossible as exc:
                last_error = str(exc)
                log.info("no hole punch to %s: %s", peer, exc)
                break
            except PunchRefused as exc:
                last_error = str(exc)
                log.info("hole punch to %s, attempt %d: %s", peer, attempt, exc)
                await self._their_punch(peer)
                continue
            except (TransportError, TimeoutError, EOFError, OSError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
                log.info("hole punch to %s, attempt %d: %s", peer, attempt, last_error)
                continue
            if connection is not None:
                log.info("hole punched to %s on attempt %d", peer, attempt)
                return connection, HOLEPUNCHED
            last_error = "no direct path found"
        return None, f"failed: {last_error}"

    async def _their_punch(self, peer: PeerId) -> None:
        """After the peer refused our request for its own: wait for that punch (which we
        answer) to arrive and end, or `RETRY_GRACE` for it to arrive. Retrying at once only
        met more refusals: all three attempts went within milliseconds."""
        try:
            async with asyncio.timeout(self.tracker.retry_grace):
                while peer not in self._serving:
                    await self.next_change(peer)
        except TimeoutError:
            return
        await asyncio.shield(self._serving[peer])

    async def _attempt_as_b(self, peer: PeerId) -> Connection | None:
        protocol = EXTENDED_PROTOCOL if self._supports_extension(peer) else DCUTR_PROTOCOL
        stream = await self.swarm.open_stream(peer, [protocol])
        try:
            connect = HolePunch(type=HolePunch.CONNECT)
            ours = self._our_addrs()
            connect.ObsAddrs.extend(a.without_peer_id().to_bytes() for a in ours)
            if protocol == EXTENDED_PROTOCOL:
                connect.mapping = str(self._mapping())
            started = time.perf_counter()
            try:
                await stream.write_message(connect.SerializeToString())
                answer = await stream.read_message(MAX_MESSAGE_SIZE)
            except StreamReset as exc:
                raise PunchRefused(f"the peer refused our request ({exc})") from exc
            reply = self._parse(answer, HolePunch.CONNECT)
            rtt = time.perf_counter() - started
            offered = _punch_addrs(list(reply.ObsAddrs))
            if not offered:
                raise ProtocolViolation("the peer sent no address to punch to")
            their_addrs = _on_shared_transports(offered, ours)
            if not their_addrs:
                raise PunchImpossible("the peer offered no address on a transport we offered")
            we_dial = choose_dialer(
                str(self._mapping()), reply.mapping if protocol == EXTENDED_PROTOCOL else "", False
            )
            if we_dial is None:
                log.info("both %s and we are behind symmetric NATs: staying relayed", peer)
                raise PunchImpossible("both peers are behind symmetric NATs")
            prepared = await self._prepare(we_dial, their_addrs, protocol)
            await self._dial_first_if_stale(peer, their_addrs, client=we_dial)
            await stream.write_message(HolePunch(type=HolePunch.SYNC).SerializeToString())
            await asyncio.sleep(rtt / 2)
            spray = protocol == EXTENDED_PROTOCOL and reply.mapping == Mapping.ENDPOINT_DEPENDENT
            return await self._punch(peer, we_dial, their_addrs, spray, prepared)
        finally:
            await stream.close()

    # -- A: answers B ---------------------------------------------------------------------
    async def _serve(self, stream: Stream) -> None:
        """One punch per peer at a time: with relayed connections both ways, both sides are
        B for one of them and ask at once; the request of the smaller peer ID goes ahead (two
        sessions in swapped roles would dial the same TCP port pair as client and server), and
        the refused side waits for it (`_their_punch`)."""
        peer = stream.remote_peer
        assert peer is not None
        if stream.remote_peer is not None and not self._arrived_relayed(stream):
            stream.reset("hole punching is for relayed connections")
            return
        ours_running = self._running.get(peer)
        if peer in self._serving or (
            ours_running is not None and not ours_running.done() and self.swarm.peer_id < peer
        ):
            stream.reset("a hole punch with this peer is under way")
            return
        serving = asyncio.get_running_loop().create_future()
        self._serving[peer] = serving
        self.tracker.serving_started(peer, self._now())
        self._changed(peer)
        outcome, final = "failed: cancelled", False
        try:
            outcome, final = await self._serve_as_a(stream, peer)
        except (TransportError, TimeoutError, EOFError, OSError) as exc:
            outcome = f"failed: answering the peer's punch: {type(exc).__name__}: {exc}"
            raise
        finally:
            serving.set_result(None)
            del self._serving[peer]
            self.results[peer] = outcome
            self.tracker.serving_ended(peer, outcome, self._now(), final)
            self._changed(peer)

    async def _serve_as_a(self, stream: Stream, peer: PeerId) -> tuple[str, bool]:
        """Answer one attempt of the peer; its outcome, and whether the peer is done."""
        extended = stream.protocol == EXTENDED_PROTOCOL
        request = self._parse(await stream.read_message(MAX_MESSAGE_SIZE), HolePunch.CONNECT)
        ours = self._our_addrs()
        their_addrs = _on_shared_transports(_punch_addrs(list(request.ObsAddrs)), ours)
        we_dial = choose_dialer(str(self._mapping()), request.mapping if extended else "", True)
        if we_dial is not None:
            await self._dial_first_if_stale(peer, their_addrs, client=we_dial)
        reply = HolePunch(type=HolePunch.CONNECT)
        reply.ObsAddrs.extend(a.without_peer_id().to_bytes() for a in ours)
        if extended:
            reply.mapping = str(self._mapping())
        await stream.write_message(reply.SerializeToString())
        if we_dial is None:
            await stream.close()
            return "failed: both peers are behind symmetric NATs", True
        prepared = (
            await self._prepare(we_dial, their_addrs, stream.protocol)
            if we_dial is not None
            else None
        )
        self._parse(await stream.read_message(MAX_MESSAGE_SIZE), HolePunch.SYNC)
        await stream.close()
        if not their_addrs:
            return "failed: no address to punch to", False
        spray = extended and request.mapping == Mapping.ENDPOINT_DEPENDENT
        direct = await self._punch(peer, we_dial, their_addrs, spray, prepared)
        if direct is None:
            return "failed: no direct path found", False
        return HOLEPUNCHED, True

    def _arrived_relayed(self, stream: Stream) -> bool:
        """The punch request came over one of our relayed connections to that peer."""
        return any(c.path == RELAYED for c in self.swarm.connections_to(stream.remote_peer))

    @staticmethod
    def _parse(data: bytes, expected: int) -> HolePunch:
        message = HolePunch()
        try:
            message.ParseFromString(data)
        except DecodeError as exc:
            raise ProtocolViolation(f"hole punch: malformed message: {exc}") from exc
        if message.type != expected:
            raise ProtocolViolation(f"hole punch: expected {HolePunch.Type.Name(expected)}")
        return message

    # -- the punch itself -----------------------------------------------------------------
    async def _prepare(
        self, we_dial: bool, their_addrs: list[Multiaddr], protocol: str
    ) -> list[socket.socket]:
        """Before SYNC: the symmetric dialer opens its birthday sockets (one mapping each)."""
        if (
            not we_dial
            or protocol != EXTENDED_PROTOCOL
            or self._mapping() != Mapping.ENDPOINT_DEPENDENT
            or not _quic(their_addrs)
        ):
            return []
        target = quic_socket_address(_quic(their_addrs)[0])
        sockets = []
        try:
            for _ in range(BIRTHDAY_SOCKETS):
                sock = socket.socket(
                    socket.AF_INET6 if ":" in target[0] else socket.AF_INET, socket.SOCK_DGRAM
                )
                sock.setblocking(False)
                sock.bind(("", 0))
                sockets.append(sock)
                with contextlib.suppress(OSError):
                    sock.sendto(os.urandom(8), target)
        except OSError as exc:
            log.info("hole punch: opened only %d birthday sockets: %r", len(sockets), exc)
        return sockets

    async def _punch(
        self,
        peer: PeerId,
        we_dial: bool,
        their_addrs: list[Multiaddr],
        spray: bool,
        prepared: list[socket.socket] | None,
    ) -> Connection | None:
        """Punch QUIC and TCP at once; the first direct connection (each transport that gets
        through within `PUNCH_TIMEOUT` stays as a path)."""
        self.punches[peer] = self.punches.get(peer, 0) + 1
        self.swarm.expect_holepunch(peer, client=we_dial)
        quic, tcp = _quic(their_addrs), _tcp(their_addrs)
        punches = []
        if quic and self.swarm.endpoints:
            if we_dial:
                punches.append(self._dial_side(peer, quic, prepared or []))
            else:
                punches.append(self._open_side(peer, quic, spray))
        if tcp and self.swarm.tcp is not None and self.swarm.tcp.listen_addrs:
            punches.append(self._tcp_punch(peer, tcp, client=we_dial))
        try:
            results = await asyncio.gather(
                *(self._within_timeout(punch) for punch in punches), return_exceptions=True
            )
        finally:
            for sock in prepared or []:
                if sock.fileno() != -1:
                    sock.close()
            self.swarm.end_holepunch(peer)
        connections = [r for r in results if isinstance(r, Connection) and not r.is_closed]
        for failure in results:
            if isinstance(failure, BaseException):
                log.debug("hole punch to %s: %r", peer, failure)
        return min(connections, key=lambda c: c.transport != "quic") if connections else None

    @staticmethod
    async def _within_timeout(punch) -> Connection | None:
        try:
            async with asyncio.timeout(PUNCH_TIMEOUT):
                return await punch
        except TimeoutError:
            return None

    def _punched(self, peer: PeerId, transport: str) -> Connection | None:
        """A healthy direct connection of `transport` to `peer` (hole-punched, or one that
        arrived just before the punch began), if there is one."""
        for connection in self.swarm.connections_to(peer):
            if (
                connection.transport == transport
                and connection.path != RELAYED
                and not getattr(connection, "suspect", False)
            ):
                return connection
        return None

    async def _tcp_punch(
        self, peer: PeerId, their_addrs: list[Multiaddr], client: bool
    ) -> Connection | None:
        """Dial each TCP address from our listen port until a connection exists: ours (as the
        client or not, as DCUtR assigned) or theirs, arrived at our listener.

        A dial outlives the punch (up to the TCP connect timeout) and the next punch joins it:
        a SYN already sent may have left the other side half-open (SYN-RECV) with its
        sequence number, and a new socket on the same port pair, with another one, would
        never complete against that."""
        assert self.swarm.tcp is not None
        transport = self.swarm.tcp
        arrived: asyncio.Future[Connection] = asyncio.get_running_loop().create_future()

        def watch(connection: Connection) -> None:
            if (
                connection.remote_peer == peer
                and connection.transport == "tcp"
                and connection.path != RELAYED
                and not arrived.done()
            ):
                arrived.set_result(connection)

        existing = self._punched(peer, "tcp")
        if existing is not None:
            return existing
        targets = {tuple(tcp_socket_address(addr)[:2]) for addr in their_addrs}
        if client:  # their SYN may reach our listener first: we stay the client there too
            transport.client_role_for |= targets  # type: ignore[arg-type]
        self.swarm.add_connection_observer(watch)
        attempts = [self._tcp_dial(peer, addr, client).task for addr in their_addrs]
        waiters: list[asyncio.Future[Connection]] = [*map(asyncio.shield, attempts), arrived]
        try:
            while waiters:
                done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    waiters.remove(future)
                    try:
                        return future.result()
                    except (TransportError, OSError, asyncio.CancelledError) as exc:
                        log.debug("TCP punch to %s: %r", peer, exc)
            return None
        finally:
            self.swarm.remove_connection_observer(watch)
            if client:
                transport.client_role_for -= targets  # type: ignore[arg-type]
            for waiter in waiters:
                waiter.cancel()  # (the shields: the dials themselves go on)

    async def _dial_first_if_stale(
        self, peer: PeerId, their_addrs: list[Multiaddr], client: bool
    ) -> None:
        """Send our TCP punch SYNs now, ahead of DCUtR's moment, if a SYN of ours to one of
        their addresses went unanswered lately; return once they are out.

        Our NAT may then still track that port pair half-open with the old SYN's sequence
        number. If the peer's punch SYN reaches it before our new one has gone out, the NAT
        lets it in (a simultaneous open, SYN_SENT2), our listener answers with a fresh
        sequence number, and the NAT drops that SYN-ACK as out of window: the punch is dead
        for minutes. Our own SYN going out first re-arms the entry (a new SYN from the same
        side replaces the old one), and then the peer's SYN meets our connecting socket. So
        the side that knows its NAT is stale dials first: B before SYNC, A before its reply;
        the other side keeps DCUtR's timing, after it. "Before" means the SYN has left, not
        that its dial was scheduled: the peer answers SYNC within a millisecond on a LAN-like
        path, sooner than a loaded loop may come round to a new task."""
        tcp = self.swarm.tcp
        if tcp is None or not tcp.listen_addrs:
            return
        stale = [
            addr
            for addr in _tcp(their_addrs)
            if tcp.syn_unanswered_lately(tuple(tcp_socket_address(addr)[:2]))  # type: ignore[arg-type]
        ]
        if not stale:
            return
        log.info("TCP punch to %s: our NAT may hold a stale entry; dialing first", peer)
        dials = [self._tcp_dial(peer, addr, client) for addr in _tcp(their_addrs)]
        _, late = await asyncio.wait([d.first_syn for d in dials], timeout=FIRST_SYN_WAIT)
        if late:
            log.info("TCP punch to %s: our SYN did not leave within %s s", peer, FIRST_SYN_WAIT)

    def _tcp_dial(self, peer: PeerId, addr: Multiaddr, client: bool) -> _PunchDial:
        """The punch dial to `addr`: the one still under way, or a new one."""
        key = (peer, str(addr))
        running = self._tcp_dials.get(key)
        if running is not None and not running.task.done():
            return running
        first_syn = asyncio.get_running_loop().create_future()
        task = asyncio.get_running_loop().create_task(
            self._dial_from_listen_port(peer, addr, client, first_syn)
        )
        dial = self._tcp_dials[key] = _PunchDial(task, first_syn)

        def ended(done: asyncio.Task[Connection]) -> None:
            _retrieve(done)
            if not first_syn.done():
                first_syn.set_result(None)
            if self._tcp_dials.get(key) is dial:
                del self._tcp_dials[key]

        task.add_done_callback(ended)
        return dial

    async def _dial_from_listen_port(
        self, peer: PeerId, addr: Multiaddr, client: bool, first_syn: asyncio.Future[None]
    ) -> Connection:
        assert self.swarm.tcp is not None
        transport = self.swarm.tcp
        source = self.swarm.tcp_dial_source(tcp_socket_address(addr)[0])

        def syn_sent() -> None:
            if not first_syn.done():
                log.debug("TCP punch dial to %s: first SYN sent", addr)
                first_syn.set_result(None)

        async with asyncio.timeout(transport.config.dial_timeout):
            while True:
                try:
                    if source is None:  # no listener fits: still opens our NAT toward them
                        syn_sent()  # (from another port: no stale entry of ours to re-arm)
                        connection = await transport.dial(addr, peer, is_initiator=client)
                    else:
                        connection = await transport.dial(
                            addr,
                            peer,
                            local_address=source,
                            is_initiator=client,
                            on_syn_sent=syn_sent,
                        )
                except PeerIdMismatch:
                    raise
                except PeerUnreachable as exc:  # refused, or the port pair is taken
                    log.debug("TCP punch dial to %s: %s", addr, exc)
                    syn_sent()  # (this try sent none: later ones are not worth waiting for)
                    if self._punched(peer, "tcp") is not None:
                        raise
                    await asyncio.sleep(TCP_REDIAL)
                    continue
                self.swarm.add_connection(connection)
                return connection

    async def _dial_side(
        self, peer: PeerId, their_addrs: list[Multiaddr], birthday: list[socket.socket]
    ) -> Connection | None:
        endpoint = self.swarm.main_endpoint()
        attempts = [
            asyncio.ensure_future(endpoint.dial(quic_socket_address(a), peer, PUNCH_TIMEOUT))
            for a in their_addrs
        ]
        if birthday:
            attempts.append(
                asyncio.ensure_future(self._birthday_dial(peer, their_addrs[0], birthday))
            )
        try:
            for next_done in asyncio.as_completed(attempts):
                try:
                    connection = await next_done
                except (TransportError, OSError) as exc:
                    log.debug("hole punch dial to %s failed: %s", peer, exc)
                    continue
                if connection is not None:
                    return connection
            return None
        finally:
            for attempt in attempts:
                attempt.cancel()

    async def _birthday_dial(
        self, peer: PeerId, target: Multiaddr, sockets: list[socket.socket]
    ) -> Connection | None:
        """Wait for a socket the other side's spray reached; dial from it."""
        loop = asyncio.get_running_loop()
        hit: asyncio.Future[socket.socket] = loop.create_future()
        target_ip = quic_socket_address(target)[0]

        def readable(sock: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while True:
                    _, source = sock.recvfrom(2048)
                    if source[0] == target_ip and not hit.done():
                        hit.set_result(sock)
                        return

        for sock in sockets:
            loop.add_reader(sock.fileno(), readable, sock)
        try:
            chosen = await hit
        finally:
            for sock in sockets:
                with contextlib.suppress(ValueError, OSError):
                    loop.remove_reader(sock.fileno())
        sockets.remove(chosen)  # the endpoint owns it now
        endpoint = QuicEndpoint(self.swarm.key, self.swarm.quic_config)
        endpoint.listen_on_socket(chosen)
        self.swarm.adopt_endpoint(endpoint)
        return await endpoint.dial(quic_socket_address(target), peer, PUNCH_TIMEOUT)

    async def _open_side(
        self, peer: PeerId, their_addrs: list[Multiaddr], spray: bool
    ) -> Connection | None:
        """Send UDP at the dialer until its connection arrives (and spray if it is symmetric)."""
        endpoint = self.swarm.main_endpoint()
        targets = [quic_socket_address(a) for a in their_addrs]
        if spray:
            self._spray(endpoint, targets[0][0])
        while True:
            existing = self._punched(peer, "quic")
            if existing is not None:
                return existing
            for target in targets:
                endpoint.send_raw(os.urandom(random.randint(32, 64)), target)
            await asyncio.sleep(random.uniform(*SPRAY_INTERVAL))

    @staticmethod
    def _spray(endpoint: QuicEndpoint, ip: str) -> None:
        ports = random.sample(range(PORT_RANGE[0], PORT_RANGE[1] + 1), BIRTHDAY_SPRAY)
        for port in ports:
            endpoint.send_raw(os.urandom(8), (ip, port))
