"""Port mapping in the NAT lab: miniupnpd on a port-restricted router, real packets end to end.

The client runs inside the LAN host's namespace (a thread that entered it), so it finds the
gateway in that namespace's routing table and its SSDP search really goes out as multicast.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.nat.portmap_lab import APT_PACKAGE, MINIUPNPD, enable_port_mapping, wait_for
from tests.netlab.lab import Lab
from tests.netlab.netns import call_in
from tests.netlab.plugin import netlab_unavailable
from transport.nat import portmap
from transport.nat.portmap import PortMapConfig, PortMapping, PortMappingKeeper, map_port, unmap
from transport.nat.portmap_errors import GatewayRefused

pytestmark = pytest.mark.root

T = TypeVar("T")
RECEIVE_TIMEOUT_S = 3.0
CONFIGS = {
    "pcp": PortMapConfig(upnp=False),
    "natpmp": PortMapConfig(pcp=False, upnp=False),
    "upnp": PortMapConfig(pcp=False, natpmp=False),
}


@pytest.fixture
def miniupnpd() -> None:
    """Skip (fail under CI) where miniupnpd is not installed."""
    if not Path(MINIUPNPD).exists():
        netlab_unavailable(f"{MINIUPNPD} is missing: apt-get install -y miniupnpd {APT_PACKAGE}")


def in_host(lab: Lab, host: str, coroutine: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``coroutine()`` on an event loop inside lab host ``host``'s network namespace."""
    return call_in(lab.netns(host), lambda: asyncio.run(coroutine()))


def home_lab(netlab: Callable[..., Lab], hosts: int = 1) -> Lab:
    lab = netlab()
    lab.add_public_host("pub1")
    lab.add_nat("nat_a", kind="port_restricted")
    for index in range(hosts):
        lab.add_host(f"a{index + 1}", behind="nat_a")
    lab.start()
    return lab


def bound_socket(lab: Lab, host: str) -> tuple[socket.socket, int]:
    sock = lab.socket(host)
    sock.bind(("0.0.0.0", 0))
    sock.settimeout(RECEIVE_TIMEOUT_S)
    return sock, sock.getsockname()[1]


def inbound_dropped(lab: Lab) -> int:
    return lab.router_drops("nat_a").inbound


def send_from_public(lab: Lab, payload: bytes, endpoint: tuple[str, int]) -> None:
    """One datagram from a fresh socket (a new flow) on the public host."""
    with lab.socket("pub1") as sender:
        sender.sendto(payload, endpoint)


@pytest.mark.usefixtures("miniupnpd")
@pytest.mark.parametrize("method", ["pcp", "natpmp", "upnp"])
def test_mapped_port_receives_from_the_internet(netlab: Callable[..., Lab], method: str) -> None:
    lab = home_lab(netlab)
    router = enable_port_mapping(lab, "nat_a", stun_host="pub1")
    inner, port = bound_socket(lab, "a1")
    with inner:
        endpoint = (lab.address("nat_a"), port)
        # Before mapping, the router drops what the public host sends.
        dropped = inbound_dropped(lab)
        send_from_public(lab, b"too early", endpoint)
        wait_for(lambda: inbound_dropped(lab) > dropped, 3.0, "the router to drop it")

        began = time.perf_counter()
        mapping = in_host(lab, "a1", lambda: map_port(port, config=CONFIGS[method]))
        elapsed_ms = (time.perf_counter() - began) * 1000
        assert mapping is not None, router.log()
        print(f"{method}: mapped {mapping.endpoint} in {elapsed_ms:.0f} ms")
        assert mapping.method == method
        assert mapping.endpoint == endpoint  # miniupnpd keeps the port we asked for
        assert mapping.internal_ip == lab.address("a1")
        assert any(f"dnat ip to {lab.address('a1')}:{port}" in r for r in router.dnat_rules())

        send_from_public(lab, b"hello through the mapping", endpoint)
        data, source = inner.recvfrom(2048)
        assert data == b"hello through the mapping"
        assert source[0] == lab.address("pub1")

        assert in_host(lab, "a1", lambda: unmap(mapping))
        assert router.dnat_rules() == []
        dropped = inbound_dropped(lab)
        send_from_public(lab, b"after unmap", endpoint)
        wait_for(lambda: inbound_dropped(lab) > dropped, 3.0, "the router to drop it again")


