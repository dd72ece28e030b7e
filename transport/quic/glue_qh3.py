"""The one place that extends qh3's TLS: a libp2p server must request the client's certificate.

qh3 (a Rust QUIC core under aioquic's Python TLS 1.3) answers a CertificateRequest as a
client, but as a server it never sends one, and it has no state for a client's Certificate and
CertificateVerify. libp2p's tls spec says "servers MUST require client authentication", so
`MutualTlsContext` adds exactly that to the server side of qh3's `tls.Context`:

- the CertificateRequest goes out between EncryptedExtensions and the server's Certificate. The
  hook is the server's first read of `certificate`, which qh3 makes inside the Certificate
  message it is about to write: the request is written into that message's buffer and hashed
  with it, so the transcript is EncryptedExtensions, CertificateRequest, Certificate, as RFC 8446
  4.4.1 orders it. Keys derived later (server Finished, application secrets) include it.
- qh3 adds the client's Finished to the transcript in advance ("we don't use client auth"):
  the transcript is taken back to the server's Finished, the client's Certificate and
  CertificateVerify are read and checked, and only then is the client's Finished expected.
- A client that sends no certificate is refused by TLS itself, with the certificate_required
  alert (RFC 8446 4.4.2.4); a certificate without a valid libp2p extension is refused by the
  connection after the handshake (`transport.tls.verify_certificate`), as with aioquic.

`Qh3Connection` also lets the engine leave events in qh3's core (see its docstring), takes
back a stream its core refused, and skips qh3's per-packet qlog work when nothing logs.

Each step is tested in tests/transport/quic/test_qh3_mutual_tls.py against qh3's client, and
against aioquic and the lattica SDK in the endpoint and interop tests.
"""

from __future__ import annotations

import struct

from qh3 import tls
from qh3._hazmat import Buffer, SignatureError, verify_with_public_key
from qh3._hazmat import Certificate as X509Certificate
from qh3.quic.connection import NetworkAddress, QuicConnection, QuicConnectionError
from qh3.quic.packet import (
    QuicErrorCode,
    pull_quic_transport_parameters,
    push_quic_transport_parameters,
)
from qh3.quic.tls_bridge import QuicTlsBridge

# Signature schemes a client may sign its CertificateVerify with (libp2p certificates use
# ECDSA P-256; the spec allows the others), as RFC 8446 4.2.3 numbers them.
CLIENT_SIGNATURE_ALGORITHMS = (
    tls.SignatureAlgorithm.ECDSA_SECP256R1_SHA256,
    tls.SignatureAlgorithm.ECDSA_SECP384R1_SHA384,
    tls.SignatureAlgorithm.ED25519,
    tls.SignatureAlgorithm.RSA_PSS_RSAE_SHA256,
    tls.SignatureAlgorithm.RSA_PSS_RSAE_SHA384,
)  # no RSA_PKCS1_*: RFC 8446 4.4.3 forbids PKCS#1 v1.5 in CertificateVerify
CLIENT_CERTIFICATE_VERIFY_CONTEXT = b"TLS 1.3, client CertificateVerify"  # RFC 8446 4.4.3


def certificate_request() -> bytes:
    """A TLS 1.3 CertificateRequest (RFC 8446 4.3.2): empty context, signature_algorithms."""
    algorithms = b"".join(struct.pack("!H", a) for a in CLIENT_SIGNATURE_ALGORITHMS)
    extension = (
        struct.pack(
            "!HHH", tls.ExtensionType.SIGNATURE_ALGORITHMS, len(algorithms) + 2, len(algorithms)
        )
        + algorithms
    )
    body = b"\x00" + struct.pack("!H", len(extension)) + extension
    return bytes([tls.HandshakeType.CERTIFICATE_REQUEST]) + len(body).to_bytes(3, "big") + body


class AlertCertificateRequired(tls.Alert):
    description = tls.AlertDescription.certificate_required  # RFC 8446 6.2


