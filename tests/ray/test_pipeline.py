"""Pipelined calls without Ray: `PendingCalls` pairing requests with the claims of their
results (in both orders, across threads, with cancellation, expiry and limits), and the pipe
itself over a real abstract Unix socket."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading

import pytest

from lattica_ray.ray.errors import CallLimitExceeded, CallLost
from lattica_ray.ray.pipeline import PendingCalls, PipeClient, PipeEndpoint, PipeServer
from tests.ray.test_direct_call import send_frame_as_nobody


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Remote:
    """Stands in for the remote call: records starts and cancellations, finishes on demand."""

    def __init__(self) -> None:
        self.started: list[object] = []
        self.cancelled: list[object] = []
        self.release = asyncio.Event()

    def call(self, value: object, fail: bool = False):
        async def run():
            self.started.append(value)
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled.append(value)
                raise
            if fail:
                raise ValueError(f"remote failure {value}")
            return value

        return run


async def _until(predicate, what: str, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 (state other tasks and threads change)
            await asyncio.sleep(0)  # one loop turn at a time: no fixed sleeps
    assert predicate(), what


async def test_a_request_runs_at_once_and_its_result_waits_for_the_claim():
    calls, remote = PendingCalls(), Remote()
    calls.arrive("c1", remote.call("one"))
    await _until(lambda: remote.started == ["one"], "the call started before any claim")
    assert calls.unclaimed == 1
    remote.release.set()
    await _until(lambda: calls.stats.arrived == 1 and not remote.cancelled, "call ran")
    assert await calls.claim("c1") == "one"
    assert calls.unclaimed == 0 and calls.stats.claimed == 1


async def test_a_claim_that_comes_first_waits_for_its_request():
    calls, remote = PendingCalls(), Remote()
    claim = asyncio.ensure_future(calls.claim("c1"))
    await _until(lambda: calls.stats.claimed == 1, "claim registered")
    assert not remote.started
    calls.arrive("c1", remote.call("one"))
    remote.release.set()
    assert await asyncio.wait_for(claim, 5) == "one"
    assert calls.unclaimed == 0


async def test_the_remote_error_reaches_the_claim():
    calls, remote = PendingCalls(), Remote()
    remote.release.set()
    calls.arrive("c1", remote.call("one", fail=True))
    with pytest.raises(ValueError, match="remote failure one"):
        await calls.claim("c1")


async def test_a_claim_on_another_threads_loop_gets_the_result():
    """The LatticaActor claims on Ray's loop, while calls run on the Node's loop."""
    calls, remote = PendingCalls(), Remote()
    result: list[object] = []
    claimed = threading.Event()

    def claimer() -> None:
        async def run() -> None:
            task = asyncio.ensure_future(calls.claim("c1"))
            claimed.set()
            result.append(await task)

        asyncio.run(run())

    thread = threading.Thread(target=claimer)
    thread.start()
    try:
        await _until(lambda: calls.stats.claimed == 1, "the other thread claimed")
        calls.arrive("c1", remote.call("one"))
        remote.release.set()
        await _until(lambda: not thread.is_alive(), "the other thread got its result")
    finally:
        remote.release.set()
        thread.join(5)
    assert result == ["one"]


async def test_cancelling_the_claim_cancels_the_running_call():
    calls, remote = PendingCalls(), Remote()
    calls.arrive("c1", remote.call("one"))
    claim = asyncio.ensure_future(calls.claim("c1"))
    await _until(lambda: remote.started == ["one"] and calls.stats.claimed == 1, "running")
    claim.cancel()
    with pytest.raises(asyncio.CancelledError):
        await claim
    await _until(lambda: remote.cancelled == ["one"], "the call was cancelled")


async def test_a_claim_cancelled_before_its_request_keeps_the_call_from_running():
    calls, remote = PendingCalls(), Remote()
    claim = asyncio.ensure_future(calls.claim("c1"))
    await _until(lambda: calls.stats.claimed == 1, "claim registered")
    claim.cancel()
    with pytest.raises(asyncio.CancelledError):
        await claim
    calls.arrive("c1", remote.call("one"))
    await asyncio.sleep(0)
    assert remote.started == [] and calls.unclaimed == 0


async def test_unclaimed_calls_are_cancelled_and_dropped_after_the_claim_timeout():
    clock = Clock()
    calls, remote = PendingCalls(claim_timeout=10.0, clock=clock), Remote()
    calls.arrive("old", remote.call("old"))
    clock.now += 6
    calls.arrive("new", remote.call("new"))
    await _until(lambda: len(remote.started) == 2, "both started")
    clock.now += 5  # "old" is 11 s old, "new" 5 s
    calls.expire()
    await _until(lambda: remote.cancelled == ["old"], "the old call was cancelled")
    assert calls.stats.dropped == 1 and calls.unclaimed == 1
    with pytest.raises(CallLost, match=r"not collected within 10\.0 s"):
        await calls.claim("old")
    remote.release.set()
    assert await calls.claim("new") == "new"


async def test_requests_beyond_the_unclaimed_limit_are_refused_with_a_clear_error():
    calls, remote = PendingCalls(max_unclaimed=2), Remote()
    for call_id in ("c1", "c2", "c3"):
        calls.arrive(call_id, remote.call(call_id))
    await _until(lambda: len(remote.started) == 2, "two started")
    assert remote.started == ["c1", "c2"] and calls.stats.refused == 1
    with pytest.raises(CallLimitExceeded, match="pipeline_max_unclaimed"):
        await calls.claim("c3")
    remote.release.set()
    assert await calls.claim("c1") == "c1"
    calls.arrive("c4", remote.call("c4"))  # room again
    assert await calls.claim("c4") == "c4"


async def test_a_claim_whose_request_never_comes_fails_and_the_late_request_is_not_run():
    calls, remote = PendingCalls(arrival_timeout=0.05), Remote()
    with pytest.raises(CallLost, match="did not reach"):
        await calls.claim("c1")
    assert calls.stats.lost == 1
    calls.arrive("c1", remote.call("late"))
    await asyncio.sleep(0)
    assert remote.started == []


async def test_a_malformed_request_fails_its_claim():
    calls = PendingCalls()
    claim = asyncio.ensure_future(calls.claim("c1"))
    await _until(lambda: calls.stats.claimed == 1, "claim registered")
    calls.fail("c1", ValueError("malformed pipelined call request"))
    with pytest.raises(ValueError, match="malformed"):
        await asyncio.wait_for(claim, 5)


async def test_requests_over_the_pipe_start_their_calls():
    calls = PendingCalls()
    seen: list[dict] = []

    async def start(request: dict) -> object:
        seen.append(request)
        return request["args"][0] * 2

    server = PipeServer(calls, start, max_frame_bytes=1 << 20)
    await server.start()
    client = PipeClient(PipeEndpoint(server.address, "inc", "node"))
    try:
        request = {"actor": {}, "method": "double", "timeout": None, "args": [21], "kwargs": {}}
        call_ids = [client.send(request), client.send(request)]
        assert None not in call_ids and call_ids[0] != call_ids[1]
        assert await asyncio.wait_for(calls.claim(call_ids[1]), 5) == 42
        assert await asyncio.wait_for(calls.claim(call_ids[0]), 5) == 42
        assert seen[0]["method"] == "double" and seen[0]["call"] == call_ids[0]
    finally:
        client.close()
        await server.stop()


async def test_a_stopped_pipe_refuses_sends_and_the_client_says_so():
    server = PipeServer(PendingCalls(), lambda request: asyncio.sleep(0), 1 << 20)
    await server.start()
    client = PipeClient(PipeEndpoint(server.address, "inc", "node"))
    await server.stop()
    await asyncio.sleep(0)
    request = {"actor": {}, "method": "m", "timeout": None, "args": [b"x" * 4096], "kwargs": {}}
    # the first sends may still land in the socket buffer; then the broken pipe shows
    for _ in range(1000):
        if client.send(request) is None:
            break
        await asyncio.sleep(0.001)
    assert client.closed and client.send(request) is None
    with pytest.raises(ConnectionRefusedError):
        PipeClient(PipeEndpoint(server.address, "inc", "node"))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
async def test_other_users_cannot_send_requests():
    calls = PendingCalls()
    server = PipeServer(calls, lambda request: asyncio.sleep(0), 1 << 20)
    await server.start()
    fork = multiprocessing.get_context("fork")
    answer = fork.Queue()
    request = {"call": "x-1", "actor": {}, "method": "m", "args": [], "kwargs": {}}
    child = fork.Process(target=send_frame_as_nobody, args=(server.address, request, answer))
    child.start()
    try:
        assert await asyncio.to_thread(answer.get, timeout=20) == "refused"
    finally:
        await asyncio.to_thread(child.join, 10)
        await server.stop()
    assert calls.stats.arrived == 0
