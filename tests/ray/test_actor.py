"""The LatticaActor and remote actor handles on one real Ray cluster, over the in-process mesh.

The driver calls an exported actor through `get_actor(...)`: the call goes driver ->
LatticaActor -> mesh -> LatticaActor's "actor.call" handler -> the exported actor, so every
Ray-side mechanic (ObjectRefs, generators, cancellation, errors, pickling, restarts) is the
one a cross-cluster call uses; only the network in the middle is in-process.
"""

from __future__ import annotations

import os

import pytest

from tests.ray.conftest import running_driver

pytestmark = pytest.mark.ray


class Policy:
    """The user's actor (made a Ray actor inside the driver)."""

    def __init__(self) -> None:
        self.started = 0
        self.cancelled = 0

    def act(self, obs, scale=1.0):
        import numpy as np

        obs = np.asarray(obs)
        return {"action": obs * scale, "n": int(obs.size)}

    def fail(self):
        raise ValueError("bad observation")

    async def slow(self, seconds=30.0):
        import asyncio

        self.started += 1
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return "done"

    def state(self):
        return {"started": self.started, "cancelled": self.cancelled}

    def rollouts(self, n):
        import numpy as np

        for i in range(n):
            yield {"step": i, "obs": np.full(2, i)}

    def _secret(self):
        return "never exported"


def _wait_for(predicate, timeout=30.0, what="condition"):
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        time.sleep(0.1)


def _setup():
    import lattica_ray.ray as lr

    lr.init(cluster="a", mesh="memory")
    cls = lr.remote(Policy)
    cls.options(name="policy", lifetime="detached").remote()
    return lr.init()


@pytest.fixture(scope="module")
def setup(driver):
    info = driver.call(_setup)
    yield driver, info


def _init_again(**kwargs):
    import lattica_ray.ray as lr

    return lr.init(**kwargs)


def test_init_starts_one_pinned_detached_actor_and_is_idempotent(setup):
    driver, info = setup
    assert info["cluster"] == "a"
    assert info["exports"] == ["policy"]
    again = driver.call(_init_again, cluster="a", mesh="memory")
    assert (again["peer_id"], again["pid"]) == (info["peer_id"], info["pid"])
    assert driver.call(_init_again)["pid"] == info["pid"]  # no settings: whatever runs
    # Ray starts workers at niceness 15; the LatticaActor, a daemon, runs at 0 where it may
    assert info["niceness"] == (0 if os.geteuid() == 0 else 15)


def _mismatch():
    import lattica_ray.ray as lr

    with pytest.raises(lr.ConfigMismatch, match="cluster='a' \\(asked 'elsewhere'\\)"):
        lr.init(cluster="elsewhere")
    return True


def test_init_with_other_settings_is_refused(setup):
    driver, _ = setup
    assert driver.call(_mismatch)


def _actor_facts():
    import ray

    from lattica_ray.ray.actor import actor_name

    node = ray.get_runtime_context().get_node_id()
    actor = ray.get_actor(actor_name(node), namespace="lattica_ray")
    info = ray.get(actor.info.remote())
    return info, node


def test_actor_is_pinned_and_outlives_its_driver(setup, ray_cluster):
    _, info = setup
    # A new driver (a restarted notebook kernel) finds the same actor, on the same node.
    with running_driver(ray_cluster) as other:
        found, node = other.call(_actor_facts)
        assert found["pid"] == info["pid"] and found["node_id"] == node
        assert other.call(_init_again, cluster="a")["peer_id"] == info["peer_id"]


def _calls():
    import asyncio

    import numpy as np
    import ray

    import lattica_ray.ray as lr

    handle = lr.get_actor("policy")
    out = {"repr": repr(handle)}
    ref = handle.act.remote(np.arange(3), scale=2.0)
    out["get"] = ray.get(ref)["action"].tolist()

    ready, _ = ray.wait([handle.act.remote([1, 2]) for _ in range(4)], num_returns=4, timeout=30)
    out["wait"] = len(ready)

    async def awaited():
        return (await handle.act.remote([5]))["action"].tolist()

    out["await"] = asyncio.run(awaited())

    @ray.remote
    def total(result):
        return float(result["action"].sum())

    out["ref_to_task"] = ray.get(total.remote(handle.act.remote([1, 2, 3])))

    @ray.remote
    def call_inside(h):
        return ray.get(h.act.remote([10]))["n"]

    out["handle_in_task"] = ray.get(call_inside.remote(handle))

    # ObjectRefs as arguments are resolved on this cluster, top-level and nested.
    obs_ref = ray.put(np.ones(2))
    out["ref_arg"] = ray.get(handle.act.remote(obs_ref))["action"].tolist()
    out["nested_ref_arg"] = ray.get(handle.act.remote({"x": obs_ref}["x"]))["n"]
    nested = ray.get(handle.act.remote([ray.put(1.0), 2.0]))
    out["nested_list"] = nested["action"].tolist()

    gen = handle.rollouts.remote(3)
    out["stream"] = [ray.get(r)["step"] for r in gen]
    return out


