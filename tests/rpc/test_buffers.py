"""The pool of large receive buffers: reuse, and never while a decoded tensor still views one."""

from __future__ import annotations

import gc

import numpy as np

from lattica_ray import Node
from lattica_ray.rpc.buffers import MIB, BufferPool, receive_buffers

LOOPBACK = ["/ip4/127.0.0.1/udp/0/quic-v1"]
WAIT = 10.0


def _address(view: memoryview) -> int:
    return np.frombuffer(view, dtype=np.uint8).ctypes.data


def test_a_returned_buffer_serves_the_next_message_of_its_size() -> None:
    pool = BufferPool(max_bytes=16 * MIB)
    first = pool.take(4 * MIB)
    address = _address(first)
    del first
    gc.collect()
    assert pool.free_bytes == 4 * MIB
    second = pool.take(3 * MIB)  # at least half the buffer: served from it
    assert len(second) == 3 * MIB and _address(second) == address
    assert pool.reused == 1 and pool.free_bytes == 0


def test_a_buffer_stays_out_while_a_view_over_it_lives() -> None:
    pool = BufferPool(max_bytes=16 * MIB)
    body = pool.take(2 * MIB)
    tensor = np.frombuffer(body, dtype=np.float32)  # what the codec hands the application
    tensor[:] = 7
    del body
    gc.collect()
    assert pool.free_bytes == 0
    other = pool.take(2 * MIB)
    np.frombuffer(other, dtype=np.uint8)[:] = 0
    assert (tensor == 7).all()
    del tensor
    gc.collect()
    assert pool.free_bytes == 2 * MIB


def test_the_pool_keeps_at_most_max_bytes_and_no_small_or_mismatched_buffers() -> None:
    pool = BufferPool(max_bytes=6 * MIB)
    views = [pool.take(4 * MIB), pool.take(4 * MIB), pool.take(MIB // 2), pool.take(8 * MIB)]
    del views
    gc.collect()
    assert pool.free_bytes == 4 * MIB  # one 4 MiB buffer: the second would pass the cap,
    # the small one is below min_size, the 8 MiB one is bigger than the whole cap
    assert _address(pool.take(MIB)) != 0 and pool.reused == 0  # 4 MiB is over twice 1 MiB


def test_idle_buffers_are_dropped() -> None:
    pool = BufferPool(max_bytes=16 * MIB, idle_seconds=0.0)
    returned = pool.take(2 * MIB)
    del returned
    gc.collect()
    assert pool.free_bytes == 2 * MIB
    kept = pool.take(2 * MIB)  # the returned one was idle too long: a new one
    assert len(kept) == 2 * MIB and pool.reused == 0 and pool.free_bytes == 0


async def test_a_result_held_by_the_caller_is_not_overwritten_by_the_next_call() -> None:
    """Over real QUIC: the second 4 MiB result reuses the first's buffer only once the caller
    has dropped it, and a held result keeps its values."""
    gc.collect()
    receive_buffers.clear()  # earlier tests' buffers could serve the third call instead
    async with Node(listen=LOOPBACK) as server, Node(listen=LOOPBACK) as client:
        client.add_peer_addrs(server.peer_id, server.addrs)

        @server.rpc.method()
        async def fill(value: int) -> np.ndarray:
            return np.full(4 * MIB, value, dtype=np.uint8)

        peer = server.peer_id
        first = await client.rpc.call(peer, "fill", 1, timeout=WAIT)
        second = await client.rpc.call(peer, "fill", 2, timeout=WAIT)
        assert (first == 1).all() and (second == 2).all()
        assert first.ctypes.data != second.ctypes.data
        reused = receive_buffers.reused
        address = first.ctypes.data
        del first
        gc.collect()
        third = await client.rpc.call(peer, "fill", 3, timeout=WAIT)
        assert (third == 3).all() and (second == 2).all()
        assert receive_buffers.reused > reused
        assert third.ctypes.data == address
