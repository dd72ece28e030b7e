"""Path liveness: notice within a second or two that a connection stopped answering.

QUIC alone notices a dead path only at its idle timeout (tens of seconds, as NAT keep-alive
needs). Each connection in use is pinged on one long-lived `/ipfs/ping/1.0.0` stream; when an
answer is `suspect_after` late the connection becomes *suspect*: new streams avoid it and the
swarm dials another path in the background. A late answer clears the suspicion (a short link
cut heals in place); no answer for `dead_after` closes it, so calls still on it fail with a
clear error instead of hanging.

Silence is counted on the path only while our own event loop was on time: a process that did not
run for seconds (a loaded machine, a blocking call, a pause under a debugger) would otherwise
read its own stall as every path being dead at once. `LoopLag` measures how late the loop was.
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


def in_use(connection: Connection) -> bool:
    """Whether `connection` carries work: keep-alive pings (ours and the remote's liveness
    streams) do not count, or every watched connection would look busy forever."""
    return any(stream.protocol != ping.PROTOCOL for stream in connection.open_streams())


class LoopLag:
    """How late this event loop has been: a ticker that sleeps `tick` seconds and adds up by how
    much each wake-up overshot. `total()` also counts the overshoot of a tick still pending, so a
    reader woken at the end of a stall sees the stall even before the ticker has run."""

    def __init__(self, tick: float = 0.1, report_after: float = 1.0) -> None:
        self.tick = tick
        self.report_after = report_after  # log a stall at least this long
        self._total = 0.0
        self._due = 0.0
        self._task: asyncio.Task[None] | None = None
        self._users = 0

    def total(self) -> float:
        overdue = time.monotonic() - self._due if self._task is not None else 0.0
        return self._total + max(0.0, overdue)

    def start(self) -> None:
        self._users += 1
        if self._task is None:
            self._due = time.monotonic() + self.tick
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        self._users = max(0, self._users - 1)
        task, self._task = self._task, None
        if task is not None and self._users == 0:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        elif task is not None:
            self._task = task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            now = time.monotonic()
            late = max(0.0, now - self._due)
            self._total += late
            self._due = now + self.tick
            if late >= self.report_after:
                log.warning("event loop stalled for %.1f s (not counted against any path)", late)


class LivenessMonitor:
    """Watches every connection it is given until the connection closes."""

    def __init__(
        self,
        on_suspect: Callable[[Connection], None],
        config: LivenessConfig | None = None,
        lag: LoopLag | None = None,
    ) -> None:
        self.config = config or LivenessConfig()
        self._on_suspect = on_suspect
        self._tasks: dict[Connection, asyncio.Task[None]] = {}
        self.lag = lag or LoopLag()
        self._lag_started = False

    def watch(self, connection: Connection) -> None:
        if connection in self._tasks or connection.is_closed:
            return
        if not self._lag_started:
            self.lag.start()
            self._lag_started = True
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
        if self._lag_started:
            self._lag_started = False
            await self.lag.stop()

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
                busy = recently_used or in_use(connection)
                if not busy and now - last_ping < config.idle_interval:
                    continue
                last_ping = now
                try:
                    if stream is None:
                        stream = await connection.open_stream()
                        await select_outbound(stream, [ping.PROTOCOL])
                    payload = os.urandom(ping.PAYLOAD_SIZE)
                    await stream.write(payload)
                    sent = (time.monotonic(), self.lag.total())
                    answer = asyncio.ensure_future(stream.readexactly(ping.PAYLOAD_SIZE))
                    try:
                        if await self._answered(answer, sent, config.suspect_after):
                            self._clear(connection)
                            continue
                        self._suspect(connection)
                        if await self._answered(answer, sent, config.dead_after):
                            self._clear(connection)
                            continue
                    finally:
                        answer.cancel()
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

    async def _answered(
        self, answer: asyncio.Future[bytes], sent: tuple[float, float], within: float
    ) -> bool:
        """Whether `answer` arrives before the path was silent for `within` seconds since the
        ping was `sent` (a (time, loop lag) pair), not counting the time our own loop was late."""
        sent_at, lag_at_sent = sent
        while True:
            silent = time.monotonic() - sent_at - (self.lag.total() - lag_at_sent)
            if silent >= within and not answer.done():
                return False
            done, _ = await asyncio.wait({answer}, timeout=max(0.0, within - silent))
            if done:
                answer.result()  # raises the read's error, which the caller handles
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
