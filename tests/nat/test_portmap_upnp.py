"""UPnP-IGD messages without a network: SSDP, HTTP framing, device description, SOAP.

Captured exchanges come from miniupnpd 2.3.1 (Debian) on a lab router (LAN address 10.1.0.1,
outside 203.0.113.10); the kernel release in its Server header is shortened.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from transport.nat.portmap_errors import GatewayRefused, MalformedReply
from transport.nat.portmap_upnp import (
    WAN_IP_CONNECTION_1,
    WAN_IP_CONNECTION_2,
    WAN_PPP_CONNECTION_1,
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

CAPTURED_SSDP = (
    b"HTTP/1.1 200 OK\r\n"
    b"CACHE-CONTROL: max-age=120\r\n"
    b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
    b"USN: uuid:3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b::urn:schemas-upnp-org:device:Inte"
    b"rnetGatewayDevice:1\r\n"
    b"EXT:\r\n"
    b"SERVER: Debian/6.1 UPnP/1.1 MiniUPnPd/2.3.1\r\n"
    b"LOCATION: http://10.1.0.1:37087/rootDesc.xml\r\n"
    b'OPT: "http://schemas.upnp.org/upnp/1/0/"; ns=01\r\n'
    b"01-NLS: 1795613434\r\n"
    b"BOOTID.UPNP.ORG: 1795613434\r\n"
    b"CONFIGID.UPNP.ORG: 1337\r\n"
    b"\r\n"
)
CAPTURED_DESCRIPTION = (
    b"HTTP/1.1 200 OK\r\n"
    b'Content-Type: text/xml; charset="utf-8"\r\n'
    b"Connection: close\r\n"
    b"Content-Length: 3089\r\n"
    b"Server: Debian/6.1 UPnP/1.1 MiniUPnPd/2.3.1\r\n"
    b"Ext:\r\n"
    b"\r\n"
    b'<?xml version="1.0"?>\r\n'
    b'<root xmlns="urn:schemas-upnp-org:device-1-0" configId="1337"><specVersion><majo'
    b"r>1</major><minor>1</minor></specVersion><device><deviceType>urn:schemas-upnp-or"
    b"g:device:InternetGatewayDevice:2</deviceType><friendlyName>Debian router</friend"
    b"lyName><manufacturer>Debian</manufacturer><manufacturerURL>http://www.debian.org"
    b"/</manufacturerURL><modelDescription>Debian router</modelDescription><modelName>"
    b"Debian router</modelName><modelNumber>1</modelNumber><modelURL>http://www.debian"
    b".org/</modelURL><serialNumber>00000000</serialNumber><UDN>uuid:3d3cec3a-8cf0-11e"
    b"0-98ee-001a6bd2d07b</UDN><serviceList><service><serviceType>urn:schemas-upnp-org"
    b":service:Layer3Forwarding:1</serviceType><serviceId>urn:upnp-org:serviceId:L3For"
    b"warding1</serviceId><SCPDURL>/L3F.xml</SCPDURL><controlURL>/ctl/L3F</controlURL>"
    b"<eventSubURL>/evt/L3F</eventSubURL></service><service><serviceType>urn:schemas-u"
    b"pnp-org:service:DeviceProtection:1</serviceType><serviceId>urn:upnp-org:serviceI"
    b"d:DeviceProtection1</serviceId><SCPDURL>/DP.xml</SCPDURL><controlURL>/ctl/DP</co"
    b"ntrolURL><eventSubURL>/evt/DP</eventSubURL></service></serviceList><deviceList><"
    b"device><deviceType>urn:schemas-upnp-org:device:WANDevice:2</deviceType><friendly"
    b"Name>WANDevice</friendlyName><manufacturer>MiniUPnP</manufacturer><manufacturerU"
    b"RL>http://miniupnp.free.fr/</manufacturerURL><modelDescription>WAN Device</model"
    b"Description><modelName>WAN Device</modelName><modelNumber>20221221</modelNumber>"
    b"<modelURL>http://miniupnp.free.fr/</modelURL><serialNumber>00000000</serialNumbe"
    b"r><UDN>uuid:3d3cec3a-8cf0-11e0-98ee-001a6bd2d07c</UDN><UPC>000000000000</UPC><se"
    b"rviceList><service><serviceType>urn:schemas-upnp-org:service:WANCommonInterfaceC"
    b"onfig:1</serviceType><serviceId>urn:upnp-org:serviceId:WANCommonIFC1</serviceId>"
    b"<SCPDURL>/WANCfg.xml</SCPDURL><controlURL>/ctl/CmnIfCfg</controlURL><eventSubURL"
    b">/evt/CmnIfCfg</eventSubURL></service></serviceList><deviceList><device><deviceT"
    b"ype>urn:schemas-upnp-org:device:WANConnectionDevice:2</deviceType><friendlyName>"
    b"WANConnectionDevice</friendlyName><manufacturer>MiniUPnP</manufacturer><manufact"
    b"urerURL>http://miniupnp.free.fr/</manufacturerURL><modelDescription>MiniUPnP dae"
    b"mon</modelDescription><modelName>MiniUPnPd</modelName><modelNumber>20221221</mod"
    b"elNumber><modelURL>http://miniupnp.free.fr/</modelURL><serialNumber>00000000</se"
    b"rialNumber><UDN>uuid:3d3cec3a-8cf0-11e0-98ee-001a6bd2d07d</UDN><UPC>000000000000"
    b"</UPC><serviceList><service><serviceType>urn:schemas-upnp-org:service:WANIPConne"
    b"ction:2</serviceType><serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId><SC"
    b"PDURL>/WANIPCn.xml</SCPDURL><controlURL>/ctl/IPConn</controlURL><eventSubURL>/ev"
    b"t/IPConn</eventSubURL></service><service><serviceType>urn:schemas-upnp-org:servi"
    b"ce:WANIPv6FirewallControl:1</serviceType><serviceId>urn:upnp-org:serviceId:WANIP"
    b"v6Firewall1</serviceId><SCPDURL>/WANIP6FC.xml</SCPDURL><controlURL>/ctl/IP6FCtl<"
    b"/controlURL><eventSubURL>/evt/IP6FCtl</eventSubURL></service></serviceList></dev"
    b"ice></deviceList></device></deviceList><presentationURL>http://10.1.0.1/</presen"
    b"tationURL></device></root>"
)
CAPTURED_EXTERNAL_IP = (
    b"HTTP/1.1 200 OK\r\n"
    b'Content-Type: text/xml; charset="utf-8"\r\n'
    b"Connection: close\r\n"
    b"Content-Length: 358\r\n"
    b"Server: Debian/6.1 UPnP/1.1 MiniUPnPd/2.3.1\r\n"
    b"Ext:\r\n"
    b"\r\n"
    b'<?xml version="1.0"?>\r\n'
    b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" s:encodingStyle='
    b'"http://schemas.xmlsoap.org/soap/encoding/"><s:Body><u:GetExternalIPAddressRespo'
    b'nse xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:1"><NewExternalIPAddre'
    b"ss>203.0.113.10</NewExternalIPAddress></u:GetExternalIPAddressResponse></s:Body>"
    b"</s:Envelope>\r\n"
)
CAPTURED_ADD = (
    b"HTTP/1.1 200 OK\r\n"
    b'Content-Type: text/xml; charset="utf-8"\r\n'
    b"Connection: close\r\n"
    b"Content-Length: 263\r\n"
    b"Server: Debian/6.1 UPnP/1.1 MiniUPnPd/2.3.1\r\n"
    b"Ext:\r\n"
    b"\r\n"
    b'<?xml version="1.0"?>\r\n'
    b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" s:encodingStyle='
    b'"http://schemas.xmlsoap.org/soap/encoding/"><s:Body><u:AddPortMappingResponse xm'
    b'lns:u="urn:schemas-upnp-org:service:WANIPConnection:1"/></s:Body></s:Envelope>\r'
    b"\n"
)
CAPTURED_CONFLICT = (
    b"HTTP/1.1 500 Internal Server Error\r\n"
    b'Content-Type: text/xml; charset="utf-8"\r\n'
    b"Connection: close\r\n"
    b"Content-Length: 406\r\n"
    b"Server: Debian/6.1 UPnP/1.1 MiniUPnPd/2.3.1\r\n"
    b"Ext:\r\n"
    b"\r\n"
    b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" s:encodingStyle='
    b'"http://schemas.xmlsoap.org/soap/encoding/"><s:Body><s:Fault><faultcode>s:Client'
    b'</faultcode><faultstring>UPnPError</faultstring><detail><UPnPError xmlns="urn:sc'
    b'hemas-upnp-org:control-1-0"><errorCode>718</errorCode><errorDescription>Conflict'
    b"InMappingEntry</errorDescription></UPnPError></detail></s:Fault></s:Body></s:Env"
    b"elope>"
)
CAPTURED_DELETE = (
    b"HTTP/1.1 200 OK\r\n"
    b'Content-Type: text/xml; charset="utf-8"\r\n'
    b"Connection: close\r\n"
    b"Content-Length: 295\r\n"
    b"Server: Debian/6.1 UPnP/1.1 MiniUPnPd/2.3.1\r\n"
    b"Ext:\r\n"
    b"\r\n"
    b'<?xml version="1.0"?>\r\n'
    b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" s:encodingStyle='
    b'"http://schemas.xmlsoap.org/soap/encoding/"><s:Body><u:DeletePortMappingResponse'
    b' xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:1"></u:DeletePortMappingR'
    b"esponse></s:Body></s:Envelope>\r\n"
)

GATEWAY = "10.1.0.1"
SERVICE = IgdService(WAN_IP_CONNECTION_2, "http://10.1.0.1:37087/ctl/IPConn")


def http_ok(body: bytes, status: str = "200 OK") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def soap_body(inner: str) -> bytes:
    return (
        '<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>'
        f"{inner}</s:Body></s:Envelope>"
    ).encode()


def description(services: str, extra: str = "") -> bytes:
    return (
        f'<root xmlns="urn:schemas-upnp-org:device-1-0">{extra}<device><serviceList>{services}'
        "</serviceList></device></root>"
    ).encode()


def service(service_type: str, control: str) -> str:
    return (
        f"<service><serviceType>{service_type}</serviceType>"
        f"<controlURL>{control}</controlURL></service>"
    )


def parsed(raw: bytes) -> HttpResponse:
    response = parse_http_response(raw, at_eof=True)
    assert response is not None
    return response


# ----------------------------------------------------------------------------- SSDP


def test_msearch_is_what_uda_specifies() -> None:
    search = encode_msearch("urn:schemas-upnp-org:device:InternetGatewayDevice:1")
    assert search.startswith(b"M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\n")
    assert b'MAN: "ssdp:discover"\r\n' in search and b"MX: 1\r\n" in search
    assert search.endswith(b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n\r\n")
    with pytest.raises(ValueError):
        encode_msearch("ssdp:all", mx=0)


def test_captured_ssdp_answer_parses() -> None:
    answer = parse_ssdp_response(CAPTURED_SSDP)
    assert answer.location == "http://10.1.0.1:37087/rootDesc.xml"
    assert answer.search_target == "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
    assert "MiniUPnPd" in answer.server and answer.usn.startswith("uuid:")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"NOTIFY * HTTP/1.1\r\n\r\n", "not 'HTTP/1.x 200'"),
        (b"HTTP/1.1 404 Not Found\r\n\r\n", "not 'HTTP/1.x 200'"),
        (b"HTTP/1.1 200 OK\r\nST: x\r\n\r\n", "without LOCATION"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "without a name"),
        (b"HTTP/1.1 200 OK\r\n" + b"X: " + b"a" * 5000 + b"\r\n\r\n", "at most 4096"),
    ],
)
def test_bad_ssdp_answers_say_what_is_wrong(data: bytes, message: str) -> None:
    with pytest.raises(MalformedReply, match=message):
        parse_ssdp_response(data)


def test_urls_must_point_at_the_device_that_answered() -> None:
    assert check_url("http://10.1.0.1:37087/rootDesc.xml", GATEWAY) == HttpTarget(
        GATEWAY, 37087, "/rootDesc.xml"
    )
    assert check_url("http://10.1.0.1/a?b=c", GATEWAY) == HttpTarget(GATEWAY, 80, "/a?b=c")
    for url, message in [
        ("http://198.51.100.7:80/rootDesc.xml", "not at the gateway"),
        ("http://router.example/rootDesc.xml", "IPv4 address"),
        ("https://10.1.0.1/rootDesc.xml", "not http"),
        ("http://10.1.0.1:99999/x", "invalid port"),
        ("http://[::1/x", "does not parse"),
    ]:
        with pytest.raises(MalformedReply, match=message):
            check_url(url, GATEWAY)


# ----------------------------------------------------------------------------- HTTP


def test_http_request_asks_to_close() -> None:
    request = encode_http_request("GET", HttpTarget(GATEWAY, 37087, "/rootDesc.xml"))
    assert request.startswith(b"GET /rootDesc.xml HTTP/1.1\r\nHost: 10.1.0.1:37087\r\n")
    assert b"Connection: close\r\n" in request and request.endswith(b"\r\n\r\n")
    post = encode_http_request("POST", HttpTarget(GATEWAY, 80, "/"), body=b"abc")
    assert post.endswith(b"Content-Length: 3\r\n\r\nabc")


def test_http_response_is_parsed_only_when_complete() -> None:
    raw = CAPTURED_EXTERNAL_IP
    for cut in (10, raw.index(b"\r\n\r\n") + 4, len(raw) - 1):
        assert parse_http_response(raw[:cut], at_eof=False) is None
    response = parse_http_response(raw, at_eof=False)
    assert response is not None and response.status == 200
    assert response.headers["content-type"].startswith("text/xml")
    assert response.body.endswith(b"</s:Envelope>\r\n")


def test_http_chunked_and_read_until_close_bodies() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;x=y\r\nWiki\r\n5\r\npedia\r\n"
    )
    assert parse_http_response(chunked, at_eof=False) is None
    done = parse_http_response(chunked + b"0\r\n\r\n", at_eof=False)
    assert done is not None and done.body == b"Wikipedia"
    until_close = b"HTTP/1.0 200 OK\r\n\r\nbody"
    assert parse_http_response(until_close, at_eof=False) is None
    closed = parse_http_response(until_close, at_eof=True)
    assert closed is not None and closed.body == b"body"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"HTTP/1.1 200", "cut short in its head"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 \xc2\xb2 OK\r\n\r\n", "status line"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nab\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", "3 of 10"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", "cut short"),
    ],
)
def test_bad_http_says_what_is_wrong(data: bytes, message: str) -> None:
    with pytest.raises(MalformedReply, match=message):
        parse_http_response(data, at_eof=True)


def test_endless_http_head_is_refused() -> None:
    with pytest.raises(MalformedReply, match="head longer"):
        parse_http_response(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 5000, at_eof=False)


# ----------------------------------------------------------------------------- description


def test_captured_description_gives_the_wanipconnection_2_control_url() -> None:
    response = parsed(CAPTURED_DESCRIPTION)
    found = parse_device_description(response.body, "http://10.1.0.1:37087/rootDesc.xml")
    assert found == SERVICE


def test_description_prefers_ip_v2_then_v1_then_ppp_and_honours_urlbase() -> None:
    location = "http://10.1.0.1:5000/desc.xml"
    both = description(service(WAN_PPP_CONNECTION_1, "/ppp") + service(WAN_IP_CONNECTION_1, "ip"))
    assert parse_device_description(both, location) == IgdService(
        WAN_IP_CONNECTION_1, "http://10.1.0.1:5000/ip"
    )
    ppp = description(
        service(WAN_PPP_CONNECTION_1, "/ppp"), "<URLBase>http://10.1.0.1:81/</URLBase>"
    )
    assert parse_device_description(ppp, location) == IgdService(
        WAN_PPP_CONNECTION_1, "http://10.1.0.1:81/ppp"
    )


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        (b"<root><device>", "not well-formed"),
        (
            description(service("urn:schemas-upnp-org:service:Layer3Forwarding:1", "/l3")),
            "no WANIP",
        ),
        (description(service(WAN_IP_CONNECTION_1, "")), "no WANIP"),
        (
            b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;">]><r>&b;</r>',
            "DOCTYPE",
        ),
    ],
)
def test_bad_descriptions_say_what_is_wrong(xml: bytes, message: str) -> None:
    with pytest.raises(MalformedReply, match=message):
        parse_device_description(xml, "http://10.1.0.1/")


# ----------------------------------------------------------------------------- SOAP


def test_soap_request_carries_the_action_and_escaped_arguments() -> None:
    arguments = add_port_mapping_arguments(
        external_port=4001,
        protocol="udp",
        internal_port=4001,
        internal_client="10.1.0.10",
        description="a<b & c>",
        lease_duration=3600,
    )
    request = encode_soap_request(SERVICE, "AddPortMapping", arguments, GATEWAY)
    head, body = request.split(b"\r\n\r\n", 1)
    assert head.startswith(b"POST /ctl/IPConn HTTP/1.1\r\nHost: 10.1.0.1:37087\r\n")
    assert f'SOAPAction: "{WAN_IP_CONNECTION_2}#AddPortMapping"'.encode() in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert b"<NewExternalPort>4001</NewExternalPort><NewProtocol>UDP</NewProtocol>" in body
    assert b"<NewInternalClient>10.1.0.10</NewInternalClient>" in body
    assert b"<NewPortMappingDescription>a&lt;b &amp; c&gt;</NewPortMappingDescription>" in body
    assert b"<NewLeaseDuration>3600</NewLeaseDuration>" in body
    with pytest.raises(MalformedReply, match="not at the gateway"):
        encode_soap_request(SERVICE, "AddPortMapping", arguments, "10.1.0.2")


def test_argument_builders_check_and_order() -> None:
    with pytest.raises(ValueError):
        add_port_mapping_arguments(
            external_port=1,
            protocol="icmp",
            internal_port=1,
            internal_client="10.1.0.10",
            description="",
            lease_duration=0,
        )
    assert [name for name, _ in delete_port_mapping_arguments(external_port=1, protocol="tcp")] == [
        "NewRemoteHost",
        "NewExternalPort",
        "NewProtocol",
    ]


def test_captured_soap_answers_parse() -> None:
    external = parse_soap_response(parsed(CAPTURED_EXTERNAL_IP), "GetExternalIPAddress")
    assert parse_external_ip(external) == "203.0.113.10"
    assert parse_soap_response(parsed(CAPTURED_ADD), "AddPortMapping") == {}
    assert parse_soap_response(parsed(CAPTURED_DELETE), "DeletePortMapping") == {}


def test_captured_fault_is_a_refusal_with_the_upnp_code() -> None:
    with pytest.raises(GatewayRefused) as caught:
        parse_soap_response(parsed(CAPTURED_CONFLICT), "AddPortMapping")
    assert caught.value.code == 718 and caught.value.name == "ConflictInMappingEntry"
    assert caught.value.method == "upnp"


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (HttpResponse(200, "OK", {}, b""), "empty body"),
        (HttpResponse(200, "OK", {}, b"<html/>"), "not a SOAP envelope"),
        (
            HttpResponse(200, "OK", {}, soap_body("<u:OtherResponse xmlns:u='x'/>")),
            "'OtherResponse'",
        ),
        (HttpResponse(500, "Error", {}, soap_body("<s:Fault><faultcode/></s:Fault>")), "errorCode"),
        (HttpResponse(401, "No", {}, soap_body("<u:AddPortMappingResponse xmlns:u='x'/>")), "401"),
    ],
)
def test_bad_soap_answers_say_what_is_wrong(response: HttpResponse, message: str) -> None:
    with pytest.raises(MalformedReply, match=message):
        parse_soap_response(response, "AddPortMapping")


@pytest.mark.parametrize("text", ["", "0.0.0.0", "not an address", "::1"])
def test_bad_external_addresses_are_refused(text: str) -> None:
    with pytest.raises(MalformedReply):
        parse_external_ip({"NewExternalIPAddress": text})


@given(st.binary(max_size=600))
def test_no_input_crashes_the_parsers(data: bytes) -> None:
    for parse in (
        lambda: parse_ssdp_response(data),
        lambda: parse_http_response(data, at_eof=True),
        lambda: parse_device_description(data, "http://10.1.0.1/"),
        lambda: parse_soap_response(HttpResponse(200, "OK", {}, data), "AddPortMapping"),
        lambda: check_url(data.decode("latin-1"), GATEWAY),
    ):
        try:
            parse()
        except (MalformedReply, GatewayRefused):
            pass
