"""The stream every protocol talks over: ordered bytes to one peer, half-closable, resettable.

`Stream` holds the read side (a buffer fed by the transport) and the framing helpers; each
transport (QUIC, in-memory, later TCP/Yamux and relayed circuits) supplies the write side.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from transport.errors import MessageTooLarge, StreamReset
from transport.varint import VarintError, encode_length_prefixed, try_decode_varint

if TYPE_CHECKING:
    from transport.identity import PeerId

DEFAULT_MAX_MESSAGE_SIZE = 4 * 1024 * 1024  # for length-prefixed control messages


class Stream:
    """One bidirectional byte stream to `remote_peer`, speaking `protocol` once negotiated."""

    # True for transports that send what `hold` kept ahead of their next write or their FIN.
    holds_unsent = False

    def __init__(self, remote_peer: PeerId | None = None) -> None:
        self.remote_peer = remote_peer
        self.protocol: str = ""
        self._buffer = bytearray()
        self._eof = False
        self._reset_reason: str | None = None
        # Futures of the readers waiting for data, the end or a reset (see `_next_arrival`).
        self._arrival_waiters: list[asyncio.Future[None]] = []
        # Lazy multistream-select: confirmations we still expect before the first data byte.
        self._pending_confirmation: list[str] = []
        self._watcher: Callable[[], None] | None = None
        self._unsent = b""  # held for the next write (see `hold`)

    def hold(self, data: bytes) -> None:
        """Send `data` ahead of the next write or the close, not now: a listener's protocol
        confirmation then shares a packet with its reply. Only where `holds_unsent`."""
        if not self.holds_unsent:
            raise RuntimeError(f"{type(self).__name__} cannot hold bytes for its next write")
        self._unsent += data

    def _take_unsent(self) -> bytes:
        """What `hold` kept (b"" if nothing), for the transport to send first; now cleared."""
        unsent, self._unsent = self._unsent, b""
        return unsent

    def watch(self, callback: Callable[[], None] | None) -> None:
        """Call `callback` (synchronously, keep it short) whenever data, the end or a reset
        arrives; None stops. For a protocol that must notice a reset while nobody reads (an
        RPC server whose handler runs after the whole request came). If unread data, the end
        or a reset is already here, `callback` is called at once: it came before the watch
        and would otherwise go unheard."""
        self._watcher = callback
        if callback is not None and (self._buffer or self._eof or self._reset_reason is not None):
            callback()

    # -- fed by the transport -------------------------------------------------------------
    def _feed_data(self, data: bytes) -> None:
        if data:
            self._buffer += data
            if self._arrival_waiters:
                self._wake_readers()
            if self._watcher is not None:
                self._watcher()

    def _feed_eof(self) -> None:
        self._eof = True
        if self._arrival_waiters:
            self._wake_readers()
        if self._watcher is not None:
            self._watcher()

    def _feed_reset(self, reason: str) -> None:
        if self._reset_reason is None:
            self._reset_reason = reason
        if self._arrival_waiters:
            self._wake_readers()
        if self._watcher is not None:
            self._watcher()

    def _on_consumed(self, nbytes: int) -> None:
        """Hook for transports that give flow-control credit as the application reads."""

    def _on_waiting(self, needed: int) -> None:
        """Hook: a reader waits until `needed` bytes are buffered, more than may be in flight.

        A transport whose window is smaller must grant enough credit here, or the reader and
        the remote writer wait for each other forever (readexactly of more than the window).
        """

    # -- reading ----------------------------------------------------------------------------
    def _next_arrival(self) -> asyncio.Future[None]:
        """What to await until data, the end or a reset arrives (the caller checks which, and
        loops). A bare future per waiting reader, resolved by the feed: the reader's task is
        woken with no event object or coroutine in between. A cancelled reader cancels only
        its own future."""
        waiters = self._arrival_waiters
        if waiters:  # rare: another reader waits too, or cancelled ones are left over
            waiters[:] = [waiter for waiter in waiters if not waiter.done()]
        waiter = asyncio.get_running_loop().create_future()
        waiters.append(waiter)
        return waiter

    def _wake_readers(self) -> None:
        waiters, self._arrival_waiters = self._arrival_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _wait_readable(self) -> None:
        while not self._buffer and not self._eof and self._reset_reason is None:
            await self._next_arrival()

    async def _settle_negotiation(self) -> None:
        if not self._pending_confirmation:
            return
        from transport.multistream import confirmed_now, read_confirmation  # (imports us)

        # Wait for the answer first: it usually comes whole, with the reply, and is then
        # checked in one step instead of message by message.
        await self._wait_readable()
        expected, self._pending_confirmation = self._pending_confirmation, []
        if not confirmed_now(self, expected):
            await read_confirmation(self, expected)

    async def read(self, max_bytes: int = 65536) -> bytes:
        """Up to `max_bytes` bytes; b"" once the remote closed its side and all was read."""
        if self._pending_confirmation:  # (checked here: no coroutine for the common case)
            await self._settle_negotiation()
        if not self._buffer:  # (the rest of `_read_raw`, without a coroutine of its own)
            await self._wait_readable()
            if not self._buffer:
                return self._at_end()
        return self._take(max_bytes)

    async def _read_raw(self, max_bytes: int) -> bytes:
        if not self._buffer:
            await self._wait_readable()
            if not self._buffer:
                return self._at_end()
        return self._take(max_bytes)

    def _take(self, max_bytes: int) -> bytes:
        chunk = bytes(self._buffer[:max_bytes])
        del self._buffer[: len(chunk)]
        self._on_consumed(len(chunk))
        return chunk

    def _at_end(self) -> bytes:
        """What a read returns with nothing buffered after waiting: the end, or the reset."""
        if self._reset_reason is not None:
            raise StreamReset(self._reset_reason)
        return b""

    def read_nowait(self, max_bytes: int = 65536) -> bytes:
        """Up to `max_bytes` of what is buffered now, without waiting; b"" if nothing is (which
        is not the end: see `at_eof`). Raises StreamReset once reset and drained. An outbound
        stream whose protocol confirmation is still due reads nothing here: use `read`."""
        if self._pending_confirmation or not self._buffer:
            if self._reset_reason is not None and not self._pending_confirmation:
                raise StreamReset(self._reset_reason)
            return b""
        return self._take(max_bytes)

    async def readexactly(self, nbytes: int) -> bytes:
        if self._pending_confirmation:
            await self._settle_negotiation()
        return await self._readexactly_raw(nbytes)

    async def _readexactly_raw(self, nbytes: int) -> bytes:
        while len(self._buffer) < nbytes:
            if self._reset_reason is not None:
                raise StreamReset(self._reset_reason)
            if self._eof:
                raise asyncio.IncompleteReadError(bytes(self._buffer), nbytes)
            self._on_waiting(nbytes)
            await self._next_arrival()
        chunk = bytes(self._buffer[:nbytes])
        del self._buffer[:nbytes]
        self._on_consumed(nbytes)
        return chunk

    async def read_message(self, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> bytes:
        """One varint-length-prefixed message; `MessageTooLarge` before buffering a big body."""
        if self._pending_confirmation:
            await self._settle_negotiation()
        return await self._read_message_raw(max_size)

    async def _read_message_raw(self, max_size: int) -> bytes:
        while True:
            try:
                header = try_decode_varint(self._buffer)
            except VarintError:
                self.reset()
                raise
            if header is not None:
                length, start = header
                if length > max_size:
                    self.reset()
                    raise MessageTooLarge(length, max_size)
                if len(self._buffer) - start >= length:
                    body = bytes(self._buffer[start : start + length])
                    del self._buffer[: start + length]
                    self._on_consumed(start + length)
                    return body
                self._on_waiting(start + length)
            if self._reset_reason is not None:
                raise StreamReset(self._reset_reason)
            if self._eof:
                raise asyncio.IncompleteReadError(bytes(self._buffer), None)
            await self._next_arrival()

    async def read_to_end(self, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> bytes:
        """Everything until the remote closes its side, at most `max_size` bytes."""
        if self._pending_confirmation:
            await self._settle_negotiation()
        out = bytearray()
        while True:
            chunk = await self._read_raw(65536)
            if not chunk:
                return bytes(out)
            out += chunk
            if len(out) > max_size:
                self.reset()
                raise MessageTooLarge(len(out), max_size, "stream")

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._buffer

    # -- writing (the transport's part) -----------------------------------------------------
    async def write(self, data: bytes) -> None:
        """Send `data`, waiting while the transport's send buffer is full (backpressure)."""
        raise NotImplementedError

    async def write_message(self, message: bytes) -> None:
        await self.write(encode_length_prefixed(message))

    async def close(self) -> None:
        """Close our write side (FIN); the remote may still send until it closes its own."""
        raise NotImplementedError

    def reset(self, reason: str = "reset by local peer") -> None:
        """Abort both directions at once; pending reads on either side fail with StreamReset."""
        raise NotImplementedError

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc is not None:
            self.reset(f"aborted: {exc!r}"[:200])
        else:
            await self.close()
