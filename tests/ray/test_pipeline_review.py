"""Review of pipelined calls without Ray: claims for calls that never come, the limits on
unclaimed calls, and a call cancelled before its task first ran (as the LatticaActor's loop
does to every task when it stops)."""

from __future__ import annotations

import asyncio

import pytest

from lattica_ray.ray.errors import CallLimitExceeded, CallLost
from lattica_ray.ray.pipeline import PendingCalls

WAIT = 5.0


async def _value(value: object) -> object:
    return value


async def test_a_claim_for_a_call_id_nobody_sent_fails_and_a_late_request_is_not_run() -> None:
    calls = PendingCalls(arrival_timeout=0.2)
    with pytest.raises(CallLost, match="did not reach"):
        await asyncio.wait_for(calls.claim("never-sent"), WAIT)
    ran: list[str] = []

    async def start() -> str:
        ran.append("late")
        return "late"

    calls.arrive("never-sent", start)
    await asyncio.sleep(0)  # one loop turn: a task started now would have run its first step
    assert ran == [] and calls.unclaimed == 0 and not calls._claimed
    assert calls.stats.lost == 1


async def test_unclaimed_calls_past_the_limit_are_refused_and_their_claims_say_so() -> None:
    calls = PendingCalls(max_unclaimed=2)
    for index in range(3):
        calls.arrive(f"c{index}", lambda index=index: _value(index))
    assert calls.unclaimed == 2 and calls.stats.refused == 1
    with pytest.raises(CallLimitExceeded):
        await asyncio.wait_for(calls.claim("c2"), WAIT)
    assert await asyncio.wait_for(calls.claim("c0"), WAIT) == 0
    assert await asyncio.wait_for(calls.claim("c1"), WAIT) == 1
    assert calls.unclaimed == 0 and len(calls._failed) <= 2


async def test_a_claimed_call_cancelled_before_its_task_first_ran_still_ends_its_claim() -> None:
    """The claim comes first; the request arrives and, in the same loop turn, every task is
    cancelled (what `LoopThread.stop` does when the LatticaActor shuts down). The task never
    ran, so `_run` never handed an outcome over: the claim must still end, not wait forever."""
    calls = PendingCalls()
    claim = asyncio.ensure_future(calls.claim("c1"))
    try:
        async with asyncio.timeout(WAIT):
            while not calls._claimed:  # noqa: ASYNC110 (state the claim task changes)
                await asyncio.sleep(0)
        calls.arrive("c1", lambda: _value("one"))
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task() and task is not claim:
                task.cancel()  # before its first step
        with pytest.raises((asyncio.CancelledError, CallLost)):
            await asyncio.wait_for(asyncio.shield(claim), WAIT)
    finally:
        claim.cancel()
