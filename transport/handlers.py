"""Inbound stream dispatch: negotiate the protocol, then run its handler as its own task.

Shared by every `Host` (the QUIC node, relayed circuits, the in-memory test network) so that
protocol negotiation, error logging and task bookkeeping behave the same everywhere.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from transport.errors import ProtocolNotSupported, TransportError
from transport.multistream import select_inbound, select_inbound_now
from transport.stream import Stream

log = logging.getLogger(__name__)

StreamHandler = Callable[[Stream], Awaitable[None]]
NEGOTIATION_TIMEOUT = 10.0  # seconds an inbound stream may take to name its protocol


class StreamHandlers:
    """Protocol ID -> handler, and the tasks serving inbound streams."""

    def __init__(self, negotiation_timeout: float = NEGOTIATION_TIMEOUT) -> None:
        self._handlers: dict[str, StreamHandler] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.negotiation_timeout = negotiation_timeout

    def set(self, protocol: str, handler: StreamHandler) -> None:
        self._handlers[protocol] = handler

    def remove(self, protocol: str) -> None:
        self._handlers.pop(protocol, None)

    @property
    def protocols(self) -> list[str]:
        return sorted(self._handlers)

    def accept(self, stream: Stream) -> None:
        """Serve a new inbound stream in the background."""
        task = asyncio.get_running_loop().create_task(self._serve(stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, stream: Stream) -> None:
        try:
            protocol = select_inbound_now(stream, self._handlers)  # the usual: all came at once
            if protocol is None:
                async with asyncio.timeout(self.negotiation_timeout):  # no task of its own
                    protocol = await select_inbound(stream, self._handlers)
        except ProtocolNotSupported as exc:
            log.debug("inbound stream from %s: %s", stream.remote_peer, exc)
            stream.reset("no common protocol")
            return
        except (TransportError, EOFError, TimeoutError, ConnectionError) as exc:
            log.info("inbound stream from %s failed negotiation: %r", stream.remote_peer, exc)
            stream.reset("negotiation failed")
            return
        handler = self._handlers.get(protocol)
        if handler is None:  # removed while negotiating
            stream.reset("protocol removed")
            return
        try:
            await handler(stream)
        except asyncio.CancelledError:
            stream.reset("node stopping")
            raise
        except (TransportError, EOFError, ConnectionError) as exc:
            log.info("%s handler, peer %s: %r", protocol, stream.remote_peer, exc)
            stream.reset("handler failed")
        except Exception:
            log.exception("%s handler crashed (peer %s)", protocol, stream.remote_peer)
            stream.reset("handler crashed")

    async def aclose(self) -> None:
        """Cancel every running handler and wait for them."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
