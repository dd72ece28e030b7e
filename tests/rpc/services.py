"""Two RPC services on connected nodes over real loopback QUIC or TCP: the set-up the RPC
fast-path tests share."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from lattica_ray import Node
from lattica_ray.rpc import RpcConfig, RpcService

LISTEN = {"quic": "/ip4/127.0.0.1/udp/0/quic-v1", "tcp": "/ip4/127.0.0.1/tcp/0"}


class Peers:
    """A client service and a server service on two connected nodes."""

    def __init__(self, client: RpcService, server: RpcService, server_node: Node) -> None:
        self.client, self.server, self.server_node = client, server, server_node
        self.peer = server_node.peer_id


@contextlib.asynccontextmanager
async def connected_services(transport: str, client_config: RpcConfig) -> AsyncIterator[Peers]:
    """A server service with the defaults and a client with `client_config`, connected over
    `transport` ("quic" or "tcp"); both stopped on the way out, whatever happened."""
    listen = [LISTEN[transport]]
    async with Node(listen=listen) as server_node, Node(listen=listen) as client_node:
        client_node.add_peer_addrs(server_node.peer_id, server_node.addrs)
        server = RpcService(server_node)
        client = RpcService(client_node, client_config)
        await server.start()
        await client.start()
        try:
            await client_node.connect(server_node.peer_id)
            yield Peers(client, server, server_node)
        finally:
            await client.stop()
            await server.stop()
