"""`LatticaActor`: one per machine, a detached, named async Ray actor that owns the Node.

It is pinned to its node (hard node affinity), takes no CPU, and Ray restarts it if it dies
(it comes back with the same peer ID, key file in the Ray session dir, and re-exports the named
actors it served). Its methods fall in two concurrency groups, "control" (lookups, small calls)
and "bulk" (large arguments, object transfers), so a transfer never starves control traffic.
The Node runs on a loop of its own (`LoopThread`): Ray gives each group its own event loop.
(Running it on Ray's control-group loop instead saves the thread hand-offs of a control call,
~0.3 ms, but measured slower overall: small calls no faster, 64 MiB transfers 1.5-2x slower.)
Small unary calls from processes of its node reach it over its pipe (`pipeline`) before the
Ray task that collects their result; that task claims the result on Ray's loop, without a
hand-off. It runs at the niceness of a daemon (`set_niceness`), not Ray's 15 for workers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import os
import re
import secrets
import tempfile
import time
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from lattica_ray.ray.config import LatticaConfig
from lattica_ray.ray.direct_call import (
    DEFAULT_MAX_FRAME_BYTES,
    ENDPOINT_METHOD,
    DirectCallClient,
    DirectCallFailed,
    DirectCallLost,
    DirectCallNotSent,
)
from lattica_ray.ray.errors import CallLost, UnsupportedValue
from lattica_ray.ray.loop_thread import LoopThread
from lattica_ray.ray.mesh import create_mesh
from lattica_ray.ray.pipeline import PendingCalls, PipeServer
from lattica_ray.ray.protocol import (
    ActorRecord,
    GlobalRef,
    MethodKind,
    from_wire_value,
    payload_bytes,
)
from lattica_ray.ray.service import LatticaService, MethodFailed

logger = logging.getLogger(__name__)

CONTROL = "control"
BULK = "bulk"
ACTOR_NAME_PREFIX = "lattica:"


def actor_name(node_id: str) -> str:
    """The Ray name of the LatticaActor on node `node_id`."""
    return ACTOR_NAME_PREFIX + node_id


class RayInvoker:
    """Runs a method of a local Ray actor from the Node's loop: `await` its ObjectRef, cancel
    the Ray task if our caller is cancelled, and turn the method's error into `MethodFailed`.

    Actors allowed with `allow_direct` (made by `@lattica_ray.remote`, on this Ray node) get
    their small unary calls run in their own process instead (`direct_call`): one Ray actor
    call fewer per mesh call.
    """

    def __init__(self, node_id: str = "", direct_argument_bytes: int = 1024 * 1024) -> None:
        self.node_id = node_id
        self.direct_argument_bytes = direct_argument_bytes
        self._direct: dict[int, DirectTarget] = {}
        self.direct_calls = 0  # calls run in the actor's process, not through Ray

    def allow_direct(self, target: Any, exported: list[str]) -> None:
        """Call the `exported` methods of `target` directly once its server answers (run on
        the Node's loop)."""
        previous = self._direct.pop(id(target), None)
        if previous is not None:
            previous.close()
        self._direct[id(target)] = DirectTarget(target, self.node_id, exported)

    def direct_exports(self, exports: dict[str, Any]) -> list[str]:
        """Names of the exports (`LatticaService.exports`) whose calls may run directly."""
        return [name for name, export in exports.items() if id(export.target) in self._direct]

    def forget(self, target: Any) -> None:
        direct = self._direct.pop(id(target), None)
        if direct is not None:
            direct.close()

    async def call(self, target: Any, method: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        direct = self._direct.get(id(target))
        if direct is not None:
            client = direct.client()
            if (
                client is not None
                and method in client.methods
                and payload_bytes([args, kwargs]) <= self.direct_argument_bytes
            ):
                try:
                    self.direct_calls += 1
                    return await client.call(method, args, kwargs)
                except DirectCallNotSent:
                    self.direct_calls -= 1
                    pass  # it never reached the actor: Ray takes it
                except DirectCallFailed as exc:
                    if exc.remote_type == "UnsupportedValue":
                        raise UnsupportedValue(exc.message) from None
                    raise MethodFailed(
                        exc.message,
                        remote_type=exc.remote_type,
                        remote_traceback=exc.remote_traceback,
                    ) from None
                except DirectCallLost as exc:
                    raise MethodFailed(
                        f"the actor died during the call: {exc}",
                        remote_type="ActorDiedError",
                        remote_traceback="",
                    ) from None
        ref = getattr(target, method).remote(*args, **kwargs)
        try:
            return await ref
        except asyncio.CancelledError:
            ray.cancel(ref)
            raise
        except Exception as exc:
            raise _method_failed(exc) from None

    async def stream(
        self, target: Any, method: str, args: list[Any], kwargs: dict[str, Any]
    ) -> AsyncIterator[Any]:
        generator = getattr(target, method).remote(*args, **kwargs)
        try:
            async for ref in generator:
                yield await ref
        except asyncio.CancelledError:
            ray.cancel(generator)
            raise
        except Exception as exc:
            raise _method_failed(exc) from None


# After a failed attempt to reach an actor's direct call server, calls go through Ray for this
# long before the next attempt.
DIRECT_RETRY_SECONDS = 5.0


class DirectTarget:
    """An exported actor's direct call connection, made in the background: until it is up (or
    if the actor lives on another node, or cannot serve direct calls) calls go through Ray."""

    def __init__(self, handle: Any, node_id: str, exported: list[str]) -> None:
        self.handle = handle
        self.node_id = node_id
        self.exported = list(exported)
        self._client: DirectCallClient | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._retry_at = 0.0
        self.client()

    def client(self) -> DirectCallClient | None:
        """The live connection, or None (then a new one is attempted, unless one is under way
        or an attempt failed in the last `DIRECT_RETRY_SECONDS`)."""
        if self._client is not None and not self._client.closed:
            return self._client
        self._client = None
        if self._connecting is None and time.monotonic() >= self._retry_at:
            self._connecting = asyncio.get_running_loop().create_task(self._connect())
        return None

    async def _connect(self) -> None:
        try:
            endpoint = await getattr(self.handle, ENDPOINT_METHOD).remote(self.exported)
            if endpoint["node_id"] != self.node_id:
                self._retry_at = float("inf")  # another machine: its socket is not ours to reach
                return
            client = DirectCallClient(endpoint["address"], endpoint["methods"])
            await client.connect()
            self._client = client
        except Exception as exc:
            logger.info("direct calls unavailable (calls go through Ray): %s", exc)
            self._retry_at = time.monotonic() + DIRECT_RETRY_SECONDS
        finally:
            self._connecting = None

    def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._client is not None:
            self._client.close()


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def _method_failed(exc: Exception) -> MethodFailed:
    """The error of a Ray actor method as text: the cause's type and message, and Ray's
    formatted remote traceback (str of a RayTaskError; its colour codes removed)."""
    if isinstance(exc, RayTaskError):
        cause = getattr(exc, "cause", None)
        remote_type = type(cause).__name__ if cause is not None else type(exc).__name__
        message = str(cause) if cause is not None else ""
        text = _ANSI_ESCAPE.sub("", str(exc))
        return MethodFailed(message, remote_type=remote_type, remote_traceback=text)
    return MethodFailed(str(exc), remote_type=type(exc).__name__, remote_traceback="")


def _state_dir() -> Path:
    """Where the LatticaActor keeps its key and exports: the Ray session dir (so a restart
    finds them and the cluster's teardown removes them)."""
    try:
        session = Path(ray._private.worker._global_node.get_session_dir_path())
    except Exception:
        session = Path(tempfile.gettempdir()) / ray.get_runtime_context().get_session_name()
    path = session / "lattica_ray"
    path.mkdir(parents=True, exist_ok=True)
    return path


async def _resolve_refs(value: Any) -> Any:
    """`value` with every Ray ObjectRef inside lists, tuples and dicts replaced by its value:
    Ray ObjectRefs never leave the cluster."""
    if isinstance(value, ray.ObjectRef):
        return await value
    if isinstance(value, list):
        return [await _resolve_refs(v) for v in value]
    if isinstance(value, tuple) and type(value) is tuple:
        return tuple([await _resolve_refs(v) for v in value])
    if isinstance(value, dict):
        return {k: await _resolve_refs(v) for k, v in value.items()}
    return value


class LatticaActor:
    """The per-machine actor (created by `lattica_ray.init`, see `actor_options`)."""

    def __init__(self, config_json: str) -> None:
        self.config = LatticaConfig.model_validate_json(config_json)
        set_niceness(self.config.niceness)
        context = ray.get_runtime_context()
        self.node_id = context.get_node_id()
        with warnings.catch_warnings():  # Ray's own property trips its deprecation warning
            warnings.simplefilter("ignore", DeprecationWarning)
            self.restarted = context.was_current_actor_reconstructed
        self.started_at = time.time()
        self.state_dir = _state_dir()
        self._exports_file = self.state_dir / f"exports-{self.node_id}.json"
        self.loop = LoopThread(f"lattica-node-{self.node_id[:8]}")
        key_file = str(self.state_dir / f"node-{self.node_id}.key")
        mesh = create_mesh(self.config, key_file, node_resources(self.node_id))
        self.invoker = RayInvoker(self.node_id, self.config.bulk_argument_bytes)
        self.service = LatticaService(mesh, self.config, self.invoker)
        self.incarnation = secrets.token_hex(8)  # a restarted LatticaActor has another
        self.pending = PendingCalls(
            self.config.pipeline_max_unclaimed,
            self.config.pipeline_claim_timeout,
            self.config.pipeline_arrival_timeout,
        )
        self.pipe: PipeServer | None = None
        try:
            self.loop.run_sync(self.service.start(), self.config.start_timeout)
        except BaseException:
            self.loop.stop()
            raise
        if self.config.pipeline:
            pipe = PipeServer(self.pending, self._pipelined_call, DEFAULT_MAX_FRAME_BYTES)
            try:
                self.loop.run_sync(pipe.start(), self.config.start_timeout)
                self.pipe = pipe
            except Exception as exc:  # calls still work, each waiting for its Ray task
                logger.warning("no pipelined calls on this node: %s", exc)
        self._restore_exports()
        logger.info(
            "LatticaActor up on node %s as peer %s (cluster %r, restarted=%s)",
            self.node_id[:8],
            self.service.peer_id,
            self.config.cluster,
            self.restarted,
        )

    # -- lifecycle and state ------------------------------------------------------------------
    @ray.method(concurrency_group=CONTROL)
    async def info(self) -> dict[str, Any]:
        info = await self.loop.run(_call(self.service.info))
        info.update(
            node_id=self.node_id,
            pid=os.getpid(),
            restarted=self.restarted,
            started_at=self.started_at,
            namespace=self.config.namespace,
            direct_calls=self.invoker.direct_calls,
            niceness=os.getpriority(os.PRIO_PROCESS, 0),
            direct_exports=sorted(self.invoker.direct_exports(self.service.exports)),
            pipelined=dataclasses.asdict(self.pending.stats),
        )
        return info

    @ray.method(concurrency_group=CONTROL)
    async def members(self) -> list[dict[str, Any]]:
        return await self.loop.run(_call(self.service.mesh.members))

    @ray.method(concurrency_group=CONTROL)
    async def status(self) -> dict[str, Any]:
        """What `lattica-ray status` shows: this node, the members, the exported actors."""
        status = await self.loop.run(_call(self.service.status))
        status["self"].update(node_id=self.node_id, namespace=self.config.namespace)
        return status

    @ray.method(concurrency_group=CONTROL)
    async def fetch_progress(self, cid: str) -> tuple[int, int] | None:
        """(bytes received, total) of a fetch under way, None when none is."""
        return self.service.fetching.get(cid)

    @ray.method(concurrency_group=CONTROL)
    async def shutdown(self) -> None:
        """Leave the mesh (withdraw exports) and stop the Node; the caller then kills us."""
        if self.loop.running:
            if self.pipe is not None:
                await self.loop.run(self.pipe.stop())
            await self.loop.run(self.service.stop())
            self.loop.stop()

    # -- exports ------------------------------------------------------------------------------
    @ray.method(concurrency_group=CONTROL)
    async def export(
        self,
        name: str,
        handle: Any,
        methods: dict[str, MethodKind],
        restore: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        replaced = self.service.exports.get(name)
        if replaced is not None and replaced.target is not handle:
            await self.loop.run(_call(self.invoker.forget, replaced.target))
        record = await self.loop.run(self.service.export(name, handle, methods, restore))
        await self.loop.run(_call(self._direct_calls, handle, restore, methods))
        self._save_exports()
        return record.to_wire()

    @ray.method(concurrency_group=CONTROL)
    async def unexport(self, name: str) -> None:
        export = self.service.exports.get(name)
        if export is not None:
            await self.loop.run(_call(self.invoker.forget, export.target))
        await self.loop.run(self.service.unexport(name))
        self._save_exports()

    @ray.method(concurrency_group=CONTROL)
    async def find_actor(self, name: str, cluster: str | None = None) -> dict[str, Any]:
        record = await self.loop.run(_call(self.service.find_actor, name, cluster))
        return record.to_wire()

    def _direct_calls(
        self, handle: Any, restore: dict[str, Any] | None, methods: dict[str, MethodKind]
    ) -> None:
        """Let the invoker call `handle` directly if `@lattica_ray.remote` made it able to
        (runs on the Node's loop)."""
        if self.config.direct_calls and (restore or {}).get("direct"):
            self.invoker.allow_direct(handle, sorted(methods))

    def _save_exports(self) -> None:
        """Remember the named actors we export, so a restarted LatticaActor serves them again."""
        restorable = [
            {"name": e.name, "methods": e.methods, **e.restore}
            for e in self.service.exports.values()
            if e.restore.get("ray_name")
        ]
        tmp = self._exports_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(restorable))
        tmp.replace(self._exports_file)

    def _restore_exports(self) -> None:
        if not self._exports_file.exists():
            return
        try:
            entries = json.loads(self._exports_file.read_text())
        except (OSError, ValueError) as exc:
            logger.warning("cannot read saved exports %s: %s", self._exports_file, exc)
            return
        for entry in entries:
            try:
                handle = ray.get_actor(entry["ray_name"], namespace=entry.get("ray_namespace"))
            except ValueError:
                logger.info("exported actor %r is gone; not re-exporting it", entry["name"])
                continue
            restore = {
                "ray_name": entry["ray_name"],
                "ray_namespace": entry.get("ray_namespace"),
                "direct": bool(entry.get("direct")),
            }
            self.loop.run_sync(
                self.service.export(entry["name"], handle, entry["methods"], restore),
                self.config.start_timeout,
            )
            self.loop.run_sync(_call(self._direct_calls, handle, restore, entry["methods"]), 10)
        self._save_exports()

    # -- calls to other clusters' actors ------------------------------------------------------
    @ray.method(concurrency_group=CONTROL)
    async def call_remote(
        self,
        record: dict[str, Any],
        method: str,
        timeout: float | None,
        kwargs: dict[str, Any],
        *args: Any,
    ) -> Any:
        """Call an exported actor's method; the proxy picks the concurrency group per call.

        Top-level ObjectRef arguments arrive resolved by Ray; nested ones are resolved here.
        """
        call_args = await _resolve_refs(list(args))
        call_kwargs = await _resolve_refs(kwargs)
        target = ActorRecord.from_wire(record)
        return await self.loop.run(
            self.service.call(target, method, call_args, call_kwargs, timeout)
        )

    @ray.method(concurrency_group=CONTROL)
    async def pipe_endpoint(self) -> dict[str, str] | None:
        """Where processes of this node send pipelined calls (`pipeline`); None when off."""
        if self.pipe is None:
            return None
        return {
            "address": self.pipe.address,
            "incarnation": self.incarnation,
            "node_id": self.node_id,
        }

    @ray.method(concurrency_group=CONTROL)
    async def await_result(self, call_id: str, incarnation: str) -> Any:
        """The result of the call the caller sent over the pipe as `call_id` (to the
        LatticaActor `incarnation`). Cancelling this task cancels the call."""
        if incarnation != self.incarnation:
            raise CallLost(
                "this machine's LatticaActor restarted after the call was sent to the one "
                "before: the call may or may not have run"
            )
        return await self.pending.claim(call_id)  # here: no hand-off to the Node's loop

    async def _pipelined_call(self, request: dict[str, Any]) -> Any:
        """One request read from the pipe, run on the Node's loop (the arguments are data)."""
        target = ActorRecord.from_wire(request.get("actor"))
        method, timeout = request.get("method"), request.get("timeout")
        args, kwargs = request.get("args"), request.get("kwargs")
        if (
            not isinstance(method, str)
            or not (timeout is None or isinstance(timeout, int | float))
            or not isinstance(args, list | tuple)
            or not isinstance(kwargs, dict)
        ):
            raise ValueError("malformed pipelined call request")
        return await self.service.call(
            target, method, from_wire_value(list(args)), from_wire_value(kwargs), timeout
        )

    @ray.method(concurrency_group=CONTROL)
    async def stream_remote(
        self,
        record: dict[str, Any],
        method: str,
        timeout: float | None,
        kwargs: dict[str, Any],
        *args: Any,
    ) -> AsyncIterator[Any]:
        """Stream an exported generator method's items (an ObjectRefGenerator to the caller)."""
        call_args = await _resolve_refs(list(args))
        call_kwargs = await _resolve_refs(kwargs)
        target = ActorRecord.from_wire(record)
        items = self.service.stream(target, method, call_args, call_kwargs, timeout)
        async for item in self.loop.iterate(items):
            yield item

    # -- global objects -----------------------------------------------------------------------
    @ray.method(concurrency_group=BULK)
    async def put_object(self, value: Any) -> GlobalRef:
        value = await _resolve_refs(value)
        return await self.loop.run(self.service.put(value))

    @ray.method(concurrency_group=BULK)
    async def get_object(self, ref: GlobalRef, timeout: float | None = None) -> Any:
        return await self.loop.run(self.service.get(ref, timeout))

    @ray.method(concurrency_group=CONTROL)
    async def ping(self) -> str:
        return self.service.peer_id


def set_niceness(niceness: int | None) -> None:
    """Run every thread of this process at `niceness` (None: leave it).

    Ray starts its workers at niceness 15 (`RAY_worker_niceness`), below its own daemons (0).
    On a busy machine a worker at 15 gets a small share of a core shared with any process at 0,
    and every remote call waits on the LatticaActor several times: it is a daemon, so it runs
    as one. Lowering a niceness needs CAP_SYS_NICE (root) or RLIMIT_NICE; without them the
    LatticaActor keeps Ray's. Linux keeps niceness per thread (new threads inherit their
    creator's), hence each thread.
    """
    if niceness is None:
        return
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]  # no /proc: this thread
    for thread in threads:
        try:
            os.setpriority(os.PRIO_PROCESS, thread, niceness)
        except ProcessLookupError:
            continue  # it ended meanwhile
        except OSError as exc:
            logger.info("the LatticaActor keeps Ray's niceness (%s)", exc)
            return


async def _call(fn: Any, *args: Any) -> Any:
    """Run a plain function on the Node's loop (it touches loop-owned state)."""
    return fn(*args)


# Ray resources that say nothing a user of another cluster needs (where it is, what it is).
_HIDDEN_RESOURCE_PREFIXES = ("node:", "accelerator_type:")
_STANDARD_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}


