"""notebooks/quickstart.ipynb runs top to bottom (nbclient), against two real Ray clusters:
"home" exports the example's rollout workers; the notebook's kernel is a driver of "notebook"."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from tests.ray.conftest import running_clusters, running_driver

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]
nbformat = pytest.importorskip("nbformat", reason="pip install nbclient nbformat ipykernel")
nbclient = pytest.importorskip("nbclient", reason="pip install nbclient nbformat ipykernel")
pytest.importorskip("matplotlib", reason="the notebook plots with matplotlib")
pytest.importorskip("lattica_ray.view", reason="the cluster view has not landed yet")

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "quickstart.ipynb"
HOME_LISTEN = "/ip4/127.0.0.2/udp/0/quic-v1"
NOTEBOOK_LISTEN = "/ip4/127.0.0.3/udp/0/quic-v1"


def _join(listen):
    import lattica_ray.ray as lr

    return lr.init(cluster="home", listen=listen)["addrs"][0]


def _outputs(cell) -> str:
    texts = []
    for output in cell.get("outputs", []):
        texts.append(output.get("text", ""))
        texts.append(output.get("data", {}).get("text/plain", ""))
    return "".join(texts)


def test_quickstart_notebook_runs(monkeypatch, tmp_path):
    from lattica_ray.demo import load_example

    rollouts = load_example()
    with running_clusters("home", "notebook") as (home, here), running_driver(home) as driver:
        bootstrap = driver.call(_join, HOME_LISTEN, timeout=120)
        driver.call(rollouts.serve_worker, "home", timeout=120)
        for name, value in {
            **here.env,
            "RAY_ADDRESS": here.address,
            "LATTICA_BOOTSTRAP": bootstrap,
            "LATTICA_CLUSTER": "notebook",
            "LATTICA_REMOTE_CLUSTER": "home",
            "LATTICA_LISTEN": NOTEBOOK_LISTEN,
        }.items():
            monkeypatch.setenv(name, value)  # the kernel inherits them
        notebook = nbformat.read(NOTEBOOK, as_version=4)
        client = nbclient.NotebookClient(
            notebook,
            timeout=180,
            kernel_name="python3",
            resources={"metadata": {"path": str(tmp_path)}},
        )
        client.execute()  # raises CellExecutionError, with the cell's traceback, on any error

        code = [c for c in notebook.cells if c.cell_type == "code"]
        everything = "\n".join(_outputs(c) for c in code)
        assert "this cluster: notebook" in everything
        assert "['home', 'notebook']" in everything  # the clusters of the mesh
        assert "episodes_played" in everything  # a remote actor answered
        means = {
            line.split()[0]: float(line.split()[3])
            for line in everything.splitlines()
            if "mean return" in line
        }
        assert means["lean-following"] > 2 * means["random"], means
        assert "from home -> (" in everything  # the tensor home put, fetched here
        images = [
            o["data"]["image/png"]
            for c in code
            for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})
        ]
        assert len(images) == 1
        assert base64.b64decode(images[0]).startswith(b"\x89PNG")
