"""Adversarial checks of libp2p mutual TLS on the qh3 engine (review of transport.quic.glue_qh3).

Each libp2p TLS rule (the server requests a client certificate; both sides check the peer's
certificate, its libp2p extension, its CertificateVerify, its validity, the dialer its expected
peer ID; ALPN "libp2p") is attacked from the client and from the server. Handshake-message
tampering runs sans-I/O on two qh3 engines; whole dials run over loopback UDP, so the
connection layer's verdict (transport.quic.connection, which calls transport.tls) is what is
checked.
"""

from __future__ import annotations

import asyncio
import datetime
import ssl
from collections.abc import AsyncIterator, Callable

import pytest
from aioquic.asyncio.client import connect as aioquic_connect
from aioquic.quic.configuration import QuicConfiguration as AioquicConfiguration
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.transport.conftest import EndpointPair, wait_until
from transport.errors import DialTimeout, HandshakeFailed, PeerIdMismatch
from transport.identity import KeyPair
from transport.quic import QuicConfig, QuicEndpoint
from transport.tls import (
    ALPN,
    EXTENSION_OID,
    SIGNATURE_PREFIX,
    InvalidCertificate,
    encode_signed_key,
    make_certificate,
    verify_certificate,
)

pytest.importorskip("qh3", reason="qh3 is not installed (the qh3 QUIC engine is optional)")

from qh3 import tls
from qh3._hazmat import Buffer

from tests.transport.quic.in_memory_qh3 import handshake as _run
from tests.transport.quic.in_memory_qh3 import qh3_engine as _engine
from transport.quic.engine_qh3 import Qh3Engine

CERTIFICATE, CERTIFICATE_VERIFY, FINISHED = 11, 15, 20  # RFC 8446 HandshakeType
CERTIFICATE_REQUEST = 13
UNEXPECTED_MESSAGE, HANDSHAKE_FAILURE, DECRYPT_ERROR = 10, 40, 51  # RFC 8446 AlertDescription


