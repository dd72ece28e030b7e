"""Path liveness: notice within a second or two that a connection stopped answering.

QUIC alone notices a dead path only at its idle timeout (tens of seconds, as NAT keep-alive
needs). Each connection in use is pinged on one long-lived `/ipfs/ping/1.0.0` stream; when an
answer is `suspect_after` late the connection becomes *suspect*: new streams avoid it and the
swarm dials another path in the background. A late answer clears the suspicion (a short link
cut heals in place); no answer for `dead_after` closes it, so calls still on it fail with a
clear error instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from transport.connection import Connection
from transport.errors import TransportError
from transport.multistream import select_outbound
from transport.protocols import ping

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LivenessConfig:
    active_interval: float = 0.25  # ping period while the connection is in use
    idle_interval: float = 5.0  # ping period otherwise
    active_window: float = 10.0  # "in use": carries streams, or opened one this recently
    suspect_after: float = 1.0  # seconds without an answer before we look for another path
    dead_after: float = 6.0  # seconds without an answer before the connection is closed


class LivenessMonitor:
    """Watches every connection it is given until the connection closes."""

    def __init__(
        self,
        on_suspect: Callable[[Connection], None],
        config: LivenessConfig | None = None,
    ) -> None:
        self.config = config or LivenessConfig()
        self._on_suspect = on_suspect
        self._tasks: dict[Connection, asyncio.Task[None]] = {}

    def watch(self, connection: Connection) -> None:
        if connection in self._tasks or connection.is_closed:
            return
        task = asyncio.get_running_loop().create_task(self._watch(connection))
        self._tasks[connection] = task
        task.add_done_callback(lambda _: self._tasks.pop(connection, None))

    async def aclose(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch(self, connection: Connection) -> None:
        config = self.config
        stream = None
        last_ping = time.monotonic()
        try:
            while not connection.is_closed:
                # Wake often, ping only as often as the connection's use calls for.
                await asyncio.sleep(config.active_interval)
                if connection.is_closed:
                    return
                now = time.monotonic()
                recently_used = now - getattr(connection, "last_used", 0.0) < config.active_window
                busy = recently_used or getattr(connection, "stream_count", 0) > (
                    1 if stream else 0
                )
                if not busy and now - last_ping < config.idle_interval:
                    continue
                last_ping = now
                try:
                    if stream is None:
                        stream = await connection.open_stream()
                        await select_outbound(stream, [ping.PROTOCOL])
                    payload = os.urandom(ping.PAYLOAD_SIZE)
                    await stream.write(payload)
                    if await self._answered(stream, config.suspect_after):
                        self._clear(connection)
                        continue
                    self._suspect(connection)
                    if await self._answered(stream, config.dead_after - config.suspect_after):
                        self._clear(connection)
                        continue
                except (TransportError, EOFError, ConnectionError) as exc:
                    log.debug("liveness ping on %r failed: %r", connection, exc)
                    if stream is not None:
                        stream.reset("liveness ping failed")
                    stream = None
                    continue
                log.info("closing %r: no answer for %.1f s", connection, config.dead_after)
                await connection.close(f"path dead: no answer for {config.dead_after:.1f} s")
                return
        finally:
            if stream is not None:
                stream.reset("liveness monitor done")

    @staticmethod
    async def _answered(stream, within: float) -> bool:
        try:
            async with asyncio.timeout(within):
                await stream.readexactly(ping.PAYLOAD_SIZE)
        except TimeoutError:
            return False
        return True

    def _suspect(self, connection: Connection) -> None:
        if getattr(connection, "suspect", False):
            return
        connection.suspect = True  # type: ignore[attr-defined]
        log.info("%r stopped answering; looking for another path", connection)
        self._on_suspect(connection)

    @staticmethod
    def _clear(connection: Connection) -> None:
        if getattr(connection, "suspect", False):
            connection.suspect = False  # type: ignore[attr-defined]
            log.info("%r answers again", connection)
