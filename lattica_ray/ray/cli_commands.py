"""`lattica-ray up`, `down` and `status`: the LatticaActors of the local Ray cluster, from a shell.

Each command connects to a running Ray cluster as a short-lived driver (`--address`, else
`RAY_ADDRESS`, else the cluster `ray start` last started on this machine), does its job, prints
with rich and returns an exit code; the LatticaActors it starts are detached and outlive it.
Token auth: the driver uses the same `RAY_AUTH_TOKEN` / `RAY_AUTH_TOKEN_PATH` as `ray` itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from lattica_ray.ray.config import LatticaConfig
from lattica_ray.ray.errors import ConfigMismatch, NotInitialized

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
DEFAULT_NAMESPACE = LatticaConfig.model_fields["namespace"].default
PATH_LABELS = {"self": "(self)", "": "not connected"}


class RayUnavailable(RuntimeError):
    """No Ray cluster could be joined; the message says where we looked."""


def _local_ip(host: str) -> bool:
    """Whether `host` is an address of this machine (then drivers must use it as their IP)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((host, 0))
        return True
    except OSError:
        return False


@contextlib.contextmanager
def ray_driver(address: str | None) -> Iterator[None]:
    """Connect to the Ray cluster at `address` for the duration of a command."""
    import ray

    target = address or os.environ.get("RAY_ADDRESS") or "auto"
    kwargs: dict[str, Any] = {"address": target, "logging_level": logging.WARNING}
    host, _, port = target.rpartition(":")
    if host and port.isdigit() and "://" not in target:
        # Ray retries an absent cluster for a minute; say at once that nothing listens.
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as exc:
            raise RayUnavailable(f"no Ray cluster at {target!r}: {exc}") from exc
        if _local_ip(host):
            kwargs["_node_ip_address"] = host
    try:
        ray.init(log_to_driver=False, **kwargs)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise RayUnavailable(f"no Ray cluster at {target!r}: {exc}") from exc
    try:
        yield
    finally:
        ray.shutdown()


def _fail(console: Console, message: str, hint: str) -> int:
    console.print(f"[red]error:[/] {message}\n  what to do: {hint}")
    return EXIT_FAILED


def _lattica_infos(namespace: str) -> list[dict[str, Any]]:
    """The info of every LatticaActor of this Ray cluster in `namespace`."""
    import ray

    from lattica_ray.ray.actor import ACTOR_NAME_PREFIX

    handles = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == namespace and entry["name"].startswith(ACTOR_NAME_PREFIX):
            with contextlib.suppress(ValueError):
                handles.append(ray.get_actor(entry["name"], namespace=namespace))
    return ray.get([h.info.remote() for h in handles], timeout=60)


def up(
    *,
    address: str | None = None,
    bootstrap: Sequence[str] = (),
    cluster: str | None = None,
    listen: Sequence[str] = (),
    namespace: str = DEFAULT_NAMESPACE,
    console: Console | None = None,
) -> int:
    """Start (or find) a LatticaActor on every node of the local Ray cluster; join the mesh."""
    import lattica_ray.ray as lr

    console = console or Console()
    try:
        with ray_driver(address):
            with console.status("starting the LatticaActors and joining the mesh"):
                lr.init(
                    bootstrap=list(bootstrap) or None,
                    cluster=cluster,
                    listen=list(listen) or None,
                    namespace=namespace,
                )
                infos = _lattica_infos(namespace)
    except RayUnavailable as exc:
        return _fail(console, str(exc), "start Ray (`ray start --head`) or pass --address")
    except ConfigMismatch as exc:
        return _fail(console, str(exc), "run `lattica-ray down` first, then `up` again")
    table = Table(title=f"LatticaActors of cluster {infos[0]['cluster']!r}" if infos else None)
    for column in ("Ray node", "peer ID", "addresses", "exports"):
        table.add_column(column, overflow="fold")
    for info in sorted(infos, key=lambda i: i["node_id"]):
        table.add_row(
            info["node_id"][:12],
            info["peer_id"],
            "\n".join(info["addrs"]),
            ", ".join(info["exports"]) or "-",
        )
    console.print(table)
    if infos and infos[0]["addrs"]:
        console.print(
            "join another cluster to this mesh with:\n"
            f"  lattica-ray up --bootstrap {infos[0]['addrs'][0]}",
            soft_wrap=True,
        )
    return EXIT_OK


