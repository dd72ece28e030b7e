"""`lattica-ray demo`: collaborative RL rollouts across three Ray clusters on this machine.

A learner on cluster "lab" publishes its CartPole policy as a global object; rollout workers
exported by clusters "home" and "campus" fetch it, play episodes and stream the trajectories
back; the learner improves the policy and the mean return rises. The RL code is
`examples/rl_rollouts.py`; this module only sets the stage and tears it down:

- three real Ray clusters (`ray start --head`, token auth, each its own temp dir and ports),
  one driver process per cluster, a LatticaActor per cluster, and a public relay/bootstrap
  node (`lattica_ray.ray.mesh_node`);
- in the NAT lab when this machine allows it (root, network namespaces): "lab" behind a
  port-restricted NAT, "home" behind a symmetric NAT, "campus" behind a full-cone NAT, the relay
  on the public segment; else everything on loopback addresses;
- everything it started is stopped by PID / temp dir (never `ray stop`), even on failure.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib.util
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = REPO_ROOT / "examples" / "rl_rollouts.py"
LEARNER_CLUSTER = "lab"
ROLLOUT_CLUSTERS = ("home", "campus")
MESH_PORT = 4001  # inside the lab each host is alone on its address
# (cluster, loopback address, NAT kind in the lab)
SITES = (
    ("lab", "127.0.0.2", "port_restricted"),
    ("home", "127.0.0.3", "symmetric"),
    ("campus", "127.0.0.4", "full_cone"),
)
RELAY_LOOPBACK_IP = "127.0.0.5"


class DemoStopped(RuntimeError):
    """The demo was asked to stop (Ctrl-C); everything it started has been stopped."""


@dataclass
class DemoResult:
    """What a demo run showed: the mean return per iteration and where things ran."""

    mode: str
    returns: list[float] = field(default_factory=list)
    by_cluster: list[dict[str, float]] = field(default_factory=list)
    expected: list[float] = field(default_factory=list)  # the same training without a mesh
    seconds: float = 0.0
    status: dict[str, Any] | None = None
    worker_stats: list[dict[str, Any]] = field(default_factory=list)
    temp_dirs: list[str] = field(default_factory=list)
    leftovers: list[int] = field(default_factory=list)  # PIDs still running after clean-up

    @property
    def improved(self) -> bool:
        """The policy learned: the last iterations return at least twice the first's."""
        if len(self.returns) < 4:
            return False
        late = sum(self.returns[-3:]) / 3
        return late >= 2 * self.returns[0]


def load_example() -> ModuleType:
    """examples/rl_rollouts.py as a module (it ships with the repository, not the package)."""
    if not EXAMPLE.exists():
        raise FileNotFoundError(
            f"{EXAMPLE} is missing: run the demo from a checkout of lattica-ray"
        )
    name = "lattica_demo_rl_rollouts"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, EXAMPLE)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


def lab_unavailable() -> str | None:
    """Why the NAT lab cannot run here (None: it can). The lab ships with the test suite."""
    if str(REPO_ROOT) not in sys.path and (REPO_ROOT / "tests" / "netlab").is_dir():
        sys.path.insert(0, str(REPO_ROOT))
    try:
        from tests.netlab.netns import unavailable_reason
    except ImportError:
        return "the NAT lab (tests/netlab) is not in this installation"
    return unavailable_reason()


# -- where each participant runs ------------------------------------------------------------------


@dataclass
class Site:
    cluster: str
    ip: str
    netns: str | None = None

    @property
    def listen(self) -> str:
        port = MESH_PORT if self.netns else 0
        return f"/ip4/{self.ip}/udp/{port}/quic-v1"


@contextmanager
def _loopback_sites() -> Iterator[tuple[Site, list[Site]]]:
    yield Site("relay", RELAY_LOOPBACK_IP), [Site(name, ip) for name, ip, _ in SITES]


