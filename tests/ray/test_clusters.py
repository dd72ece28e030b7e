"""The local-cluster fixture itself: token auth is on and enforced, and stop() leaves nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.ray.conftest import running_clusters, running_driver

pytestmark = pytest.mark.ray

CONNECT = """
import sys, ray
try:
    ray.init(address=sys.argv[1], _node_ip_address=sys.argv[2])
except Exception as exc:
    print("REFUSED", type(exc).__name__, exc)
    sys.exit(3)
print("CONNECTED", ray.get(ray.put(1)))
ray.shutdown()
"""


def _connect(cluster, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    from lattica_ray.ray.clusters import child_env

    # A refused driver retries once a second, 20 times by default: give up after 2.
    env = {**env, "RAY_gcs_server_port_wait_time_s": "2"}
    return subprocess.run(
        [sys.executable, "-c", CONNECT, cluster.address, cluster.node_ip],
        env=child_env(env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _square_on_a_worker(x: int) -> tuple[int, str]:
    import ray

    @ray.remote
    def square(v: int) -> int:
        return v * v

    return ray.get(square.remote(x)), os.environ.get("RAY_AUTH_MODE", "")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_cluster_requires_its_token_and_stops_completely(tmp_path):
    with running_clusters("auth") as (cluster,):
        assert cluster.ray_auth is not None
        with running_driver(cluster) as driver:
            assert driver.call(_square_on_a_worker, 7) == (49, "token")

        # Without the token settings, and with another token, Ray refuses.
        refused = _connect(cluster, {})
        assert refused.returncode == 3, refused.stdout + refused.stderr
        assert "REFUSED" in refused.stdout
        assert "InvalidAuthToken" in refused.stderr
        from lattica_ray.ray.clusters import RayAuth

        wrong = _connect(cluster, RayAuth.generate(tmp_path).env())
        assert wrong.returncode == 3, wrong.stdout + wrong.stderr
        assert "InvalidAuthToken" in wrong.stderr
        allowed = _connect(cluster, cluster.env)
        assert "CONNECTED 1" in allowed.stdout, allowed.stdout + allowed.stderr

        head_pid = cluster.pid
        members = [int(p) for p in os.listdir("/proc") if p.isdigit() and _pgid(int(p)) == head_pid]
        assert len(members) > 3  # gcs_server, raylet, agents...
    assert not _alive(head_pid)
    assert [pid for pid in members if _alive(pid)] == []
    from lattica_ray.ray.clusters import pids_mentioning

    assert pids_mentioning(str(cluster.temp_dir)) == []


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
