"""A QUIC bidirectional stream as a `transport.Stream`: writes with backpressure, reads credit."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from transport.errors import ConnectionClosed, StreamClosed, StreamReset
from transport.stream import Stream

if TYPE_CHECKING:
    from transport.quic.connection import QuicConnection

WRITE_CHUNK = 256 * 1024  # hand aioquic at most this much at once, so backpressure bites early
ERROR_CODE_RESET = 0  # application error code in RESET_STREAM / STOP_SENDING


class QuicStream(Stream):
    """One stream of a `QuicConnection`."""

    holds_unsent = True  # held bytes join the next write's or the FIN's STREAM frame

    def __init__(self, connection: QuicConnection, stream_id: int) -> None:
        super().__init__(connection.remote_peer)
        self.connection = connection
        self.stream_id = stream_id
        self._write_closed = False
        self._write_reset = False
        self._written = 0  # bytes handed to the engine (an upper bound of its send buffer)
        self._drained: asyncio.Event | None = None  # made when a writer first waits

    # -- reading: credit is granted as the application consumes ---------------------------
    def _on_consumed(self, nbytes: int) -> None:
        self.connection._consume(self.stream_id, nbytes)
        if self._eof and self._write_closed and not self._buffer:
            self.connection._forget(self.stream_id)  # the last of it read: done both ways

    def _feed_eof(self) -> None:
        super()._feed_eof()
        if self._write_closed and not self._buffer:
            self.connection._forget(self.stream_id)  # done both ways

    def _on_waiting(self, needed: int) -> None:
        self.connection._reader_needs(self.stream_id, needed)

    async def _wait_readable(self) -> None:
        while not self._buffer and not self._eof and self._reset_reason is None:
            connection = self.connection
            # A reader waits: data held back for other streams' unread bytes must come in
            # (qh3 gives credit for all streams from one queue), or it waits on them.
            connection._reader_needs(self.stream_id, 1)
            if connection._flush_scheduled:  # what it wrote may be what the answer waits for
                connection._flush_before_waiting()
                if self._buffer or self._eof or self._reset_reason is not None:
                    return  # it came in meanwhile
            await self._next_arrival()

    # -- writing ------------------------------------------------------------------------
    async def write(self, data: bytes | bytearray | memoryview) -> None:
        connection = self.connection
        if type(data) is bytes and len(data) <= WRITE_CHUNK:  # a small write: no chunking
            self._check_writable()
            if self._unsent:
                data = self._take_unsent() + data
            # Its send buffer holds at most what it ever wrote: below the mark, no need to ask.
            if self._written >= connection._send_high_water and (
                not connection._send_buffer_below_high_water(self.stream_id)
            ):
                await self._wait_drained()
                self._check_writable()
            connection._send(self.stream_id, data)
            self._written += len(data)
            return
        view = memoryview(data).cast("B")
        if self._unsent:
            self._check_writable()
            unsent = self._take_unsent()
            self.connection._send(self.stream_id, unsent)
            self._written += len(unsent)
        for offset in range(0, len(view), WRITE_CHUNK):
            self._check_writable()
            await self._wait_drained()
            self._check_writable()
            chunk = view[offset : offset + WRITE_CHUNK]
            self.connection._send(self.stream_id, chunk)
            self._written += len(chunk)

    async def drain(self) -> None:
        """Wait until the send buffer is below the high-water mark."""
        await self._wait_drained()

    def _check_writable(self) -> None:
        if self._reset_reason is not None or self._write_reset:
            raise StreamReset(self._reset_reason or "stream reset by remote (STOP_SENDING)")
        if self._write_closed:
            raise StreamClosed("write after close()")
        if self.connection._terminated:
            raise ConnectionClosed(f"connection closed: {self.connection.close_reason}")

    async def _wait_drained(self) -> None:
        while not self.connection._send_buffer_below_high_water(self.stream_id):
            if self._drained is None:
                self._drained = asyncio.Event()
            self._drained.clear()
            self.connection._watch_drain(self)
            await self._drained.wait()
            if self.connection.is_closed or self._write_reset or self._reset_reason:
                return

    async def close(self) -> None:
        if self._write_closed or self._write_reset or self._reset_reason is not None:
            return
        self._write_closed = True
        if not self.connection.is_closed:
            self.connection._send(self.stream_id, self._take_unsent(), end_stream=True)
            if self._eof and not self._buffer:
                self.connection._forget(self.stream_id)  # done both ways

    def reset(self, reason: str = "reset by local peer") -> None:
        if self._reset_reason is None:
            self._feed_reset(reason)
            self._wake_writer()
            if not self.connection.is_closed:
                self.connection._reset_stream(self.stream_id)

    # -- fed by the connection ----------------------------------------------------------
    def _remote_stopped_sending(self) -> None:
        self._write_reset = True
        self._wake_writer()

    def _connection_lost(self, reason: str) -> None:
        self._feed_reset(f"connection closed: {reason}")
        self._wake_writer()

    def _wake_writer(self) -> None:
        """A writer waiting for the send buffer to drain must look again (it may be moot)."""
        if self._drained is not None:
            self._drained.set()
