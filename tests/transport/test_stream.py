"""The transport-independent parts of `Stream`: non-blocking reads and watching for arrivals."""

from __future__ import annotations

import asyncio

import pytest

from transport.errors import StreamReset
from transport.memory import memory_stream_pair


async def test_read_nowait_takes_what_is_buffered_without_waiting() -> None:
    writer, reader = memory_stream_pair()
    assert reader.read_nowait() == b""  # nothing yet, and not the end
    await writer.write(b"hello world")
    assert reader.read_nowait(5) == b"hello"
    assert reader.read_nowait() == b" world"
    await writer.close()
    assert reader.read_nowait() == b"" and reader.at_eof


async def test_read_nowait_raises_once_reset_and_drained() -> None:
    writer, reader = memory_stream_pair()
    await writer.write(b"last")
    writer.reset("gone")
    assert reader.read_nowait() == b"last"  # what arrived before the reset is still there
    with pytest.raises(StreamReset):
        reader.read_nowait()


async def test_a_watcher_hears_data_end_and_reset_until_unwatched() -> None:
    writer, reader = memory_stream_pair()
    heard: list[tuple[bytes, bool]] = []
    reader.watch(lambda: heard.append((bytes(reader._buffer), reader.at_eof)))
    await writer.write(b"a")
    await writer.close()
    assert heard == [(b"a", False), (b"a", False)]  # data, then the end (unread data first)
    assert reader.read_nowait() == b"a" and reader.at_eof
    writer2, reader2 = memory_stream_pair()
    resets: list[str] = []
    reader2.watch(lambda: resets.append("arrival"))
    writer2.reset("abandoned")
    assert resets == ["arrival"]
    reader2.watch(None)
    writer3, reader3 = memory_stream_pair()
    reader3.watch(lambda: pytest.fail("a watcher was called after being removed"))
    reader3.watch(None)
    await writer3.write(b"x")


async def test_a_watcher_hears_at_once_what_arrived_before_it_watched() -> None:
    """Whatever came before `watch` (and is unread) would otherwise never be heard: a reset
    that arrived with a request whose handler is about to run must still cancel it."""
    writer, reader = memory_stream_pair()
    writer.reset("gone before anyone watched")
    heard: list[str] = []
    reader.watch(lambda: heard.append("reset"))
    assert heard == ["reset"]
    writer2, reader2 = memory_stream_pair()
    await writer2.write(b"unread")
    reader2.watch(lambda: heard.append("data"))
    assert heard == ["reset", "data"]
    writer3, reader3 = memory_stream_pair()
    await writer3.close()
    reader3.watch(lambda: heard.append("end"))
    assert heard == ["reset", "data", "end"]
    writer4, reader4 = memory_stream_pair()
    await writer4.write(b"read")
    assert reader4.read_nowait() == b"read"
    reader4.watch(lambda: pytest.fail("nothing unread arrived: no call"))
    reader4.watch(None)


async def test_two_waiting_readers_both_hear_an_arrival() -> None:
    writer, reader = memory_stream_pair()
    first = asyncio.ensure_future(reader._wait_readable())
    second = asyncio.ensure_future(reader._wait_readable())
    await asyncio.sleep(0)  # both wait now
    await writer.write(b"x")
    await asyncio.wait_for(asyncio.gather(first, second), 5)


async def test_a_cancelled_reader_leaves_another_reader_waiting() -> None:
    writer, reader = memory_stream_pair()
    cancelled = asyncio.ensure_future(reader.read())
    waiting = asyncio.ensure_future(reader.read())
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    assert not waiting.done()  # its own wait was not cancelled with the other's
    await writer.write(b"data")
    assert await asyncio.wait_for(waiting, 5) == b"data"


async def test_readers_cancelled_while_nothing_arrives_are_not_kept() -> None:
    _writer, reader = memory_stream_pair()
    for _ in range(100):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(), 0.001)
    assert len(reader._arrival_waiters) <= 1  # no list of cancelled waits grows
