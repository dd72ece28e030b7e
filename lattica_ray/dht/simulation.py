"""A DHT of hundreds to thousands of nodes in one process: the real protocol code over a
`MemoryNetwork`, on an event loop whose clock is virtual.

The virtual clock jumps to the next timer whenever every task waits, so a 50 ms round trip
costs no real time, lookup latency is measured exactly (not disturbed by the CPU the
simulation itself burns), and thousands of concurrent lookups cost only their CPU work.
Used by `benchmarks/dht_sim.py` (the figures) and `tests/dht/test_simulation.py` (a quick
version that must keep passing).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import selectors
import statistics
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lattica_ray.dht.config import DHTConfig
from lattica_ray.dht.errors import DHTError
from lattica_ray.dht.routing import kad_id, peer_kad_id
from lattica_ray.dht.service import DHT
from transport.identity import KeyPair
from transport.memory_host import MemoryHost, MemoryNetwork

log = logging.getLogger(__name__)

T = TypeVar("T")
EPOCH = 1_700_000_000.0  # the wall-clock time the simulation starts at (records need one)


class SimulationStalled(RuntimeError):
    """Every task waits and no timer is set: nothing can ever happen again."""


class _VirtualSelector(selectors.DefaultSelector):
    """Polls real file descriptors without blocking; "sleeping" advances the virtual clock."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list[Any]:
        events = super().select(0)
        if events or timeout == 0:
            return events
        if timeout is None:
            raise SimulationStalled("every task is waiting and no timer is set")
        self.now += timeout
        return []


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An asyncio loop whose `time()` is virtual: it only moves when everything waits."""

    def __init__(self) -> None:
        self._virtual = _VirtualSelector()
        super().__init__(self._virtual)

    def time(self) -> float:
        return self._virtual.now


def run_virtual(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run `main()` to completion on a fresh `VirtualClockLoop`."""
    loop = VirtualClockLoop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


# -- the scenario --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SimConfig:
    nodes: int = 1000
    rtt: float = 0.05  # seconds per request/response
    jitter: float = 0.01
    dead_peer_timeout: float = 1.0  # a request to a killed node fails after this long
    kill_fractions: tuple[float, ...] = (0.0, 0.1, 0.3)
    lookups: int = 500  # find_peer lookups per kill fraction
    closest_lookups: int = 100  # full FIND_NODE lookups of random keys, checked against truth
    records: int = 100  # records put before any node is killed
    concurrency: int = 200  # lookups in flight at once
    join_batch: int = 50  # nodes joining at once
    bootstrap_peers: int = 3  # each joining node is given this many joined nodes
    refresh_buckets: bool = False  # join with a self-lookup only (True: also every bucket)
    seed: int = 1
    k: int = 20
    alpha: int = 10
    disjoint_paths: int = 1


@dataclass
class PhaseResult:
    killed_fraction: float
    alive: int
    lookups: int
    found: int
    hops: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    queries: list[int] = field(default_factory=list)
    records_tried: int = 0
    records_found: int = 0
    closest_overlap: list[float] = field(default_factory=list)  # of the true k closest alive

    @property
    def success_rate(self) -> float:
        return self.found / self.lookups if self.lookups else 0.0

    @property
    def record_survival(self) -> float:
        return self.records_found / self.records_tried if self.records_tried else 0.0


