"""Which of a peer's connections a new stream takes, from measured round trips and throughput.

A swarm may hold several paths to one peer (QUIC and TCP, direct and hole-punched, relayed).
Each direct path is measured on a probe stream (`/lattica-ray/path-probe/1`): a few empty rounds
give its round-trip time (as soon as a peer has a second path), one round of `probe_bytes` its
throughput (before the first bulk stream to that peer, again after `remeasure_after`; never for
a peer with one path, so relays and bootstrap nodes are not flooded). Small streams take
the healthy path with the lowest round trip, bulk streams the one with the highest throughput;
a relayed path only when no healthy direct one is left. Choosing is pure (`choose_path`); the
probe is a few lines of asyncio on any `Stream`.

Probe wire: each round is a 4-byte big-endian length, then that many bytes; the server answers
each round with one byte once it has read the whole round.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pydantic import BaseModel, Field

from transport.connection import RELAYED, Connection
from transport.errors import ProtocolViolation
from transport.stream import Stream

PROBE_PROTOCOL = "/lattica-ray/path-probe/1"
ROUND_HEADER = 4  # bytes: the length of a round
ACK = b"\x01"
CHUNK = 256 * 1024  # bytes per write of a probe round


class PathConfig(BaseModel):
    """How the swarm measures and chooses among a peer's paths."""

    model_config = {"frozen": True}

    measure: bool = Field(
        True,
        description="probe each direct path once a peer has two or more: the round trip at "
        "once, the throughput before the first bulk stream",
    )
    probe_bytes: int = Field(
        1024 * 1024, ge=0, description="bytes of the throughput round (0: RTT only)"
    )
    rtt_rounds: int = Field(5, ge=1, le=16, description="empty rounds; the fastest is the RTT")
    probe_timeout: float = Field(10.0, gt=0, description="seconds one path's probe may take")
    remeasure_after: float = Field(
        300.0, gt=0, description="seconds after which a bulk stream measures the paths again"
    )
    max_probe_round: int = Field(
        16 * 1024 * 1024, ge=0, description="the largest round our probe server reads"
    )
    max_probe_rounds: int = Field(
        32, ge=1, description="rounds our probe server answers per stream"
    )


@dataclass
class PathStats:
    """What was measured on one connection (None: not measured yet)."""

    rtt: float | None = None  # seconds
    throughput: float | None = None  # bytes per second, one direction (ours to theirs)
    measured_at: float = 0.0  # time.monotonic() of the last measurement


def _healthy(connection: Connection) -> bool:
    return not connection.is_closed and not getattr(connection, "suspect", False)


def choose_path(
    connections: list[Connection],
    stats: dict[Connection, PathStats],
    tie_break: dict[Connection, int],
    bulk: bool = False,
) -> Connection | None:
    """The connection a new stream should take, or None if none is open.

    Order: healthy before suspect, direct (and hole-punched) before relayed; then, among
    measured paths, the highest throughput for bulk streams and the lowest RTT for others;
    unmeasured paths come after measured ones, and `tie_break` (lower first) settles the rest.
    """
    live = [c for c in connections if not c.is_closed]
    if not live:
        return None

    def rank(connection: Connection) -> tuple[int, int, int, float, int]:
        measured = stats.get(connection) or PathStats()
        if bulk and measured.throughput is not None:
            group, score = 0, -measured.throughput
        elif bulk:
            group, score = 1, measured.rtt if measured.rtt is not None else float("inf")
        elif measured.rtt is not None:
            group, score = 0, measured.rtt
        else:
            group, score = 1, 0.0
        return (
            0 if _healthy(connection) else 1,
            1 if connection.path == RELAYED else 0,
            group,
            score,
            tie_break.get(connection, 0),
        )

    return min(live, key=rank)


# -- the probe ------------------------------------------------------------------------------


async def _round(stream: Stream, size: int, chunk: memoryview) -> float:
    """One probe round of `size` bytes; seconds until its acknowledgement."""
    started = time.perf_counter()
    await stream.write(size.to_bytes(ROUND_HEADER, "big"))
    left = size
    while left:
        piece = chunk[: min(left, len(chunk))]
        await stream.write(piece)
        left -= len(piece)
    if await stream.readexactly(1) != ACK:
        raise ProtocolViolation("path probe: the peer answered a round with a wrong byte")
    return time.perf_counter() - started


async def probe_path(stream: Stream, rtt_rounds: int, probe_bytes: int) -> PathStats:
    """Measure the path under `stream` (negotiated to `PROBE_PROTOCOL`)."""
    chunk = memoryview(bytes(min(CHUNK, max(probe_bytes, 1))))
    rtts = [await _round(stream, 0, chunk) for _ in range(rtt_rounds)]
    rtt = min(rtts)  # the path's own delay, without the queueing others add
    throughput = None
    if probe_bytes:
        elapsed = await _round(stream, probe_bytes, chunk)
        # The transfer itself took the round minus one round trip (at least half the round).
        throughput = probe_bytes / max(elapsed - rtt, elapsed / 2, 1e-9)
    await stream.close()
    return PathStats(rtt, throughput, time.monotonic())


async def serve_probe(stream: Stream, config: PathConfig) -> None:
    """Read each round whole, acknowledge it; refuse oversized rounds and endless streams."""
    for _ in range(config.max_probe_rounds):
        header = await stream.read(ROUND_HEADER)
        if not header:
            await stream.close()
            return
        if len(header) < ROUND_HEADER:
            header += await stream.readexactly(ROUND_HEADER - len(header))
        size = int.from_bytes(header, "big")
        if size > config.max_probe_round:
            stream.reset(f"path probe round of {size} bytes exceeds {config.max_probe_round}")
            return
        left = size
        while left:
            data = await stream.read(min(left, CHUNK))
            if not data:
                stream.reset("path probe round cut short")
                return
            left -= len(data)
        await stream.write(ACK)
    stream.reset(f"path probe: more than {config.max_probe_rounds} rounds")