def test_router_without_port_mapping_costs_at_most_the_timeout(
    netlab: Callable[..., Lab],
) -> None:
    lab = home_lab(netlab)  # no miniupnpd
    began = time.perf_counter()
    mapping = in_host(lab, "a1", lambda: map_port(4001, timeout=2.0))
    elapsed = time.perf_counter() - began
    print(f"no support: None after {elapsed * 1000:.0f} ms")
    assert mapping is None
    assert elapsed < 2.3  # PCP: ICMP port unreachable at once; SSDP: ssdp_wait (1 s)


@pytest.mark.usefixtures("miniupnpd")
def test_both_methods_race_and_pcp_wins_against_miniupnpd(netlab: Callable[..., Lab]) -> None:
    lab = home_lab(netlab)
    router = enable_port_mapping(lab, "nat_a", stun_host="pub1")
    mapping = in_host(lab, "a1", lambda: map_port(40_000))
    assert mapping is not None and mapping.method == "pcp"
    assert len(router.dnat_rules()) == 1  # the UPnP attempt left nothing behind


@pytest.mark.usefixtures("miniupnpd")
def test_secure_mode_refuses_a_mapping_for_another_host(netlab: Callable[..., Lab]) -> None:
    lab = home_lab(netlab, hosts=2)
    router = enable_port_mapping(lab, "nat_a", stun_host="pub1")
    other = lab.address("a2")

    async def map_for_other_host() -> None:
        config = PortMapConfig()
        deadline = asyncio.get_running_loop().time() + 2.0
        igd = await portmap._upnp_discover(router.lan_address, config, deadline)
        forged = portmap._Igd(igd.responder, igd.service, local_ip=other)
        await portmap._upnp_add(
            forged, config, protocol="udp", internal_port=41_000, lifetime=60, external_port=0
        )

    with pytest.raises(GatewayRefused) as caught:
        in_host(lab, "a1", map_for_other_host)
    assert caught.value.code == 718
    # miniupnpd's log reaches us through a reader thread, possibly after its HTTP answer
    wait_for(lambda: "tried to redirect port" in router.log(), 5, "miniupnpd to log the refusal")
    assert router.dnat_rules() == []
    # a2 itself may map (its SSDP reaches miniupnpd on its own LAN interface)
    mapping = in_host(lab, "a2", lambda: map_port(41_000, config=CONFIGS["upnp"]))
    assert mapping is not None and mapping.internal_ip == other


@pytest.mark.usefixtures("miniupnpd")
def test_keeper_renews_so_the_mapping_outlives_its_lease(netlab: Callable[..., Lab]) -> None:
    lab = home_lab(netlab)
    router = enable_port_mapping(lab, "nat_a", stun_host="pub1")
    inner, port = bound_socket(lab, "a1")
    unkept, unkept_port = bound_socket(lab, "a1")
    config = PortMapConfig(upnp=False, renew_fraction=0.5, min_renew_delay=0.2)

    async def keep() -> tuple[PortMapping | None, int]:
        keeper = PortMappingKeeper(port, lifetime=2, config=config)
        try:
            kept = await keeper.start()
            # An unkept mapping with the same lease, for comparison: miniupnpd drops it.
            assert await map_port(unkept_port, lifetime=2, config=config) is not None
            await asyncio.to_thread(
                wait_for,
                lambda: not any(f":{unkept_port}" in r for r in router.dnat_rules()),
                6.0,
                "miniupnpd to expire the unkept mapping",
            )
            assert kept is not None and keeper.mapping is not None
            assert keeper.mapping.endpoint == kept.endpoint
            send_from_public(lab, b"still mapped", kept.endpoint)
            data = await asyncio.to_thread(inner.recv, 2048)
            assert data == b"still mapped"
            return kept, keeper.renewals
        finally:
            await keeper.stop()

    with inner, unkept:
        kept, renewals = in_host(lab, "a1", keep)
    assert kept is not None and renewals >= 1
    assert router.dnat_rules() == []  # stop() removed it
