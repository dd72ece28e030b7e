"""The asyncio TCP baseline every transport benchmark prints its figures beside, on loopback."""

from __future__ import annotations

import asyncio
import statistics
import time

MESSAGE = b"x" * 64
CHUNK = 1024 * 1024


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


# -- QUIC -------------------------------------------------------------------------------------


async def tcp_rtt(rounds: int) -> list[float]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        writer.write(MESSAGE)
        await writer.drain()
        await reader.readexactly(len(MESSAGE))
        samples.append(time.perf_counter() - started)
    writer.close()
    server.close()
    await server.wait_closed()
    return samples


async def tcp_throughput(size: int) -> float:
    done = asyncio.get_running_loop().create_future()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received = 0
        while data := await reader.read(CHUNK):
            received += len(data)
        done.set_result(received)
        writer.close()

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    block = bytes(CHUNK)
    started = time.perf_counter()
    for _ in range(size // CHUNK):
        writer.write(block)
        await writer.drain()
    writer.write_eof()
    received = await done
    elapsed = time.perf_counter() - started
    writer.close()
    server.close()
    assert received == size
    return size / elapsed


# -- one transfer striped over connections and processes ------------------------------------


async def stream_rtt(stream, inbound: asyncio.Queue, rounds: int) -> list[float]:
    """Round trips of MESSAGE on `stream` (any transport's Stream), echoed by the first stream
    that arrives on `inbound`; the same measurement for QUIC and for TCP+Noise+Yamux."""
    await stream.write(MESSAGE)
    remote = await inbound.get()

    async def echo() -> None:
        while data := await remote.read(65536):
            await remote.write(data)

    echo_task = asyncio.ensure_future(echo())
    try:
        await stream.readexactly(len(MESSAGE))
        samples = []
        for _ in range(rounds):
            started = time.perf_counter()
            await stream.write(MESSAGE)
            await stream.readexactly(len(MESSAGE))
            samples.append(time.perf_counter() - started)
        return samples
    finally:
        echo_task.cancel()