@contextmanager
def _lab_sites() -> Iterator[tuple[Site, list[Site]]]:
    from tests.netlab import Lab

    lab = Lab()
    try:
        lab.add_public_host("relay")
        for name, _, kind in SITES:
            lab.add_nat(f"nat_{name}", kind)
            lab.add_host(name, behind=f"nat_{name}")
        lab.start()
        relay = Site("relay", lab.address("relay"), lab.netns("relay"))
        yield relay, [Site(name, lab.address(name), lab.netns(name)) for name, _, _ in SITES]
    finally:
        lab.stop()


# -- functions the drivers run (by reference: this module is importable there) ------------------


def _join(cluster: str, listen: str, bootstrap: str) -> dict[str, Any]:
    import lattica_ray.ray as lattica_ray

    return lattica_ray.init(cluster=cluster, listen=listen, bootstrap=[bootstrap])


def _status() -> dict[str, Any]:
    import lattica_ray.ray as lattica_ray

    return lattica_ray.status()


# -- the run --------------------------------------------------------------------------------------


def _parallel(calls: list[Callable[[], Any]]) -> list[Any]:
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(call) for call in calls]]


def run(
    mode: str = "auto",
    *,
    iterations: int = 15,
    episodes: int = 8,
    seed: int = 0,
    console: Console | None = None,
    stop: threading.Event | None = None,
) -> DemoResult:
    """Run the demo (mode "auto", "lab" or "loopback") and clean up; the result says how the
    return moved. Raises if the stage cannot be set (the reason is in the message), and
    `DemoStopped` soon after `stop` is set (between steps), having cleaned up."""
    stop = stop or threading.Event()

    def check_stop() -> None:
        if stop.is_set():
            raise DemoStopped("the demo was stopped; cleaning up")

    from lattica_ray.ray.clusters import (
        LocalRayCluster,
        RayDriver,
        pids_mentioning,
        start_clusters,
        stop_clusters,
    )
    from lattica_ray.ray.mesh_node import running_mesh_node

    console = console or Console()
    rl = load_example()
    if mode == "auto":
        reason = lab_unavailable()
        mode = "lab" if reason is None else "loopback"
        if reason is not None:
            console.print(f"[dim]NAT lab unavailable ({reason}): running on loopback[/]")
    elif mode == "lab" and (reason := lab_unavailable()) is not None:
        raise RuntimeError(f"the NAT lab cannot run here: {reason}")
    result = DemoResult(mode)
    started = time.monotonic()
    where = {
        "lab": "in the NAT lab: lab behind a port-restricted NAT, home behind a symmetric NAT, "
        "campus behind a full-cone NAT, a public relay",
        "loopback": "on loopback addresses",
    }[mode]
    console.rule("lattica-ray demo: collaborative RL rollouts across three Ray clusters")
    console.print(
        f"learner on [bold]lab[/], rollout workers on [bold]home[/] and [bold]campus[/], {where}"
    )

    with ExitStack() as stack:
        relay_site, sites = stack.enter_context(
            _lab_sites() if mode == "lab" else _loopback_sites()
        )
        clusters = [
            LocalRayCluster(
                site.cluster,
                node_ip=site.ip,
                num_cpus=1,
                object_store_memory=128 * 1024 * 1024,
                netns=site.netns,
            )
            for site in sites
        ]
        result.temp_dirs = [str(c.root) for c in clusters]
        stack.callback(stop_clusters, clusters)
        with console.status("starting the relay and three Ray clusters (token auth on)"):
            # Its key lives in the learner cluster's temp dir: that dir names all we started.
            relay_key = str(clusters[0].root / "relay.key")
            relay_addr = stack.enter_context(
                running_mesh_node(relay_site.listen, netns=relay_site.netns, key_file=relay_key)
            )
            start_clusters(clusters)
        console.print(f"relay/bootstrap node: {relay_addr}", soft_wrap=True)
        nat = {name: kind.replace("_", "-") for name, _, kind in SITES}
        for cluster in clusters:
            where_it_is = f", behind a {nat[cluster.name]} NAT, netns {cluster.netns}"
            console.print(
                f"Ray cluster [bold]{cluster.name}[/] at {cluster.address}"
                f"{where_it_is if mode == 'lab' else ''} "
                f"(pid {cluster.pid}, temp dir {cluster.root})",
                soft_wrap=True,
            )

        check_stop()
        drivers = [RayDriver(c) for c in clusters]
        for driver in drivers:
            stack.callback(driver.stop)
        with console.status("connecting a driver to each cluster"):
            _parallel([lambda d=d: d.start(timeout=120) for d in drivers])
        with console.status("starting the LatticaActors and joining the mesh"):
            infos = _parallel(
                [
                    lambda d=d, s=s: d.call(_join, s.cluster, s.listen, relay_addr, timeout=180)
                    for d, s in zip(drivers, sites, strict=True)
                ]
            )
        for info in infos:
            console.print(f"cluster [bold]{info['cluster']}[/] joined as {info['peer_id']}")
        check_stop()
        learner_driver, *worker_drivers = drivers
        with console.status("exporting the rollout workers and starting the learner"):
            _parallel([lambda d=d: d.call(rl.serve_worker, timeout=120) for d in worker_drivers])
            learner_driver.call(
                rl.start_learner, list(ROLLOUT_CLUSTERS), episodes, seed, timeout=120
            )

        columns = (
            TextColumn("[bold]training[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("iterations"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("training", total=iterations)
            for _ in range(iterations):
                check_stop()
                step = learner_driver.call(rl.learner_step, timeout=300)
                result.returns.append(step["mean_return"])
                result.by_cluster.append(step["by_cluster"])
                per_cluster = ", ".join(f"{c} {r:5.1f}" for c, r in step["by_cluster"].items())
                progress.console.print(
                    f"iteration {step['iteration']:2d}: return "
                    f"[bold]{step['mean_return']:5.1f}[/] ({per_cluster}), "
                    f"{step['episodes']} episodes in {step['seconds']:.2f} s"
                )
                progress.advance(task)
        result.status = learner_driver.call(_status, timeout=60)
        result.worker_stats = _parallel(
            [lambda d=d: d.call(rl.rollout_stats, timeout=60) for d in worker_drivers]
        )
    result.seconds = time.monotonic() - started
    result.leftovers = sorted({pid for d in result.temp_dirs for pid in pids_mentioning(d)})
    result.expected = rl.train_locally(iterations, len(ROLLOUT_CLUSTERS), episodes, seed)
    _report(result, console)
    return result


def _report(result: DemoResult, console: Console) -> None:
    from lattica_ray.ray.cli_commands import status_tables

    if result.status is not None:
        for table in status_tables(result.status):
            console.print(table)
    table = Table(title="mean return per iteration (CartPole, 200 = balanced to the end)")
    table.add_column("iteration", justify="right")
    table.add_column("return", justify="right")
    table.add_column("")
    for i, value in enumerate(result.returns):
        table.add_row(str(i), f"{value:.1f}", "█" * round(value / 5))
    console.print(table)
    same = result.returns == result.expected
    console.print(
        f"return {result.returns[0]:.1f} -> {result.returns[-1]:.1f} "
        f"({'improved' if result.improved else 'did not improve'}); identical to the same "
        f"training without the mesh: {same}"
    )
    for stats in result.worker_stats:
        console.print(
            f"workers on {stats['cluster']}: {stats['episodes_played']} episodes, "
            f"{stats['policy_fetches']} policy fetches"
        )
    if result.leftovers:
        console.print(f"[red]processes left running after clean-up: {result.leftovers}[/]")
    else:
        console.rule(f"done in {result.seconds:.0f} s: every cluster, driver and node stopped")


async def run_demo(mode: str = "auto", **options: Any) -> int:
    """`lattica-ray demo`: exit code 0 when the policy improved.

    Cancelling it (Ctrl-C under `asyncio.run`) stops the demo at its next step and waits for
    the clean-up, so no cluster outlives it.
    """
    stop = threading.Event()
    demo = asyncio.ensure_future(asyncio.to_thread(run, mode, stop=stop, **options))
    try:
        result = await asyncio.shield(demo)
    except asyncio.CancelledError:
        stop.set()
        with contextlib.suppress(DemoStopped):
            await demo
        raise
    return 0 if result.improved else 1
