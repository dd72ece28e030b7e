"""libp2p TLS certificates: the spec's test vectors, our own round trip, and forgeries."""

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from transport.identity import KeyPair, PeerId
from transport.tls import (
    EXTENSION_OID,
    InvalidCertificate,
    decode_signed_key,
    encode_signed_key,
    make_certificate,
    verify_certificate,
)

# libp2p/specs tls/tls.md, "Test vectors" (hex DER certificates).
SPEC_VECTORS = [
    (
        (
            "308201ae30820156a0030201020204499602d2300a06082a8648ce3d040302302031123010060355040a1309"
            "6c69627032702e696f310a300806035504051301313020170d3735303130313133303030305a180f34303936"
            "303130313133303030305a302031123010060355040a13096c69627032702e696f310a300806035504051301"
            "313059301306072a8648ce3d020106082a8648ce3d030107034200040c901d423c831ca85e27c73c263ba132"
            "721bb9d7a84c4f0380b2a6756fd601331c8870234dec878504c174144fa4b14b66a651691606d8173e55bd37"
            "e381569ea37c307a3078060a2b0601040183a25a0101046a3068042408011220a77f1d92fedb59dddaea5a1c"
            "4abd1ac2fbde7d7b879ed364501809923d7c11b90440d90d2769db992d5e6195dbb08e706b6651e024fda6cf"
            "b8846694a435519941cac215a8207792e42849cccc6cd8136c6e4bde92a58c5e08cfd4206eb5fe0bf909300a"
            "06082a8648ce3d0403020346003043021f50f6b6c52711a881778718238f650c9fb48943ae6ee6d28427dc60"
            "71ae55e702203625f116a7a454db9c56986c82a25682f7248ea1cb764d322ea983ed36a31b77"
        ),
        "12D3KooWM6CgA9iBFZmcYAHA6A2qvbAxqfkmrYiRQuz3XEsk4Ksv",
    ),
    (
        (
            "308201f63082019da0030201020204499602d2300a06082a8648ce3d040302302031123010060355040a1309"
            "6c69627032702e696f310a300806035504051301313020170d3735303130313133303030305a180f34303936"
            "303130313133303030305a302031123010060355040a13096c69627032702e696f310a300806035504051301"
            "313059301306072a8648ce3d020106082a8648ce3d030107034200040c901d423c831ca85e27c73c263ba132"
            "721bb9d7a84c4f0380b2a6756fd601331c8870234dec878504c174144fa4b14b66a651691606d8173e55bd37"
            "e381569ea381c23081bf3081bc060a2b0601040183a25a01010481ad3081aa045f0803125b3059301306072a"
            "8648ce3d020106082a8648ce3d03010703420004bf30511f909414ebdd3242178fd290f093a551cf75c97315"
            "5de0bb5a96fedf6cb5d52da7563e794b512f66e60c7f55ba8a3acf3dd72a801980d205e8a1ad29f204473045"
            "0220064ea8124774caf8f50e57f436aa62350ce652418c019df5d98a3ac666c9386a022100aa59d704a931b5"
            "f72fb9222cb6cc51f954d04a4e2e5450f8805fe8918f71eaae300a06082a8648ce3d04030203470030440220"
            "799395b0b6c1e940a7e4484705f610ab51ed376f19ff9d7c16757cfbf61b8d4302206205c03fbb0f95205c77"
            "9be86581d3e31c01871ad5d1f3435bcf375cb0e5088a"
        ),
        "QmfXbAwNjJLXfesgztEHe8HwgVDCMMpZ9Eax1HYq6hn9uE",
    ),
    (
        (
            "308201ba3082015fa0030201020204499602d2300a06082a8648ce3d040302302031123010060355040a1309"
            "6c69627032702e696f310a300806035504051301313020170d3735303130313133303030305a180f34303936"
            "303130313133303030305a302031123010060355040a13096c69627032702e696f310a300806035504051301"
            "313059301306072a8648ce3d020106082a8648ce3d030107034200040c901d423c831ca85e27c73c263ba132"
            "721bb9d7a84c4f0380b2a6756fd601331c8870234dec878504c174144fa4b14b66a651691606d8173e55bd37"
            "e381569ea38184308181307f060a2b0601040183a25a01010471306f0425080212210206dc6968726765b820"
            "f050263ececf7f71e4955892776c0970542efd689d2382044630440220145e15a991961f0d08cd15425bb95e"
            "c93f6ffa03c5a385eedc34ecf464c7a8ab022026b3109b8a3f40ef833169777eb2aa337cfb6282f188de0666"
            "d1bcec2a4690dd300a06082a8648ce3d0403020349003046022100e1a217eeef9ec9204b3f774a08b7084964"
            "6b6a1e6b8b27f93dc00ed58545d9fe022100b00dafa549d0f03547878338c7b15e7502888f6d45db387e5ae6"
            "b5d46899cef0"
        ),
        "16Uiu2HAkutTMoTzDw1tCvSRtu6YoixJwS46S1ZFxW8hSx9fWHiPs",
    ),
]
SPEC_INVALID = (
    "308201f73082019da0030201020204499602d2300a06082a8648ce3d040302302031123010060355040a1309"
    "6c69627032702e696f310a300806035504051301313020170d3735303130313133303030305a180f34303936"
    "303130313133303030305a302031123010060355040a13096c69627032702e696f310a300806035504051301"
    "313059301306072a8648ce3d020106082a8648ce3d030107034200040c901d423c831ca85e27c73c263ba132"
    "721bb9d7a84c4f0380b2a6756fd601331c8870234dec878504c174144fa4b14b66a651691606d8173e55bd37"
    "e381569ea381c23081bf3081bc060a2b0601040183a25a01010481ad3081aa045f0803125b3059301306072a"
    "8648ce3d020106082a8648ce3d03010703420004bf30511f909414ebdd3242178fd290f093a551cf75c97315"
    "5de0bb5a96fedf6cb5d52da7563e794b512f66e60c7f55ba8a3acf3dd72a801980d205e8a1ad29f204473045"
    "022100bb6e03577b7cc7a3cd1558df0da2b117dfdcc0399bc2504ebe7de6f65cade72802206de96e2a5be9b6"
    "202adba24ee0362e490641ac45c240db71fe955f2c5cf8df6e300a06082a8648ce3d04030203480030450221"
    "00e847f267f43717358f850355bdcabbefb2cfbf8a3c043b203a14788a092fe8db022027c1d04a2d41fd6b57"
    "a7e8b3989e470325de4406e52e084e34a3fd56eef0d0df"
)


