"""Port mapping on the LAN gateway (PCP / NAT-PMP and UPnP-IGD): a public port for a NAT'd node.

``map_port`` asks the default gateway over PCP (falling back to NAT-PMP) and over UPnP-IGD at
the same time and keeps the first mapping granted; a gateway that offers neither costs at most
``timeout`` (an ICMP "port unreachable" ends the PCP attempt at once; SSDP waits ``ssdp_wait``).
``PortMappingKeeper`` holds a mapping: it renews it before it expires, maps again when the
gateway forgot it, tells its owner when the external endpoint changes, and removes it at stop.

Only LAN traffic: UDP to the default gateway's port 5351, an SSDP search to 239.255.255.250:1900
(multicast TTL 1), and HTTP to the device that answered it (nowhere else: see portmap_upnp).

Usage::

    mapping = await map_port(4001, "udp", lifetime=3600)   # None: no port mapping here
    if mapping:
        advertise(mapping.multiaddr())                      # /ip4/<external>/udp/<port>/quic-v1
        await unmap(mapping)

    keeper = PortMappingKeeper(4001, on_change=lambda m: ...)
    await keeper.start()    # the first mapping (or None); renewals run in the background
    await keeper.stop()     # removes the mapping
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from pydantic import BaseModel, Field

from transport.multiaddr import Multiaddr
from transport.nat.portmap_errors import GatewayRefused, MalformedReply, NoGateway, PortMapError
from transport.nat.portmap_pcp import (
    INITIAL_RETRANSMIT_S,
    PCP_NONCE_SIZE,
    SERVER_PORT,
    Method,
    PmpExchange,
    PmpGrant,
)
from transport.nat.portmap_upnp import (
    CONFLICT_IN_MAPPING_ENTRY,
    ONLY_PERMANENT_LEASES_SUPPORTED,
    SAME_PORT_VALUES_REQUIRED,
    SEARCH_TARGETS,
    SSDP_MULTICAST,
    HttpResponse,
    HttpTarget,
    IgdService,
    add_port_mapping_arguments,
    check_url,
    delete_port_mapping_arguments,
    encode_http_request,
    encode_msearch,
    encode_soap_request,
    parse_device_description,
    parse_external_ip,
    parse_http_response,
    parse_soap_response,
    parse_ssdp_response,
)

__all__ = [
    "GatewayRefused",
    "MalformedReply",
    "NoGateway",
    "PortMapConfig",
    "PortMapError",
    "PortMapping",
    "PortMappingKeeper",
    "default_gateway",
    "map_port",
    "parse_default_gateway",
    "renew",
    "unmap",
]

logger = logging.getLogger(__name__)

UPNP = "upnp"
# /proc/net follows the process's namespace; thread-self follows the calling thread's (setns).
ROUTE_TABLES = (Path("/proc/thread-self/net/route"), Path("/proc/net/route"))
RTF_UP = 0x1
RTF_GATEWAY = 0x2
INBOX_LIMIT = 64  # datagrams queued per socket; more are dropped (a flood cannot grow memory)
CLEANUP_TIMEOUT_S = 2.0


class PortMapConfig(BaseModel):
    """How port mapping is tried. Every limit is explicit; defaults suit a home LAN."""

    model_config = {"frozen": True}

    pcp: bool = Field(True, description="try PCP (RFC 6887) first")
    natpmp: bool = Field(True, description="NAT-PMP (RFC 6886): PCP's fallback, or alone")
    upnp: bool = Field(True, description="UPnP-IGD (SSDP + SOAP)")
    description: str = Field("lattica-ray", max_length=64, description="UPnP mapping label")
    ssdp_wait: float = Field(1.0, gt=0, description="seconds to wait for SSDP answers")
    ssdp_mx: int = Field(1, ge=1, le=5, description="MX of the M-SEARCH (answer spread, s)")
    ssdp_ttl: int = Field(1, ge=1, le=4, description="multicast TTL: 1 keeps it on the LAN")
    ssdp_address: tuple[str, int] = Field(SSDP_MULTICAST, description="where to search")
    upnp_gateway_only: bool = Field(
        True, description="use only an IGD at the default gateway's address"
    )
    upnp_port_attempts: int = Field(
        4, ge=1, le=32, description="external ports tried when the IGD reports a conflict"
    )
    max_http_response: int = Field(64 * 1024, ge=1024, description="bytes of an IGD answer")
    pmp_port: int = Field(SERVER_PORT, ge=1, le=65535, description="gateway's PCP/NAT-PMP port")
    initial_retransmit: float = Field(INITIAL_RETRANSMIT_S, gt=0, description="first resend, s")
    renew_fraction: float = Field(
        0.5, gt=0, lt=1, description="renew after this fraction of the lifetime"
    )
    min_renew_delay: float = Field(1.0, gt=0, description="never renew more often (s)")
    permanent_refresh: float = Field(
        1800.0, gt=0, description="re-add a permanent (lease 0) UPnP mapping this often (s)"
    )
    retry_interval: float = Field(
        300.0, gt=0, description="seconds between attempts while the gateway gives no mapping"
    )


@dataclass(frozen=True)
class PortMapping:
    """A port the gateway forwards to us: ``external_ip:external_port`` -> our ``internal_port``.

    ``lifetime`` is the granted lease in seconds (0: until removed, UPnP permanent leases);
    ``method`` is "pcp", "natpmp" or "upnp". The other fields let ``renew`` and ``unmap`` talk
    to the same gateway about the same mapping.
    """

    external_ip: str
    external_port: int
    internal_port: int
    protocol: str
    lifetime: int
    method: str
    gateway: str = ""  # the address we spoke to (PCP/NAT-PMP server, or the IGD)
    internal_ip: str = ""  # our LAN address the gateway forwards to
    nonce: bytes = field(default=b"", repr=False)  # PCP: the mapping's nonce
    control_url: str = ""  # UPnP: where SOAP actions go
    service_type: str = ""  # UPnP: WANIPConnection:1/2 or WANPPPConnection:1
    epoch: int | None = None  # PCP/NAT-PMP: the gateway's epoch (a drop means it rebooted)
    obtained_at: float = 0.0  # time.monotonic() when granted

    @property
    def expires_at(self) -> float | None:
        """time.monotonic() when the lease runs out (None: permanent)."""
        return self.obtained_at + self.lifetime if self.lifetime else None

    @property
    def endpoint(self) -> tuple[str, int]:
        return self.external_ip, self.external_port

    def multiaddr(self) -> Multiaddr:
        """The public address to advertise: ``/ip4/X/udp/P/quic-v1`` (UDP) or ``/ip4/X/tcp/P``."""
        if self.protocol == "udp":
            return Multiaddr.parse(f"/ip4/{self.external_ip}/udp/{self.external_port}/quic-v1")
        return Multiaddr.parse(f"/ip4/{self.external_ip}/tcp/{self.external_port}")

    def same_endpoint(self, other: PortMapping | None) -> bool:
        return other is not None and self.endpoint == other.endpoint


# ----------------------------------------------------------------------------- gateway


def parse_default_gateway(route_table: str) -> str | None:
    """The IPv4 default gateway in a ``/proc/net/route`` table (lowest metric), or None."""
    best: tuple[int, str] | None = None
    for line in route_table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        _iface, destination, gateway, flags, _refcnt, _use, metric, mask = fields[:8]
        try:
            if int(destination, 16) or int(mask, 16):
                continue
            if int(flags, 16) & (RTF_UP | RTF_GATEWAY) != RTF_UP | RTF_GATEWAY:
                continue
            address = ipaddress.IPv4Address(int(gateway, 16).to_bytes(4, "little"))
            rank = int(metric)
        except ValueError:
            continue
        if best is None or rank < best[0]:
            best = (rank, str(address))
    return best[1] if best else None


def default_gateway() -> str | None:
    """The default gateway of the calling thread's network namespace (None if there is none)."""
    for table in ROUTE_TABLES:
        try:
            return parse_default_gateway(table.read_text())
        except OSError:
            continue
    return None


