"""Methods and their handlers: what kind of call a function serves, and the context it runs in.

A handler's shape decides its call kind (see `make_method`); `current_call()` tells a running
handler who called, with what metadata and deadline, and whether the call was cancelled.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import re
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, get_type_hints

from lattica_ray.rpc.protocol import CallKind
from transport.identity import PeerId

# -- handler context --------------------------------------------------------------------------
_CANCEL_LOCK = threading.Lock()  # orders a cancel against the first look at `cancelled`


class CallContext:
    """What a handler may want to know about the call it serves (see `current_call()`)."""

    __slots__ = ("_cancelled", "_is_cancelled", "deadline", "metadata", "method", "peer")

    def __init__(
        self,
        peer: PeerId,
        method: str,
        metadata: dict[str, str],
        deadline: float | None,  # in `time.monotonic()` seconds; None = no deadline
    ) -> None:
        self.peer = peer
        self.method = method
        self.metadata = metadata
        self.deadline = deadline
        # Made on first use: most handlers never look, and a threading.Event (a lock and a
        # condition) per call costs a small call several microseconds.
        self._cancelled: threading.Event | None = None
        self._is_cancelled = False

    @property
    def cancelled(self) -> threading.Event:
        """Set when the call is cancelled or its deadline passes: plain `def` handlers, which
        cannot be interrupted, should poll or wait on it."""
        event = self._cancelled
        if event is None:
            with _CANCEL_LOCK:
                if self._cancelled is None:
                    self._cancelled = threading.Event()
                    if self._is_cancelled:
                        self._cancelled.set()
                event = self._cancelled
        return event

    def cancel(self) -> None:
        """Mark the call cancelled (the service does, on a cancel, a reset or the deadline)."""
        with _CANCEL_LOCK:
            self._is_cancelled = True
            event = self._cancelled
        if event is not None:
            event.set()

    def time_remaining(self) -> float | None:
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def __repr__(self) -> str:
        return (
            f"CallContext(peer={self.peer!r}, method={self.method!r}, "
            f"metadata={self.metadata!r}, deadline={self.deadline!r}, "
            f"cancelled={self._is_cancelled})"
        )


_current_call: contextvars.ContextVar[CallContext] = contextvars.ContextVar("rpc_current_call")


def current_call() -> CallContext:
    """The call being served by this handler (async or in the thread pool)."""
    try:
        return _current_call.get()
    except LookupError:
        raise RuntimeError("current_call() is only available inside an RPC handler") from None


# -- the registry -----------------------------------------------------------------------------
_ASYNC_ITER = re.compile(r"^(typing\.|collections\.abc\.|abc\.)?Async(Iterator|Iterable)\b")
_SYNC_ITER = re.compile(r"^(typing\.|collections\.abc\.|abc\.)?Iterator\b")


@dataclass(frozen=True)
class Method:
    """A registered handler and how to call it."""

    name: str
    handler: Callable[..., Any]
    kind: CallKind
    is_async: bool
    requests_param: str | None = None  # where the request iterator goes (client-streaming)
    requests_positional: bool = False


def _is_request_annotation(annotation: object, is_async: bool) -> bool:
    if annotation is inspect.Parameter.empty:
        return False
    pattern = _ASYNC_ITER if is_async else _SYNC_ITER
    if isinstance(annotation, str):
        return bool(pattern.match(annotation))
    origin = getattr(annotation, "__origin__", annotation)
    if is_async:
        return origin in (AsyncIterator, AsyncIterable)
    return origin is Iterator


def make_method(name: str, handler: Callable[..., Any], kind: CallKind | None = None) -> Method:
    """Inspect `handler`: async or not, generator or not, and which parameter takes requests.

    `async def` -> unary; async generator -> server-streaming; a parameter annotated
    `AsyncIterator[...]` makes it client-streaming (or bidirectional for a generator). Plain
    `def` and generators run in the thread pool; their request parameter is an `Iterator[...]`.
    """
    if not callable(handler):
        raise TypeError(f"handler for {name!r} is not callable")
    target: Any = handler
    if not (inspect.isroutine(handler) or isinstance(handler, functools.partial)):
        target = type(handler).__call__  # a callable object
    is_agen = inspect.isasyncgenfunction(target)
    is_gen = inspect.isgeneratorfunction(target)
    is_async = is_agen or inspect.iscoroutinefunction(target)
    try:
        hints = get_type_hints(target)
    except Exception:  # unresolvable string annotations: fall back to their text
        hints = {}
    params = list(inspect.signature(handler).parameters.values())
    requests_param = None
    for param in params:
        if _is_request_annotation(hints.get(param.name, param.annotation), is_async):
            requests_param = param
            break
    produces_stream = is_agen or is_gen
    inferred = (
        (CallKind.BIDI_STREAM if produces_stream else CallKind.CLIENT_STREAM)
        if requests_param is not None
        else (CallKind.SERVER_STREAM if produces_stream else CallKind.UNARY)
    )
    if kind is None:
        kind = inferred
    elif kind.server_streams != produces_stream:
        need = "a generator" if kind.server_streams else "a function or coroutine, not a generator"
        raise ValueError(f"{name!r}: kind {kind.name} needs {need}; got {handler!r}")
    if kind.client_streams and requests_param is None:
        by_name = [p for p in params if p.name == "requests"]
        if not (by_name or params):
            raise ValueError(f"{name!r}: a {kind.name} handler needs a parameter for requests")
        requests_param = by_name[0] if by_name else params[0]
    if not kind.client_streams:
        requests_param = None
    positional = (
        requests_param is not None
        and params.index(requests_param) == 0
        and requests_param.kind
        in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    )
    return Method(
        name,
        handler,
        kind,
        is_async,
        requests_param.name if requests_param is not None else None,
        positional,
    )


def bind_call(context: CallContext) -> None:
    """Make `context` what `current_call()` returns in this task (and the threads it uses)."""
    _current_call.set(context)
