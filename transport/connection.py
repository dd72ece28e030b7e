"""What every transport hands the node: an authenticated, multiplexed connection to one peer.

QUIC connections, TCP+Noise+Yamux connections and relayed circuits (Noise+Yamux over a relay
stream) all look like this, so the node, the dialer and every protocol above are transport-blind.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Callable

from transport.identity import PeerId
from transport.multiaddr import Multiaddr
from transport.stream import Stream

log = logging.getLogger(__name__)

InboundStreamCallback = Callable[[Stream], None]
CloseCallback = Callable[["Connection"], None]

# Path kinds, as reported to users (`lattica-ray ping` prints them).
DIRECT = "direct"
HOLEPUNCHED = "holepunched"
RELAYED = "relayed"


class Connection(abc.ABC):
    """One secure connection; streams are opened on it and arrive from it."""

    transport: str = ""  # "quic", "tcp", ...

    def __init__(
        self,
        remote_peer: PeerId,
        local_addr: Multiaddr | None,
        remote_addr: Multiaddr | None,
        is_initiator: bool,
        path: str = DIRECT,
    ) -> None:
        self.remote_peer = remote_peer
        self.local_addr = local_addr
        self.remote_addr = remote_addr
        self.is_initiator = is_initiator
        self.path = path
        self.closed = asyncio.get_running_loop().create_future()
        self._inbound_callback: InboundStreamCallback | None = None
        self._close_callbacks: list[CloseCallback] = []

    @abc.abstractmethod
    async def open_stream(self) -> Stream:
        """A new outbound stream (no protocol negotiated yet)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close gracefully: the remote sees a clean close, open streams end."""

    @property
    def is_closed(self) -> bool:
        return self.closed.done()

    def open_streams(self) -> list[Stream]:
        """The streams open on this connection (implementations keep them in `_streams`)."""
        streams: dict[int, Stream] = getattr(self, "_streams", {})
        return list(streams.values())

    def set_inbound_stream_callback(self, callback: InboundStreamCallback) -> None:
        """Called (synchronously) with each stream the remote opens."""
        self._inbound_callback = callback

    def add_close_callback(self, callback: CloseCallback) -> None:
        if self.is_closed:
            callback(self)
        else:
            self._close_callbacks.append(callback)

    # -- for implementations ------------------------------------------------------------
    def _deliver_inbound(self, stream: Stream) -> None:
        if self._inbound_callback is None:
            stream.reset("no handler")
        else:
            self._inbound_callback(stream)

    def _mark_closed(self, reason: str) -> None:
        if self.closed.done():
            return
        self.closed.set_result(reason)
        for callback in self._close_callbacks:
            try:
                callback(self)
            except Exception:
                log.exception("connection close callback failed")
        self._close_callbacks.clear()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.transport} {self.path} "
            f"peer={self.remote_peer.short()} remote={self.remote_addr}>"
        )
