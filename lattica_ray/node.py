"""`Node`: one asyncio object that owns a peer's endpoint and the protocols on it.

Usable without Ray (bootstrap and relay nodes, the CLI); the Ray face runs one per machine.
The DHT, RPC and view services hang on it as `node.dht`, `node.rpc` and `node.view`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

from lattica_ray import __version__
from lattica_ray.allocator import fix_malloc_thresholds
from lattica_ray.dht import DHT, DHTConfig, DHTError
from lattica_ray.rpc import RpcConfig, RpcService
from lattica_ray.view import ClusterView, ViewConfig
from lattica_ray.view.errors import ViewNotStarted
from transport import busy_poll
from transport.connection import Connection
from transport.errors import ConnectionClosed, DialError, TransportError
from transport.handlers import StreamHandler
from transport.host import ConnectionEvent, ConnectionListener, PeerConnected
from transport.identity import KeyPair, PeerId, load_or_create_key
from transport.multiaddr import Multiaddr
from transport.nat.manager import DirectOutcome, NatManager
from transport.nat.reachability import Reachability
from transport.nat.relay import RelayClientConfig, RelayConfig
from transport.protocols import identify, ping
from transport.quic import QuicConfig
from transport.stream import Stream
from transport.swarm import Swarm
from transport.tcp import is_tcp_address

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "/ip4/0.0.0.0/udp/0/quic-v1"
# The Lattica network's identify protocolVersion: its nodes disconnect peers that differ.
DEFAULT_PROTOCOL_VERSION = "/lattica/1.0.0"
AGENT_VERSION = f"lattica-ray/{__version__}"
BITSWAP_PROTOCOL = "/ipfs/bitswap/1.2.0"
BITSWAP_DRAIN_LIMIT = 1024 * 1024
BOOTSTRAP_TIMEOUT = 10.0
IDENTIFY_TIMEOUT = 10.0


async def _drain_bitswap(stream: Stream) -> None:
    """Read and drop what a bitswap peer sends (at most 1 MiB), then close."""
    received = 0
    while received < BITSWAP_DRAIN_LIMIT and (chunk := await stream.read()):
        received += len(chunk)
    await stream.close()


class Node:
    """A lattica-ray peer: `async with Node(listen=[...], bootstrap=[...]) as node: ...`."""

    def __init__(
        self,
        listen: Sequence[str | Multiaddr] | None = None,
        bootstrap: Sequence[str | Multiaddr] | None = None,
        key_file: str | os.PathLike[str] | None = None,
        *,
        key: KeyPair | None = None,
        protocol_version: str = DEFAULT_PROTOCOL_VERSION,
        agent_version: str = AGENT_VERSION,
        quic_config: QuicConfig | None = None,
        relay: RelayConfig | None = None,
        relay_client: RelayClientConfig | None = None,
        use_relays: bool | None = None,
        rpc: RpcConfig | None = None,
        dht: DHTConfig | None = None,
        port_mapping: bool = False,
        cluster: str | None = None,
        view: ViewConfig | None = None,
        tune_malloc: bool = False,
        busy_poll_us: float | None = None,
    ) -> None:
        if key is not None and key_file is not None:
            raise ValueError("give either key or key_file, not both")
        self.key = key or (load_or_create_key(key_file) if key_file else KeyPair.generate())
        self.listen_addrs = [Multiaddr.parse(a) for a in (listen or [DEFAULT_LISTEN])]
        self.bootstrap_addrs = [Multiaddr.parse(a) for a in (bootstrap or [])]
        for addr in self.bootstrap_addrs:
            if addr.peer_id is None:
                raise ValueError(f"bootstrap address {addr} must end in /p2p/<peer id>")
        # Bulk transfers churn multi-MiB buffers: lattica_ray.allocator (opt-in: it slows NumPy).
        self.tune_malloc = tune_malloc
        # Spin up to this long before the loop sleeps, while calls come that close together
        # (transport.busy_poll: it halves a small call's latency here); 0 never spins. None:
        # $LATTICA_RAY_BUSY_POLL_US, else 200 us.
        if busy_poll_us is None:
            busy_poll_us = busy_poll.default_limit_us()
        if not busy_poll_us >= 0:  # (NaN too)
            raise ValueError(f"busy_poll_us must be >= 0, got {busy_poll_us}")
        self.busy_poll_us = busy_poll_us
        self._busy_poll_loop: asyncio.AbstractEventLoop | None = None
        self.protocol_version = protocol_version
        self.agent_version = agent_version
        self.swarm = Swarm(self.key, quic_config)
        self.identify_infos: dict[PeerId, identify.IdentifyInfo] = {}
        # Every node relays for others (limits in RelayConfig), uses relays when NAT'd
        # (use_relays=None decides from AutoNAT and observations) and punches holes.
        self.nat = NatManager(
            self.swarm, self.identify_infos.get, relay, relay_client, use_relays, port_mapping
        )
        self.observed_addrs: dict[PeerId, Multiaddr] = {}
        self._identified: dict[PeerId, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._started = False
        # The services: tensor RPC, the Kademlia DHT (peer routing, records, object directory);
        # the cluster view joins as it lands.
        self.rpc = RpcService(self, rpc)
        self.dht = DHT(self, self.key, dht)
        self.swarm.address_resolvers.append(self._find_peer_in_dht)
        # The signed CRDT cluster view, when this node is a member of a named cluster (the Ray
        # face attaches one with the cluster's resources; `lattica-ray node --cluster` too).
        self.view: ClusterView | None = (
            ClusterView(self, self.key, view, cluster_name=cluster) if cluster else None
        )

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> Node:
        if self._started:
            return self
        self._started = True
        if self.tune_malloc:
            fix_malloc_thresholds()
        try:
            for addr in self.listen_addrs:
                await self.swarm.listen(addr)
        except BaseException:
            await self.swarm.close()
            raise
        loop = asyncio.get_running_loop()
        if busy_poll.install(loop, self.busy_poll_us):
            self._busy_poll_loop = loop
        self.swarm.set_stream_handler(ping.PROTOCOL, ping.serve_ping)
        self.swarm.set_stream_handler(identify.PROTOCOL, self._serve_identify)
        self.swarm.set_stream_handler(identify.PUSH_PROTOCOL, self._receive_identify_push)
        self.swarm.add_addrs_listener(self._on_addrs_changed)
        # The Lattica SDK retries a refused bitswap stream ~2,500 times a second; accepting and
        # draining it (bounded) keeps such peers calm. We never answer bitswap.
        self.swarm.set_stream_handler(BITSWAP_PROTOCOL, _drain_bitswap)
        self.swarm.add_connection_listener(self._on_connection_event)
        self.nat.start()
        await self.rpc.start()
        await self.dht.start()
        if self.view is not None:
            await self.view.start()
        log.info("node %s listening on %s", self.peer_id, [str(a) for a in self.addrs])
        if self.bootstrap_addrs:
            await self.bootstrap()
        return self

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        for service in (self.view, self.rpc, self.dht):
            stop = getattr(service, "stop", None)
            if stop is not None:
                try:
                    await stop()
                except Exception:
                    log.exception("stopping %s failed", type(service).__name__)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.nat.stop()
        await self.swarm.close()
        if self._busy_poll_loop is not None:
            busy_poll.uninstall(self._busy_poll_loop, self.busy_poll_us)
            self._busy_poll_loop = None
        log.info("node %s stopped", self.peer_id)

    async def __aenter__(self) -> Node:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def bootstrap(self) -> list[PeerId]:
        """Connect to the bootstrap peers; returns those reached (failures are logged)."""

        async def reach(addr: Multiaddr) -> PeerId | None:
            try:
                async with asyncio.timeout(BOOTSTRAP_TIMEOUT):
                    peer = await self.connect(addr)
                    if is_tcp_address(addr) and not any(
                        c.transport == "tcp" for c in self.swarm.connections_to(peer)
                    ):
                        # Reached over QUIC first: our TCP mapping (which TCP hole punching
                        # offers) shows only on a TCP connection, so make one.
                        await self.swarm.dial_addr(addr)
                    return peer
            except (TransportError, TimeoutError) as exc:
                log.warning("bootstrap peer %s unreachable: %s", addr, exc)
                return None

        reached = await asyncio.gather(*(reach(addr) for addr in self.bootstrap_addrs))
        peers = [peer for peer in reached if peer is not None]
        if peers and self.view is not None:
            await self.view.join(peers)
        if peers:
            # Relays first, from what identify showed (our address as others see it); AutoNAT
            # takes seconds when we are unreachable, so it runs in the background and then
            # settles our DHT mode (kad-dht: client when strangers cannot reach us).
            self.nat.use_relays_among(peers)
            self.dht.set_mode("client" if self.nat.behind_nat() else "server")
            self._spawn(self._check_reachability(peers))
            try:
                await self.dht.bootstrap(list(self.bootstrap_addrs))
            except DHTError as exc:
                log.warning("DHT bootstrap failed: %s", exc)
        return peers

    async def _check_reachability(self, peers: list[PeerId]) -> None:
        reachability = await self.nat.check_reachability(peers)
        self.nat.use_relays_among(peers)
        if reachability != Reachability.UNKNOWN:
            self.dht.set_mode("server" if reachability == Reachability.PUBLIC else "client")

    async def _find_peer_in_dht(self, peer: PeerId) -> list[Multiaddr]:
        try:
            return await self.dht.find_peer(peer)
        except DHTError as exc:
            log.debug("DHT does not know %s: %s", peer, exc)
            return []

    # -- NAT traversal ----------------------------------------------------------------------
    @property
    def relay_client(self):
        return self.nat.relay_client

    @property
    def relay_server(self):
        return self.nat.relay_server

    @property
    def reachability(self) -> Reachability:
        return self.nat.reachability

    async def reserve_relay(self, relay: str | Multiaddr | PeerId) -> None:
        """Hold a relay slot on `relay` from now on, whatever our reachability."""
        peer = await self.connect(relay)
        await self.nat.relay_client.reserve(peer)
        self.nat.relay_client.keep_reservation(peer)

    async def wait_direct(self, peer: PeerId, timeout: float = 10.0) -> DirectOutcome:
        """Give hole punching up to `timeout` s: "direct", "failed" (why), or "timeout"."""
        return await self.nat.wait_direct(peer, timeout)

    # -- identity and addresses -------------------------------------------------------------
    @property
    def peer_id(self) -> PeerId:
        return self.key.peer_id

    @property
    def addrs(self) -> list[Multiaddr]:
        """Our advertised multiaddrs, each ending in /p2p/<peer id>."""
        return [self._dialable(addr) for addr in self.swarm.addrs]

    def _dialable(self, addr: Multiaddr) -> Multiaddr:
        """0.0.0.0 is where we listen, not where anyone can reach us: show loopback instead."""
        text = str(addr)
        if "/ip4/0.0.0.0/" in text:
            return Multiaddr.parse(text.replace("/ip4/0.0.0.0/", "/ip4/127.0.0.1/"))
        if "/ip6/::/" in text:
            return Multiaddr.parse(text.replace("/ip6/::/", "/ip6/::1/"))
        return addr

    # -- dialing and basic protocols --------------------------------------------------------
    async def connect(self, target: str | Multiaddr | PeerId) -> PeerId:
        """Connect to a multiaddr or a known peer; returns its peer ID (identified)."""
        if isinstance(target, str):
            target = (
                PeerId.from_string(target)
                if not target.startswith("/")
                else Multiaddr.parse(target)
            )
        connection = await self.swarm.connect(target)
        await self._wait_identified(connection.remote_peer)
        if self.swarm.connection_to(connection.remote_peer) is None:
            raise ConnectionClosed(
                f"{connection.remote_peer} closed the connection during identify "
                "(a Lattica peer does so when our protocol_version differs from its own)"
            )
        return connection.remote_peer

    def connection_to(self, peer: PeerId) -> Connection | None:
        return self.swarm.connection_to(peer)

    async def ping(self, target: str | Multiaddr | PeerId, timeout: float = 10.0) -> float:
        """Round-trip time to `target` in seconds, over libp2p ping."""
        async with asyncio.timeout(timeout):
            peer = await self.connect(target)
            stream = await self.swarm.open_stream(peer, [ping.PROTOCOL])
            try:
                return await ping.ping_once(stream)
            finally:
                await stream.close()

    def identify_info(self, peer: PeerId) -> identify.IdentifyInfo | None:
        return self.identify_infos.get(peer)

    async def _wait_identified(self, peer: PeerId) -> None:
        event = self._identified.get(peer)
        if event is None:  # identified earlier, or already gone
            return
        try:
            async with asyncio.timeout(IDENTIFY_TIMEOUT):
                await event.wait()
        except TimeoutError:
            log.warning("peer %s did not answer identify", peer)

    def _on_connection_event(self, event: ConnectionEvent) -> None:
        if isinstance(event, PeerConnected):
            self._identified[event.peer] = asyncio.Event()
            self._spawn(self._identify(event.peer))
        else:
            # Whoever waits for identify must not wait for a peer that is gone.
            waiting = self._identified.pop(event.peer, None)
            if waiting is not None:
                waiting.set()

    async def _identify(self, peer: PeerId) -> None:
        try:
            async with asyncio.timeout(IDENTIFY_TIMEOUT):
                stream = await self.swarm.open_stream(peer, [identify.PROTOCOL])
                info = await identify.read_identify(stream)
        except (TransportError, TimeoutError, EOFError) as exc:
            log.info("identify of %s failed: %r", peer, exc)
            info = None
        if info is not None:
            self.identify_infos[peer] = info
            self.swarm.add_peer_addrs(peer, info.listen_addrs)
            if info.observed_addr is not None:
                self.observed_addrs[peer] = info.observed_addr
            self.nat.on_identified(info)
            log.debug("identified %s: %s %s", peer, info.agent_version, info.protocol_version)
        if (event := self._identified.get(peer)) is not None:
            event.set()

    def _identify_message(self, observed: Multiaddr | None) -> bytes:
        return identify.encode_identify(
            self.key.public_key,
            [addr.without_peer_id() for addr in self.addrs],
            observed,
            self.swarm.handlers.protocols,
            self.protocol_version,
            self.agent_version,
        )

    async def _serve_identify(self, stream: Stream) -> None:
        peer = stream.remote_peer
        assert peer is not None
        # The address of the connection this stream came on: a peer may reach us on several.
        connection = getattr(stream, "connection", None) or self.swarm.connection_to(peer)
        await stream.write_message(self._identify_message(getattr(connection, "remote_addr", None)))
        await stream.close()

    def _on_addrs_changed(self) -> None:
        """Tell every connected peer (identify push), so relays and the DHT hand out the
        addresses that work now (a NAT'd node's relay circuits appear only after it joined)."""
        if self.view is not None:
            with contextlib.suppress(ViewNotStarted):  # it announces our addresses on start
                self.view.set_addrs()
        if self._started:
            for peer in self.connected_peers():
                self._spawn(self._push_identify(peer))

    async def _push_identify(self, peer: PeerId) -> None:
        try:
            async with asyncio.timeout(IDENTIFY_TIMEOUT):
                stream = await self.swarm.open_stream(peer, [identify.PUSH_PROTOCOL])
                await stream.write_message(self._identify_message(None))
                await stream.close()
        except (TransportError, TimeoutError) as exc:
            log.debug("identify push to %s failed: %r", peer, exc)

    async def _receive_identify_push(self, stream: Stream) -> None:
        info = await identify.read_pushed_identify(stream)
        self.swarm.replace_peer_addrs(info.peer, info.listen_addrs)
        previous = self.identify_infos.get(info.peer)
        if previous is not None:  # a push carries what changed; keep what it leaves out
            info = dataclasses.replace(
                info,
                protocol_version=info.protocol_version or previous.protocol_version,
                agent_version=info.agent_version or previous.agent_version,
                protocols=info.protocols or previous.protocols,
                observed_addr=previous.observed_addr,
            )
        self.identify_infos[info.peer] = info

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- Host (what the DHT, RPC and view services use) -------------------------------------
    async def open_stream(self, peer: PeerId, protocols: list[str], bulk: bool = False) -> Stream:
        return await self.swarm.open_stream(peer, protocols, bulk)

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        self.swarm.set_stream_handler(protocol, handler)

    def remove_stream_handler(self, protocol: str) -> None:
        self.swarm.remove_stream_handler(protocol)

    def add_peer_addrs(self, peer: PeerId, addrs: list[Multiaddr]) -> None:
        self.swarm.add_peer_addrs(peer, addrs)

    def peer_addrs(self, peer: PeerId) -> list[Multiaddr]:
        return self.swarm.peer_addrs(peer)

    def connected_peers(self) -> list[PeerId]:
        return self.swarm.connected_peers()

    def add_connection_listener(self, listener: ConnectionListener) -> None:
        self.swarm.add_connection_listener(listener)


__all__ = ["DialError", "Node"]
