"""NAT traversal for one node: who sees us where, are we reachable, relays, hole punching.

The manager turns identify results into observations (and our NAT's mapping behaviour), asks
AutoNAT servers whether a fresh socket can reach us, holds relay reservations while we are not
publicly reachable, advertises only addresses that work (confirmed direct ones, relay
circuits), and upgrades relayed connections with hole punching.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from transport.connection import DIRECT, RELAYED, Connection
from transport.errors import TransportError
from transport.host import ConnectionEvent, PeerConnected
from transport.identity import PeerId
from transport.multiaddr import Multiaddr
from transport.multistream import select_outbound
from transport.nat import autonat
from transport.nat.holepunch import EXTENDED_PROTOCOL, HolePuncher
from transport.nat.portmap import PortMapping, PortMappingKeeper
from transport.nat.reachability import AddressBook, Mapping, Reachability
from transport.nat.relay import (
    HOP_PROTOCOL,
    RelayClient,
    RelayClientConfig,
    RelayConfig,
    RelayServer,
)
from transport.protocols import identify
from transport.protocols.identify import IdentifyInfo
from transport.stream import Stream
from transport.swarm import Swarm
from transport.tcp import is_tcp_address, secure_and_mux

log = logging.getLogger(__name__)

AUTONAT_SERVERS = 3  # peers asked per check, all at once
OBSERVE_TIMEOUT = 10.0  # seconds for the identify that learns our address on one connection


@dataclass(frozen=True)
class DirectOutcome:
    """How waiting for a direct path to a peer ended.

    `status`: "direct" (a direct or hole-punched connection is up), "failed" (every punch
    attempt of both sides is over, or there is no connection at all; `reason` says why), or
    "timeout" (attempts were still under way or expected when the time ran out). `path` is the
    kind of the connection new streams use now ("none" without one); `ours` and `theirs` count
    this round's attempts we started (as DCUtR's B) and the peer's attempts we answered (as A).
    """

    status: Literal["direct", "failed", "timeout"]
    path: str
    reason: str = ""
    ours: int = 0
    theirs: int = 0


def is_public_ip(host: str) -> bool:
    """Global unicast, or the documentation ranges the NAT lab uses as its Internet."""
    address = ipaddress.ip_address(host)
    lab_internet = any(
        address in ipaddress.ip_network(net) for net in ("198.51.100.0/24", "203.0.113.0/24")
    )
    return lab_internet or (address.is_global and not address.is_multicast)


class NatManager:
    """Observations, reachability, relays and hole punching on a swarm."""

    def __init__(
        self,
        swarm: Swarm,
        identify_info: Callable[[PeerId], IdentifyInfo | None],
        relay: RelayConfig | None = None,
        relay_client: RelayClientConfig | None = None,
        use_relays: bool | None = None,
        port_mapping: bool = False,
    ) -> None:
        self.swarm = swarm
        # UPnP-IGD / NAT-PMP / PCP talk to the LAN's gateway: opt-in, never in tests by accident.
        self.port_mapping = port_mapping
        self.mapped_addrs: list[Multiaddr] = []
        self._port_keepers: list[PortMappingKeeper] = []
        self._identify_info = identify_info
        # Where peers see us, kept per transport (an observer may see us over both): QUIC
        # observations with the AutoNAT verdicts, TCP ones apart.
        self.addresses = AddressBook()
        self.tcp_addresses = AddressBook()
        self.use_relays = use_relays  # None: when AutoNAT or observations say we are NAT'd
        self.relay_server = RelayServer(swarm, relay, public_addrs=self.advertised_addrs)
        self.relay_client = RelayClient(swarm, self._secure_circuit, relay_client, self.refresh)
        self.autonat = autonat.AutoNAT(swarm)
        self.holepuncher = HolePuncher(
            swarm, self.observed_addrs, lambda: self.mapping, self._speaks_extension
        )
        self._tasks: set[asyncio.Task[object]] = set()

    def start(self) -> None:
        self.relay_server.start()
        self.relay_client.start()
        self.autonat.start()
        self.holepuncher.start()
        self.swarm.add_connection_listener(self._on_connection_event)
        self.swarm.add_connection_observer(self._on_connection)
        if self.port_mapping:
            for protocol, port in self._mappable_ports():
                keeper = PortMappingKeeper(port, protocol, on_change=self._on_port_mapping)
                self._port_keepers.append(keeper)
                self._spawn(keeper.start())
        self.refresh()

    def _mappable_ports(self) -> list[tuple[str, int]]:
        """("udp", port) of each QUIC endpoint and ("tcp", port) of each TCP listener (IPv4:
        NAT-PMP, PCP and UPnP-IGD map IPv4 ports here)."""
        ports = [
            ("udp", endpoint.local_address[1])
            for endpoint in self.swarm.endpoints
            if endpoint.local_address is not None and ":" not in endpoint.local_address[0]
        ]
        if self.swarm.tcp is not None:
            ports += [
                ("tcp", int(addr.value_for("tcp") or 0))
                for addr in self.swarm.tcp.listen_addrs
                if addr.has("ip4")
            ]
        return list(dict.fromkeys(ports))

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_port_mapping(self, mapping: PortMapping | None) -> None:
        """The router gave (or took back) a port: advertise the mapped public address."""
        self.mapped_addrs = [
            keeper_mapping.multiaddr()
            for keeper in self._port_keepers
            if (keeper_mapping := keeper.mapping) is not None
            and is_public_ip(keeper_mapping.external_ip)
        ]
        if mapping is not None:
            log.info("router mapped %s -> %s", mapping.internal_port, mapping.multiaddr())
        self.refresh()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for keeper in self._port_keepers:
            with contextlib.suppress(TransportError, OSError):
                await keeper.stop()
        await self.holepuncher.stop()
        await self.relay_client.stop()
        self.relay_server.stop()
        self.autonat.stop()

    async def _secure_circuit(self, stream: Stream, is_initiator: bool, peer: PeerId) -> Connection:
        return await secure_and_mux(stream, self.swarm.key, is_initiator, peer)

    def _speaks_extension(self, peer: PeerId) -> bool:
        info = self._identify_info(peer)
        return info is not None and EXTENDED_PROTOCOL in info.protocols

    # -- what identify told us --------------------------------------------------------------
    def on_identified(self, info: IdentifyInfo) -> None:
        connection = self.swarm.connection_to(info.peer)
        if connection is None:
            return
        observed = info.observed_addr
        if (
            connection.path != RELAYED
            and observed is not None
            and self._from_listen_port(info.peer, observed)
        ):
            self._observe(info.peer, connection.remote_addr, observed)
        if connection.path == RELAYED and not connection.is_initiator:
            # DCUtR: the side that accepted the relayed connection starts the upgrade.
            self.holepuncher.upgrade_soon(info.peer)

    def _observe(self, peer: PeerId, observer_addr: Multiaddr | None, observed: Multiaddr) -> None:
        book = self.tcp_addresses if is_tcp_address(observed) else self.addresses
        book.observe(peer, observer_addr, observed)
        self.refresh()

    def observed_addrs(self) -> list[Multiaddr]:
        """Where peers saw us: QUIC addresses, then TCP ones, each the most seen first."""
        return self.addresses.observed_addrs() + self.tcp_addresses.observed_addrs()

    async def _observe_over(self, connection: Connection) -> None:
        """Identify on this very connection: where its peer sees us on this transport (the
        node identifies a peer once, over one of its connections, which tells one transport)."""
        try:
            async with asyncio.timeout(OBSERVE_TIMEOUT):
                stream = await connection.open_stream()
                await select_outbound(stream, [identify.PROTOCOL])
                info = await identify.read_identify(stream)
        except (TransportError, TimeoutError, EOFError) as exc:
            log.debug("identify over %r failed: %r", connection, exc)
            return
        if info.observed_addr is None or connection.is_closed:
            return
        local_port = connection.local_addr.value_for("tcp") if connection.local_addr else None
        if is_tcp_address(info.observed_addr) and local_port not in self._tcp_listen_ports():
            return  # dialed from a fresh port: shows no mapping anyone can reach us at
        self._observe(connection.remote_peer, connection.remote_addr, info.observed_addr)

    def _tcp_listen_ports(self) -> set[str | None]:
        if self.swarm.tcp is None:
            return set()
        return {a.value_for("tcp") for a in self.swarm.tcp.listen_addrs}

    def _from_listen_port(self, peer: PeerId, observed: Multiaddr) -> bool:
        """Whether `observed` (a TCP address) can show our listener's mapping: a TCP dial that
        had to leave from a fresh port shows a mapping nobody can reach us at (and would make
        any NAT look symmetric). QUIC always sends from its endpoint's port."""
        if not is_tcp_address(observed) or self.swarm.tcp is None:
            return True
        listen_ports = self._tcp_listen_ports()
        return any(
            c.transport == "tcp"
            and c.local_addr is not None
            and c.local_addr.value_for("tcp") in listen_ports
            for c in self.swarm.connections_to(peer)
        )

    def _on_connection(self, connection: Connection) -> None:
        """A new relayed connection to a peer we know (e.g. after a path died): punch again.
        A new direct one: learn where its peer sees us on its transport."""
        peer = connection.remote_peer
        if connection.path != RELAYED:
            self._spawn(self._observe_over(connection))
        if connection.path == RELAYED:  # B (whichever side we are) will ask for a punch soon
            self.holepuncher.expect_request(peer)
        if connection.path == RELAYED and not connection.is_initiator:
            if self._identify_info(peer) is not None:
                self.holepuncher.upgrade_soon(peer)

    def _on_connection_event(self, event: ConnectionEvent) -> None:
        if not isinstance(event, PeerConnected):
            self.refresh()

    # -- reachability -------------------------------------------------------------------------
    @property
    def mapping(self) -> Mapping:
        """Our NAT's mapping behaviour: as seen over QUIC, or over TCP if QUIC tells nothing
        (a network that drops UDP)."""
        mapping = self.addresses.mapping()
        return mapping if mapping != Mapping.UNKNOWN else self.tcp_addresses.mapping()

    @property
    def reachability(self) -> Reachability:
        return self.addresses.reachability()

    async def check_reachability(self, servers: list[PeerId]) -> Reachability:
        """Ask AutoNAT servers among `servers` to dial us back; returns the new verdict.

        Up to `AUTONAT_SERVERS` servers are asked at once (a server that fails makes room for
        the next one): an unreachable node waits out each dial-back's timeout, so asking one
        server after another took a UDP-blocked node ~16 s to learn it is private."""
        candidates = self.observed_addrs() + self._listen_addrs()
        eligible = [
            server
            for server in dict.fromkeys(servers)
            if (info := self._identify_info(server)) is not None
            and autonat.PROTOCOL in info.protocols
        ]
        asking: dict[asyncio.Task[list[Multiaddr | None]], PeerId] = {}
        answered = 0
        try:
            while eligible or asking:
                while eligible and answered + len(asking) < AUTONAT_SERVERS:
                    server = eligible.pop(0)
                    task = asyncio.ensure_future(self._dial_backs(server, candidates))
                    asking[task] = server
                if not asking:
                    break
                done, _ = await asyncio.wait(asking, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    server = asking.pop(task)
                    try:
                        reached = task.result()
                    except (TransportError, TimeoutError, EOFError) as exc:
                        log.info("autonat via %s: %s", server, exc)
                        continue
                    for addr in reached or [None]:
                        self.addresses.record_dial_back(server, addr, bool(reached))
                    answered += 1
        finally:
            for task in asking:
                task.cancel()
        log.info("reachability %s, NAT mapping %s", self.addresses.reachability(), self.mapping)
        self.refresh()
        return self.addresses.reachability()

    async def _dial_backs(
        self, server: PeerId, candidates: list[Multiaddr]
    ) -> list[Multiaddr | None]:
        """The addresses `server` reached us at: one request for all candidates (the first
        transport to answer wins), then one for the other transport's candidates, so an
        address of each transport that works gets confirmed (and advertised)."""
        reachable, addr = await self.autonat.check(server, candidates)
        if not reachable:
            return []
        reached: list[Multiaddr | None] = [addr]
        if addr is not None:
            other = [a for a in candidates if is_tcp_address(a) != is_tcp_address(addr)]
            if other:
                try:
                    again, other_addr = await self.autonat.check(server, other)
                except (TransportError, TimeoutError, EOFError) as exc:
                    log.debug("autonat via %s, second transport: %r", server, exc)
                else:
                    other_transport = other_addr is not None and is_tcp_address(
                        other_addr
                    ) != is_tcp_address(addr)
                    if again and other_transport:
                        reached.append(other_addr)
        return reached

    def behind_nat(self) -> bool:
        """Peers see us at an address we do not listen on."""
        observed = {a.without_peer_id() for a in self.observed_addrs()}
        return bool(observed - set(self._listen_addrs()))

    def wants_relays(self) -> bool:
        """Hold relay slots when NAT'd, even if AutoNAT got through.

        An address-restricted NAT lets AutoNAT's dial-back in (its server's IP was contacted
        before) while refusing everyone else, so a dial-back success alone does not prove that
        strangers can reach us; the relay circuits keep us reachable either way.
        """
        if self.use_relays is not None:
            return self.use_relays
        return self.reachability == Reachability.PRIVATE or self.behind_nat()

    def use_relays_among(self, candidates: list[PeerId]) -> None:
        """Hold reservations on relays among `candidates` if we need them."""
        if not self.wants_relays():
            return
        relays = [
            peer
            for peer in dict.fromkeys(candidates)  # (a peer bootstrapped by QUIC and by TCP)
            if HOP_PROTOCOL in (getattr(self._identify_info(peer), "protocols", None) or [])
        ]
        for relay in relays[: self.relay_client.config.wanted_reservations]:
            self.relay_client.keep_reservation(relay)

    # -- addresses ------------------------------------------------------------------------
    def _listen_addrs(self) -> list[Multiaddr]:
        return [a.without_peer_id() for a in self.swarm.listen_addrs]

    def advertised_addrs(self) -> list[Multiaddr]:
        """Addresses that work: confirmed or public direct ones, then relay circuits."""
        direct: list[Multiaddr] = []
        reachability = self.reachability
        if reachability == Reachability.PUBLIC:
            direct = sorted(self.addresses.confirmed, key=str)
            direct += [
                a
                for a in self._listen_addrs()
                if is_public_ip(a.value_for("ip4") or a.value_for("ip6") or "0.0.0.0")
            ]
        elif reachability == Reachability.UNKNOWN and not self.relay_client.circuit_addrs:
            direct = self._listen_addrs()  # a LAN or loopback: nobody has told us otherwise
        elif reachability == Reachability.UNKNOWN:
            direct = [
                a
                for a in self._listen_addrs()
                if is_public_ip(a.value_for("ip4") or a.value_for("ip6") or "0.0.0.0")
            ]
        return list(dict.fromkeys(self.mapped_addrs + direct + self.relay_client.circuit_addrs))

    def refresh(self) -> None:
        self.swarm.set_advertised_addrs(self.advertised_addrs())

    def path_to(self, peer: PeerId) -> str | None:
        connection = self.swarm.connection_to(peer)
        return connection.path if connection is not None else None

    def _direct_connection(self, peer: PeerId) -> Connection | None:
        for connection in self.swarm.connections_to(peer):
            if connection.path != RELAYED and not getattr(connection, "suspect", False):
                return connection
        return None

    async def wait_direct(self, peer: PeerId, timeout: float) -> DirectOutcome:
        """Wait up to `timeout` s for a direct path to `peer`: until one appears, or until
        every punch attempt of both sides is over (a failed attempt of one side is not the
        end while the other still retries).

        A relayed connection whose punching ended before this call (say, under the load of
        start-up) gets one more round, if we may ask for it: a stale failure is not an answer.
        Event-driven: woken by new connections and by the hole puncher's state changes (and
        at the moment an expected request from the peer is due)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        changed: asyncio.Future[None] = loop.create_future()

        def watch(connection: Connection) -> None:
            if connection.remote_peer == peer and connection.path != RELAYED:
                if not changed.done():
                    changed.set_result(None)

        self.swarm.add_connection_observer(watch)
        state = self.holepuncher.punch_state(peer)
        if state.over and self._direct_connection(peer) is None and self.holepuncher.may_ask(peer):
            log.info("punching with %s ended before (%s): once more", peer, state.describe())
            self.holepuncher.upgrade_soon(peer)
        try:
            while True:
                state = self.holepuncher.punch_state(peer)
                direct = self._direct_connection(peer)
                if direct is not None:
                    return DirectOutcome("direct", direct.path, "", state.ours, state.theirs)
                path = self.path_to(peer) or "none"
                if path == "none":
                    return DirectOutcome("failed", path, "no connection", state.ours, state.theirs)
                if state.over:
                    reason = state.outcome.removeprefix("failed: ") or "no hole punch attempted"
                    return DirectOutcome("failed", path, reason, state.ours, state.theirs)
                now = loop.time()
                if now >= deadline:
                    reason = f"still punching: {state.describe()}"
                    return DirectOutcome("timeout", path, reason, state.ours, state.theirs)
                wake_at = deadline if state.wake_at is None else min(deadline, state.wake_at)
                changed = self.holepuncher.next_change(peer)
                try:
                    await asyncio.wait([changed], timeout=max(0.0, wake_at - now))
                finally:
                    changed.cancel()
        finally:
            self.swarm.remove_connection_observer(watch)


__all__ = ["DIRECT", "DirectOutcome", "NatManager", "is_public_ip"]
