"""identify messages: encoding, the key check, and tolerance of junk fields."""

from __future__ import annotations

import pytest

from transport.errors import ProtocolViolation
from transport.identity import KeyPair
from transport.multiaddr import Multiaddr
from transport.pb import identify_pb2
from transport.protocols.identify import decode_identify, encode_identify


def test_round_trip() -> None:
    key = KeyPair.generate()
    listen = [Multiaddr.parse("/ip4/198.51.100.7/udp/4001/quic-v1")]
    observed = Multiaddr.parse("/ip4/203.0.113.9/udp/5555/quic-v1")
    wire = encode_identify(key.public_key, listen, observed, ["/ipfs/ping/1.0.0"], "/v/1", "agent")
    info = decode_identify(wire, key.peer_id)
    assert info.listen_addrs == listen
    assert info.observed_addr == observed
    assert info.protocols == ["/ipfs/ping/1.0.0"]
    assert (info.protocol_version, info.agent_version) == ("/v/1", "agent")


def test_key_of_another_peer_is_refused() -> None:
    wire = encode_identify(KeyPair.generate().public_key, [], None, [], "/v/1", "a")
    with pytest.raises(ProtocolViolation, match="belongs to"):
        decode_identify(wire, KeyPair.generate().peer_id)


def test_malformed_message_is_refused() -> None:
    with pytest.raises(ProtocolViolation):
        decode_identify(b"\xff\xff\xff\xff", KeyPair.generate().peer_id)


def test_bad_addresses_are_skipped_not_fatal() -> None:
    key = KeyPair.generate()
    message = identify_pb2.Identify(
        publicKey=key.public_key.to_protobuf(),
        listenAddrs=[b"\xff\xff", Multiaddr.parse("/ip4/1.2.3.4/udp/1/quic-v1").to_bytes()],
        observedAddr=b"\x04\x01",
    )
    info = decode_identify(message.SerializeToString(), key.peer_id)
    assert [str(a) for a in info.listen_addrs] == ["/ip4/1.2.3.4/udp/1/quic-v1"]
    assert info.observed_addr is None
