"""Direct calls without Ray: the server an exported actor runs in its process, and the client
the LatticaActor uses, over a real Unix socket; and the class `@lattica_ray.remote` makes."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import socket
import threading

import numpy as np
import pytest

from lattica_ray.ray.direct_call import (
    ENDPOINT_METHOD,
    FRAME_LENGTH,
    DirectCallClient,
    DirectCallFailed,
    DirectCallLost,
    DirectCallNotSent,
    DirectCallServer,
    direct_methods,
    encode_frame,
    serving_class,
)
from lattica_ray.ray.protocol import GlobalRef


class Counter:
    def __init__(self) -> None:
        self.calls = 0
        self.threads: list[str] = []
        self.release = threading.Event()
        self.blocking = threading.Event()

    def add(self, x, scale=1):
        self.calls += 1
        self.threads.append(threading.current_thread().name)
        return {"sum": np.asarray(x) * scale, "calls": self.calls}

    def fail(self):
        raise ValueError("bad observation")

    def opaque(self):
        return object()

    def echo_ref(self, ref):
        return [ref, isinstance(ref, GlobalRef)]

    def block(self):
        self.blocking.set()
        self.release.wait(10)
        return "released"

    def stream(self, n):
        yield from range(n)

    def _private(self):
        return "never"

    @staticmethod
    def helper():
        return 1


class AsyncCounter:
    def __init__(self) -> None:
        self.started = threading.Event()
        self.cancelled = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None

    async def where(self):
        return asyncio.get_running_loop() is self.loop

    def sync_on_loop(self):
        return asyncio.get_running_loop() is self.loop

    async def slow(self, seconds):
        self.started.set()
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return "done"


def test_direct_methods_are_public_non_generator_instance_methods():
    assert direct_methods(Counter) == ["add", "block", "echo_ref", "fail", "opaque"]


def test_serving_class_keeps_the_name_and_adds_the_endpoint():
    served = serving_class(Counter)
    assert served.__name__ == "Counter" and issubclass(served, Counter)
    assert hasattr(served, ENDPOINT_METHOD)
    assert served.helper() == 1
    instance = served()
    assert instance.add(2)["calls"] == 1  # no lock yet: plain call
    assert list(instance.stream(3)) == [0, 1, 2]

    class Slotted:
        __slots__ = ("x",)

    assert serving_class(Slotted) is Slotted


def test_sync_methods_take_the_lock_once_direct_calls_are_served():
    served = serving_class(Counter)
    instance = served()
    lock = threading.RLock()
    instance._lattica_direct_lock = lock
    seen = []

    def run():
        seen.append(instance.add(1)["calls"])

    with lock:
        thread = threading.Thread(target=run)
        thread.start()
        thread.join(0.2)
        assert thread.is_alive() and not seen  # waits for the lock a direct call holds
    thread.join(5)
    assert seen == [1]


@pytest.fixture
def sync_server():
    target = Counter()
    server = DirectCallServer(target, direct_methods(Counter), None, threading.RLock())
    server.start()
    yield target, server
    target.release.set()
    server.close()


async def _client(server) -> DirectCallClient:
    client = DirectCallClient(server.address, sorted(server.methods))
    await client.connect()
    return client


async def test_sync_calls_run_in_the_servers_threads_with_values_and_errors(sync_server):
    target, server = sync_server
    client = await _client(server)
    try:
        out = await client.call("add", [[1, 2]], {"scale": 3})
        assert out["sum"].tolist() == [3, 6] and out["calls"] == 1
        assert target.threads[0].startswith("lattica-direct")
        ref = GlobalRef("bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy", 3, ("p",))
        assert await client.call("echo_ref", [ref], {}) == [ref, True]
        with pytest.raises(DirectCallFailed) as info:
            await client.call("fail", [], {})
        assert info.value.remote_type == "ValueError"
        assert "raise ValueError" in info.value.remote_traceback
        with pytest.raises(DirectCallFailed) as info:
            await client.call("opaque", [], {})
        assert info.value.remote_type == "UnsupportedValue"
        with pytest.raises(DirectCallFailed, match="not a direct-call method"):
            await client.call("_private", [], {})
        with pytest.raises(DirectCallFailed, match="not a direct-call method"):
            await client.call("stream", [3], {})
    finally:
        client.close()


def test_the_client_reaches_an_abstract_address_on_uvloop(sync_server):
    """Ray workers run asyncio on uvloop when it is installed; uvloop's own unix connect cuts an
    abstract address at its leading NUL (EINVAL), so no direct call could ever be made there."""
    uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed")
    _, server = sync_server

    async def call() -> object:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        client = await _client(server)
        try:
            return await client.call("add", [1], {})
        finally:
            client.close()

    assert uvloop.run(call())["calls"] == 1


async def test_sync_calls_wait_for_each_other(sync_server):
    target, server = sync_server
    client = await _client(server)
    try:
        blocked = asyncio.ensure_future(client.call("block", [], {}))
        assert await asyncio.to_thread(target.blocking.wait, 10)
        second = asyncio.ensure_future(client.call("add", [1], {}))
        done, _ = await asyncio.wait([second], timeout=0.3)
        assert not done  # one at a time, as Ray runs a sync actor's tasks
        target.release.set()
        assert await asyncio.wait_for(blocked, 10) == "released"
        assert (await asyncio.wait_for(second, 10))["calls"] == 1
    finally:
        client.close()


async def test_actor_gone_mid_call_is_lost_and_refused_after():
    target = Counter()
    server = DirectCallServer(target, direct_methods(Counter), None, threading.RLock())
    server.start()
    client = await _client(server)
    pending = asyncio.ensure_future(client.call("block", [], {}))
    assert await asyncio.to_thread(target.blocking.wait, 10)
    server.close()
    try:
        with pytest.raises(DirectCallLost):
            await asyncio.wait_for(pending, 10)
        with pytest.raises(DirectCallNotSent):
            await client.call("add", [1], {})
    finally:
        target.release.set()
    unreachable = DirectCallClient(server.address, ["add"])
    with pytest.raises(DirectCallNotSent):
        await unreachable.connect()


@pytest.fixture
def async_server():
    """An async actor's loop on its own thread, as Ray runs one."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    target = AsyncCounter()
    target.loop = loop
    server = DirectCallServer(target, direct_methods(AsyncCounter), loop, None)
    server.start()
    yield target, server
    server.close()
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


