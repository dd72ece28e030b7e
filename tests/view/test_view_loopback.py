"""The cluster view over real QUIC on loopback: 20 nodes converge after concurrent updates."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from lattica_ray import Node

pytestmark = pytest.mark.slow

NODES = 20
LOOPBACK = ["/ip4/127.0.0.1/udp/0/quic-v1"]


@pytest.mark.timeout(240)
async def test_twenty_real_nodes_converge() -> None:
    async with contextlib.AsyncExitStack() as stack:
        seed = await stack.enter_async_context(Node(listen=LOOPBACK, cluster="c0"))
        nodes = [seed]
        for index in range(1, NODES):
            node = Node(listen=LOOPBACK, bootstrap=[seed.addrs[0]], cluster=f"c{index}")
            nodes.append(await stack.enter_async_context(node))
        started = time.perf_counter()
        # Random concurrent updates: every node exports an actor and writes its map entry.
        for index, node in enumerate(nodes):
            assert node.view is not None
            node.view.export_actor(f"worker-{index}", "Worker", {"step": "async"})
            node.view.map("run").set(f"progress-{index}", index)

        def converged(node: Node) -> bool:
            view = node.view
            assert view is not None
            entries = dict(view.map("run").items())
            return (
                len(view.members()) == NODES
                and len(view.actors()) == NODES
                and all(entries.get(f"progress-{i}") == i for i in range(NODES))
            )

        await asyncio.gather(*(n.view.wait_until(lambda n=n: converged(n), 120) for n in nodes))
        print(
            f"\n{NODES} QUIC nodes on loopback converged in {time.perf_counter() - started:.2f} s"
        )
