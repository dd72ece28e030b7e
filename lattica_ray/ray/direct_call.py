"""Direct calls: the LatticaActor runs a method of an exported actor in the actor's own process.

A mesh call would otherwise take a second Ray actor call on the serving side (LatticaActor ->
exported actor), which costs about as much as the whole local Ray call the cross-cluster call is
compared with. Actors made by `@lattica_ray.remote` (without their own concurrency settings)
serve their exported unary methods on a Unix socket of their process instead; the LatticaActor
on the same Ray node connects to it and sends the call there. Everything else (streams, methods
with `@ray.method` options, large arguments, actors on other nodes or exported with
`lattica_ray.export`) keeps going through Ray.

What a Ray actor promises is kept: an async actor runs direct calls on its own event loop, as Ray
runs its tasks; a sync actor (one task at a time) runs them one at a time, serialized with the
tasks Ray runs by a lock every method of the class takes. Values cross the socket in the RPC
codec (data only, never pickles), and only the exported methods can be called.

Wire: frames of an 8-byte little-endian length and one codec message, a dict:
``{"call": id, "method", "args", "kwargs"}``, ``{"cancel": id}`` (client to actor) and
``{"reply": id, "value"}`` / ``{"reply": id, "error": [type, message, traceback]}`` back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
import logging
import os
import secrets
import socket
import struct
import threading
import traceback
from collections.abc import Callable
from typing import Any

from lattica_ray.ray.errors import UnsupportedValue
from lattica_ray.ray.protocol import from_wire_value, to_wire_value

logger = logging.getLogger(__name__)

FRAME_LENGTH = struct.Struct("<Q")
DEFAULT_MAX_FRAME_BYTES = 1 << 30  # the RPC codec's own message limit
ENDPOINT_METHOD = "_lattica_direct_endpoint"
_LOCK_ATTR = "_lattica_direct_lock"
_SERVER_ATTR = "_lattica_direct_server"
# Actor options under which Ray runs its tasks in a way a direct call could not copy
# (concurrency limits and groups; retrying tasks when the actor dies).
RAY_ONLY_OPTIONS = ("max_concurrency", "concurrency_groups", "max_task_retries")


class DirectCallError(ConnectionError):
    """The direct call channel failed."""


class DirectCallNotSent(DirectCallError):
    """The call never reached the actor (no connection): it may go through Ray instead."""


class DirectCallLost(DirectCallError):
    """The connection broke while the call ran: the actor (or its process) is gone."""


# -- framing ----------------------------------------------------------------------------------


def encode_frame(message: dict[str, Any]) -> list[memoryview | bytes]:
    """`message` as the buffers of one frame."""
    from lattica_ray.rpc import codec

    buffers = codec.encode(message)
    return [FRAME_LENGTH.pack(sum(b.nbytes for b in buffers)), *buffers]


def decode_frame(body: bytes | bytearray) -> dict[str, Any]:
    from lattica_ray.rpc import codec

    message = codec.decode(body)
    if not isinstance(message, dict):
        raise DirectCallError(f"a direct call frame must hold a dict, not {type(message)}")
    return message


def _frame_length(header: bytes, max_bytes: int) -> int:
    (length,) = FRAME_LENGTH.unpack(header)
    if length > max_bytes:
        raise DirectCallError(f"direct call frame of {length} bytes exceeds {max_bytes}")
    return length


# -- the exported actor's side ----------------------------------------------------------------


def direct_methods(cls: type) -> list[str]:
    """The methods of `cls` a direct call may run: public, not generators, no `@ray.method`
    options (those need Ray's own handling: returns, groups, retries, transports)."""
    names = []
    for name, fn in _plain_methods(cls):
        if name.startswith("_") or inspect.isgeneratorfunction(fn):
            continue
        if inspect.isasyncgenfunction(fn):
            continue
        if any(attr.startswith("__ray_") for attr in getattr(fn, "__dict__", {})):
            continue
        names.append(name)
    return names


def _plain_methods(cls: type) -> list[tuple[str, Callable[..., Any]]]:
    """(name, function) of the instance methods of `cls` (no static or class methods)."""
    return [
        (name, fn)
        for name, fn in inspect.getmembers(cls, inspect.isfunction)
        if inspect.isfunction(inspect.getattr_static(cls, name))
    ]


def _is_async_class(cls: type) -> bool:
    return any(
        inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)
        for _, fn in inspect.getmembers(cls, inspect.isfunction)
    )


