"""The seam between the Ray face and the network: what a LatticaActor needs from its Node.

`Mesh` is that need, stated once. `NodeMesh` adapts a real `lattica_ray.Node` (its `rpc`, `dht`
and `view` services) to it; `lattica_ray.ray.memory_mesh.MemoryMesh` is an in-process stand-in
for tests and single-cluster use. Nothing else in `lattica_ray.ray` touches the Node.

Handlers are `async def handler(caller_peer: str, *args)` (or async generators for streams);
values are already checked by `protocol.to_wire_value`, and the mesh's codec carries them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from lattica_ray.ray.config import LatticaConfig
from lattica_ray.ray.protocol import ActorRecord

logger = logging.getLogger(__name__)

UnaryHandler = Callable[..., Awaitable[Any]]
StreamHandler = Callable[..., AsyncIterator[Any]]

# How often a NodeMesh checks whether its advertised addresses changed (a relay reservation
# or a new observed address) and re-announces them in the view.
ADDRESS_REFRESH_SECONDS = 1.0
# Path kinds of `Mesh.members()` besides the transport's direct/holepunched/relayed.
PATH_SELF = "self"
PATH_NONE = ""  # not connected right now


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

    def members(self) -> list[dict[str, Any]]:
        """Every member the mesh knows, as plain data: `peer_id`, `cluster`, `addrs`, `status`,
        `resources` (cpus, gpus, memory_bytes, custom) and `path`: how this node reaches it
        ("self", "direct", "holepunched", "relayed", "memory", or "" when not connected)."""
        ...

    # -- object directory (DHT)
    async def provide(self, cid: str) -> None: ...

    async def find_providers(self, cid: str) -> list[str]: ...


def create_mesh(
    config: LatticaConfig, key_file: str | None, resources: dict[str, Any] | None = None
) -> Mesh:
    """The mesh `config.mesh` names; `resources` is what this machine offers (shown to all)."""
    if config.mesh == "memory":
        from lattica_ray.ray.memory_mesh import MemoryMesh

        return MemoryMesh(config.cluster, key_file=key_file, resources=resources)
    return NodeMesh(config, key_file, resources)


class NodeMesh:
    """`Mesh` on a real `lattica_ray.Node` (QUIC, NAT traversal, DHT, RPC, view).

    Uses the Node's `rpc`, `dht` and `view` services; a service the Node does not carry yet
    is attached here (RpcService, DHT, ClusterView on the Node as Host), so the Ray face runs
    on whatever the Node provides. The adaptations to those services live here and only here.
    `node_options` go to the `Node` (e.g. `relay=RelayConfig(...)`).
    """

    def __init__(
        self,
        config: LatticaConfig,
        key_file: str | None,
        resources: dict[str, Any] | None = None,
        **node_options: Any,
    ) -> None:
        from lattica_ray.node import Node

        self.config = config
        self.resources = dict(resources or {})
        self.node = Node(
            listen=list(config.listen),
            bootstrap=list(config.bootstrap),
            key_file=key_file,
            **node_options,
        )
        self._unary: dict[str, UnaryHandler] = {}
        self._streams: dict[str, StreamHandler] = {}
        self._address_watch: asyncio.Task[None] | None = None

    @property
    def peer_id(self) -> str:
        return str(self.node.peer_id)

    @property
    def addrs(self) -> list[str]:
        return [str(a) for a in self.node.addrs]

    async def start(self) -> None:
        await self.node.start()
        try:
            await self._attach_services()
            for method, handler in self._unary.items():
                self.node.rpc.register(method, _unary_adapter(handler))
            for method, handler in self._streams.items():
                self.node.rpc.register(method, _stream_adapter(handler))
        except BaseException:
            await self.node.stop()
            raise
        self._address_watch = asyncio.get_running_loop().create_task(self._watch_addresses())

    async def _attach_services(self) -> None:
        node = self.node
        if node.rpc is None:
            from lattica_ray.rpc import RpcService

            node.rpc = RpcService(node)
            await node.rpc.start()
        if node.dht is None:
            from lattica_ray.dht import DHT

            node.dht = DHT(node, node.key)
            await node.dht.start()
            if self.config.bootstrap:
                await node.dht.bootstrap(list(self.config.bootstrap))
        if node.view is None:
            from lattica_ray.view import ClusterView

            node.view = ClusterView(
                node, node.key, cluster_name=self.config.cluster, resources=self.resources
            )
            await node.view.start()
            await node.view.join(node.connected_peers())
        elif self.resources:
            node.view.set_resources(self.resources)

    async def _watch_addresses(self) -> None:
        """Re-announce our addresses in the view when they change (a relay reservation came
        through, a NAT mapping was observed): peers dial what the view says."""
        announced = self.addrs
        while True:
            await asyncio.sleep(ADDRESS_REFRESH_SECONDS)
            current = self.addrs
            if current != announced:
                logger.info("advertised addresses changed: %s", current)
                try:
                    self.node.view.set_addrs(current)
                except Exception as exc:  # the view is stopping; try again next round
                    logger.info("could not re-announce our addresses: %s", exc)
                    continue
                announced = current

    async def stop(self) -> None:
        watch, self._address_watch = self._address_watch, None
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        await self.node.stop()

    def serve(self, method: str, handler: UnaryHandler) -> None:
        self._unary[method] = handler

    def serve_stream(self, method: str, handler: StreamHandler) -> None:
        self._streams[method] = handler

    async def call(self, peer: str, method: str, *args: Any, timeout: float | None = None) -> Any:
        return await self.node.rpc.call(self._dialable(peer), method, *args, timeout=timeout)

    def stream(
        self, peer: str, method: str, *args: Any, timeout: float | None = None
    ) -> AsyncIterator[Any]:
        return self.node.rpc.stream(self._dialable(peer), method, *args, timeout=timeout)

    def _dialable(self, peer: str) -> Any:
        """`peer` as a PeerId, its addresses from the view handed to the dialer when we are
        not connected (a member we know only from the view, e.g. behind a NAT via a relay)."""
        peer_id = _peer(peer)
        if self.node.connection_to(peer_id) is None and self.node.view is not None:
            member = self.node.view.member(peer_id)
            if member is not None and member.addrs:
                from transport.multiaddr import Multiaddr

                addrs = []
                for text in member.addrs:
                    try:
                        addrs.append(Multiaddr.parse(text))
                    except ValueError:
                        logger.info("skipping a malformed address of %s: %r", peer, text)
                self.node.add_peer_addrs(peer_id, addrs)
        return peer_id

    def encode(self, value: Any) -> bytes:
        from lattica_ray.rpc import codec

        return b"".join(codec.encode(value))

    def decode(self, data: bytes) -> Any:
        from lattica_ray.rpc import codec

        return codec.decode(data)

    async def announce_actor(self, record: ActorRecord) -> None:
        kinds = {
            m: ("async_generator" if k == "stream" else "async") for m, k in record.methods.items()
        }
        self.node.view.export_actor(record.name, record.name, kinds)

    async def withdraw_actor(self, name: str) -> None:
        self.node.view.unexport_actor(name)

    def actors(self) -> list[ActorRecord]:
        records = []
        for actor in self.node.view.actors():
            methods = {
                m.name: ("stream" if m.kind in ("generator", "async_generator") else "unary")
                for m in actor.methods
            }
            try:
                records.append(
                    ActorRecord.from_wire(
                        {
                            "name": actor.name,
                            "cluster": actor.cluster_name,
                            "owner": actor.owner,
                            "methods": methods,
                        }
                    )
                )
            except ValueError as exc:
                logger.warning("skipping a malformed actor record in the view: %s", exc)
        return records

    def members(self) -> list[dict[str, Any]]:
        members = []
        for member in self.node.view.members():
            if member.peer_id == self.peer_id:
                path = PATH_SELF
            else:
                connection = self.node.connection_to(member.peer)
                path = connection.path if connection is not None else PATH_NONE
            members.append(
                {
                    "peer_id": member.peer_id,
                    "cluster": member.cluster_name,
                    "addrs": list(member.addrs),
                    "status": str(member.status),
                    "resources": member.resources.model_dump(mode="json"),
                    "path": path,
                }
            )
        return members

    async def provide(self, cid: str) -> None:
        from lattica_ray.dht import ContentId

        await self.node.dht.provide(ContentId.parse(cid))

    async def find_providers(self, cid: str) -> list[str]:
        from lattica_ray.dht import ContentId

        return [
            str(info.peer_id) for info in await self.node.dht.find_providers(ContentId.parse(cid))
        ]


def _unary_adapter(handler: UnaryHandler) -> UnaryHandler:
    """An RPC handler that passes the caller's peer ID first, as `Mesh` handlers expect."""
    from lattica_ray.rpc import current_call

    async def unary(*args: Any) -> Any:
        return await handler(_peer_text(current_call().peer), *args)

    return unary


def _stream_adapter(handler: StreamHandler) -> StreamHandler:
    from lattica_ray.rpc import current_call

    async def streaming(*args: Any) -> AsyncIterator[Any]:
        items = handler(_peer_text(current_call().peer), *args)
        try:
            async for item in items:
                yield item
        finally:
            await items.aclose()

    return streaming


# Peer IDs as text and as PeerId, converted once per peer rather than once per call (base58
# costs tens of microseconds each way, on the path of every remote actor call).
@functools.lru_cache(maxsize=4096)
def _peer(peer: str) -> Any:
    from transport.identity import PeerId

    return PeerId.from_string(peer)


@functools.lru_cache(maxsize=4096)
def _peer_text(peer: Any) -> str:
    return str(peer)