def node_resources(node_id: str) -> dict[str, Any]:
    """What Ray node `node_id` offers, in the view's terms (cpus, gpus, memory, custom)."""
    for node in ray.nodes():
        if node.get("NodeID") == node_id:
            total = node.get("Resources", {})
            custom = {
                name: float(amount)
                for name, amount in total.items()
                if name not in _STANDARD_RESOURCES
                and not name.startswith(_HIDDEN_RESOURCE_PREFIXES)
            }
            return {
                "cpus": float(total.get("CPU", 0.0)),
                "gpus": float(total.get("GPU", 0.0)),
                "memory_bytes": int(total.get("memory", 0)),
                "custom": custom,
            }
    return {}


def actor_options(config: LatticaConfig, node_id: str) -> dict[str, Any]:
    """Ray options of the LatticaActor on `node_id`."""
    return {
        "name": actor_name(node_id),
        "namespace": config.namespace,
        "lifetime": "detached",
        "get_if_exists": True,
        "num_cpus": 0,
        "max_restarts": -1,
        "max_task_retries": 0,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
    }


@functools.cache
def _remote_class(control: int, bulk: int) -> Any:
    # Concurrency groups can only be given to ray.remote, not to .options().
    return ray.remote(concurrency_groups={CONTROL: control, BULK: bulk})(LatticaActor)


def start_actor(config: LatticaConfig, node_id: str) -> Any:
    """The LatticaActor on `node_id`: the running one, or a new one with `config`."""
    remote_class = _remote_class(config.control_concurrency, config.bulk_concurrency)
    return remote_class.options(**actor_options(config, node_id)).remote(config.model_dump_json())
