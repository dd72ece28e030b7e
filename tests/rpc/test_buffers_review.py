"""Review of the receive buffer pool: every way a decoded value can keep a reference keeps its
buffer out of the pool, and a buffer coming back from a finalizer never blocks the pool."""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from lattica_ray.rpc import buffers
from lattica_ray.rpc.buffers import MIB, BufferPool
from lattica_ray.rpc.codec import decode, encode

WAIT = 10.0


def _received(pool: BufferPool, value: object) -> memoryview:
    """`value` encoded and received into a buffer from `pool`, as the frame decoder does."""
    message = b"".join(bytes(memoryview(part).cast("B")) for part in encode(value))
    body = pool.take(len(message))
    body[:] = message
    return body


def _numpy_value() -> np.ndarray:
    return np.arange(MIB, dtype=np.float32).reshape(1024, 1024)


def _table() -> pa.Table:
    return pa.table({"x": pa.array(np.arange(MIB // 2, dtype=np.int64)), "y": ["a"] * (MIB // 2)})


def _torch() -> Any:
    return pytest.importorskip("torch")


# (what is sent, what the receiver keeps of the decoded value, the kept values as bytes)
KEEPERS: dict[str, tuple[Callable[[], object], Callable[[Any], Any], Callable[[Any], bytes]]] = {
    "array": (_numpy_value, lambda v: v, lambda k: k.tobytes()),
    "slice": (_numpy_value, lambda v: v[3:7, ::2], lambda k: k.tobytes()),
    "reshape": (_numpy_value, lambda v: v.reshape(-1), lambda k: k.tobytes()),
    "transpose": (_numpy_value, lambda v: v.T, lambda k: k.tobytes()),
    "element view": (_numpy_value, lambda v: v[5], lambda k: k.tobytes()),
    "memoryview": (
        _numpy_value,
        lambda v: memoryview(v.reshape(-1))[8:4096],
        lambda k: k.tobytes(),
    ),
    "asarray of a view": (_numpy_value, lambda v: np.asarray(v[1:]), lambda k: k.tobytes()),
    "nested": (
        lambda: {"a": [(_numpy_value(), b"x" * 10)]},
        lambda v: v["a"][0],
        lambda k: k[0].tobytes() + k[1],
    ),
    "arrow table": (_table, lambda v: v, lambda k: k.column("x").to_numpy().tobytes()),
    "arrow column": (_table, lambda v: v.column("x"), lambda k: k.to_numpy().tobytes()),
    "arrow slice": (_table, lambda v: v.slice(10, 100), lambda k: str(k.to_pydict()).encode()),
    "arrow batch": (
        lambda: _table().to_batches()[0],
        lambda v: v,
        lambda k: str(k.slice(0, 50).to_pydict()).encode(),
    ),
    "arrow to numpy": (
        _table,
        lambda v: v.column("x").chunk(0).to_numpy(zero_copy_only=True),
        lambda k: k.tobytes(),
    ),
    "torch tensor": (
        lambda: _torch().arange(MIB, dtype=_torch().float32),
        lambda v: v[100:200].view(10, 10),
        lambda k: k.numpy().tobytes(),
    ),
    "torch from numpy": (
        _numpy_value,
        lambda v: _torch().from_numpy(v).t(),
        lambda k: k.contiguous().numpy().tobytes(),
    ),
}


@pytest.mark.parametrize("name", KEEPERS)
def test_a_kept_part_of_a_decoded_value_keeps_its_buffer_out_of_the_pool(name: str) -> None:
    make, keep, snapshot = KEEPERS[name]
    pool = BufferPool(max_bytes=64 * MIB)
    body = _received(pool, make())
    size = len(body)
    kept = keep(decode(body))
    del body
    gc.collect()
    before = snapshot(kept)
    assert pool.free_bytes == 0  # still viewed: not back in the pool
    other = pool.take(size)  # the next message of the same size: never the kept one's buffer
    other[:] = b"\xa5" * size
    assert snapshot(kept) == before
    del kept
    gc.collect()
    assert pool.free_bytes >= size  # the last view gone: back


def test_a_value_kept_by_another_thread_returns_its_buffer_when_that_thread_drops_it() -> None:
    pool = BufferPool(max_bytes=64 * MIB)
    body = _received(pool, _numpy_value())
    handed = decode(body)
    del body
    dropped = threading.Event()

    def worker(value: list[np.ndarray]) -> None:
        value.pop()
        dropped.set()

    box = [handed]
    del handed
    thread = threading.Thread(target=worker, args=(box,))
    thread.start()
    thread.join(WAIT)
    assert dropped.is_set() and pool.free_bytes > 0


class _GcOnClock:
    """Stands in for `time` in the pool's module: a garbage collection pass starts at the
    pool's clock read, as one can start at any allocation while the pool holds its lock."""

    def __init__(self) -> None:
        import time

        self._time = time

    def monotonic(self) -> float:
        gc.collect()
        return self._time.monotonic()


def test_a_buffer_freed_by_a_collection_inside_the_pool_does_not_deadlock_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A decoded tensor held in a reference cycle (an exception's traceback, say) is freed by
    the cyclic collector, which can run inside the pool's own locked code: the finalizer that
    returns the buffer must not wait for a lock its own thread holds."""
    pool = BufferPool(max_bytes=64 * MIB)
    spare = pool.take(2 * MIB)
    del spare  # one free buffer, so `take` looks through the pool
    cycle: list[Any] = [pool.take(2 * MIB)]
    cycle.append(cycle)  # only the cyclic collector can free it
    del cycle
    monkeypatch.setattr(buffers, "time", _GcOnClock())
    done = threading.Event()

    def take() -> None:
        pool.take(2 * MIB)
        done.set()

    thread = threading.Thread(target=take, daemon=True)  # a deadlocked one must not block exit
    thread.start()
    thread.join(WAIT)
    assert done.is_set(), "the pool deadlocked returning a buffer freed inside its lock"
    assert pool.free_bytes == 2 * MIB  # the buffer freed by the collection came back


def test_returns_from_many_threads_keep_the_pool_bound_and_its_count() -> None:
    pool = BufferPool(max_bytes=8 * MIB)
    views = [pool.take(2 * MIB) for _ in range(16)]
    start = threading.Barrier(8)

    def drop(mine: list[memoryview]) -> None:
        start.wait(WAIT)
        mine.clear()

    shares = [views[index::8] for index in range(8)]
    del views
    threads = [threading.Thread(target=drop, args=(share,)) for share in shares]
    del shares
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    gc.collect()
    assert pool.free_bytes == 8 * MIB
    assert sum(len(array) for _, array in pool._free) == pool.free_bytes


LOOPBACK = ["/ip4/127.0.0.1/udp/0/quic-v1"]
CHUNK = 2 * MIB


async def test_over_quic_kept_arguments_and_streamed_chunks_are_never_overwritten() -> None:
    """A server handler keeps each received argument after it returned, and the client keeps
    every chunk of a server stream while more of the same size arrive: every kept array keeps
    its values, though the pool serves the traffic (bodies of the same size all along)."""
    from lattica_ray import Node
    from lattica_ray.rpc.buffers import receive_buffers

    async with Node(listen=LOOPBACK) as server, Node(listen=LOOPBACK) as client:
        client.add_peer_addrs(server.peer_id, server.addrs)
        kept_by_server: list[np.ndarray] = []

        @server.rpc.method()
        async def keep(array: np.ndarray) -> int:
            kept_by_server.append(array)
            return len(kept_by_server)

        @server.rpc.method()
        async def chunks(count: int):
            for index in range(count):
                yield np.full(CHUNK, index, dtype=np.uint8)

        @server.rpc.method()
        async def drop() -> None:
            kept_by_server.clear()

        peer = server.peer_id
        reused = receive_buffers.reused
        for value in range(6):
            await client.rpc.call(peer, "keep", np.full(CHUNK, value, np.uint8), timeout=WAIT)
            if value in (1, 3):  # let some go: the pool gets them back and hands them out again
                await client.rpc.call(peer, "drop", timeout=WAIT)
                gc.collect()
        received = [chunk async for chunk in client.rpc.stream(peer, "chunks", 8, timeout=WAIT)]
        kept_every_other = received[::2]
        del received
        gc.collect()
        more = [chunk async for chunk in client.rpc.stream(peer, "chunks", 8, timeout=WAIT)]
        assert receive_buffers.reused > reused  # the pool did serve this traffic
        assert [int(a[0]) for a in kept_by_server] == [4, 5]
        assert all((a == a[0]).all() for a in kept_by_server)
        assert [int(chunk[0]) for chunk in kept_every_other] == [0, 2, 4, 6]
        assert all((chunk == chunk[0]).all() for chunk in kept_every_other)
        assert all((chunk == index).all() for index, chunk in enumerate(more))


def test_a_body_cut_short_returns_its_buffer_and_the_next_message_reuses_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A peer announces a big message and its stream dies mid-body: the half-filled buffer
    comes back (no leak), and the next message gets it filled with its own bytes only."""
    from lattica_ray.rpc import protocol

    pool = BufferPool(max_bytes=64 * MIB)
    monkeypatch.setattr(protocol, "receive_buffers", pool)
    size = 8 * MIB
    cut = protocol.FrameDecoder(max_message_size=64 * MIB)
    assert cut.feed(protocol.frame_prefix(protocol.FrameType.MESSAGE, size) + b"\x01" * 1000) == []
    del cut  # the stream died
    gc.collect()
    assert pool.free_bytes == size
    whole = protocol.FrameDecoder(max_message_size=64 * MIB)
    body = bytes(range(256)) * (size // 256)
    frames = whole.feed(protocol.frame_prefix(protocol.FrameType.MESSAGE, size) + body)
    assert pool.reused == 1 and len(frames) == 1
    assert bytes(frames[0][1]) == body
