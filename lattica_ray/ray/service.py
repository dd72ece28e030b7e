"""What a LatticaActor does, as asyncio code on the Node's loop, without Ray.

`LatticaService` serves this machine's exported actors to the mesh, calls other clusters'
actors, and stores and fetches global objects. Running a method on a local actor is left to an
`Invoker` (`actor.RayInvoker` with Ray; plain objects in tests), so everything here is tested
without starting Ray.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from lattica_ray.ray.config import LatticaConfig
from lattica_ray.ray.errors import (
    ActorNotFound,
    MethodNotExported,
    PeerUnreachable,
    RayFaceError,
    RemoteActorError,
    RemoteCallTimeout,
)
from lattica_ray.ray.mesh import Mesh
from lattica_ray.ray.objects import FetchStats, ObjectStore, fetch_object
from lattica_ray.ray.protocol import (
    ACTOR_CALL,
    ACTOR_STREAM,
    OBJECT_READ,
    ActorRecord,
    GlobalRef,
    MethodKind,
    content_id,
    envelope_for,
    error_envelope,
    from_wire_value,
    ok_envelope,
    open_envelope,
    parse_content_id,
    to_wire_value,
)

logger = logging.getLogger(__name__)


class MethodFailed(RayFaceError):
    """An exported actor's method raised (fields `remote_type`, `remote_traceback`)."""


class Invoker(Protocol):
    """Runs a method of a local actor. User errors are raised as `MethodFailed`."""

    async def call(
        self, target: Any, method: str, args: list[Any], kwargs: dict[str, Any]
    ) -> Any: ...

    def stream(
        self, target: Any, method: str, args: list[Any], kwargs: dict[str, Any]
    ) -> AsyncIterator[Any]: ...


