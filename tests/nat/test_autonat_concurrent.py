"""AutoNAT asks its servers at once (bounded), so an unreachable node learns its
reachability within one dial-back timeout, not one per server (it was ~16 s for a UDP-blocked
node asking one relay after another)."""

from __future__ import annotations

import asyncio
import contextlib
import time

from lattica_ray import Node
from transport.nat import autonat
from transport.nat.manager import AUTONAT_SERVERS
from transport.nat.reachability import Reachability

TCP_ONLY = ["/ip4/127.0.0.1/tcp/0"]


def _serves_autonat(client: Node, server: Node) -> bool:
    info = client.identify_info(server.peer_id)
    return info is not None and autonat.PROTOCOL in info.protocols


async def _identified(client: Node, server: Node) -> None:
    await client.connect(server.addrs[0])
    async with asyncio.timeout(10):
        while not _serves_autonat(client, server):  # noqa: ASYNC110  (state we do not own)
            await asyncio.sleep(0.01)


def _hold_dial_backs(
    servers: list[Node], gate: asyncio.Barrier, busy: list[int], asked: list[Node]
) -> None:
    """Each server's dial-back waits at `gate` until as many requests are in progress as the
    gate's parties: asked one after another, the first would wait forever."""
    for server in servers:
        dial_back = server.nat.autonat._dial_back

        async def held(peer, addrs, dial_back=dial_back, server=server):
            asked.append(server)
            busy[0] += 1
            busy[1] = max(busy[1], busy[0])
            try:
                await gate.wait()
                return await dial_back(peer, addrs)
            finally:
                busy[0] -= 1

        server.nat.autonat._dial_back = held  # type: ignore[method-assign]


async def test_servers_are_asked_at_once() -> None:
    async with contextlib.AsyncExitStack() as stack:
        servers = [
            await stack.enter_async_context(Node(listen=TCP_ONLY, use_relays=False))
            for _ in range(AUTONAT_SERVERS)
        ]
        client = await stack.enter_async_context(Node(listen=TCP_ONLY, use_relays=False))
        for server in servers:
            await _identified(client, server)
        busy = [0, 0]  # in progress, most at once
        _hold_dial_backs(servers, asyncio.Barrier(AUTONAT_SERVERS), busy, [])

        started = time.perf_counter()
        async with asyncio.timeout(10):  # asked one by one, the first dial-back never ends
            verdict = await client.nat.check_reachability([s.peer_id for s in servers])
        elapsed = time.perf_counter() - started

        assert verdict == Reachability.PUBLIC
        assert busy[1] == AUTONAT_SERVERS
        assert elapsed < 3.0, elapsed  # loopback dial-backs: tens of ms each


async def test_at_most_the_bound_at_once_and_a_failure_makes_room() -> None:
    async with contextlib.AsyncExitStack() as stack:
        servers = [
            await stack.enter_async_context(Node(listen=TCP_ONLY, use_relays=False))
            for _ in range(AUTONAT_SERVERS + 2)
        ]
        client = await stack.enter_async_context(Node(listen=TCP_ONLY, use_relays=False))
        for server in servers:
            await _identified(client, server)
        declining = servers[0]  # stops serving AutoNAT after identify advertised it
        declining.swarm.remove_stream_handler(autonat.PROTOCOL)
        busy, asked = [0, 0], []
        _hold_dial_backs(servers[1:], asyncio.Barrier(AUTONAT_SERVERS), busy, asked)

        async with asyncio.timeout(10):
            verdict = await client.nat.check_reachability([s.peer_id for s in servers])

        assert verdict == Reachability.PUBLIC
        assert busy[1] == AUTONAT_SERVERS  # never more at once
        assert set(asked) == set(servers[1 : AUTONAT_SERVERS + 1])  # the refusal made room
