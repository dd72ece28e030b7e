"""In-memory streams: a connected pair of `Stream`s for protocol tests without sockets."""

from __future__ import annotations

import asyncio

from transport.errors import StreamClosed, StreamReset
from transport.identity import PeerId
from transport.stream import Stream

DEFAULT_WINDOW = 1024 * 1024  # bytes a writer may get ahead of its reader


class MemoryStream(Stream):
    """One end of an in-memory pipe with a bounded window, so backpressure is real."""

    def __init__(self, remote_peer: PeerId | None, window: int) -> None:
        super().__init__(remote_peer)
        self.peer: MemoryStream | None = None
        self._window = window
        self._write_closed = False
        self._drained = asyncio.Event()
        self._drained.set()

    def _on_consumed(self, nbytes: int) -> None:
        if len(self._buffer) < self._window:
            self._drained.set()

    async def write(self, data: bytes) -> None:
        peer = self.peer
        assert peer is not None
        if self._reset_reason is not None:
            raise StreamReset(self._reset_reason)
        if self._write_closed:
            raise StreamClosed("write after close()")
        view = memoryview(bytes(data))
        while view:
            while len(peer._buffer) >= peer._window and peer._reset_reason is None:
                peer._drained.clear()
                await peer._drained.wait()
            if peer._reset_reason is not None or self._reset_reason is not None:
                raise StreamReset(self._reset_reason or peer._reset_reason or "reset")
            room = peer._window - len(peer._buffer)
            peer._feed_data(bytes(view[:room]))
            view = view[room:]

    async def close(self) -> None:
        if not self._write_closed:
            self._write_closed = True
            assert self.peer is not None
            self.peer._feed_eof()

    def reset(self, reason: str = "reset by local peer") -> None:
        assert self.peer is not None
        self._feed_reset(reason)
        self.peer._feed_reset("reset by remote peer")
        self._drained.set()
        self.peer._drained.set()


def memory_stream_pair(
    local: PeerId | None = None, remote: PeerId | None = None, window: int = DEFAULT_WINDOW
) -> tuple[MemoryStream, MemoryStream]:
    """Two connected streams: (the end `local` holds, the end `remote` holds)."""
    a = MemoryStream(remote, window)
    b = MemoryStream(local, window)
    a.peer, b.peer = b, a
    return a, b
