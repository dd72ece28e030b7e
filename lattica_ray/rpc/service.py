"""The RPC service: a registry of methods served on `/lattica-ray/rpc/1`, and calls to peers.

asyncio glue around `protocol.ClientCall` / `protocol.ServerCall`. Every call is its own stream,
served by its own task (plain `def` handlers in a thread pool), so a slow handler never stalls
the node or other calls.

A small call takes a short way on both sides: the caller sends its whole request in one piece
and its deadline shares one timer with the other calls in flight; the server, when the whole
request came in the first read, runs an async unary handler at once and answers with response,
status and FIN in one piece, and sets up what a call that waits needs (its place under the
limits, deadline timer, watch for the caller's reset) only if the handler waits.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import heapq
import itertools
import logging
import math
import operator
import threading
import time
import traceback
import types
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    Iterator,
    Mapping,
    Sequence,
)
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from lattica_ray.rpc.config import RpcConfig
from lattica_ray.rpc.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    PeerUnavailable,
    ProtocolError,
    ResourceExhausted,
    RpcError,
    StatusCode,
)
from lattica_ray.rpc.protocol import (
    END,
    PROTOCOL_ID,
    STATUS_OK,
    Buffer,
    CallKind,
    Cancel,
    ClientCall,
    End,
    Event,
    Header,
    Message,
    ReceiveBuffer,
    ServerCall,
    Status,
)
from lattica_ray.rpc.registry import CallContext, Method, bind_call, make_method
from transport.errors import ProtocolNotSupported, StreamError, StreamReset, TransportError
from transport.host import Host
from transport.identity import PeerId
from transport.stream import Stream

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
# [expiry, order in the heap, the call (None once it ended)]: see `_Deadlines`
_DeadlineEntry = list[Any]
_expiry = operator.itemgetter(0)
STOP_GRACE = 1.0  # seconds `stop()` lets cancelled handlers take to send their status
HOLD_BELOW = 16 * 1024  # a last response this small leaves with the status and FIN, unwaited


class Codec(Protocol):
    """What the service needs from `lattica_ray.rpc.codec`."""

    def encode(self, obj: object) -> list[memoryview]: ...

    def decode(self, message: bytes | bytearray | memoryview, limits: Any = None) -> object: ...


def _default_codec() -> Codec:
    from lattica_ray.rpc import codec  # the Arrow codec; imported late so a stand-in can be used

    return codec  # type: ignore[return-value]


# -- small building blocks --------------------------------------------------------------------
class _Closed(Exception):
    """A channel ended normally."""


class _Channel:
    """A bounded single-producer, single-consumer queue that can end or fail."""

    def __init__(self, maxsize: int) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._maxsize = maxsize
        self._closed = False
        self._error: BaseException | None = None
        self._error_first = False  # raise the error before the items still queued
        self._getter: asyncio.Future[None] | None = None
        self._putter: asyncio.Future[None] | None = None

    @staticmethod
    def _wake(waiter: asyncio.Future[None] | None) -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def put(self, item: Any) -> None:
        while len(self._items) >= self._maxsize and not self._closed:
            self._putter = asyncio.get_running_loop().create_future()
            await self._putter
        if not self._closed:
            self.put_nowait(item)

    def put_nowait(self, item: Any) -> None:
        if not self._closed:
            self._items.append(item)
            self._wake(self._getter)

    def close(self, error: BaseException | None = None, *, drop_items: bool = True) -> None:
        """End the channel; with `error`, `get` raises it (after the queued items unless
        `drop_items`)."""
        if not self._closed:
            self._closed = True
            self._error = error
            self._error_first = drop_items
        self._wake(self._getter)
        self._wake(self._putter)

    async def get(self) -> Any:
        """The next item; `_Closed` at the end; the error the channel failed with."""
        while True:
            if self._error is not None and (self._error_first or not self._items):
                raise self._error
            if self._items:
                item = self._items.popleft()
                self._wake(self._putter)
                return item
            if self._closed:
                raise _Closed
            self._getter = asyncio.get_running_loop().create_future()
            await self._getter


class _Deadlines:
    """One timer for the deadlines of all unary calls in flight, armed for the earliest: a
    timer per call (`asyncio.timeout_at`) costs a small call several microseconds, and calls
    usually end long before their deadline. When it fires it expires the calls past theirs
    and re-arms for the next.

    The calls wait in a heap by expiry, so an expiry costs O(log n) however many calls are
    in flight. A new call is only noted (most end long before their deadline); the notes go
    into the heap when the timer fires (those already due are expired at once, with the
    heap's), or when they outnumber the calls in flight; those of calls that ended are
    dropped then. An ended call leaves its entry empty (the
    entry keeps none of its buffers); the heap drops such entries when they reach the top,
    or when they are most of it (it is rebuilt without them).
    """

    def __init__(self, calls: set[_OutboundCall]) -> None:
        self._calls = calls  # the service's calls in flight (bounds the ended ones kept)
        self._new: list[_DeadlineEntry] = []  # watched, not yet in the heap
        self._heap: list[_DeadlineEntry] = []
        self._order = itertools.count()  # equal expiries: the first taken expires first
        self._timer: asyncio.TimerHandle | None = None
        self._at = math.inf

    def watch(self, call: _OutboundCall) -> None:
        """Expire `call` (it has an expiry and a task) at its expiry, unless it ends first
        (`_OutboundCall.end` empties its entry)."""
        expiry = call.expiry
        assert expiry is not None
        call.deadline_entry = entry = [expiry, 0, call]
        new = self._new
        new.append(entry)
        if expiry < self._at:
            self._arm(expiry)
        if len(new) > len(self._calls) + 64:
            self._take_new()

    def _take_new(self, now: float = -math.inf) -> list[_DeadlineEntry]:
        """Move the noted calls still in flight into the heap (O(1) per call that ended,
        O(log n) per call that did not), but those due by `now`: returned, in the order
        watched. Rebuild the heap without ended calls when they are most of it (amortized
        O(1) per call)."""
        heap, order, due = self._heap, self._order, []
        for entry in self._new:
            if entry[2] is not None:
                if entry[0] <= now:
                    due.append(entry)
                else:
                    entry[1] = next(order)
                    heapq.heappush(heap, entry)
        self._new = []
        if len(heap) > 2 * len(self._calls) + 64:
            self._heap = [entry for entry in heap if entry[2] is not None]
            heapq.heapify(self._heap)
        return due

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._at = at
        self._timer = asyncio.get_running_loop().call_at(at, self._fire)

    def _fire(self) -> None:
        self._timer, self._at = None, math.inf
        now = asyncio.get_running_loop().time()
        heap = self._heap
        due = []  # (the heap's first: watched before any call still noted)
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            if entry[2] is not None:
                due.append(entry)
        if self._new:
            due += self._take_new(now)
            heap = self._heap  # (maybe rebuilt)
        due.sort(key=_expiry)  # stable: equal expiries in the order watched
        for entry in due:
            call = entry[2]
            if call is not None:
                call.expire()
        while heap and heap[0][2] is None:
            heapq.heappop(heap)
        if heap:
            self._arm(heap[0][0])

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._at = None, math.inf
        self._new, self._heap = [], []


class _FrameWriter:
    """Writes frames to a stream: small pieces joined, large buffers one by one, never copied."""

    def __init__(self, stream: Stream, coalesce_below: int) -> None:
        self.stream = stream
        self.coalesce_below = coalesce_below
        self.mid_frame = False  # a write was interrupted: only a reset can end the stream now

    async def write(self, chunks: Sequence[Buffer]) -> None:
        self.mid_frame = True
        small: list[Buffer] = []
        small_size = 0
        for chunk in chunks:
            size = memoryview(chunk).nbytes
            if size >= self.coalesce_below:
                if small:
                    await self.stream.write(b"".join(small))
                    small, small_size = [], 0
                await self.stream.write(_byte_view(chunk))
            elif size:
                small.append(chunk)
                small_size += size
        if small:
            await self.stream.write(b"".join(small) if len(small) > 1 else _byte_view(small[0]))
        self.mid_frame = False


def run_eagerly(coro: Coroutine[Any, Any, T]) -> tuple[bool, Any]:
    """Run `coro` in the calling task until it first suspends: (True, its result) if it never
    did, else (False, an awaitable that goes on from there). For steps that rarely wait (a
    small write), so the timer or task they would need when waiting is only made then."""
    try:
        suspended_on = coro.send(None)
    except StopIteration as stop:
        return True, stop.value
    return False, _resume(coro, suspended_on)


@types.coroutine
def _resume(coro: Coroutine[Any, Any, T], suspended_on: Any) -> Generator[Any, Any, T]:
    """Drive `coro` on from a suspension it yielded outside a task (`run_eagerly`): what the
    task sends or throws (a cancellation) goes to `coro`, what `coro` yields to the task."""
    while True:
        try:
            sent = yield suspended_on
        except BaseException as exc:
            try:
                suspended_on = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                suspended_on = coro.send(sent)
            except StopIteration as stop:
                return stop.value


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a background task's outcome as seen (it is reported another way)."""
    if not task.cancelled():
        task.exception()


def _size(buffers: Sequence[Buffer]) -> int:
    size = 0
    for buffer in buffers:
        size += len(buffer) if type(buffer) is bytes else memoryview(buffer).nbytes
    return size


def _byte_view(buffer: Buffer) -> memoryview:
    view = memoryview(buffer)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _encode_arguments(codec: Codec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    # (`*args` and `**kwargs` of our own signatures: already a fresh tuple and dict)
    return codec.encode((args, kwargs))


def _decode_arguments(
    decode: Callable[[ReceiveBuffer], object], payload: ReceiveBuffer
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    try:
        decoded = decode(payload)
    except ValueError as exc:  # CodecError; anything else is a bug and travels as one
        raise InvalidArgument(f"could not decode the call's arguments: {exc}") from exc
    if type(decoded) is tuple and len(decoded) == 2:  # what every caller of ours sends
        args, kwargs = decoded
        if type(args) is tuple and type(kwargs) is dict and not kwargs:
            return decoded  # type: ignore[return-value]
    if (
        not isinstance(decoded, (list, tuple))
        or len(decoded) != 2
        or not isinstance(decoded[0], (list, tuple))
        or not isinstance(decoded[1], dict)
        or not all(isinstance(key, str) for key in decoded[1])
    ):
        raise InvalidArgument("the arguments message is not (args, kwargs)")
    return tuple(decoded[0]), decoded[1]


def _error_status(exc: BaseException) -> Status:
    """How a handler's exception travels: its type, message and traceback as text."""
    code = exc.code if isinstance(exc, RpcError) else StatusCode.UNKNOWN
    message = exc.message if isinstance(exc, RpcError) else str(exc)
    kind = type(exc)
    module = kind.__module__
    error_type = kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"
    return Status(
        code,
        message or kind.__name__,
        error_type,
        "".join(traceback.format_exception(exc)),
    )


# -- server side ------------------------------------------------------------------------------
def _handler_cancelled(method: Method, peer: PeerId | None) -> Status:
    """The status of a handler that raised CancelledError itself (no one cancelled it): a
    clear CANCELLED, not a stream reset that the caller would take for a lost path (and send
    an idempotent call again)."""
    logger.info("rpc %s from %s: the handler raised CancelledError", method.name, peer)
    return Status(StatusCode.CANCELLED, "the handler was cancelled on the server")


def _peer_key(peer: PeerId | None) -> bytes | None:
    return None if peer is None else peer.multihash


def _whole(pending: collections.deque[Event]) -> bool:
    """The events after a header are the arguments and END: the request came whole."""
    return len(pending) == 2 and type(pending[1]) is End and type(pending[0]) is Message


def _call_context(peer: PeerId, method: Method, header: Header) -> CallContext:
    deadline = None if header.timeout is None else time.monotonic() + header.timeout
    # (a decoded header with metadata has a dict of its own: no copy needed; one without may
    # be shared by calls, and its handler gets a fresh empty dict)
    return CallContext(peer, method.name, header.metadata or {}, deadline)


def _frame_response(
    service: RpcService, proto: ServerCall, method: Method, item: object
) -> list[Buffer]:
    try:
        buffers = service.codec.encode(item)
    except ValueError as exc:
        raise ValueError(f"could not encode the response of {method.name!r}: {exc}") from exc
    return proto.send_message(buffers)


async def _answer_unary(
    service: RpcService, proto: ServerCall, method: Method, context: CallContext, payload: Any
) -> list[Buffer]:
    """Run an async unary handler on its arguments; its response as frames."""
    bind_call(context)
    args, kwargs = _decode_arguments(service.decode, payload)
    return _frame_response(service, proto, method, await method.handler(*args, **kwargs))


async def _deliver(
    service: RpcService,
    stream: Stream,
    proto: ServerCall,
    context: CallContext,
    response: list[Buffer] | None,
    status: Status,
) -> None:
    """Send a call's outcome (its response, if any, and status), then close our side."""
    response = response or []
    size = _size(response)
    try:
        # The response takes as long as the path needs (bounded by the call's own deadline,
        # if it has one); only the status after it is held to `status_timeout`.
        if size >= service.config.coalesce_below:
            remaining = context.deadline
            async with asyncio.timeout(
                None if remaining is None else max(0.0, remaining - time.monotonic())
            ):
                await _FrameWriter(stream, service.config.coalesce_below).write(response)
            response, size = [], 0
        if stream.holds_unsent and size < HOLD_BELOW:
            # The (small) response, status and FIN in one piece: one STREAM frame on QUIC,
            # which sends what `hold` kept with the FIN (and waits for no window).
            stream.hold(b"".join([*response, proto.send_status(status)]))
            done, rest = run_eagerly(stream.close())
        else:
            done, rest = run_eagerly(_write_status(service, stream, proto, response, status))
        if not done:  # usually the transport takes it at once: no timer armed for it then
            async with asyncio.timeout(service.config.status_timeout):
                await rest
    except (TimeoutError, TransportError, ConnectionError) as exc:
        logger.debug("rpc %s: status to %s not delivered: %r", context.method, context.peer, exc)
        stream.reset("status not delivered")


async def _write_status(
    service: RpcService, stream: Stream, proto: ServerCall, response: list[Buffer], status: Status
) -> None:
    """The last (small) response and the status, then our FIN."""
    await _FrameWriter(stream, service.config.coalesce_below).write(
        [*response, proto.send_status(status)]
    )
    await stream.close()


class _InboundCall:
    """One call being served: reads the requests, runs the handler, writes replies and status."""

    # Until set otherwise (class defaults: a small call sets none of them, nor pays for them)
    _writer: _FrameWriter | None = None
    requests: _Channel | None = None  # client-streaming calls' requests
    arguments: asyncio.Future[ReceiveBuffer] | None = None  # still to come
    # The task running the handler: its own, or (inline) the one serving the stream.
    handler_task: asyncio.Task[Any] | None = None
    handler_done = False
    _cancel_requested = False  # we cancelled handler_task and have not seen it land
    reader: asyncio.Task[None] | None = None
    cause: Status | None = None  # why the handler was cancelled, as the status to send
    reset_by_caller = False

    def __init__(
        self,
        service: RpcService,
        stream: Stream,
        proto: ServerCall,
        pending: collections.deque[Event],
        method: Method,
        header: Header,
        context: CallContext | None = None,
    ) -> None:
        self.service = service
        self.stream = stream
        self.proto = proto
        self.pending = pending  # events already parsed along with the header
        self.method = method
        self.header = header
        self.peer = stream.remote_peer
        assert self.peer is not None
        self.context = context or _call_context(self.peer, method, header)

    @property
    def writer(self) -> _FrameWriter:
        if self._writer is None:
            self._writer = _FrameWriter(self.stream, self.service.config.coalesce_below)
        return self._writer

    # -- lifecycle ----------------------------------------------------------------------
    def request_complete(self) -> bool:
        """True when the arguments and END came with the header (a small unary call)."""
        return _whole(self.pending) and not self.method.kind.client_streams

    async def run_inline(
        self, task: asyncio.Task[Any], started: Awaitable[list[Buffer] | None] | None = None
    ) -> None:
        """Run the handler in this task (`task`): the whole request is here, so nothing needs
        reading (`request_complete`), else `run_beside_reader`. `started`: the handler, run
        until it first waited (`RpcService._answer_whole`), to go on with.

        The reply then leaves in the same loop iteration as the protocol confirmation (one
        packet, no task switches). Whatever arrives meanwhile (a reset, CANCEL) wakes a reader.
        """
        if started is None:
            message = self.pending.popleft()
            self.pending.clear()  # END
            assert isinstance(message, Message)
        self.handler_task = task
        timer = None
        response: list[Buffer] | None = None
        error: BaseException | None = None
        cancelled = watching = False
        try:
            try:
                # A handler that answers without waiting needs no deadline timer and no watch
                # on the stream: nothing can interrupt it. Both are set up if it waits.
                if started is None:
                    done, rest = run_eagerly(self._invoke(message.payload))
                else:
                    done, rest = False, started
                if done:
                    response = rest
                else:
                    if self.context.deadline is not None:
                        remaining = max(0.0, self.context.deadline - time.monotonic())
                        timer = asyncio.get_running_loop().call_later(remaining, self._on_deadline)
                    self.stream.watch(self._on_arrival)
                    watching = True
                    response = await rest
            except asyncio.CancelledError:
                if self._cancel_requested:
                    if task.uncancel():  # not only ours: stopping
                        raise
                    self._cancel_requested = False
                elif task.cancelling():  # the service or the node is stopping
                    raise
                # (else the handler raised it itself: the caller is told, as of any handler)
                cancelled = True
            except Exception as exc:  # the handler failed: the caller is told how
                error = exc
            finally:
                self.handler_done = True
                if timer is not None:
                    timer.cancel()
            if self._cancel_requested:  # the handler swallowed our cancellation
                task.uncancel()
            await self._finish(response, error, cancelled)
        finally:
            if watching:
                self.stream.watch(None)
            if self.reader is not None:
                self.reader.cancel()
                await asyncio.wait([self.reader])

    def _on_arrival(self) -> None:
        """Bytes, an end or a reset arrived while the handler runs inline: read them."""
        self.stream.watch(None)
        if self.reader is None:
            self.reader = asyncio.get_running_loop().create_task(
                self._read_requests(), name=f"rpc {self.method.name} reader"
            )

    async def run_beside_reader(self) -> None:
        """Run the handler as its own task while this one reads the caller's messages."""
        loop = asyncio.get_running_loop()
        if self.method.kind.client_streams:
            self.requests = _Channel(self.service.config.stream_buffer_messages)
        self.arguments = loop.create_future()
        if self.pending and isinstance(self.pending[0], Message):  # came with the header
            self.arguments.set_result(self.pending.popleft().payload)
        handler = loop.create_task(self._invoke_when_ready(), name=f"rpc {self.method.name}")
        self.handler_task = handler
        self.reader = loop.create_task(self._read_requests(), name=f"rpc {self.method.name} reader")
        timer = None
        if self.header.timeout is not None:
            timer = loop.call_later(self.header.timeout, self._on_deadline)
        try:
            try:
                await asyncio.wait([handler])
            except asyncio.CancelledError:  # the service or the node is stopping
                self.cancel(Status(StatusCode.UNAVAILABLE, "the server is stopping"))
                await asyncio.wait([handler])
                raise
            finally:
                self.handler_done = True
                if timer is not None:
                    timer.cancel()
            cancelled = handler.cancelled()
            error = None if cancelled else handler.exception()  # always retrieved, never "lost"
            response = None if cancelled or error is not None else handler.result()
            await self._finish(response, error, cancelled)  # the reader still watches for resets
        finally:
            if not handler.done():  # cancelled twice while stopping
                handler.cancel()
            self.reader.cancel()
            await asyncio.wait([self.reader])

    def cancel(self, status: Status, reset: bool = False) -> None:
        """Stop the handler; `status` is what the caller will be told."""
        if self.cause is None:
            self.cause = status
            self.reset_by_caller = reset
        self.context.cancel()
        if self.requests is not None:
            self.requests.close(Cancelled(status.message, method=self.method.name, peer=self.peer))
        if self.handler_task is not None and not self.handler_done:
            self._cancel_requested = True
            self.handler_task.cancel()

    def _on_deadline(self) -> None:
        timeout = self.header.timeout or 0.0
        self.cancel(
            Status(
                StatusCode.DEADLINE_EXCEEDED,
                f"deadline of {timeout:.3f} s exceeded on the server; the handler was cancelled",
            )
        )

    async def _finish(
        self, response: list[Buffer] | None, error: BaseException | None, cancelled: bool
    ) -> None:
        """Send the outcome (response and status), then close our side."""
        if self.cause is not None:
            status = self.cause
            response = None
        elif cancelled:  # not by us: the handler raised CancelledError itself
            status = _handler_cancelled(self.method, self.peer)
        elif error is not None:
            status = _error_status(error)
            if status.code == StatusCode.UNKNOWN:
                logger.info("rpc %s from %s raised %r", self.method.name, self.peer, error)
        else:
            status = STATUS_OK
        self.service._release(self)  # before the status: the caller may call again at once
        if self.reset_by_caller or (self._writer is not None and self._writer.mid_frame):
            self.stream.reset("rpc call aborted")
            return
        await _deliver(self.service, self.stream, self.proto, self.context, response, status)

    # -- reading ------------------------------------------------------------------------
    async def _read_requests(self) -> None:
        try:
            while True:
                event = await self.service._next_server_event(self)
                if event is None:  # EOF after END
                    return
                if isinstance(event, Message):
                    if self.arguments is not None and not self.arguments.done():
                        self.arguments.set_result(event.payload)
                    elif self.requests is not None:  # (ServerCall lets no other call send more)
                        await self.requests.put(event.payload)
                elif isinstance(event, End):
                    if self.requests is not None:
                        self.requests.close()
                elif isinstance(event, Cancel):
                    self.cancel(Status(StatusCode.CANCELLED, event.reason))
                    return
        except RpcError as exc:  # oversized or malformed request
            self.cancel(Status(exc.code, exc.message))
        except (StreamError, TransportError, ConnectionError, EOFError) as exc:
            self.cancel(Status(StatusCode.CANCELLED, f"stream lost: {exc}"), reset=True)

    # -- running the handler ------------------------------------------------------------
    async def _invoke_when_ready(self) -> list[Buffer] | None:
        assert self.arguments is not None
        return await self._invoke(await self.arguments)

    async def _invoke(self, arguments: ReceiveBuffer) -> list[Buffer] | None:
        bind_call(self.context)
        args, kwargs = _decode_arguments(self.service.decode, arguments)
        method = self.method
        if method.kind.client_streams:
            assert method.requests_param is not None and self.requests is not None
            requests: Any = _RequestIterator(self.requests, self.service.decode)
            if not method.is_async:
                requests = _SyncRequestIterator(requests, asyncio.get_running_loop())
            if method.requests_positional:
                args = (requests, *args)
            else:
                kwargs[method.requests_param] = requests
        if method.kind.server_streams:
            if method.is_async:
                await self._stream_async(method.handler(*args, **kwargs))
            else:
                await self._stream_sync(functools.partial(method.handler, *args, **kwargs))
            return None
        if method.is_async:
            result = await method.handler(*args, **kwargs)
        else:
            result = await self.service._run_in_thread(method.handler, *args, **kwargs)
        return self._frame(result)

    def _frame(self, item: object) -> list[Buffer]:
        return _frame_response(self.service, self.proto, self.method, item)

    async def _stream_async(self, responses: AsyncIterator[object]) -> None:
        try:
            async for item in responses:
                await self.writer.write(self._frame(item))
        finally:
            await responses.aclose()  # type: ignore[attr-defined]

    async def _stream_sync(self, make_generator: Callable[[], Iterator[object]]) -> None:
        """Run a plain generator in the pool, handing items over with bounded buffering."""
        loop = asyncio.get_running_loop()
        window = self.service.config.stream_buffer_messages
        items = _Channel(window)
        credit = threading.Semaphore(window)  # items the thread may produce ahead of the writer
        stop = threading.Event()  # the writer gave up (cancelled, or the stream broke)
        cancelled = self.context.cancelled

        def hand_over(callback: Callable[..., None], *args: Any) -> None:
            try:
                loop.call_soon_threadsafe(callback, *args)
            except RuntimeError:  # the loop is gone: nobody is listening any more
                stop.set()

        def produce() -> None:
            generator = make_generator()
            try:
                for item in generator:
                    credit.acquire()
                    if stop.is_set() or cancelled.is_set():
                        break
                    hand_over(items.put_nowait, item)
            except BaseException as exc:
                hand_over(functools.partial(items.close, exc, drop_items=False))
            else:
                hand_over(items.close)
            finally:
                generator.close()  # type: ignore[attr-defined]

        self.service._submit(produce)
        try:
            while True:
                try:
                    item = await items.get()
                except _Closed:
                    return
                credit.release()
                await self.writer.write(self._frame(item))
        finally:
            stop.set()
            credit.release()  # wake the thread if it waits for credit, so it sees `stop`


class _RequestIterator:
    """The requests of a client-streaming call, decoded one by one as the handler asks."""

    def __init__(self, channel: _Channel, decode: Callable[[ReceiveBuffer], object]) -> None:
        self._channel = channel
        self._decode = decode

    def __aiter__(self) -> _RequestIterator:
        return self

    async def __anext__(self) -> object:
        try:
            payload = await self._channel.get()
        except _Closed:
            raise StopAsyncIteration from None
        try:
            return self._decode(payload)
        except ValueError as exc:
            raise InvalidArgument(f"could not decode a request message: {exc}") from exc


class _SyncRequestIterator:
    """The same requests for a plain `def` handler running in the thread pool."""

    def __init__(self, requests: _RequestIterator, loop: asyncio.AbstractEventLoop) -> None:
        self._requests = requests
        self._loop = loop

    def __iter__(self) -> _SyncRequestIterator:
        return self

    def __next__(self) -> object:
        future = asyncio.run_coroutine_threadsafe(self._requests.__anext__(), self._loop)
        try:
            return future.result()
        except StopAsyncIteration:
            raise StopIteration from None


# -- client side ------------------------------------------------------------------------------
_PLAIN_HEADERS: dict[tuple[str, CallKind, float | None], Header] = {}  # no metadata: immutable


class _OutboundCall:
    """One call we make: opens the stream, sends the requests, reads replies and status."""

    # Until set otherwise (class defaults: a small call sets few of them)
    stream: Stream | None = None
    writer: _FrameWriter | None = None
    writer_task: asyncio.Task[None] | None = None
    done = False
    task: asyncio.Task[Any] | None = None  # a unary call's caller, for `_Deadlines`
    expired = False  # its deadline (plus grace) passed: `task` was cancelled for it
    deadline_entry: _DeadlineEntry | None = None  # its place in `_Deadlines`, once watched

    def __init__(
        self,
        service: RpcService,
        peer: PeerId,
        method: str,
        kind: CallKind,
        arguments: list[Any],
        requests: AsyncIterable[object] | None,
        timeout: float | None,
        metadata: Mapping[str, str] | None,
    ) -> None:
        self.service = service
        self.peer = peer
        self.method = method
        config = service.config
        header = Header(method, kind, timeout, dict(metadata)) if metadata else None
        if header is None:  # the usual call: a header already made for the same method
            key = (method, kind, timeout)
            header = _PLAIN_HEADERS.get(key)
            if header is None:
                if len(_PLAIN_HEADERS) >= 1024:
                    _PLAIN_HEADERS.clear()
                header = _PLAIN_HEADERS[key] = Header(method, kind, timeout, {})
        self.proto = proto = ClientCall(header, config.max_message_size)
        # A small call that sends nothing after its arguments: the whole request, one piece.
        self._whole: bytes | None = None
        self._first: list[Buffer] = []
        try:  # bad names or metadata, oversized arguments: refused before dialing
            if requests is None:
                self._whole = proto.start_whole(arguments, config.coalesce_below)
            if self._whole is None:
                self._first.append(proto.start())
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(f"cannot send this call: {exc}") from exc
        if self._whole is None:
            self._first += proto.send_message(arguments)
            self._first_size = sum(memoryview(chunk).nbytes for chunk in self._first)
        else:
            self._first_size = len(self._whole)
        self._requests = requests
        loop = asyncio.get_running_loop()
        self.deadline = None if timeout is None else loop.time() + timeout
        self.expiry = None if self.deadline is None else self.deadline + config.deadline_grace
        self.timeout = timeout
        self.events: collections.deque[Event] = collections.deque()

    def _error(self, error: RpcError) -> RpcError:
        error.method, error.peer = self.method, self.peer
        return error

    async def start(self) -> None:
        service = self.service
        config = service.config
        bulk = self._requests is not None or self._first_size >= config.bulk_from
        try:
            self.stream = await service.host.open_stream(self.peer, [PROTOCOL_ID], bulk=bulk)
        except (TransportError, ConnectionError, OSError) as exc:
            raise self._error(PeerUnavailable(f"cannot reach the peer: {exc}")) from exc
        if self._whole is not None:  # all of it at once (on failure the call is reset)
            try:
                await self.stream.write(self._whole)
            except (TransportError, ConnectionError) as exc:
                error = PeerUnavailable(f"stream lost while sending: {exc}")
                error.path_lost = True
                raise self._error(error) from exc
            return
        # A large or streaming request: the server may answer (or refuse) while we send, so
        # a task sends while the caller reads.
        self.writer = _FrameWriter(self.stream, config.coalesce_below)
        first = self._first
        if self._requests is None:
            first.append(self.proto.send_end())
        self.writer_task = asyncio.get_running_loop().create_task(
            self._send(first), name=f"rpc {self.method} requests"
        )
        self.writer_task.add_done_callback(_retrieve)  # its error surfaces via the reader

    async def _send(self, first: list[Buffer]) -> None:
        assert self.writer is not None and self.stream is not None
        try:
            await self.writer.write(first)
            if self._requests is not None:
                encode = self.service.codec.encode
                async for item in self._requests:
                    await self.writer.write(self.proto.send_message(encode(item)))
                await self.writer.write([self.proto.send_end()])
        except (TransportError, ConnectionError, asyncio.CancelledError):
            raise  # the reader sees the same failure, with the server's status if it sent one
        except BaseException:  # the caller's requests failed: abort, the reader raises this
            self.stream.reset("request stream failed")
            raise

    async def next_event(self) -> Message | Status:
        while not self.events:
            self._receive(await self._read())
        event = self.events.popleft()
        assert isinstance(event, Message | Status)
        return event

    async def reply(self) -> tuple[object, Status]:
        """The decoded response (None if none came) and the status of a call with one
        response; usually both came in the first read."""
        data = await self._read()
        response = self.proto.receive_whole(data) if data else None
        if response is not None:
            return self.decode(response), STATUS_OK
        self._receive(data)
        event = await self.next_event()
        result = None
        if isinstance(event, Message):
            result = self.decode(event.payload)
            # (the status usually came with it)
            event = self.events.popleft() if self.events else await self.next_event()
        assert isinstance(event, Status)
        return result, event

    async def _read(self) -> bytes:
        stream = self.stream
        assert stream is not None
        try:
            return await stream.read(self.service.config.read_size)
        except ProtocolNotSupported as exc:
            raise self._error(
                PeerUnavailable(f"the peer does not serve {PROTOCOL_ID} (no RPC service)")
            ) from exc
        except (TransportError, ConnectionError, EOFError) as exc:
            raise self._failure(exc) from exc

    def _receive(self, data: bytes) -> None:
        """Take what was read (b"": the server closed its side) into `events`."""
        try:
            self.events.extend(self.proto.receive_data(data) if data else self.proto.receive_eof())
        except RpcError as exc:  # a malformed or oversized response
            assert self.stream is not None
            self.stream.reset("rpc protocol violation")
            raise self._error(exc) from None

    def _failure(self, exc: BaseException) -> BaseException:
        """What to raise when the stream broke: our own request error first, if that was it."""
        task = self.writer_task
        if task is not None and task.done() and not task.cancelled():
            error = task.exception()
            if error is not None and not isinstance(error, TransportError | ConnectionError):
                return error
        if self.service._stopping:
            return self._error(Cancelled("the local RPC service stopped"))
        if self.deadline is not None and asyncio.get_running_loop().time() >= self.deadline:
            return self.deadline_error()  # the server reset a stream it was writing to
        error = PeerUnavailable(
            f"the stream broke mid-call ({exc}): the peer stopped, crashed or lost the "
            "connection; the call may or may not have run"
        )
        error.path_lost = True
        return self._error(error)

    def decode(self, payload: ReceiveBuffer) -> object:
        try:
            return self.service.decode(payload)
        except ValueError as exc:
            assert self.stream is not None
            self.stream.reset("undecodable response")
            raise self._error(ProtocolError(f"could not decode the response: {exc}")) from exc

    async def finish(self, ok: bool = True) -> None:
        """The status arrived (`ok` or not): stop sending and close our side, cleanly if all
        we meant to send is out. A server that ended the call early (refused it, failed, or
        answered before our requests were done) would leave what we still send unread: the
        stream is reset instead, so that it leaves no FIN queued behind unsent requests and
        holds no flow-control credit (as HTTP/2's RST_STREAM(NO_ERROR) after an early answer).
        """
        if self.done:
            return
        self.end()
        task = self.writer_task
        ended_early = task is not None and not task.done()
        if ended_early:
            task.cancel()  # type: ignore[union-attr]
        if task is not None:
            await asyncio.wait([task])
        assert self.stream is not None
        if (
            ended_early
            or (self.writer is not None and (self.writer.mid_frame or not ok))
            or not self.proto.ended
        ):
            self.stream.reset("call finished")
            return
        try:
            await self.stream.close()
        except (TransportError, ConnectionError):
            pass

    def abort(self, reason: str) -> None:
        """Abandon the call: the reset reaches the server, which cancels the handler."""
        if self.done:
            return
        self.end()
        if self.writer_task is not None and not self.writer_task.done():
            self.writer_task.cancel()
        if self.stream is not None:
            self.stream.reset(reason)

    def end(self) -> None:
        """No longer in flight: out of the service's calls and of `_Deadlines`."""
        self.done = True
        self.service._outbound.discard(self)
        entry = self.deadline_entry
        if entry is not None:
            entry[2] = None

    def expire(self) -> None:
        """The deadline (plus grace) passed: interrupt the caller (see `RpcService.call`)."""
        if not self.expired and self.task is not None:
            self.expired = True
            self.task.cancel()

    def deadline_error(self) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"no reply within the deadline of {self.timeout} s", method=self.method, peer=self.peer
        )


class ResponseStream:
    """The responses of a server-streaming or bidirectional call, as an async iterator.

    The call starts on the first `__anext__` (or `async with`). Leaving early (an error,
    `aclose()`, leaving the `async with`, cancelling a pending `__anext__`) resets the stream,
    which cancels the remote handler; after a plain `break`, that happens when the iterator is
    collected, so prefer `async with` or `aclose()`.
    """

    def __init__(self, service: RpcService, make_call: Callable[[], _OutboundCall]) -> None:
        self._service = service
        self._make_call = make_call
        self._call: _OutboundCall | None = None
        self._finished = False

    def __aiter__(self) -> ResponseStream:
        return self

    async def __aenter__(self) -> ResponseStream:
        await self._ensure_started()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _ensure_started(self) -> _OutboundCall:
        if self._call is None:
            self._call = self._make_call()
            await self._guard(self._call, self._call.start())
        return self._call

    async def _guard(self, call: _OutboundCall, step: Any) -> Any:
        try:
            async with asyncio.timeout_at(call.expiry) as scope:
                return await step
        except TimeoutError:
            if scope.expired():
                self._finished = True
                call.abort("deadline exceeded")
                raise call.deadline_error() from None
            raise
        except BaseException:
            self._finished = True
            call.abort("call abandoned")
            raise

    async def __anext__(self) -> object:
        if self._finished:
            raise StopAsyncIteration
        call = await self._ensure_started()
        event = await self._guard(call, call.next_event())
        if isinstance(event, Message):
            try:
                return call.decode(event.payload)
            except BaseException:
                self._finished = True
                call.abort("undecodable response")
                raise
        self._finished = True
        await call.finish(event.ok)
        if event.ok:
            raise StopAsyncIteration
        raise event.to_error(call.method, call.peer)

    async def aclose(self) -> None:
        """Stop receiving; if the call is still running, the server's handler is cancelled."""
        self._finished = True
        if self._call is not None:
            self._call.abort("caller stopped reading")

    def __del__(self) -> None:
        if self._call is not None and not self._call.done:
            try:
                self._call.abort("response stream dropped")
            except RuntimeError:  # the event loop is already closed
                pass


# -- the service ------------------------------------------------------------------------------
class RpcService:
    """Serves registered methods to peers and calls methods on peers, over a `Host`."""

    def __init__(
        self,
        host: Host,
        config: RpcConfig | None = None,
        *,
        codec: Codec | None = None,
        codec_limits: Any = None,
    ) -> None:
        """`codec` defaults to the Arrow codec; `codec_limits` (a `codec.CodecLimits`) bounds
        what a received message may ask of the decoder (None: the codec's defaults)."""
        self.host = host
        self.config = config or RpcConfig()
        self.codec: Codec = codec if codec is not None else _default_codec()
        self.codec_limits = codec_limits
        self._methods: dict[str, Method] = {}
        self._inbound: set[_InboundCall] = set()
        # Peers with calls running, how many; keyed by the peer ID's bytes (their hash is
        # cached; a PeerId's is computed in Python on every lookup).
        self._inbound_per_peer: dict[bytes | None, int] = {}
        self._serving: set[asyncio.Task[Any]] = set()  # tasks serving inbound streams
        self._draining: set[asyncio.Task[Any]] = set()  # refusals dropping what still comes
        self._outbound: set[_OutboundCall] = set()
        self._deadlines = _Deadlines(self._outbound)
        self._executor: ThreadPoolExecutor | None = None
        self._started = False
        self._stopping = False

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        if self._started:
            return
        self._executor = ThreadPoolExecutor(
            self.config.sync_handler_threads, thread_name_prefix="rpc-handler"
        )
        self.host.set_stream_handler(PROTOCOL_ID, self._serve_stream)
        self._started, self._stopping = True, False

    async def stop(self) -> None:
        """Stop serving, cancel inbound handlers and outbound calls, release the thread pool."""
        if not self._started:
            return
        self._stopping = True
        self.host.remove_stream_handler(PROTOCOL_ID)
        for inbound in list(self._inbound):
            inbound.cancel(Status(StatusCode.UNAVAILABLE, "the server is stopping"))
        for outbound in list(self._outbound):
            outbound.abort("rpc service stopping")
        self._deadlines.close()
        if self._serving:  # handlers were told to stop; give them a moment to send a status
            await asyncio.wait(list(self._serving), timeout=STOP_GRACE)
        # Then cut the rest (e.g. streams yet to send a header), and the refusals that only
        # drop what their callers still send (the host resets their streams).
        cut = self._serving | self._draining
        for task in cut:
            task.cancel()
        if cut:
            await asyncio.wait(cut)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self._started = False

    aclose = stop

    async def __aenter__(self) -> RpcService:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def decode(self, payload: ReceiveBuffer) -> object:
        """A received message as a value (zero-copy views over `payload`), within the limits."""
        return self.codec.decode(payload, self.codec_limits)

    # -- registry -----------------------------------------------------------------------
    def register(
        self, name: str, handler: Callable[..., Any], kind: CallKind | None = None
    ) -> Method:
        """Serve `handler` as `name`; the call kind is inferred from the function unless given."""
        if name in self._methods:
            raise ValueError(f"method {name!r} is already registered")
        method = make_method(name, handler, kind)
        self._methods[name] = method
        return method

    def unregister(self, name: str) -> None:
        self._methods.pop(name, None)

    def method(self, name: str | None = None, *, kind: CallKind | None = None) -> Callable[[F], F]:
        """Decorator form of `register`: `@rpc.method("echo")` (the name defaults to the
        function's)."""

        def decorate(handler: F) -> F:
            self.register(name or handler.__name__, handler, kind)
            return handler

        return decorate

    @property
    def methods(self) -> list[str]:
        return sorted(self._methods)

    @property
    def active_inbound_calls(self) -> int:
        return len(self._inbound)

    @property
    def active_outbound_calls(self) -> int:
        return len(self._outbound)

    # -- calling ------------------------------------------------------------------------
    def _new_call(
        self,
        peer: PeerId,
        method: str,
        kind: CallKind,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        requests: AsyncIterable[object] | None,
        timeout: float | None,
        metadata: Mapping[str, str] | None,
    ) -> _OutboundCall:
        if not self._started or self._stopping:
            raise Cancelled("the RPC service is not running", method=method, peer=peer)
        if len(self._outbound) >= self.config.max_outbound_calls:
            raise ResourceExhausted(
                f"{len(self._outbound)} calls already in flight, the limit "
                "(max_outbound_calls); wait for some to finish",
                method=method,
                peer=peer,
            )
        if timeout is None:
            timeout = self.config.default_timeout
        try:
            arguments = _encode_arguments(self.codec, args, kwargs)
        except ValueError as exc:
            raise InvalidArgument(f"could not encode the arguments: {exc}", method=method) from exc
        try:
            call = _OutboundCall(self, peer, method, kind, arguments, requests, timeout, metadata)
        except RpcError as exc:  # a bad header, or arguments over max_message_size
            exc.method, exc.peer = method, peer
            raise
        self._outbound.add(call)
        return call

    async def call(
        self,
        peer: PeerId,
        method: str,
        *args: Any,
        timeout: float | None = None,
        requests: AsyncIterable[object] | None = None,
        metadata: Mapping[str, str] | None = None,
        idempotent: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Call `method` on `peer` and return its result (unary, or client-streaming when
        `requests` is given). The keywords `timeout`, `requests`, `metadata` and `idempotent`
        are ours; all other arguments go to the handler.

        A path that dies mid-call fails the call (`PeerUnavailable`): the method may already
        have run. With `idempotent=True` (the caller's promise that running it twice is
        harmless) a unary call is sent again over the peer's next path instead, up to
        `RpcConfig.idempotent_retries` times within its timeout.
        """
        if idempotent and requests is None:
            return await self._call_idempotent(peer, method, args, kwargs, timeout, metadata)
        kind = CallKind.UNARY if requests is None else CallKind.CLIENT_STREAM
        call = self._new_call(peer, method, kind, args, kwargs, requests, timeout, metadata)
        task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        if call.expiry is not None:
            call.task = task
            self._deadlines.watch(call)
        try:
            await call.start()
            result, event = await call.reply()
        except BaseException as exc:
            call.abort("deadline exceeded" if call.expired else "call abandoned")
            # Our deadline (alone) cancelled the task: the caller gets DeadlineExceeded.
            if call.expired and task.uncancel() <= cancelling:
                if isinstance(exc, asyncio.CancelledError):
                    raise call.deadline_error() from None
            raise
        if call.expired:  # its cancellation came too late to interrupt anything
            task.uncancel()
        await call.finish(event is STATUS_OK or event.ok)
        if event is not STATUS_OK and not event.ok:
            raise event.to_error(method, peer)
        return result

    async def _call_idempotent(
        self,
        peer: PeerId,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        metadata: Mapping[str, str] | None,
    ) -> Any:
        """A unary call sent again (within its timeout) when the path under it dies."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        for attempt in range(self.config.idempotent_retries + 1):
            remaining = None if deadline is None else max(deadline - loop.time(), 1e-3)
            try:
                return await self.call(
                    peer, method, *args, timeout=remaining, metadata=metadata, **kwargs
                )
            except PeerUnavailable as exc:
                if attempt == self.config.idempotent_retries or not exc.path_lost:
                    raise
                logger.info("rpc %s to %s: path lost (%s); sending it again", method, peer, exc)
        raise AssertionError("unreachable")

    def stream(
        self,
        peer: PeerId,
        method: str,
        *args: Any,
        requests: AsyncIterable[object] | None = None,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> ResponseStream:
        """Call a server-streaming (or, with `requests`, bidirectional) method; iterate the
        result with `async for`. `timeout` bounds the whole call."""
        kind = CallKind.SERVER_STREAM if requests is None else CallKind.BIDI_STREAM
        return ResponseStream(
            self,
            lambda: self._new_call(peer, method, kind, args, kwargs, requests, timeout, metadata),
        )

    # -- serving ------------------------------------------------------------------------
    async def _serve_stream(self, stream: Stream) -> None:
        """The stream handler for PROTOCOL_ID: one inbound call."""
        task = asyncio.current_task()
        assert task is not None
        self._serving.add(task)
        try:
            await self._serve_call(stream, task)
        finally:
            self._serving.discard(task)

    async def _serve_call(self, stream: Stream, task: asyncio.Task[Any]) -> None:
        proto = ServerCall(self.config.max_message_size)
        pending: collections.deque[Event] = collections.deque()
        try:
            # The header usually came with the stream's first bytes: no timer needed then.
            data = stream.read_nowait(self.config.read_size)
            whole = proto.receive_whole(data)  # and with it, most often, the whole request
            if whole is None:
                pending.extend(proto.receive_data(data))
                if pending:
                    header = pending.popleft()
                else:
                    async with asyncio.timeout(self.config.header_timeout):
                        header = await self._read_event(stream, proto, pending)
        except TimeoutError:
            stream.reset("no call header in time")
            return
        except RpcError as exc:
            await self._refuse(stream, proto, Status(exc.code, exc.message))
            return
        except (TransportError, ConnectionError, EOFError) as exc:
            logger.debug("rpc stream from %s lost before its header: %r", stream.remote_peer, exc)
            stream.reset("stream lost")
            return
        if whole is not None:  # (small calls: the usual)
            header, arguments = whole
        elif not isinstance(header, Header):  # the caller gave up before sending a header
            stream.reset("closed before its call header")
            return
        peer = stream.remote_peer
        running = self._inbound_per_peer.get(_peer_key(peer), 0)
        refusal = self._admission(peer, header, running)
        if refusal is not None:
            await self._refuse(stream, proto, refusal)
            return
        method = self._methods[header.method]
        if whole is not None:
            if method.kind is CallKind.UNARY and method.is_async:
                await self._answer_whole(stream, proto, arguments, method, header, task)
                return
            pending.extend((Message(arguments), END))
        await self._serve(stream, proto, pending, method, header, task)

    async def _serve(
        self,
        stream: Stream,
        proto: ServerCall,
        pending: collections.deque[Event],
        method: Method,
        header: Header,
        task: asyncio.Task[Any],
    ) -> None:
        """Serve an admitted call (`pending`: the events that came after its header)."""
        call = _InboundCall(self, stream, proto, pending, method, header)
        self._count_inbound(call)
        try:
            if call.request_complete():
                await call.run_inline(task)
            else:
                await call.run_beside_reader()
        finally:
            self._release(call)

    async def _answer_whole(
        self,
        stream: Stream,
        proto: ServerCall,
        arguments: ReceiveBuffer,
        method: Method,
        header: Header,
        task: asyncio.Task[Any],
    ) -> None:
        """Serve an async unary call whose whole request came with its header. The handler
        runs at once, in this task; one that answers without waiting could not be
        interrupted, so the call is only registered (counted under the limits, cancellable,
        watched for a reset, timed) if the handler waits."""
        assert stream.remote_peer is not None
        context = _call_context(stream.remote_peer, method, header)
        response: list[Buffer] | None = None
        try:
            done, rest = run_eagerly(_answer_unary(self, proto, method, context, arguments))
        except asyncio.CancelledError:
            if task.cancelling():  # (cannot be ours: the call is not registered yet)
                raise
            status = _handler_cancelled(method, context.peer)
        except Exception as exc:  # the handler failed at once: the caller is told how
            status = _error_status(exc)
            if status.code == StatusCode.UNKNOWN:
                logger.info("rpc %s from %s raised %r", method.name, context.peer, exc)
        else:
            if not done:  # it waits: from here on a call like any other
                pending: collections.deque[Event] = collections.deque()
                call = _InboundCall(self, stream, proto, pending, method, header, context)
                self._count_inbound(call)
                try:
                    await call.run_inline(task, rest)
                finally:
                    self._release(call)
                return
            response, status = rest, STATUS_OK
        await _deliver(self, stream, proto, context, response, status)

    def _count_inbound(self, call: _InboundCall) -> None:
        """The call takes a place under the concurrency limits (until `_release`)."""
        self._inbound.add(call)
        per_peer = self._inbound_per_peer
        key = _peer_key(call.peer)
        per_peer[key] = per_peer.get(key, 0) + 1

    def _release(self, call: _InboundCall) -> None:
        """Free the call's place under the concurrency limits (once)."""
        if call in self._inbound:
            self._inbound.discard(call)
            per_peer = self._inbound_per_peer
            key = _peer_key(call.peer)
            running = per_peer[key] - 1
            if running:
                per_peer[key] = running
            else:
                del per_peer[key]

    def _admission(self, peer: PeerId | None, header: Header, running: int) -> Status | None:
        """Why this call cannot be served now (`running`: the peer's calls being served), or
        None to serve it."""
        if self._stopping:
            return Status(StatusCode.UNAVAILABLE, "the server is stopping")
        method = self._methods.get(header.method)
        if method is None:
            known = ", ".join(self.methods[:20]) or "none"
            return Status(
                StatusCode.NOT_FOUND,
                f"no method {header.method!r} is registered on this peer (registered: {known})",
            )
        if method.kind != header.kind:
            how = "rpc.stream()" if method.kind.server_streams else "rpc.call()"
            needs = " with requests=" if method.kind.client_streams else ""
            return Status(
                StatusCode.FAILED_PRECONDITION,
                f"method {header.method!r} is {method.kind.name}, called as "
                f"{header.kind.name}; use {how}{needs}",
            )
        if len(self._inbound) >= self.config.max_concurrent_calls:
            return Status(
                StatusCode.RESOURCE_EXHAUSTED,
                f"the server is serving {len(self._inbound)} calls, its limit "
                "(max_concurrent_calls); retry later",
            )
        if peer is not None and running >= self.config.max_concurrent_calls_per_peer:
            return Status(
                StatusCode.RESOURCE_EXHAUSTED,
                f"you already have {running} calls running on this peer, "
                "its limit (max_concurrent_calls_per_peer); wait for some to finish",
            )
        return None

    async def _refuse(self, stream: Stream, proto: ServerCall, status: Status) -> None:
        """Answer with `status` only (no handler ran), then close our side, and drop what the
        caller still sends until it stops (it resets once the refusal arrives): unread, its
        arguments would hold the connection's flow-control credit.

        Once the status is out this is no call any more: `stop()` does not wait for it but
        cuts it (a refusal made while stopping leaves the rest to the caller's reset)."""
        task = asyncio.current_task()
        assert task is not None
        try:
            async with asyncio.timeout(self.config.status_timeout):
                await stream.write(proto.send_status(status))
                await stream.close()
                if self._stopping:
                    return
                self._serving.discard(task)
                self._draining.add(task)
                while await stream.read(self.config.read_size):
                    pass
        except StreamReset:
            pass  # the caller gave up on its request: the usual end of a refusal
        except (TimeoutError, TransportError, ConnectionError) as exc:
            logger.debug("rpc refusal to %s: %r (stream reset)", stream.remote_peer, exc)
            stream.reset("refused")
        finally:
            self._draining.discard(task)

    async def _read_event(
        self,
        stream: Stream,
        proto: ServerCall,
        pending: collections.deque[Event],
        idle: float | None = None,
    ) -> Event | None:
        """The next event from the caller; None once it closed its side after END.

        With `idle`, a caller that sends nothing for that long is a DeadlineExceeded.
        """
        while not pending:
            if idle is None:
                data = await stream.read(self.config.read_size)
            else:
                try:
                    async with asyncio.timeout(idle):
                        data = await stream.read(self.config.read_size)
                except TimeoutError:
                    raise DeadlineExceeded(
                        f"the caller sent nothing for {idle:g} s before its arguments were "
                        "complete (RpcConfig.request_idle_timeout)"
                    ) from None
            if not data:
                events = proto.receive_eof()
                if not events:
                    return None
                pending.extend(events)
            else:
                pending.extend(proto.receive_data(data))
        return pending.popleft()

    async def _next_server_event(self, call: _InboundCall) -> Event | None:
        waiting = call.arguments is not None and not call.arguments.done()
        idle = self.config.request_idle_timeout if waiting else None
        return await self._read_event(call.stream, call.proto, call.pending, idle)

    # -- the thread pool ----------------------------------------------------------------
    def _submit(self, function: Callable[[], None]) -> asyncio.Future[None]:
        if self._executor is None:
            raise Cancelled("the RPC service is not running")
        context = contextvars.copy_context()
        return asyncio.get_running_loop().run_in_executor(self._executor, context.run, function)

    async def _run_in_thread(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await self._submit(functools.partial(function, *args, **kwargs))
