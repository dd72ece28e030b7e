"""libp2p TLS (tls spec): the self-signed certificate that binds a TLS key to a peer ID.

Each endpoint makes a fresh ECDSA P-256 certificate whose extension 1.3.6.1.4.1.53594.1.1
carries `SignedKey{publicKey: protobuf host key, signature: host-key signature over
"libp2p-tls-handshake:" + the certificate's SubjectPublicKeyInfo}`. The remote's peer ID is
derived from that extension after the TLS handshake, never from a CA. Pure functions, no I/O.
"""

from __future__ import annotations

import datetime
import secrets

from cryptography import x509
from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID

from transport.errors import HandshakeFailed, InvalidPeerId, InvalidSignature
from transport.identity import KeyPair, PeerId, PublicKey

ALPN = "libp2p"  # tls spec: ALPN
EXTENSION_OID = x509.ObjectIdentifier("1.3.6.1.4.1.53594.1.1")  # tls spec
SIGNATURE_PREFIX = b"libp2p-tls-handshake:"  # tls spec
CERTIFICATE_LIFETIME = datetime.timedelta(days=365)
CLOCK_SKEW = datetime.timedelta(hours=1)  # our NotBefore is backdated by this much

# Critical extensions a libp2p certificate may carry that we understand.
_UNDERSTOOD_CRITICAL = {
    EXTENSION_OID,
    ExtensionOID.BASIC_CONSTRAINTS,
    ExtensionOID.KEY_USAGE,
    ExtensionOID.EXTENDED_KEY_USAGE,
}


class InvalidCertificate(HandshakeFailed):
    """The remote's certificate does not prove a libp2p identity."""


def make_certificate(
    identity: KeyPair, now: datetime.datetime | None = None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A fresh self-signed certificate for `identity`, and the certificate's private key."""
    now = now or datetime.datetime.now(datetime.UTC)
    certificate_key = ec.generate_private_key(ec.SECP256R1())
    spki = certificate_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signed_key = encode_signed_key(
        identity.public_key.to_protobuf(), identity.sign(SIGNATURE_PREFIX + spki)
    )
    name = x509.Name([x509.NameAttribute(x509.NameOID.SERIAL_NUMBER, "1")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(certificate_key.public_key())
        .serial_number(int.from_bytes(secrets.token_bytes(8), "big") >> 1)
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CERTIFICATE_LIFETIME)
        .add_extension(x509.UnrecognizedExtension(EXTENSION_OID, signed_key), critical=True)
        .sign(certificate_key, hashes.SHA256())
    )
    return certificate, certificate_key


def verify_certificate(
    certificate: x509.Certificate | bytes,
    chain_length: int = 1,
    now: datetime.datetime | None = None,
) -> PeerId:
    """The peer ID the certificate proves, or `InvalidCertificate` saying why not.

    Checks what the spec demands: a single certificate, currently valid, a valid
    self-signature, no critical extension we do not understand, the libp2p extension present,
    and the host key's signature over the certificate key.
    """
    if isinstance(certificate, bytes):
        try:
            certificate = x509.load_der_x509_certificate(certificate)
        except ValueError as exc:
            raise InvalidCertificate(f"certificate does not parse: {exc}") from exc
    if chain_length != 1:
        raise InvalidCertificate(f"expected exactly one certificate, got {chain_length}")
    now = now or datetime.datetime.now(datetime.UTC)
    if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
        raise InvalidCertificate(
            f"certificate is not valid now (valid {certificate.not_valid_before_utc} to "
            f"{certificate.not_valid_after_utc}); check the clocks of both machines"
        )
    try:
        certificate.verify_directly_issued_by(certificate)
    except (ValueError, TypeError, _CryptoInvalidSignature) as exc:
        raise InvalidCertificate(f"certificate self-signature is invalid: {exc!r}") from exc
    extension_value: bytes | None = None
    for extension in certificate.extensions:
        if extension.oid == EXTENSION_OID:
            extension_value = extension.value.value
        elif extension.critical and extension.oid not in _UNDERSTOOD_CRITICAL:
            raise InvalidCertificate(f"unknown critical extension {extension.oid.dotted_string}")
    if extension_value is None:
        raise InvalidCertificate("certificate lacks the libp2p public key extension")
    public_key_bytes, signature = decode_signed_key(extension_value)
    try:
        host_key = PublicKey.from_protobuf(public_key_bytes)
    except InvalidPeerId as exc:
        raise InvalidCertificate(f"libp2p extension carries a bad host key: {exc}") from exc
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        host_key.verify(signature, SIGNATURE_PREFIX + spki)
    except InvalidSignature as exc:
        raise InvalidCertificate(f"host key signature over the certificate key: {exc}") from exc
    return host_key.peer_id()


# -- SignedKey ::= SEQUENCE { publicKey OCTET STRING, signature OCTET STRING } (DER) --------
def _der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    encoded = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(encoded)]) + encoded


def _der_tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(body)) + body


def encode_signed_key(public_key: bytes, signature: bytes) -> bytes:
    return _der_tlv(0x30, _der_tlv(0x04, public_key) + _der_tlv(0x04, signature))


def _read_tlv(data: bytes, offset: int, tag: int) -> tuple[bytes, int]:
    if offset + 2 > len(data) or data[offset] != tag:
        raise InvalidCertificate("libp2p extension is not a DER SignedKey")
    length = data[offset + 1]
    offset += 2
    if length & 0x80:
        size = length & 0x7F
        if size == 0 or size > 4 or offset + size > len(data):
            raise InvalidCertificate("libp2p extension has a bad DER length")
        length = int.from_bytes(data[offset : offset + size], "big")
        offset += size
    if offset + length > len(data):
        raise InvalidCertificate("libp2p extension is truncated")
    return data[offset : offset + length], offset + length


def decode_signed_key(data: bytes) -> tuple[bytes, bytes]:
    """(protobuf public key, signature) from the extension's DER bytes."""
    body, end = _read_tlv(data, 0, 0x30)
    if end != len(data):
        raise InvalidCertificate("trailing bytes after the SignedKey")
    public_key, offset = _read_tlv(body, 0, 0x04)
    signature, offset = _read_tlv(body, offset, 0x04)
    if offset != len(body):
        raise InvalidCertificate("trailing bytes inside the SignedKey")
    return public_key, signature