# -- certificates a peer should not get away with ---------------------------------------
def foreign_extension_certificate(
    identity: KeyPair,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed certificate whose libp2p extension signs another certificate key."""
    donor, _ = make_certificate(identity)  # its extension signs the donor's key, not ours
    extension = donor.extensions.get_extension_for_oid(EXTENSION_OID).value
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(donor.subject)
        .issuer_name(donor.subject)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(extension, critical=True)
        .sign(key, hashes.SHA256())
    )
    return certificate, key


def expired_certificate(identity: KeyPair) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=800)
    return make_certificate(identity, now=long_ago)


def not_yet_valid_certificate(
    identity: KeyPair,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    return make_certificate(
        identity, now=datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=2)
    )


# -- sans-I/O: two qh3 engines -----------------------------------------------------------
def _pair(client_certificate=None, server_certificate=None) -> tuple[Qh3Engine, Qh3Engine]:
    client = _engine(KeyPair.generate(), certificate=client_certificate)
    server = _engine(
        KeyPair.generate(),
        original_cid=client._quic.original_destination_connection_id,
        certificate=server_certificate,
    )
    return client, server


def _messages(data: bytes) -> list[bytes]:
    out, position = [], 0
    while position + 4 <= len(data):
        end = position + 4 + int.from_bytes(data[position + 1 : position + 4], "big")
        out.append(data[position:end])
        position = end
    assert position == len(data)
    return out


def _tamper_client_flight(client: Qh3Engine, edit: Callable[[list[bytes]], list[bytes]]):
    """After connect: rewrite the client's handshake-epoch flight (Certificate,
    CertificateVerify, Finished) before QUIC encrypts it."""

    def install() -> None:
        context = client._quic.tls
        original = context.handle_message

        def handle_message(data, buffers, epoch=-1):
            mine = {e: Buffer(capacity=len(b.data) + 65536) for e, b in buffers.items()}
            original(data, mine, epoch)
            for e, buffer in mine.items():
                output = buffer.data
                if e == tls.Epoch.HANDSHAKE and output:
                    messages = _messages(output)
                    assert [m[0] for m in messages] == [CERTIFICATE, CERTIFICATE_VERIFY, FINISHED]
                    output = b"".join(edit(messages))
                buffers[e].push_bytes(output)

        context.handle_message = handle_message

    return install


def _refused_by_tls(
    server: Qh3Engine, server_events: list[str], alert: int | None, reason: str
) -> None:
    """The server never authenticated the client and closed with this TLS alert (None: any)."""
    assert "HandshakeCompleted" not in server_events
    close = server._quic._close_event
    assert close is not None, "the server neither completed nor closed the handshake"
    if alert is None:
        assert 0x100 <= close.error_code <= 0x1FF  # QUIC CRYPTO_ERROR: some TLS alert
    else:
        assert close.error_code == 0x100 + alert  # QUIC CRYPTO_ERROR + the TLS alert
    assert reason in close.reason_phrase


def _messages_loose(data: bytes) -> list[bytes]:
    out, position = [], 0
    while position + 4 <= len(data):
        end = position + 4 + int.from_bytes(data[position + 1 : position + 4], "big")
        out.append(data[position:end])
        position = end
    return out


def test_the_server_requests_a_client_certificate() -> None:
    client, server = _pair()
    requests: list[bytes] = []

    def spy() -> None:
        context = client._quic.tls
        original = context.handle_message

        def handle_message(data, buffers, epoch=-1):
            if epoch == tls.Epoch.HANDSHAKE:
                requests.extend(m for m in _messages_loose(data) if m[0] == CERTIFICATE_REQUEST)
            original(data, buffers, epoch)

        context.handle_message = handle_message

    _, server_events = _run(client, server, spy)
    assert "HandshakeCompleted" in server_events
    assert requests, "no CertificateRequest reached the client"


def test_a_client_that_skips_certificate_and_verify_is_refused() -> None:
    client, server = _pair()
    edit = _tamper_client_flight(client, lambda ms: [m for m in ms if m[0] == FINISHED])
    _, server_events = _run(client, server, edit)
    _refused_by_tls(server, server_events, UNEXPECTED_MESSAGE, "")


def test_a_client_that_skips_its_certificate_verify_is_refused() -> None:
    client, server = _pair()
    edit = _tamper_client_flight(client, lambda ms: [m for m in ms if m[0] != CERTIFICATE_VERIFY])
    _, server_events = _run(client, server, edit)
    _refused_by_tls(server, server_events, UNEXPECTED_MESSAGE, "")


def test_an_empty_certificate_message_followed_by_a_certificate_verify_is_refused() -> None:
    empty = bytes([CERTIFICATE]) + (4).to_bytes(3, "big") + b"\x00" + b"\x00\x00\x00"
    client, server = _pair()
    edit = _tamper_client_flight(
        client, lambda ms: [empty if m[0] == CERTIFICATE else m for m in ms]
    )
    _, server_events = _run(client, server, edit)
    _refused_by_tls(server, server_events, None, "")


def test_a_swapped_client_certificate_fails_its_certificate_verify() -> None:
    """The client shows someone else's (valid libp2p) certificate it holds no key for."""
    client, server = _pair()
    other = _engine(KeyPair.generate())
    stolen = other._quic.configuration.certificate.public_bytes()

    def swap(messages: list[bytes]) -> list[bytes]:
        out = []
        for message in messages:
            if message[0] == CERTIFICATE:
                body = b"\x00" + _u24(len(stolen) + 5) + _u24(len(stolen)) + stolen + b"\x00\x00"
                message = bytes([CERTIFICATE]) + _u24(len(body)) + body
            out.append(message)
        return out

    _, server_events = _run(client, server, _tamper_client_flight(client, swap))
    _refused_by_tls(server, server_events, DECRYPT_ERROR, "")


def _u24(n: int) -> bytes:
    return n.to_bytes(3, "big")


def test_a_client_certificate_verify_over_another_context_is_refused() -> None:
    """A signature by the right key, but over the server's CertificateVerify context string
    (a server's signature replayed as a client's must not verify)."""
    client, server = _pair()

    def sign_with_the_server_context() -> None:
        context = client._quic.tls
        handle = context.handle_message

        def handle_message(data, buffers, epoch=-1):
            schedule = context.key_schedule
            if schedule is not None and not hasattr(context, "_review_patched"):
                real = schedule.certificate_verify_data
                schedule.certificate_verify_data = lambda _label: real(
                    b"TLS 1.3, server CertificateVerify"
                )
                context._review_patched = True
            handle(data, buffers, epoch)

        context.handle_message = handle_message

    _, server_events = _run(client, server, sign_with_the_server_context)
    _refused_by_tls(server, server_events, DECRYPT_ERROR, "")


