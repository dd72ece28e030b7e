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

from transport.connection import DIRECT, RELAYED, Connection
from transport.errors import TransportError
from transport.host import ConnectionEvent, PeerConnected
from transport.identity import PeerId
from transport.multiaddr import Multiaddr
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
from transport.protocols.identify import IdentifyInfo
from transport.stream import Stream
from transport.swarm import Swarm
from transport.tcp import secure_and_mux

log = logging.getLogger(__name__)

AUTONAT_SERVERS = 3  # peers asked per check


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
        self.addresses = AddressBook()
        self.use_relays = use_relays  # None: when AutoNAT or observations say we are NAT'd
        self.relay_server = RelayServer(swarm, relay, public_addrs=self.advertised_addrs)
        self.relay_client = RelayClient(swarm, self._secure_circuit, relay_client, self.refresh)
        self.autonat = autonat.AutoNAT(swarm)
        self.holepuncher = HolePuncher(
            swarm, self.addresses.observed_addrs, self.addresses.mapping, self._speaks_extension
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
            for endpoint in self.swarm.endpoints:
                if endpoint.local_address is not None:
                    keeper = PortMappingKeeper(
                        endpoint.local_address[1], "udp", on_change=self._on_port_mapping
                    )
                    self._port_keepers.append(keeper)
                    self._spawn(keeper.start())
        self.refresh()

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
        if connection.path != RELAYED and info.observed_addr is not None:
            self.addresses.observe(info.peer, connection.remote_addr, info.observed_addr)
            self.refresh()
        if connection.path == RELAYED and not connection.is_initiator:
            # DCUtR: the side that accepted the relayed connection starts the upgrade.
            self.holepuncher.upgrade_soon(info.peer)

    def _on_connection(self, connection: Connection) -> None:
        """A new relayed connection to a peer we know (e.g. after a path died): punch again."""
        peer = connection.remote_peer
        if connection.path == RELAYED and not connection.is_initiator:
            if self._identify_info(peer) is not None:
                self.holepuncher.upgrade_soon(peer)

    def _on_connection_event(self, event: ConnectionEvent) -> None:
        if not isinstance(event, PeerConnected):
            self.refresh()

    # -- reachability -------------------------------------------------------------------------
    @property
    def mapping(self) -> Mapping:
        return self.addresses.mapping()

    @property
    def reachability(self) -> Reachability:
        return self.addresses.reachability()

    async def check_reachability(self, servers: list[PeerId]) -> Reachability:
        """Ask AutoNAT servers among `servers` to dial us back; returns the new verdict."""
        candidates = self.addresses.observed_addrs() + self._listen_addrs()
        asked = 0
        for server in servers:
            info = self._identify_info(server)
            if info is None or autonat.PROTOCOL not in info.protocols:
                continue
            try:
                reachable, addr = await self.autonat.check(server, candidates)
            except (TransportError, TimeoutError, EOFError) as exc:
                log.info("autonat via %s: %s", server, exc)
                continue
            self.addresses.record_dial_back(server, addr, reachable)
            asked += 1
            if asked >= AUTONAT_SERVERS:
                break
        log.info("reachability %s, NAT mapping %s", self.addresses.reachability(), self.mapping)
        self.refresh()
        return self.addresses.reachability()

    def behind_nat(self) -> bool:
        """Peers see us at an address we do not listen on."""
        observed = {a.without_peer_id() for a in self.addresses.observed_addrs()}
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
            for peer in candidates
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

    async def wait_direct(self, peer: PeerId, timeout: float) -> str:
        """Wait up to `timeout` for a direct or hole-punched path to `peer`; the path kind."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            path = self.path_to(peer)
            if path is not None and path != RELAYED:
                return path
            result = self.holepuncher.results.get(peer, "")
            if result.startswith("failed"):
                return path or "none"
            await asyncio.sleep(0.02)
        return self.path_to(peer) or "none"


__all__ = ["DIRECT", "NatManager", "is_public_ip"]
