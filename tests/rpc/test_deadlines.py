"""The shared deadline timer of unary calls (`service._Deadlines`), on real `_OutboundCall`s
(never started: no network is needed to watch their deadlines).

One timer for all calls in flight; a call is expired (its caller's task cancelled) once its
deadline plus grace passed, in deadline order, and never after it ended; an expiry looks at
the calls that are due, not at every call in flight; ended calls are neither kept alive nor
piled up.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator

import pytest

from lattica_ray.rpc import RpcConfig, RpcService
from lattica_ray.rpc.protocol import CallKind
from lattica_ray.rpc.service import _OutboundCall
from transport.memory_host import MemoryNetwork

WAIT = 10.0
GRACE = 0.01


class Expired(list[int]):
    """The calls expired, in order; `wait_for(n)` until n of them were."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = asyncio.Event()

    def add(self, number: int) -> None:
        self.append(number)
        self.changed.set()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(WAIT):
            while len(self) < count:
                self.changed.clear()
                await self.changed.wait()


class CallerTask:
    """Stands in for a caller's task: its cancellation records that the call expired."""

    def __init__(self, expired: Expired, number: int) -> None:
        self.expired, self.number = expired, number

    def cancel(self) -> None:
        self.expired.add(self.number)


class Touched(_OutboundCall):
    """An `_OutboundCall` that counts every look at it (attribute or method)."""

    looks = 0

    def __getattribute__(self, name: str) -> object:
        type(self).looks += 1
        return super().__getattribute__(name)


@pytest.fixture
async def service() -> AsyncIterator[RpcService]:
    host = MemoryNetwork().add_host()
    rpc = RpcService(host, RpcConfig(max_outbound_calls=100_000, deadline_grace=GRACE))
    await rpc.start()
    try:
        yield rpc
    finally:
        await rpc.stop()


def _watched(service: RpcService, timeout: float, expired: Expired, number: int) -> _OutboundCall:
    peer = service.host.peer_id
    call = service._new_call(peer, "m", CallKind.UNARY, (), {}, None, timeout, None)
    call.task = CallerTask(expired, number)  # type: ignore[assignment]
    service._deadlines.watch(call)
    return call


def _live_timers() -> int:
    loop = asyncio.get_running_loop()
    return sum(not handle.cancelled() for handle in loop._scheduled)  # type: ignore[attr-defined]


async def test_calls_expire_in_deadline_order_on_one_timer(service: RpcService) -> None:
    """Deadlines watched out of order expire in order, each not before its deadline plus
    grace, all on one timer; calls that ended first are never expired."""
    loop = asyncio.get_running_loop()
    timers = _live_timers()
    expired = Expired()
    timeouts = [0.09, 0.03, 0.15, 0.06, 0.12, 0.03]
    calls = [_watched(service, t, expired, n) for n, t in enumerate(timeouts)]
    assert _live_timers() == timers + 1
    calls[3].abort("ended first")  # 0.06
    calls[2].abort("ended first")  # 0.15
    await expired.wait_for(4)
    assert expired == [1, 5, 0, 4]  # 0.03 (in the order watched), 0.03, 0.09, 0.12
    for call in calls:
        if call.expired:
            assert call.expiry is not None and loop.time() >= call.expiry
    assert not calls[2].expired and not calls[3].expired
    assert _live_timers() == timers  # nothing left to time: no timer


async def test_an_expiry_looks_only_at_the_calls_that_are_due(service: RpcService) -> None:
    """2000 calls in flight, deadlines 100 us apart: the timer fires many times, and all it
    does costs each call a few looks, not a look at every call in flight per firing (which
    was ~n^2/2 looks in all)."""
    expired = Expired()
    calls = []
    for number in range(2000):
        call = _watched(service, 0.05 + number * 1e-4, expired, number)
        call.__class__ = Touched
        calls.append(call)
    Touched.looks = 0
    await expired.wait_for(len(calls))
    assert Touched.looks <= 5 * len(calls), Touched.looks
    assert expired == list(range(len(calls)))


async def test_ended_calls_are_not_kept(service: RpcService) -> None:
    """Calls that end long before their deadline: not kept alive by the timer's records, and
    those records do not pile up beyond the calls in flight."""
    expired = Expired()
    deadlines = service._deadlines
    live = [_watched(service, 60.0, expired, -1) for _ in range(10)]
    for number in range(20_000):
        call = _watched(service, 60.0, expired, number)
        ref = weakref.ref(call)
        call.abort("done")
        del call
        assert ref() is None
        records = len(deadlines._new) + len(deadlines._heap)
        assert records <= 3 * (len(live) + 1) + 2 * 65, records
    gc.collect()
    assert expired == []
    for call in live:
        call.abort("done")