# ----------------------------------------------------------------------------- UDP plumbing


class _Inbox(asyncio.DatagramProtocol):
    """Datagrams and socket errors (ICMP) of one socket, queued in arrival order."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]] | OSError] = asyncio.Queue(
            INBOX_LIMIT
        )

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait((data, addr))

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, OSError):
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(exc)

    async def get(self, deadline: float) -> tuple[bytes, tuple[str, int]] | OSError | None:
        """The next item, or None once ``deadline`` (loop time) passed."""
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            return None
        try:
            return await asyncio.wait_for(self.queue.get(), remaining)
        except TimeoutError:
            return None


# ----------------------------------------------------------------------------- PCP / NAT-PMP


async def _pmp_exchange(
    gateway: str,
    config: PortMapConfig,
    deadline: float,
    *,
    protocol: str,
    internal_port: int,
    lifetime: int,
    nonce: bytes,
    suggested_external_port: int = 0,
    suggested_external_ip: str | None = None,
    use_pcp: bool = True,
) -> PmpGrant:
    """Run one PmpExchange against ``gateway`` until it ends or ``deadline`` (loop time)."""
    loop = asyncio.get_running_loop()
    inbox = _Inbox()
    try:
        transport, _ = await loop.create_datagram_endpoint(
            lambda: inbox, remote_addr=(gateway, config.pmp_port)
        )
    except OSError as exc:
        raise NoGateway(f"cannot reach {gateway}:{config.pmp_port}: {exc}") from exc
    try:
        client_ip = transport.get_extra_info("sockname")[0]
        exchange = PmpExchange(
            protocol=protocol,
            internal_port=internal_port,
            lifetime=lifetime,
            client_ip=client_ip,
            nonce=nonce,
            now=loop.time(),
            suggested_external_port=suggested_external_port,
            suggested_external_ip=suggested_external_ip,
            use_pcp=use_pcp,
            natpmp_fallback=config.natpmp,
            initial_retransmit=config.initial_retransmit,
        )
        while not exchange.done:
            for datagram in exchange.datagrams_to_send(loop.time()):
                transport.sendto(datagram)
            timer = exchange.get_timer()
            item = await inbox.get(min(deadline, timer) if timer is not None else deadline)
            now = loop.time()
            if item is None:
                if now >= deadline:
                    break
                exchange.handle_timer(now)
            elif isinstance(item, OSError):
                logger.debug("PCP/NAT-PMP to %s: %s", gateway, item)
                exchange.receive_unreachable()
            else:
                exchange.receive_datagram(item[0], now)
    finally:
        transport.close()
    if exchange.grant is not None:
        return exchange.grant
    if exchange.error is not None:
        raise exchange.error
    ignored = (
        f"; {exchange.malformed} replies ignored, the last: {exchange.last_malformed}"
        if exchange.malformed
        else ""
    )
    raise NoGateway(f"no PCP/NAT-PMP answer from {gateway}:{config.pmp_port} in time{ignored}")


def _from_grant(grant: PmpGrant, gateway: str) -> PortMapping:
    return PortMapping(
        external_ip=grant.external_ip,
        external_port=grant.external_port,
        internal_port=grant.internal_port,
        protocol=grant.protocol,
        lifetime=grant.lifetime,
        method=str(grant.method),
        gateway=gateway,
        internal_ip=grant.internal_ip,
        nonce=grant.nonce,
        epoch=grant.epoch,
        obtained_at=time.monotonic(),
    )


async def _pmp_map(
    gateway: str,
    config: PortMapConfig,
    deadline: float,
    *,
    protocol: str,
    internal_port: int,
    lifetime: int,
    external_port: int,
    nonce: bytes | None = None,
    use_pcp: bool | None = None,
) -> PortMapping:
    grant = await _pmp_exchange(
        gateway,
        config,
        deadline,
        protocol=protocol,
        internal_port=internal_port,
        lifetime=lifetime,
        nonce=nonce or secrets.token_bytes(PCP_NONCE_SIZE),
        suggested_external_port=external_port,
        use_pcp=config.pcp if use_pcp is None else use_pcp,
    )
    return _from_grant(grant, gateway)


# ----------------------------------------------------------------------------- UPnP-IGD


@dataclass(frozen=True)
class _Igd:
    responder: str  # the IGD's LAN address (SSDP source, LOCATION host)
    service: IgdService
    local_ip: str  # our address on the way to it: NewInternalClient


async def _http(
    target: HttpTarget, request: bytes, config: PortMapConfig
) -> tuple[HttpResponse, str]:
    """Send one request, read the whole answer (size-capped); also our local address."""
    try:
        reader, writer = await asyncio.open_connection(target.host, target.port)
    except OSError as exc:
        raise PortMapError(f"upnp: cannot connect to {target.url}: {exc}") from exc
    try:
        local_ip = writer.get_extra_info("sockname")[0]
        writer.write(request)
        await writer.drain()
        data = b""
        while True:
            chunk = await reader.read(16 * 1024)
            data += chunk
            if len(data) > config.max_http_response:
                raise MalformedReply(
                    f"upnp: answer from {target.url} exceeds {config.max_http_response} bytes"
                )
            response = parse_http_response(data, at_eof=not chunk)
            if response is not None:
                return response, local_ip
    except (ConnectionError, OSError) as exc:
        raise PortMapError(f"upnp: HTTP exchange with {target.url} failed: {exc}") from exc
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _soap(
    igd: _Igd, action: str, arguments: list[tuple[str, str]], config: PortMapConfig
) -> dict[str, str]:
    request = encode_soap_request(igd.service, action, arguments, igd.responder)
    response, _ = await _http(check_url(igd.service.control_url, igd.responder), request, config)
    return parse_soap_response(response, action)


async def _upnp_discover(gateway: str | None, config: PortMapConfig, deadline: float) -> _Igd:
    """Search the LAN for an IGD and read its description (until ``deadline``/``ssdp_wait``)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, config.ssdp_ttl)
        sock.bind(("0.0.0.0", 0))
        inbox = _Inbox()
        transport, _ = await loop.create_datagram_endpoint(lambda: inbox, sock=sock)
    except OSError as exc:
        sock.close()
        raise NoGateway(f"upnp: cannot open an SSDP socket: {exc}") from exc
    problems: list[str] = []
    try:
        searches = [encode_msearch(target, config.ssdp_mx) for target in SEARCH_TARGETS]
        for search in searches:
            transport.sendto(search, config.ssdp_address)
        search_ends = min(deadline, loop.time() + config.ssdp_wait)
        resend_at: float | None = loop.time() + config.ssdp_wait / 4  # UDP may drop one
        while True:
            item = await inbox.get(min(search_ends, resend_at) if resend_at else search_ends)
            if item is None:
                if resend_at is not None and loop.time() < search_ends:
                    for search in searches:
                        transport.sendto(search, config.ssdp_address)
                    resend_at = None
                    continue
                break
            if isinstance(item, OSError):
                problems.append(f"SSDP socket: {item}")
                continue
            data, (responder, _port) = item
            if config.upnp_gateway_only and gateway is not None and responder != gateway:
                logger.debug("upnp: ignoring SSDP answer from %s (not the gateway)", responder)
                continue
            try:
                answer = parse_ssdp_response(data)
                location = check_url(answer.location, responder)
                async with asyncio.timeout_at(deadline):
                    response, local_ip = await _http(
                        location, encode_http_request("GET", location), config
                    )
                if response.status != 200:
                    raise PortMapError(f"upnp: {location.url} answered HTTP {response.status}")
                service = parse_device_description(response.body, location.url)
                check_url(service.control_url, responder)
            except PortMapError as exc:
                problems.append(str(exc))
                logger.debug("upnp: unusable SSDP answer from %s: %s", responder, exc)
                continue
            except TimeoutError:
                problems.append(f"{answer.location} did not answer in time")
                break
            return _Igd(responder, service, local_ip)
    finally:
        transport.close()
    detail = f" ({'; '.join(problems[-3:])})" if problems else ""
    raise NoGateway(f"upnp: no usable IGD answered SSDP in {config.ssdp_wait} s{detail}")


