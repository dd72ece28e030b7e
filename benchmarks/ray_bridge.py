"""Cross-cluster actor calls and transfers beside local Ray, in the same run.

Starts two local Ray clusters ("a" on 127.0.0.2, "b" on 127.0.0.3, token auth on), a LatticaActor
on each (real Nodes, QUIC on loopback), exports an actor on "a" and, from a driver of "b",
measures:
  - small call round trip: `get_actor(...).echo.remote(x)` vs a local Ray actor's `echo.remote(x)`
  - a 64 MiB tensor: through `get_actor(...).method.remote(t)`, through `lattica_ray.get(ref)`,
    and Ray's own object transfer of the same tensor to a local actor, as ratios.

    .venv/bin/python benchmarks/ray_bridge.py [--calls 300] [--mib 64]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lattica_ray.ray.clusters import LocalRayCluster, RayDriver


class Echo:
    def echo(self, x):
        return x

    def nbytes(self, t):
        return int(t.numel() * t.element_size())


def _start_a():
    import lattica_ray.ray as lr

    lr.init(cluster="a", listen="/ip4/127.0.0.2/udp/0/quic-v1")
    lr.remote(Echo).options(name="echo", lifetime="detached").remote()
    return lr.init()


def _start_b(bootstrap):
    import lattica_ray.ray as lr

    return lr.init(cluster="b", listen="/ip4/127.0.0.3/udp/0/quic-v1", bootstrap=[bootstrap])


def _put(mib):
    import torch

    import lattica_ray.ray as lr

    return lr.put(torch.ones(mib * 1024 * 1024 // 4))


def _measure(calls, mib, ref):
    import time

    import numpy as np
    import ray
    import torch

    import lattica_ray.ray as lr

    remote = lr.get_actor("echo", cluster="a", wait=30)
    local = ray.remote(Echo).remote()
    ray.get(local.echo.remote(0))

    def latencies(method):
        for _ in range(20):  # warm up
            ray.get(method.remote(1))
        samples = []
        for i in range(calls):
            t0 = time.perf_counter()
            ray.get(method.remote(i))
            samples.append(time.perf_counter() - t0)
        return np.percentile(samples, [50, 99]) * 1e3

    local_p = latencies(local.echo)
    remote_p = latencies(remote.echo)

    tensor = torch.ones(mib * 1024 * 1024 // 4)

    def best_of(fn, n=3):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    t_local = best_of(lambda: ray.get(local.nbytes.remote(tensor)))
    t_call = best_of(lambda: ray.get(remote.nbytes.remote(tensor)))
    t0 = time.perf_counter()
    lr.get(ref)  # first get fetches over the mesh; later ones would hit the local cache
    t_get = time.perf_counter() - t0
    return {
        "local_p50": local_p[0],
        "local_p99": local_p[1],
        "remote_p50": remote_p[0],
        "remote_p99": remote_p[1],
        "t_local": t_local,
        "t_call": t_call,
        "t_get": t_get,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--mib", type=int, default=64)
    args = parser.parse_args()
    a = LocalRayCluster("a", node_ip="127.0.0.2", object_store_memory=1024 << 20)
    b = LocalRayCluster("b", node_ip="127.0.0.3", object_store_memory=1024 << 20)
    try:
        a.start()
        b.start()
        with RayDriver(a) as driver_a, RayDriver(b) as driver_b:
            info_a = driver_a.call(_start_a, timeout=120)
            driver_b.call(_start_b, info_a["addrs"][0], timeout=120)
            ref = driver_a.call(_put, args.mib, timeout=120)
            r = driver_b.call(_measure, args.calls, args.mib, ref, timeout=600)
    finally:
        a.stop()
        b.stop()
    mib = args.mib
    print(f"small call round trip ({args.calls} calls), ms:")
    print(f"  local Ray actor       p50 {r['local_p50']:7.2f}  p99 {r['local_p99']:7.2f}")
    print(f"  cross-cluster (mesh)  p50 {r['remote_p50']:7.2f}  p99 {r['remote_p99']:7.2f}")
    print(f"  ratio                 p50 {r['remote_p50'] / r['local_p50']:7.2f}x (goal < 2.5x)")
    print(f"{mib} MiB tensor, seconds (MiB/s):")
    for label, key in [
        ("local Ray actor arg", "t_local"),
        ("cross-cluster call arg", "t_call"),
        ("lattica_ray.get", "t_get"),
    ]:
        print(f"  {label:24s} {r[key]:6.3f} s ({mib / r[key]:8.1f} MiB/s)")
    print(f"  call / local   {r['t_call'] / r['t_local']:6.2f}x")
    print(f"  get  / local   {r['t_get'] / r['t_local']:6.2f}x")
    print("  (Ray's cross-node object transfer baseline: not yet measured, needs a 2-node cluster)")


if __name__ == "__main__":
    main()