class MutualTlsContext(tls.Context):
    """qh3's TLS context whose server side requests and checks a client certificate."""

    _handshake_buf: Buffer | None = None  # the server's handshake flight, while it is written
    _certificate_requested = False
    _transcript_at_server_finished = None
    _awaiting: int | None = None  # the client message the server waits for, or None

    @classmethod
    def adopt(cls, context: tls.Context) -> MutualTlsContext:
        """Give a context qh3 built (and configured) this class's server behaviour."""
        context.__class__ = cls
        return context  # type: ignore[return-value]

    # -- the CertificateRequest ---------------------------------------------------------
    @property
    def certificate(self) -> X509Certificate | None:
        buf = self._handshake_buf
        if buf is not None:  # qh3 is starting the server's Certificate message in `buf`
            self._handshake_buf = None
            buf.push_bytes(certificate_request())
            self._certificate_requested = True
        return self.__dict__.get("certificate")

    @certificate.setter
    def certificate(self, value: X509Certificate | None) -> None:
        self.__dict__["certificate"] = value

    def _server_handle_hello(self, input_buf, initial_buf, handshake_buf, onertt_buf) -> None:  # type: ignore[override]
        self._handshake_buf = handshake_buf
        try:
            super()._server_handle_hello(input_buf, initial_buf, handshake_buf, onertt_buf)
        finally:
            self._handshake_buf = None
        if self._certificate_requested:
            # Undo qh3's anticipation of the client's Finished: the client's Certificate
            # and CertificateVerify come first.
            self.key_schedule.hash = self._transcript_at_server_finished
            self._expected_verify_data = None
            self._awaiting = tls.HandshakeType.CERTIFICATE

    def _setup_traffic_protection(self, direction, epoch, label: bytes) -> None:  # type: ignore[override]
        super()._setup_traffic_protection(direction, epoch, label)
        if label == b"s ap traffic" and self._certificate_requested:
            self._transcript_at_server_finished = self.key_schedule.hash.copy()

    # -- the client's Certificate and CertificateVerify -------------------------------------
    def handle_message(self, input_data: bytes, output_buf, epoch: int = -1) -> None:  # type: ignore[override]
        if self._awaiting is None:
            super().handle_message(input_data, output_buf, epoch)
            return
        self._receive_buffer += input_data
        while self._awaiting is not None and len(self._receive_buffer) >= 4:
            length = 4 + int.from_bytes(self._receive_buffer[1:4], "big")
            if len(self._receive_buffer) < length:
                return
            message = self._receive_buffer[:length]
            self._receive_buffer = self._receive_buffer[length:]
            if epoch >= 0 and epoch != tls.Epoch.HANDSHAKE:
                raise tls.AlertUnexpectedMessage("client authentication outside the handshake")
            if message[0] != self._awaiting:
                raise tls.AlertUnexpectedMessage(
                    f"expected the client's {tls.HandshakeType(self._awaiting).name}, "
                    f"got handshake message type {message[0]}"
                )
            buf = Buffer(data=message)
            if self._awaiting == tls.HandshakeType.CERTIFICATE:
                self._receive_client_certificate(buf)
            else:
                self._receive_client_certificate_verify(buf)
            if not buf.eof():
                raise tls.AlertDecodeError("extra bytes at the end of a handshake message")
        if self._awaiting is None and self._receive_buffer:
            rest, self._receive_buffer = self._receive_buffer, b""
            super().handle_message(rest, output_buf, epoch)

    def _receive_client_certificate(self, buf: Buffer) -> None:
        certificate = tls.pull_certificate(buf)
        self.key_schedule.update_hash(buf.data)
        if not certificate.certificates:
            raise AlertCertificateRequired("libp2p needs mutual TLS: the client sent none")
        try:
            self._peer_certificate = X509Certificate(certificate.certificates[0][0])
            self._peer_certificate_chain = [
                X509Certificate(entry[0]) for entry in certificate.certificates[1:]
            ]
        except Exception as exc:  # qh3 raises its own parse errors
            raise tls.AlertBadCertificate(f"unreadable client certificate: {exc}") from exc
        self._awaiting = tls.HandshakeType.CERTIFICATE_VERIFY

    def _receive_client_certificate_verify(self, buf: Buffer) -> None:
        verify = tls.pull_certificate_verify(buf)
        if verify.algorithm not in CLIENT_SIGNATURE_ALGORITHMS:
            raise tls.AlertDecryptError("client signed with an algorithm we did not offer")
        try:
            verify_with_public_key(
                self._peer_certificate.public_key(),
                verify.algorithm,
                self.key_schedule.certificate_verify_data(CLIENT_CERTIFICATE_VERIFY_CONTEXT),
                verify.signature,
            )
        except SignatureError as exc:
            raise tls.AlertDecryptError(f"client CertificateVerify: {exc}") from exc
        self.key_schedule.update_hash(buf.data)
        self._awaiting = None
        self._expect_client_finished()

    def _expect_client_finished(self) -> None:
        self._expected_verify_data = self.key_schedule.finished_verify_data(self._dec_key)