async def _upnp_add(
    igd: _Igd,
    config: PortMapConfig,
    *,
    protocol: str,
    internal_port: int,
    lifetime: int,
    external_port: int,
) -> tuple[int, int]:
    """AddPortMapping, trying other external ports on conflict; (external port, lease)."""
    port = external_port or internal_port
    lease = lifetime
    attempts = 0
    while True:
        arguments = add_port_mapping_arguments(
            external_port=port,
            protocol=protocol,
            internal_port=internal_port,
            internal_client=igd.local_ip,
            description=config.description,
            lease_duration=lease,
        )
        try:
            await _soap(igd, "AddPortMapping", arguments, config)
            return port, lease
        except GatewayRefused as exc:
            if exc.code == ONLY_PERMANENT_LEASES_SUPPORTED and lease:
                lease = 0  # the keeper re-adds it every permanent_refresh; unmap removes it
                continue
            attempts += 1
            if attempts >= config.upnp_port_attempts:
                raise
            if exc.code == SAME_PORT_VALUES_REQUIRED and port != internal_port:
                port = internal_port
            elif exc.code == CONFLICT_IN_MAPPING_ENTRY:
                port = 1024 + secrets.randbelow(65536 - 1024)
            else:
                raise


async def _upnp_map(
    gateway: str | None,
    config: PortMapConfig,
    deadline: float,
    *,
    protocol: str,
    internal_port: int,
    lifetime: int,
    external_port: int,
) -> PortMapping:
    igd = await _upnp_discover(gateway, config, deadline)
    try:
        async with asyncio.timeout_at(deadline):
            external_ip = parse_external_ip(await _soap(igd, "GetExternalIPAddress", [], config))
            port, lease = await _upnp_add(
                igd,
                config,
                protocol=protocol,
                internal_port=internal_port,
                lifetime=lifetime,
                external_port=external_port,
            )
    except TimeoutError:
        raise NoGateway(f"upnp: {igd.service.control_url} did not answer in time") from None
    return PortMapping(
        external_ip=external_ip,
        external_port=port,
        internal_port=internal_port,
        protocol=protocol,
        lifetime=lease,
        method=UPNP,
        gateway=igd.responder,
        internal_ip=igd.local_ip,
        control_url=igd.service.control_url,
        service_type=igd.service.service_type,
        obtained_at=time.monotonic(),
    )


