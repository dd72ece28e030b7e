"""Multiaddrs: text and binary forms, and refusal of bad input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from transport.errors import InvalidMultiaddr
from transport.identity import KeyPair
from transport.multiaddr import Multiaddr, quic_multiaddr, quic_socket_address

PEER = KeyPair.from_seed(bytes(32)).peer_id


@pytest.mark.parametrize(
    "text",
    [
        "/ip4/127.0.0.1/udp/4001/quic-v1",
        f"/ip4/203.0.113.7/udp/4001/quic-v1/p2p/{PEER}",
        "/ip6/::1/udp/4001/quic-v1",
        "/ip4/1.2.3.4/tcp/4001",
        f"/ip4/198.51.100.1/udp/4001/quic-v1/p2p/{PEER}/p2p-circuit/p2p/{PEER}",
        "/dns4/example.org/tcp/443/wss",
    ],
)
def test_text_and_binary_round_trip(text: str) -> None:
    addr = Multiaddr.parse(text)
    assert str(addr) == text
    assert Multiaddr.from_bytes(addr.to_bytes()) == addr


def test_known_binary_encoding() -> None:
    # /ip4/127.0.0.1/udp/4001/quic-v1: 04 7f000001, 9102 0fa1, cd03 (multiaddr spec codes)
    addr = Multiaddr.parse("/ip4/127.0.0.1/udp/4001/quic-v1")
    assert addr.to_bytes().hex() == "047f000001" + "9102" + "0fa1" + "cd03"


def test_peer_id_helpers() -> None:
    base = Multiaddr.parse("/ip4/127.0.0.1/udp/4001/quic-v1")
    full = base.with_peer_id(PEER)
    assert full.peer_id == PEER
    assert full.without_peer_id() == base
    assert base.peer_id is None
    relayed = Multiaddr.parse(f"{full}/p2p-circuit/p2p/{KeyPair.generate().peer_id}")
    assert relayed.is_relayed and not full.is_relayed


def test_quic_socket_address_helpers() -> None:
    assert quic_socket_address(quic_multiaddr("10.0.0.1", 5, PEER)) == ("10.0.0.1", 5)
    assert str(quic_multiaddr("::1", 7)) == "/ip6/::1/udp/7/quic-v1"
    with pytest.raises(InvalidMultiaddr, match="not a direct QUIC address"):
        quic_socket_address(Multiaddr.parse("/ip4/1.2.3.4/tcp/1"))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ip4/1.2.3.4",
        "/ip4/300.1.1.1/udp/1",
        "/ip4/1.2.3.4/udp/70000",
        "/ip4/1.2.3.4/udp",
        "/nosuch/1",
        "/p2p/notapeerid",
        "/ip6/zz::1/udp/1",
    ],
)
def test_bad_text_is_refused(text: str) -> None:
    with pytest.raises(InvalidMultiaddr):
        Multiaddr.parse(text)


@given(st.binary(max_size=200))
def test_random_bytes_never_crash_the_decoder(data: bytes) -> None:
    try:
        addr = Multiaddr.from_bytes(data)
    except InvalidMultiaddr:
        return
    assert Multiaddr.from_bytes(addr.to_bytes()) == addr


def test_oversized_binary_is_refused() -> None:
    with pytest.raises(InvalidMultiaddr):
        Multiaddr.from_bytes(b"\x35" + b"\xff\x7f" + b"a" * 20000)
