"""NAT-PMP (RFC 6886) and PCP MAP (RFC 6887) port mapping, sans-I/O.

Both run over UDP to the default gateway's port 5351. :class:`PmpExchange` maps, renews or
deletes one port: it speaks PCP first and falls back to NAT-PMP when the gateway answers in
NAT-PMP's format or says it does not speak PCP's version. It takes datagrams and the time in and
gives datagrams and a timer out; the asyncio glue in :mod:`transport.nat.portmap` moves them.

Retransmissions start at 250 ms and double (RFC 6886 section 3.1). PCP's own schedule (RFC 6887
section 8.1.1: 3 s first) is far too slow for a LAN gateway and a 2 s budget, so PCP uses the
NAT-PMP schedule too; the caller bounds the whole exchange with its timeout.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import struct
from dataclasses import dataclass

from transport.nat.portmap_errors import GatewayRefused, MalformedReply, NoGateway, PortMapError

logger = logging.getLogger(__name__)

SERVER_PORT = 5351  # RFC 6886 section 3.1, RFC 6887 section 19.1
NATPMP_VERSION = 0  # RFC 6886
PCP_VERSION = 2  # RFC 6887
INITIAL_RETRANSMIT_S = 0.25  # RFC 6886 section 3.1
MAX_RETRANSMIT_S = 64.0  # RFC 6886 section 3.1 (its last interval)
PCP_MAX_MESSAGE = 1100  # RFC 6887 section 7
PCP_HEADER_SIZE = 24
PCP_MAP_SIZE = 36
PCP_NONCE_SIZE = 12
PCP_RESPONSE_BIT = 0x80
PCP_OPCODE_MAP = 1  # RFC 6887 section 19.2
NATPMP_OP_EXTERNAL_ADDRESS = 0
NATPMP_OP_MAP_UDP = 1
NATPMP_OP_MAP_TCP = 2
NATPMP_RESPONSE_OFFSET = 128  # a response's op is 128 + the request's

IANA_PROTOCOL = {"udp": 17, "tcp": 6}
NATPMP_MAP_OP = {"udp": NATPMP_OP_MAP_UDP, "tcp": NATPMP_OP_MAP_TCP}


class Method(enum.StrEnum):
    """Which protocol made a mapping."""

    PCP = "pcp"
    NATPMP = "natpmp"


class NatPmpResult(enum.IntEnum):
    """NAT-PMP result codes (RFC 6886 section 3.5)."""

    SUCCESS = 0
    UNSUPPORTED_VERSION = 1
    NOT_AUTHORIZED = 2
    NETWORK_FAILURE = 3
    OUT_OF_RESOURCES = 4
    UNSUPPORTED_OPCODE = 5


class PcpResult(enum.IntEnum):
    """PCP result codes (RFC 6887 section 7.4)."""

    SUCCESS = 0
    UNSUPP_VERSION = 1
    NOT_AUTHORIZED = 2
    MALFORMED_REQUEST = 3
    UNSUPP_OPCODE = 4
    UNSUPP_OPTION = 5
    MALFORMED_OPTION = 6
    NETWORK_FAILURE = 7
    NO_RESOURCES = 8
    UNSUPP_PROTOCOL = 9
    USER_EX_QUOTA = 10
    CANNOT_PROVIDE_EXTERNAL = 11
    ADDRESS_MISMATCH = 12
    EXCESSIVE_REMOTE_PEERS = 13


def _code_name(enum_type: type[enum.IntEnum], code: int) -> str:
    try:
        return enum_type(code).name
    except ValueError:
        return "UNKNOWN_RESULT"


def _check_protocol(protocol: str) -> str:
    protocol = protocol.lower()
    if protocol not in IANA_PROTOCOL:
        raise ValueError(f"protocol must be 'udp' or 'tcp', got {protocol!r}")
    return protocol


def _check_port(port: int, what: str, *, zero_ok: bool = False) -> None:
    if not (0 if zero_ok else 1) <= port <= 0xFFFF:
        raise ValueError(f"{what} must be a port number, got {port}")


def _check_lifetime(lifetime: int) -> None:
    if not 0 <= lifetime <= 0xFFFF_FFFF:
        raise ValueError(f"lifetime must be within 0..2^32-1 seconds, got {lifetime}")


# ----------------------------------------------------------------------------- NAT-PMP messages


@dataclass(frozen=True)
class NatPmpExternalAddress:
    """Answer to NAT-PMP opcode 0: the gateway's external IPv4 address."""

    epoch: int  # seconds since the gateway's mappings were last reset
    external_ip: str