def _igd_of(mapping: PortMapping) -> _Igd:
    service = IgdService(mapping.service_type, mapping.control_url)
    return _Igd(mapping.gateway, service, mapping.internal_ip)


# ----------------------------------------------------------------------------- public API

_cleanups: set[asyncio.Task[bool]] = set()


def _check_request(internal_port: int, protocol: str, lifetime: int, timeout: float) -> str:
    protocol = protocol.lower()
    if protocol not in ("udp", "tcp"):
        raise ValueError(f"protocol must be 'udp' or 'tcp', got {protocol!r}")
    if not 1 <= internal_port <= 65535:
        raise ValueError(f"internal_port must be within 1..65535, got {internal_port}")
    if not 1 <= lifetime <= 0xFFFF_FFFF:
        raise ValueError(f"lifetime must be at least 1 second, got {lifetime}")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    return protocol


async def map_port(
    internal_port: int,
    protocol: str = "udp",
    lifetime: int = 3600,
    gateway: str | None = None,
    timeout: float = 2.0,
    *,
    external_port: int = 0,
    config: PortMapConfig | None = None,
) -> PortMapping | None:
    """Ask the gateway to forward a public port to ``internal_port``; None if none will.

    PCP/NAT-PMP (to ``gateway``, default: the default route's) and UPnP-IGD run at once; the
    first grant wins and the other attempt is cancelled (or undone, if it also succeeded).
    ``external_port`` is a wish (default: the internal port). Never takes much longer than
    ``timeout``; the reasons for a None are logged at INFO.
    """
    protocol = _check_request(internal_port, protocol, lifetime, timeout)
    if not 0 <= external_port <= 65535:
        raise ValueError(f"external_port must be within 0..65535, got {external_port}")
    config = config or PortMapConfig()
    gateway = gateway or default_gateway()
    if gateway is None:
        logger.info("no port mapping for %s/%d: no default gateway", protocol, internal_port)
        return None
    loop = asyncio.get_running_loop()
    began = loop.time()
    deadline = began + timeout
    request = {
        "protocol": protocol,
        "internal_port": internal_port,
        "lifetime": lifetime,
        "external_port": external_port,
    }
    attempts: dict[asyncio.Task[PortMapping], str] = {}
    if config.pcp or config.natpmp:
        pmp = _pmp_map(gateway, config, deadline, **request)  # type: ignore[arg-type]
        label = "pcp/natpmp" if config.pcp and config.natpmp else "pcp" if config.pcp else "natpmp"
        attempts[asyncio.create_task(pmp)] = label
    if config.upnp:
        upnp = _upnp_map(gateway, config, deadline, **request)  # type: ignore[arg-type]
        attempts[asyncio.create_task(upnp)] = UPNP
    if not attempts:
        logger.info("no port mapping: every method is disabled in the config")
        return None
    winner: PortMapping | None = None
    failures: list[str] = []
    pending = set(attempts)
    try:
        while pending and winner is None:
            remaining = deadline - loop.time() + 0.25  # attempts end themselves at the deadline
            done, pending = await asyncio.wait(
                pending, timeout=max(0.0, remaining), return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                failures.append("timed out")
                break
            for task in done:
                if task.cancelled():
                    continue
                error = task.exception()
                if error is not None:
                    failures.append(f"{attempts[task]}: {error}")
                    if not isinstance(error, PortMapError):
                        logger.warning(
                            "%s attempt failed unexpectedly", attempts[task], exc_info=error
                        )
                elif winner is None:
                    winner = task.result()
                else:
                    _undo(task.result(), config)  # both granted at once: keep one
    finally:
        for task in pending:
            task.cancel()
        # A cancelled attempt whose request already left may leave a mapping on the gateway
        # until its lease ends (we never learn its port to remove it).
        await asyncio.gather(*pending, return_exceptions=True)
    if winner is None:
        logger.info(
            "no port mapping for %s/%d after %.2f s: %s",
            protocol,
            internal_port,
            loop.time() - began,
            "; ".join(failures) or "no answer",
        )
        return None
    logger.info(
        "port mapping %s:%d -> %s/%d by %s in %.0f ms (lease %d s)",
        winner.external_ip,
        winner.external_port,
        protocol,
        internal_port,
        winner.method,
        (loop.time() - began) * 1000,
        winner.lifetime,
    )
    return winner


def _undo(mapping: PortMapping, config: PortMapConfig) -> None:
    """Remove a mapping we will not use, in the background."""
    task = asyncio.create_task(unmap(mapping, timeout=CLEANUP_TIMEOUT_S, config=config))
    _cleanups.add(task)
    task.add_done_callback(_cleanups.discard)


async def renew(
    mapping: PortMapping,
    lifetime: int | None = None,
    timeout: float = 2.0,
    *,
    config: PortMapConfig | None = None,
) -> PortMapping:
    """Extend ``mapping`` at the same gateway by the same method; raises PortMapError.

    The gateway may move the mapping (another external port or address): the returned one is
    what holds now.
    """
    config = config or PortMapConfig()
    if lifetime is None:
        lifetime = mapping.lifetime or 3600
    _check_request(mapping.internal_port, mapping.protocol, lifetime, timeout)
    deadline = asyncio.get_running_loop().time() + timeout
    if mapping.method == UPNP:
        try:
            async with asyncio.timeout_at(deadline):
                port, lease = await _upnp_add(
                    _igd_of(mapping),
                    config,
                    protocol=mapping.protocol,
                    internal_port=mapping.internal_port,
                    lifetime=0 if mapping.lifetime == 0 else lifetime,  # permanent stays so
                    external_port=mapping.external_port,
                )
        except TimeoutError:
            raise NoGateway(f"upnp: {mapping.control_url} did not answer in {timeout} s") from None
        return replace(mapping, external_port=port, lifetime=lease, obtained_at=time.monotonic())
    renewed = await _pmp_map(
        mapping.gateway,
        config,
        deadline,
        protocol=mapping.protocol,
        internal_port=mapping.internal_port,
        lifetime=lifetime,
        external_port=mapping.external_port,
        nonce=mapping.nonce or None,
        use_pcp=mapping.method == Method.PCP,
    )
    if mapping.epoch is not None and renewed.epoch is not None and renewed.epoch < mapping.epoch:
        logger.info(
            "gateway %s restarted (epoch %d -> %d)", mapping.gateway, mapping.epoch, renewed.epoch
        )
    return renewed


async def unmap(
    mapping: PortMapping, timeout: float = 2.0, *, config: PortMapConfig | None = None
) -> bool:
    """Ask the gateway to remove ``mapping``; True if it confirmed. Failures are logged only:
    the lease runs out anyway."""
    config = config or PortMapConfig()
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        if mapping.method == UPNP:
            arguments = delete_port_mapping_arguments(
                external_port=mapping.external_port, protocol=mapping.protocol
            )
            async with asyncio.timeout_at(deadline):
                await _soap(_igd_of(mapping), "DeletePortMapping", arguments, config)
        else:
            await _pmp_exchange(
                mapping.gateway,
                config,
                deadline,
                protocol=mapping.protocol,
                internal_port=mapping.internal_port,
                lifetime=0,
                nonce=mapping.nonce or secrets.token_bytes(PCP_NONCE_SIZE),
                suggested_external_port=mapping.external_port,
                suggested_external_ip=mapping.external_ip or None,
                use_pcp=mapping.method == Method.PCP,
            )
    except GatewayRefused as exc:
        if exc.method == UPNP and exc.code == 714:  # NoSuchEntryInArray: already gone
            return True
        logger.info("could not remove port mapping %s:%d: %s", *mapping.endpoint, exc)
        return False
    except (PortMapError, TimeoutError) as exc:
        logger.info("could not remove port mapping %s:%d: %s", *mapping.endpoint, exc or "timeout")
        return False
    logger.debug("removed port mapping %s:%d (%s)", *mapping.endpoint, mapping.method)
    return True


class PortMappingKeeper:
    """Holds one port mapping for as long as it runs: map, renew, re-map, remove at stop.

    Renews after ``renew_fraction`` of the lease. A failed renewal keeps the mapping while its
    lease lasts (retrying at half the time left) and then reports it lost; while there is no
    mapping it tries again every ``retry_interval``. ``on_change`` gets the new mapping (or
    None) whenever the external endpoint appears, moves or disappears.
    """

    def __init__(
        self,
        internal_port: int,
        protocol: str = "udp",
        *,
        lifetime: int = 3600,
        gateway: str | None = None,
        timeout: float = 2.0,
        config: PortMapConfig | None = None,
        on_change: Callable[[PortMapping | None], None] | None = None,
    ) -> None:
        self.protocol = _check_request(internal_port, protocol, lifetime, timeout)
        self.internal_port = internal_port
        self.lifetime = lifetime
        self.gateway = gateway
        self.timeout = timeout
        self.config = config or PortMapConfig()
        self.on_change = on_change
        self.renewals = 0
        self._mapping: PortMapping | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def mapping(self) -> PortMapping | None:
        """The mapping that holds now (None: no port is forwarded to us)."""
        return self._mapping

    async def start(self) -> PortMapping | None:
        """Make the first attempt (at most ``timeout``), then keep the mapping in the background."""
        if self._task is not None:
            raise RuntimeError("PortMappingKeeper already started")
        self._set(await self._map())
        self._task = asyncio.create_task(self._run(), name=f"portmap-{self.internal_port}")
        return self._mapping

    async def stop(self) -> None:
        """Stop renewing and remove the mapping from the gateway."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        mapping, self._mapping = self._mapping, None
        if mapping is not None:
            await unmap(mapping, timeout=self.timeout, config=self.config)

    async def _map(self) -> PortMapping | None:
        return await map_port(
            self.internal_port,
            self.protocol,
            self.lifetime,
            self.gateway,
            self.timeout,
            external_port=self._mapping.external_port if self._mapping else 0,
            config=self.config,
        )

    def _set(self, mapping: PortMapping | None) -> None:
        before, self._mapping = self._mapping, mapping
        changed = (mapping is None) != (before is None) or (
            mapping is not None and not mapping.same_endpoint(before)
        )
        if changed and self.on_change is not None:
            try:
                self.on_change(mapping)
            except Exception:
                logger.exception("port mapping on_change callback failed")

    def _renew_delay(self, mapping: PortMapping) -> float:
        if not mapping.lifetime:
            return self.config.permanent_refresh
        due = mapping.obtained_at + mapping.lifetime * self.config.renew_fraction
        return max(self.config.min_renew_delay, due - time.monotonic())

    async def _run(self) -> None:
        delay = self._renew_delay(self._mapping) if self._mapping else self.config.retry_interval
        while True:
            await asyncio.sleep(delay)
            try:
                delay = await self._step()
            except Exception:  # a bug must not end the keeper silently; try again later
                logger.exception("port mapping keeper for port %d failed", self.internal_port)
                delay = self.config.retry_interval

    async def _step(self) -> float:
        """One renewal (or attempt to map); returns the delay until the next."""
        current = self._mapping
        if current is None:
            self._set(await self._map())
            return self._renew_delay(self._mapping) if self._mapping else self.config.retry_interval
        try:
            renewed: PortMapping | None = await renew(
                current, self.lifetime, self.timeout, config=self.config
            )
        except PortMapError as exc:
            logger.info("renewing port mapping %s:%d failed: %s", *current.endpoint, exc)
            renewed = await self._map()
        if renewed is not None:
            self.renewals += 1
            self._set(renewed)
            return self._renew_delay(renewed)
        expires = current.expires_at
        left = (expires - time.monotonic()) if expires is not None else 0.0
        if left <= self.config.min_renew_delay:
            logger.info("port mapping %s:%d lost", *current.endpoint)
            self._set(None)
            return self.config.retry_interval
        return max(self.config.min_renew_delay, left / 2)  # keep it while the lease lasts
