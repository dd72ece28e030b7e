"""map_port / renew / unmap / PortMappingKeeper over real loopback sockets, against fake gateways.

The fakes speak PCP, NAT-PMP and UPnP-IGD on 127.0.0.1 (SSDP is unicast to the fake instead of
multicast). Every call names its gateway and SSDP address: nothing here reaches a real LAN.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import AsyncIterator, Callable

import pytest

from transport.nat import portmap
from transport.nat.portmap import (
    PortMapConfig,
    PortMapping,
    PortMappingKeeper,
    map_port,
    parse_default_gateway,
    renew,
    unmap,
)
from transport.nat.portmap_errors import GatewayRefused

EXTERNAL_IP = "203.0.113.10"
LOOPBACK = "127.0.0.1"
WAIT_S = 5.0


class Notifier:
    """Wakes waiters whenever a fake saw something."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()

    def notify(self) -> None:
        self._changed.set()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = WAIT_S) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()


# ----------------------------------------------------------------------------- fake PCP/NAT-PMP


class FakePmpGateway(asyncio.DatagramProtocol, Notifier):
    """A PCP (mode "pcp") or NAT-PMP-only (mode "natpmp") server; "silent" answers nothing."""

    def __init__(self, mode: str = "pcp") -> None:
        Notifier.__init__(self)
        self.mode = mode
        self.requests: list[bytes] = []
        self.garbage_first = 0
        self.port_shift = 0  # granted port = wished port + shift
        self.epoch = 1000
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.requests.append(data)
        self.notify()
        if self.mode == "silent" or self.transport is None:
            return
        for _ in range(1 if self.mode == "garbage" else self.garbage_first):
            self.transport.sendto(b"\x02\x81" + b"\xee" * 58, addr)
        reply = self._reply(data)
        if reply is not None:
            self.transport.sendto(reply, addr)

    def _reply(self, data: bytes) -> bytes | None:
        if self.mode == "garbage":
            return None
        if self.mode == "refuse":  # PCP NOT_AUTHORIZED, no MAP payload
            return struct.pack("!BBBBII", 2, 0x81, 0, 2, 30, self.epoch) + bytes(12)
        if data[0] == 2:
            if self.mode == "natpmp":
                return struct.pack("!BBHI", 0, 129, 1, self.epoch)  # UNSUPPORTED_VERSION
            lifetime = struct.unpack_from("!I", data, 4)[0]
            nonce, proto = data[24:36], data[36]
            internal, wished = struct.unpack_from("!HH", data, 40)
            external = 0 if lifetime == 0 else (wished or internal) + self.port_shift
            header = struct.pack("!BBBBII", 2, 0x81, 0, 0, lifetime, self.epoch) + bytes(12)
            body = nonce + struct.pack("!B3xHH", proto, internal, external)
            return header + body + bytes(10) + b"\xff\xff" + socket.inet_aton(EXTERNAL_IP)
        if data[:2] == b"\x00\x00":
            return struct.pack("!BBHI", 0, 128, 0, self.epoch) + socket.inet_aton(EXTERNAL_IP)
        if data[0] == 0 and len(data) == 12:
            _v, op, _r, internal, wished, lifetime = struct.unpack("!BBHHHI", data)
            external = 0 if lifetime == 0 else (wished or internal) + self.port_shift
            return struct.pack("!BBHIHHI", 0, 128 + op, 0, self.epoch, internal, external, lifetime)
        return None

    def pcp_lifetimes(self) -> list[int]:
        return [struct.unpack_from("!I", r, 4)[0] for r in self.requests if r[0] == 2]


@contextlib.asynccontextmanager
async def pmp_gateway(mode: str = "pcp") -> AsyncIterator[tuple[FakePmpGateway, int]]:
    loop = asyncio.get_running_loop()
    fake = FakePmpGateway(mode)
    transport, _ = await loop.create_datagram_endpoint(lambda: fake, local_addr=(LOOPBACK, 0))
    try:
        yield fake, transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


