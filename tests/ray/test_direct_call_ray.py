"""Direct calls in a real Ray cluster: which exported actors get them, that a sync actor still
runs one call at a time when Ray and the mesh call it together, and that calls survive the
actor's restart (through Ray while its new process has no connection yet)."""

from __future__ import annotations

import pytest

from tests.ray.test_actor import _wait_for

pytestmark = pytest.mark.ray


class Tally:
    """A sync actor that notices overlapping calls."""

    def __init__(self) -> None:
        self.inside = 0
        self.most_inside = 0
        self.calls = 0

    def step(self, seconds):
        import time

        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        time.sleep(seconds)
        self.calls += 1
        self.inside -= 1
        return self.calls

    def pid(self):
        import os

        return os.getpid()

    def overlap(self):
        return self.most_inside


def _direct_calls():
    import lattica_ray.ray as lr

    return lr.init()["direct_calls"]


def _connected(handle):
    """Once a call of `handle` has run directly (the connection is made in the background)."""
    import ray

    before = _direct_calls()
    _wait_for(
        lambda: ray.get(handle.step.remote(0.0)) and _direct_calls() > before,
        what="a direct call",
    )


def _setup():
    import ray

    import lattica_ray.ray as lr

    lr.init(cluster="a", mesh="memory")
    tally = lr.remote(Tally)
    tally.options(name="tally", lifetime="detached", max_restarts=1).remote()
    tally.options(name="threaded", max_concurrency=4).remote()
    tally.options(name="retried", max_restarts=1, max_task_retries=1).remote()
    plain = ray.remote(Tally).options(name="plain").remote()
    lr.export(plain, "plain")
    return True


@pytest.fixture(scope="module")
def setup(driver):
    assert driver.call(_setup, timeout=120)
    return driver


def _counted(name, calls=5):
    """The exports allowed direct calls, and how many of `calls` calls of `name` ran directly
    (once its connection is up, for an actor allowed them)."""
    import ray

    import lattica_ray.ray as lr

    direct_exports = lr.init()["direct_exports"]
    handle = lr.get_actor(name)
    if name in direct_exports:
        _connected(handle)
    before = _direct_calls()
    ray.get([handle.step.remote(0.0) for _ in range(calls)])
    return direct_exports, _direct_calls() - before


def test_only_actors_made_by_lattica_ray_remote_without_concurrency_options_go_direct(setup):
    direct_exports, direct = setup.call(_counted, "tally")
    assert direct_exports == ["tally"]
    assert direct == 5
    assert setup.call(_counted, "threaded")[1] == 0  # max_concurrency: Ray runs those
    assert setup.call(_counted, "retried")[1] == 0  # max_task_retries: Ray retries those
    assert setup.call(_counted, "plain")[1] == 0  # lattica_ray.export of a Ray actor


def _together():
    import ray

    import lattica_ray.ray as lr

    mesh = lr.get_actor("tally")
    local = ray.get_actor("tally")
    _connected(mesh)
    before = _direct_calls()
    refs = []
    for _ in range(10):
        refs += [mesh.step.remote(0.02), local.step.remote(0.02)]
    ray.get(refs, timeout=60)
    return _direct_calls() - before, ray.get(local.overlap.remote())


def test_a_sync_actor_runs_ray_and_direct_calls_one_at_a_time(setup):
    direct, overlap = setup.call(_together, timeout=90)
    assert direct >= 1  # both paths were in use
    assert overlap == 1


def _restart():
    import os
    import signal

    import ray

    import lattica_ray.ray as lr

    handle = lr.get_actor("tally")
    old_pid = ray.get(handle.pid.remote())
    os.kill(old_pid, signal.SIGKILL)  # Ray restarts it (max_restarts=1)

    def answers():
        try:
            return ray.get(handle.pid.remote(), timeout=30)
        except lr.RemoteActorError:
            return None  # a call that was under way when it died, or while it restarts

    new_pid = _wait_for(answers, timeout=60, what="the restarted actor answering")
    _connected(handle)  # to the new process
    return old_pid, new_pid


def test_calls_reach_a_restarted_actor_and_go_direct_again(setup):
    old_pid, new_pid = setup.call(_restart, timeout=120)
    assert new_pid != old_pid
