"""Multiaddrs: parse, format, and the binary form used inside identify and kad messages.

Only the protocols a lattica-ray node meets are supported (ip4, ip6, dns*, tcp, udp, quic,
quic-v1, p2p, p2p-circuit, ...). We keep this small codec instead of `py-multiaddr`, whose
dependency tree (trio, dnspython, psutil and more) is larger than the whole codec.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass

from transport.errors import InvalidMultiaddr, InvalidPeerId
from transport.identity import PeerId
from transport.varint import VarintError, decode_varint, encode_varint


@dataclass(frozen=True)
class _Proto:
    name: str
    code: int
    size: int  # bits of the value; 0 = no value; -1 = length-prefixed


# Codes from the multicodec table (https://github.com/multiformats/multicodec).
_PROTOCOLS = [
    _Proto("ip4", 0x04, 32),
    _Proto("tcp", 0x06, 16),
    _Proto("udp", 0x0111, 16),
    _Proto("ip6", 0x29, 128),
    _Proto("ip6zone", 0x2A, -1),
    _Proto("dns", 0x35, -1),
    _Proto("dns4", 0x36, -1),
    _Proto("dns6", 0x37, -1),
    _Proto("dnsaddr", 0x38, -1),
    _Proto("p2p-circuit", 0x0122, 0),
    _Proto("p2p", 0x01A5, -1),
    _Proto("quic", 0x01CC, 0),
    _Proto("quic-v1", 0x01CD, 0),
    _Proto("tls", 0x01C0, 0),
    _Proto("noise", 0x01C6, 0),
    _Proto("ws", 0x01DD, 0),
    _Proto("wss", 0x01DE, 0),
    _Proto("webtransport", 0x01D1, 0),
]
_BY_NAME = {proto.name: proto for proto in _PROTOCOLS}
_BY_CODE = {proto.code: proto for proto in _PROTOCOLS}
_BY_NAME["ipfs"] = _BY_NAME["p2p"]  # legacy alias, still seen in the wild

MAX_MULTIADDR_BYTES = 1024  # no real address is longer; bounds what a peer can make us parse


@dataclass(frozen=True)
class Multiaddr:
    """An immutable multiaddr: a tuple of (protocol name, value or None) components."""

    components: tuple[tuple[str, str | None], ...]

    @classmethod
    def parse(cls, text: str | Multiaddr) -> Multiaddr:
        if isinstance(text, Multiaddr):
            return text
        if not isinstance(text, str) or not text.startswith("/"):
            raise InvalidMultiaddr(f"a multiaddr starts with '/': {text!r}")
        parts = text.split("/")[1:]
        if parts and parts[-1] == "":
            parts.pop()
        components: list[tuple[str, str | None]] = []
        index = 0
        while index < len(parts):
            name = parts[index]
            proto = _BY_NAME.get(name)
            if proto is None:
                raise InvalidMultiaddr(f"unknown protocol {name!r} in multiaddr {text!r}")
            index += 1
            if proto.size == 0:
                components.append((proto.name, None))
                continue
            if index >= len(parts):
                raise InvalidMultiaddr(f"protocol {name!r} needs a value in {text!r}")
            value = _normalize(proto, parts[index], text)
            components.append((proto.name, value))
            index += 1
        return cls(tuple(components))

    @classmethod
    def from_bytes(cls, data: bytes) -> Multiaddr:
        if len(data) > MAX_MULTIADDR_BYTES:
            raise InvalidMultiaddr(f"binary multiaddr of {len(data)} bytes is too long")
        components: list[tuple[str, str | None]] = []
        offset = 0
        try:
            while offset < len(data):
                code, offset = decode_varint(data, offset)
                proto = _BY_CODE.get(code)
                if proto is None:
                    raise InvalidMultiaddr(f"unknown protocol code 0x{code:x} in binary multiaddr")
                if proto.size == 0:
                    components.append((proto.name, None))
                    continue
                if proto.size > 0:
                    length = proto.size // 8
                else:
                    length, offset = decode_varint(data, offset)
                raw = data[offset : offset + length]
                if len(raw) != length:
                    raise InvalidMultiaddr("binary multiaddr is truncated")
                offset += length
                components.append((proto.name, _value_from_bytes(proto, raw)))
        except VarintError as exc:
            raise InvalidMultiaddr(f"malformed varint in binary multiaddr: {exc}") from exc
        return cls(tuple(components))

    def to_bytes(self) -> bytes:
        out = bytearray()
        for name, value in self.components:
            proto = _BY_NAME[name]
            out += encode_varint(proto.code)
            if proto.size == 0:
                continue
            raw = _value_to_bytes(proto, value or "")
            if proto.size < 0:
                out += encode_varint(len(raw))
            out += raw
        return bytes(out)

    def __str__(self) -> str:
        return "".join(f"/{n}" if v is None else f"/{n}/{v}" for n, v in self.components)

    def __repr__(self) -> str:
        return f"Multiaddr({str(self)!r})"

    def __iter__(self) -> Iterator[tuple[str, str | None]]:
        return iter(self.components)

    def __truediv__(self, other: str | Multiaddr) -> Multiaddr:
        return Multiaddr(self.components + Multiaddr.parse(other).components)

    def value_for(self, name: str) -> str | None:
        """The value of the first component called `name`, or None if absent."""
        for component, value in self.components:
            if component == name:
                return value
        return None

    def has(self, name: str) -> bool:
        return any(component == name for component, _ in self.components)

    @property
    def peer_id(self) -> PeerId | None:
        """The peer ID in the last `/p2p/` component, if any."""
        for name, value in reversed(self.components):
            if name == "p2p" and value is not None:
                return PeerId.from_string(value)
        return None

    def with_peer_id(self, peer_id: PeerId) -> Multiaddr:
        """This address ending in `/p2p/<peer_id>` (replacing a trailing one)."""
        base = self.without_peer_id()
        return Multiaddr((*base.components, ("p2p", peer_id.to_string())))

    def without_peer_id(self) -> Multiaddr:
        components = self.components
        if components and components[-1][0] == "p2p":
            components = components[:-1]
        return Multiaddr(components)

    @property
    def is_relayed(self) -> bool:
        return self.has("p2p-circuit")


def _normalize(proto: _Proto, value: str, text: str) -> str:
    """Validate a text value and return its canonical form."""
    try:
        return _value_from_bytes(proto, _value_to_bytes(proto, value))
    except (ValueError, InvalidPeerId) as exc:
        raise InvalidMultiaddr(f"bad value {value!r} for /{proto.name} in {text!r}: {exc}") from exc


def _value_to_bytes(proto: _Proto, value: str) -> bytes:
    if proto.name == "ip4":
        return ipaddress.IPv4Address(value).packed
    if proto.name == "ip6":
        return ipaddress.IPv6Address(value).packed
    if proto.name in ("tcp", "udp"):
        port = int(value)
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} out of range")
        return port.to_bytes(2, "big")
    if proto.name == "p2p":
        return PeerId.from_string(value).multihash
    return value.encode("utf-8")


def _value_from_bytes(proto: _Proto, raw: bytes) -> str:
    try:
        if proto.name == "ip4":
            return str(ipaddress.IPv4Address(raw))
        if proto.name == "ip6":
            return str(ipaddress.IPv6Address(raw))
        if proto.name in ("tcp", "udp"):
            return str(int.from_bytes(raw, "big"))
        if proto.name == "p2p":
            return PeerId.from_bytes(raw).to_string()
        return raw.decode("utf-8")
    except (ValueError, InvalidPeerId) as exc:
        raise InvalidMultiaddr(f"bad /{proto.name} value in binary multiaddr: {exc}") from exc


def quic_multiaddr(host: str, port: int, peer_id: PeerId | None = None) -> Multiaddr:
    """`/ip4|ip6/<host>/udp/<port>/quic-v1[/p2p/<id>]` for a socket address."""
    family = "ip6" if ":" in host else "ip4"
    address = Multiaddr.parse(f"/{family}/{host}/udp/{port}/quic-v1")
    return address.with_peer_id(peer_id) if peer_id is not None else address


def quic_socket_address(address: Multiaddr) -> tuple[str, int]:
    """The (host, port) a QUIC multiaddr points at; raises if it is not a direct QUIC address."""
    components = address.without_peer_id().components
    if (
        len(components) != 3
        or components[0][0] not in ("ip4", "ip6")
        or components[1][0] != "udp"
        or components[2][0] != "quic-v1"
    ):
        raise InvalidMultiaddr(
            f"{address} is not a direct QUIC address (/ip4|ip6/HOST/udp/PORT/quic-v1[/p2p/ID])"
        )
    return str(components[0][1]), int(components[1][1] or 0)