async def test_async_calls_run_on_the_actors_loop_and_cancel_there(async_server):
    target, server = async_server
    client = await _client(server)
    try:
        assert await client.call("where", [], {}) is True
        assert await client.call("sync_on_loop", [], {}) is True
        call = asyncio.ensure_future(client.call("slow", [60.0], {}))
        assert await asyncio.to_thread(target.started.wait, 10)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert await asyncio.to_thread(target.cancelled.wait, 10)  # the cancel frame got there
        assert await client.call("slow", [0.0], {}) == "done"
    finally:
        client.close()


def send_frame_as_nobody(address: str, frame: dict, answer: multiprocessing.Queue) -> None:
    """In a forked child: become user nobody, send `frame` to the abstract socket `address`,
    put "refused" (hung up on) or what came back on `answer`."""
    os.setuid(65534)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(10)
    try:
        conn.connect(address)
        conn.sendall(b"".join(encode_frame(frame)))
        reply = conn.recv(FRAME_LENGTH.size)
        answer.put("refused" if reply == b"" else reply)
    except (BrokenPipeError, ConnectionResetError):
        answer.put("refused")
    except OSError as exc:
        answer.put(repr(exc))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_other_users_cannot_connect(sync_server):
    target, server = sync_server
    fork = multiprocessing.get_context("fork")
    answer = fork.Queue()
    call = {"call": 1, "method": "add", "args": [1], "kwargs": {}}
    child = fork.Process(target=send_frame_as_nobody, args=(server.address, call, answer))
    child.start()
    try:
        assert answer.get(timeout=20) == "refused"
    finally:
        child.join(10)
    assert target.calls == 0
