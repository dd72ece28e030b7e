"""The qh3 engine over real UDP on loopback: its path MTU probing and batched datagram I/O.

(Streams, authentication and bad input run on both engines in tests/transport/test_quic.py.)
"""

from __future__ import annotations

import asyncio
import os

import pytest

from tests.transport.conftest import EndpointPair, LossyPath, wait_until
from transport.errors import StreamError
from transport.quic import QuicConfig, QuicConnection

pytest.importorskip("qh3", reason="qh3 is not installed (the qh3 QUIC engine is optional)")

from transport.quic.engine_qh3 import MAX_PROBED_DATAGRAM, Qh3Engine

BASE = 1350


@pytest.fixture
def quic_config() -> QuicConfig:
    return QuicConfig(engine="qh3", handshake_timeout=2.0, idle_timeout=5.0, keepalive_interval=1.0)


async def _send(pair: EndpointPair, connection: QuicConnection, size: int) -> None:
    """A random payload over one new stream arrives intact."""
    payload = os.urandom(size)
    stream = await connection.open_stream()
    sender = asyncio.ensure_future(stream.write(payload))
    try:
        inbound = await asyncio.wait_for(pair.server_streams.get(), 10)
        assert await asyncio.wait_for(inbound.readexactly(size), 30) == payload
        await asyncio.wait_for(sender, 10)
    finally:
        sender.cancel()


async def test_the_endpoint_builds_qh3_engines(endpoints: EndpointPair) -> None:
    connection = await endpoints.dial()
    assert isinstance(connection.quic, Qh3Engine)
    assert connection.quic.mtu_search is None  # qh3 probes by itself


async def test_qh3_probes_loopback_to_big_datagrams(endpoints: EndpointPair) -> None:
    connection = await endpoints.dial()
    await _send(endpoints, connection, 4 * 1024 * 1024)
    assert connection.quic.max_datagram_size > 8000  # loopback carries far more than 1350


async def test_qh3_probes_no_further_than_its_pacer_allows(endpoints: EndpointPair) -> None:
    """Loopback carries 64 KiB datagrams, but qh3 paces by its maximum size: it is capped (the
    aioquic engine, paced by what it sends, still probes to 64 KiB: test_quic_pmtu_path)."""
    assert endpoints.client.config.max_probed_datagram_size > MAX_PROBED_DATAGRAM
    connection = await endpoints.dial()
    [server_side] = endpoints.server_connections
    for side in (connection, server_side):
        assert side.quic._quic.configuration.max_datagram_size == MAX_PROBED_DATAGRAM
    await _send(endpoints, connection, 4 * 1024 * 1024)
    assert 8000 < connection.quic.max_datagram_size <= MAX_PROBED_DATAGRAM


async def test_the_listener_probes_big_datagrams_towards_the_dialer_too(
    endpoints: EndpointPair,
) -> None:
    """qh3's dialer announced max_udp_payload_size 1472 whatever it could receive: the
    listener's data then went in ~1450 B datagrams, ~3-4x slower on loopback."""
    await endpoints.dial()
    [server_side] = endpoints.server_connections
    payload = os.urandom(4 * 1024 * 1024)
    stream = await server_side.open_stream()
    sender = asyncio.ensure_future(stream.write(payload))
    try:
        inbound = await asyncio.wait_for(endpoints.client_streams.get(), 10)
        assert await asyncio.wait_for(inbound.readexactly(len(payload)), 30) == payload
        await asyncio.wait_for(sender, 10)
    finally:
        sender.cancel()
    assert server_side.quic.max_datagram_size > 8000


async def test_a_path_that_drops_big_datagrams_still_carries_the_data(
    endpoints: EndpointPair, lossy_path: LossyPath
) -> None:
    lossy_path.drop_above = 1400
    connection = await endpoints.client.dial(lossy_path.address, endpoints.server_key.peer_id)
    await _send(endpoints, connection, 2 * 1024 * 1024)
    assert lossy_path.largest_passed <= 1400
    assert lossy_path.dropped  # bigger sizes were tried, and lost
    await _send(endpoints, connection, 256 * 1024)  # and the connection still works


async def test_probing_off_keeps_the_configured_size(quic_config: QuicConfig) -> None:
    pair = EndpointPair(quic_config.model_copy(update={"pmtu_probing": False}))
    await pair.start()
    try:
        connection = await pair.dial()
        await _send(pair, connection, 1024 * 1024)
        assert connection.quic.max_datagram_size == BASE
        assert pair.client._socket.gso  # sent in segmented batches
        assert pair.client._socket.send_calls * 4 < pair.client._socket.datagrams_sent
    finally:
        await pair.close()


