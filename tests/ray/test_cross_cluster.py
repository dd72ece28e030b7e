"""Two real Ray clusters, each with its LatticaActor on a real Node (QUIC on loopback): a driver
of cluster "b" calls an actor of cluster "a" as if it were local."""

from __future__ import annotations

import pytest

from tests.ray.conftest import running_driver
from tests.ray.test_actor import Policy, _wait_for

pytestmark = pytest.mark.ray
pytest.importorskip("lattica_ray.view", reason="the cluster view has not landed yet")


class TensorPolicy(Policy):
    def double(self, t):
        return {"doubled": t * 2, "sum": float(t.sum())}


def _start_a():
    import lattica_ray.ray as lr

    lr.init(cluster="a", listen="/ip4/127.0.0.2/udp/0/quic-v1")
    lr.remote(TensorPolicy).options(name="policy", lifetime="detached").remote()
    return lr.init()


def _start_b(bootstrap):
    import lattica_ray.ray as lr

    return lr.init(cluster="b", listen="/ip4/127.0.0.3/udp/0/quic-v1", bootstrap=[bootstrap])


@pytest.fixture(scope="module")
def drivers(ray_cluster_pair):
    a, b = ray_cluster_pair
    with running_driver(a) as driver_a, running_driver(b) as driver_b:
        info_a = driver_a.call(_start_a, timeout=120)
        info_b = driver_b.call(_start_b, info_a["addrs"][0], timeout=120)
        yield driver_a, driver_b, info_a, info_b


def _tensors_both_ways():
    import ray
    import torch

    import lattica_ray.ray as lr

    handle = lr.get_actor("policy", cluster="a", wait=30)
    out = ray.get(handle.double.remote(torch.arange(4.0)), timeout=60)
    gen = handle.rollouts.remote(3)
    steps = [ray.get(r)["step"] for r in gen]
    return out["doubled"].tolist(), out["sum"], steps, handle.cluster


def test_tensors_and_streams_cross_clusters(drivers):
    _, driver_b, info_a, info_b = drivers
    assert info_a["peer_id"] != info_b["peer_id"]
    doubled, total, steps, cluster = driver_b.call(_tensors_both_ways, timeout=90)
    assert doubled == [0.0, 2.0, 4.0, 6.0] and total == 6.0
    assert steps == [0, 1, 2]
    assert cluster == "a"


def _remote_error():
    import ray

    import lattica_ray.ray as lr

    handle = lr.get_actor("policy", cluster="a", wait=30)
    with pytest.raises(lr.RemoteActorError) as info:
        ray.get(handle.fail.remote(), timeout=60)
    return info.value.remote_type, info.value.remote_traceback


def test_remote_exception_crosses_with_its_traceback(drivers):
    _, driver_b, _, _ = drivers
    remote_type, remote_traceback = driver_b.call(_remote_error, timeout=90)
    assert remote_type == "ValueError"
    assert "raise ValueError" in remote_traceback and "bad observation" in remote_traceback


def _cancel_across():
    import ray

    import lattica_ray.ray as lr

    handle = lr.get_actor("policy", cluster="a", wait=30)

    def state():
        return ray.get(handle.state.remote(), timeout=30)

    before = state()
    ref = handle.slow.remote(60.0)
    _wait_for(lambda: state()["started"] > before["started"], what="slow() started on a")
    ray.cancel(ref)
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(ref, timeout=30)
    _wait_for(lambda: state()["cancelled"] > before["cancelled"], what="slow() cancelled on a")
    return True


def test_cancel_reaches_the_other_cluster(drivers):
    _, driver_b, _, _ = drivers
    assert driver_b.call(_cancel_across, timeout=120)


def _put(n):
    import numpy as np

    import lattica_ray.ray as lr

    return lr.put({"weights": np.arange(n, dtype=np.float32)})


def _get(ref):
    import lattica_ray.ray as lr

    value = lr.get(ref, timeout=60)
    return value["weights"][:3].tolist(), int(value["weights"].size)


def test_global_object_put_on_a_get_on_b(drivers):
    driver_a, driver_b, _, _ = drivers
    ref = driver_a.call(_put, 3_000_000)  # 12 MB: several ranges
    head, size = driver_b.call(_get, ref, timeout=120)
    assert head == [0.0, 1.0, 2.0] and size == 3_000_000
