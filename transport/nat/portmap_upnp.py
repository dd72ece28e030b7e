"""UPnP Internet Gateway Device port mapping, sans-I/O: SSDP search, HTTP, device XML, SOAP.

The flow (UPnP Device Architecture 1.1; IGD WANIPConnection:1 and :2, WANPPPConnection:1):
an SSDP ``M-SEARCH`` to 239.255.255.250:1900 on the LAN; the gateway answers with a ``LOCATION``
URL; its device description names the connection service's ``controlURL``; SOAP actions
``GetExternalIPAddress``, ``AddPortMapping`` and ``DeletePortMapping`` are POSTed there.

Everything here turns bytes into values and back, and raises :class:`MalformedReply` (bad
framing, XML or fields) or :class:`GatewayRefused` (a UPnP fault, with its errorCode). The
asyncio glue in :mod:`transport.nat.portmap` does the I/O.

Only the device that answered the search is ever contacted: a ``LOCATION`` or ``controlURL``
naming any other host (or a name to resolve) is refused, so a LAN reply cannot make us send
requests elsewhere.
"""

from __future__ import annotations

import ipaddress
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit
from xml.sax.saxutils import escape

from transport.nat.portmap_errors import GatewayRefused, MalformedReply

SSDP_MULTICAST = ("239.255.255.250", 1900)  # UDA 1.1 section 1
SSDP_MAX_DATAGRAM = 4096
IGD_DEVICE = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
WAN_IP_CONNECTION_2 = "urn:schemas-upnp-org:service:WANIPConnection:2"
WAN_IP_CONNECTION_1 = "urn:schemas-upnp-org:service:WANIPConnection:1"
WAN_PPP_CONNECTION_1 = "urn:schemas-upnp-org:service:WANPPPConnection:1"
# Best first; an IGD:2 answers for :1 services too (UDA: devices answer lower versions).
CONNECTION_SERVICES = (WAN_IP_CONNECTION_2, WAN_IP_CONNECTION_1, WAN_PPP_CONNECTION_1)
SEARCH_TARGETS = (IGD_DEVICE, WAN_IP_CONNECTION_1)
SOAP_ENVELOPE_NS = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP_ENCODING = "http://schemas.xmlsoap.org/soap/encoding/"
HTTP_MAX_HEAD = 16 * 1024

# IGD WANIPConnection errorCodes worth a name (WANIPConnection:2 spec, section 2.4.16).
UPNP_ERRORS = {
    401: "InvalidAction",
    402: "InvalidArgs",
    501: "ActionFailed",
    606: "ActionNotAuthorized",
    714: "NoSuchEntryInArray",
    715: "WildCardNotPermittedInSrcIP",
    716: "WildCardNotPermittedInExtPort",
    718: "ConflictInMappingEntry",
    724: "SamePortValuesRequired",
    725: "OnlyPermanentLeasesSupported",
    726: "RemoteHostOnlySupportsWildcard",
    727: "ExternalPortOnlySupportsWildcard",
    728: "NoPortMapsAvailable",
    729: "ConflictWithOtherMechanisms",
}
CONFLICT_IN_MAPPING_ENTRY = 718
ONLY_PERMANENT_LEASES_SUPPORTED = 725
SAME_PORT_VALUES_REQUIRED = 724


# ----------------------------------------------------------------------------- SSDP


def encode_msearch(search_target: str, mx: int = 1) -> bytes:
    """An SSDP search request (sent to the multicast group, answered by unicast)."""
    if not 1 <= mx <= 5:
        raise ValueError(f"MX must be within 1..5 seconds (UDA 1.1), got {mx}")
    host, port = SSDP_MULTICAST
    return (
        "M-SEARCH * HTTP/1.1\r\n"
        f"HOST: {host}:{port}\r\n"
        'MAN: "ssdp:discover"\r\n'
        f"MX: {mx}\r\n"
        f"ST: {search_target}\r\n"
        "\r\n"
    ).encode("ascii")


@dataclass(frozen=True)
class SsdpResponse:
    location: str
    search_target: str
    server: str = ""
    usn: str = ""


