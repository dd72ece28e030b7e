"""Hole punching over a relayed connection: libp2p DCUtR, and our extension for symmetric NATs.

DCUtR (`/libp2p/dcutr`): the side that accepted the relayed connection (B) sends CONNECT with
its observed addresses and times the answer; A answers with its own; B sends SYNC and waits half
the RTT; then A dials B's addresses (QUIC client) while B sprays random UDP at A's addresses,
so both NATs hold a mapping for the other at the same moment.

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

from google.protobuf.message import DecodeError

from transport.connection import HOLEPUNCHED, RELAYED, Connection
from transport.errors import InvalidMultiaddr, ProtocolViolation, TransportError
from transport.identity import PeerId
from transport.multiaddr import Multiaddr, quic_socket_address
from transport.nat.pb import holepunch_pb2
from transport.nat.reachability import Mapping
from transport.quic import QuicEndpoint
from transport.stream import Stream
from transport.swarm import Swarm

log = logging.getLogger(__name__)

DCUTR_PROTOCOL = "/libp2p/dcutr"  # DCUtR spec
EXTENDED_PROTOCOL = "/lattica-ray/holepunch/1"
MAX_MESSAGE_SIZE = 4096  # DCUtR spec
ATTEMPTS = 3  # DCUtR spec: the inbound peer tries three times
PUNCH_TIMEOUT = 5.0  # seconds one attempt may take
SPRAY_INTERVAL = (0.010, 0.200)  # DCUtR spec: random UDP every 10-200 ms
BIRTHDAY_SOCKETS = 192
BIRTHDAY_SPRAY = 4096
PORT_RANGE = (1024, 65535)

HolePunch = holepunch_pb2.HolePunch


class PunchImpossible(TransportError):
    """No hole punch can work between these two NATs (both map endpoint-dependently)."""


def _quic_addrs(raw: list[bytes]) -> list[Multiaddr]:
    addrs = []
    for item in raw[:16]:
        try:
            addr = Multiaddr.from_bytes(item)
            quic_socket_address(addr)
        except InvalidMultiaddr:
            continue
        addrs.append(addr)
    return addrs


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
        self.results: dict[PeerId, str] = {}  # peer -> "holepunched" / "failed: ..."

    def start(self) -> None:
        self.swarm.set_stream_handler(DCUTR_PROTOCOL, self._serve)
        self.swarm.set_stream_handler(EXTENDED_PROTOCOL, self._serve)

    async def stop(self) -> None:
        for task in self._running.values():
            task.cancel()
        for task in list(self._running.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._running.clear()

    def _our_addrs(self) -> list[Multiaddr]:
        observed = [a for a in self._observed_addrs() if a.has("quic-v1")]
        return observed or [a for a in self.swarm.listen_addrs if a.has("quic-v1")]

    # -- B: the side that accepted the relayed connection starts -----------------------------
    def upgrade_soon(self, peer: PeerId) -> asyncio.Task[Connection | None]:
        """Start (or join) the upgrade of our relayed connection to `peer`."""
        task = self._running.get(peer)
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self.upgrade(peer))
            self._running[peer] = task
        return task

    async def upgrade(self, peer: PeerId) -> Connection | None:
        """Up to three DCUtR attempts; the direct connection, or None (the relay stays)."""
        last_error = "no attempt"
        for attempt in range(1, ATTEMPTS + 1):
            existing = self.swarm.connection_to(peer)
            healthy = existing is not None and not getattr(existing, "suspect", False)
            if healthy and existing.path != RELAYED:
                self.results[peer] = existing.path
                return existing
            try:
                connection = await self._attempt_as_b(peer)
            except PunchImpossible as exc:
                last_error = str(exc)
                break
            except (TransportError, TimeoutError, EOFError, OSError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
                log.info("hole punch to %s, attempt %d: %s", peer, attempt, last_error)
                continue
            if connection is not None:
                self.results[peer] = HOLEPUNCHED
                log.info("hole punched to %s on attempt %d", peer, attempt)
                return connection
            last_error = "no direct path found"
        self.results[peer] = f"failed: {last_error}"
        return None

    async def _attempt_as_b(self, peer: PeerId) -> Connection | None:
        protocol = EXTENDED_PROTOCOL if self._supports_extension(peer) else DCUTR_PROTOCOL
        stream = await self.swarm.open_stream(peer, [protocol])
        try:
            connect = HolePunch(type=HolePunch.CONNECT)
            connect.ObsAddrs.extend(a.without_peer_id().to_bytes() for a in self._our_addrs())
            if protocol == EXTENDED_PROTOCOL:
                connect.mapping = str(self._mapping())
            started = time.perf_counter()
            await stream.write_message(connect.SerializeToString())
            reply = self._parse(await stream.read_message(MAX_MESSAGE_SIZE), HolePunch.CONNECT)
            rtt = time.perf_counter() - started
            their_addrs = _quic_addrs(list(reply.ObsAddrs))
            if not their_addrs:
                raise ProtocolViolation("the peer sent no address to punch to")
            we_dial = choose_dialer(
                str(self._mapping()), reply.mapping if protocol == EXTENDED_PROTOCOL else "", False
            )
            if we_dial is None:
                log.info("both %s and we are behind symmetric NATs: staying relayed", peer)
                raise PunchImpossible("both peers are behind symmetric NATs")
            prepared = await self._prepare(we_dial, their_addrs, protocol)
            await stream.write_message(HolePunch(type=HolePunch.SYNC).SerializeToString())
            await asyncio.sleep(rtt / 2)
            spray = protocol == EXTENDED_PROTOCOL and reply.mapping == Mapping.ENDPOINT_DEPENDENT
            return await self._punch(peer, we_dial, their_addrs, spray, prepared)
        finally:
            await stream.close()

    # -- A: answers B ---------------------------------------------------------------------
    async def _serve(self, stream: Stream) -> None:
        peer = stream.remote_peer
        assert peer is not None
        if stream.remote_peer is not None and not self._arrived_relayed(stream):
            stream.reset("hole punching is for relayed connections")
            return
        extended = stream.protocol == EXTENDED_PROTOCOL
        request = self._parse(await stream.read_message(MAX_MESSAGE_SIZE), HolePunch.CONNECT)
        their_addrs = _quic_addrs(list(request.ObsAddrs))
        reply = HolePunch(type=HolePunch.CONNECT)
        reply.ObsAddrs.extend(a.without_peer_id().to_bytes() for a in self._our_addrs())
        if extended:
            reply.mapping = str(self._mapping())
        await stream.write_message(reply.SerializeToString())
        we_dial = choose_dialer(str(self._mapping()), request.mapping if extended else "", True)
        if we_dial is None:
            self.results[peer] = "failed: both peers are behind symmetric NATs"
            await stream.close()
            return
        prepared = (
            await self._prepare(we_dial, their_addrs, stream.protocol)
            if we_dial is not None
            else None
        )
        self._parse(await stream.read_message(MAX_MESSAGE_SIZE), HolePunch.SYNC)
        await stream.close()
        if not their_addrs:
            self.results[peer] = "failed: no address to punch to"
            return
        spray = extended and request.mapping == Mapping.ENDPOINT_DEPENDENT
        direct = await self._punch(peer, we_dial, their_addrs, spray, prepared)
        self.results[peer] = HOLEPUNCHED if direct is not None else "failed: no direct path found"

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
        ):
            return []
        target = quic_socket_address(their_addrs[0])
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
        self.swarm.expect_holepunch(peer)
        try:
            async with asyncio.timeout(PUNCH_TIMEOUT):
                if we_dial:
                    return await self._dial_side(peer, their_addrs, prepared or [])
                return await self._open_side(peer, their_addrs, spray)
        except TimeoutError:
            return None
        finally:
            for sock in prepared or []:
                if sock.fileno() != -1:
                    sock.close()
            self.swarm.end_holepunch(peer)

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
            existing = self.swarm.connection_to(peer)
            if (
                existing is not None
                and existing.path == HOLEPUNCHED
                and not getattr(existing, "suspect", False)
            ):
                return existing
            for target in targets:
                endpoint.send_raw(os.urandom(random.randint(32, 64)), target)
            await asyncio.sleep(random.uniform(*SPRAY_INTERVAL))

    @staticmethod
    def _spray(endpoint: QuicEndpoint, ip: str) -> None:
        ports = random.sample(range(PORT_RANGE[0], PORT_RANGE[1] + 1), BIRTHDAY_SPRAY)
        for port in ports:
            endpoint.send_raw(os.urandom(8), (ip, port))