def closed_udp_port() -> int:
    """A loopback UDP port nobody listens on (the kernel answers ICMP port unreachable)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


# ----------------------------------------------------------------------------- fake UPnP IGD


DESCRIPTION = """<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0"><device><serviceList><service>
<serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType>
<controlURL>/ctl/IPConn</controlURL></service></serviceList></device></root>"""

SOAP = (
    '<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">'
    "<s:Body>{}</s:Body></s:Envelope>"
)
FAULT = (
    "<s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>"
    '<UPnPError xmlns="urn:schemas-upnp-org:control-1-0"><errorCode>{}</errorCode>'
    "<errorDescription>{}</errorDescription></UPnPError></detail></s:Fault>"
)


class FakeIgd(asyncio.DatagramProtocol, Notifier):
    """An SSDP responder and an HTTP/SOAP IGD on loopback, recording every action."""

    def __init__(self, ssdp_host: str = LOOPBACK) -> None:
        Notifier.__init__(self)
        self.ssdp_host = ssdp_host
        self.actions: list[tuple[str, dict[str, str]]] = []
        self.searches = 0
        self.http_requests = 0
        self.conflicts = 0  # answer this many AddPortMapping with 718 first
        self.permanent_only = False
        self.location: str | None = None  # override LOCATION
        self.description = DESCRIPTION.encode()
        self.mappings: dict[tuple[str, str], dict[str, str]] = {}
        self.http_port = 0
        self.ssdp_port = 0
        self._transport: asyncio.DatagramTransport | None = None
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._http, self.ssdp_host, 0)
        self.http_port = self._server.sockets[0].getsockname()[1]
        transport, _ = await loop.create_datagram_endpoint(
            lambda: self, local_addr=(self.ssdp_host, 0)
        )
        self._transport = transport
        self.ssdp_port = transport.get_extra_info("sockname")[1]

    async def stop(self) -> None:
        if self._transport is not None:
            self._transport.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def config(self, **overrides: object) -> PortMapConfig:
        settings: dict[str, object] = {
            "pcp": False,
            "natpmp": False,
            "ssdp_address": (self.ssdp_host, self.ssdp_port),
        }
        settings.update(overrides)
        return PortMapConfig(**settings)  # type: ignore[arg-type]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not data.startswith(b"M-SEARCH") or self._transport is None:
            return
        self.searches += 1
        self.notify()
        location = self.location or f"http://{self.ssdp_host}:{self.http_port}/rootDesc.xml"
        answer = (
            "HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\n"
            "ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
            f"LOCATION: {location}\r\nSERVER: fake UPnP/1.1\r\n\r\n"
        )
        self._transport.sendto(answer.encode(), addr)

    async def _http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(":") for line in lines[1:])
            }
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.http_requests += 1
            status, payload = self._handle(lines[0], headers, body)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: text/xml\r\nContent-Length: {len(payload)}"
                "\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        finally:
            writer.close()
            self.notify()

    def _handle(self, request_line: str, headers: dict[str, str], body: bytes) -> tuple[str, bytes]:
        if request_line.startswith("GET /rootDesc.xml"):
            return "200 OK", self.description
        action = headers["soapaction"].strip('"').rsplit("#", 1)[1]
        root = ElementTree.fromstring(body)
        call = next(iter(next(iter(root))))
        args = {child.tag: child.text or "" for child in call}
        self.actions.append((action, args))
        if action == "GetExternalIPAddress":
            inner = f"<u:{action}Response xmlns:u='x'><NewExternalIPAddress>{EXTERNAL_IP}"
            return "200 OK", SOAP.format(
                inner + f"</NewExternalIPAddress></u:{action}Response>"
            ).encode()
        if action == "AddPortMapping":
            if self.conflicts:
                self.conflicts -= 1
                return "500 Internal Server Error", SOAP.format(
                    FAULT.format(718, "ConflictInMappingEntry")
                ).encode()
            if self.permanent_only and args["NewLeaseDuration"] != "0":
                return "500 Internal Server Error", SOAP.format(
                    FAULT.format(725, "OnlyPermanentLeasesSupported")
                ).encode()
            self.mappings[(args["NewExternalPort"], args["NewProtocol"])] = args
        elif action == "DeletePortMapping":
            if self.mappings.pop((args["NewExternalPort"], args["NewProtocol"]), None) is None:
                return "500 Internal Server Error", SOAP.format(
                    FAULT.format(714, "NoSuchEntryInArray")
                ).encode()
        return "200 OK", SOAP.format(f"<u:{action}Response xmlns:u='x'/>").encode()

    def added(self) -> list[dict[str, str]]:
        return [args for action, args in self.actions if action == "AddPortMapping"]


@contextlib.asynccontextmanager
async def igd(ssdp_host: str = LOOPBACK) -> AsyncIterator[FakeIgd]:
    fake = FakeIgd(ssdp_host)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


def pmp_config(port: int, **overrides: object) -> PortMapConfig:
    settings: dict[str, object] = {"upnp": False, "pmp_port": port}
    settings.update(overrides)
    return PortMapConfig(**settings)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- default gateway

ROUTES = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth1\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0
eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth2\t00000000\t0200000A\t0001\t0\t0\t0\t00000000\t0\t0\t0
garbage line
eth3\t00000000\tZZZZZZZZ\t0003\t0\t0\t0\t00000000\t0\t0\t0
"""