def test_a_client_certificate_chain_is_seen_and_refused() -> None:
    client, server = _pair()
    extra = _engine(KeyPair.generate())._quic.configuration.certificate
    client._quic.configuration.certificate_chain = [extra]
    _, server_events = _run(client, server)
    assert "HandshakeCompleted" in server_events  # TLS takes a chain; libp2p must not
    certificate, chain = server.peer_certificate()
    assert chain == 2
    with pytest.raises(InvalidCertificate, match="exactly one"):
        verify_certificate(certificate, chain)


@pytest.mark.parametrize(
    "make", [foreign_extension_certificate, expired_certificate, not_yet_valid_certificate]
)
def test_bad_client_certificates_reach_the_libp2p_check_and_fail_it(make) -> None:
    client, server = _pair(client_certificate=make(KeyPair.generate()))
    _, server_events = _run(client, server)
    assert "HandshakeCompleted" in server_events  # TLS (verify_mode 0) lets it through ...
    certificate, chain = server.peer_certificate()
    assert certificate is not None
    with pytest.raises(InvalidCertificate):  # ... the libp2p check the connection runs must not
        verify_certificate(certificate, chain)


def _impostor_key():
    _, key = make_certificate(KeyPair.generate())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return tls.load_pem_private_key(pem, password=None)


def test_a_forged_server_certificate_verify_fails_the_client() -> None:
    """The server shows its certificate but signs its CertificateVerify with another key."""
    client, server = _pair()
    create_tls = server._quic._create_tls

    def create_forging_tls(remote_source_cid):
        bridge = create_tls(remote_source_cid)
        bridge.tls.certificate_private_key = _impostor_key()
        return bridge

    server._quic._create_tls = create_forging_tls
    client_events, _ = _run(client, server)
    assert "HandshakeCompleted" not in client_events
    close = client._quic._close_event
    assert close is not None and close.error_code != 0


def test_a_client_offering_another_alpn_is_refused() -> None:
    client, server = _pair()
    client._quic.configuration.alpn_protocols = ["h3"]
    _, server_events = _run(client, server)
    _refused_by_tls(server, server_events, HANDSHAKE_FAILURE, "ALPN")


def test_a_client_offering_no_alpn_is_refused() -> None:
    client, server = _pair()
    client._quic.configuration.alpn_protocols = None
    _, server_events = _run(client, server)
    _refused_by_tls(server, server_events, HANDSHAKE_FAILURE, "ALPN")


# -- whole dials over loopback: the connection layer's verdict ----------------------------
@pytest.fixture
async def qh3_pair() -> AsyncIterator[EndpointPair]:
    pair = EndpointPair(
        QuicConfig(engine="qh3", handshake_timeout=2.0, idle_timeout=5.0, keepalive_interval=1.0)
    )
    await pair.start()
    try:
        yield pair
    finally:
        await pair.close()


def _use_certificate(endpoint, certificate_and_key) -> None:
    endpoint._certificate, endpoint._certificate_key = certificate_and_key


@pytest.mark.parametrize(
    "make", [foreign_extension_certificate, expired_certificate, not_yet_valid_certificate]
)
async def test_a_dialer_refuses_a_server_with_a_bad_certificate(qh3_pair, make) -> None:
    _use_certificate(qh3_pair.server, make(qh3_pair.server_key))
    with pytest.raises(HandshakeFailed):
        await qh3_pair.dial()
    assert qh3_pair.client.connections == []


@pytest.mark.parametrize(
    "make", [foreign_extension_certificate, expired_certificate, not_yet_valid_certificate]
)
async def test_a_listener_refuses_a_client_with_a_bad_certificate(qh3_pair, make) -> None:
    """The dialer may finish its side of the handshake first; the listener then closes."""
    _use_certificate(qh3_pair.client, make(qh3_pair.client_key))
    try:
        connection = await qh3_pair.dial()
    except HandshakeFailed:
        pass
    else:
        await wait_until(lambda: connection.is_closed, timeout=5.0)
    await wait_until(lambda: qh3_pair.server.connections == [], timeout=5.0)
    assert qh3_pair.server_connections == []  # never established on the listener


