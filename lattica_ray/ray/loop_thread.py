"""An asyncio loop on its own thread, for the Node inside the LatticaActor.

Ray runs each concurrency group of an async actor on its own event loop (its own thread), but a
Node's sockets and tasks belong to one loop. So the Node lives here, and actor methods in any
group hand it coroutines with `await loop_thread.run(coro)`: the result comes back to the
caller's loop, and cancelling the caller cancels the coroutine on the Node's loop. A coroutine
already on the Node's loop is simply awaited.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_END = object()


class LoopThread:
    """A daemon thread running one event loop until `stop()`."""

    def __init__(self, name: str = "lattica-node") -> None:
        # asyncio's own loop, whatever the policy: Ray workers install uvloop's policy when
        # uvloop is there, and the Node on uvloop spent more CPU per remote call (the serving
        # LatticaActor's loop thread, pipelined calls: 765-770 us vs 485 us per call).
        self.loop: asyncio.AbstractEventLoop = asyncio.SelectorEventLoop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed()

    def _here(self) -> bool:
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    def run_sync(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the loop and block this (other) thread for its result."""
        if self._here():
            coro.close()
            raise RuntimeError("run_sync would block the loop it waits for: await run() instead")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"did not finish within {timeout} s") from None

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await `coro` running on the loop (from any loop; on the loop itself, directly)."""
        if self._here():
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def iterate(self, source: AsyncIterator[T], buffer: int = 4) -> AsyncIterator[T]:
        """Items of `source` (iterated on the loop by one task) from another loop.

        At most `buffer` items are read ahead. Closing or cancelling the consumer cancels the
        pump, which closes `source`; an exception in `source` reaches the consumer.
        """
        if self._here():
            try:
                async for item in source:
                    yield item
            finally:
                aclose = getattr(source, "aclose", None)
                if aclose is not None:
                    await aclose()
            return
        queue: asyncio.Queue[Any] = asyncio.Queue(buffer)  # used on the thread's loop only

        async def pump() -> None:
            try:
                async for item in source:
                    await queue.put((item, None))
                await queue.put((_END, None))
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                await queue.put((_END, exc))
            finally:
                aclose = getattr(source, "aclose", None)
                if aclose is not None:
                    await aclose()

        async def start() -> asyncio.Task[None]:
            return asyncio.get_running_loop().create_task(pump())

        task = await self.run(start())
        try:
            while True:
                item, error = await self.run(queue.get())
                if item is _END:
                    if error is not None:
                        raise error
                    return
                yield item
        finally:
            if not task.done():
                self.loop.call_soon_threadsafe(task.cancel)

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel what still runs on the loop, stop it and join the thread."""
        if not self.running:
            return

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run_sync(cancel_all(), timeout)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