def test_default_gateway_is_the_lowest_metric_default_route_via_a_gateway() -> None:
    assert parse_default_gateway(ROUTES) == "10.0.0.1"
    only_link = ROUTES.splitlines()[0] + "\neth0\t00000000\t00000000\t0001\t0\t0\t0\t00000000\n"
    assert parse_default_gateway(only_link) is None
    assert parse_default_gateway("") is None


async def test_no_gateway_means_no_mapping_and_no_traffic(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(portmap, "default_gateway", lambda: None)
    assert await map_port(4001) is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"internal_port": 0},
        {"internal_port": 4001, "protocol": "sctp"},
        {"internal_port": 4001, "lifetime": 0},
        {"internal_port": 4001, "timeout": 0},
        {"internal_port": 4001, "external_port": 70000},
    ],
)
async def test_bad_arguments_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        await map_port(gateway=LOOPBACK, **kwargs)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- PCP / NAT-PMP


async def test_pcp_maps_renews_and_unmaps_with_one_nonce() -> None:
    async with pmp_gateway("pcp") as (fake, port):
        config = pmp_config(port)
        mapping = await map_port(4001, lifetime=120, gateway=LOOPBACK, config=config)
        assert mapping is not None
        assert mapping.method == "pcp" and mapping.endpoint == (EXTERNAL_IP, 4001)
        assert (mapping.internal_port, mapping.internal_ip, mapping.lifetime) == (
            4001,
            LOOPBACK,
            120,
        )
        assert str(mapping.multiaddr()) == f"/ip4/{EXTERNAL_IP}/udp/4001/quic-v1"
        renewed = await renew(mapping, config=config)
        assert renewed.endpoint == mapping.endpoint and renewed.nonce == mapping.nonce
        assert await unmap(renewed, config=config)
        nonces = {r[24:36] for r in fake.requests}
        assert nonces == {mapping.nonce} and fake.pcp_lifetimes() == [120, 120, 0]


async def test_natpmp_only_gateway_is_used_after_pcp_is_refused() -> None:
    async with pmp_gateway("natpmp") as (fake, port):
        config = pmp_config(port)
        mapping = await map_port(4001, "tcp", 60, gateway=LOOPBACK, config=config)
        assert mapping is not None and mapping.method == "natpmp" and mapping.protocol == "tcp"
        assert mapping.endpoint == (EXTERNAL_IP, 4001)
        assert str(mapping.multiaddr()) == f"/ip4/{EXTERNAL_IP}/tcp/4001"
        assert await unmap(mapping, config=config)
        assert fake.requests[-1] == struct.pack("!BBHHHI", 0, 2, 0, 4001, 0, 0)


async def test_closed_port_fails_at_once() -> None:
    began = time.perf_counter()
    config = pmp_config(closed_udp_port())
    assert await map_port(4001, gateway=LOOPBACK, timeout=2.0, config=config) is None
    assert time.perf_counter() - began < 0.5