@dataclass
class SimReport:
    config: SimConfig
    join_seconds_virtual: float
    join_seconds_real: float
    join_seconds_cpu: float
    table_sizes: list[int]
    phases: list[PhaseResult]
    real_seconds: float
    cpu_seconds: float
    requests: int  # requests sent by all nodes, probes included

    def lines(self) -> list[str]:
        config = self.config
        out = [
            f"N={config.nodes}  k={config.k}  alpha={config.alpha}  paths={config.disjoint_paths}"
            f"  rtt={config.rtt * 1000:.0f} ms  dead-peer timeout={config.dead_peer_timeout:.1f} s"
            f"  log2(N)={math.log2(config.nodes):.2f}",
            f"  join: {self.join_seconds_virtual:.1f} s virtual, {self.join_seconds_cpu:.1f} s CPU "
            f"({self.join_seconds_real:.1f} s real); "
            f"routing table size median {statistics.median(self.table_sizes):.0f} "
            f"(min {min(self.table_sizes)}, max {max(self.table_sizes)})",
        ]
        for phase in self.phases:
            hops = phase.hops or [0]
            lat = phase.latencies
            out.append(
                f"  killed {phase.killed_fraction:4.0%} ({phase.alive} alive): "
                f"find_peer success {phase.found}/{phase.lookups} = {phase.success_rate:.1%}; "
                f"hops mean {statistics.mean(hops):.2f} max {max(hops)} "
                f"(log2 N = {math.log2(config.nodes):.2f}); "
                f"latency p50 {percentile(lat, 50) * 1000:.0f} ms "
                f"p95 {percentile(lat, 95) * 1000:.0f} ms; "
                f"requests/lookup {statistics.mean(phase.queries or [0]):.1f}; "
                f"k-closest accuracy {statistics.mean(phase.closest_overlap or [0.0]):.1%}; "
                f"records found {phase.records_found}/{phase.records_tried} "
                f"= {phase.record_survival:.1%}"
            )
        out.append(
            f"  total {self.cpu_seconds:.1f} s CPU ({self.real_seconds:.1f} s real), "
            f"{self.requests} requests"
        )
        return out


def percentile(values: list[float], pct: float) -> float:
    """The nearest-rank percentile (0 for no values)."""
    ordered = sorted(values) or [0.0]
    return ordered[min(len(ordered) - 1, max(0, math.ceil(pct / 100 * len(ordered)) - 1))]


async def _bounded(jobs: list[Callable[[], Awaitable[T]]], limit: int) -> list[T]:
    semaphore = asyncio.Semaphore(limit)

    async def one(job: Callable[[], Awaitable[T]]) -> T:
        async with semaphore:
            return await job()

    return await asyncio.gather(*(one(job) for job in jobs))