@dataclass(frozen=True)
class NatPmpMapping:
    """Answer to a NAT-PMP map request (opcode 1 UDP, 2 TCP)."""

    protocol: str
    epoch: int
    internal_port: int
    external_port: int
    lifetime: int


def encode_natpmp_external_address_request() -> bytes:
    return struct.pack("!BB", NATPMP_VERSION, NATPMP_OP_EXTERNAL_ADDRESS)


def encode_natpmp_map_request(
    protocol: str, internal_port: int, suggested_external_port: int, lifetime: int
) -> bytes:
    """A map request; ``lifetime`` 0 deletes (RFC 6886 section 3.4: external port 0 then)."""
    protocol = _check_protocol(protocol)
    _check_port(internal_port, "internal port")
    _check_port(suggested_external_port, "suggested external port", zero_ok=True)
    _check_lifetime(lifetime)
    return struct.pack(
        "!BBHHHI",
        NATPMP_VERSION,
        NATPMP_MAP_OP[protocol],
        0,
        internal_port,
        suggested_external_port if lifetime else 0,
        lifetime,
    )


def decode_natpmp_response(data: bytes) -> NatPmpExternalAddress | NatPmpMapping:
    """Parse a NAT-PMP response; a non-zero result code raises GatewayRefused."""
    if len(data) < 8:
        raise MalformedReply(f"NAT-PMP response of {len(data)} bytes, at least 8 expected")
    version, op, result, epoch = struct.unpack_from("!BBHI", data)
    if version != NATPMP_VERSION:
        raise MalformedReply(f"NAT-PMP response with version {version}, expected 0")
    if op < NATPMP_RESPONSE_OFFSET:
        raise MalformedReply(f"NAT-PMP message with op {op} is a request, not a response")
    request_op = op - NATPMP_RESPONSE_OFFSET
    if result != NatPmpResult.SUCCESS:
        raise GatewayRefused(
            Method.NATPMP, result, _code_name(NatPmpResult, result), f"to opcode {request_op}"
        )
    if request_op == NATPMP_OP_EXTERNAL_ADDRESS:
        if len(data) != 12:
            raise MalformedReply(f"NAT-PMP external address response of {len(data)} bytes, not 12")
        return NatPmpExternalAddress(epoch, str(ipaddress.IPv4Address(data[8:12])))
    if request_op in (NATPMP_OP_MAP_UDP, NATPMP_OP_MAP_TCP):
        if len(data) != 16:
            raise MalformedReply(f"NAT-PMP map response of {len(data)} bytes, not 16")
        internal, external, lifetime = struct.unpack_from("!HHI", data, 8)
        protocol = "udp" if request_op == NATPMP_OP_MAP_UDP else "tcp"
        return NatPmpMapping(protocol, epoch, internal, external, lifetime)
    raise MalformedReply(f"NAT-PMP response to unknown opcode {request_op}")


# ----------------------------------------------------------------------------- PCP messages