async def test_silent_gateway_costs_the_timeout_and_no_more(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with pmp_gateway("silent") as (fake, port):
        began = time.perf_counter()
        with caplog.at_level(logging.INFO, logger="transport.nat.portmap"):
            mapping = await map_port(4001, gateway=LOOPBACK, timeout=0.6, config=pmp_config(port))
        elapsed = time.perf_counter() - began
        assert mapping is None
        assert 0.55 <= elapsed < 0.9, elapsed
        assert len(fake.requests) == 2  # sent at 0 and 0.25 s; the next is due at 0.75 s
        assert "no PCP/NAT-PMP answer" in caplog.text


async def test_garbage_replies_are_ignored_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    async with pmp_gateway("pcp") as (fake, port):
        fake.garbage_first = 3  # garbage arrives before the real answer
        mapping = await map_port(4001, gateway=LOOPBACK, config=pmp_config(port))
        assert mapping is not None and mapping.external_port == 4001
        fake.mode = "garbage"  # nothing but garbage
        with caplog.at_level(logging.INFO, logger="transport.nat.portmap"):
            assert (
                await map_port(4002, gateway=LOOPBACK, timeout=0.3, config=pmp_config(port)) is None
            )
        assert "replies ignored" in caplog.text


# ----------------------------------------------------------------------------- UPnP


async def test_upnp_maps_and_unmaps() -> None:
    async with igd() as fake:
        config = fake.config()
        mapping = await map_port(4001, lifetime=600, gateway=LOOPBACK, config=config)
        assert mapping is not None and mapping.method == "upnp"
        assert mapping.endpoint == (EXTERNAL_IP, 4001) and mapping.lifetime == 600
        assert mapping.control_url == f"http://{LOOPBACK}:{fake.http_port}/ctl/IPConn"
        [added] = fake.added()
        assert added["NewInternalClient"] == LOOPBACK and added["NewProtocol"] == "UDP"
        assert added["NewLeaseDuration"] == "600"
        assert added["NewPortMappingDescription"] == "lattica-ray"
        renewed = await renew(mapping, config=config)
        assert renewed.endpoint == mapping.endpoint and len(fake.added()) == 2
        assert await unmap(renewed, config=config)
        assert fake.mappings == {}
        assert await unmap(renewed, config=config)  # already gone (714) counts as removed


async def test_upnp_conflict_moves_to_another_port() -> None:
    async with igd() as fake:
        fake.conflicts = 2
        mapping = await map_port(4001, gateway=LOOPBACK, config=fake.config())
        assert mapping is not None
        ports = [args["NewExternalPort"] for args in fake.added()]
        assert ports[0] == "4001" and len(ports) == 3
        assert mapping.external_port == int(ports[2]) and 1024 <= mapping.external_port <= 65535
        fake.conflicts = 10
        assert await map_port(4002, gateway=LOOPBACK, config=fake.config()) is None
        assert len(fake.added()) == 3 + 4  # upnp_port_attempts


async def test_upnp_permanent_only_gateway_gets_a_permanent_lease() -> None:
    async with igd() as fake:
        fake.permanent_only = True
        mapping = await map_port(4001, gateway=LOOPBACK, config=fake.config())
        assert mapping is not None and mapping.lifetime == 0 and mapping.expires_at is None
        assert [args["NewLeaseDuration"] for args in fake.added()] == ["3600", "0"]


async def test_upnp_never_follows_a_location_to_another_host() -> None:
    async with igd() as fake, igd(ssdp_host="127.0.0.2") as elsewhere:
        fake.location = f"http://127.0.0.2:{elsewhere.http_port}/rootDesc.xml"
        began = time.perf_counter()
        assert await map_port(4001, gateway=LOOPBACK, config=fake.config(ssdp_wait=0.3)) is None
        assert fake.searches >= 1 and elsewhere.http_requests == 0
        assert time.perf_counter() - began < 0.6


async def test_upnp_ignores_answers_from_other_than_the_gateway() -> None:
    async with igd(ssdp_host="127.0.0.2") as fake:
        config = fake.config(ssdp_wait=0.3)
        assert await map_port(4001, gateway=LOOPBACK, config=config) is None
        assert fake.searches >= 1 and fake.http_requests == 0
        anywhere = fake.config(upnp_gateway_only=False)
        mapping = await map_port(4001, gateway=LOOPBACK, config=anywhere)
        assert mapping is not None and mapping.gateway == "127.0.0.2"


async def test_upnp_oversized_or_broken_description_means_no_mapping() -> None:
    async with igd() as fake:
        fake.description = b"<root>" + b"x" * 70_000 + b"</root>"
        assert await map_port(4001, gateway=LOOPBACK, config=fake.config(ssdp_wait=0.3)) is None
        fake.description = b"<root><device>"
        assert await map_port(4001, gateway=LOOPBACK, config=fake.config(ssdp_wait=0.3)) is None
        assert fake.added() == []


async def test_upnp_refusal_is_reported() -> None:
    async with igd() as fake:
        fake.conflicts = 1
        config = fake.config(upnp_port_attempts=1)
        assert await map_port(4001, gateway=LOOPBACK, config=config) is None
        mapping = PortMapping(
            EXTERNAL_IP, 4001, 4001, "udp", 60, "upnp", LOOPBACK, LOOPBACK,
            control_url=f"http://{LOOPBACK}:{fake.http_port}/ctl/IPConn",
            service_type="urn:schemas-upnp-org:service:WANIPConnection:1",
        )  # fmt: skip
        fake.conflicts = 1
        with pytest.raises(GatewayRefused, match="ConflictInMappingEntry"):
            await renew(mapping, config=config)


# ----------------------------------------------------------------------------- both at once


async def test_both_methods_race_and_only_the_winner_stays() -> None:
    async with pmp_gateway("pcp") as (pmp, port), igd() as fake:
        config = fake.config(pcp=True, natpmp=True, pmp_port=port)
        mapping = await map_port(4001, gateway=LOOPBACK, config=config)
        assert mapping is not None and mapping.method == "pcp"
        assert fake.mappings == {}  # UPnP was still searching when PCP answered: cancelled
        assert len(pmp.requests) == 1


async def test_upnp_wins_when_pcp_is_missing() -> None:
    async with igd() as fake:
        config = fake.config(pcp=True, natpmp=True, pmp_port=closed_udp_port())
        mapping = await map_port(4001, gateway=LOOPBACK, config=config)
        assert mapping is not None and mapping.method == "upnp"


# ----------------------------------------------------------------------------- keeper


async def test_keeper_renews_before_expiry_and_removes_at_stop() -> None:
    async with pmp_gateway("pcp") as (fake, port):
        config = pmp_config(port, renew_fraction=0.2, min_renew_delay=0.05)
        changes: list[PortMapping | None] = []
        keeper = PortMappingKeeper(
            4001, lifetime=1, gateway=LOOPBACK, config=config, on_change=changes.append
        )
        try:
            first = await keeper.start()
            assert first is not None and changes == [first]
            await fake.wait_for(lambda: keeper.renewals >= 2)  # each renewal is a request
            assert changes == [first]  # same endpoint: no news
            fake.port_shift = 7  # the gateway moves the mapping on the next renewal
            await fake.wait_for(lambda: len(changes) == 2)
            assert changes[1] is not None and changes[1].external_port == 4008
        finally:
            await keeper.stop()
        assert fake.pcp_lifetimes()[-1] == 0 and keeper.mapping is None


async def test_keeper_reports_loss_then_maps_again() -> None:
    async with pmp_gateway("pcp") as (fake, port):
        config = pmp_config(port, renew_fraction=0.5, min_renew_delay=0.05, retry_interval=0.1)
        changed = Notifier()
        changes: list[PortMapping | None] = []

        def on_change(mapping: PortMapping | None) -> None:
            changes.append(mapping)
            changed.notify()

        keeper = PortMappingKeeper(
            4001, lifetime=1, gateway=LOOPBACK, timeout=0.2, config=config, on_change=on_change
        )
        try:
            assert await keeper.start() is not None
            fake.mode = "silent"  # the router stops answering
            await changed.wait_for(lambda: len(changes) == 2)
            assert changes[1] is None and keeper.mapping is None
            fake.mode = "pcp"
            await changed.wait_for(lambda: len(changes) == 3)
            assert changes[2] is not None and keeper.mapping is changes[2]
        finally:
            await keeper.stop()


async def test_keeper_without_gateway_support_keeps_trying_quietly() -> None:
    async with pmp_gateway("refuse") as (fake, port):
        keeper = PortMappingKeeper(
            4001, gateway=LOOPBACK, config=pmp_config(port, retry_interval=0.05)
        )
        try:
            assert await keeper.start() is None
            await fake.wait_for(lambda: len(fake.requests) >= 3)  # tried again, twice
            assert keeper.mapping is None
        finally:
            await keeper.stop()
    assert len(fake.requests) < 50  # retry_interval apart, not a busy loop
    with pytest.raises(ValueError):
        PortMappingKeeper(0)
