"""An in-process `Mesh`: the Ray face without a network.

For tests of the Ray-side mechanics and for single-cluster use (`init(mesh="memory")`): meshes
in one process find each other through a `MemoryMeshNetwork` (a shared actor directory and
provider table). Calls keep the semantics the real RPC promises: values are copied (never
shared), handler errors arrive as text, timeouts and caller cancellation cancel the handler.
"""

from __future__ import annotations

import asyncio
import pickle
import traceback
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from lattica_ray.ray.mesh import StreamHandler, UnaryHandler
from lattica_ray.ray.protocol import ActorRecord
from transport.identity import KeyPair, load_or_create_key


class MemoryRemoteError(Exception):
    """The shape of `lattica_ray.rpc.RemoteError`: the remote handler raised."""

    def __init__(self, message: str, remote_type: str, remote_traceback: str) -> None:
        super().__init__(message)
        self.message = message
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback


class MemoryMeshNetwork:
    """Meshes by peer ID, exported actors and provider records, all in this process."""

    _default: ClassVar[MemoryMeshNetwork | None] = None

    def __init__(self) -> None:
        self.meshes: dict[str, MemoryMesh] = {}
        self.actor_records: dict[tuple[str, str], ActorRecord] = {}  # (owner, name) -> record
        self.providers: dict[str, set[str]] = {}
        self.calls = 0

    @classmethod
    def default(cls) -> MemoryMeshNetwork:
        if cls._default is None:
            cls._default = cls()
        return cls._default


class MemoryMesh:
    """A `Mesh` on a `MemoryMeshNetwork`."""

    def __init__(
        self,
        cluster: str,
        network: MemoryMeshNetwork | None = None,
        key_file: str | None = None,
        resources: dict[str, Any] | None = None,
    ) -> None:
        self.cluster = cluster
        self.resources = {"cpus": 0.0, "gpus": 0.0, "memory_bytes": 0, "custom": {}}
        self.resources.update(resources or {})
        self.network = network or MemoryMeshNetwork.default()
        key = load_or_create_key(key_file) if key_file else KeyPair.generate()
        self._peer_id = str(key.peer_id)
        self._unary: dict[str, UnaryHandler] = {}
        self._streams: dict[str, StreamHandler] = {}
        self.alive = False

    @property
    def peer_id(self) -> str:
        return self._peer_id

    @property
    def addrs(self) -> list[str]:
        return [f"/memory/{self._peer_id}"]

    async def start(self) -> None:
        self.network.meshes[self._peer_id] = self
        self.alive = True

    async def stop(self) -> None:
        self.alive = False
        self.network.meshes.pop(self._peer_id, None)
        for key in [k for k in self.network.actor_records if k[0] == self._peer_id]:
            del self.network.actor_records[key]
        for holders in self.network.providers.values():
            holders.discard(self._peer_id)

    # -- RPC
    def serve(self, method: str, handler: UnaryHandler) -> None:
        self._unary[method] = handler

    def serve_stream(self, method: str, handler: StreamHandler) -> None:
        self._streams[method] = handler

    def _remote(self, peer: str) -> MemoryMesh:
        remote = self.network.meshes.get(peer)
        if remote is None or not remote.alive or not self.alive:
            raise ConnectionError(f"peer {peer} is not on the memory mesh")
        return remote

    async def call(self, peer: str, method: str, *args: Any, timeout: float | None = None) -> Any:
        remote = self._remote(peer)
        handler = remote._unary.get(method)
        if handler is None:
            raise MemoryRemoteError(f"no method {method!r}", "MethodNotFound", "")
        self.network.calls += 1
        args = self._carry(args)
        async with asyncio.timeout(timeout):
            # Awaiting the task directly: cancelling or timing out the caller cancels it.
            task = asyncio.create_task(_as_remote(handler(self._peer_id, *args)))
            return self._carry(await task)

    async def stream(
        self, peer: str, method: str, *args: Any, timeout: float | None = None
    ) -> AsyncIterator[Any]:
        remote = self._remote(peer)
        handler = remote._streams.get(method)
        if handler is None:
            raise MemoryRemoteError(f"no streaming method {method!r}", "MethodNotFound", "")
        self.network.calls += 1
        source = handler(self._peer_id, *self._carry(args))
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        item = await anext(source)
                    except StopAsyncIteration:
                        return
                    except Exception as exc:
                        raise _remote_error(exc) from None
                    yield self._carry(item)
        finally:
            await source.aclose()

    def encode(self, value: Any) -> bytes:
        # In-process only: these bytes never leave this process, so pickle is safe here.
        return pickle.dumps(value, protocol=5)

    def decode(self, data: bytes) -> Any:
        return pickle.loads(data)

    def _carry(self, value: Any) -> Any:
        """A copy, as a value that crossed the network would be."""
        return self.decode(self.encode(value))

    # -- cluster view
    async def announce_actor(self, record: ActorRecord) -> None:
        self.network.actor_records[(self._peer_id, record.name)] = record

    async def withdraw_actor(self, name: str) -> None:
        self.network.actor_records.pop((self._peer_id, name), None)

    def actors(self) -> list[ActorRecord]:
        return list(self.network.actor_records.values())

    def members(self) -> list[dict[str, Any]]:
        return [
            {
                "peer_id": m.peer_id,
                "cluster": m.cluster,
                "addrs": m.addrs,
                "status": "alive",
                "resources": dict(m.resources),
                "path": "self" if m is self else "memory",
            }
            for m in self.network.meshes.values()
        ]

    # -- object directory
    async def provide(self, cid: str) -> None:
        self.network.providers.setdefault(cid, set()).add(self._peer_id)

    async def find_providers(self, cid: str) -> list[str]:
        return sorted(p for p in self.network.providers.get(cid, ()) if p in self.network.meshes)


async def _as_remote(coro: Any) -> Any:
    try:
        return await coro
    except Exception as exc:
        raise _remote_error(exc) from None


def _remote_error(exc: Exception) -> MemoryRemoteError:
    text = "".join(traceback.format_exception(exc))
    return MemoryRemoteError(str(exc), type(exc).__name__, text)