@pytest.mark.parametrize(("certificate_hex", "peer_id"), SPEC_VECTORS)
def test_spec_vectors_give_their_peer_ids(certificate_hex: str, peer_id: str) -> None:
    assert verify_certificate(bytes.fromhex(certificate_hex)) == PeerId.from_string(peer_id)


def test_spec_invalid_vector_is_refused() -> None:
    with pytest.raises(InvalidCertificate, match="signature"):
        verify_certificate(bytes.fromhex(SPEC_INVALID))


def test_own_certificate_round_trip() -> None:
    identity = KeyPair.generate()
    certificate, _ = make_certificate(identity)
    assert verify_certificate(certificate) == identity.peer_id
    assert certificate.extensions.get_extension_for_oid(EXTENSION_OID).critical


def test_fresh_certificate_key_per_call() -> None:
    identity = KeyPair.generate()
    first, _ = make_certificate(identity)
    second, _ = make_certificate(identity)
    assert first.public_key() != second.public_key()


def test_expired_and_not_yet_valid_certificates_are_refused() -> None:
    identity = KeyPair.generate()
    certificate, _ = make_certificate(identity)
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=400)
    with pytest.raises(InvalidCertificate, match="not valid now"):
        verify_certificate(certificate, now=later)
    earlier = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    with pytest.raises(InvalidCertificate, match="not valid now"):
        verify_certificate(certificate, now=earlier)


def test_chain_of_two_is_refused() -> None:
    certificate, _ = make_certificate(KeyPair.generate())
    with pytest.raises(InvalidCertificate, match="exactly one"):
        verify_certificate(certificate, chain_length=2)


def _certificate_with_extension(signed_key: bytes | None, critical_extra: bool = False):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(x509.NameOID.SERIAL_NUMBER, "1")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
    )
    if signed_key is not None:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(EXTENSION_OID, signed_key), critical=False
        )
    if critical_extra:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4"), b"\x05\x00"),
            critical=True,
        )
    return builder.sign(key, hashes.SHA256())


def test_missing_extension_is_refused() -> None:
    with pytest.raises(InvalidCertificate, match="lacks the libp2p"):
        verify_certificate(_certificate_with_extension(None))


def test_unknown_critical_extension_is_refused() -> None:
    identity = KeyPair.generate()
    signed = encode_signed_key(identity.public_key.to_protobuf(), b"x" * 64)
    with pytest.raises(InvalidCertificate, match="unknown critical"):
        verify_certificate(_certificate_with_extension(signed, critical_extra=True))


def test_signature_by_another_identity_is_refused() -> None:
    """A certificate claiming identity A but signed by B's host key proves nothing."""
    claimed, signer = KeyPair.generate(), KeyPair.generate()
    forged = encode_signed_key(claimed.public_key.to_protobuf(), signer.sign(b"anything"))
    with pytest.raises(InvalidCertificate, match="signature"):
        verify_certificate(_certificate_with_extension(forged))


@pytest.mark.parametrize(
    "garbage",
    [b"", b"\x30", b"\x30\x05\x04\x01a", b"\x31\x00", b"\x30\x84\xff\xff\xff\xff", b"\x04\x00"],
)
def test_malformed_signed_key_is_refused(garbage: bytes) -> None:
    with pytest.raises(InvalidCertificate):
        decode_signed_key(garbage)


def test_garbage_certificate_bytes_are_refused() -> None:
    with pytest.raises(InvalidCertificate, match="does not parse"):
        verify_certificate(b"\x30\x03\x02\x01\x00")


def test_signed_key_round_trip_with_long_lengths() -> None:
    public_key, signature = b"k" * 300, b"s" * 70000
    assert decode_signed_key(encode_signed_key(public_key, signature)) == (public_key, signature)
