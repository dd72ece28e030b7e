"""LoopThread: results, errors, cancellation and streams cross between event loops."""

from __future__ import annotations

import asyncio
import threading

import pytest

from lattica_ray.ray.loop_thread import LoopThread


@pytest.fixture
def loop_thread():
    thread = LoopThread("test-loop")
    try:
        yield thread
    finally:
        thread.stop()
    assert not thread.running


async def test_run_returns_results_and_errors_from_the_other_loop(loop_thread):
    async def where() -> str:
        return threading.current_thread().name

    assert await loop_thread.run(where()) == "test-loop"

    async def fail() -> None:
        raise KeyError("k")

    with pytest.raises(KeyError):
        await loop_thread.run(fail())
    assert loop_thread.run_sync(where(), timeout=5) == "test-loop"


async def test_cancelling_the_caller_cancels_the_coroutine_there(loop_thread):
    started, cancelled = threading.Event(), threading.Event()

    async def wait_forever() -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    call = asyncio.create_task(loop_thread.run(wait_forever()))
    await asyncio.to_thread(started.wait, 5)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert await asyncio.to_thread(cancelled.wait, 5)


async def test_iterate_streams_items_and_the_error_after_them(loop_thread):
    async def numbers():
        for i in range(5):
            yield i
        raise RuntimeError("source failed")

    received = []
    with pytest.raises(RuntimeError, match="source failed"):
        async for item in loop_thread.iterate(numbers(), buffer=2):
            received.append(item)
    assert received == [0, 1, 2, 3, 4]


async def test_leaving_the_stream_early_closes_the_source(loop_thread):
    closed = threading.Event()

    async def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    stream = loop_thread.iterate(endless())
    async for item in stream:
        if item == 3:
            break
    await stream.aclose()
    assert await asyncio.to_thread(closed.wait, 5)


def test_run_sync_timeout(loop_thread):
    with pytest.raises(TimeoutError, match=r"within 0\.1 s"):
        loop_thread.run_sync(asyncio.sleep(10), timeout=0.1)


def test_a_coroutine_already_on_the_loop_is_awaited_there(loop_thread):
    async def where() -> str:
        return threading.current_thread().name

    async def nested() -> tuple[str, list[int]]:
        async def items():
            yield 1
            yield 2

        got = [i async for i in loop_thread.iterate(items())]
        return await loop_thread.run(where()), got

    assert loop_thread.run_sync(nested(), timeout=5) == ("test-loop", [1, 2])

    async def blocking() -> None:
        loop_thread.run_sync(where())

    with pytest.raises(RuntimeError, match="would block the loop"):
        loop_thread.run_sync(blocking(), timeout=5)
