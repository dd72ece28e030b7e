"""NAT-PMP and PCP messages and the map/delete exchange, without a network.

Captured replies come from miniupnpd 2.3.1 (Debian) on a lab router, 203.0.113.10 outside,
client 10.1.0.10.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from transport.nat.portmap_errors import GatewayRefused, MalformedReply, NoGateway, PortMapError
from transport.nat.portmap_pcp import (
    Method,
    NatPmpExternalAddress,
    NatPmpMapping,
    NatPmpResult,
    PcpMapRequest,
    PcpResult,
    PmpExchange,
    decode_natpmp_response,
    decode_pcp_response,
    encode_natpmp_external_address_request,
    encode_natpmp_map_request,
)

NONCE = bytes(range(1, 13))
CAPTURED_NATPMP_EXTERNAL = bytes.fromhex("0080000000000934cb00710a")
CAPTURED_NATPMP_MAP = bytes.fromhex("00810000000007d19c409c400000003c")  # udp 40000, 60 s
CAPTURED_PCP_MAP = bytes.fromhex(
    "0281000000001c20000009340000000000000000000000000102030405060708090a0b0c"
    "110000000fa10fa100000000000000000000ffffcb00710a"
)
CAPTURED_PCP_DELETE = bytes.fromhex(
    "0281000000000000000009340000000000000000000000000102030405060708090a0b0c"
    "110000000fa10fa100000000000000000000ffffcb00710a"
)
CAPTURED_PCP_ADDRESS_MISMATCH = bytes.fromhex(
    "0281000c00000000000009340000000000000000000000000102030405060708090a0b0c"
    "110000000fa10fa100000000000000000000000000000000"
)


def natpmp_map_reply(
    internal: int, external: int, lifetime: int, *, op: int = 129, result: int = 0
) -> bytes:
    return struct.pack("!BBHIHHI", 0, op, result, 77, internal, external, lifetime)


def natpmp_address_reply(address: bytes = bytes([203, 0, 113, 10]), result: int = 0) -> bytes:
    return struct.pack("!BBHI", 0, 128, result, 77) + address


def exchange(**overrides: object) -> PmpExchange:
    arguments: dict[str, object] = {
        "protocol": "udp",
        "internal_port": 4001,
        "lifetime": 7200,
        "client_ip": "10.1.0.10",
        "nonce": NONCE,
        "now": 0.0,
    }
    arguments.update(overrides)
    return PmpExchange(**arguments)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- NAT-PMP


def test_natpmp_requests_have_the_rfc_layout() -> None:
    assert encode_natpmp_external_address_request() == b"\x00\x00"
    request = encode_natpmp_map_request("udp", 40000, 40000, 3600)
    assert request == bytes.fromhex("000100009c409c4000000e10")
    assert encode_natpmp_map_request("tcp", 22, 0, 60)[1] == 2
    # A delete carries external port 0, whatever was suggested (RFC 6886 section 3.4).
    assert encode_natpmp_map_request("udp", 40000, 40000, 0) == bytes.fromhex(
        "000100009c40000000000000"
    )


@pytest.mark.parametrize(
    ("protocol", "internal", "external", "lifetime"),
    [
        ("sctp", 1, 1, 1),
        ("udp", 0, 1, 1),
        ("udp", 70000, 1, 1),
        ("udp", 1, -1, 1),
        ("udp", 1, 1, -1),
    ],
)
def test_natpmp_request_rejects_bad_values(
    protocol: str, internal: int, external: int, lifetime: int
) -> None:
    with pytest.raises(ValueError):
        encode_natpmp_map_request(protocol, internal, external, lifetime)


def test_natpmp_captured_replies_decode() -> None:
    address = decode_natpmp_response(CAPTURED_NATPMP_EXTERNAL)
    assert address == NatPmpExternalAddress(epoch=0x934, external_ip="203.0.113.10")
    mapping = decode_natpmp_response(CAPTURED_NATPMP_MAP)
    assert mapping == NatPmpMapping("udp", 2001, 40000, 40000, 60)


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"", "at least 8"),
        (b"\x00\x81\x00", "at least 8"),
        (b"\x01" + CAPTURED_NATPMP_MAP[1:], "version 1"),
        (b"\x00\x01" + CAPTURED_NATPMP_MAP[2:], "is a request"),
        (CAPTURED_NATPMP_EXTERNAL + b"\x00", "not 12"),
        (CAPTURED_NATPMP_MAP[:-1], "not 16"),
        (b"\x00\x85" + CAPTURED_NATPMP_MAP[2:], "unknown opcode 5"),
    ],
)
def test_natpmp_malformed_replies_say_what_is_wrong(reply: bytes, message: str) -> None:
    with pytest.raises(MalformedReply, match=message):
        decode_natpmp_response(reply)


def test_natpmp_result_code_is_a_refusal_with_its_name() -> None:
    with pytest.raises(GatewayRefused) as caught:
        decode_natpmp_response(natpmp_map_reply(1, 0, 0, result=NatPmpResult.NOT_AUTHORIZED))
    assert caught.value.code == 2 and caught.value.name == "NOT_AUTHORIZED"
    assert caught.value.method == "natpmp"
    with pytest.raises(GatewayRefused, match="UNKNOWN_RESULT"):
        decode_natpmp_response(natpmp_map_reply(1, 0, 0, result=99))


# ----------------------------------------------------------------------------- PCP


def test_pcp_map_request_has_the_rfc_layout() -> None:
    request = PcpMapRequest(NONCE, "udp", 4001, 7200, "10.1.0.10", 4001).encode()
    assert len(request) == 60
    version, opcode, _reserved, lifetime = struct.unpack_from("!BBHI", request)
    assert (version, opcode, lifetime) == (2, 1, 7200)
    assert request[8:24] == bytes(10) + b"\xff\xff" + bytes([10, 1, 0, 10])
    assert request[24:36] == NONCE
    assert request[36] == 17 and request[37:40] == bytes(3)
    assert struct.unpack_from("!HH", request, 40) == (4001, 4001)
    assert request[44:60] == bytes(10) + b"\xff\xff" + bytes(4)  # no preferred address


def test_pcp_map_request_rejects_a_short_nonce() -> None:
    with pytest.raises(ValueError, match="12 bytes"):
        PcpMapRequest(b"short", "udp", 4001, 60, "10.1.0.10").encode()


def test_pcp_captured_replies_decode() -> None:
    granted = decode_pcp_response(CAPTURED_PCP_MAP)
    assert granted.result == PcpResult.SUCCESS and granted.lifetime == 7200
    assert granted.nonce == NONCE and granted.protocol_number == 17
    assert (granted.internal_port, granted.external_port) == (4001, 4001)
    assert granted.external_ip == "203.0.113.10"
    assert decode_pcp_response(CAPTURED_PCP_DELETE).lifetime == 0
    mismatch = decode_pcp_response(CAPTURED_PCP_ADDRESS_MISMATCH)
    assert mismatch.result == PcpResult.ADDRESS_MISMATCH


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (CAPTURED_PCP_MAP[:20], "at least 24"),
        (CAPTURED_PCP_MAP + b"\x00", "multiple of 4"),
        (CAPTURED_PCP_MAP + bytes(1100), "max 1100"),
        (b"\x01" + CAPTURED_PCP_MAP[1:], "version 1"),
        (b"\x02\x01" + CAPTURED_PCP_MAP[2:], "response bit"),
        (b"\x02\x82" + CAPTURED_PCP_MAP[2:], "opcode 2"),
        (CAPTURED_PCP_MAP[:48], "at least 60"),
    ],
)
def test_pcp_malformed_replies_say_what_is_wrong(reply: bytes, message: str) -> None:
    with pytest.raises(MalformedReply, match=message):
        decode_pcp_response(reply)


def test_pcp_error_reply_may_come_without_the_map_payload() -> None:
    reply = struct.pack("!BBBBII", 2, 0x81, 0, PcpResult.NOT_AUTHORIZED, 30, 5) + bytes(12)
    assert decode_pcp_response(reply).result == PcpResult.NOT_AUTHORIZED


# ----------------------------------------------------------------------------- the exchange


def test_pcp_exchange_grants_from_a_captured_reply() -> None:
    ex = exchange(suggested_external_port=4001)
    sent = ex.datagrams_to_send(0.0)
    assert len(sent) == 1 and sent[0][:2] == b"\x02\x01"
    assert ex.method is Method.PCP
    ex.receive_datagram(CAPTURED_PCP_MAP, 0.01)
    assert ex.done and ex.error is None and ex.grant is not None
    assert ex.grant.method is Method.PCP
    assert (ex.grant.external_ip, ex.grant.external_port) == ("203.0.113.10", 4001)
    assert ex.grant.lifetime == 7200 and ex.grant.epoch == 0x934 and ex.grant.nonce == NONCE
    assert ex.datagrams_to_send(10.0) == [] and ex.get_timer() is None


def test_retransmissions_start_at_250_ms_and_double() -> None:
    ex = exchange()
    sends = []
    now = 0.0
    for _ in range(5):
        if ex.datagrams_to_send(now):
            sends.append(now)
        timer = ex.get_timer()
        assert timer is not None
        now = timer
        ex.handle_timer(now)
    assert sends == [0.0, 0.25, 0.75, 1.75, 3.75]


def test_foreign_and_garbled_replies_are_counted_not_fatal() -> None:
    ex = exchange()
    ex.datagrams_to_send(0.0)
    other_nonce = CAPTURED_PCP_MAP[:24] + bytes(12) + CAPTURED_PCP_MAP[36:]
    for garbage in (b"", b"\x02", other_nonce, b"\xff" * 60, CAPTURED_NATPMP_MAP):
        ex.receive_datagram(garbage, 0.1)
    assert not ex.done and ex.malformed == 5
    assert ex.last_malformed is not None
    ex.receive_datagram(CAPTURED_PCP_MAP, 0.2)
    assert ex.grant is not None


def test_reply_for_another_port_is_ignored() -> None:
    ex = exchange(internal_port=5000)
    ex.datagrams_to_send(0.0)
    ex.receive_datagram(CAPTURED_PCP_MAP, 0.1)  # says port 4001
    assert not ex.done and "port 4001" in (ex.last_malformed or "")


def test_pcp_refusal_ends_the_exchange_with_its_code() -> None:
    ex = exchange()
    ex.datagrams_to_send(0.0)
    ex.receive_datagram(CAPTURED_PCP_ADDRESS_MISMATCH, 0.1)
    assert ex.done and isinstance(ex.error, GatewayRefused)
    assert ex.error.code == PcpResult.ADDRESS_MISMATCH and "ADDRESS_MISMATCH" in str(ex.error)


def test_natpmp_only_gateway_gets_natpmp_after_its_unsupported_version_reply() -> None:
    ex = exchange(internal_port=40000, lifetime=60)
    ex.datagrams_to_send(0.0)
    unsupported = struct.pack("!BBHI", 0, 129, NatPmpResult.UNSUPPORTED_VERSION, 77)
    ex.receive_datagram(unsupported, 0.01)
    assert not ex.done and ex.method is Method.NATPMP
    sent = ex.datagrams_to_send(0.01)  # sent at once, with a fresh retransmission timer
    assert sent == [b"\x00\x00", encode_natpmp_map_request("udp", 40000, 0, 60)]
    assert ex.get_timer() == pytest.approx(0.26)
    ex.receive_datagram(CAPTURED_NATPMP_MAP, 0.02)
    assert not ex.done  # the external address is still missing
    assert ex.datagrams_to_send(0.26) == [b"\x00\x00"]  # only what is still unanswered
    ex.receive_datagram(CAPTURED_NATPMP_EXTERNAL, 0.3)
    assert ex.done and ex.grant is not None and ex.grant.method is Method.NATPMP
    assert (ex.grant.external_ip, ex.grant.external_port, ex.grant.lifetime) == (
        "203.0.113.10",
        40000,
        60,
    )
    assert ex.grant.internal_ip == "10.1.0.10"


def test_pcp_unsupp_version_falls_back_too_unless_told_not_to() -> None:
    reply = struct.pack("!BBBBII", 2, 0x81, 0, PcpResult.UNSUPP_VERSION, 0, 5) + bytes(12)
    ex = exchange()
    ex.datagrams_to_send(0.0)
    ex.receive_datagram(reply, 0.01)
    assert ex.method is Method.NATPMP and not ex.done
    strict = exchange(natpmp_fallback=False)
    strict.datagrams_to_send(0.0)
    strict.receive_datagram(reply, 0.01)
    assert strict.done and isinstance(strict.error, GatewayRefused)


def test_natpmp_alone_and_its_refusal() -> None:
    ex = exchange(use_pcp=False, internal_port=40000)
    assert ex.datagrams_to_send(0.0)[0] == b"\x00\x00"
    ex.receive_datagram(natpmp_map_reply(40000, 0, 0, result=NatPmpResult.OUT_OF_RESOURCES), 0.1)
    assert ex.done and isinstance(ex.error, GatewayRefused) and ex.error.code == 4


def test_natpmp_delete_sends_one_request_and_needs_no_address() -> None:
    ex = exchange(use_pcp=False, internal_port=40000, lifetime=0, suggested_external_port=40000)
    assert ex.datagrams_to_send(0.0) == [encode_natpmp_map_request("udp", 40000, 0, 0)]
    ex.receive_datagram(natpmp_map_reply(40000, 0, 0), 0.1)
    assert ex.grant is not None and ex.grant.lifetime == 0


def test_pcp_delete_accepts_the_captured_reply() -> None:
    ex = exchange(lifetime=0, suggested_external_port=4001)
    ex.datagrams_to_send(0.0)
    ex.receive_datagram(CAPTURED_PCP_DELETE, 0.1)
    assert ex.grant is not None and ex.grant.lifetime == 0


def test_gateway_without_an_external_address_is_an_error() -> None:
    ex = exchange(use_pcp=False, internal_port=40000)
    ex.datagrams_to_send(0.0)
    ex.receive_datagram(natpmp_map_reply(40000, 40000, 60), 0.1)
    ex.receive_datagram(natpmp_address_reply(bytes(4)), 0.1)
    assert ex.done and isinstance(ex.error, PortMapError) and "0.0.0.0" in str(ex.error)


def test_granted_port_zero_is_malformed() -> None:
    ex = exchange(use_pcp=False, internal_port=40000)
    ex.datagrams_to_send(0.0)
    ex.receive_datagram(natpmp_map_reply(40000, 0, 60), 0.1)
    assert not ex.done and "external port 0" in (ex.last_malformed or "")


def test_unreachable_gateway_ends_the_exchange() -> None:
    ex = exchange()
    ex.datagrams_to_send(0.0)
    ex.receive_unreachable()
    assert ex.done and isinstance(ex.error, NoGateway) and "5351" in str(ex.error)


def test_bad_construction_values_are_refused() -> None:
    with pytest.raises(ValueError):
        exchange(protocol="icmp")
    with pytest.raises(ValueError):
        exchange(initial_retransmit=0)


@given(st.binary(max_size=200), st.booleans())
def test_no_datagram_crashes_the_exchange(data: bytes, pcp: bool) -> None:
    ex = exchange(use_pcp=pcp)
    ex.datagrams_to_send(0.0)
    ex.receive_datagram(data, 0.1)
    assert ex.done or ex.malformed <= 1
    if ex.done:
        assert (ex.grant is None) != (ex.error is None)
