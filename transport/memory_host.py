"""An in-memory network of `Host`s: the real protocol code, no sockets.

For protocol tests and large simulations (the 1,000-node DHT, the 200-node view). Streams are
`MemoryStream` pairs with real backpressure, negotiated with multistream-select exactly as on
the wire; a configurable round-trip time is charged per opened stream (one request/response
costs one RTT, as with lazy negotiation over QUIC); killed hosts stop answering without warning.
"""

from __future__ import annotations

import asyncio
import random

from transport.errors import DialTimeout, PeerUnreachable
from transport.handlers import StreamHandler, StreamHandlers
from transport.host import ConnectionListener, PeerConnected, PeerDisconnected
from transport.identity import KeyPair, PeerId
from transport.memory import DEFAULT_WINDOW, MemoryStream, memory_stream_pair
from transport.multiaddr import Multiaddr
from transport.multistream import select_outbound


class MemoryNetwork:
    """Hosts by peer ID, a latency model, and who is alive."""

    def __init__(
        self,
        rtt: float = 0.0,
        jitter: float = 0.0,
        dead_peer_timeout: float = 0.0,
        window: int = DEFAULT_WINDOW,
        seed: int | None = None,
    ) -> None:
        self.rtt = rtt
        self.jitter = jitter
        self.dead_peer_timeout = dead_peer_timeout  # how long a dial to a dead host hangs
        self.window = window
        self.hosts: dict[PeerId, MemoryHost] = {}
        self.streams_opened = 0
        self._random = random.Random(seed)
        self._next_port = 1

    def add_host(self, key: KeyPair | None = None) -> MemoryHost:
        host = MemoryHost(self, key or KeyPair.generate(), self._next_port)
        self._next_port += 1
        self.hosts[host.peer_id] = host
        return host

    def kill(self, peer: PeerId) -> None:
        """The host vanishes without warning: its streams reset, dials to it time out."""
        host = self.hosts.get(peer)
        if host is not None:
            host._die()

    def delay(self) -> float:
        if self.jitter:
            return max(0.0, self.rtt + self._random.uniform(-self.jitter, self.jitter))
        return self.rtt


class MemoryHost:
    """A `Host` on a `MemoryNetwork`."""

    def __init__(self, network: MemoryNetwork, key: KeyPair, port: int) -> None:
        self.network = network
        self.key = key
        self._peer_id = key.peer_id
        self._addr = Multiaddr.parse(f"/ip4/127.0.0.1/udp/{port}/quic-v1")
        self._advertised = (self._addr.with_peer_id(self._peer_id),)  # base58 once, not per call
        self.alive = True
        self.handlers = StreamHandlers()
        self._peer_addrs: dict[PeerId, list[Multiaddr]] = {}
        self._connected: set[PeerId] = set()
        self._listeners: list[ConnectionListener] = []
        self._streams: set[MemoryStream] = set()

    # -- Host ---------------------------------------------------------------------------
    @property
    def peer_id(self) -> PeerId:
        return self._peer_id

    @property
    def addrs(self) -> list[Multiaddr]:
        return list(self._advertised)

    async def open_stream(
        self, peer: PeerId, protocols: list[str], bulk: bool = False
    ) -> MemoryStream:  # (one path per peer here: `bulk` changes nothing)
        if not self.alive:
            raise PeerUnreachable(f"{self._peer_id.short()} is dead")
        remote = self.network.hosts.get(peer)
        delay = self.network.delay()
        if remote is None:
            raise PeerUnreachable(f"no route to {peer.short()} on the memory network")
        if not remote.alive:
            if self.network.dead_peer_timeout:
                await asyncio.sleep(self.network.dead_peer_timeout)
            raise DialTimeout(f"{peer.short()} did not answer")
        if delay:
            await asyncio.sleep(delay)
        if not remote.alive or not self.alive:
            raise DialTimeout(f"{peer.short()} did not answer")
        self.network.streams_opened += 1
        ours, theirs = memory_stream_pair(self._peer_id, peer, self.network.window)
        self._track(ours)
        remote._track(theirs)
        self._mark_connected(peer)
        remote._mark_connected(self._peer_id)
        remote.handlers.accept(theirs)
        await select_outbound(ours, protocols)
        return ours

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        self.handlers.set(protocol, handler)

    def remove_stream_handler(self, protocol: str) -> None:
        self.handlers.remove(protocol)

    def add_peer_addrs(self, peer: PeerId, addrs: list[Multiaddr]) -> None:
        known = self._peer_addrs.setdefault(peer, [])
        for addr in addrs:
            if addr not in known:
                known.append(addr)

    def peer_addrs(self, peer: PeerId) -> list[Multiaddr]:
        remote = self.network.hosts.get(peer)
        own = remote.addrs if remote is not None else []
        return list(dict.fromkeys([*self._peer_addrs.get(peer, []), *own]))

    def connected_peers(self) -> list[PeerId]:
        return sorted(self._connected)

    def add_connection_listener(self, listener: ConnectionListener) -> None:
        self._listeners.append(listener)

    # -- internals ------------------------------------------------------------------------
    def _track(self, stream: MemoryStream) -> None:
        self._streams.add(stream)

    def _mark_connected(self, peer: PeerId) -> None:
        if peer not in self._connected:
            self._connected.add(peer)
            for listener in list(self._listeners):
                listener(PeerConnected(peer, "memory"))

    def _mark_disconnected(self, peer: PeerId) -> None:
        if peer in self._connected:
            self._connected.discard(peer)
            for listener in list(self._listeners):
                listener(PeerDisconnected(peer))

    def _die(self) -> None:
        self.alive = False
        for stream in list(self._streams):
            stream.reset("peer vanished")
        self._streams.clear()
        for peer in list(self._connected):
            self._mark_disconnected(peer)
            remote = self.network.hosts.get(peer)
            if remote is not None:
                remote._mark_disconnected(self._peer_id)

    async def aclose(self) -> None:
        self._die()
        await self.handlers.aclose()