class ObjectInvoker:
    """Runs methods of plain Python objects (sync, async, generators): the Ray-free invoker,
    for a Node that serves objects without Ray, and for tests."""

    async def call(self, target: Any, method: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        try:
            result = getattr(target, method)(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
            return result
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise _method_failed(exc) from exc

    async def stream(
        self, target: Any, method: str, args: list[Any], kwargs: dict[str, Any]
    ) -> AsyncIterator[Any]:
        try:
            items = getattr(target, method)(*args, **kwargs)
            if inspect.isasyncgen(items):
                async for item in items:
                    yield item
            else:
                for item in items:
                    yield item
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise _method_failed(exc) from exc


def _method_failed(exc: BaseException) -> MethodFailed:
    return MethodFailed(
        str(exc),
        remote_type=type(exc).__name__,
        remote_traceback="".join(traceback.format_exception(exc)),
    )


@dataclass
class Export:
    """A local actor served to the mesh under `name`."""

    name: str
    target: Any
    methods: dict[str, MethodKind]
    restore: dict[str, Any] = field(default_factory=dict)  # how to find it after a restart


class LatticaService:
    def __init__(self, mesh: Mesh, config: LatticaConfig, invoker: Invoker) -> None:
        self.mesh = mesh
        self.config = config
        self.invoker = invoker
        self.exports: dict[str, Export] = {}
        self.store = ObjectStore(config.object_cache_bytes)
        self.last_fetch: FetchStats | None = None
        self.fetching: dict[str, tuple[int, int]] = {}  # cid -> (bytes received, total)

    @property
    def peer_id(self) -> str:
        return self.mesh.peer_id

    async def start(self) -> None:
        self.mesh.serve(ACTOR_CALL, self._serve_call)
        self.mesh.serve_stream(ACTOR_STREAM, self._serve_stream)
        self.mesh.serve(OBJECT_READ, self._serve_read)
        await self.mesh.start()

    async def stop(self) -> None:
        """Withdraw our exports (best effort: the mesh may be gone already) and stop."""
        for name in list(self.exports):
            try:
                await self.unexport(name)
            except Exception as exc:
                logger.info("could not withdraw %r while stopping: %s", name, exc)
        await self.mesh.stop()

    def status(self) -> dict[str, Any]:
        """This node, the members and the exported actors, as the mesh sees them now."""
        return {
            "self": self.info(),
            "members": self.mesh.members(),
            "actors": [record.to_wire() for record in self.mesh.actors()],
        }

    def info(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "cluster": self.config.cluster,
            "addrs": self.mesh.addrs,
            "identity": self.config.identity(),
            "exports": sorted(self.exports),
            "objects": len(self.store),
        }

    # -- exporting local actors -------------------------------------------------------------
    async def export(
        self,
        name: str,
        target: Any,
        methods: dict[str, MethodKind],
        restore: dict[str, Any] | None = None,
    ) -> ActorRecord:
        if not name or not isinstance(name, str):
            raise ValueError("an exported actor needs a non-empty name")
        if name in self.exports and self.exports[name].target is not target:
            logger.info("re-exporting %r: the new actor replaces the old one", name)
        self.exports[name] = Export(name, target, dict(methods), dict(restore or {}))
        record = ActorRecord(name, self.config.cluster, self.peer_id, dict(methods))
        await self.mesh.announce_actor(record)
        return record

    async def unexport(self, name: str) -> None:
        if self.exports.pop(name, None) is not None:
            await self.mesh.withdraw_actor(name)

    def find_actor(self, name: str, cluster: str | None = None) -> ActorRecord:
        records = [r for r in self.mesh.actors() if r.name == name]
        if cluster is not None:
            records = [r for r in records if r.cluster == cluster]
        if len(records) == 1:
            return records[0]
        where = f" on cluster {cluster!r}" if cluster is not None else ""
        if not records:
            known = sorted({f"{r.name}@{r.cluster}" for r in self.mesh.actors()})
            raise ActorNotFound(
                f"no exported actor {name!r}{where} is known; known: {known or 'none'}",
                actor=name,
            )
        clusters = sorted(r.cluster for r in records)
        raise ActorNotFound(
            f"actor {name!r} is exported by several clusters {clusters}: pass cluster=...",
            actor=name,
        )

    # -- calling remote actors --------------------------------------------------------------
    async def call(
        self,
        record: ActorRecord,
        method: str,
        args: list[Any],
        kwargs: dict[str, Any],
        timeout: float | None = None,
    ) -> Any:
        """Call `record.method(*args, **kwargs)` on its owner and return the result."""
        self._check_kind(record, method, "unary")
        wire_args, wire_kwargs = self._outbound(args, kwargs)
        where = {"actor": record.name, "method": method, "cluster": record.cluster}
        timeout = timeout if timeout is not None else self.config.call_timeout
        try:
            envelope = await self.mesh.call(
                record.owner,
                ACTOR_CALL,
                record.name,
                method,
                wire_args,
                wire_kwargs,
                timeout=timeout,
            )
        except Exception as exc:
            raise _call_error(exc, timeout, **where) from exc
        return from_wire_value(open_envelope(envelope, **where))

    async def stream(
        self,
        record: ActorRecord,
        method: str,
        args: list[Any],
        kwargs: dict[str, Any],
        timeout: float | None = None,
    ) -> AsyncIterator[Any]:
        """The items a remote generator method yields, as they arrive."""
        self._check_kind(record, method, "stream")
        wire_args, wire_kwargs = self._outbound(args, kwargs)
        where = {"actor": record.name, "method": method, "cluster": record.cluster}
        timeout = timeout if timeout is not None else self.config.call_timeout
        source = self.mesh.stream(
            record.owner,
            ACTOR_STREAM,
            record.name,
            method,
            wire_args,
            wire_kwargs,
            timeout=timeout,
        )
        try:
            while True:
                try:
                    envelope = await anext(source)
                except StopAsyncIteration:
                    return
                except Exception as exc:
                    raise _call_error(exc, timeout, **where) from exc
                yield from_wire_value(open_envelope(envelope, **where))
        finally:
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                await aclose()

    def _check_kind(self, record: ActorRecord, method: str, kind: MethodKind) -> None:
        actual = record.kind_of(method)
        if actual != kind:
            how = "iterate it (it streams)" if actual == "stream" else "it does not stream"
            raise MethodNotExported(
                f"{record.name}.{method} is a {actual} method: {how}",
                actor=record.name,
                method=method,
            )

    def _outbound(self, args: list[Any], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        depth = self.config.max_value_depth
        return (
            to_wire_value(list(args), path="args", max_depth=depth),
            to_wire_value(dict(kwargs), path="kwargs", max_depth=depth),
        )

    # -- serving local actors ---------------------------------------------------------------
    def _lookup(self, actor: Any, method: Any, kind: MethodKind) -> Export:
        if not isinstance(actor, str) or not isinstance(method, str):
            raise MethodNotExported("actor and method names must be strings")
        export = self.exports.get(actor)
        if export is None:
            raise ActorNotFound(
                f"cluster {self.config.cluster!r} does not export an actor {actor!r} "
                f"(exported: {sorted(self.exports) or 'none'})",
                actor=actor,
            )
        record = ActorRecord(actor, self.config.cluster, self.peer_id, export.methods)
        self._check_kind(record, method, kind)
        return export

    def _inbound(self, args: Any, kwargs: Any) -> tuple[list[Any], dict[str, Any]]:
        if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
            raise MethodNotExported("malformed call: args must be a list and kwargs a dict")
        return list(from_wire_value(list(args))), from_wire_value(kwargs)

    async def _serve_call(
        self, caller: str, actor: Any, method: Any, args: Any, kwargs: Any
    ) -> dict[str, Any]:
        try:
            export = self._lookup(actor, method, "unary")
            call_args, call_kwargs = self._inbound(args, kwargs)
            result = await self.invoker.call(export.target, method, call_args, call_kwargs)
            return ok_envelope(
                to_wire_value(result, path="result", max_depth=self.config.max_value_depth)
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return _error_reply(exc)

    async def _serve_stream(
        self, caller: str, actor: Any, method: Any, args: Any, kwargs: Any
    ) -> AsyncIterator[dict[str, Any]]:
        try:
            export = self._lookup(actor, method, "stream")
            call_args, call_kwargs = self._inbound(args, kwargs)
            items = self.invoker.stream(export.target, method, call_args, call_kwargs)
            try:
                async for item in items:
                    yield ok_envelope(
                        to_wire_value(item, path="item", max_depth=self.config.max_value_depth)
                    )
            finally:
                aclose = getattr(items, "aclose", None)
                if aclose is not None:
                    await aclose()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            yield _error_reply(exc)

    async def _serve_read(self, caller: str, cid: Any, offset: Any, length: Any) -> bytes:
        if not (isinstance(cid, str) and isinstance(offset, int) and isinstance(length, int)):
            raise ValueError("object.read takes (cid: str, offset: int, length: int)")
        return self.store.read(cid, offset, length, self.config.object_chunk_bytes)

    # -- global objects ---------------------------------------------------------------------
    async def put(self, value: Any) -> GlobalRef:
        wire = to_wire_value(value, path="object", max_depth=self.config.max_value_depth)
        data = self.mesh.encode(wire)
        cid = await asyncio.to_thread(content_id, data)
        self.store.add(cid, data, pinned=True)
        await self.mesh.provide(cid)
        return GlobalRef(cid, len(data), (self.peer_id,))

    async def get(self, ref: GlobalRef, timeout: float | None = None) -> Any:
        if not isinstance(ref, GlobalRef):
            raise TypeError(f"lattica_ray.get takes a GlobalRef, not {type(ref).__name__}")
        parse_content_id(ref.cid)
        data = self.store.get(ref.cid)
        if data is None:
            data = await self._fetch(ref, timeout)
        return from_wire_value(self.mesh.decode(data))

    async def _fetch(self, ref: GlobalRef, timeout: float | None) -> bytes:
        large = ref.size > self.config.object_progress_bytes
        last_logged = [0.0]

        def progress(received: int, total: int) -> None:
            self.fetching[ref.cid] = (received, total)
            fraction = received / total
            if large and (fraction - last_logged[0] >= 0.1 or received == total):
                last_logged[0] = fraction
                logger.info("fetching %s: %d%% of %d MiB", ref, 100 * fraction, total >> 20)

        self.fetching[ref.cid] = (0, ref.size)
        try:
            data, stats = await fetch_object(
                ref,
                self.mesh,
                chunk_bytes=self.config.object_chunk_bytes,
                parallel=self.config.object_parallel_providers,
                timeout=timeout,
                progress=progress,
            )
        finally:
            self.fetching.pop(ref.cid, None)
        self.last_fetch = stats
        for evicted in self.store.add(ref.cid, data, pinned=False):
            logger.debug("evicted cached object %s", evicted)
        try:
            await self.mesh.provide(ref.cid)
        except Exception as exc:  # serving it is a courtesy; the caller has its object
            logger.warning("could not announce cached object %s: %s", ref.cid, exc)
        return data


def _error_reply(exc: Exception) -> dict[str, Any]:
    if isinstance(exc, MethodFailed):
        return error_envelope(exc.remote_type, exc.message, exc.remote_traceback)
    if isinstance(exc, RayFaceError):
        return envelope_for(exc)
    return envelope_for(exc, "".join(traceback.format_exception(exc)))


def _call_error(
    exc: Exception, timeout: float | None, *, actor: str, method: str, cluster: str
) -> Exception:
    """The Ray-face error for a failed RPC (the call itself, not the remote method)."""
    where = f"{actor}.{method} on cluster {cluster!r}"
    if isinstance(exc, RayFaceError):
        return exc
    if isinstance(exc, TimeoutError):
        return RemoteCallTimeout(
            f"{where} did not answer within {timeout} s; the remote call was cancelled",
            actor=actor,
            method=method,
            cluster=cluster,
        )
    if isinstance(exc, ConnectionError):
        return PeerUnreachable(
            f"{where}: the owner could not be reached ({exc})",
            actor=actor,
            method=method,
            cluster=cluster,
        )
    remote_type = getattr(exc, "remote_type", None)
    if remote_type is not None:
        return RemoteActorError.of(
            remote_type,
            getattr(exc, "message", str(exc)),
            getattr(exc, "remote_traceback", ""),
            actor=actor,
            method=method,
            cluster=cluster,
        )
    return RemoteActorError.of(
        type(exc).__name__, str(exc), "", actor=actor, method=method, cluster=cluster
    )


__all__ = ["Export", "Invoker", "LatticaService", "MethodFailed", "ObjectInvoker"]
