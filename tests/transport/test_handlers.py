"""Inbound stream dispatch over real QUIC: a handler that can answer at once answers inside
the datagram's callback; one that waits goes on as an ordinary task."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator

import pytest

from tests.transport.conftest import EndpointPair, wait_until
from transport.errors import StreamReset
from transport.handlers import StreamHandlers, start_task
from transport.multistream import select_outbound
from transport.quic import QuicConfig, QuicConnection
from transport.stream import Stream

PROTOCOL = "/test/echo/1"
caller = contextvars.ContextVar[str]("caller")


class Served(EndpointPair):
    """Endpoints whose server hands inbound streams to `StreamHandlers`, and notes what each
    receive batch of its connection did."""

    def __init__(self, config: QuicConfig) -> None:
        super().__init__(config)
        self.handlers = StreamHandlers()
        # Per receive batch: datagrams sent while it was handled, and whether a flush was
        # still due when it ended.
        self.batches: list[tuple[int, bool]] = []

    def _on_server_connection(self, connection: QuicConnection) -> None:
        self.server_connections.append(connection)
        connection.set_inbound_stream_callback(self.handlers.accept)
        socket = self.server._socket
        original = connection._on_receive_batch_end

        def counted() -> None:
            sent = socket.datagrams_sent
            original()
            self.batches.append((socket.datagrams_sent - sent, connection._flush_scheduled))

        connection._on_receive_batch_end = counted  # type: ignore[method-assign]


@pytest.fixture
async def served(quic_config: QuicConfig) -> AsyncIterator[Served]:
    pair = Served(quic_config)
    await pair.start()
    try:
        yield pair
    finally:
        await pair.handlers.aclose()
        await pair.close()


async def _call(connection: QuicConnection, request: bytes) -> bytes:
    stream = await connection.open_stream()
    await select_outbound(stream, [PROTOCOL])
    await stream.write(request)
    await stream.close()
    return await stream.read_to_end()


async def test_a_handler_that_answers_at_once_answers_within_the_request_batch(
    served: Served,
) -> None:
    seen: list[tuple[asyncio.Task | None, bool]] = []

    async def echo(stream: Stream) -> None:
        task = asyncio.current_task()
        seen.append((task, task is not None and task.done()))
        await stream.write(stream.read_nowait())
        await stream.close()

    served.handlers.set(PROTOCOL, echo)
    connection = await served.dial()
    served.batches.clear()
    assert await _call(connection, b"ping") == b"ping"
    [(task, done_while_running)] = seen
    assert task is not None and not done_while_running  # an ordinary task, running
    assert task.done() and not served.handlers._tasks  # finished; nothing left to cancel
    # The batch with the request sent the reply before it returned, and left no flush behind.
    assert any(sent >= 1 and not flush_due for sent, flush_due in served.batches)


async def test_a_handler_that_waits_goes_on_as_a_task_that_aclose_cancels(
    served: Served,
) -> None:
    cancelled = asyncio.Event()

    async def wait_forever(stream: Stream) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    served.handlers.set(PROTOCOL, wait_forever)
    connection = await served.dial()
    stream = await connection.open_stream()
    await select_outbound(stream, [PROTOCOL])
    await stream.write(b"hello")
    await wait_until(lambda: len(served.handlers._tasks) == 1)
    await served.handlers.aclose()
    assert cancelled.is_set()
    with pytest.raises(StreamReset):  # the handler's stream is reset as it is cancelled
        async with asyncio.timeout(5):
            await stream.read()


async def test_a_handler_that_waits_then_answers(served: Served) -> None:
    async def echo_later(stream: Stream) -> None:
        await asyncio.sleep(0)
        request = await stream.read_to_end()
        await stream.write(request)
        await stream.close()

    served.handlers.set(PROTOCOL, echo_later)
    connection = await served.dial()
    assert await _call(connection, b"later") == b"later"
    await wait_until(lambda: not served.handlers._tasks)


async def test_context_variables_a_handler_sets_stay_in_its_stream(served: Served) -> None:
    seen: list[str | None] = []

    async def remember(stream: Stream) -> None:
        seen.append(caller.get(None))
        caller.set("a handler")
        await stream.write(b"ok")
        await stream.close()

    served.handlers.set(PROTOCOL, remember)
    connection = await served.dial()
    for _ in range(3):
        assert await _call(connection, b"x") == b"ok"
    assert seen == [None, None, None]  # not set in the connection's context by a handler before


async def test_a_task_started_inside_a_task_starts_on_the_next_loop_turn() -> None:
    steps: list[str] = []

    async def step() -> None:
        steps.append("task")

    task = start_task(step())
    steps.append("caller")
    await task
    assert steps == ["caller", "task"]


async def test_a_task_started_in_a_loop_callback_takes_its_first_step_at_once() -> None:
    steps: list[str] = []
    started: asyncio.Future[asyncio.Task[None]] = asyncio.get_running_loop().create_future()

    async def step() -> None:
        steps.append("first step")
        await asyncio.sleep(0)
        steps.append("second step")

    def callback() -> None:
        task = start_task(step())
        steps.append("callback returns")
        started.set_result(task)

    asyncio.get_running_loop().call_soon(callback)
    await (await started)
    assert steps == ["first step", "callback returns", "second step"]


async def test_a_handler_that_reads_on_and_waits_answers_later(served: Served) -> None:
    """Started at once, it waits for the rest of the request (inside the event handling that
    started it), then answers from its task."""

    async def echo_all(stream: Stream) -> None:
        request = await stream.read_to_end()
        await stream.write(request)
        await stream.close()

    served.handlers.set(PROTOCOL, echo_all)
    connection = await served.dial()
    stream = await connection.open_stream()
    await select_outbound(stream, [PROTOCOL])
    await stream.write(b"first part, ")
    await wait_until(lambda: len(served.handlers._tasks) == 1)  # it waits for the rest
    await stream.write(b"second part")
    await stream.close()
    assert await stream.read_to_end() == b"first part, second part"


def test_on_uvloop_handlers_start_as_ordinary_tasks_and_answer() -> None:
    """uvloop (Ray workers run it) has no ready queue to take a first step from: the handler
    task starts on the next loop turn instead, and the request's flush is the loop's."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        pair = Served(QuicConfig(handshake_timeout=2.0, idle_timeout=5.0))
        await pair.start()
        try:
            steps: list[str] = []

            async def echo(stream: Stream) -> None:
                steps.append("handler")
                await stream.write(stream.read_nowait())
                await stream.close()

            def callback() -> None:
                start_task(noted())
                steps.append("callback returns")

            async def noted() -> None:
                steps.append("first step")

            asyncio.get_running_loop().call_soon(callback)
            pair.handlers.set(PROTOCOL, echo)
            connection = await pair.dial()
            async with asyncio.timeout(5):
                assert await _call(connection, b"ping") == b"ping"
            assert steps == ["callback returns", "first step", "handler"]
        finally:
            await pair.handlers.aclose()
            await pair.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