def _ipv6_form(address: str | None) -> bytes:
    """PCP carries addresses in 16 bytes; IPv4 as IPv4-mapped IPv6 (RFC 6887 section 5)."""
    if address is None:
        return ipaddress.IPv6Address("::ffff:0.0.0.0").packed  # "no preference", IPv4
    parsed = ipaddress.ip_address(address)
    if isinstance(parsed, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(f"::ffff:{parsed}").packed
    return parsed.packed


def _from_ipv6_form(packed: bytes) -> str:
    address = ipaddress.IPv6Address(packed)
    mapped = address.ipv4_mapped
    return str(mapped) if mapped is not None else str(address)


@dataclass(frozen=True)
class PcpMapRequest:
    """A PCP MAP request (RFC 6887 sections 7.1 and 11.1); lifetime 0 deletes."""

    nonce: bytes
    protocol: str
    internal_port: int
    lifetime: int
    client_ip: str  # our address as the gateway sees it (the socket's local address)
    suggested_external_port: int = 0
    suggested_external_ip: str | None = None

    def encode(self) -> bytes:
        protocol = _check_protocol(self.protocol)
        if len(self.nonce) != PCP_NONCE_SIZE:
            raise ValueError(f"PCP nonce must be {PCP_NONCE_SIZE} bytes, got {len(self.nonce)}")
        _check_port(self.internal_port, "internal port")
        _check_port(self.suggested_external_port, "suggested external port", zero_ok=True)
        _check_lifetime(self.lifetime)
        header = struct.pack("!BBHI", PCP_VERSION, PCP_OPCODE_MAP, 0, self.lifetime)
        header += _ipv6_form(self.client_ip)
        body = self.nonce + struct.pack(
            "!B3xHH", IANA_PROTOCOL[protocol], self.internal_port, self.suggested_external_port
        )
        body += _ipv6_form(self.suggested_external_ip)
        return header + body


@dataclass(frozen=True)
class PcpMapResponse:
    """A PCP MAP response (successful or not: check ``result``)."""

    result: int
    lifetime: int  # granted seconds; for errors, how long the error holds
    epoch: int
    nonce: bytes
    protocol_number: int
    internal_port: int
    external_port: int
    external_ip: str


def decode_pcp_response(data: bytes) -> PcpMapResponse:
    """Parse a PCP MAP response (options after it are ignored; they only inform)."""
    if len(data) < PCP_HEADER_SIZE:
        raise MalformedReply(f"PCP response of {len(data)} bytes, at least 24 expected")
    if len(data) > PCP_MAX_MESSAGE or len(data) % 4:
        raise MalformedReply(f"PCP response of {len(data)} bytes (max 1100, a multiple of 4)")
    version, r_opcode, _reserved, result, lifetime, epoch = struct.unpack_from("!BBBBII", data)
    if version != PCP_VERSION:
        raise MalformedReply(f"PCP response with version {version}, expected {PCP_VERSION}")
    if not r_opcode & PCP_RESPONSE_BIT:
        raise MalformedReply("PCP message without the response bit (a request, not a reply)")
    opcode = r_opcode & ~PCP_RESPONSE_BIT
    if opcode != PCP_OPCODE_MAP:
        raise MalformedReply(f"PCP response to opcode {opcode}, not MAP")
    if len(data) < PCP_HEADER_SIZE + PCP_MAP_SIZE:
        if result != PcpResult.SUCCESS:  # an error may come without the MAP payload
            return PcpMapResponse(result, lifetime, epoch, b"", 0, 0, 0, "")
        raise MalformedReply(f"PCP MAP response of {len(data)} bytes, at least 60 expected")
    body = PCP_HEADER_SIZE
    nonce = data[body : body + PCP_NONCE_SIZE]
    protocol, internal, external = struct.unpack_from("!B3xHH", data, body + PCP_NONCE_SIZE)
    external_ip = _from_ipv6_form(data[body + 20 : body + 36])
    return PcpMapResponse(result, lifetime, epoch, nonce, protocol, internal, external, external_ip)


# ----------------------------------------------------------------------------- the exchange


@dataclass(frozen=True)
class PmpGrant:
    """What the gateway granted (for a delete: lifetime 0)."""

    method: Method
    external_ip: str
    external_port: int
    internal_port: int
    protocol: str
    lifetime: int
    epoch: int
    nonce: bytes  # PCP: renew and delete with the same nonce; NAT-PMP: b""
    internal_ip: str  # the client address the gateway forwards to


class _State(enum.Enum):
    PCP = "pcp"
    NATPMP = "natpmp"
    DONE = "done"


class PmpExchange:
    """Map, renew or delete one port over PCP, falling back to NAT-PMP (sans-I/O).

    Feed it ``receive_datagram`` (every datagram from the gateway), ``receive_unreachable`` (the
    gateway sent ICMP port unreachable: nothing listens) and ``handle_timer`` (when
    ``get_timer()`` is due); send what ``datagrams_to_send`` returns. When ``done``, ``grant`` or
    ``error`` holds the outcome. Replies that do not parse or do not match the request are
    counted and logged, never fatal: a stray or forged datagram cannot end the exchange.
    """

    def __init__(
        self,
        *,
        protocol: str,
        internal_port: int,
        lifetime: int,
        client_ip: str,
        nonce: bytes,
        now: float,
        suggested_external_port: int = 0,
        suggested_external_ip: str | None = None,
        use_pcp: bool = True,
        natpmp_fallback: bool = True,
        initial_retransmit: float = INITIAL_RETRANSMIT_S,
    ) -> None:
        self.protocol = _check_protocol(protocol)
        _check_port(internal_port, "internal port")
        _check_port(suggested_external_port, "suggested external port", zero_ok=True)
        _check_lifetime(lifetime)
        if initial_retransmit <= 0:
            raise ValueError(f"initial_retransmit must be positive, got {initial_retransmit}")
        self.internal_port = internal_port
        self.lifetime = lifetime
        self.client_ip = client_ip
        self.nonce = nonce
        self.suggested_external_port = suggested_external_port
        self.suggested_external_ip = suggested_external_ip
        self._initial_retransmit = initial_retransmit
        self._natpmp_fallback = natpmp_fallback
        self.grant: PmpGrant | None = None
        self.error: PortMapError | None = None
        self.malformed = 0
        self.last_malformed: str | None = None
        self._external_address: NatPmpExternalAddress | None = None
        self._natpmp_mapping: NatPmpMapping | None = None
        self._outbox: list[bytes] = []
        self._next_send: float | None = None
        self._retransmit = initial_retransmit
        self._state = _State.PCP if use_pcp else _State.NATPMP
        self._start(now)

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    @property
    def method(self) -> Method | None:
        if self._state is _State.PCP:
            return Method.PCP
        if self._state is _State.NATPMP:
            return Method.NATPMP
        return self.grant.method if self.grant else None

    @property
    def deleting(self) -> bool:
        return self.lifetime == 0

    # ---------------------------------------------------------------- outputs

    def datagrams_to_send(self, now: float) -> list[bytes]:
        """Requests due now (the first send, or a retransmission)."""
        if self.done or self._next_send is None or now < self._next_send:
            return []
        self._next_send = now + self._retransmit
        self._retransmit = min(self._retransmit * 2, MAX_RETRANSMIT_S)
        return list(self._outbox)

    def get_timer(self) -> float | None:
        """When to call ``handle_timer`` (None: done)."""
        return None if self.done else self._next_send

    def handle_timer(self, now: float) -> None:
        """Time passed; nothing to do but let ``datagrams_to_send`` retransmit."""

    # ---------------------------------------------------------------- inputs

    def receive_unreachable(self) -> None:
        """ICMP port unreachable from the gateway: it runs neither PCP nor NAT-PMP."""
        if not self.done:
            self._fail(NoGateway("nothing listens for PCP/NAT-PMP at the gateway (port 5351)"))

    def receive_datagram(self, data: bytes, now: float) -> None:
        if self.done:
            return
        try:
            if data[:1] == bytes([NATPMP_VERSION]):
                self._receive_natpmp(data, now)
            elif self._state is _State.PCP:
                self._receive_pcp(data, now)
            else:
                raise MalformedReply(
                    f"PCP-format reply (version {data[0] if data else None}) after the gateway "
                    "said it speaks only NAT-PMP"
                )
        except MalformedReply as exc:
            self.malformed += 1
            self.last_malformed = str(exc)
            logger.debug("ignoring reply from the gateway: %s", exc)

    # ---------------------------------------------------------------- internals

    def _start(self, now: float) -> None:
        if self._state is _State.PCP:
            request = PcpMapRequest(
                nonce=self.nonce,
                protocol=self.protocol,
                internal_port=self.internal_port,
                lifetime=self.lifetime,
                client_ip=self.client_ip,
                suggested_external_port=self.suggested_external_port,
                suggested_external_ip=self.suggested_external_ip,
            )
            self._outbox = [request.encode()]
        else:
            self._outbox = [
                encode_natpmp_map_request(
                    self.protocol, self.internal_port, self.suggested_external_port, self.lifetime
                )
            ]
            if not self.deleting:
                self._outbox.insert(0, encode_natpmp_external_address_request())
        self._retransmit = self._initial_retransmit
        self._next_send = now

    def _receive_pcp(self, data: bytes, now: float) -> None:
        response = decode_pcp_response(data)
        if response.result == PcpResult.UNSUPP_VERSION:
            self._fall_back(now, "gateway does not speak PCP version 2")
            return
        if response.nonce and response.nonce != self.nonce:
            raise MalformedReply("PCP response with a nonce that is not ours")
        if response.result != PcpResult.SUCCESS:
            name = _code_name(PcpResult, response.result)
            self._fail(GatewayRefused(Method.PCP, response.result, name))
            return
        if (
            response.protocol_number != IANA_PROTOCOL[self.protocol]
            or response.internal_port != self.internal_port
        ):
            raise MalformedReply(
                f"PCP response for protocol {response.protocol_number} port "
                f"{response.internal_port}, not {self.protocol} port {self.internal_port}"
            )
        if not self.deleting and not 1 <= response.external_port <= 0xFFFF:
            raise MalformedReply(f"PCP response grants external port {response.external_port}")
        self._finish(
            PmpGrant(
                Method.PCP,
                response.external_ip,
                response.external_port,
                self.internal_port,
                self.protocol,
                response.lifetime,
                response.epoch,
                self.nonce,
                self.client_ip,
            )
        )

    def _receive_natpmp(self, data: bytes, now: float) -> None:
        if self._state is _State.PCP:
            # A NAT-PMP-only gateway answers a PCP request in NAT-PMP's format (RFC 6887 9).
            try:
                decode_natpmp_response(data)
            except GatewayRefused as exc:
                if exc.code != NatPmpResult.UNSUPPORTED_VERSION:
                    raise MalformedReply(f"NAT-PMP answer to a PCP request: {exc}") from exc
            else:
                raise MalformedReply("NAT-PMP success answering a PCP request")
            self._fall_back(now, "gateway speaks NAT-PMP, not PCP")
            return
        try:
            message = decode_natpmp_response(data)
        except GatewayRefused as exc:
            self._fail(exc)
            return
        if isinstance(message, NatPmpExternalAddress):
            if not self.deleting:
                self._external_address = message
        else:
            if message.protocol != self.protocol or message.internal_port != self.internal_port:
                raise MalformedReply(
                    f"NAT-PMP mapping for {message.protocol} port {message.internal_port}, "
                    f"not {self.protocol} port {self.internal_port}"
                )
            if not self.deleting and not 1 <= message.external_port <= 0xFFFF:
                raise MalformedReply(
                    f"NAT-PMP mapping grants external port {message.external_port}"
                )
            self._natpmp_mapping = message
        mapping = self._natpmp_mapping
        if mapping is None or (self._external_address is None and not self.deleting):
            self._outbox = [request for request in self._outbox if self._outstanding(request)]
            return
        external_ip = self._external_address.external_ip if self._external_address else ""
        self._finish(
            PmpGrant(
                Method.NATPMP,
                external_ip,
                mapping.external_port,
                self.internal_port,
                self.protocol,
                mapping.lifetime,
                mapping.epoch,
                b"",
                self.client_ip,
            )
        )

    def _fall_back(self, now: float, why: str) -> None:
        if not self._natpmp_fallback:
            self._fail(GatewayRefused(Method.PCP, PcpResult.UNSUPP_VERSION, "UNSUPP_VERSION", why))
            return
        logger.debug("%s; trying NAT-PMP", why)
        self._state = _State.NATPMP
        self._start(now)

    def _outstanding(self, natpmp_request: bytes) -> bool:
        if natpmp_request[1] == NATPMP_OP_EXTERNAL_ADDRESS:
            return self._external_address is None
        return self._natpmp_mapping is None

    def _finish(self, grant: PmpGrant) -> None:
        if (
            not self.deleting
            and ipaddress.ip_address(grant.external_ip or "0.0.0.0").is_unspecified
        ):
            self._fail(
                PortMapError(
                    f"{grant.method} gateway granted port {grant.external_port} but has no "
                    "external address (0.0.0.0): it is not connected upstream"
                )
            )
            return
        self.grant = grant
        self._state = _State.DONE
        self._outbox = []

    def _fail(self, error: PortMapError) -> None:
        self.error = error
        self._state = _State.DONE
        self._outbox = []