class Qh3Connection(QuicConnection):
    """qh3's QUIC connection whose TLS is `MutualTlsContext`, and whose core events can wait.

    qh3's core grants flow-control credit for received data when its event is taken from the
    core. While `holding`, events stay in the core, so the remote gets no more credit: that is
    how `transport.quic.engine_qh3` makes credit follow what the application reads.
    """

    holding = False

    def _drain_core(self) -> None:
        if not self.holding:
            super()._drain_core()

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, NetworkAddress]]:
        """qh3's, without parsing every packet header for a qlog trace nobody keeps."""
        core = self._core
        if core is None or self._quic_logger is not None:
            return super().datagrams_to_send(now)
        datagrams = []
        try:
            while (transmit := core.poll_transmit(now)) is not None:
                datagrams.append((transmit[0], transmit[1]))
        except RuntimeError as exc:  # as qh3's own `_call_core` reports a core failure
            if datagrams:  # qh3 counts these as sent: they must leave, or wait for a PTO
                return datagrams
            raise QuicConnectionError(QuicErrorCode.INTERNAL_ERROR, None, str(exc)) from exc
        return datagrams

    def receive_datagram(self, data: bytes, addr: NetworkAddress, now: float) -> None:
        """qh3's, minus what only the handshake needs once it is over: per-packet header
        parsing (retry, version negotiation, the remote's source CID), address checks (our
        socket gives valid ones) and qlog work when nothing logs. A small call's round trip
        crosses this twice on each side. Only short-header (1-RTT) datagrams take this path:
        long headers (a late handshake packet, a Retry to drop) take qh3's."""
        core = self._core
        if (
            core is None
            or not self._handshake_complete
            or self._quic_logger is not None
            or not data
            or data[0] & 0x80
        ):
            super().receive_datagram(data, addr, now)
            return
        try:
            core.receive_many_datagrams([data], addr, now)
        except RuntimeError as exc:
            raise QuicConnectionError(QuicErrorCode.INTERNAL_ERROR, None, str(exc)) from exc
        self._drain_core()

    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """qh3's, without its pre-handshake staging checks once the handshake is over."""
        core = self._core
        if core is None or not self._handshake_complete:
            super().send_stream_data(stream_id, data, end_stream)
            return
        if stream_id not in self._created_local_stream_ids:
            self._record_local_stream(stream_id)
        if type(data) is not bytes:
            view = memoryview(data)
            if not view.c_contiguous:
                raise BufferError("send data must be a C-contiguous buffer")
            data = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        try:
            core.send_stream(stream_id, data, end_stream)
        except RuntimeError as exc:
            raise QuicConnectionError(QuicErrorCode.INTERNAL_ERROR, None, str(exc)) from exc

    def receive_gro_buffer(
        self, buffer: bytes, segment_size: int, addr: NetworkAddress, now: float
    ) -> None:
        """qh3's, without a qlog entry per datagram when nothing logs."""
        core = self._core
        if core is None or not self._handshake_complete or self._quic_logger is not None:
            super().receive_gro_buffer(buffer, segment_size, addr, now)
            return
        try:
            core.receive_gro_buffer(buffer, segment_size, addr, now)
        except RuntimeError as exc:
            raise QuicConnectionError(QuicErrorCode.INTERNAL_ERROR, None, str(exc)) from exc
        self._drain_core()

    def _open_stream(self, is_unidirectional: bool = False) -> int:
        """qh3 counts a new local stream before its core may refuse it (over the remote's
        stream limit); a refused stream is taken back, or every later open fails too."""
        stream_id = self.get_next_available_stream_id(is_unidirectional)
        try:
            return super()._open_stream(is_unidirectional)
        except ValueError:
            self._created_local_stream_ids.discard(stream_id)
            if is_unidirectional:
                self._next_stream_id_uni = self._local_next_stream_id_uni = stream_id
            else:
                self._next_stream_id_bidi = self._local_next_stream_id_bidi = stream_id
            raise

    def _create_tls(self, remote_source_cid: bytes | None) -> QuicTlsBridge:
        bridge = super()._create_tls(remote_source_cid)
        MutualTlsContext.adopt(bridge.tls)
        if self._is_client:
            _advertise_max_udp_payload(bridge, self._configuration.max_datagram_size)
        return bridge


def _advertise_max_udp_payload(bridge: QuicTlsBridge, size: int) -> None:
    """qh3's client announces max_udp_payload_size 1472 whatever it can receive, so the server
    never probes past ~1450 B and everything it sends on loopback or jumbo-frame paths went in
    small datagrams (one direction ~3x slower than the other). Announce what we accept."""
    if size <= 1472:
        return
    serialize = bridge.serialize_transport_parameters

    def serialize_with_our_payload_size() -> bytes:
        data = serialize()
        parameters = pull_quic_transport_parameters(Buffer(data=data))
        parameters.max_udp_payload_size = size
        out = Buffer(capacity=len(data) + 16)
        push_quic_transport_parameters(out, parameters)
        return out.data

    bridge.serialize_transport_parameters = serialize_with_our_payload_size  # type: ignore[method-assign]
    bridge.tls.handshake_extensions = [  # serialized once already, when the bridge was made
        (tls.ExtensionType.QUIC_TRANSPORT_PARAMETERS, serialize_with_our_payload_size())
    ]