class Simulation:
    """N DHT nodes on one `MemoryNetwork`; `run()` joins them, kills some, measures."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.random = random.Random(config.seed)
        self.network = MemoryNetwork(
            rtt=config.rtt,
            jitter=config.jitter,
            dead_peer_timeout=config.dead_peer_timeout,
            seed=config.seed,
        )
        self.hosts: list[MemoryHost] = []
        self.dhts: list[DHT] = []
        self.alive: list[int] = []
        self.records: dict[bytes, bytes] = {}

    def _clock(self) -> float:
        return EPOCH + asyncio.get_running_loop().time()

    async def join(self) -> None:
        config = self.config
        dht_config = DHTConfig(k=config.k, alpha=config.alpha, disjoint_paths=config.disjoint_paths)
        for index in range(config.nodes):
            seed = (config.seed * 1_000_003 + index).to_bytes(32, "big")
            host = self.network.add_host(KeyPair.from_seed(seed))
            dht = DHT(host, host.key, dht_config, clock=self._clock)
            await dht.start()
            self.hosts.append(host)
            self.dhts.append(dht)
        self.alive = list(range(config.nodes))
        joined = [0]
        while len(joined) < config.nodes:  # the network grows: never more joiners than members
            start = len(joined)
            batch = range(start, min(config.nodes, start + min(config.join_batch, start)))
            await asyncio.gather(*(self._join_one(index, joined) for index in batch))
            joined.extend(batch)
        for dht in self.dhts:
            await dht.settle()

    async def _join_one(self, index: int, joined: list[int]) -> None:
        chosen = self.random.sample(joined, min(len(joined), self.config.bootstrap_peers))
        addrs = [self.hosts[i].addrs[0] for i in chosen]
        try:
            await self.dhts[index].bootstrap(addrs, refresh_buckets=self.config.refresh_buckets)
        except DHTError as exc:
            log.warning("node %d could not join: %s", index, exc)

    async def put_records(self) -> None:
        async def put(i: int) -> None:
            key = f"/lattica/sim/record-{i}".encode()
            value = f"value {i}".encode()
            author = self.dhts[self.random.choice(self.alive)]
            try:
                await author.put(key, value)
                self.records[key] = value
            except DHTError as exc:
                log.warning("put %r failed: %s", key, exc)

        await _bounded([lambda i=i: put(i) for i in range(self.config.records)], 50)

    async def kill_until(self, fraction: float) -> None:
        """Kill random nodes without warning until `fraction` of all nodes are dead."""
        target_dead = round(fraction * self.config.nodes)
        while self.config.nodes - len(self.alive) < target_dead:
            victim = self.alive.pop(self.random.randrange(len(self.alive)))
            self.network.kill(self.hosts[victim].peer_id)
            await self.dhts[victim].stop()  # its own timers; it sends nothing when dead

    async def measure(self, fraction: float) -> PhaseResult:
        config = self.config
        loop = asyncio.get_running_loop()
        phase = PhaseResult(fraction, len(self.alive), config.lookups, 0)

        async def lookup() -> None:
            source, target = self.random.sample(self.alive, 2)
            started = loop.time()
            try:
                result = await self.dhts[source].lookup_peer(self.hosts[target].peer_id)
            except DHTError:
                return
            phase.queries.append(result.queries)
            if result.found:
                phase.found += 1
                phase.hops.append(result.hops)
                phase.latencies.append(loop.time() - started)

        await _bounded([lookup for _ in range(config.lookups)], config.concurrency)

        async def closest() -> None:
            source = self.dhts[self.random.choice(self.alive)]
            key = self.random.randbytes(16)
            try:
                found = await source.get_closest_peers(key)
            except DHTError:
                found = []
            point = kad_id(key)
            truth = sorted(
                (self.hosts[i].peer_id for i in self.alive if self.dhts[i] is not source),
                key=lambda p: peer_kad_id(p) ^ point,
            )[: config.k]
            phase.closest_overlap.append(len(set(found) & set(truth)) / len(truth))

        await _bounded([closest for _ in range(config.closest_lookups)], config.concurrency)

        async def get(key: bytes, value: bytes) -> None:
            reader = self.dhts[self.random.choice(self.alive)]
            try:
                found = await reader.get(key)
            except DHTError:
                found = None
            phase.records_tried += 1
            if found == value:
                phase.records_found += 1

        items = list(self.records.items())
        await _bounded([lambda kv=kv: get(*kv) for kv in items], config.concurrency)
        return phase

    async def close(self) -> None:
        for dht in self.dhts:
            await dht.stop()
        for host in self.hosts:
            await host.aclose()


async def simulate(config: SimConfig) -> SimReport:
    started, cpu_started = time.perf_counter(), time.process_time()
    sim = Simulation(config)
    loop = asyncio.get_running_loop()
    try:
        virtual_start = loop.time()
        await sim.join()
        join_virtual = loop.time() - virtual_start
        join_real = time.perf_counter() - started
        join_cpu = time.process_time() - cpu_started
        await sim.put_records()
        table_sizes = [len(d.table) for d in sim.dhts]
        phases = []
        for fraction in config.kill_fractions:
            await sim.kill_until(fraction)
            phases.append(await sim.measure(fraction))
        return SimReport(
            config,
            join_virtual,
            join_real,
            join_cpu,
            table_sizes,
            phases,
            time.perf_counter() - started,
            time.process_time() - cpu_started,
            sum(dht.stats.requests_sent for dht in sim.dhts),
        )
    finally:
        await sim.close()


def run_simulation(config: SimConfig) -> SimReport:
    return run_virtual(lambda: simulate(config))