def down(
    *,
    address: str | None = None,
    namespace: str = DEFAULT_NAMESPACE,
    console: Console | None = None,
) -> int:
    """Stop the LatticaActors of the local Ray cluster (they leave the mesh); Ray stays up."""
    import lattica_ray.ray as lr

    console = console or Console()
    try:
        with ray_driver(address):
            running = len(_lattica_infos(namespace))
            if running:
                lr.shutdown(stop_ray=False, namespace=namespace)
    except RayUnavailable as exc:
        return _fail(console, str(exc), "pass --address of the Ray cluster to stop it on")
    if running:
        console.print(f"stopped {running} LatticaActor(s); this cluster left the mesh")
    else:
        console.print(f"no LatticaActor runs in namespace {namespace!r}: nothing to stop")
    return EXIT_OK


def status(
    *,
    address: str | None = None,
    namespace: str = DEFAULT_NAMESPACE,
    as_json: bool = False,
    console: Console | None = None,
) -> int:
    """Print the mesh as the local LatticaActor sees it: clusters, machines, actors, paths."""
    import ray

    from lattica_ray.ray.proxy import local_lattica_actor

    console = console or Console()
    try:
        with ray_driver(address):
            try:
                actor = local_lattica_actor(namespace)
            except NotInitialized:
                return _fail(
                    console,
                    f"no LatticaActor runs on this Ray cluster (namespace {namespace!r})",
                    "run `lattica-ray up` first",
                )
            snapshot = ray.get(actor.status.remote(), timeout=60)
    except RayUnavailable as exc:
        return _fail(console, str(exc), "pass --address of a Ray cluster that ran `up`")
    if as_json:
        import json

        console.print_json(json.dumps(snapshot))
    else:
        render_status(snapshot, console)
    return EXIT_OK


# -- rendering ----------------------------------------------------------------------------


def _memory(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n else "-"


def _number(x: float) -> str:
    return f"{x:g}" if x else "-"


def status_tables(snapshot: dict[str, Any]) -> list[Table]:
    """The clusters, machines and actors of a `status()` snapshot, as rich tables."""
    members = sorted(snapshot["members"], key=lambda m: (m["cluster"], m["peer_id"]))
    actors = sorted(snapshot["actors"], key=lambda a: (a["cluster"], a["name"]))
    me = snapshot["self"]

    clusters = Table(title=f"clusters (seen from {me['cluster']!r})")
    for column in ("cluster", "machines", "alive", "CPUs", "GPUs", "memory", "actors"):
        clusters.add_column(column, justify="left" if column == "cluster" else "right")
    by_cluster: dict[str, list[dict[str, Any]]] = {}
    for member in members:
        by_cluster.setdefault(member["cluster"], []).append(member)
    for name, group in by_cluster.items():
        clusters.add_row(
            name,
            str(len(group)),
            str(sum(1 for m in group if m["status"] == "alive")),
            _number(sum(m["resources"].get("cpus", 0.0) for m in group)),
            _number(sum(m["resources"].get("gpus", 0.0) for m in group)),
            _memory(sum(m["resources"].get("memory_bytes", 0) for m in group)),
            str(sum(1 for a in actors if a["cluster"] == name)),
        )

    machines = Table(title="machines (path: how this machine reaches each)")
    for column in ("cluster", "peer", "status", "CPUs", "GPUs", "memory"):
        machines.add_column(column)
    machines.add_column("path", no_wrap=True)
    machines.add_column("addresses", overflow="fold")
    for member in members:
        resources = member["resources"]
        custom = ", ".join(f"{k}={v:g}" for k, v in resources.get("custom", {}).items())
        machines.add_row(
            member["cluster"],
            member["peer_id"][-8:],
            member["status"],
            _number(resources.get("cpus", 0.0)),
            _number(resources.get("gpus", 0.0)),
            _memory(resources.get("memory_bytes", 0)) + (f" ({custom})" if custom else ""),
            PATH_LABELS.get(member["path"], member["path"]),
            "\n".join(member["addrs"][:3]) + (" …" if len(member["addrs"]) > 3 else ""),
        )

    exported = Table(title="exported actors")
    for column in ("actor", "cluster", "methods", "owner"):
        exported.add_column(column)
    for actor in actors:
        methods = ", ".join(
            f"{m} (stream)" if kind == "stream" else m
            for m, kind in sorted(actor["methods"].items())
        )
        exported.add_row(actor["name"], actor["cluster"], methods, actor["owner"][-12:])
    return [clusters, machines, exported]


def render_status(snapshot: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    for table in status_tables(snapshot):
        console.print(table)


__all__ = ["down", "render_status", "status", "status_tables", "up"]
