"""Handles of actors on other clusters: `method.remote(...)` returns an ordinary local ObjectRef.

The call is a task of the local LatticaActor, which makes the RPC; so `ray.get`, `ray.wait`,
`await`, passing the ref to tasks and `ray.cancel` all work as with any Ray actor, and the
handle itself is plain data that pickles into tasks and actors. Small unary calls are also
pipelined (`pipeline`): the request goes to the LatticaActor over its local socket first, and
the task only collects the result, so the remote call does not wait for Ray to deliver it.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import ray

from lattica_ray.ray.actor import ACTOR_NAME_PREFIX, BULK, CONTROL, actor_name
from lattica_ray.ray.errors import NotInitialized
from lattica_ray.ray.pipeline import PipeClient, PipeEndpoint
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
    with _pipes_lock:
        for state in _pipes.values():
            if state.client is not None:
                state.client.close()
        _pipes.clear()


# After the pipe could not be reached, calls wait for their Ray task this long before the
# next attempt (a restarting LatticaActor, a caller in another network namespace).
PIPE_RETRY_SECONDS = 5.0


@dataclass
class _PipeState:
    """This process's pipe to its node's LatticaActor, per namespace and Ray connection."""

    connection: Any
    pid: int
    client: PipeClient | None = None
    endpoint_ref: Any = None  # the LatticaActor's pipe_endpoint(), while it is on its way
    retry_at: float = 0.0


_pipes: dict[str, _PipeState] = {}
_pipes_lock = threading.Lock()


def pipe_client(namespace: str) -> PipeClient | None:
    """The pipe to this node's LatticaActor, or None while there is none (the endpoint is asked
    for without blocking: calls made meanwhile simply wait for their Ray task)."""
    with _pipes_lock:
        state = _pipes.get(namespace)
        if state is None or state.connection is not _connection() or state.pid != os.getpid():
            state = _pipes[namespace] = _PipeState(_connection(), os.getpid())
        if state.client is not None and not state.client.closed:
            return state.client
        state.client = None
        if state.endpoint_ref is None:
            if time.monotonic() >= state.retry_at:
                actor = local_lattica_actor(namespace)
                state.endpoint_ref = actor.pipe_endpoint.remote()
            return None
        ready, _ = ray.wait([state.endpoint_ref], timeout=0)
        if not ready:
            return None
        ref, state.endpoint_ref = state.endpoint_ref, None
        try:
            endpoint = ray.get(ref)
            if endpoint is None:
                state.retry_at = float("inf")  # pipelining is off on this node
                return None
            if endpoint["node_id"] != ray.get_runtime_context().get_node_id():
                state.retry_at = float("inf")  # another node's LatticaActor: not our socket
                return None
            state.client = PipeClient(PipeEndpoint(**endpoint))
        except Exception as exc:
            logger.info("pipelined calls unavailable (calls go through Ray): %s", exc)
            state.retry_at = time.monotonic() + PIPE_RETRY_SECONDS
        return state.client


def _lattica_method(namespace: str, kind: str, group: str) -> Any:
    """`call_remote` / `stream_remote` / `await_result` (kind "unary" / "stream" / "result") of
    this node's LatticaActor, in concurrency `group`."""
    actor = local_lattica_actor(namespace)
    methods = _local_actors[namespace][2]
    method = methods.get((kind, group))
    if method is None:
        entries = {"stream": "stream_remote", "result": "await_result"}
        entry = getattr(actor, entries.get(kind, "call_remote"))
        method = methods[(kind, group)] = entry.options(concurrency_group=group)
    return method


class _ObjectRefs:
    """`keep` for `to_wire_value`: lets Ray ObjectRefs through, and notes that it saw one."""

    def __init__(self) -> None:
        self.seen = False

    def __call__(self, value: Any) -> bool:
        if isinstance(value, ray.ObjectRef):
            self.seen = True
            return True
        return False


@dataclass(frozen=True)
class RemoteMethod:
    """`handle.method`: `.remote(*args, **kwargs)` and `.options(timeout=..., bulk=...)`."""

    handle: RemoteActorHandle
    name: str
    kind: MethodKind
    timeout: float | None = None
    bulk: bool | None = None
    pipeline: bool = True

    def options(
        self,
        *,
        timeout: float | None = _UNSET,
        bulk: bool | None = _UNSET,
        pipeline: bool = _UNSET,
    ) -> RemoteMethod:
        """`timeout`: seconds before the remote call is cancelled and `RemoteCallTimeout` is
        raised. `bulk`: run in the LatticaActor's bulk group (default: when the arguments
        are large). `pipeline=False`: the call starts only when its Ray task reaches the
        LatticaActor (see `pipeline`)."""
        changes: dict[str, Any] = {}
        if timeout is not _UNSET:
            changes["timeout"] = timeout
        if bulk is not _UNSET:
            changes["bulk"] = bulk
        if pipeline is not _UNSET:
            changes["pipeline"] = pipeline
        return replace(self, **changes)

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """An ObjectRef of the result (an ObjectRefGenerator for streaming methods).

        Arguments are checked here (unsupported types raise `UnsupportedValue` at once); Ray
        ObjectRefs among them are resolved on this cluster before anything is sent.
        """
        handle = self.handle
        refs = _ObjectRefs()
        wire_args, wire_kwargs = to_wire_value([list(args), kwargs], path="arguments", keep=refs)
        bulk = self.bulk
        if bulk is None:
            bulk = payload_bytes([args, kwargs]) > handle._bulk_argument_bytes
        timeout = self.timeout if self.timeout is not None else handle._timeout
        if self.pipeline and self.kind == "unary" and not bulk and not refs.seen:
            # ObjectRefs among the arguments keep Ray's resolution: those calls are not piped
            client = pipe_client(handle._namespace)
            if client is not None:
                request = {
                    "actor": handle._pipe_record(self.name),
                    "method": self.name,
                    "timeout": timeout,
                    "args": wire_args,
                    "kwargs": wire_kwargs,
                }
                call_id = client.send(request)
                if call_id is not None:
                    collect = _lattica_method(handle._namespace, "result", CONTROL)
                    return collect.remote(call_id, client.endpoint.incarnation)
        group = BULK if bulk else CONTROL
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

    def _pipe_record(self, method: str) -> dict[str, Any]:
        """The record a pipelined call sends: only the method called."""
        record = self._record
        return {
            "name": record.name,
            "cluster": record.cluster,
            "owner": record.owner,
            "methods": {method: record.methods[method]},
        }

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
