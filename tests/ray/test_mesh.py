"""NodeMesh on real Nodes (QUIC on loopback), without Ray: what `lattica-ray status` shows
(members, resources, path kinds), and clusters that meet only through a mesh node (relay)."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest

from lattica_ray.ray.config import LatticaConfig
from lattica_ray.ray.mesh import NodeMesh
from lattica_ray.ray.mesh_node import mesh_node
from lattica_ray.ray.protocol import method_table
from lattica_ray.ray.service import LatticaService, ObjectInvoker

pytest.importorskip("lattica_ray.view", reason="the cluster view has not landed yet")

LOOPBACK = "/ip4/127.0.0.1/udp/0/quic-v1"
RESOURCES = {"cpus": 8.0, "gpus": 1.0, "memory_bytes": 2**34, "custom": {"TPU": 4.0}}


class Doubler:
    def double(self, x):
        return x * 2


@contextlib.asynccontextmanager
async def running_services(*configs: LatticaConfig, resources=None):
    started: list[LatticaService] = []
    try:
        for config in configs:
            service = LatticaService(NodeMesh(config, None, resources), config, ObjectInvoker())
            await service.start()
            started.append(service)
        yield started
    finally:
        for service in started:
            await service.stop()


@contextlib.asynccontextmanager
async def running_mesh_node():
    """A relay/bootstrap mesh node in this process; yields its address."""
    node = mesh_node([LOOPBACK])
    await node.start()
    try:
        yield node.addrs[0]
    finally:
        await node.stop()


async def _until(predicate, what: str, views) -> None:
    async with asyncio.timeout(15):
        while not predicate():
            for view in views:
                await view.join(view.host.connected_peers())
            if not predicate():
                await asyncio.sleep(0.05)
    assert predicate(), what


async def test_members_show_resources_and_path_kinds():
    lab_config = LatticaConfig(cluster="lab", listen=(LOOPBACK,))
    async with running_services(lab_config, resources=RESOURCES) as (lab,):
        home_config = LatticaConfig(
            cluster="home", listen=(LOOPBACK,), bootstrap=(lab.mesh.addrs[0],)
        )
        async with running_services(home_config) as (home,):
            views = [lab.mesh.node.view, home.mesh.node.view]
            await _until(lambda: len(home.mesh.members()) == 2, "home sees lab", views)
            members = {m["cluster"]: m for m in home.mesh.members()}
            assert members["home"]["path"] == "self"
            assert members["lab"]["path"] == "direct"
            assert members["lab"]["resources"] == RESOURCES
            assert members["lab"]["status"] == "alive"
            assert members["lab"]["addrs"] == lab.mesh.addrs
            snapshot = home.status()
            assert snapshot["self"]["cluster"] == "home"
            assert sorted(m["peer_id"] for m in snapshot["members"]) == sorted(
                [lab.peer_id, home.peer_id]
            )


async def test_clusters_that_know_only_a_relay_find_and_call_each_other():
    async with running_mesh_node() as relay:
        configs = [
            LatticaConfig(cluster=name, listen=(LOOPBACK,), bootstrap=(relay,))
            for name in ("lab", "home")
        ]
        async with running_services(*configs) as (lab, home):
            await lab.export("doubler", Doubler(), method_table([("double", False)]))
            ref = await lab.put({"weights": np.arange(5.0)})
            views = [s.mesh.node.view for s in (lab, home)]
            await _until(
                lambda: any(r.name == "doubler" for r in home.mesh.actors()),
                "the actor reached home through the relay",
                views,
            )
            record = home.find_actor("doubler", "lab")
            assert await home.call(record, "double", [21], {}) == 42
            fetched = await home.get(ref, timeout=15)
            assert fetched["weights"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
            clusters = {m["cluster"] for m in home.mesh.members()}
            assert clusters == {"relay", "lab", "home"}
