"""Handles of actors on other clusters: `method.remote(...)` returns an ordinary local ObjectRef.

The call is a task of the local LatticaActor, which makes the RPC; so `ray.get`, `ray.wait`,
`await`, passing the ref to tasks and `ray.cancel` all work as with any Ray actor, and the
handle itself is plain data that pickles into tasks and actors.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, replace
from typing import Any

import ray

from lattica_ray.ray.actor import ACTOR_NAME_PREFIX, BULK, CONTROL, actor_name
from lattica_ray.ray.errors import NotInitialized
from lattica_ray.ray.protocol import ActorRecord, MethodKind, payload_bytes, to_wire_value

logger = logging.getLogger(__name__)

_UNSET: Any = object()
# LatticaActor handles by namespace, per process and Ray connection (tasks and actors reuse
# them; a handle from before a ray.shutdown() / ray.init() would point at a dead session),
# with the method wrappers calls use (made once: building them per call costs).
_local_actors: dict[str, tuple[Any, Any, dict[tuple[str, str], Any]]] = {}


def _connection() -> Any:
    return getattr(ray._private.worker.global_worker, "core_worker", None)


def local_lattica_actor(namespace: str) -> Any:
    """The LatticaActor of this node (or, on a node without one, of another node)."""
    cached = _local_actors.get(namespace)
    if cached is not None and cached[1] is _connection():
        return cached[0]
    if not ray.is_initialized():
        raise NotInitialized("Ray is not initialized: call lattica_ray.init() first")
    node_id = ray.get_runtime_context().get_node_id()
    try:
        actor = ray.get_actor(actor_name(node_id), namespace=namespace)
    except ValueError:
        names = [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == namespace and a["name"].startswith(ACTOR_NAME_PREFIX)
        ]
        if not names:
            raise NotInitialized(
                f"no LatticaActor runs in namespace {namespace!r}: call lattica_ray.init() first"
            ) from None
        actor = ray.get_actor(names[0], namespace=namespace)
    _local_actors[namespace] = (actor, _connection(), {})
    return actor


def forget_local_actors() -> None:
    _local_actors.clear()


def _lattica_method(namespace: str, kind: MethodKind, group: str) -> Any:
    """`call_remote` / `stream_remote` of this node's LatticaActor, in concurrency `group`."""
    actor = local_lattica_actor(namespace)
    methods = _local_actors[namespace][2]
    method = methods.get((kind, group))
    if method is None:
        entry = actor.stream_remote if kind == "stream" else actor.call_remote
        method = methods[(kind, group)] = entry.options(concurrency_group=group)
    return method


def _is_object_ref(value: Any) -> bool:
    return isinstance(value, ray.ObjectRef)


@dataclass(frozen=True)
class RemoteMethod:
    """`handle.method`: `.remote(*args, **kwargs)` and `.options(timeout=..., bulk=...)`."""

    handle: RemoteActorHandle
    name: str
    kind: MethodKind
    timeout: float | None = None
    bulk: bool | None = None

    def options(
        self, *, timeout: float | None = _UNSET, bulk: bool | None = _UNSET
    ) -> RemoteMethod:
        """`timeout`: seconds before the remote call is cancelled and `RemoteCallTimeout` is
        raised. `bulk`: run in the LatticaActor's bulk group (default: when the arguments
        are large)."""
        changes: dict[str, Any] = {}
        if timeout is not _UNSET:
            changes["timeout"] = timeout
        if bulk is not _UNSET:
            changes["bulk"] = bulk
        return replace(self, **changes)

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """An ObjectRef of the result (an ObjectRefGenerator for streaming methods).

        Arguments are checked here (unsupported types raise `UnsupportedValue` at once); Ray
        ObjectRefs among them are resolved on this cluster before anything is sent.
        """
        handle = self.handle
        to_wire_value([list(args), kwargs], path="arguments", keep=_is_object_ref)
        bulk = self.bulk
        if bulk is None:
            bulk = payload_bytes([args, kwargs]) > handle._bulk_argument_bytes
        group = BULK if bulk else CONTROL
        timeout = self.timeout if self.timeout is not None else handle._timeout
        method = _lattica_method(handle._namespace, self.kind, group)
        return method.remote(handle._record_wire, self.name, timeout, kwargs, *args)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"actor methods are called with .remote(): {self.handle._record.name}.{self.name}"
            ".remote(...)"
        )


@dataclass(frozen=True)
class RemoteActorHandle:
    """An actor exported by some cluster of the mesh, as returned by `lattica_ray.get_actor`."""

    _record: ActorRecord
    _namespace: str = "lattica_ray"
    _timeout: float | None = None
    _bulk_argument_bytes: int = 1024 * 1024

    @functools.cached_property
    def _record_wire(self) -> dict[str, Any]:
        return self._record.to_wire()

    @property
    def actor_name(self) -> str:
        return self._record.name

    @property
    def cluster(self) -> str:
        return self._record.cluster

    @property
    def methods(self) -> dict[str, MethodKind]:
        return dict(self._record.methods)

    def __getattr__(self, name: str) -> RemoteMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        return RemoteMethod(self, name, self._record.kind_of(name))

    def __repr__(self) -> str:
        return (
            f"RemoteActorHandle({self._record.name!r} on cluster {self._record.cluster!r}, "
            f"methods {sorted(self._record.methods)})"
        )
