"""Test helpers for the cluster view: a fake clock, a partitionable in-memory mesh of views,
and an author that crafts updates by hand (for attacks the real API would never produce)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable

from pycrdt import Doc, Map

from lattica_ray.view import ClusterView, ViewConfig
from lattica_ray.view.envelope import SignedUpdate, derive_client_id
from lattica_ray.view.models import MemberRecord
from transport.errors import DialTimeout
from transport.handlers import StreamHandler
from transport.host import ConnectionListener
from transport.identity import KeyPair, PeerId
from transport.memory_host import MemoryHost, MemoryNetwork
from transport.multiaddr import Multiaddr
from transport.stream import Stream

# Liveness in view-clock seconds (the clock is fake: tests move it); I/O pacing kept quick.
FAST = ViewConfig(
    heartbeat_interval=1.0,
    suspect_after=5.0,
    gone_after=15.0,
    max_clock_skew=5.0,
    anti_entropy_interval=3.0,
    gap_grace=0.5,
    unreachable_backoff=2.0,
    tick_interval=0.02,
    gossip_batch_delay=0.001,
    sync_cooldown=0.0,
    request_timeout=5.0,
)


class FakeClock:
    """A wall clock that only moves when the test says so."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Partition:
    """Which pairs of peers cannot reach each other."""

    def __init__(self) -> None:
        self.groups: list[set[PeerId]] = []

    def split(self, *groups: Iterable[PeerId]) -> None:
        self.groups = [set(g) for g in groups]

    def heal(self) -> None:
        self.groups = []

    def blocked(self, a: PeerId, b: PeerId) -> bool:
        if not self.groups:
            return False
        return not any(a in g and b in g for g in self.groups)


class PartitionHost:
    """A `Host` over a `MemoryHost` whose dials fail across a partition."""

    def __init__(self, inner: MemoryHost, partition: Partition) -> None:
        self.inner = inner
        self.partition = partition
        self.key = inner.key

    @property
    def peer_id(self) -> PeerId:
        return self.inner.peer_id

    @property
    def addrs(self) -> list[Multiaddr]:
        return self.inner.addrs

    async def open_stream(self, peer: PeerId, protocols: list[str]) -> Stream:
        if self.partition.blocked(self.peer_id, peer):
            raise DialTimeout(f"{peer.short()} is across the partition")
        return await self.inner.open_stream(peer, protocols)

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        self.inner.set_stream_handler(protocol, handler)

    def remove_stream_handler(self, protocol: str) -> None:
        self.inner.remove_stream_handler(protocol)

    def add_peer_addrs(self, peer: PeerId, addrs: list[Multiaddr]) -> None:
        self.inner.add_peer_addrs(peer, addrs)

    def peer_addrs(self, peer: PeerId) -> list[Multiaddr]:
        return self.inner.peer_addrs(peer)

    def connected_peers(self) -> list[PeerId]:
        return [
            p for p in self.inner.connected_peers() if not self.partition.blocked(self.peer_id, p)
        ]

    def add_connection_listener(self, listener: ConnectionListener) -> None:
        self.inner.add_connection_listener(listener)


class Mesh:
    """Views on one in-memory network, sharing a fake clock; all stopped at teardown."""

    def __init__(self) -> None:
        self.network = MemoryNetwork()
        self.clock = FakeClock()
        self.partition = Partition()
        self.views: list[ClusterView] = []
        self._seed = 0

    async def add(
        self,
        config: ViewConfig = FAST,
        *,
        key: KeyPair | None = None,
        join: bool = True,
        **kwargs: object,
    ) -> ClusterView:
        host = PartitionHost(self.network.add_host(key), self.partition)
        self._seed += 1
        view = ClusterView(
            host,
            host.key,
            config,
            clock=self.clock,
            seed=self._seed,
            **kwargs,  # type: ignore[arg-type]
        )
        self.views.append(view)
        await view.start()
        if join and len(self.views) > 1:
            assert await view.join([self.views[0].peer_id]) == 1
        return view

    async def add_many(self, count: int, config: ViewConfig = FAST) -> list[ClusterView]:
        return [await self.add(config) for _ in range(count)]

    def tick(self, seconds: float = 0.0) -> None:
        self.clock.advance(seconds)
        for view in self.views:
            if view._running:
                view.tick()

    async def aclose(self) -> None:
        for view in self.views:
            with contextlib.suppress(Exception):
                await view.stop()
        for host in list(self.network.hosts.values()):
            await host.aclose()


async def wait_all(
    views: list[ClusterView], predicate: Callable[[], bool], timeout: float = 10.0
) -> None:
    """Wait until `predicate()` holds, re-checking whenever any of the views changes."""
    async with asyncio.timeout(timeout):
        while not predicate():
            waiters = [asyncio.ensure_future(v.wait_changed()) for v in views]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()


def converged(views: list[ClusterView]) -> Callable[[], bool]:
    return lambda: len({v.digest() for v in views}) == 1


class Forger:
    """An author outside the view code: its own pycrdt document and key, signing whatever it
    writes, so tests can produce the updates a malicious peer could send."""

    def __init__(
        self, key: KeyPair | None = None, incarnation: int = 1, client_id: int | None = None
    ) -> None:
        self.key = key or KeyPair.generate()
        self.peer_id = self.key.peer_id
        self.incarnation = incarnation
        self.client_id = (
            client_id if client_id is not None else derive_client_id(self.peer_id, incarnation)
        )
        self.doc = Doc(client_id=self.client_id)
        self.roots = {name: self.doc.get(name, type=Map) for name in ("members", "actors", "user")}
        self.seq = 0
        self._captured: list[bytes] = []
        self.doc.observe(lambda event: self._captured.append(event.update))

    @property
    def prefix(self) -> str:
        return f"{self.peer_id}/{self.incarnation}"

    def see(self, *envelopes: SignedUpdate) -> None:
        """Learn other authors' state (so our items can build on theirs)."""
        for envelope in envelopes:
            self.doc.apply_update(envelope.update)

    def change(self, mutate: Callable[[dict[str, Map]], None]) -> bytes:
        self._captured.clear()
        with self.doc.transaction():
            mutate(self.roots)
        return self._captured[-1]

    def sign(self, update: bytes, seq: int | None = None) -> SignedUpdate:
        if seq is None:
            self.seq += 1
            seq = self.seq
        return SignedUpdate.create(self.key, self.incarnation, seq, update)

    def write(self, mutate: Callable[[dict[str, Map]], None]) -> SignedUpdate:
        return self.sign(self.change(mutate))

    def announce(self, cluster_name: str = "rogue") -> SignedUpdate:
        record = MemberRecord(cluster_name=cluster_name).model_dump_json()
        return self.write(lambda roots: roots["members"].__setitem__(self.prefix, record))


async def settle(
    mesh: Mesh, views: list[ClusterView], predicate: Callable[[], bool], timeout: float = 30.0
) -> None:
    """Wait for `predicate`, moving the clock an anti-entropy interval whenever nothing happens
    for a while: gossip may miss a replica, and the periodic sync is what repairs that."""
    async with asyncio.timeout(timeout):
        while not predicate():
            try:
                await wait_all(views, predicate, timeout=0.5)
            except TimeoutError:
                mesh.tick(mesh.views[0].config.anti_entropy_interval)
