"""The public Ray face: `init`, `shutdown`, `remote`, `export`, `get_actor`, `put`, `get`."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import ray

from lattica_ray.ray.actor import ACTOR_NAME_PREFIX, start_actor
from lattica_ray.ray.config import LatticaConfig
from lattica_ray.ray.direct_call import RAY_ONLY_OPTIONS, serving_class
from lattica_ray.ray.errors import ActorNotFound, ConfigMismatch
from lattica_ray.ray.protocol import ActorRecord, GlobalRef, MethodKind, method_table
from lattica_ray.ray.proxy import RemoteActorHandle, forget_local_actors, local_lattica_actor

logger = logging.getLogger(__name__)

__all__ = ["export", "get", "get_actor", "init", "put", "remote", "shutdown", "status"]


class _DriverState:
    """What `init()` set up in this process."""

    config: LatticaConfig | None = None
    started_ray = False


_state = _DriverState()


def _namespace() -> str:
    return (_state.config or LatticaConfig()).namespace


def init(
    bootstrap: Sequence[str] | str | None = None,
    cluster: str | None = None,
    listen: Sequence[str] | str | None = None,
    *,
    mesh: str | None = None,
    namespace: str | None = None,
    config: LatticaConfig | None = None,
    address: str | None = None,
    **ray_init_kwargs: Any,
) -> dict[str, Any]:
    """Join the mesh: start (or find) the LatticaActor on every node of this Ray cluster.

    Idempotent, so safe to re-run in a notebook: settings you pass must match the running
    LatticaActors (else `ConfigMismatch`: call `shutdown()` first); settings you omit are
    taken as they are. Calls `ray.init(address, **ray_init_kwargs)` if Ray is not up.
    Returns this node's LatticaActor info (peer ID, cluster, addresses, exports).
    """
    if not ray.is_initialized():
        ray.init(address=address, **ray_init_kwargs)
        _state.started_ray = True
    requested: dict[str, Any] = {}
    if bootstrap is not None:
        requested["bootstrap"] = (bootstrap,) if isinstance(bootstrap, str) else tuple(bootstrap)
    if cluster is not None:
        requested["cluster"] = cluster
    if listen is not None:
        requested["listen"] = (listen,) if isinstance(listen, str) else tuple(listen)
    if mesh is not None:
        requested["mesh"] = mesh
    if namespace is not None:
        requested["namespace"] = namespace
    base = config or LatticaConfig()
    wanted = LatticaConfig.model_validate({**base.model_dump(), **requested})
    explicit = set(requested) | (set(base.identity()) if config is not None else set())

    if _state.config is not None and _state.config.namespace != wanted.namespace:
        forget_local_actors()
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    actors = [start_actor(wanted, node_id) for node_id in nodes]
    infos = ray.get([a.info.remote() for a in actors], timeout=wanted.start_timeout + 30)
    for info in infos:
        running = info["identity"]
        differs = {k: (running[k], v) for k, v in wanted.identity().items() if k in explicit}
        differs = {k: pair for k, pair in differs.items() if pair[0] != pair[1]}
        if differs:
            detail = ", ".join(f"{k}={old!r} (asked {new!r})" for k, (old, new) in differs.items())
            raise ConfigMismatch(
                f"the LatticaActor on node {info['node_id'][:8]} runs with {detail}; "
                "call lattica_ray.shutdown() first to restart it with new settings"
            )
    _state.config = wanted
    here = ray.get_runtime_context().get_node_id()
    return next((i for i in infos if i["node_id"] == here), infos[0])


def shutdown(
    *, stop_ray: bool | None = None, timeout: float = 30.0, namespace: str | None = None
) -> None:
    """Stop this Ray cluster's LatticaActors (they leave the mesh). Also shuts Ray down if
    `init()` started it (or if `stop_ray=True`)."""
    if not ray.is_initialized():
        return
    namespace = namespace or _namespace()
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == namespace and a["name"].startswith(ACTOR_NAME_PREFIX)
    ]
    for name in names:
        try:
            actor = ray.get_actor(name, namespace=namespace)
        except ValueError:
            continue
        try:
            ray.get(actor.shutdown.remote(), timeout=timeout)
        except Exception as exc:  # it is being killed anyway; say why it did not stop cleanly
            logger.warning("LatticaActor %s did not shut down cleanly: %s", name, exc)
        ray.kill(actor, no_restart=True)
    forget_local_actors()
    _state.config = None
    if stop_ray or (stop_ray is None and _state.started_ray):
        ray.shutdown()
        _state.started_ray = False


# -- exporting actors -------------------------------------------------------------------------


def _class_methods(cls: type) -> list[tuple[str, bool]]:
    return [
        (name, inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn))
        for name, fn in inspect.getmembers(cls, inspect.isfunction)
    ]


def _handle_methods(handle: Any) -> list[tuple[str, bool]]:
    is_generator: dict[str, bool] = getattr(handle, "_ray_method_is_generator", {}) or {}
    names = set(getattr(handle, "_ray_method_signatures", {}) or {}) | set(is_generator)
    return [(name, bool(is_generator.get(name))) for name in sorted(names)]


def export(
    handle: Any,
    name: str,
    *,
    methods: Sequence[str] | None = None,
    _restore: dict[str, Any] | None = None,
) -> RemoteActorHandle:
    """Serve an existing Ray actor to the mesh under `name` (its public methods, or only
    `methods`). Other clusters then reach it with `get_actor(name, cluster=...)`."""
    table = method_table(_handle_methods(handle), methods)
    actor = local_lattica_actor(_namespace())
    record = ray.get(actor.export.remote(name, handle, table, _restore))
    return _handle_for(ActorRecord.from_wire(record))


class ExportedActorClass:
    """`@lattica_ray.remote` on a class: a Ray actor class whose named instances are exported.

    `Cls.options(name="policy", ...).remote(...)` creates the Ray actor (named, in the current
    namespace) and exports it as "policy"; without a name it is an ordinary local actor.
    """

    def __init__(
        self,
        ray_class: Any,
        cls: type,
        export_methods: Sequence[str] | None,
        options: dict[str, Any] | None = None,
        *,
        decorator_options: dict[str, Any] | None = None,
        serves_direct: bool = False,
    ) -> None:
        self._ray_class = ray_class
        self._cls = cls
        self._export_methods = list(export_methods) if export_methods is not None else None
        self._options = dict(options or {})
        self._decorator_options = dict(decorator_options or {})
        self._serves_direct = serves_direct
        self._table: dict[str, MethodKind] = method_table(_class_methods(cls), export_methods)

    def options(self, **options: Any) -> ExportedActorClass:
        return ExportedActorClass(
            self._ray_class,
            self._cls,
            self._export_methods,
            {**self._options, **options},
            decorator_options=self._decorator_options,
            serves_direct=self._serves_direct,
        )

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        options = dict(self._options)
        handle = (self._ray_class.options(**options) if options else self._ray_class).remote(
            *args, **kwargs
        )
        name = options.get("name")
        if name:
            namespace = options.get("namespace") or ray.get_runtime_context().namespace
            actor = local_lattica_actor(_namespace())
            restore = {
                "ray_name": name,
                "ray_namespace": namespace,
                "direct": self._direct(options),
            }
            ray.get(actor.export.remote(name, handle, self._table, restore))
        return handle

    def _direct(self, options: dict[str, Any]) -> bool:
        """Whether the LatticaActor may run calls in the actor's process (`direct_call`): not
        when Ray is told how to run or retry its tasks, which a direct call cannot copy."""
        chosen = {**self._decorator_options, **options}
        return self._serves_direct and not any(o in chosen for o in RAY_ONLY_OPTIONS)

    def __getattr__(self, item: str) -> Any:
        return getattr(self._ray_class, item)

    def __repr__(self) -> str:
        return f"ExportedActorClass({self._cls.__qualname__})"


def remote(*args: Any, **options: Any) -> Any:
    """`@lattica_ray.remote` / `@lattica_ray.remote(**ray_options, export_methods=[...])`.

    Like `@ray.remote`; on a class, named instances are also exported to the mesh (only
    public methods, or `export_methods`). On a function it is exactly `ray.remote`.
    """
    if len(args) == 1 and not options and callable(args[0]):
        return _decorate(args[0], {})
    if args:
        raise TypeError("use @lattica_ray.remote or @lattica_ray.remote(**options)")

    def decorator(target: Any) -> Any:
        return _decorate(target, options)

    return decorator


def _decorate(target: Callable[..., Any] | type, options: dict[str, Any]) -> Any:
    options = dict(options)
    export_methods = options.pop("export_methods", None)
    if inspect.isclass(target):
        served = serving_class(target)
        ray_class = ray.remote(**options)(served) if options else ray.remote(served)
        return ExportedActorClass(
            ray_class,
            target,
            export_methods,
            decorator_options=options,
            serves_direct=served is not target,
        )
    ray_object = ray.remote(**options)(target) if options else ray.remote(target)
    if export_methods is not None:
        raise TypeError("export_methods applies to actor classes only")
    return ray_object


# -- finding remote actors --------------------------------------------------------------------


def _handle_for(record: ActorRecord) -> RemoteActorHandle:
    config = _state.config or LatticaConfig()
    return RemoteActorHandle(
        record, config.namespace, config.call_timeout, config.bulk_argument_bytes
    )


def get_actor(name: str, cluster: str | None = None, *, wait: float = 0.0) -> RemoteActorHandle:
    """A handle of the actor exported as `name` (by `cluster`, if several export that name).

    `wait`: seconds to keep looking while the cluster view converges (a just-exported actor
    may take a moment to reach this cluster). Raises `ActorNotFound`.
    """
    actor = local_lattica_actor(_namespace())
    deadline = time.monotonic() + wait
    while True:
        try:
            record = ray.get(actor.find_actor.remote(name, cluster))
            return _handle_for(ActorRecord.from_wire(record))
        except ActorNotFound:
            if time.monotonic() >= deadline:
                raise
        time.sleep(0.1)


# -- global objects ---------------------------------------------------------------------------


def put(value: Any) -> GlobalRef:
    """Store `value` on this machine and announce it to the mesh; any cluster can `get` it.

    Values are data (see `UnsupportedValue`): numbers, text, bytes, arrays, tensors, Arrow
    tables, and lists/tuples/dicts of them.
    """
    actor = local_lattica_actor(_namespace())
    return ray.get(actor.put_object.remote(value))


def get(
    ref: GlobalRef | Sequence[GlobalRef],
    *,
    timeout: float | None = None,
    progress: bool | None = None,
) -> Any:
    """The value of a global object (fetched, verified and cached on first use).

    `progress`: show a progress bar while it is fetched; by default for objects larger than
    `LatticaConfig.object_progress_bytes`, in a driver (never inside tasks and actors).
    """
    actor = local_lattica_actor(_namespace())
    refs = [ref] if isinstance(ref, GlobalRef) else list(ref)
    pending = [actor.get_object.remote(r, timeout) for r in refs]
    threshold = (_state.config or LatticaConfig()).object_progress_bytes
    total = sum(r.size for r in refs if isinstance(r, GlobalRef))
    if progress or (progress is None and total > threshold and _in_driver()):
        _show_fetch_progress(actor, refs, pending)
    values = ray.get(pending)
    return values[0] if isinstance(ref, GlobalRef) else values


def _in_driver() -> bool:
    return ray.get_runtime_context().worker.mode == ray.SCRIPT_MODE


def _show_fetch_progress(actor: Any, refs: list[GlobalRef], pending: list[Any]) -> None:
    """A progress bar of the bytes the LatticaActor has received, until every fetch is done
    (objects already held locally count as received at once)."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("fetching {task.description}"),
        BarColumn(bar_width=20),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        tasks = {r.cid: bar.add_task(r.cid[:16] + "…", total=r.size) for r in refs}
        waiting = dict(zip([r.cid for r in refs], pending, strict=True))
        while waiting:
            ready, _ = ray.wait(list(waiting.values()), num_returns=len(waiting), timeout=0.2)
            done = {cid for cid, object_ref in waiting.items() if object_ref in ready}
            for cid in done:
                bar.update(tasks[cid], completed=bar.tasks[tasks[cid]].total)
                del waiting[cid]
            states = ray.get([actor.fetch_progress.remote(cid) for cid in waiting])
            for cid, state in zip(list(waiting), states, strict=True):
                if state is not None:
                    bar.update(tasks[cid], completed=state[0])


# -- the mesh as this cluster sees it ---------------------------------------------------------


def status() -> dict[str, Any]:
    """The mesh as this machine's LatticaActor sees it: `self` (its info), `members` (peer,
    cluster, addresses, status, resources, path kind) and `actors` (exported actors)."""
    actor = local_lattica_actor(_namespace())
    return ray.get(actor.status.remote())