def test_remote_handle_gives_ordinary_object_refs(setup):
    driver, _ = setup
    out = driver.call(_calls)
    assert out["repr"].startswith("RemoteActorHandle('policy' on cluster 'a'")
    assert out["get"] == [0.0, 2.0, 4.0]
    assert out["wait"] == 4
    assert out["await"] == [5.0]
    assert out["ref_to_task"] == 6.0
    assert out["handle_in_task"] == 1
    assert out["ref_arg"] == [1.0, 1.0]
    assert out["nested_ref_arg"] == 2
    assert out["nested_list"] == [1.0, 2.0]
    assert out["stream"] == [0, 1, 2]


def _errors():
    import ray

    import lattica_ray.ray as lr

    handle = lr.get_actor("policy")
    out = {}
    try:
        ray.get(handle.fail.remote())
    except lr.RemoteActorError as exc:  # Ray's task error is also the cause's type
        out["type"] = exc.remote_type
        out["traceback"] = exc.remote_traceback
        out["str"] = str(exc)
    with pytest.raises(lr.UnsupportedValue, match=r"arguments\[0\]\[0\]: a builtins\.object"):
        handle.act.remote(object())
    with pytest.raises(AttributeError):
        handle._secret  # noqa: B018
    assert "_secret" not in handle.methods
    with pytest.raises(lr.MethodNotExported, match="exports no method 'nope'"):
        handle.nope  # noqa: B018
    with pytest.raises(lr.ActorNotFound, match="no exported actor 'ghost'"):
        lr.get_actor("ghost")
    return out


def test_remote_exceptions_carry_the_remote_traceback(setup):
    driver, _ = setup
    out = driver.call(_errors)
    assert out["type"] == "ValueError", out["str"]
    assert "bad observation" in out["str"]
    assert "in fail" in out["traceback"] and "raise ValueError" in out["traceback"]


def _policy_state():
    import ray

    return ray.get(ray.get_actor("policy").state.remote())


def _cancel():
    import ray

    import lattica_ray.ray as lr

    before = _policy_state()
    handle = lr.get_actor("policy")
    ref = handle.slow.remote(60.0)
    _wait_for(lambda: _policy_state()["started"] > before["started"], what="slow() started")
    ray.cancel(ref)
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(ref, timeout=30)
    _wait_for(lambda: _policy_state()["cancelled"] > before["cancelled"], what="slow() cancelled")

    with pytest.raises(lr.RemoteCallTimeout, match=r"did not answer within 0\.5 s"):
        ray.get(handle.slow.options(timeout=0.5).remote(60.0), timeout=30)
    _wait_for(
        lambda: _policy_state()["cancelled"] > before["cancelled"] + 1,
        what="slow() cancelled by the timeout",
    )
    return True


def test_cancel_and_timeout_reach_the_remote_method(setup):
    driver, _ = setup
    assert driver.call(_cancel, timeout=90)


def _objects():
    import numpy as np

    import lattica_ray.ray as lr

    weights = {"w": np.arange(1000, dtype=np.float32), "step": 3}
    ref = lr.put(weights)
    got = lr.get(ref)
    return ref, got["w"].tolist() == weights["w"].tolist(), got["step"]


def test_put_and_get_a_global_object(setup):
    driver, _ = setup
    ref, same, step = driver.call(_objects)
    assert ref.cid.startswith("bafkrei") and ref.size > 4000
    assert same and step == 3


def restart_lattica_actor():
    """Kill this node's LatticaActor; wait until Ray has restarted it: (info before, after)."""
    import ray

    from lattica_ray.ray.actor import actor_name

    node = ray.get_runtime_context().get_node_id()
    actor = ray.get_actor(actor_name(node), namespace="lattica_ray")
    before = ray.get(actor.info.remote())
    ray.kill(actor, no_restart=False)

    def restarted():
        try:
            info = ray.get(actor.info.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            return None  # dying, or not back yet
        return info if info["pid"] != before["pid"] else None

    return before, _wait_for(restarted, timeout=60, what="LatticaActor restart")


def _kill_lattica_actor():
    import ray

    import lattica_ray.ray as lr

    before, after = restart_lattica_actor()

    result = ray.get(lr.get_actor("policy").act.remote([4]))
    return before, after, result["n"]


def test_actor_restarts_with_same_peer_and_exports(setup):
    driver, _ = setup
    before, after, n = driver.call(_kill_lattica_actor, timeout=90)
    assert after["restarted"] and after["pid"] != before["pid"]
    assert after["peer_id"] == before["peer_id"]
    assert after["exports"] == ["policy"]
    assert n == 1


def _shutdown():
    import ray

    import lattica_ray.ray as lr
    from lattica_ray.ray.actor import actor_name

    lr.shutdown()
    node = ray.get_runtime_context().get_node_id()
    with pytest.raises(ValueError):
        ray.get_actor(actor_name(node), namespace="lattica_ray")
    with pytest.raises(lr.NotInitialized):
        lr.get_actor("policy")
    return ray.is_initialized()


def test_shutdown_removes_the_actor_but_keeps_a_ray_it_did_not_start(setup):
    driver, _ = setup
    assert driver.call(_shutdown) is True
