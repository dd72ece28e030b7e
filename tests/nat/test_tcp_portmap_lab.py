"""Port mapping covers TCP: a node behind a miniupnpd router maps its QUIC and its TCP port,
advertises both public addresses, and a stranger reaches its libp2p TCP listener through the
mapped TCP port (real packets in the NAT lab; needs root and miniupnpd)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import pytest

from lattica_ray import Node
from tests.nat.portmap_lab import enable_port_mapping
from tests.nat.test_portmap_lab import home_lab, in_host, miniupnpd  # noqa: F401  (fixture)
from tests.netlab.lab import Lab
from transport.multiaddr import Multiaddr
from transport.tcp import tcp_socket_address

pytestmark = pytest.mark.root

MULTISTREAM = b"\x13/multistream/1.0.0\n"  # multistream-select header, length-prefixed


@pytest.mark.usefixtures("miniupnpd")
def test_node_maps_its_tcp_port_and_strangers_reach_it(netlab: Callable[..., Lab]) -> None:
    lab = home_lab(netlab)
    router = enable_port_mapping(lab, "nat_a", stun_host="pub1")
    host = lab.address("a1")
    stranger = lab.socket("pub1", socket.SOCK_STREAM)

    async def run() -> tuple[list[Multiaddr], list[Multiaddr], bytes]:
        listen = [f"/ip4/{host}/udp/4001/quic-v1", f"/ip4/{host}/tcp/4001"]
        async with Node(listen=listen, port_mapping=True) as node:
            async with asyncio.timeout(15):
                while {a.has("tcp") for a in node.nat.mapped_addrs} != {True, False}:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            mapped = list(node.nat.mapped_addrs)
            advertised = [a.without_peer_id() for a in node.addrs]
            tcp = next(a for a in mapped if a.has("tcp"))
            ip, port, _ = tcp_socket_address(tcp)
            loop = asyncio.get_running_loop()
            stranger.setblocking(False)
            async with asyncio.timeout(5):
                await loop.sock_connect(stranger, (ip, port))
                await loop.sock_sendall(stranger, MULTISTREAM)
                answer = await loop.sock_recv(stranger, len(MULTISTREAM))
            return mapped, advertised, answer

    with stranger:
        mapped, advertised, answer = in_host(lab, "a1", run)
    assert {a.has("tcp") for a in mapped} == {True, False}, mapped
    assert all(a.value_for("ip4") == lab.address("nat_a") for a in mapped), mapped
    assert set(mapped) <= set(advertised), (mapped, advertised)
    assert answer == MULTISTREAM  # the libp2p listener answered, through the mapped TCP port
    assert router.dnat_rules() == []  # the node removed both mappings when it stopped
