"""The QUIC endpoint's UDP socket: batched sends (GSO) and receives (GRO) keep every datagram."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
import sys
from collections.abc import AsyncIterator

import pytest

from transport.quic.udp import SOL_UDP, UDP_SEGMENT, UdpSocket

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="UDP GSO/GRO are Linux features")


class Collector:
    """A UdpSocket whose received datagrams land in a list, with an event per batch."""

    def __init__(self, **options: bool) -> None:
        self.datagrams: list[bytes] = []
        self.batch = asyncio.Event()
        self.udp = UdpSocket(self._on_datagram, self.batch.set, **options)

    def _on_datagram(self, data: bytes, address: tuple[str, int]) -> None:
        self.datagrams.append(data)

    async def wait_for(self, count: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.datagrams) < count:
                self.batch.clear()
                await self.batch.wait()


@pytest.fixture
async def receiver() -> AsyncIterator[Collector]:
    collector = Collector()
    collector.address = collector.udp.bind("127.0.0.1", 0)
    try:
        yield collector
    finally:
        collector.udp.close()


@pytest.fixture
async def sender() -> AsyncIterator[Collector]:
    collector = Collector()
    collector.udp.bind("127.0.0.1", 0)
    try:
        yield collector
    finally:
        collector.udp.close()


def _payloads(sizes: list[int]) -> list[bytes]:
    return [os.urandom(size) for size in sizes]


async def test_batched_send_keeps_every_datagram_and_its_boundaries(
    sender: Collector, receiver: Collector
) -> None:
    # Runs of equal sizes, a shorter datagram ending a run, a lone big one, tiny ones.
    sizes = [1350] * 10 + [500] + [1350] * 3 + [200, 200, 9000] + [1200] * 60 + [1]
    payloads = _payloads(sizes)
    sender.udp.send_batch(payloads, receiver.address)
    await receiver.wait_for(len(payloads))
    assert receiver.datagrams == payloads
    assert sender.udp.datagrams_sent == len(payloads)
    if sender.udp.gso:
        assert sender.udp.send_calls < len(payloads) / 4  # the runs went down together


@linux_only
async def test_coalesced_receive_is_cut_at_the_segment_size(receiver: Collector) -> None:
    if not receiver.udp.gro:
        pytest.skip("this kernel refuses UDP_GRO")
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        payloads = _payloads([1000] * 20 + [300])
        try:
            raw.sendmsg(
                [b"".join(payloads)],
                [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", 1000))],
                0,
                receiver.address,
            )
        except OSError as exc:
            pytest.skip(f"this kernel refuses UDP_SEGMENT: {exc}")
        await receiver.wait_for(len(payloads))
    finally:
        raw.close()
    assert receiver.datagrams == payloads
    assert receiver.udp.receive_calls < len(payloads)  # the kernel handed them over together


@linux_only
async def test_a_coalesced_run_can_be_handed_over_whole() -> None:
    """With `on_segments`, a GRO run reaches its reader as one buffer and its segment size."""
    received: list[tuple[bytes, int | None]] = []  # (data, segment size of a whole run)
    batch = asyncio.Event()
    udp = UdpSocket(
        lambda data, _address: received.append((data, None)),
        batch.set,
        on_segments=lambda data, segment, _address: received.append((data, segment)),
    )
    address = udp.bind("127.0.0.1", 0)
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if not udp.gro:
            pytest.skip("this kernel refuses UDP_GRO")
        payloads = _payloads([1000] * 20 + [300])
        try:
            raw.sendmsg(
                [b"".join(payloads)],
                [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", 1000))],
                0,
                address,
            )
        except OSError as exc:
            pytest.skip(f"this kernel refuses UDP_SEGMENT: {exc}")
        async with asyncio.timeout(5):
            while udp.datagrams_received < len(payloads):
                batch.clear()
                await batch.wait()
    finally:
        raw.close()
        udp.close()
    assert b"".join(data for data, _ in received) == b"".join(payloads)
    assert any(segment == 1000 for _, segment in received)  # at least one run came whole


class RefusingSocket:
    """A socket whose kernel refuses segmentation offload (as some tunnels and NICs do)."""

    def __init__(self, sock: socket.socket, error: int) -> None:
        self._sock = sock
        self._error = error
        self.refusals = 0

    def sendmsg(self, *args: object) -> int:
        self.refusals += 1
        raise OSError(self._error, os.strerror(self._error))

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


@pytest.mark.parametrize("error", [errno.EIO, errno.EINVAL])
async def test_refused_offload_falls_back_to_one_datagram_per_call(
    sender: Collector, receiver: Collector, error: int
) -> None:
    sender.udp.gso = True
    refusing = RefusingSocket(sender.udp._socket, error)
    sender.udp._socket = refusing  # type: ignore[assignment]
    try:
        payloads = _payloads([1350] * 8 + [700])
        sender.udp.send_batch(payloads, receiver.address)
        sender.udp.send_batch(payloads, receiver.address)  # no second attempt at GSO
        await receiver.wait_for(2 * len(payloads))
    finally:
        sender.udp._socket = refusing._sock
    assert receiver.datagrams == payloads + payloads
    assert refusing.refusals == 1
    assert not sender.udp.gso
    assert sender.udp.send_errors == 0


async def test_full_kernel_queue_counts_lost_datagrams(
    sender: Collector, receiver: Collector
) -> None:
    class FullSocket(RefusingSocket):
        def sendmsg(self, *args: object) -> int:
            raise BlockingIOError(errno.EAGAIN, "queue full")

    sender.udp.gso = True
    full = FullSocket(sender.udp._socket, errno.EAGAIN)
    sender.udp._socket = full  # type: ignore[assignment]
    try:
        sender.udp.send_batch(_payloads([1350] * 5), receiver.address)
    finally:
        sender.udp._socket = full._sock
    assert sender.udp.send_errors == 5
    assert sender.udp.gso  # a full queue is not a refusal: keep batching


async def test_a_receive_batch_is_bounded_in_datagrams(receiver: Collector) -> None:
    """A full kernel queue is answered every `max_batch` datagrams, not only when drained."""
    batch_ends = 0
    on_batch_end = receiver.udp._on_batch_end

    def count_batch_end() -> None:
        nonlocal batch_ends
        batch_ends += 1
        on_batch_end()

    receiver.udp._on_batch_end = count_batch_end
    receiver.udp.max_batch = 10
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        payloads = _payloads([100] * 25)
        for payload in payloads:  # all queued in the kernel before the loop reads any
            raw.sendto(payload, receiver.address)
        await receiver.wait_for(len(payloads))
    finally:
        raw.close()
    assert receiver.datagrams == payloads
    assert batch_ends == 3
