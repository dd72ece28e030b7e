"""Cross-cluster actor calls and transfers beside Ray's own, measured in the same run.

Starts two local Ray clusters ("a" on 127.0.0.2, "b" on 127.0.0.3, token auth on), a LatticaActor
on each (real Nodes on loopback), exports an actor on "a", joins a second Ray node to "b"
(127.0.0.4, its own raylet, object store and temp dir, with a resource that pins an actor on it)
and, from a driver of "b", measures:

- small call round trip, interleaved call by call so all see the same machine load:
  `get_actor(...).echo.remote(x)` (cluster b -> cluster a over the mesh; "echo" is made by
  `@lattica_ray.remote`, so a's LatticaActor runs the call in its process: a direct call; on
  b the call is pipelined: sent to b's LatticaActor over its local socket while Ray delivers the
  task that collects the result), the same call with `.options(pipeline=False)`, beside
  the same call to "echo_ray", a plain Ray actor exported with `lattica_ray.export` (a Ray actor
  call on a's side), a Ray actor on the driver's node and one on the other node of b;
- a 64 MiB tensor pushed as an argument: through `get_actor(...).nbytes.remote(t)`, beside Ray
  passing it to an actor on the same node and to an actor on the other node (Ray's cross-node
  object transfer);
- a 64 MiB tensor pulled: `lattica_ray.get(ref)` of an object put on cluster a, beside
  `ray.get` of a tensor made by the actor on the other node.

    .venv/bin/python benchmarks/ray_bridge.py [--calls 300] [--mib 64] [--transport quic|tcp]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lattica_ray.ray.clusters import LocalRayCluster, RayDriver, start_clusters, stop_clusters

SIDE = "side_node"  # the custom resource of b's second node
TRANSPORTS = {"quic": "udp/0/quic-v1", "tcp": "tcp/0"}


class Echo:
    def echo(self, x):
        return x

    def nbytes(self, t):
        return int(t.numel() * t.element_size())

    def make(self, mib, fill):
        import torch

        return torch.full((mib * 1024 * 1024 // 4,), float(fill))


def _start_a(listen):
    import ray

    import lattica_ray.ray as lr

    lr.init(cluster="a", listen=listen)
    # "echo" is served by direct calls (made by @lattica_ray.remote); "echo_ray", an existing
    # Ray actor exported as it is, through a Ray actor call on a's side.
    lr.remote(Echo).options(name="echo", lifetime="detached").remote()
    lr.export(ray.remote(Echo).options(name="echo_ray", lifetime="detached").remote(), "echo_ray")
    return lr.init()


def _direct_calls():
    import lattica_ray.ray as lr

    return lr.init()["direct_calls"]


def _pipelined():
    import lattica_ray.ray as lr

    return lr.init()["pipelined"]


def _start_b(listen, bootstrap):
    import lattica_ray.ray as lr

    return lr.init(cluster="b", listen=listen, bootstrap=[bootstrap])


def _put(mib, fill):
    import torch

    import lattica_ray.ray as lr

    return lr.put(torch.full((mib * 1024 * 1024 // 4,), float(fill)))


def _measure(calls, mib, refs):
    import time

    import numpy as np
    import ray
    import torch

    import lattica_ray.ray as lr

    remote = lr.get_actor("echo", cluster="a", wait=30)
    remote_ray = lr.get_actor("echo_ray", cluster="a", wait=30)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    local = ray.remote(Echo).options(scheduling_strategy=here).remote()
    other = ray.remote(Echo).options(resources={SIDE: 1}).remote()
    ray.get([local.echo.remote(0), other.echo.remote(0), remote.echo.remote(0)])
    ray.get(remote_ray.echo.remote(0))

    methods = {
        "local": local.echo,
        "other_node": other.echo,
        "mesh": remote.echo,
        "mesh_unpiped": remote.echo.options(pipeline=False),
        "mesh_ray": remote_ray.echo,
    }
    for _ in range(30):  # warm up
        for method in methods.values():
            ray.get(method.remote(1))
    samples = {name: [] for name in methods}
    for i in range(calls):
        for name, method in methods.items():
            t0 = time.perf_counter()
            ray.get(method.remote(i))
            samples[name].append(time.perf_counter() - t0)
    latency = {name: np.percentile(s, [50, 99]) * 1e3 for name, s in samples.items()}

    tensor = torch.ones(mib * 1024 * 1024 // 4)

    def best_of(fn, n=3):
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - t0)
        return min(times)

    transfer = {
        "push_local": best_of(lambda i: ray.get(local.nbytes.remote(tensor))),
        "push_other_node": best_of(lambda i: ray.get(other.nbytes.remote(tensor))),
        "push_mesh": best_of(lambda i: ray.get(remote.nbytes.remote(tensor))),
        "pull_other_node": best_of(lambda i: ray.get(other.make.remote(mib, i + 2))),
        # each ref is a different object: every get fetches over the mesh
        "pull_mesh": best_of(lambda i: lr.get(refs[i], progress=False)),
    }
    return latency, transfer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--transport", choices=sorted(TRANSPORTS), default="quic")
    args = parser.parse_args()
    store = max(1024, 6 * args.mib) << 20
    a = LocalRayCluster("a", node_ip="127.0.0.2", object_store_memory=store)
    b = LocalRayCluster("b", node_ip="127.0.0.3", object_store_memory=store)
    suffix = TRANSPORTS[args.transport]
    try:
        start_clusters([a, b])
        b.add_node("127.0.0.4", num_cpus=1, resources={SIDE: 1})
        with RayDriver(a) as driver_a, RayDriver(b) as driver_b:
            info_a = driver_a.call(_start_a, f"/ip4/127.0.0.2/{suffix}", timeout=120)
            listen_b = f"/ip4/127.0.0.3/{suffix}"
            driver_b.call(_start_b, listen_b, info_a["addrs"][0], timeout=120)
            refs = [driver_a.call(_put, args.mib, fill, timeout=120) for fill in (2, 3, 4)]
            latency, transfer = driver_b.call(_measure, args.calls, args.mib, refs, timeout=900)
            direct_calls = driver_a.call(_direct_calls)
            pipelined = driver_b.call(_pipelined)
    finally:
        stop_clusters([a, b])

    local = latency["local"]
    print(f"small call round trip, ms ({args.calls} calls each, interleaved; {args.transport}):")
    for label, key in [
        ("Ray actor, same node", "local"),
        ("Ray actor, other node", "other_node"),
        ("cross-cluster (mesh)", "mesh"),
        ("  the same, not piped", "mesh_unpiped"),
        ("cross-cluster, Ray hop", "mesh_ray"),
    ]:
        p50, p99 = latency[key]
        print(f"  {label:24s} p50 {p50:6.2f}  p99 {p99:6.2f}  ({p50 / local[0]:4.2f}x)")
    print(f"  cross-cluster / same-node p50: {latency['mesh'][0] / local[0]:.2f}x (goal < 2.5x)")
    print(
        f"  calls cluster a ran directly in the actor's process: {direct_calls}"
        " (the rest, and every call of the Ray-hop actor, went through a Ray actor call)"
    )
    mib = args.mib
    print(
        f"  calls cluster b's LatticaActor took over its pipe: {pipelined['claimed']}"
        f" (dropped {pipelined['dropped']}, refused {pipelined['refused']},"
        f" lost {pipelined['lost']})"
    )
    print(f"{mib} MiB tensor, best of 3, seconds (MiB/s):")
    rows = [
        ("push: Ray, same node", "push_local"),
        ("push: Ray, other node", "push_other_node"),
        ("push: mesh call argument", "push_mesh"),
        ("pull: Ray, other node", "pull_other_node"),
        ("pull: lattica_ray.get", "pull_mesh"),
    ]
    for label, key in rows:
        print(f"  {label:26s} {transfer[key]:6.3f} s ({mib / transfer[key]:7.1f} MiB/s)")
    push = transfer["push_mesh"] / transfer["push_other_node"]
    pull = transfer["pull_mesh"] / transfer["pull_other_node"]
    print(f"  mesh call argument / Ray cross-node push: {push:5.2f}x")
    print(f"  lattica_ray.get    / Ray cross-node pull: {pull:5.2f}x")


if __name__ == "__main__":
    main()
