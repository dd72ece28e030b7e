"""Choosing among a peer's paths (pure), and the path probe over in-memory streams."""

from __future__ import annotations

import asyncio

import pytest

from transport.connection import DIRECT, HOLEPUNCHED, RELAYED, Connection
from transport.errors import StreamReset
from transport.identity import KeyPair
from transport.memory import memory_stream_pair
from transport.paths import PathConfig, PathStats, choose_path, probe_path, serve_probe

PEER = KeyPair.generate().peer_id


class FakeConnection(Connection):
    """Only what choosing looks at: transport, path, closed, suspect."""

    def __init__(self, transport: str, path: str = DIRECT, suspect: bool = False) -> None:
        super().__init__(PEER, None, None, True, path)
        self.transport = transport
        self.suspect = suspect

    async def open_stream(self):  # pragma: no cover - never called
        raise NotImplementedError

    async def close(self) -> None:
        self._mark_closed("closed")


def _stats(rtt_ms: float | None, mb_per_s: float | None) -> PathStats:
    return PathStats(
        rtt_ms / 1000 if rtt_ms is not None else None,
        mb_per_s * 1e6 if mb_per_s is not None else None,
    )


async def test_small_streams_take_the_lowest_rtt_bulk_the_highest_throughput() -> None:
    quic, tcp = FakeConnection("quic"), FakeConnection("tcp")
    stats = {quic: _stats(0.2, 40), tcp: _stats(0.9, 400)}
    assert choose_path([quic, tcp], stats, {}) is quic
    assert choose_path([quic, tcp], stats, {}, bulk=True) is tcp
    # The measurement decides, not the transport's name.
    stats = {quic: _stats(5.0, 90), tcp: _stats(0.5, 30)}
    assert choose_path([quic, tcp], stats, {}) is tcp
    assert choose_path([quic, tcp], stats, {}, bulk=True) is quic


async def test_healthy_direct_paths_come_first_whatever_was_measured() -> None:
    relayed = FakeConnection("relay", RELAYED)
    suspect = FakeConnection("tcp", suspect=True)
    punched = FakeConnection("quic", HOLEPUNCHED)
    stats = {relayed: _stats(0.1, 999), suspect: _stats(0.1, 999), punched: _stats(50, 1)}
    for bulk in (False, True):
        assert choose_path([relayed, suspect, punched], stats, {}, bulk) is punched
        # A healthy relay beats a direct path that stopped answering.
        assert choose_path([relayed, suspect], stats, {}, bulk) is relayed
    await punched.close()
    assert choose_path([punched], stats, {}) is None


async def test_measured_paths_beat_unmeasured_and_the_tie_break_settles_the_rest() -> None:
    a, b, c = FakeConnection("quic"), FakeConnection("tcp"), FakeConnection("tcp")
    assert choose_path([a, b], {}, {a: 1, b: 0}) is b
    assert choose_path([a, b], {}, {a: 0, b: 1}) is a
    assert choose_path([a, b, c], {c: _stats(9.0, None)}, {}) is c
    # Bulk: a measured throughput first, then (without one) the lowest RTT.
    assert choose_path([a, b, c], {b: _stats(1.0, None), c: _stats(0.5, None)}, {}, True) is c
    assert choose_path([a, b, c], {a: _stats(9.0, 1), c: _stats(0.5, None)}, {}, True) is a


async def test_probe_measures_rtt_and_throughput_over_a_stream() -> None:
    client, server = memory_stream_pair()
    serving = asyncio.create_task(serve_probe(server, PathConfig()))
    try:
        stats = await probe_path(client, rtt_rounds=3, probe_bytes=3 * 1024 * 1024 + 17)
        await asyncio.wait_for(serving, 5)
    finally:
        serving.cancel()
    assert stats.rtt is not None and 0 < stats.rtt < 1
    assert stats.throughput is not None and stats.throughput > 1e6  # memory moves > 1 MB/s
    assert stats.measured_at > 0


async def test_probe_rtt_only() -> None:
    client, server = memory_stream_pair()
    serving = asyncio.create_task(serve_probe(server, PathConfig()))
    try:
        stats = await probe_path(client, rtt_rounds=1, probe_bytes=0)
    finally:
        await asyncio.wait_for(serving, 5)
    assert stats.rtt is not None and stats.throughput is None


async def test_probe_server_refuses_oversized_rounds_and_endless_streams() -> None:
    config = PathConfig(max_probe_round=1000, max_probe_rounds=2)
    client, server = memory_stream_pair()
    serving = asyncio.create_task(serve_probe(server, config))
    with pytest.raises(StreamReset):
        await probe_path(client, rtt_rounds=1, probe_bytes=1001)
    await asyncio.wait_for(serving, 5)

    client, server = memory_stream_pair()
    serving = asyncio.create_task(serve_probe(server, config))
    with pytest.raises(StreamReset):
        await probe_path(client, rtt_rounds=3, probe_bytes=0)
    await asyncio.wait_for(serving, 5)

    client, server = memory_stream_pair()  # a round cut short: reset, nothing hangs
    serving = asyncio.create_task(serve_probe(server, config))
    await client.write((500).to_bytes(4, "big") + b"x" * 10)
    await client.close()
    await asyncio.wait_for(serving, 5)
    assert server._reset_reason is not None and "cut short" in server._reset_reason
