"""`lattica-ray up`, `status` and `down` against a real Ray cluster (token auth on).

The commands run in one child process, as a shell user would run them one after the other:
each connects to the cluster as a short-lived driver, does its job and disconnects.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.ray
pytest.importorskip("lattica_ray.view", reason="the cluster view has not landed yet")

# Runs the commands given as JSON [[name, kwargs], ...]; prints [[exit code, output], ...].
SESSION = """
import io, json, sys
from rich.console import Console
from lattica_ray.ray import cli_commands

results = []
for name, kwargs in json.loads(sys.argv[1]):
    out = io.StringIO()
    code = getattr(cli_commands, name)(console=Console(file=out, width=200), **kwargs)
    results.append([code, out.getvalue()])
print("RESULTS" + json.dumps(results))
"""


def _session(cluster, commands, env_extra=None) -> list[tuple[int, str]]:
    from lattica_ray.ray.clusters import child_env

    env = child_env({**cluster.env, "RAY_ADDRESS": cluster.address, **(env_extra or {})})
    done = subprocess.run(
        [sys.executable, "-c", SESSION, json.dumps(commands)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULTS"))
    return [(code, text) for code, text in json.loads(line[len("RESULTS") :])]


def test_up_status_down(ray_cluster):
    listen = "/ip4/127.0.0.2/udp/0/quic-v1"
    up = ["up", {"cluster": "lab", "listen": [listen]}]
    results = _session(
        ray_cluster,
        [
            up,
            up,  # idempotent
            ["up", {"cluster": "other"}],  # differs from what runs
            ["status", {}],
            ["status", {"as_json": True}],
            ["down", {}],
            ["down", {}],
            ["status", {}],
        ],
    )
    (first, second, other, table, as_json, down, down_again, after) = results

    assert first[0] == 0 and "LatticaActors of cluster 'lab'" in first[1]
    assert "lattica-ray up --bootstrap /ip4/127.0.0.2/udp/" in first[1]
    peer_id = json.loads(as_json[1])["self"]["peer_id"]
    assert peer_id in first[1] and peer_id in second[1]  # the same actor, found again

    assert other[0] == 1
    assert "cluster='lab' (asked 'other')" in other[1] and "lattica-ray down" in other[1]

    assert table[0] == 0
    for heading in ("clusters (seen from 'lab')", "machines", "exported actors", "(self)"):
        assert heading in table[1]
    snapshot = json.loads(as_json[1])
    (member,) = snapshot["members"]
    assert member["path"] == "self" and member["cluster"] == "lab"
    assert member["resources"]["cpus"] == 2.0 and member["resources"]["memory_bytes"] > 0

    assert down == (0, "stopped 1 LatticaActor(s); this cluster left the mesh\n")
    assert down_again[0] == 0 and "nothing to stop" in down_again[1]
    assert after[0] == 1 and "run `lattica-ray up` first" in after[1]


def test_no_ray_cluster_is_a_clear_error(ray_cluster):
    from lattica_ray.ray.clusters import free_port

    nowhere = f"127.0.0.2:{free_port('127.0.0.2')}"
    results = _session(
        ray_cluster, [["status", {"address": nowhere}], ["up", {"address": nowhere}]]
    )
    for code, text in results:
        assert code == 1
        assert f"no Ray cluster at '{nowhere}'" in text and "Connection refused" in text
    assert "ray start --head" in results[1][1]