def _split_head(head: bytes, what: str) -> tuple[str, dict[str, str]]:
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError as exc:  # latin-1 decodes anything; kept for clarity
        raise MalformedReply(f"{what} head is not text") from exc
    lines = text.split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise MalformedReply(f"{what} header line without a name: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers


def parse_ssdp_response(data: bytes) -> SsdpResponse:
    """Parse a unicast answer to M-SEARCH (``HTTP/1.1 200 OK`` with LOCATION and ST)."""
    if len(data) > SSDP_MAX_DATAGRAM:
        raise MalformedReply(f"SSDP answer of {len(data)} bytes (at most {SSDP_MAX_DATAGRAM})")
    head = data.split(b"\r\n\r\n", 1)[0]
    status, headers = _split_head(head, "SSDP answer")
    parts = status.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or parts[1] != "200":
        raise MalformedReply(f"SSDP answer is not 'HTTP/1.x 200': {status[:80]!r}")
    location = headers.get("location")
    if not location:
        raise MalformedReply("SSDP answer without LOCATION")
    return SsdpResponse(
        location, headers.get("st", ""), headers.get("server", ""), headers.get("usn", "")
    )


@dataclass(frozen=True)
class HttpTarget:
    """Where to send an HTTP request: a literal IPv4 address, a port and a path."""

    host: str
    port: int
    path: str

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"


def check_url(url: str, responder: str) -> HttpTarget:
    """Split an http URL that must point at ``responder`` (the device that answered SSDP)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise MalformedReply(f"URL {url[:100]!r} does not parse") from None
    if parts.scheme != "http":
        raise MalformedReply(f"URL {url!r} is not http://")
    host = parts.hostname or ""
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        raise MalformedReply(f"URL {url!r} does not name an IPv4 address") from None
    if str(address) != responder:
        raise MalformedReply(
            f"URL {url!r} points at {address}, not at the gateway that answered ({responder})"
        )
    try:
        port = parts.port or 80
    except ValueError:
        raise MalformedReply(f"URL {url!r} has an invalid port") from None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return HttpTarget(str(address), port, path)


# ----------------------------------------------------------------------------- HTTP


def encode_http_request(
    method: str,
    target: HttpTarget,
    *,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> bytes:
    """An HTTP/1.1 request that asks the server to close the connection after answering."""
    lines = [
        f"{method} {target.path} HTTP/1.1",
        f"Host: {target.host}:{target.port}",
        "Connection: close",
        "User-Agent: lattica-ray UPnP/1.1",
    ]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass(frozen=True)
class HttpResponse:
    status: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def parse_http_response(data: bytes, *, at_eof: bool) -> HttpResponse | None:
    """Parse a response read so far: None if more is needed; ``at_eof``: the server closed.

    Handles Content-Length, chunked transfer coding and read-until-close bodies.
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if len(data) > HTTP_MAX_HEAD:
            raise MalformedReply(f"HTTP response head longer than {HTTP_MAX_HEAD} bytes")
        if at_eof:
            raise MalformedReply(f"HTTP response cut short in its head ({len(data)} bytes)")
        return None
    status_line, headers = _split_head(data[:end], "HTTP response")
    parts = status_line.split(None, 2)
    version, code = (parts[0], parts[1]) if len(parts) > 1 else ("", "")
    if not version.startswith("HTTP/1.") or not (
        len(code) == 3 and code.isascii() and code.isdigit()
    ):
        raise MalformedReply(f"not an HTTP/1.x status line: {status_line[:80]!r}")
    status, reason = int(code), parts[2] if len(parts) > 2 else ""
    rest = data[end + 4 :]
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _dechunk(rest, at_eof=at_eof)
    elif "content-length" in headers:
        text = headers["content-length"]
        if not (text.isascii() and text.isdigit()):
            raise MalformedReply(f"bad Content-Length {text[:20]!r}")
        length = int(text)
        if len(rest) < length:
            if at_eof:
                raise MalformedReply(f"HTTP body cut short: {len(rest)} of {length} bytes")
            return None
        body = rest[:length]
    else:
        body = rest if at_eof else None
    if body is None:
        return None
    return HttpResponse(status, reason, headers, body)


def _dechunk(data: bytes, *, at_eof: bool) -> bytes | None:
    body = bytearray()
    position = 0
    while True:
        line_end = data.find(b"\r\n", position)
        if line_end < 0:
            break
        size_text = data[position:line_end].split(b";", 1)[0].strip()
        if not size_text or size_text.strip(b"0123456789abcdefABCDEF"):
            raise MalformedReply(f"bad HTTP chunk size {size_text[:20]!r}")
        size = int(size_text, 16)
        if size == 0:
            return bytes(body)  # trailers, if any, are ignored
        start = line_end + 2
        if len(data) < start + size + 2:
            break
        body += data[start : start + size]
        position = start + size + 2
    if at_eof:
        raise MalformedReply("chunked HTTP body cut short")
    return None


# ----------------------------------------------------------------------------- device description


def _parse_xml(data: bytes, what: str) -> ElementTree.Element:
    # Entity declarations have no place in UPnP documents; refusing them rules out entity
    # expansion attacks whatever the expat version.
    if b"<!ENTITY" in data or b"<!DOCTYPE" in data:
        raise MalformedReply(f"{what} declares a DOCTYPE or entities; refused")
    try:
        return ElementTree.fromstring(data)
    except ElementTree.ParseError as exc:
        raise MalformedReply(f"{what} is not well-formed XML: {exc}") from None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child_text(element: ElementTree.Element, name: str) -> str:
    for child in element:
        if _local(child.tag) == name:
            return (child.text or "").strip()
    return ""


@dataclass(frozen=True)
class IgdService:
    """The connection service to send SOAP actions to."""

    service_type: str
    control_url: str  # absolute http URL


def parse_device_description(data: bytes, location: str) -> IgdService:
    """Pick the best WAN connection service of an IGD description (rootDesc.xml)."""
    root = _parse_xml(data, "device description")
    base = location
    for element in root.iter():
        if _local(element.tag) == "URLBase" and (element.text or "").strip():
            base = (element.text or "").strip()
    found: dict[str, str] = {}
    for element in root.iter():
        if _local(element.tag) != "service":
            continue
        service_type = _child_text(element, "serviceType")
        control = _child_text(element, "controlURL")
        if service_type in CONNECTION_SERVICES and control and service_type not in found:
            try:
                found[service_type] = urljoin(base, control)
            except ValueError:
                raise MalformedReply(f"controlURL {control[:100]!r} does not parse") from None
    for service_type in CONNECTION_SERVICES:
        if service_type in found:
            return IgdService(service_type, found[service_type])
    raise MalformedReply(
        "device description has no WANIPConnection or WANPPPConnection service with a controlURL"
    )


# ----------------------------------------------------------------------------- SOAP


def encode_soap_request(
    service: IgdService, action: str, arguments: list[tuple[str, str]], responder: str
) -> bytes:
    """The HTTP POST carrying a SOAP action (arguments in the order the spec lists them)."""
    target = check_url(service.control_url, responder)
    args = "".join(f"<{name}>{escape(value)}</{name}>" for name, value in arguments)
    body = (
        '<?xml version="1.0"?>\r\n'
        f'<s:Envelope xmlns:s="{SOAP_ENVELOPE_NS}" s:encodingStyle="{SOAP_ENCODING}">'
        f'<s:Body><u:{action} xmlns:u="{escape(service.service_type)}">{args}</u:{action}>'
        "</s:Body></s:Envelope>\r\n"
    ).encode()
    headers = {
        "Content-Type": 'text/xml; charset="utf-8"',
        "SOAPAction": f'"{service.service_type}#{action}"',
    }
    return encode_http_request("POST", target, body=body, headers=headers)


def parse_soap_response(response: HttpResponse, action: str) -> dict[str, str]:
    """The output arguments of ``action``; a SOAP fault raises GatewayRefused with its code."""
    if not response.body.strip():
        raise MalformedReply(f"{action}: HTTP {response.status} with an empty body")
    root = _parse_xml(response.body, f"{action} response")
    body = next((e for e in root if _local(e.tag) == "Body"), None)
    if _local(root.tag) != "Envelope" or body is None or len(body) == 0:
        raise MalformedReply(f"{action}: response is not a SOAP envelope with a body")
    payload = body[0]
    if _local(payload.tag) == "Fault":
        code_text, description = "", ""
        for element in payload.iter():
            if _local(element.tag) == "errorCode":
                code_text = (element.text or "").strip()
            elif _local(element.tag) == "errorDescription":
                description = (element.text or "").strip()
        try:
            code = int(code_text)
        except ValueError:
            raise MalformedReply(f"{action}: SOAP fault without a UPnP errorCode") from None
        name = UPNP_ERRORS.get(code, description or "UPnPError")
        raise GatewayRefused("upnp", code, name, f"{action}: {description}".rstrip(": "))
    if response.status != 200:
        raise MalformedReply(f"{action}: HTTP {response.status} {response.reason} without a fault")
    if _local(payload.tag) != f"{action}Response":
        raise MalformedReply(f"{action}: answer is {_local(payload.tag)!r}")
    return {_local(child.tag): (child.text or "").strip() for child in payload}


def add_port_mapping_arguments(
    *,
    external_port: int,
    protocol: str,
    internal_port: int,
    internal_client: str,
    description: str,
    lease_duration: int,
) -> list[tuple[str, str]]:
    """AddPortMapping's arguments, in the order of the IGD spec (NewRemoteHost empty: anyone)."""
    if protocol.lower() not in ("udp", "tcp"):
        raise ValueError(f"protocol must be 'udp' or 'tcp', got {protocol!r}")
    return [
        ("NewRemoteHost", ""),
        ("NewExternalPort", str(external_port)),
        ("NewProtocol", protocol.upper()),
        ("NewInternalPort", str(internal_port)),
        ("NewInternalClient", internal_client),
        ("NewEnabled", "1"),
        ("NewPortMappingDescription", description),
        ("NewLeaseDuration", str(lease_duration)),
    ]


def delete_port_mapping_arguments(*, external_port: int, protocol: str) -> list[tuple[str, str]]:
    return [
        ("NewRemoteHost", ""),
        ("NewExternalPort", str(external_port)),
        ("NewProtocol", protocol.upper()),
    ]


def parse_external_ip(arguments: dict[str, str]) -> str:
    """GetExternalIPAddress's answer, checked: an IPv4 address that is not 0.0.0.0."""
    text = arguments.get("NewExternalIPAddress", "")
    try:
        address = ipaddress.IPv4Address(text)
    except ValueError:
        raise MalformedReply(f"GetExternalIPAddress returned {text[:60]!r}") from None
    if address.is_unspecified:
        raise MalformedReply("the gateway has no external address (0.0.0.0): not connected")
    return str(address)