async def test_a_dialer_refuses_the_wrong_peer_id(qh3_pair) -> None:
    with pytest.raises(PeerIdMismatch):
        await qh3_pair.client.dial(qh3_pair.server_address, KeyPair.generate().peer_id)


@pytest.mark.parametrize("dialer_engine", ["qh3", "aioquic"])
async def test_a_dialer_refuses_a_server_that_negotiates_no_alpn(dialer_engine: str) -> None:
    config = QuicConfig(engine="qh3", handshake_timeout=2.0, idle_timeout=5.0)
    server_key = KeyPair.generate()
    server = QuicEndpoint(server_key, config)
    client = QuicEndpoint(KeyPair.generate(), config.model_copy(update={"engine": dialer_engine}))
    make_engine = server._engine

    def engine_without_alpn(address, original_cid=None):
        engine = make_engine(address, original_cid)
        engine._quic.configuration.alpn_protocols = None  # negotiates nothing, sends no ALPN
        return engine

    server._engine = engine_without_alpn
    try:
        address = await server.listen("127.0.0.1")
        await client.listen("127.0.0.1")
        # (aioquic's refusal sometimes surfaces as a DialTimeout: no established connection)
        with pytest.raises((HandshakeFailed, DialTimeout)):
            await client.dial(address, server_key.peer_id)
        assert client.connections == []
    finally:
        await client.close()
        await server.close()


async def test_refusing_a_client_without_certificate_raises_nothing_in_callbacks(
    qh3_pair,
) -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        configuration = AioquicConfiguration(
            is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE
        )
        host, port = qh3_pair.server_address
        try:
            async with asyncio.timeout(4):
                async with aioquic_connect(
                    host, port, configuration=configuration, wait_connected=True
                ) as attacker:
                    await attacker.wait_closed()
        except TimeoutError:
            pass  # the listener's close may not reach the attacker; the listener must not care
        await wait_until(lambda: qh3_pair.server.connections == [], timeout=5.0)
    finally:
        loop.set_exception_handler(previous)
    assert qh3_pair.server_connections == []
    ours = [e for e in errors if str(e.get("message", "")).startswith("Exception in callback")]
    assert ours == [], [repr(e.get("exception")) for e in ours]


def rsa_certificate(identity: KeyPair) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """A valid libp2p certificate whose certificate key is RSA (the spec allows any)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signed_key = encode_signed_key(
        identity.public_key.to_protobuf(), identity.sign(SIGNATURE_PREFIX + spki)
    )
    name = x509.Name([x509.NameAttribute(x509.NameOID.SERIAL_NUMBER, "1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(9)
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.UnrecognizedExtension(EXTENSION_OID, signed_key), critical=True)
        .sign(key, hashes.SHA256())
    )
    return certificate, key


def test_an_rsa_client_certificate_signing_with_pss_is_accepted() -> None:
    """The baseline for the next test: an RSA certificate key is fine in itself."""
    client_key = KeyPair.generate()
    client, server = _pair(client_certificate=rsa_certificate(client_key))
    _, server_events = _run(client, server)
    assert "HandshakeCompleted" in server_events
    assert verify_certificate(*server.peer_certificate()) == client_key.peer_id


def test_a_client_certificate_verify_with_pkcs1_is_refused() -> None:
    client, server = _pair(client_certificate=rsa_certificate(KeyPair.generate()))

    def prefer_pkcs1() -> None:
        context = client._quic.tls
        handle_request = context._client_handle_certificate_request

        def handle_certificate_request(input_buf) -> None:
            handle_request(input_buf)  # hashed as received; only the client's choice changes
            context._certificate_request.signature_algorithms = [
                tls.SignatureAlgorithm.RSA_PKCS1_SHA256
            ]

        context._client_handle_certificate_request = handle_certificate_request

    algorithms: list[int] = []

    def record(messages: list[bytes]) -> list[bytes]:
        algorithms.extend(int.from_bytes(m[4:6], "big") for m in messages if m[0] == 15)
        return messages

    spy = _tamper_client_flight(client, record)
    _, server_events = _run(client, server, lambda: (prefer_pkcs1(), spy()))
    assert algorithms == [tls.SignatureAlgorithm.RSA_PKCS1_SHA256]  # what the client signed with
    assert "HandshakeCompleted" not in server_events
