"""The client side of circuit relay v2: hold reservations, accept and dial relayed circuits.

A relayed circuit is a raw byte stream through the relay; like rust-libp2p and go-libp2p we
secure it with Noise and multiplex it with Yamux, so the relayed connection authenticates the
remote end to end (the relay sees only ciphertext) and carries any protocol a direct one does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from transport.connection import RELAYED, Connection
from transport.envelope import open_envelope
from transport.errors import DialError, InvalidMultiaddr, PeerUnreachable, TransportError
from transport.identity import PeerId
from transport.multiaddr import Multiaddr
from transport.nat.relay.config import RelayClientConfig
from transport.nat.relay.protocol import (
    HOP_PROTOCOL,
    MAX_MESSAGE_SIZE,
    STOP_PROTOCOL,
    VOUCHER_DOMAIN,
    VOUCHER_PAYLOAD_TYPE,
    HopMessage,
    Limit,
    RelayError,
    Status,
    StopMessage,
    circuit_addr,
    parse_hop,
    parse_stop,
    peer_of,
    split_circuit_addr,
    stop_status,
)
from transport.stream import Stream
from transport.swarm import Swarm

log = logging.getLogger(__name__)

SecureUpgrade = Callable[[Stream, bool, PeerId], Awaitable[Connection]]


@dataclass
class ActiveReservation:
    relay: PeerId
    expire: float  # Unix time
    addrs: list[Multiaddr]  # the relay's addresses, each with /p2p/<relay>
    limit: Limit | None

    @property
    def circuit_addrs(self) -> list[Multiaddr]:
        return [circuit_addr(addr.without_peer_id(), self.relay) for addr in self.addrs]


class RelayClient:
    """Reservations on relays, the stop handler, and the relay dial strategy of a swarm."""

    def __init__(
        self,
        swarm: Swarm,
        upgrade: SecureUpgrade,
        config: RelayClientConfig | None = None,
        on_addrs_changed: Callable[[], None] | None = None,
    ) -> None:
        self.swarm = swarm
        self.upgrade = upgrade
        self.config = config or RelayClientConfig()
        self.reservations: dict[PeerId, ActiveReservation] = {}
        self._on_addrs_changed = on_addrs_changed or (lambda: None)
        self._keepers: dict[PeerId, asyncio.Task[None]] = {}

    def start(self) -> None:
        self.swarm.set_stream_handler(STOP_PROTOCOL, self._serve_stop)
        self.swarm.dial_strategies.append(self.dial_via_relay)

    async def stop(self) -> None:
        for task in self._keepers.values():
            task.cancel()
        for task in self._keepers.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._keepers.clear()
        self.swarm.remove_stream_handler(STOP_PROTOCOL)
        with contextlib.suppress(ValueError):
            self.swarm.dial_strategies.remove(self.dial_via_relay)

    @property
    def circuit_addrs(self) -> list[Multiaddr]:
        now = time.time()
        return [
            addr
            for reservation in self.reservations.values()
            if reservation.expire > now
            for addr in reservation.circuit_addrs
        ]

    # -- reservations ---------------------------------------------------------------------
    async def reserve(self, relay: PeerId) -> ActiveReservation:
        """Reserve (or refresh) a slot on `relay`; raises `RelayError` with the spec's status."""
        stream = await self.swarm.open_stream(relay, [HOP_PROTOCOL])
        try:
            await stream.write_message(HopMessage(type=HopMessage.RESERVE).SerializeToString())
            reply = parse_hop(await stream.read_message(MAX_MESSAGE_SIZE))
        finally:
            await stream.close()
        if reply.type != HopMessage.STATUS:
            raise RelayError(Status.UNEXPECTED_MESSAGE, "relay did not answer with a status")
        if reply.status != Status.OK:
            raise RelayError(reply.status)
        if not reply.HasField("reservation"):
            raise RelayError(Status.MALFORMED_MESSAGE, "OK without a reservation")
        if reply.reservation.voucher:
            signer, _ = open_envelope(
                reply.reservation.voucher, VOUCHER_DOMAIN, VOUCHER_PAYLOAD_TYPE
            )
            if signer.peer_id() != relay:
                raise RelayError(Status.MALFORMED_MESSAGE, "voucher signed by another peer")
        addrs = []
        for raw in reply.reservation.addrs:
            try:
                addrs.append(Multiaddr.from_bytes(raw))
            except InvalidMultiaddr:
                log.debug("relay %s sent a bad address", relay)
        if not addrs:  # fall back to how we reached it
            connection = self.swarm.connection_to(relay)
            if connection is not None and connection.remote_addr is not None:
                addrs = [connection.remote_addr]
        reservation = ActiveReservation(
            relay, float(reply.reservation.expire), addrs, Limit.from_pb(reply)
        )
        self.reservations[relay] = reservation
        log.info("reserved a relay slot on %s until %s", relay, time.ctime(reservation.expire))
        self._on_addrs_changed()
        return reservation

    def keep_reservation(self, relay: PeerId) -> None:
        """Hold a reservation on `relay` from now on: refresh it, retry when it fails."""
        if relay not in self._keepers:
            task = asyncio.get_running_loop().create_task(self._keep(relay))
            self._keepers[relay] = task

    def _refresh_delay(self, reservation: ActiveReservation) -> float:
        ttl = max(1.0, reservation.expire - time.time())
        return ttl * (1 - self.config.refresh_margin)

    async def _keep(self, relay: PeerId) -> None:
        existing = self.reservations.get(relay)
        if existing is not None:
            await asyncio.sleep(self._refresh_delay(existing))
        while True:
            try:
                delay = self._refresh_delay(await self.reserve(relay))
            except (TransportError, TimeoutError, EOFError) as exc:
                log.warning("relay reservation on %s failed: %s", relay, exc)
                if self.reservations.pop(relay, None) is not None:
                    self._on_addrs_changed()
                delay = self.config.retry_delay
            await asyncio.sleep(delay)

    # -- inbound circuits -----------------------------------------------------------------
    async def _serve_stop(self, stream: Stream) -> None:
        relay = stream.remote_peer
        message = parse_stop(await stream.read_message(MAX_MESSAGE_SIZE))
        if message.type != StopMessage.CONNECT:
            await stream.write_message(stop_status(Status.UNEXPECTED_MESSAGE))
            await stream.close()
            return
        try:
            source = peer_of(message)
        except TransportError:
            await stream.write_message(stop_status(Status.MALFORMED_MESSAGE))
            await stream.close()
            return
        await stream.write_message(stop_status(Status.OK))
        connection = await self.upgrade(stream, False, source)
        connection.path = RELAYED
        relay_connection = self.swarm.connection_to(relay) if relay is not None else None
        if relay_connection is not None and relay_connection.remote_addr is not None:
            connection.remote_addr = circuit_addr(
                relay_connection.remote_addr.without_peer_id(), relay
            ).with_peer_id(source)
        log.info("relayed connection from %s through %s", source, relay)
        self.swarm.add_connection(connection)

    # -- outbound circuits ----------------------------------------------------------------
    async def dial_via_relay(self, peer: PeerId) -> Connection | None:
        """The swarm's relay strategy: all relay addresses known for `peer` at once, the first
        circuit wins (a dead relay must not cost a handshake timeout)."""
        attempts: dict[asyncio.Future[Connection], str] = {}
        relays: set[PeerId] = set()
        for addr in self.swarm.peer_addrs(peer):
            if not addr.is_relayed:
                continue
            try:
                relay_addr, target = split_circuit_addr(addr)
            except InvalidMultiaddr:
                continue
            if target not in (None, peer) or relay_addr.peer_id is None:
                continue
            # One circuit per relay; reaching the relay tries all its addresses (QUIC, TCP).
            self.swarm.add_peer_addrs(relay_addr.peer_id, [relay_addr])
            if relay_addr.peer_id not in relays:
                relays.add(relay_addr.peer_id)
                attempts[asyncio.ensure_future(self.connect_through(relay_addr, peer))] = str(
                    relay_addr
                )
        if not attempts:
            return None
        errors = []
        try:
            while attempts:
                done, _ = await asyncio.wait(attempts, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    relay = attempts.pop(future)
                    try:
                        return future.result()
                    except (TransportError, TimeoutError, EOFError) as exc:
                        errors.append(f"{relay}: {exc}")
        finally:
            for future in attempts:
                future.cancel()
        raise PeerUnreachable("no relay got us through: " + "; ".join(errors))

    async def connect_through(self, relay_addr: Multiaddr, peer: PeerId) -> Connection:
        """A relayed connection to `peer` through the relay at `relay_addr`."""
        relay = relay_addr.peer_id
        assert relay is not None
        await self.swarm.connect(relay_addr)
        stream = await self.swarm.open_stream(relay, [HOP_PROTOCOL])
        request = HopMessage(type=HopMessage.CONNECT)
        request.peer.id = peer.multihash
        await stream.write_message(request.SerializeToString())
        try:
            reply = parse_hop(await stream.read_message(MAX_MESSAGE_SIZE))
        except (TransportError, EOFError):
            stream.reset("bad relay answer")
            raise
        if reply.type != HopMessage.STATUS or reply.status != Status.OK:
            stream.reset("relay refused")
            raise RelayError(reply.status, f"through {relay}")
        try:
            connection = await self.upgrade(stream, True, peer)
        except TransportError as exc:
            stream.reset("upgrade failed")
            raise DialError(f"securing the relayed connection to {peer} failed: {exc}") from exc
        connection.path = RELAYED
        connection.remote_addr = circuit_addr(relay_addr.without_peer_id(), relay).with_peer_id(
            peer
        )
        self.swarm.add_connection(connection)
        log.info("relayed connection to %s through %s", peer, relay)
        return connection
