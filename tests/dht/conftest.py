"""Fixtures for DHT tests: networks of real DHT services on in-memory hosts, always torn down."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from lattica_ray.dht import DHT, DHTConfig
from transport.identity import KeyPair
from transport.memory_host import MemoryHost, MemoryNetwork

_seeds = itertools.count(1)


def key_pair() -> KeyPair:
    """Deterministic, distinct keys (reproducible tables, no entropy wasted)."""
    return KeyPair.from_seed(next(_seeds).to_bytes(32, "big"))


class FakeClock:
    """Wall-clock time that tests move by hand (records and providers expire by it)."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class DHTNet:
    network: MemoryNetwork
    clock: FakeClock
    dhts: list[DHT] = field(default_factory=list)
    hosts: list[MemoryHost] = field(default_factory=list)

    async def add(self, config: DHTConfig | None = None, start: bool = True) -> DHT:
        host = self.network.add_host(key_pair())
        dht = DHT(host, host.key, config or DHTConfig(), clock=self.clock)
        self.hosts.append(host)
        self.dhts.append(dht)
        if start:
            await dht.start()
        return dht

    def raw_host(self) -> MemoryHost:
        """A host with no DHT: plays attackers and hand-written peers."""
        host = self.network.add_host(key_pair())
        self.hosts.append(host)
        return host

    async def grow(self, count: int, config: DHTConfig | None = None) -> list[DHT]:
        """`count` server nodes, each bootstrapped from the first; tables then refreshed."""
        new = [await self.add(config) for _ in range(count)]
        first = self.dhts[0]
        for dht in new:
            if dht is not first:
                await dht.bootstrap([first.host.addrs[0]], refresh_buckets=False)
        for dht in self.dhts:
            if len(dht.table):
                await dht.refresh(force=True)
        return new

    async def close(self) -> None:
        for dht in self.dhts:
            await dht.stop()
        for host in self.hosts:
            await host.aclose()


@pytest.fixture
async def dht_net() -> AsyncIterator[DHTNet]:
    net = DHTNet(MemoryNetwork(), FakeClock())
    try:
        yield net
    finally:
        await net.close()
