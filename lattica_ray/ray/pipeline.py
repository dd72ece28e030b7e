"""Pipelined remote calls: the request reaches this node's LatticaActor while Ray delivers the task.

`handle.method.remote(...)` must return an ordinary Ray ObjectRef, so the result comes back as
the result of a Ray task of the local LatticaActor. Without pipelining the remote call starts
only when that task arrives: the cross-cluster call costs one local Ray call *plus* the remote
work. With it, the caller first writes the request (a call ID of its own choosing, the actor,
method and arguments) to the LatticaActor's pipe, an abstract Unix socket, and then submits
the Ray task `await_result(call_id)`, whose ObjectRef it returns: the remote call runs while
Ray is still delivering the task, and the call costs about the larger of the two.

Both halves may arrive first: `PendingCalls` pairs them up. A request whose result nobody
claims (the caller died, or its task was cancelled before it started) is cancelled and dropped
after `claim_timeout`; at most `max_unclaimed` such calls are held, and a claim that waits for
a request that never came gives up after `arrival_timeout`. Every limit is a `LatticaConfig`
field. Only processes of our own user may write to the pipe (SO_PEERCRED), and requests are
codec data, never pickles.

Wire (client to LatticaActor only; nothing is sent back): the frames of `direct_call`, each a
dict ``{"call": id, "actor": record, "method", "timeout", "args", "kwargs"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from lattica_ray.ray.direct_call import (
    FRAME_LENGTH,
    _frame_length,
    _same_user,
    decode_frame,
    encode_frame,
)
from lattica_ray.ray.errors import CallLimitExceeded, CallLost

logger = logging.getLogger(__name__)

CallStarter = Callable[[dict[str, Any]], Coroutine[Any, Any, Any]]


@dataclass
class PipelineStats:
    """What the pipe has seen (shown in the LatticaActor's `info()`)."""

    arrived: int = 0  # requests read from the pipe
    claimed: int = 0  # results handed to an await_result task
    dropped: int = 0  # started calls nobody claimed within claim_timeout (cancelled)
    refused: int = 0  # requests refused: max_unclaimed calls were waiting for their claim
    lost: int = 0  # claims whose request never arrived within arrival_timeout


@dataclass
class _Call:
    """One pipelined call as `PendingCalls` knows it."""

    task: asyncio.Task[Any] | None = None  # None until the request arrived
    arrived_at: float = 0.0
    outcome: tuple[Any, BaseException | None] | None = None  # (result, error) once it ended
    # on the claimer's loop: set when the request arrives (claims that came first), and when
    # the task is done
    arrival: asyncio.Future[None] | None = None
    claim: asyncio.Future[None] | None = None


class PendingCalls:
    """Pairs requests read from the pipe with the `await_result` tasks that claim them.

    `arrive` (on the Node's loop) starts the call at once; `claim` (on any loop: Ray's, in the
    LatticaActor) waits for its result, and for the request if the claim came first. A result
    ready when its claim comes is returned without a thread hand-off; one that comes later is
    handed to the claimer's loop directly. Cancelling a claim cancels its call.
    """

    def __init__(
        self,
        max_unclaimed: int = 10_000,
        claim_timeout: float = 60.0,
        arrival_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_unclaimed = max_unclaimed
        self.claim_timeout = claim_timeout
        self.arrival_timeout = arrival_timeout
        self.clock = clock
        self.stats = PipelineStats()
        self._lock = threading.Lock()  # claims come from other threads than arrivals
        # call ID -> call: arrived and not claimed (oldest first), or claimed and not arrived
        self._unclaimed: OrderedDict[str, _Call] = OrderedDict()
        self._claimed: dict[str, _Call] = {}
        # call IDs that will never get a result, with the error their claim gets (bounded)
        self._failed: OrderedDict[str, Exception] = OrderedDict()

    @property
    def unclaimed(self) -> int:
        return len(self._unclaimed)

    def arrive(self, call_id: str, start: Callable[[], Awaitable[Any]]) -> None:
        """A request came in (on the loop the calls run on): run `start()` now."""
        self.expire()
        with self._lock:
            self.stats.arrived += 1
            call = self._claimed.pop(call_id, None)
            if call is None:
                if self._failed.pop(call_id, None) is not None:
                    logger.debug("pipelined call %r was given up before it came", call_id)
                    return
                if call_id in self._unclaimed:
                    logger.warning("ignoring a pipelined request that reuses ID %r", call_id)
                    return
                if len(self._unclaimed) >= self.max_unclaimed:
                    self.stats.refused += 1
                    self._fail(
                        call_id,
                        CallLimitExceeded(
                            f"{self.max_unclaimed} pipelined calls were already waiting for "
                            "their results to be collected on this machine "
                            "(LatticaConfig.pipeline_max_unclaimed); the call was not made"
                        ),
                    )
                    return
                call = self._unclaimed[call_id] = _Call(arrived_at=self.clock())
            call.task = task = asyncio.ensure_future(self._run(call, start))
            arrival = call.arrival
        # A task cancelled before its first step never runs `_run`: its claim must end too.
        task.add_done_callback(lambda _: self._finished(call, (None, asyncio.CancelledError())))
        if arrival is not None:
            _wake(arrival)

    async def _run(self, call: _Call, start: Callable[[], Awaitable[Any]]) -> None:
        """Run the call and hand its outcome over as soon as it is there (not one loop turn
        later, from a done callback)."""
        try:
            outcome: tuple[Any, BaseException | None] = (await start(), None)
        except asyncio.CancelledError as exc:
            self._finished(call, (None, exc))
            raise
        except Exception as exc:
            outcome = (None, exc)
        self._finished(call, outcome)

    def _finished(self, call: _Call, outcome: tuple[Any, BaseException | None]) -> None:
        """Hand `outcome` to the claim (the first outcome of a call counts)."""
        with self._lock:
            if call.outcome is not None:
                return
            call.outcome = outcome
            claim = call.claim
        if claim is not None:
            _wake(claim)

    def fail(self, call_id: str, error: Exception) -> None:
        """A request that cannot run (malformed): its claim gets `error`."""
        with self._lock:
            call = self._claimed.pop(call_id, None)
            self._fail(call_id, error)
        if call is not None and call.arrival is not None:
            _wake(call.arrival)

    async def claim(self, call_id: str) -> Any:
        """The result of call `call_id` (its error raised), once its request has arrived."""
        loop = asyncio.get_running_loop()
        with self._lock:
            call = self._unclaimed.pop(call_id, None)
            if call is None:
                failed = self._failed.pop(call_id, None)
                if failed is not None:
                    raise failed
                if call_id in self._claimed:
                    raise CallLost(f"pipelined call {call_id!r} is claimed twice")
                call = self._claimed[call_id] = _Call(arrival=loop.create_future())
            done = call.claim = loop.create_future()
            self.stats.claimed += 1
            task, outcome = call.task, call.outcome
        if outcome is not None:
            return _unwrap(outcome)  # no hand-off at all
        try:
            if task is None:
                await self._arrival(call_id, call)
                with self._lock:
                    if call.task is None:  # its request was malformed
                        raise self._failed.pop(call_id, CallLost(f"call {call_id!r} failed"))
            await done
            assert call.outcome is not None
            return _unwrap(call.outcome)
        except asyncio.CancelledError:
            with self._lock:
                task = call.task
                if task is None:  # not arrived: it must not run when it does
                    self._claimed.pop(call_id, None)
                    self._fail(call_id, CallLost(f"pipelined call {call_id!r} was cancelled"))
            if task is not None and not task.done():
                task.get_loop().call_soon_threadsafe(task.cancel)
            raise

    async def _arrival(self, call_id: str, call: _Call) -> None:
        """Wait for the request of `call`, at most `arrival_timeout`."""
        assert call.arrival is not None
        try:
            await asyncio.wait_for(asyncio.shield(call.arrival), self.arrival_timeout)
        except TimeoutError:
            with self._lock:
                if call.task is not None or call_id not in self._claimed:
                    return  # it came (or failed) just now
                del self._claimed[call_id]
                self.stats.lost += 1
                error = CallLost(
                    f"the request of pipelined call {call_id!r} did not reach this machine's "
                    f"LatticaActor within {self.arrival_timeout} s "
                    "(LatticaConfig.pipeline_arrival_timeout): the call was not made"
                )
                self._fail(call_id, error)  # should it come after all, it is not run
            raise error from None

    def expire(self) -> None:
        """Cancel and drop the calls left unclaimed longer than `claim_timeout`."""
        deadline = self.clock() - self.claim_timeout
        dropped = []
        with self._lock:
            while self._unclaimed:
                call_id, call = next(iter(self._unclaimed.items()))
                if call.arrived_at > deadline:
                    break
                del self._unclaimed[call_id]
                dropped.append(call)
                self.stats.dropped += 1
                self._fail(
                    call_id,
                    CallLost(
                        f"pipelined call {call_id!r} was not collected within "
                        f"{self.claim_timeout} s (LatticaConfig.pipeline_claim_timeout) "
                        "and was dropped"
                    ),
                )
        for call in dropped:
            assert call.task is not None
            call.task.cancel()

    def cancel_all(self) -> None:
        with self._lock:
            unclaimed, claimed = list(self._unclaimed.values()), list(self._claimed.items())
            self._unclaimed.clear()
            self._claimed.clear()
            for call_id, _ in claimed:
                self._fail(call_id, CallLost("the LatticaActor is stopping"))
        for call in unclaimed:
            if call.task is not None:
                call.task.cancel()
        for _, call in claimed:
            if call.arrival is not None:
                _wake(call.arrival)

    def _fail(self, call_id: str, error: Exception) -> None:
        self._failed[call_id] = error
        while len(self._failed) > self.max_unclaimed:
            self._failed.popitem(last=False)


def _unwrap(outcome: tuple[Any, BaseException | None]) -> Any:
    value, error = outcome
    if error is not None:
        raise error
    return value


def _wake(waiter: asyncio.Future[None]) -> None:
    """Resolve `waiter` on its own loop (from any thread)."""

    def resolve() -> None:
        if not waiter.done():
            waiter.set_result(None)

    with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits any more
        waiter.get_loop().call_soon_threadsafe(resolve)


class PipeServer:
    """The LatticaActor's pipe: reads requests from local processes into `PendingCalls`.

    Runs on the Node's loop; `start_call(request)` is the coroutine of one call (a `dict` with
    "actor", "method", "timeout", "args", "kwargs" as the client sent them). Frames are parsed
    as they come in (a protocol, not a stream reader: no task or await per request).
    """

    def __init__(
        self,
        calls: PendingCalls,
        start_call: CallStarter,
        max_frame_bytes: int,
    ) -> None:
        self.calls = calls
        self.start_call = start_call
        self.max_frame_bytes = max_frame_bytes
        self.address = "\0lattica-ray-pipe-" + secrets.token_hex(8)
        self._server: asyncio.AbstractServer | None = None
        self._expiry: asyncio.Task[None] | None = None
        self._connections: set[asyncio.BaseTransport] = set()

    async def start(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.address)  # ourselves: uvloop cannot bind abstract addresses
            listener.listen()
            listener.setblocking(False)
            loop = asyncio.get_running_loop()
            self._server = await loop.create_unix_server(
                lambda: _PipeConnection(self), sock=listener
            )
        except BaseException:
            listener.close()
            raise
        self._expiry = asyncio.get_running_loop().create_task(self._expire())

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._expiry is not None:
            self._expiry.cancel()
        for transport in list(self._connections):
            transport.close()
        self.calls.cancel_all()

    async def _expire(self) -> None:
        interval = min(1.0, self.calls.claim_timeout / 2)
        while True:
            await asyncio.sleep(interval)
            self.calls.expire()

    def _receive(self, request: dict[str, Any]) -> None:
        call_id = request.get("call")
        if not isinstance(call_id, str) or not call_id:
            logger.warning("a pipelined request without a call ID was ignored")
            return
        self.calls.arrive(call_id, lambda: self.start_call(request))


class _PipeConnection(asyncio.Protocol):
    """One local process's connection to the pipe: frames in, calls started."""

    def __init__(self, server: PipeServer) -> None:
        self.server = server
        self.transport: asyncio.BaseTransport | None = None
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is None or not _same_user(sock):
            transport.close()
            return
        self.transport = transport
        self.server._connections.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        # a frame cut short by the caller's end was never claimed: nothing to undo
        if self.transport is not None:
            self.server._connections.discard(self.transport)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return
        buffer = self.buffer
        buffer += data
        header = FRAME_LENGTH.size
        while len(buffer) >= header:
            try:
                end = header + _frame_length(bytes(buffer[:header]), self.server.max_frame_bytes)
                if len(buffer) < end:
                    return
                request = decode_frame(bytes(buffer[header:end]))
            except Exception as exc:
                logger.warning("closing a pipe connection: %s", exc)
                self.transport.close()
                self.transport = None
                return
            del buffer[:end]
            self.server._receive(request)


@dataclass(frozen=True)
class PipeEndpoint:
    """Where a LatticaActor's pipe is: its abstract address, and the LatticaActor's
    incarnation (a restarted one has another, so a claim reaching it knows at once that its
    request went to the one before)."""

    address: str
    incarnation: str
    node_id: str


class PipeClient:
    """A process's connection to its node's LatticaActor pipe (thread-safe, blocking sends)."""

    def __init__(self, endpoint: PipeEndpoint, send_timeout: float = 10.0) -> None:
        self.endpoint = endpoint
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(send_timeout)
        try:
            self._sock.connect(endpoint.address)
        except OSError:
            self._sock.close()
            raise
        self._lock = threading.Lock()
        self._prefix = secrets.token_hex(8)
        self._next = 0
        self.closed = False

    def send(self, request: dict[str, Any]) -> str | None:
        """Write `request` under a new call ID and return the ID; None (and the connection is
        closed) if it could not be written whole: the call was not made."""
        with self._lock:
            if self.closed:
                return None
            self._next += 1
            call_id = f"{self._prefix}-{self._next}"
            frame = b"".join(encode_frame({"call": call_id, **request}))
            try:
                self._sock.sendall(frame)
            except OSError as exc:  # the LatticaActor is gone, or not reading
                logger.info("pipelined calls unavailable (calls go through Ray): %s", exc)
                self.close()
                return None
            return call_id

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self._sock.close()
