"""RpcService over an in-memory network: every call kind, errors, deadlines, cancellation, limits.

Every test tears down its services and hosts, and the fixture checks no task was left behind.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from lattica_ray.rpc import (
    PROTOCOL_ID,
    CallKind,
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    MessageTooLarge,
    MethodNotFound,
    PeerUnavailable,
    ProtocolError,
    RemoteError,
    ResourceExhausted,
    RpcConfig,
    RpcService,
    StatusCode,
    WrongCallKind,
    codec,
    current_call,
)
from lattica_ray.rpc.protocol import (
    ClientCall,
    FrameType,
    Header,
    Status,
    encode_frame,
)
from lattica_ray.rpc.registry import make_method
from transport.memory_host import MemoryHost, MemoryNetwork

WAIT = 5.0  # seconds any awaited event may take before the test fails


async def wait_for(event: asyncio.Event | threading.Event, what: str) -> None:
    """Wait for an event (async or set from a handler thread), failing clearly on timeout."""
    try:
        if isinstance(event, asyncio.Event):
            await asyncio.wait_for(event.wait(), WAIT)
        else:
            assert await asyncio.to_thread(event.wait, WAIT), what
    except TimeoutError:
        pytest.fail(f"timed out waiting for: {what}")


@dataclass
class Pair:
    network: MemoryNetwork
    client: RpcService
    server: RpcService
    client_host: MemoryHost
    server_host: MemoryHost

    @property
    def peer(self) -> Any:
        return self.server_host.peer_id


PairFactory = Callable[..., Awaitable[Pair]]


@pytest.fixture
async def make_pair() -> AsyncIterator[PairFactory]:
    created: list[Pair] = []
    loop_errors: list[dict[str, Any]] = []  # "Task exception was never retrieved" and the like
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: loop_errors.append(context))

    async def make(
        client_config: RpcConfig | None = None, server_config: RpcConfig | None = None
    ) -> Pair:
        network = MemoryNetwork()
        client_host, server_host = network.add_host(), network.add_host()
        client = RpcService(client_host, client_config)
        server = RpcService(server_host, server_config)
        pair = Pair(network, client, server, client_host, server_host)
        created.append(pair)
        await client.start()
        await server.start()
        return pair

    yield make
    for pair in created:
        await pair.client.stop()
        await pair.server.stop()
        await pair.client_host.aclose()
        await pair.server_host.aclose()
    leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert not leftover, f"tasks left running: {leftover}"
    gc.collect()  # unretrieved task exceptions are reported when the task is collected
    loop.set_exception_handler(None)
    assert not loop_errors, f"errors nobody handled: {loop_errors}"


@pytest.fixture
async def pair(make_pair: PairFactory) -> Pair:
    return await make_pair()


async def numbers(n: int, start: int = 0) -> AsyncIterator[int]:
    for i in range(start, start + n):
        yield i


# -- every call kind --------------------------------------------------------------------------
async def test_unary_async_with_args_kwargs_and_arrays(pair: Pair) -> None:
    @pair.server.method("scale")
    async def scale(array: np.ndarray, factor: float = 1.0, *, label: str = "") -> dict[str, Any]:
        return {"array": array * factor, "label": label}

    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    result = await pair.client.call(pair.peer, "scale", array, 2.0, label="x")
    assert result["label"] == "x"
    np.testing.assert_array_equal(result["array"], array * 2)
    assert result["array"].dtype == np.float32 and result["array"].shape == (3, 4)


async def test_unary_sync_handler_runs_in_the_thread_pool(pair: Pair) -> None:
    @pair.server.method()
    def where(a: int) -> list[Any]:
        return [threading.current_thread().name, a + 1]

    thread, value = await pair.client.call(pair.peer, "where", 41)
    assert value == 42 and thread.startswith("rpc-handler")


async def test_server_streaming_async_and_sync(pair: Pair) -> None:
    @pair.server.method("count")
    async def count(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    @pair.server.method("count_sync")
    def count_sync(n: int) -> Iterator[int]:
        yield from range(n)

    assert [x async for x in pair.client.stream(pair.peer, "count", 50)] == list(range(50))
    assert [x async for x in pair.client.stream(pair.peer, "count_sync", 50)] == list(range(50))
    assert [x async for x in pair.client.stream(pair.peer, "count", 0)] == []


async def test_client_streaming_async_and_sync(pair: Pair) -> None:
    @pair.server.method("total")
    async def total(requests: AsyncIterator[int], start: int = 0) -> int:
        return start + sum([r async for r in requests])

    @pair.server.method("total_sync")
    def total_sync(offset: int, requests: Iterator[int]) -> int:
        return offset + sum(requests)

    assert await pair.client.call(pair.peer, "total", requests=numbers(100), start=5) == 4955
    assert await pair.client.call(pair.peer, "total_sync", 1, requests=numbers(10)) == 46
    assert await pair.client.call(pair.peer, "total", requests=numbers(0)) == 0


async def test_bidirectional_async_and_sync(pair: Pair) -> None:
    @pair.server.method("double")
    async def double(requests: AsyncIterator[int]) -> AsyncIterator[int]:
        async for r in requests:
            yield 2 * r

    @pair.server.method("double_sync")
    def double_sync(requests: Iterator[int]) -> Iterator[int]:
        for r in requests:
            yield 2 * r

    for name in ("double", "double_sync"):
        responses = pair.client.stream(pair.peer, name, requests=numbers(20))
        assert [x async for x in responses] == [2 * i for i in range(20)]


async def test_bidirectional_is_interactive(pair: Pair) -> None:
    """Each response arrives before the next request is produced (no batching, no deadlock)."""

    @pair.server.method("echo")
    async def echo(requests: AsyncIterator[int]) -> AsyncIterator[int]:
        async for r in requests:
            yield r

    queue: asyncio.Queue[int | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[int]:
        while (item := await queue.get()) is not None:
            yield item

    async with pair.client.stream(pair.peer, "echo", requests=requests()) as responses:
        for i in range(5):
            queue.put_nowait(i)
            assert await asyncio.wait_for(anext(responses), WAIT) == i
        queue.put_nowait(None)
        assert [x async for x in responses] == []


async def test_metadata_and_call_context_reach_the_handler(pair: Pair) -> None:
    @pair.server.method()
    async def whoami() -> list[Any]:
        call = current_call()
        return [str(call.peer), call.method, call.metadata, call.time_remaining() is not None]

    peer, method, metadata, has_deadline = await pair.client.call(
        pair.peer, "whoami", metadata={"trace": "t1"}, timeout=5.0
    )
    assert peer == str(pair.client_host.peer_id) and method == "whoami"
    assert metadata == {"trace": "t1"} and has_deadline


async def test_large_unary_message_round_trips(pair: Pair) -> None:
    @pair.server.method()
    async def checksum(data: np.ndarray) -> list[Any]:
        return [int(data[::4096].sum()), data]

    data = np.random.default_rng(1).integers(0, 255, 32 * 1024 * 1024, dtype=np.uint8)
    total, echoed = await pair.client.call(pair.peer, "checksum", data, timeout=30)
    assert total == int(data[::4096].sum())
    assert np.array_equal(echoed, data)


# -- registry ---------------------------------------------------------------------------------
def test_kind_inferred_from_the_function() -> None:
    async def unary(a: int) -> int:
        return a

    async def server_stream(n: int) -> AsyncIterator[int]:
        yield n

    async def client_stream(requests: AsyncIterator[int]) -> int:
        return 0

    async def bidi(x: int, chunks: AsyncIterator[bytes]) -> AsyncIterator[int]:
        yield x

    def sync_unary(a: int) -> int:
        return a

    def sync_client(items: Iterator[int]) -> int:
        return 0

    def sync_bidi(items: Iterator[int]) -> Iterator[int]:
        yield from items

    kinds = {
        f.__name__: (make_method(f.__name__, f).kind, make_method(f.__name__, f).is_async)
        for f in (unary, server_stream, client_stream, bidi, sync_unary, sync_client, sync_bidi)
    }
    assert kinds == {
        "unary": (CallKind.UNARY, True),
        "server_stream": (CallKind.SERVER_STREAM, True),
        "client_stream": (CallKind.CLIENT_STREAM, True),
        "bidi": (CallKind.BIDI_STREAM, True),
        "sync_unary": (CallKind.UNARY, False),
        "sync_client": (CallKind.CLIENT_STREAM, False),
        "sync_bidi": (CallKind.BIDI_STREAM, False),
    }
    method = make_method("bidi", bidi)
    assert method.requests_param == "chunks" and not method.requests_positional


def test_explicit_kind_and_bad_registrations(pair: Pair) -> None:
    async def untyped(requests):  # type: ignore[no-untyped-def]
        return 0

    assert make_method("m", untyped, CallKind.CLIENT_STREAM).requests_param == "requests"
    with pytest.raises(ValueError, match="needs a generator"):
        make_method("m", untyped, CallKind.SERVER_STREAM)
    with pytest.raises(TypeError, match="not callable"):
        make_method("m", 42)  # type: ignore[arg-type]
    pair.server.register("m", untyped)
    with pytest.raises(ValueError, match="already registered"):
        pair.server.register("m", untyped)
    assert pair.server.methods == ["m"]


# -- errors -----------------------------------------------------------------------------------
async def test_handler_error_arrives_with_type_message_and_traceback(pair: Pair) -> None:
    @pair.server.method()
    async def explode(x: int) -> int:
        raise ValueError(f"cannot use {x}")

    with pytest.raises(RemoteError) as info:
        await pair.client.call(pair.peer, "explode", 7)
    error = info.value
    assert error.remote_type == "ValueError" and error.message == "cannot use 7"
    assert error.code == StatusCode.UNKNOWN and error.method == "explode"
    assert 'raise ValueError(f"cannot use {x}")' in error.remote_traceback
    assert "in explode" in error.remote_traceback
    assert "remote traceback" in str(error)


async def test_stream_handler_error_after_some_items(pair: Pair) -> None:
    @pair.server.method()
    def flaky(n: int) -> Iterator[int]:
        yield from range(n)
        raise KeyError("gone")

    received = []
    with pytest.raises(RemoteError) as info:
        async for x in pair.client.stream(pair.peer, "flaky", 3):
            received.append(x)
    assert received == [0, 1, 2]  # items before the error are delivered, in order
    assert info.value.remote_type == "KeyError" and "in flaky" in info.value.remote_traceback


async def test_handler_raising_an_rpc_error_keeps_its_class(pair: Pair) -> None:
    @pair.server.method()
    async def picky(x: int) -> int:
        raise InvalidArgument("x must be even")

    with pytest.raises(InvalidArgument, match="x must be even"):
        await pair.client.call(pair.peer, "picky", 3)


async def test_unknown_method_and_wrong_kind(pair: Pair) -> None:
    @pair.server.method()
    async def streamer() -> AsyncIterator[int]:
        yield 1

    with pytest.raises(MethodNotFound, match=r"no method 'nope' .* \(registered: streamer\)"):
        await pair.client.call(pair.peer, "nope")
    with pytest.raises(WrongCallKind, match=r"SERVER_STREAM.*use rpc.stream\(\)"):
        await pair.client.call(pair.peer, "streamer")


async def test_bad_arguments_are_invalid_argument(pair: Pair) -> None:
    @pair.server.method()
    async def one(a: int) -> int:
        return a

    with pytest.raises(RemoteError, match="TypeError") as info:
        await pair.client.call(pair.peer, "one", 1, 2)  # the handler's signature refuses it
    assert info.value.remote_type == "TypeError"
    with pytest.raises(InvalidArgument, match="could not encode the arguments"):
        await pair.client.call(pair.peer, "one", object())
    with pytest.raises(InvalidArgument, match="method name"):
        await pair.client.call(pair.peer, "x" * 300)
    with pytest.raises(InvalidArgument, match="cannot send this call"):
        await pair.client.call(pair.peer, "one", 1, metadata={"key": 7})  # type: ignore[dict-item]
    assert pair.client.active_outbound_calls == 0


async def test_codec_limits_apply_to_received_messages(make_pair: PairFactory) -> None:
    pair = await make_pair()
    server = RpcService(pair.server_host, codec_limits=codec.CodecLimits(max_ndim=1))
    await pair.server.stop()  # serve the protocol with the stricter service instead
    await server.start()
    try:

        @server.method()
        async def shape(array: np.ndarray) -> list[int]:
            return list(array.shape)

        assert await pair.client.call(pair.peer, "shape", np.zeros(3)) == [3]
        with pytest.raises(InvalidArgument, match="could not decode the call's arguments"):
            await pair.client.call(pair.peer, "shape", np.zeros((2, 2)))
    finally:
        await server.stop()


async def test_request_iterator_error_is_raised_to_the_caller(pair: Pair) -> None:
    got_first, cancelled = asyncio.Event(), asyncio.Event()

    @pair.server.method()
    async def consume(requests: AsyncIterator[int]) -> int:
        try:
            async for _ in requests:
                got_first.set()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 0

    async def broken() -> AsyncIterator[int]:
        yield 1
        await got_first.wait()  # fail once the handler is running
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        await pair.client.call(pair.peer, "consume", requests=broken())
    await wait_for(cancelled, "the handler is cancelled when the request stream fails")


# -- deadlines and cancellation ---------------------------------------------------------------
async def test_deadline_is_enforced_on_the_server(make_pair: PairFactory) -> None:
    pair = await make_pair(client_config=RpcConfig(deadline_grace=WAIT))
    cancelled = asyncio.Event()

    @pair.server.method()
    async def hang() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="exceeded on the server") as info:
        await pair.client.call(pair.peer, "hang", timeout=0.2)
    assert 0.2 <= time.monotonic() - started < WAIT  # the server's status, not the local grace
    assert info.value.code == StatusCode.DEADLINE_EXCEEDED
    await wait_for(cancelled, "the handler sees CancelledError at its deadline")


async def test_a_handler_that_swallows_its_cancellation_still_ends_its_call(
    make_pair: PairFactory,
) -> None:
    """Small unary handlers run in the stream's own task: a handler that catches the
    CancelledError of its deadline must leave that task able to send the status and serve on."""
    pair = await make_pair(client_config=RpcConfig(deadline_grace=WAIT))
    swallowed = asyncio.Event()

    @pair.server.method()
    async def stubborn() -> str:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            swallowed.set()
        await asyncio.sleep(0)  # awaits after it: no cancellation left pending in the task
        return "ignored"

    @pair.server.method()
    async def echo(x: object) -> object:
        return x

    with pytest.raises(DeadlineExceeded, match="exceeded on the server"):
        await pair.client.call(pair.peer, "stubborn", timeout=0.2)
    await wait_for(swallowed, "the handler swallowed its cancellation")
    assert await pair.client.call(pair.peer, "echo", b"still serving", timeout=WAIT) == (
        b"still serving"
    )


async def test_caller_deadline_when_the_server_does_not_answer(make_pair: PairFactory) -> None:
    pair = await make_pair(client_config=RpcConfig(deadline_grace=0.0))
    release = threading.Event()

    @pair.server.method()
    def stuck() -> None:  # a blocking handler cannot be interrupted; the caller still returns
        release.wait(WAIT)

    try:
        with pytest.raises(DeadlineExceeded, match="no reply within the deadline"):
            await pair.client.call(pair.peer, "stuck", timeout=0.1)
    finally:
        release.set()


async def test_stream_deadline(make_pair: PairFactory) -> None:
    pair = await make_pair(client_config=RpcConfig(deadline_grace=WAIT))

    @pair.server.method()
    async def slow_stream() -> AsyncIterator[int]:
        yield 1
        await asyncio.Event().wait()

    received = []
    with pytest.raises(DeadlineExceeded):
        async for x in pair.client.stream(pair.peer, "slow_stream", timeout=0.2):
            received.append(x)
    assert received == [1]


async def test_deadline_while_the_server_is_blocked_writing(make_pair: PairFactory) -> None:
    """The server can only reset a stream it is mid-way writing to; the caller still sees the
    deadline, not a broken connection."""
    pair = await make_pair(client_config=RpcConfig(deadline_grace=WAIT))
    closed = asyncio.Event()

    @pair.server.method()
    async def flood() -> AsyncIterator[np.ndarray]:
        try:
            while True:
                yield np.zeros(1 << 20, dtype=np.uint8)
        finally:
            closed.set()

    with pytest.raises(DeadlineExceeded):
        async with pair.client.stream(pair.peer, "flood", timeout=0.2) as responses:
            await anext(responses)  # then stop reading: the server blocks on flow control
            await wait_for(closed, "the server gives up at its deadline")
            async for _ in responses:
                pass


async def test_cancelling_the_caller_cancels_the_remote_handler(pair: Pair) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    @pair.server.method()
    async def work() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    caller = asyncio.create_task(pair.client.call(pair.peer, "work"))
    await wait_for(started, "the handler starts")
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await wait_for(cancelled, "the handler sees CancelledError")
    assert pair.client.active_outbound_calls == 0


async def test_cancellation_reaches_a_sync_handler_through_its_context(pair: Pair) -> None:
    started, saw_cancel = threading.Event(), threading.Event()

    @pair.server.method()
    def patient() -> None:
        started.set()
        if current_call().cancelled.wait(WAIT):
            saw_cancel.set()

    caller = asyncio.create_task(pair.client.call(pair.peer, "patient"))
    await wait_for(started, "the sync handler starts")
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await wait_for(saw_cancel, "the sync handler sees its call cancelled")


async def test_leaving_a_stream_early_cancels_the_generator(pair: Pair) -> None:
    closed = asyncio.Event()

    @pair.server.method()
    async def forever() -> AsyncIterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    async with pair.client.stream(pair.peer, "forever") as responses:
        async for x in responses:
            if x == 10:
                break
    await wait_for(closed, "the server's generator is closed")


async def test_cancel_frame_from_a_raw_client(pair: Pair) -> None:
    """A client that sends CANCEL (instead of resetting) gets a CANCELLED status back."""
    started, cancelled = asyncio.Event(), asyncio.Event()

    @pair.server.method()
    async def work() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    call = ClientCall(Header("work", CallKind.UNARY), 1 << 20)
    stream = await pair.client_host.open_stream(pair.peer, [PROTOCOL_ID])
    args = b"".join(bytes(b) for b in call.send_message(codec.encode(((), {}))))
    await stream.write(call.start() + args + call.send_end())
    await wait_for(started, "the handler starts")
    await stream.write(call.send_cancel())
    await wait_for(cancelled, "CANCEL cancels the handler")
    [status] = call.receive_data(await asyncio.wait_for(stream.read_to_end(), WAIT))
    assert status == Status(StatusCode.CANCELLED, "cancelled by the caller")
    await stream.close()


async def test_malformed_frames_get_a_protocol_error_status(pair: Pair) -> None:
    stream = await pair.client_host.open_stream(pair.peer, [PROTOCOL_ID])
    await stream.write(encode_frame(FrameType.MESSAGE, b"no header first"))
    reply = await asyncio.wait_for(stream.read_to_end(), WAIT)
    call = ClientCall(Header("m", CallKind.SERVER_STREAM), 1 << 20)
    [status] = call.receive_data(reply)
    assert isinstance(status, Status) and status.code == StatusCode.INTERNAL
    assert "expected HEADER first" in status.message
    await stream.close()


async def test_a_caller_that_sends_a_header_and_nothing_more_loses_its_slot(
    make_pair: PairFactory,
) -> None:
    """Calls without a deadline cannot be held open forever by withholding their arguments."""
    pair = await make_pair(
        server_config=RpcConfig(request_idle_timeout=0.3, max_concurrent_calls_per_peer=1)
    )

    @pair.server.method()
    async def echo(x: bytes) -> bytes:
        return x

    call = ClientCall(Header("echo", CallKind.UNARY), 1 << 20)
    stream = await pair.client_host.open_stream(pair.peer, [PROTOCOL_ID])
    await stream.write(call.start())  # the header, then silence
    [status] = call.receive_data(await asyncio.wait_for(stream.read_to_end(), WAIT))
    assert status.code == StatusCode.DEADLINE_EXCEEDED
    assert "request_idle_timeout" in status.message
    # the only slot this peer had is free again
    assert await pair.client.call(pair.peer, "echo", b"next", timeout=WAIT) == b"next"
    await stream.close()


# -- limits -----------------------------------------------------------------------------------
async def test_message_size_limits(make_pair: PairFactory) -> None:
    small_server = await make_pair(
        client_config=RpcConfig(max_message_size=1 << 20),
        server_config=RpcConfig(max_message_size=64 * 1024),
    )
    small_client = await make_pair(
        client_config=RpcConfig(max_message_size=64 * 1024),
        server_config=RpcConfig(max_message_size=1 << 20),
    )
    for pair in (small_server, small_client):

        @pair.server.method()
        async def size(data: np.ndarray) -> int:
            return int(data.nbytes)

        @pair.server.method()
        async def make(n: int) -> np.ndarray:
            return np.zeros(n, dtype=np.uint8)

    client, peer = small_server.client, small_server.peer
    assert await client.call(peer, "size", np.zeros(1000, np.uint8)) == 1000
    # bigger than the caller's own limit: refused before anything is sent
    with pytest.raises(MessageTooLarge, match="message to send"):
        await client.call(peer, "size", np.zeros(2 << 20, np.uint8))
    # within the caller's limit, over the server's: the server refuses with a clear status
    with pytest.raises(ResourceExhausted, match=r"received message of \d+ bytes exceeds"):
        await client.call(peer, "size", np.zeros(512 * 1024, np.uint8), timeout=WAIT)
    # a response over the server's own limit: the handler's call fails, and says why
    with pytest.raises(ResourceExhausted, match="message to send") as info:
        await client.call(peer, "make", 128 * 1024)
    assert info.value.remote_type.endswith("MessageTooLarge")
    # a response over the caller's limit: refused from its length prefix
    client, peer = small_client.client, small_client.peer
    with pytest.raises(MessageTooLarge, match="received message"):
        await client.call(peer, "make", 128 * 1024)
    # and both pairs still work
    assert await client.call(peer, "size", np.zeros(10, np.uint8)) == 10
    assert await small_server.client.call(small_server.peer, "make", 3) is not None


async def test_concurrent_calls_per_peer_limit(make_pair: PairFactory) -> None:
    pair = await make_pair(server_config=RpcConfig(max_concurrent_calls_per_peer=2))
    release = asyncio.Event()
    running = 0
    two_running = asyncio.Event()

    @pair.server.method()
    async def hold() -> str:
        nonlocal running
        running += 1
        if running == 2:
            two_running.set()
        await release.wait()
        return "done"

    held = [asyncio.create_task(pair.client.call(pair.peer, "hold")) for _ in range(2)]
    await wait_for(two_running, "two calls running")
    with pytest.raises(ResourceExhausted, match="max_concurrent_calls_per_peer"):
        await pair.client.call(pair.peer, "hold")
    # another peer is not affected by this peer's calls
    other_host = pair.network.add_host()
    other = RpcService(other_host)
    await other.start()
    try:
        third = asyncio.create_task(other.call(pair.peer, "hold"))
        release.set()
        assert await asyncio.gather(*held, third) == ["done"] * 3
    finally:
        await other.stop()
        await other_host.aclose()
    assert pair.server.active_inbound_calls == 0


async def test_a_finished_call_frees_its_slot_before_the_caller_sees_the_result(
    make_pair: PairFactory,
) -> None:
    pair = await make_pair(server_config=RpcConfig(max_concurrent_calls_per_peer=1))

    @pair.server.method()
    async def ping() -> int:
        return 1

    @pair.server.method()
    async def pings(n: int) -> AsyncIterator[int]:
        for _ in range(n):
            yield 1

    for _ in range(50):  # back to back, at the limit of one: never refused
        assert await pair.client.call(pair.peer, "ping") == 1
        assert [x async for x in pair.client.stream(pair.peer, "pings", 2)] == [1, 1]


async def test_total_concurrent_calls_and_outbound_limits(make_pair: PairFactory) -> None:
    pair = await make_pair(
        client_config=RpcConfig(max_outbound_calls=2),
        server_config=RpcConfig(max_concurrent_calls=2),
    )
    release = asyncio.Event()
    entered = asyncio.Queue[None]()

    @pair.server.method()
    async def hold() -> int:
        entered.put_nowait(None)
        await release.wait()
        return 1

    held = [asyncio.create_task(pair.client.call(pair.peer, "hold")) for _ in range(2)]
    for _ in range(2):
        await asyncio.wait_for(entered.get(), WAIT)
    with pytest.raises(ResourceExhausted, match="max_outbound_calls"):
        await pair.client.call(pair.peer, "hold")  # refused locally: 2 already in flight
    other_host = pair.network.add_host()
    other = RpcService(other_host)
    await other.start()
    try:
        with pytest.raises(ResourceExhausted, match="max_concurrent_calls"):
            await other.call(pair.peer, "hold")  # refused by the server: 2 running, any peer
    finally:
        await other.stop()
        await other_host.aclose()
    release.set()
    assert await asyncio.gather(*held) == [1, 1]


# -- isolation between calls ------------------------------------------------------------------
@pytest.mark.parametrize("blocking", ["async", "sync"])
async def test_small_call_is_fast_while_another_handler_blocks(pair: Pair, blocking: str) -> None:
    entered_async, release_async = asyncio.Event(), asyncio.Event()
    entered_sync, release_sync = threading.Event(), threading.Event()

    @pair.server.method()
    async def slow_async() -> str:
        entered_async.set()
        await release_async.wait()
        return "slow"

    @pair.server.method()
    def slow_sync() -> str:
        entered_sync.set()
        release_sync.wait(WAIT)
        return "slow"

    @pair.server.method()
    async def ping() -> str:
        return "pong"

    await pair.client.call(pair.peer, "ping")  # warm up
    slow = asyncio.create_task(pair.client.call(pair.peer, f"slow_{blocking}"))
    await wait_for(entered_async if blocking == "async" else entered_sync, "slow handler entered")
    latencies = []
    for _ in range(50):
        began = time.perf_counter()
        assert await pair.client.call(pair.peer, "ping") == "pong"
        latencies.append(time.perf_counter() - began)
    assert not slow.done()  # the slow call was blocking the whole time
    release_async.set()
    release_sync.set()
    assert await slow == "slow"
    median = statistics.median(latencies)
    print(f"small call p50 while a {blocking} handler blocks: {median * 1e3:.3f} ms")
    assert median < 0.02  # ~0.2 ms on an idle machine; loose for a shared 2-core CI box


async def test_a_big_stream_does_not_block_small_calls(pair: Pair) -> None:
    """A server stream stalled by a slow consumer does not delay other calls (own stream)."""

    @pair.server.method()
    async def flood() -> AsyncIterator[np.ndarray]:
        while True:
            yield np.zeros(1 << 20, dtype=np.uint8)

    @pair.server.method()
    async def ping() -> str:
        return "pong"

    async with pair.client.stream(pair.peer, "flood") as responses:
        await anext(responses)  # the stream is now full and its writer blocked
        began = time.perf_counter()
        assert await pair.client.call(pair.peer, "ping", timeout=WAIT) == "pong"
        assert time.perf_counter() - began < 1.0


# -- failures of the peer ---------------------------------------------------------------------
async def test_peer_killed_mid_call(pair: Pair) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    @pair.server.method()
    async def work() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    caller = asyncio.create_task(pair.client.call(pair.peer, "work"))
    await wait_for(started, "the handler starts")
    pair.network.kill(pair.peer)
    with pytest.raises(PeerUnavailable, match="stream broke mid-call"):
        await asyncio.wait_for(caller, WAIT)
    await wait_for(cancelled, "the dead peer's handler is cancelled too")
    with pytest.raises(PeerUnavailable, match="cannot reach the peer"):
        await pair.client.call(pair.peer, "work")
    assert pair.client.active_outbound_calls == 0


async def test_peer_killed_mid_stream(pair: Pair) -> None:
    @pair.server.method()
    async def ticks() -> AsyncIterator[int]:
        for i in range(4):
            yield i
        await asyncio.Event().wait()

    received = []
    with pytest.raises(PeerUnavailable, match="stream broke mid-call"):
        async for x in pair.client.stream(pair.peer, "ticks"):
            received.append(x)
            if x == 3:
                pair.network.kill(pair.peer)
    assert received == [0, 1, 2, 3]


async def test_peer_without_rpc_service(pair: Pair) -> None:
    bare = pair.network.add_host()
    try:
        with pytest.raises(PeerUnavailable, match=f"does not serve {PROTOCOL_ID}"):
            await pair.client.call(bare.peer_id, "anything")
    finally:
        await bare.aclose()


async def test_stopping_the_server_ends_its_calls_with_a_status(pair: Pair) -> None:
    started = asyncio.Event()

    @pair.server.method()
    async def work() -> None:
        started.set()
        await asyncio.Event().wait()

    caller = asyncio.create_task(pair.client.call(pair.peer, "work"))
    await wait_for(started, "the handler starts")
    await pair.server.stop()
    with pytest.raises(PeerUnavailable, match="the server is stopping"):
        await asyncio.wait_for(caller, WAIT)
    assert pair.server.active_inbound_calls == 0


async def test_stopping_the_client_cancels_its_calls(pair: Pair) -> None:
    started = asyncio.Event()

    @pair.server.method()
    async def work() -> None:
        started.set()
        await asyncio.Event().wait()

    caller = asyncio.create_task(pair.client.call(pair.peer, "work"))
    await wait_for(started, "the handler starts")
    await pair.client.stop()
    with pytest.raises(Cancelled, match="local RPC service stopped"):
        await asyncio.wait_for(caller, WAIT)
    with pytest.raises(Cancelled, match="not running"):
        await pair.client.call(pair.peer, "work")


async def test_undecodable_response_is_a_protocol_error(pair: Pair) -> None:
    class BadResponses:
        def encode(self, obj: object) -> list[memoryview]:
            return codec.encode(obj)

        def decode(self, message: Any, limits: Any = None) -> object:
            raise ValueError("garbage")

    pair.client.codec = BadResponses()

    @pair.server.method()
    async def fine() -> int:
        return 1

    with pytest.raises(InvalidArgument, match="could not decode the call's arguments"):
        pair.server.codec = BadResponses()
        await pair.client.call(pair.peer, "fine")
    pair.server.codec = codec
    with pytest.raises(ProtocolError, match="could not decode the response: garbage"):
        await pair.client.call(pair.peer, "fine")
