"""Inbound stream dispatch: negotiate the protocol, then run its handler as its own task.

Shared by every `Host` (the QUIC node, relayed circuits, the in-memory test network) so that
protocol negotiation, error logging and task bookkeeping behave the same everywhere.

A stream that arrives in a loop callback (a QUIC datagram) has its task's first step run at
once, inside that callback (as Python 3.12's eager tasks do): a handler that can answer
without waiting (a small RPC call whose request came whole) has answered before the datagram's
batch is flushed, and needs no loop turn of its own.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from transport.errors import ProtocolNotSupported, TransportError
from transport.multistream import select_inbound, select_inbound_now
from transport.stream import Stream

log = logging.getLogger(__name__)

StreamHandler = Callable[[Stream], Awaitable[None]]
NEGOTIATION_TIMEOUT = 10.0  # seconds an inbound stream may take to name its protocol


def start_task(coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """`coroutine` as a task whose first step runs now, before this returns, if the caller is
    a loop callback rather than a task; else (or on a loop that does not allow it) a task
    started the usual way, on the next loop turn.

    Either way it is an ordinary task: `current_task()`, cancellation and its own copy of the
    context variables behave as for any task; only the start is earlier.
    """
    loop = asyncio.get_running_loop()
    if asyncio.current_task(loop) is not None:  # inside a task: its step must end first
        return loop.create_task(coroutine)
    if sys.version_info >= (3, 12):
        return asyncio.Task(coroutine, loop=loop, eager_start=True)  # type: ignore[call-arg]
    # Python 3.11: take the first step's handle back from the ready queue and run it here.
    ready = getattr(loop, "_ready", None)
    queued = len(ready) if ready is not None and loop.get_task_factory() is None else -1
    task = loop.create_task(coroutine)
    if queued >= 0 and len(ready) == queued + 1:  # type: ignore[arg-type]
        ready.pop()._run()  # type: ignore[union-attr]
    return task


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
        """Serve a new inbound stream: at once as far as it can go, then in the background."""
        task = start_task(self._serve(stream))
        if not task.done():
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
