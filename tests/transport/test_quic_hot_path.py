"""The per-packet work of a QUIC connection: no flush without a reason, credit only when due."""

from __future__ import annotations

import asyncio

import pytest
from aioquic.buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.recovery import QuicPacketPacer

from tests.transport.conftest import EndpointPair, wait_until
from transport.quic import QuicConfig
from transport.quic.engine import QuicEngine
from transport.quic.glue import MAX_PACING_BURST, BurstPacer, Libp2pQuicConnection

WINDOW = 256 * 1024


def _connection(stream_window: int = WINDOW, connection_window: int = 8 * WINDOW):
    quic = Libp2pQuicConnection(
        configuration=QuicConfiguration(
            is_client=True, max_stream_data=stream_window, max_data=connection_window
        ),
        stream_window=stream_window,
        connection_window=connection_window,
        max_streams=16,
    )
    quic._get_or_create_stream_for_send(0)
    return quic


@pytest.fixture
def quic_config() -> QuicConfig:
    """The aioquic engine's glue (flushes, pacing, padding) is what these tests measure."""
    return QuicConfig(
        engine="aioquic", handshake_timeout=2.0, idle_timeout=5.0, keepalive_interval=1.0
    )


def test_the_aioquic_engine_fills_the_engine_seam() -> None:
    assert isinstance(_connection(), QuicEngine)


def test_reading_asks_for_a_flush_only_once_half_a_stream_window_is_read() -> None:
    quic = _connection()
    read = 0
    while not quic.consume(0, 4096):
        read += 4096
        assert read < WINDOW // 2
    assert read + 4096 >= WINDOW // 2


def test_reading_asks_for_a_flush_once_half_the_connection_window_is_read() -> None:
    quic = _connection(stream_window=WINDOW, connection_window=WINDOW)
    for stream_id in (4, 8):
        quic._get_or_create_stream_for_send(stream_id)
    # A little from each stream: no stream is due, the connection is.
    assert not quic.consume(0, WINDOW // 4)
    assert not quic.consume(4, WINDOW // 8)
    assert quic.consume(8, WINDOW // 8)


@pytest.mark.parametrize("rounds", [100])
async def test_an_echo_round_trip_costs_few_flushes(endpoints: EndpointPair, rounds: int) -> None:
    """A receive batch is answered in the flush that also carries the reply it woke up."""
    connection = await endpoints.dial()
    search = connection.quic.mtu_search
    await wait_until(lambda: search is None or search.done)
    stream = await connection.open_stream()
    await stream.write(b"hello")
    inbound = await endpoints.server_streams.get()
    assert await inbound.readexactly(5) == b"hello"
    server_side = endpoints.server_connections[0]
    flushes = 0
    for quic in (connection.quic, server_side.quic):
        original = quic.datagrams_to_send

        def counted(now: float, original=original) -> list:
            nonlocal flushes
            flushes += 1
            return original(now)

        quic.datagrams_to_send = counted  # type: ignore[method-assign]
    for _ in range(rounds):
        await stream.write(b"q" * 64)
        await inbound.readexactly(64)
        await inbound.write(b"r" * 64)
        await stream.readexactly(64)
    # One flush per side per round trip, plus a few for delayed ACKs (4.5 before batching).
    assert flushes <= 3 * rounds


def test_a_pacing_burst_carries_2_ms_of_data_at_the_same_rate() -> None:
    ours, aioquics = BurstPacer(max_datagram_size=1350), QuicPacketPacer(max_datagram_size=1350)
    for pacer in (ours, aioquics):
        pacer.update_rate(congestion_window=1_000_000, smoothed_rtt=0.010)
    assert ours.packet_time == aioquics.packet_time  # the rate is aioquic's
    assert aioquics.bucket_max == pytest.approx(16 * 1350 * 0.010 / 1_000_000)
    assert ours.bucket_max == pytest.approx(0.002)  # 200 kB at 100 MB/s
    ours.update_rate(congestion_window=100_000_000, smoothed_rtt=0.010)
    assert ours.bucket_max == pytest.approx(MAX_PACING_BURST * 0.010 / 100_000_000)
    # With 64 KiB datagrams aioquic's 16-datagram bursts (1 MB) would overflow socket buffers.
    big, aioquics_big = (
        BurstPacer(max_datagram_size=65487),
        QuicPacketPacer(max_datagram_size=65487),
    )
    for pacer in (big, aioquics_big):
        pacer.update_rate(congestion_window=100_000_000, smoothed_rtt=0.010)
    assert aioquics_big.bucket_max == pytest.approx(16 * 65487 * 0.010 / 100_000_000)
    assert big.bucket_max == pytest.approx(MAX_PACING_BURST * 0.010 / 100_000_000)
    # A small window still allows two datagrams per burst.
    ours.update_rate(congestion_window=13_500, smoothed_rtt=0.100)
    assert ours.bucket_max == pytest.approx(2 * 1350 * 0.100 / 13_500)
    # The bucket still empties: after a burst the sender waits for the rate.
    now = 1.0
    ours.update_rate(congestion_window=1_000_000, smoothed_rtt=0.010)
    ours.evaluation_time, ours.bucket_time = now, ours.bucket_max
    sent = 0
    while ours.next_send_time(now) is None:
        ours.update_after_send(now)
        sent += 1
    assert sent == pytest.approx(200_000 / 1350, abs=2)


async def test_a_bulk_sender_sends_many_datagrams_per_flush() -> None:
    """aioquic's pacer alone lets a flush send at most 16 datagrams."""
    pair = EndpointPair(QuicConfig(engine="aioquic", pmtu_probing=False))
    await pair.start()
    try:
        connection = await pair.dial()
        flushes = 0
        original = connection.quic.datagrams_to_send

        def counted(now: float) -> list:
            nonlocal flushes
            flushes += 1
            return original(now)

        connection.quic.datagrams_to_send = counted  # type: ignore[method-assign]
        stream = await connection.open_stream()
        size = 8 * 1024 * 1024
        writer = asyncio.ensure_future(stream.write(bytes(size)))
        inbound = await pair.server_streams.get()
        assert len(await inbound.readexactly(size)) == size
        await writer
        packets = size // 1350
        assert flushes < packets / 16
    finally:
        await pair.close()


async def test_a_closed_connection_keeps_no_timer_and_sends_nothing(
    endpoints: EndpointPair,
) -> None:
    connection = await endpoints.dial()
    stream = await connection.open_stream()
    await stream.write(b"x" * 100_000)
    assert connection._timer is not None  # loss detection is armed while data is in flight
    await connection.close("done")
    assert connection._timer is None
    sent = endpoints.client._socket.datagrams_sent
    connection._schedule_flush()
    connection._flush()
    await asyncio.sleep(0)  # the scheduled flush runs
    assert endpoints.client._socket.datagrams_sent == sent
    assert connection._timer is None


@pytest.mark.parametrize(
    ("payload", "stop"),
    [(b"\0" * 60000, 60000), (b"\0\0\0\x01\0\0", 3), (b"\x01", 0), (b"", 0)],
)
def test_padding_is_skipped_up_to_the_next_frame(payload: bytes, stop: int) -> None:
    """A 64 KiB probe is mostly PADDING; aioquic walks it byte by byte in Python."""
    quic = _connection()
    buf = Buffer(data=payload)
    quic._handle_padding_frame(None, 0, buf)
    assert buf.tell() == stop
