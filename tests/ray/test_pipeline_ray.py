"""Pipelined calls in a real Ray cluster: the remote call starts before the Ray task that
collects its result runs; calls nobody collects are dropped after the claim timeout; tasks pipe
their calls too; ObjectRef arguments keep Ray's path; and a restarted LatticaActor is found
again (calls meanwhile take the Ray path).

The LatticaActor runs with one control slot, so a Ray task of it that waits holds back every
other: what still starts can only have come over the pipe.
"""

from __future__ import annotations

import pytest

from tests.ray.test_actor import Policy, _wait_for, restart_lattica_actor

pytestmark = pytest.mark.ray

CLAIM_TIMEOUT = 2.0


def _setup():
    import lattica_ray.ray as lr

    config = lr.LatticaConfig(control_concurrency=1, pipeline_claim_timeout=CLAIM_TIMEOUT)
    lr.init(cluster="a", mesh="memory", config=config)
    lr.remote(Policy).options(name="policy", lifetime="detached").remote()
    return lr.init()


@pytest.fixture(scope="module")
def setup(driver):
    driver.call(_setup, timeout=120)
    return driver


def _pipelined():
    import lattica_ray.ray as lr

    return lr.init()["pipelined"]


def _policy_state():
    import ray

    return ray.get(ray.get_actor("policy").state.remote(), timeout=30)


def _piped_call(handle):
    """Call until one call went over the pipe (the pipe is found in the background)."""
    import ray

    before = _pipelined()["claimed"]
    _wait_for(
        lambda: ray.get(handle.act.remote([1]), timeout=30) and _pipelined()["claimed"] > before,
        what="a pipelined call",
    )


def _overtaking():
    import ray

    import lattica_ray.ray as lr

    handle = lr.get_actor("policy")
    _piped_call(handle)
    before = _policy_state()
    first = handle.slow.remote(60.0)  # its task holds the LatticaActor's only control slot
    _wait_for(lambda: _policy_state()["started"] == before["started"] + 1, what="first started")
    second = handle.slow.remote(60.0)  # its task waits behind the first one's
    _wait_for(
        lambda: _policy_state()["started"] == before["started"] + 2,
        what="second started while its task waited for the slot",
    )
    ray.cancel(second)  # most likely before its task ran: then its call is dropped later
    ray.cancel(first)
    for ref in (first, second):
        with pytest.raises(ray.exceptions.TaskCancelledError):
            ray.get(ref, timeout=30)
    _wait_for(
        lambda: _policy_state()["cancelled"] == before["cancelled"] + 2,
        timeout=30,
        what="both remote calls cancelled",
    )
    return True


def test_the_remote_call_starts_before_the_ray_task_that_collects_it(setup):
    assert setup.call(_overtaking, timeout=110)


def _never_collected():
    import lattica_ray.ray as lr
    from lattica_ray.ray.proxy import pipe_client

    handle = lr.get_actor("policy")
    _piped_call(handle)
    client = pipe_client("lattica_ray")
    before, stats = _policy_state(), _pipelined()
    request = {
        "actor": handle._pipe_record("slow"),
        "method": "slow",
        "timeout": None,
        "args": [60.0],
        "kwargs": {},
    }
    assert client.send(request) is not None  # and no task ever claims it
    _wait_for(lambda: _policy_state()["started"] > before["started"], what="the call started")
    _wait_for(
        lambda: _policy_state()["cancelled"] > before["cancelled"],
        timeout=CLAIM_TIMEOUT + 20,
        what="the uncollected call cancelled",
    )
    return _pipelined()["dropped"] - stats["dropped"]


def test_a_call_nobody_collects_is_cancelled_and_dropped_after_the_claim_timeout(setup):
    assert setup.call(_never_collected, timeout=90) == 1


def _from_a_task_and_with_object_refs():
    import numpy as np
    import ray

    import lattica_ray.ray as lr

    handle = lr.get_actor("policy")

    @ray.remote
    def call_until_piped(h):
        from tests.ray.test_pipeline_ray import _piped_call

        _piped_call(h)
        return ray.get(h.act.remote([7]))["n"]

    out = {"task": ray.get(call_until_piped.remote(handle), timeout=60)}
    _piped_call(handle)
    before = _pipelined()["claimed"]
    obs = ray.put(np.ones(3))
    out["ref_arg"] = ray.get(handle.act.remote(obs))["action"].tolist()
    out["nested_ref_arg"] = ray.get(handle.act.remote([ray.put(1.0), 2.0]))["n"]
    out["stream"] = [ray.get(r)["step"] for r in handle.rollouts.remote(2)]
    out["piped"] = _pipelined()["claimed"] - before
    return out


def test_tasks_pipe_their_calls_and_object_ref_arguments_keep_rays_path(setup):
    out = setup.call(_from_a_task_and_with_object_refs, timeout=110)
    assert out["task"] == 1
    assert out["ref_arg"] == [1.0, 1.0, 1.0] and out["nested_ref_arg"] == 2
    assert out["stream"] == [0, 1]
    assert out["piped"] == 0  # resolved by Ray on this cluster, as before


def _restart():
    import ray

    import lattica_ray.ray as lr

    handle = lr.get_actor("policy")
    _piped_call(handle)
    before, after = restart_lattica_actor()
    # this process's pipe led to the old LatticaActor: the next call falls back to Ray
    assert ray.get(handle.act.remote([3]), timeout=30)["n"] == 1
    _piped_call(handle)  # over the new LatticaActor's pipe
    return before["pid"], after["pid"], _pipelined()["claimed"]


def test_calls_fall_back_to_ray_and_pipe_again_after_a_restart(setup):
    old_pid, new_pid, piped = setup.call(_restart, timeout=110)
    assert new_pid != old_pid and piped >= 1
