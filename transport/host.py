"""What protocols need from the node they run on: open streams, serve streams, know peers.

The DHT, RPC and view services are written against `Host`, so the same code runs on a real
`Node` (QUIC, relays, hole punching) and on an in-memory network in tests and simulations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from transport.handlers import StreamHandler
from transport.identity import PeerId
from transport.multiaddr import Multiaddr
from transport.stream import Stream

__all__ = ["ConnectionListener", "Host", "PeerConnected", "PeerDisconnected", "StreamHandler"]


@dataclass(frozen=True)
class PeerConnected:
    peer: PeerId
    path: str  # "direct", "holepunched", "relayed" or "memory"


@dataclass(frozen=True)
class PeerDisconnected:
    peer: PeerId


ConnectionEvent = PeerConnected | PeerDisconnected
ConnectionListener = Callable[[ConnectionEvent], None]


@runtime_checkable
class Host(Protocol):
    """The surface a protocol service uses. Implemented by `lattica_ray.Node` and test hosts."""

    @property
    def peer_id(self) -> PeerId: ...

    @property
    def addrs(self) -> list[Multiaddr]:
        """Our advertised addresses, each ending in `/p2p/<peer_id>`."""
        ...

    async def open_stream(self, peer: PeerId, protocols: list[str], bulk: bool = False) -> Stream:
        """A new stream to `peer` speaking the first of `protocols` it accepts.

        Dials if needed (known addresses, then the DHT / relays). `bulk` marks a large
        transfer: a host with several paths to `peer` sends it over the fastest one. Raises
        `DialError` or `ProtocolNotSupported`.
        """
        ...

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        """Serve inbound streams of `protocol`; the handler owns the stream (and closes it)."""
        ...

    def remove_stream_handler(self, protocol: str) -> None: ...

    def add_peer_addrs(self, peer: PeerId, addrs: list[Multiaddr]) -> None:
        """Remember addresses learned from elsewhere (DHT, view) for later dials."""
        ...

    def peer_addrs(self, peer: PeerId) -> list[Multiaddr]: ...

    def connected_peers(self) -> list[PeerId]: ...

    def add_connection_listener(self, listener: ConnectionListener) -> None:
        """Call `listener` (synchronously, keep it short) on every connect and disconnect."""
        ...
