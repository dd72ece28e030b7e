"""Errors of port mapping (UPnP-IGD, NAT-PMP, PCP): one family under TransportError."""

from __future__ import annotations

from transport.errors import TransportError


class PortMapError(TransportError):
    """A port mapping could not be made, renewed or removed; the message says where and why."""


class MalformedReply(PortMapError, ValueError):
    """A gateway's answer did not parse (wrong size, version, field, XML or HTTP framing)."""


class GatewayRefused(PortMapError):
    """The gateway understood the request and said no, with a result or fault code.

    ``method`` is "pcp", "natpmp" or "upnp"; ``code`` is the protocol's own number (a PCP or
    NAT-PMP result code, a UPnP errorCode).
    """

    def __init__(self, method: str, code: int, name: str, detail: str = "") -> None:
        text = f"{method} gateway refused: {name} ({code})"
        super().__init__(f"{text}: {detail}" if detail else text)
        self.method = method
        self.code = code
        self.name = name


class NoGateway(PortMapError):
    """Nothing that speaks the protocol answered in time (or the gateway said nobody listens)."""
