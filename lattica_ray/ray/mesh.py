"""The seam between the Ray face and the network: what a LatticaActor needs from its Node.

`Mesh` is that need, stated once. `NodeMesh` adapts a real `lattica_ray.Node` (its `rpc`, `dht`
and `view` services) to it; `lattica_ray.ray.memory_mesh.MemoryMesh` is an in-process stand-in
for tests and single-cluster use. Nothing else in `lattica_ray.ray` touches the Node.

Handlers are `async def handler(caller_peer: str, *args)` (or async generators for streams);
values are already checked by `protocol.to_wire_value`, and the mesh's codec carries them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from lattica_ray.ray.config import LatticaConfig
from lattica_ray.ray.protocol import ActorRecord

logger = logging.getLogger(__name__)

UnaryHandler = Callable[..., Awaitable[Any]]
StreamHandler = Callable[..., AsyncIterator[Any]]


class Mesh(Protocol):
    """What the Ray face uses of a Node. All methods run on the Node's event loop."""

    @property
    def peer_id(self) -> str: ...

    @property
    def addrs(self) -> list[str]: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    # -- RPC
    def serve(self, method: str, handler: UnaryHandler) -> None: ...

    def serve_stream(self, method: str, handler: StreamHandler) -> None: ...

    async def call(self, peer: str, method: str, *args: Any, timeout: float | None = None) -> Any:
        """The handler's return value. Raises `TimeoutError` when `timeout` passes (the remote
        handler is cancelled), `ConnectionError` if the peer is unreachable, an error carrying
        `remote_type`/`remote_traceback` if the remote handler raised; cancelling the caller
        cancels the remote handler."""
        ...

    def stream(
        self, peer: str, method: str, *args: Any, timeout: float | None = None
    ) -> AsyncIterator[Any]: ...

    def encode(self, value: Any) -> bytes:
        """A wire value as bytes (the RPC codec), for global objects."""
        ...

    def decode(self, data: bytes) -> Any: ...

    # -- cluster view
    async def announce_actor(self, record: ActorRecord) -> None: ...

    async def withdraw_actor(self, name: str) -> None: ...

    def actors(self) -> list[ActorRecord]:
        """Every exported actor the view knows of (malformed records are skipped)."""
        ...

    def members(self) -> list[dict[str, Any]]: ...

    # -- object directory (DHT)
    async def provide(self, cid: str) -> None: ...

    async def find_providers(self, cid: str) -> list[str]: ...


def create_mesh(config: LatticaConfig, key_file: str | None) -> Mesh:
    """The mesh `config.mesh` names."""
    if config.mesh == "memory":
        from lattica_ray.ray.memory_mesh import MemoryMesh

        return MemoryMesh(config.cluster, key_file=key_file)
    return NodeMesh(config, key_file)


class NodeMesh:
    """`Mesh` on a real `lattica_ray.Node` (QUIC, NAT traversal, DHT, RPC, view).

    Written against the service interfaces announced for `node.rpc`, `node.dht` and
    `node.view`; the adaptations live here and only here.
    """

    def __init__(self, config: LatticaConfig, key_file: str | None) -> None:
        from lattica_ray.node import Node

        self.config = config
        self.node = Node(
            listen=list(config.listen), bootstrap=list(config.bootstrap), key_file=key_file
        )

    @property
    def peer_id(self) -> str:
        return str(self.node.peer_id)

    @property
    def addrs(self) -> list[str]:
        return [str(a) for a in self.node.addrs]

    async def start(self) -> None:
        await self.node.start()
        missing = [s for s in ("rpc", "dht", "view") if getattr(self.node, s, None) is None]
        if missing:
            raise RuntimeError(
                f"this Node has no {', '.join(missing)} service yet; use mesh='memory' meanwhile"
            )
        await self.node.view.set_local_member({"cluster": self.config.cluster})

    async def stop(self) -> None:
        await self.node.stop()

    def serve(self, method: str, handler: UnaryHandler) -> None:
        self.node.rpc.register(method, handler)

    def serve_stream(self, method: str, handler: StreamHandler) -> None:
        self.node.rpc.register(method, handler)

    async def call(self, peer: str, method: str, *args: Any, timeout: float | None = None) -> Any:
        return await self.node.rpc.call(_peer(peer), method, *args, timeout=timeout)

    def stream(
        self, peer: str, method: str, *args: Any, timeout: float | None = None
    ) -> AsyncIterator[Any]:
        return self.node.rpc.stream(_peer(peer), method, *args, timeout=timeout)

    def encode(self, value: Any) -> bytes:
        from lattica_ray.rpc import codec

        return codec.encode(value)

    def decode(self, data: bytes) -> Any:
        from lattica_ray.rpc import codec

        return codec.decode(data)

    async def announce_actor(self, record: ActorRecord) -> None:
        await self.node.view.export_actor(record.name, record.to_wire())

    async def withdraw_actor(self, name: str) -> None:
        await self.node.view.unexport_actor(name)

    def actors(self) -> list[ActorRecord]:
        records = []
        for entry in self.node.view.actors():
            try:
                records.append(ActorRecord.from_wire(entry))
            except ValueError as exc:
                logger.warning("skipping a malformed actor record in the view: %s", exc)
        return records

    def members(self) -> list[dict[str, Any]]:
        return list(self.node.view.members())

    async def provide(self, cid: str) -> None:
        await self.node.dht.provide(cid)

    async def find_providers(self, cid: str) -> list[str]:
        return [str(p) for p in await self.node.dht.find_providers(cid)]


def _peer(peer: str) -> Any:
    from transport.identity import PeerId

    return PeerId.from_string(peer)