def _locked(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` holding its instance's direct-call lock (once direct calls are served)."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator(self: Any, *args: Any, **kwargs: Any) -> Any:
            lock = self.__dict__.get(_LOCK_ATTR)
            with lock if lock is not None else contextlib.nullcontext():
                yield from fn(self, *args, **kwargs)

        return generator

    @functools.wraps(fn)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        lock = self.__dict__.get(_LOCK_ATTR)
        if lock is None:
            return fn(self, *args, **kwargs)
        with lock:
            return fn(self, *args, **kwargs)

    return method


def serving_class(cls: type) -> type:
    """A subclass of `cls` (same name) that can serve direct calls in its actor's process.

    Sync classes get every method wrapped to take the instance's lock, so direct calls and the
    tasks Ray runs never overlap; the lock exists only once direct calls are served. A class
    with `__slots__` (no instance dict for the lock and server) is returned as it is.
    """
    if hasattr(cls, "__slots__"):
        return cls
    namespace: dict[str, Any] = {
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
    }
    methods = direct_methods(cls)
    if _is_async_class(cls):

        async def endpoint(self: Any, exported: list[str]) -> dict[str, Any]:
            return _serve(self, methods, exported, asyncio.get_running_loop())

    else:
        for name, fn in _plain_methods(cls):
            if not (name.startswith("__") and name.endswith("__")):
                namespace[name] = _locked(fn)

        def endpoint(self: Any, exported: list[str]) -> dict[str, Any]:  # type: ignore[misc]
            # A Ray task: with one task at a time, nothing runs while the lock appears.
            self.__dict__.setdefault(_LOCK_ATTR, threading.RLock())
            return _serve(self, methods, exported, None)

    endpoint.__name__ = endpoint.__qualname__ = ENDPOINT_METHOD
    namespace[ENDPOINT_METHOD] = endpoint
    return type(cls.__name__, (cls,), namespace)


def _serve(
    instance: Any,
    methods: list[str],
    exported: list[str],
    loop: asyncio.AbstractEventLoop | None,
) -> dict:
    """Start (once) this instance's direct call server for the `exported` ones of `methods`;
    its address and what it serves."""
    import ray

    served = [m for m in methods if m in set(exported)]
    server = instance.__dict__.get(_SERVER_ATTR)
    if server is None:
        server = DirectCallServer(instance, served, loop, instance.__dict__.get(_LOCK_ATTR))
        server.start()
        instance.__dict__[_SERVER_ATTR] = server
    server.methods |= frozenset(served)  # also exported under another name
    return {
        "address": server.address,
        "node_id": ray.get_runtime_context().get_node_id(),
        "methods": served,
    }


class DirectCallServer:
    """Serves direct calls on an abstract Unix socket, from threads of the actor's process.

    An async actor's calls run as tasks on `loop` (the actor's event loop); a sync actor's run
    one at a time holding `lock`. Only processes of our own user may connect (the socket has no
    file permissions; SO_PEERCRED tells who connected), and only `methods` can be called.
    """

    def __init__(
        self,
        instance: Any,
        methods: list[str],
        loop: asyncio.AbstractEventLoop | None,
        lock: threading.RLock | None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        self.instance = instance
        self.methods = frozenset(methods)
        self.loop = loop
        self.lock = lock
        self.max_frame_bytes = max_frame_bytes
        self.address = "\0lattica-ray-direct-" + secrets.token_hex(8)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._worker = concurrent.futures.ThreadPoolExecutor(1, "lattica-direct-call")
        self._connections: set[socket.socket] = set()

    def start(self) -> None:
        self._listener.bind(self.address)
        self._listener.listen()
        threading.Thread(target=self._accept, name="lattica-direct-accept", daemon=True).start()

    def close(self) -> None:
        """Stop accepting, drop every connection (their calls are lost to the callers)."""
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for conn in list(self._connections):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._worker.shutdown(wait=False, cancel_futures=True)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            if not _same_user(conn):
                conn.close()
                continue
            self._connections.add(conn)
            threading.Thread(
                target=self._serve_connection, args=(conn,), name="lattica-direct", daemon=True
            ).start()

    def _serve_connection(self, conn: socket.socket) -> None:
        write_lock = threading.Lock()
        running: dict[int, concurrent.futures.Future[Any]] = {}

        def send(message: dict[str, Any]) -> None:
            try:
                frame = b"".join(encode_frame(message))
            except Exception as exc:  # a result the codec refuses: say so instead
                error = [type(exc).__name__, str(exc), ""]
                frame = b"".join(encode_frame({"reply": message["reply"], "error": error}))
            with write_lock, contextlib.suppress(OSError):
                conn.sendall(frame)

        try:
            while True:
                header = _recv_exactly(conn, FRAME_LENGTH.size)
                if header is None:
                    return
                body = _recv_exactly(conn, _frame_length(header, self.max_frame_bytes))
                if body is None:
                    return
                message = decode_frame(body)
                if "cancel" in message:
                    future = running.get(message["cancel"])
                    if future is not None:
                        future.cancel()
                    continue
                call_id = message["call"]
                future = self._start_call(message, inline=not running and not _more_to_read(conn))
                running[call_id] = future
                future.add_done_callback(functools.partial(self._finished, call_id, running, send))
        except Exception as exc:
            logger.warning("direct call connection closed: %s", exc)
        finally:
            for future in list(running.values()):
                future.cancel()
            self._connections.discard(conn)
            conn.close()

    def _start_call(
        self, message: dict[str, Any], inline: bool = False
    ) -> concurrent.futures.Future[Any]:
        """The call's future. A sync actor's call runs right here when `inline` (nothing else
        of this connection waits, so no cancel can be stuck behind it) and the lock is free:
        one thread wake-up fewer than the worker."""
        method = message.get("method")
        args, kwargs = message.get("args"), message.get("kwargs")
        if (
            method not in self.methods
            or not isinstance(args, list | tuple)
            or not isinstance(kwargs, dict)
        ):
            failed: concurrent.futures.Future[Any] = concurrent.futures.Future()
            failed.set_exception(DirectCallError(f"not a direct-call method: {method!r}"))
            return failed
        fn = getattr(self.instance, method)
        args, kwargs = from_wire_value(list(args)), from_wire_value(kwargs)
        if self.loop is not None:

            async def run() -> Any:
                result = fn(*args, **kwargs)
                return await result if inspect.isawaitable(result) else result

            return asyncio.run_coroutine_threadsafe(run(), self.loop)

        assert self.lock is not None
        if inline and self.lock.acquire(blocking=False):
            done: concurrent.futures.Future[Any] = concurrent.futures.Future()
            try:
                done.set_result(fn(*args, **kwargs))
            except Exception as exc:
                done.set_exception(exc)
            finally:
                self.lock.release()
            return done

        def run_locked() -> Any:
            assert self.lock is not None
            with self.lock:
                return fn(*args, **kwargs)

        return self._worker.submit(run_locked)

    @staticmethod
    def _finished(
        call_id: int,
        running: dict[int, concurrent.futures.Future[Any]],
        send: Callable[[dict[str, Any]], None],
        future: concurrent.futures.Future[Any],
    ) -> None:
        running.pop(call_id, None)
        if future.cancelled():
            send({"reply": call_id, "error": ["CancelledError", "cancelled", ""]})
            return
        exc = future.exception()
        if exc is None:
            try:
                value = to_wire_value(future.result(), path="result")
            except UnsupportedValue as unsupported:
                send({"reply": call_id, "error": ["UnsupportedValue", str(unsupported), ""]})
                return
            send({"reply": call_id, "value": value})
            return
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        send({"reply": call_id, "error": [type(exc).__name__, str(exc), text]})


_PEER_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


def _same_user(conn: socket.socket) -> bool:
    """Whether the process at the other end of `conn` runs as our user."""
    try:
        credentials = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEER_CREDENTIALS.size)
    except OSError:
        return False
    _, uid, _ = _PEER_CREDENTIALS.unpack(credentials)
    if uid != os.getuid():
        logger.warning("refused a direct call connection from uid %d", uid)
        return False
    return True


def _more_to_read(conn: socket.socket) -> bool:
    """Whether `conn` has bytes waiting (or is at its end), without reading them."""
    try:
        conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    return True


def _recv_exactly(conn: socket.socket, size: int) -> bytearray | None:
    """`size` bytes from `conn`; None at end of stream before the first byte."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        n = conn.recv_into(view[received:])
        if n == 0:
            if received == 0:
                return None
            raise DirectCallError("direct call connection closed mid-frame")
        received += n
    return buffer


# -- the LatticaActor's side ------------------------------------------------------------------


class DirectCallClient:
    """One connection to an exported actor's direct call server, on the Node's event loop.

    Replies are parsed as they come in (a protocol, not a stream reader: no task or await per
    reply on the Node's loop, which every remote call crosses twice).
    """

    def __init__(
        self, address: str, methods: list[str], max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    ) -> None:
        self.address = address
        self.methods = frozenset(methods)
        self.max_frame_bytes = max_frame_bytes
        self._transport: asyncio.WriteTransport | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 0
        self.closed = False

    async def connect(self) -> None:
        # Connected by us, then handed over: Ray workers run asyncio on uvloop when it is
        # installed, and uvloop takes a path's length up to its first NUL byte, so an abstract
        # address ("\0name") comes out empty there and its own connect fails (EINVAL).
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        loop = asyncio.get_running_loop()
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, self.address)
            transport, _ = await loop.create_unix_connection(lambda: _Replies(self), sock=sock)
        except OSError as exc:
            sock.close()
            self.closed = True
            raise DirectCallNotSent(f"cannot reach the actor's direct call server: {exc}") from exc
        self._transport = transport  # type: ignore[assignment]

    def _reply(self, message: dict[str, Any]) -> None:
        future = self._pending.pop(message.get("reply"), None)  # type: ignore[arg-type]
        if future is not None and not future.done():
            future.set_result(message)

    def _lost(self, error: BaseException) -> None:
        self.close()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    async def call(self, method: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """The method's result; its exception as `(type, message, traceback)` in
        `DirectCallFailed`. Cancelling the caller cancels the call in the actor."""
        if self.closed or self._transport is None:
            raise DirectCallNotSent("the direct call connection is closed")
        self._next_id += 1
        call_id = self._next_id
        frame = encode_frame(
            {
                "call": call_id,
                "method": method,
                "args": to_wire_value(list(args), path="args"),
                "kwargs": to_wire_value(dict(kwargs), path="kwargs"),
            }
        )
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        self._transport.writelines(frame)
        try:
            reply = await future
        except asyncio.CancelledError:
            self._pending.pop(call_id, None)
            if not self.closed:
                self._transport.writelines(encode_frame({"cancel": call_id}))
            raise
        if "error" in reply:
            raise DirectCallFailed(*reply["error"])
        return from_wire_value(reply.get("value"))


class _Replies(asyncio.Protocol):
    """The reply frames of a `DirectCallClient`'s connection."""

    def __init__(self, client: DirectCallClient) -> None:
        self.client = client
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        header = FRAME_LENGTH.size
        while len(buffer) >= header and not self.client.closed:
            try:
                length = _frame_length(bytes(buffer[:header]), self.client.max_frame_bytes)
                if len(buffer) < header + length:
                    return
                message = decode_frame(bytes(buffer[header : header + length]))
            except Exception as exc:
                self.client._lost(
                    DirectCallLost(f"bad frame from the actor's direct call server: {exc}")
                )
                return
            del buffer[: header + length]
            self.client._reply(message)

    def connection_lost(self, exc: Exception | None) -> None:
        detail = f" ({exc})" if exc is not None else ""
        self.client._lost(DirectCallLost(f"the actor's direct call connection closed{detail}"))


class DirectCallFailed(Exception):
    """The method raised in the actor: its type name, message and formatted traceback."""

    def __init__(self, remote_type: str, message: str, remote_traceback: str) -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.message = message
        self.remote_traceback = remote_traceback
