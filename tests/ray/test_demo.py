"""`lattica-ray demo`: three Ray clusters learn CartPole together, and nothing is left running.

The command runs as a user runs it (in the NAT lab when this machine allows, else on loopback);
the loopback run is checked in-process too, against the same training without any mesh.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lattica_ray.ray.clusters import pids_mentioning

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(400)]
pytest.importorskip("lattica_ray.view", reason="the cluster view has not landed yet")


def test_demo_command_learns_and_cleans_up():
    done = subprocess.run(
        [sys.executable, "-m", "lattica_ray.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=380,
        env={**os.environ, "COLUMNS": "200"},
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    returns = [float(x) for x in re.findall(r"iteration +\d+: return +([\d.]+)", output)]
    assert len(returns) == 15
    assert sum(returns[-3:]) / 3 >= 2 * returns[0], returns
    assert "identical to the same training without the mesh: True" in output
    assert "every cluster, driver and node stopped" in output
    for path in ("direct", "holepunched", "relayed"):
        if path in output:
            break
    else:
        raise AssertionError(f"no path kind shown:\n{output}")
    temp_dirs = re.findall(r"temp dir (/tmp/lr-\S+?)\)", output)
    assert len(temp_dirs) == 3, output
    for temp_dir in temp_dirs:  # Ray processes, drivers and the relay (its key is in one)
        assert not Path(temp_dir).exists()
        assert pids_mentioning(temp_dir) == []
    for netns in re.findall(r"netns (netlab-\S+?),", output):  # in the NAT lab
        assert not Path("/run/netns", netns).exists()


def test_demo_on_loopback_trains_exactly_as_without_the_mesh():
    from rich.console import Console

    from lattica_ray.demo import run

    shown = io.StringIO()
    result = run("loopback", iterations=10, console=Console(file=shown, width=200))
    assert result.mode == "loopback"
    assert result.returns == result.expected  # every trajectory crossed intact, in order
    assert result.improved, result.returns
    assert {s["cluster"]: s["episodes_played"] for s in result.worker_stats} == {
        "home": 80,
        "campus": 80,
    }
    assert all(s["policy_fetches"] == 10 for s in result.worker_stats)
    clusters = {m["cluster"] for m in result.status["members"]}
    assert clusters == {"lab", "home", "campus", "relay"}
    assert result.leftovers == []
    assert not any(Path(d).exists() for d in result.temp_dirs)
    assert "every cluster, driver and node stopped" in shown.getvalue()
