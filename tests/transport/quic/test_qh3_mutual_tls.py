"""qh3's TLS with our client authentication (transport.quic.glue_qh3): sans-I/O, no sockets.

Two qh3 engines pass datagrams to each other in memory. The server must request the client's
certificate, both must see each other's libp2p peer ID, and a forged CertificateVerify or a
client without a certificate must not authenticate.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization

from transport.identity import KeyPair
from transport.quic.engine import QuicEngine
from transport.tls import make_certificate, verify_certificate

pytest.importorskip("qh3", reason="qh3 is not installed (the qh3 QUIC engine is optional)")

from qh3 import tls
from qh3._hazmat import Buffer

from tests.transport.quic.in_memory_qh3 import CLIENT, SERVER
from tests.transport.quic.in_memory_qh3 import handshake as _handshake
from tests.transport.quic.in_memory_qh3 import qh3_engine as _engine
from transport.quic.glue_qh3 import CLIENT_SIGNATURE_ALGORITHMS, certificate_request


def _pair(client_key: KeyPair, server_key: KeyPair, **client_overrides):
    client = _engine(client_key, **client_overrides)
    server = _engine(server_key, original_cid=client._quic.original_destination_connection_id)
    return client, server


def test_the_qh3_engine_fills_the_engine_seam() -> None:
    assert isinstance(_engine(KeyPair.generate()), QuicEngine)


def test_the_certificate_request_is_what_qh3_itself_parses() -> None:
    request = tls.pull_certificate_request(Buffer(data=certificate_request()))
    assert request.request_context == b""
    assert request.signature_algorithms == list(CLIENT_SIGNATURE_ALGORITHMS)


def test_both_sides_learn_the_other_peer_id_from_its_certificate() -> None:
    client_key, server_key = KeyPair.generate(), KeyPair.generate()
    client, server = _pair(client_key, server_key)
    client_events, server_events = _handshake(client, server)
    assert "HandshakeCompleted" in client_events
    assert "HandshakeCompleted" in server_events
    certificate, chain = server.peer_certificate()
    assert certificate is not None and chain == 1
    assert verify_certificate(certificate, chain) == client_key.peer_id
    certificate, chain = client.peer_certificate()
    assert verify_certificate(certificate, chain) == server_key.peer_id


def test_data_flows_after_client_authentication() -> None:
    client, server = _pair(KeyPair.generate(), KeyPair.generate())
    _handshake(client, server)
    stream_id = client.get_next_available_stream_id()
    client.send_stream_data(stream_id, b"over mutual TLS", end_stream=True)
    for data, _ in client.datagrams_to_send(1.0):
        server.receive_datagram(data, CLIENT, 1.0)
    received = b""
    while (event := server.next_event()) is not None:
        if type(event).__name__ == "StreamDataReceived":
            received += event.data
    assert received == b"over mutual TLS"


def test_a_client_without_a_certificate_is_refused_by_tls() -> None:
    """The server answers an empty Certificate with the certificate_required alert."""
    client, server = _pair(KeyPair.generate(), KeyPair.generate())
    client._quic.configuration.certificate = None
    client._quic.configuration.private_key = None
    _, server_events = _handshake(client, server)
    assert "HandshakeCompleted" not in server_events
    assert server.peer_certificate() == (None, 0)
    refusal = server._quic._close_event
    assert refusal is not None and refusal.error_code == 0x100 + 116  # certificate_required


def test_a_forged_client_certificate_verify_fails_the_handshake() -> None:
    """A client that shows a certificate but cannot sign with its key is refused by TLS."""
    client, server = _pair(KeyPair.generate(), KeyPair.generate())
    _, other_key = make_certificate(KeyPair.generate())
    impostor = tls.load_pem_private_key(
        other_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        password=None,
    )
    client.connect(SERVER, 0.0)
    client._quic.tls.certificate_private_key = impostor  # signs for a certificate it lacks
    server_events: list = []
    now = 0.0
    for _ in range(10):
        for sender, receiver, source in ((client, server, CLIENT), (server, client, SERVER)):
            for data, _ in sender.datagrams_to_send(now):
                receiver.receive_datagram(data, source, now)
        while (event := server.next_event()) is not None:
            server_events.append(type(event).__name__)
        while client.next_event() is not None:
            pass
        now += 0.001
    assert "HandshakeCompleted" not in server_events
    assert server.peer_certificate()[0] is not None  # shown, but never proven
    refusal = server._quic._close_event
    assert refusal is not None and "CertificateVerify" in refusal.reason_phrase