async def test_received_datagrams_reach_qh3_in_batches(quic_config: QuicConfig) -> None:
    pair = EndpointPair(quic_config.model_copy(update={"pmtu_probing": False}))
    await pair.start()
    try:
        connection = await pair.dial()
        await wait_until(lambda: bool(pair.server_connections))
        server_engine = pair.server_connections[0].quic
        batches: list[int] = []
        engine = server_engine._quic
        many, gro = engine.receive_many_datagrams, engine.receive_gro_buffer

        def counted_many(datagrams, addr, now) -> None:
            batches.append(len(datagrams))
            many(datagrams, addr, now)

        def counted_gro(buffer, segment, addr, now) -> None:  # a kernel GRO run, whole
            batches.append(-(-len(buffer) // segment))
            gro(buffer, segment, addr, now)

        engine.receive_many_datagrams = counted_many
        engine.receive_gro_buffer = counted_gro
        await _send(pair, connection, 2 * 1024 * 1024)
        assert batches and max(batches) > 8
    finally:
        await pair.close()


async def test_an_opener_over_the_remotes_stream_limit_waits_for_a_slot(
    quic_config: QuicConfig,
) -> None:
    """qh3 lets a remote open 100 streams at once; the 101st opener waits until one closes
    (as QUIC intends), and fails clearly only after `stream_slot_timeout`."""
    pair = EndpointPair(quic_config.model_copy(update={"stream_slot_timeout": 0.5}))
    await pair.start()
    try:
        connection = await pair.dial()
        streams = []
        for _ in range(100):
            stream = await connection.open_stream()
            await stream.write(b"x")
            streams.append(stream)
        with pytest.raises(StreamError, match="stream_slot_timeout"):
            await connection.open_stream()
        waiting = asyncio.ensure_future(connection.open_stream())
        await asyncio.sleep(0)
        assert not waiting.done()
        first = streams[0]  # finish one stream both ways: the remote grants a new one
        await first.close()
        inbound = await asyncio.wait_for(pair.server_streams.get(), 5)
        assert await inbound.read_to_end(max_size=10) == b"x"
        await inbound.close()
        assert await first.read_to_end(max_size=10) == b""
        stream = await asyncio.wait_for(waiting, 5)
        await stream.write(b"again")
        await stream.close()
        inbound_streams = [await pair.server_streams.get() for _ in range(100)]
        assert await inbound_streams[-1].read_to_end(max_size=10) == b"again"
    finally:
        await pair.close()


async def test_many_concurrent_streams_beyond_the_limit_all_complete(
    endpoints: EndpointPair,
) -> None:
    """250 request/reply exchanges at once on one connection: the openers beyond the
    remote's 100 wait for slots instead of failing."""
    connection = await endpoints.dial()

    echoes: set[asyncio.Future] = set()

    async def serve() -> None:
        while True:
            inbound = await endpoints.server_streams.get()
            echoes.add(asyncio.ensure_future(echo(inbound)))

    async def echo(inbound) -> None:
        await inbound.write(await inbound.read_to_end(max_size=100))
        await inbound.close()

    async def exchange(i: int) -> bytes:
        stream = await connection.open_stream()
        await stream.write(b"%d" % i)
        await stream.close()
        return await stream.read_to_end(max_size=100)

    server = asyncio.ensure_future(serve())
    try:
        async with asyncio.timeout(20):
            replies = await asyncio.gather(*(exchange(i) for i in range(250)))
        assert replies == [b"%d" % i for i in range(250)]
    finally:
        server.cancel()
        for task in echoes:
            task.cancel()


async def test_a_failing_qh3_core_ends_the_connection_clearly(endpoints: EndpointPair) -> None:
    """An error inside qh3's core closes the connection with its reason; nothing hangs."""
    connection = await endpoints.dial()
    stream = await connection.open_stream()
    core = connection.quic._quic

    class BrokenCore:
        def __getattr__(self, name: str):
            def fail(*args, **kwargs):
                raise RuntimeError(f"{name} broke")

            return fail

    core._core = BrokenCore()
    with pytest.raises(StreamError):
        await stream.write(b"x" * 10_000)
        await stream.readexactly(1)
    await wait_until(lambda: connection.is_closed)
