"""libp2p Noise (`/noise`): the XX handshake that binds peer IDs, and the encrypted byte channel.

Noise_XX_25519_ChaChaPoly_SHA256 as the Noise spec (rev 34) and the libp2p noise spec say:
handshake messages and transport messages travel in frames of a 2-byte big-endian length and at
most 65535 bytes; messages 2 and 3 carry a `NoiseHandshakePayload` whose `identity_sig` is the
Ed25519 signature of "noise-libp2p-static-key:" + the sender's static X25519 public key.

Layout: `CipherState` / `SymmetricState` / `XXHandshakeState` are the Noise framework objects
(checked against the cacophony vectors); `NoiseHandshake` adds the libp2p payload and framing
(sans-I/O: bytes in, bytes out); `NoiseTransport` encrypts and decrypts after the handshake.
The asyncio part: `ByteChannel` is any reliable byte pipe (a TCP socket, a relayed `Stream`,
or Noise over either), `SecureChannel` is Noise over a `ByteChannel`, and `perform_handshake`
drives a `NoiseHandshake` over a `Stream`.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import logging
import struct
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from transport.errors import (
    ConnectionClosed,
    HandshakeFailed,
    InvalidPeerId,
    InvalidSignature,
    PeerIdMismatch,
    ProtocolNotSupported,
    ProtocolViolation,
    StreamClosed,
    StreamReset,
    TransportError,
)
from transport.identity import KeyPair, PeerId, PublicKey
from transport.multistream import MULTISTREAM_PROTOCOL, NOT_AVAILABLE, encode_message
from transport.pb import noise_pb2
from transport.stream import Stream

log = logging.getLogger(__name__)

PROTOCOL_ID = "/noise"  # noise-libp2p spec: the multistream-select ID
NOISE_PROTOCOL_NAME = b"Noise_XX_25519_ChaChaPoly_SHA256"  # noise-libp2p spec
STATIC_KEY_SIGNATURE_PREFIX = b"noise-libp2p-static-key:"  # noise-libp2p spec
MAX_MESSAGE_LENGTH = 65535  # Noise spec: a Noise message is at most 65535 bytes
TAG_LENGTH = 16  # ChaChaPoly authentication tag
MAX_PLAINTEXT_LENGTH = MAX_MESSAGE_LENGTH - TAG_LENGTH  # 65519 payload bytes per message
FRAME_HEADER_LENGTH = 2  # noise-libp2p spec: 16-bit big-endian length prefix
DH_LENGTH = 32  # X25519 public key
HASH_LENGTH = 32  # SHA-256
MAX_NONCE = 2**64 - 1  # Noise spec: reserved; a CipherState must never use it

_NONCE = struct.Struct("<4xQ")  # Noise ChaChaPoly nonce: 32 zero bits, 64-bit little-endian n
_FRAME_LENGTH = struct.Struct(">H")

# Noise XX: -> e / <- e, ee, s, es / -> s, se
XX_PATTERN: tuple[tuple[str, ...], ...] = (("e",), ("e", "ee", "s", "es"), ("s", "se"))


class NoiseError(ProtocolViolation):
    """A Noise transport message failed authentication or broke the framing."""


# -- the Noise framework ----------------------------------------------------------------------


class CipherState:
    """A ChaCha20-Poly1305 key and its 64-bit message counter (Noise spec section 5.1)."""

    __slots__ = ("_aead", "nonce")

    def __init__(self, key: bytes | None = None) -> None:
        self._aead = ChaCha20Poly1305(key) if key is not None else None
        self.nonce = 0

    @property
    def has_key(self) -> bool:
        return self._aead is not None

    def _nonce_bytes(self) -> bytes:
        if self.nonce >= MAX_NONCE:
            raise NoiseError("Noise nonce space exhausted: the connection must be re-established")
        return _NONCE.pack(self.nonce)

    def encrypt_with_ad(self, ad: bytes | None, plaintext: bytes | memoryview) -> bytes:
        if self._aead is None:
            return bytes(plaintext)
        ciphertext = self._aead.encrypt(self._nonce_bytes(), plaintext, ad)
        self.nonce += 1
        return ciphertext

    def encrypt_into(self, plaintext: bytes | memoryview, out: memoryview) -> None:
        """Encrypt into `out`, which must be exactly `len(plaintext) + 16` bytes long."""
        assert self._aead is not None
        self._aead.encrypt_into(self._nonce_bytes(), plaintext, None, out)
        self.nonce += 1

    def decrypt_with_ad(self, ad: bytes | None, ciphertext: bytes | memoryview) -> bytes:
        """Raises `cryptography.exceptions.InvalidTag` on a forged or corrupted message."""
        if self._aead is None:
            return bytes(ciphertext)
        plaintext = self._aead.decrypt(self._nonce_bytes(), ciphertext, ad)
        self.nonce += 1  # only after success, as the Noise spec requires
        return plaintext


def _hkdf(chaining_key: bytes, input_key_material: bytes) -> tuple[bytes, bytes]:
    """Noise HKDF with two outputs: RFC 5869 with salt = chaining key and empty info."""
    output = HKDF(hashes.SHA256(), 2 * HASH_LENGTH, chaining_key, b"").derive(input_key_material)
    return output[:HASH_LENGTH], output[HASH_LENGTH:]


class SymmetricState:
    """The chaining key, the handshake hash and the current cipher (Noise spec section 5.2)."""

    def __init__(self, protocol_name: bytes) -> None:
        if len(protocol_name) <= HASH_LENGTH:
            self.h = protocol_name.ljust(HASH_LENGTH, b"\0")
        else:
            self.h = hashlib.sha256(protocol_name).digest()
        self.ck = self.h
        self.cipher = CipherState()

    def mix_key(self, input_key_material: bytes) -> None:
        self.ck, temp_k = _hkdf(self.ck, input_key_material)
        self.cipher = CipherState(temp_k)

    def mix_hash(self, data: bytes) -> None:
        self.h = hashlib.sha256(self.h + data).digest()

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cipher.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        k1, k2 = _hkdf(self.ck, b"")
        return CipherState(k1), CipherState(k2)


def _public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # a low-order point gives an all-zero secret
        raise HandshakeFailed(f"the remote sent an invalid X25519 public key: {exc}") from exc


class XXHandshakeState:
    """The Noise XX handshake for one side (Noise spec section 5.3), without any I/O.

    `write_message(payload)` and `read_message(message)` alternate as the pattern says; after
    the third message `split()` gives the (send, receive) cipher states.
    """

    def __init__(
        self,
        initiator: bool,
        static_key: X25519PrivateKey,
        prologue: bytes = b"",
        ephemeral_key: X25519PrivateKey | None = None,
        protocol_name: bytes = NOISE_PROTOCOL_NAME,
    ) -> None:
        self.initiator = initiator
        self.symmetric = SymmetricState(protocol_name)
        self.symmetric.mix_hash(prologue)
        self.s = static_key
        self.s_public = _public_bytes(static_key)
        self.e = ephemeral_key  # generated when the pattern sends "e", unless given (test vectors)
        self.rs: bytes | None = None
        self.re: bytes | None = None
        self.message_index = 0

    @property
    def complete(self) -> bool:
        return self.message_index >= len(XX_PATTERN)

    @property
    def my_turn(self) -> bool:
        return not self.complete and (self.message_index % 2 == 0) == self.initiator

    @property
    def handshake_hash(self) -> bytes:
        return self.symmetric.h

    def _dh_token(self, token: str) -> bytes:
        """DH for "ee", "es" or "se": first letter the initiator's key, second the responder's."""
        initiator_key, responder_key = token
        ours = initiator_key if self.initiator else responder_key
        theirs = responder_key if self.initiator else initiator_key
        private = self.e if ours == "e" else self.s
        public = self.re if theirs == "e" else self.rs
        if private is None or public is None:
            raise HandshakeFailed(f"Noise handshake: token {token!r} before its keys are known")
        return _dh(private, public)

    def write_message(self, payload: bytes) -> bytes:
        if not self.my_turn:
            raise HandshakeFailed("Noise handshake: it is not our turn to send")
        out = bytearray()
        for token in XX_PATTERN[self.message_index]:
            if token == "e":
                if self.e is None:
                    self.e = X25519PrivateKey.generate()
                e_public = _public_bytes(self.e)
                out += e_public
                self.symmetric.mix_hash(e_public)
            elif token == "s":
                out += self.symmetric.encrypt_and_hash(self.s_public)
            else:
                self.symmetric.mix_key(self._dh_token(token))
        out += self.symmetric.encrypt_and_hash(payload)
        self.message_index += 1
        return bytes(out)

    def read_message(self, message: bytes) -> bytes:
        """The payload of the remote's next message; `HandshakeFailed` if it does not verify."""
        if self.complete or self.my_turn:
            raise HandshakeFailed("Noise handshake: received a message out of turn")
        number = self.message_index + 1
        offset = 0
        try:
            for token in XX_PATTERN[self.message_index]:
                if token == "e":
                    self.re = self._take(message, offset, DH_LENGTH, number)
                    offset += DH_LENGTH
                    self.symmetric.mix_hash(self.re)
                elif token == "s":
                    size = DH_LENGTH + (TAG_LENGTH if self.symmetric.cipher.has_key else 0)
                    encrypted = self._take(message, offset, size, number)
                    offset += size
                    self.rs = self.symmetric.decrypt_and_hash(encrypted)
                else:
                    self.symmetric.mix_key(self._dh_token(token))
            if self.symmetric.cipher.has_key and len(message) - offset < TAG_LENGTH:
                raise HandshakeFailed(
                    f"Noise handshake message {number} is truncated: {len(message)} bytes"
                )
            payload = self.symmetric.decrypt_and_hash(message[offset:])
        except InvalidTag as exc:
            raise HandshakeFailed(
                f"Noise handshake message {number} failed authentication: the remote is not "
                "speaking Noise_XX_25519_ChaChaPoly_SHA256, or the bytes were tampered with"
            ) from exc
        self.message_index += 1
        return payload

    @staticmethod
    def _take(message: bytes, offset: int, size: int, number: int) -> bytes:
        if len(message) < offset + size:
            raise HandshakeFailed(
                f"Noise handshake message {number} is truncated: {len(message)} bytes"
            )
        return message[offset : offset + size]

    def split(self) -> tuple[CipherState, CipherState]:
        """(cipher for what we send, cipher for what we receive)."""
        if not self.complete:
            raise HandshakeFailed("Noise handshake is not complete")
        c1, c2 = self.symmetric.split()
        return (c1, c2) if self.initiator else (c2, c1)


# -- libp2p on top: payload, identity, framing --------------------------------------------


def encode_frame(message: bytes) -> bytes:
    if len(message) > MAX_MESSAGE_LENGTH:
        raise NoiseError(f"Noise message of {len(message)} bytes exceeds {MAX_MESSAGE_LENGTH}")
    return _FRAME_LENGTH.pack(len(message)) + message


def make_handshake_payload(
    key: KeyPair, static_public: bytes, extensions: noise_pb2.NoiseExtensions | None = None
) -> bytes:
    """The `NoiseHandshakePayload` proving that `key` owns the static Noise key."""
    payload = noise_pb2.NoiseHandshakePayload(
        identity_key=key.public_key.to_protobuf(),
        identity_sig=key.sign(STATIC_KEY_SIGNATURE_PREFIX + static_public),
    )
    if extensions is not None:
        payload.extensions.CopyFrom(extensions)
    return payload.SerializeToString()


def verify_handshake_payload(
    payload: bytes, remote_static: bytes
) -> tuple[PublicKey, noise_pb2.NoiseExtensions | None]:
    """The remote's identity key, once its signature over `remote_static` checks out."""
    message = noise_pb2.NoiseHandshakePayload()
    try:
        message.ParseFromString(payload)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise HandshakeFailed(f"malformed Noise handshake payload: {exc}") from exc
    if not message.identity_key or not message.identity_sig:
        raise HandshakeFailed("Noise handshake payload lacks the identity key or its signature")
    try:
        public_key = PublicKey.from_protobuf(message.identity_key)
        public_key.verify(message.identity_sig, STATIC_KEY_SIGNATURE_PREFIX + remote_static)
    except InvalidPeerId as exc:
        raise HandshakeFailed(
            f"Noise handshake payload has an invalid identity key: {exc}"
        ) from exc
    except InvalidSignature as exc:
        raise HandshakeFailed(
            f"the remote's identity signature over its Noise static key does not verify ({exc}); "
            "it does not own the identity it claims"
        ) from exc
    extensions = message.extensions if message.HasField("extensions") else None
    return public_key, extensions


class NoiseHandshake:
    """The libp2p Noise XX handshake for one side: framed bytes in, framed bytes out.

    The initiator's first message is ready in `data_to_send()` from the start. Feed what the
    remote sends to `receive_data()` (`HandshakeFailed` or `PeerIdMismatch` on a bad message);
    once `complete`, `remote_peer` is authenticated and `transport()` encrypts the rest.
    """

    def __init__(
        self,
        key: KeyPair,
        is_initiator: bool,
        expected_peer: PeerId | None = None,
        *,
        static_key: X25519PrivateKey | None = None,
        ephemeral_key: X25519PrivateKey | None = None,
        extensions: noise_pb2.NoiseExtensions | None = None,
    ) -> None:
        self.is_initiator = is_initiator
        self.expected_peer = expected_peer
        self._state = XXHandshakeState(
            is_initiator, static_key or X25519PrivateKey.generate(), ephemeral_key=ephemeral_key
        )
        self._payload = make_handshake_payload(key, self._state.s_public, extensions)
        self._inbox = bytearray()
        self._outbox = bytearray()
        self._failed: HandshakeFailed | None = None
        self.remote_public_key: PublicKey | None = None
        self.remote_peer: PeerId | None = None
        self.remote_extensions: noise_pb2.NoiseExtensions | None = None
        if is_initiator:
            self._outbox += encode_frame(self._state.write_message(b""))

    @property
    def complete(self) -> bool:
        return self._state.complete and self._failed is None

    @property
    def stage(self) -> str:
        """Where the handshake stands, for error messages."""
        if self._state.complete:
            return "complete"
        side = "our" if self._state.my_turn else "the remote's"
        return f"waiting for {side} message {self._state.message_index + 1} of 3"

    def data_to_send(self) -> bytes:
        out, self._outbox = bytes(self._outbox), bytearray()
        return out

    def receive_data(self, data: bytes) -> None:
        if self._failed is not None:
            raise self._failed
        self._inbox += data
        while not self._state.complete and len(self._inbox) >= FRAME_HEADER_LENGTH:
            (length,) = _FRAME_LENGTH.unpack_from(self._inbox)
            if len(self._inbox) < FRAME_HEADER_LENGTH + length:
                return
            message = bytes(self._inbox[FRAME_HEADER_LENGTH : FRAME_HEADER_LENGTH + length])
            del self._inbox[: FRAME_HEADER_LENGTH + length]
            try:
                self._on_message(message)
            except HandshakeFailed as exc:
                self._failed = exc
                raise

    def _on_message(self, message: bytes) -> None:
        payload = self._state.read_message(message)
        index = self._state.message_index  # messages read or written so far
        if index == 1:  # responder got "-> e"; the payload is empty by spec and ignored
            self._outbox += encode_frame(self._state.write_message(self._payload))
            return
        assert self._state.rs is not None
        self._authenticate(payload, self._state.rs)
        if index == 2:  # initiator got "<- e, ee, s, es": answer "-> s, se" with our identity
            self._outbox += encode_frame(self._state.write_message(self._payload))

    def _authenticate(self, payload: bytes, remote_static: bytes) -> None:
        public_key, extensions = verify_handshake_payload(payload, remote_static)
        peer = PeerId.from_public_key(public_key)
        if self.expected_peer is not None and peer != self.expected_peer:
            raise PeerIdMismatch(self.expected_peer, peer)
        self.remote_public_key, self.remote_peer = public_key, peer
        self.remote_extensions = extensions

    @property
    def handshake_hash(self) -> bytes:
        return self._state.handshake_hash

    def transport(self) -> NoiseTransport:
        """The transport-phase ciphers; bytes received past the handshake are kept in it."""
        if not self.complete:
            raise HandshakeFailed(f"Noise handshake is not complete ({self.stage})")
        sender, receiver = self._state.split()
        return NoiseTransport(sender, receiver, bytes(self._inbox))


class NoiseTransport:
    """After the handshake: plaintext to length-prefixed Noise messages and back."""

    def __init__(self, sender: CipherState, receiver: CipherState, pending: bytes = b"") -> None:
        self._sender = sender
        self._receiver = receiver
        self._inbox = bytearray(pending)

    def encrypt(self, data: bytes | bytearray | memoryview) -> bytearray:
        """The framed messages carrying `data`, split at 65519 bytes; one buffer, no copies."""
        total = len(data)
        if not total:
            return bytearray()
        count = -(-total // MAX_PLAINTEXT_LENGTH)
        out = bytearray(total + count * (FRAME_HEADER_LENGTH + TAG_LENGTH))
        view = memoryview(data)
        out_view = memoryview(out)
        position = 0
        for start in range(0, total, MAX_PLAINTEXT_LENGTH):
            chunk = view[start : start + MAX_PLAINTEXT_LENGTH]
            size = len(chunk) + TAG_LENGTH
            _FRAME_LENGTH.pack_into(out, position, size)
            body = position + FRAME_HEADER_LENGTH
            self._sender.encrypt_into(chunk, out_view[body : body + size])
            position = body + size
        del chunk
        out_view.release()
        view.release()
        return out

    def decrypt(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """The plaintext of every message completed by `data`; a partial one is kept.

        `data` is only read during the call (it may be a reused receive buffer); only the
        bytes of an incomplete message are copied.
        """
        plaintexts: list[bytes] = []
        view = memoryview(data)
        try:
            position = self._complete_pending(view, plaintexts)
            size = len(view)
            while size - position >= FRAME_HEADER_LENGTH:
                length = (view[position] << 8) | view[position + 1]
                body = position + FRAME_HEADER_LENGTH
                if size - body < length:
                    break
                plaintexts.append(self._open(view[body : body + length]))
                position = body + length
            if position < size:
                self._inbox += view[position:]
        finally:
            view.release()
        return plaintexts

    def _complete_pending(self, view: memoryview, plaintexts: list[bytes]) -> int:
        """Finish the message whose start is in the inbox; returns how much of `view` it took."""
        inbox = self._inbox
        if not inbox:
            return 0
        taken = 0
        if len(inbox) < FRAME_HEADER_LENGTH:
            taken = min(FRAME_HEADER_LENGTH - len(inbox), len(view))
            inbox += view[:taken]
            if len(inbox) < FRAME_HEADER_LENGTH:
                return taken
        needed = FRAME_HEADER_LENGTH + ((inbox[0] << 8) | inbox[1]) - len(inbox)
        more = min(needed, len(view) - taken)
        inbox += view[taken : taken + more]
        taken += more
        if more == needed:
            with memoryview(inbox) as message:
                plaintexts.append(self._open(message[FRAME_HEADER_LENGTH:]))
            inbox.clear()
        return taken

    def _open(self, message: bytes | memoryview) -> bytes:
        if len(message) < TAG_LENGTH:
            raise NoiseError(
                f"Noise transport message of {len(message)} bytes is shorter than its tag"
            )
        try:
            return self._receiver.decrypt_with_ad(None, message)
        except InvalidTag as exc:
            raise NoiseError(
                "a Noise transport message failed authentication: the connection was "
                "corrupted or tampered with"
            ) from exc

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message waiting for the rest."""
        return len(self._inbox)


# -- asyncio: byte channels -----------------------------------------------------------------


class ChannelReceiver(Protocol):
    """What a `ByteChannel` delivers to once started (as an asyncio.Protocol receives).

    `data` may be a view of a reused receive buffer: use or copy it before returning.
    """

    def data_received(self, data: bytes) -> None: ...

    def eof_received(self) -> None: ...

    def connection_lost(self, exc: Exception | None) -> None: ...


class ByteChannel(abc.ABC):
    """A reliable, ordered byte pipe: a TCP socket, a relayed `Stream`, or Noise over either.

    Before `start()`, the channel is used as a `Stream` (`prelude`) for the handshakes and the
    multistream negotiations; `start(receiver)` then hands every byte not yet read, and all
    later ones, to `receiver`, in callbacks, with no task or copy in between.
    """

    @property
    @abc.abstractmethod
    def prelude(self) -> Stream:
        """The channel as a `Stream`, for the negotiation before `start()`."""

    @abc.abstractmethod
    def start(self, receiver: ChannelReceiver) -> None: ...

    @abc.abstractmethod
    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue `data` (never blocks; call `drain()` for backpressure); do not modify it after."""

    def writelines(self, chunks: list[bytes | memoryview]) -> None:
        """Queue the chunks as one write (they are copied: views of caller buffers are fine)."""
        self.write(b"".join(chunks))

    @abc.abstractmethod
    async def drain(self) -> None:
        """Return once the channel accepts more data; `ConnectionClosed` if it is gone."""

    @property
    @abc.abstractmethod
    def writable(self) -> bool:
        """False while the send buffer is above its high-water mark."""

    @abc.abstractmethod
    def close(self) -> None:
        """Send what is queued, then close; gives up (abort) after the channel's close timeout."""

    @abc.abstractmethod
    def abort(self, reason: str = "aborted") -> None:
        """Drop the channel at once, discarding what is queued."""

    @abc.abstractmethod
    async def wait_closed(self) -> None: ...


class PreludeStream(Stream):
    """A `BufferedChannel` seen as a `Stream` until it is started."""

    def __init__(self, channel: BufferedChannel) -> None:
        super().__init__()
        self._channel = channel

    async def write(self, data: bytes) -> None:
        if self._reset_reason is not None:
            raise StreamReset(self._reset_reason)
        self._channel.write(data)
        await self._channel.drain()

    async def close(self) -> None:
        self._channel.close()

    def reset(self, reason: str = "reset by local peer") -> None:
        self._feed_reset(reason)
        self._channel.abort(reason)


class _ConfirmationCheck:
    """Strips the listener's answers to a lazy multistream proposal off the data that follows.

    A lazy dialer starts speaking the protocol at once; the remote's first bytes must then be
    exactly the header and protocol it proposed, else the remote refused ("na") or misbehaved.
    """

    def __init__(
        self, channel: BufferedChannel, protocols: list[str], receiver: ChannelReceiver
    ) -> None:
        self._channel = channel
        self._protocols = protocols
        self._expected = b"".join(encode_message(p) for p in protocols)
        self._received = bytearray()
        self._receiver = receiver

    def data_received(self, data: bytes) -> None:
        self._received += data
        size = len(self._expected)
        if not self._expected.startswith(self._received[:size]):
            self._fail()
            return
        if len(self._received) < size:
            return
        rest = bytes(self._received[size:])
        self._channel._receiver = self._receiver  # settled: deliver directly from now on
        if rest:
            self._receiver.data_received(rest)

    def _fail(self) -> None:
        refusal = encode_message(MULTISTREAM_PROTOCOL) + encode_message(NOT_AVAILABLE)
        exc: TransportError
        if self._received.startswith(refusal):
            exc = ProtocolNotSupported(self._protocols[1:])
        else:
            exc = ProtocolViolation(
                f"multistream: expected confirmation of {self._protocols[1:]}, "
                f"got {bytes(self._received[:64])!r}"
            )
        self._channel.abort(str(exc))
        self._receiver.connection_lost(exc)

    def eof_received(self) -> None:
        self._receiver.connection_lost(
            ProtocolNotSupported(self._protocols[1:])
            if not self._received
            else ConnectionClosed("closed before confirming the protocol")
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._receiver.connection_lost(exc)


class BufferedChannel(ByteChannel):
    """A channel that buffers what arrives before `start()` in its `PreludeStream`."""

    close_timeout = 5.0  # seconds `close()` waits for the queued data to leave before aborting

    def __init__(self) -> None:
        self._prelude = PreludeStream(self)
        self._receiver: ChannelReceiver | None = None
        self._lost: Exception | None = None
        self._eof = False

    @property
    def prelude(self) -> Stream:
        return self._prelude

    def start(self, receiver: ChannelReceiver) -> None:
        if self._receiver is not None:
            raise RuntimeError("channel already started")
        prelude = self._prelude
        pending, prelude._pending_confirmation = prelude._pending_confirmation, []
        if pending:
            self._receiver = _ConfirmationCheck(self, pending, receiver)
        else:
            self._receiver = receiver
        lost, eof = self._lost, self._eof
        leftover = bytes(prelude._buffer)
        prelude._buffer.clear()
        if leftover:
            self._receiver.data_received(leftover)
        if lost is not None:
            self._receiver.connection_lost(lost)
        elif eof:
            self._receiver.eof_received()

    def _deliver_data(self, data: bytes) -> None:
        receiver = self._receiver
        if receiver is None:
            self._prelude._feed_data(data)
        else:
            receiver.data_received(data)

    def _deliver_eof(self) -> None:
        self._eof = True
        if self._receiver is None:
            self._prelude._feed_eof()
        else:
            self._receiver.eof_received()

    def _deliver_lost(self, exc: Exception) -> None:
        if self._lost is not None:
            return
        self._lost = exc
        if self._receiver is None:
            self._prelude._feed_reset(str(exc))
        else:
            self._receiver.connection_lost(exc)


class SecureChannel(BufferedChannel):
    """Noise over a `ByteChannel`: writes are encrypted, received messages decrypted."""

    def __init__(self, raw: ByteChannel, noise: NoiseTransport) -> None:
        super().__init__()
        self.raw = raw
        self.noise = noise
        raw.start(self)
        if noise.pending:  # the remote's first messages came with the handshake
            self.data_received(b"")

    # ChannelReceiver for the raw channel
    def data_received(self, data: bytes) -> None:
        try:
            plaintexts = self.noise.decrypt(data)
        except NoiseError as exc:
            log.info("dropping channel: %s", exc)
            self.raw.abort(str(exc))
            self._deliver_lost(exc)
            return
        for plaintext in plaintexts:
            if self._lost is not None:
                return
            self._deliver_data(plaintext)

    def eof_received(self) -> None:
        self._deliver_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self._deliver_lost(exc or ConnectionClosed("connection closed"))

    # ByteChannel
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._lost is not None:
            return  # writers learn of it from drain() or from the receiver
        try:
            frames = self.noise.encrypt(data)
        except NoiseError as exc:
            self.abort(str(exc))
            self._deliver_lost(exc)
            return
        self.raw.write(frames)

    def writelines(self, chunks: list[bytes | memoryview]) -> None:
        self.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))  # encrypt() copies

    async def drain(self) -> None:
        if self._lost is not None:
            raise ConnectionClosed(str(self._lost))
        await self.raw.drain()

    @property
    def writable(self) -> bool:
        return self.raw.writable

    def close(self) -> None:
        self.raw.close()

    def abort(self, reason: str = "aborted") -> None:
        self.raw.abort(reason)

    async def wait_closed(self) -> None:
        await self.raw.wait_closed()


class StreamChannel(ByteChannel):
    """A `ByteChannel` over any `Stream` (a relayed circuit): a reader and a writer task.

    Writes queue up (no await) and a task sends them in order; `drain()` waits while more than
    `high_water` bytes are queued.
    """

    def __init__(
        self,
        stream: Stream,
        high_water: int = 1024 * 1024,
        read_size: int = 256 * 1024,
        close_timeout: float = 5.0,
    ) -> None:
        self._stream = stream
        self._high_water = high_water
        self._read_size = read_size
        self.close_timeout = close_timeout
        self._receiver: ChannelReceiver | None = None
        self._queue: list[bytes | bytearray | memoryview] = []
        self._queued = 0
        self._has_data = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._closing = False
        self._lost: Exception | None = None
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._done = asyncio.get_running_loop().create_future()

    @property
    def prelude(self) -> Stream:
        return self._stream

    def start(self, receiver: ChannelReceiver) -> None:
        if self._receiver is not None:
            raise RuntimeError("channel already started")
        self._receiver = receiver
        loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self._read_loop())
        self._writer = loop.create_task(self._write_loop())

    async def _read_loop(self) -> None:
        assert self._receiver is not None
        try:
            while True:
                data = await self._stream.read(self._read_size)
                if not data:
                    self._receiver.eof_received()
                    return
                self._receiver.data_received(data)
        except asyncio.CancelledError:
            raise
        except (TransportError, EOFError, ConnectionError) as exc:
            self._lose(exc)

    async def _write_loop(self) -> None:
        try:
            while True:
                while not self._queue and not self._closing:
                    self._has_data.clear()
                    await self._has_data.wait()
                if self._queue:
                    chunks, self._queue = self._queue, []
                    self._queued = 0
                    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                    await self._stream.write(data)  # type: ignore[arg-type]
                    if self._queued <= self._high_water:
                        self._writable.set()
                    continue
                await asyncio.wait_for(self._stream.close(), self.close_timeout)
                self._finish(None)
                return
        except asyncio.CancelledError:
            raise
        except (TransportError, EOFError, ConnectionError, TimeoutError) as exc:
            self._lose(exc)

    def _lose(self, exc: Exception) -> None:
        if self._lost is None:
            self._lost = exc
            self._writable.set()
            if self._receiver is not None:
                self._receiver.connection_lost(exc)
        self._finish(exc)

    def _finish(self, exc: Exception | None) -> None:
        current = asyncio.current_task()
        for task in (self._reader, self._writer):
            if task is not None and task is not current:
                task.cancel()
        if not self._done.done():
            self._done.set_result(exc)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._lost is not None or self._closing:
            return
        self._queue.append(data)
        self._queued += len(data)
        self._has_data.set()
        if self._queued > self._high_water:
            self._writable.clear()

    async def drain(self) -> None:
        while not self._writable.is_set():
            await self._writable.wait()
        if self._lost is not None:
            raise ConnectionClosed(str(self._lost))

    @property
    def writable(self) -> bool:
        return self._writable.is_set()

    def close(self) -> None:
        if self._receiver is None:  # never started: nothing is queued
            self._closing = True
            self._finish(None)
            asyncio.get_running_loop().create_task(_close_quietly(self._stream))
            return
        self._closing = True
        self._has_data.set()

    def abort(self, reason: str = "aborted") -> None:
        if self._lost is None:
            self._lost = StreamClosed(reason)
            self._writable.set()
        self._stream.reset(reason)
        self._finish(self._lost)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._done)


async def _close_quietly(stream: Stream) -> None:
    try:
        await stream.close()
    except (TransportError, ConnectionError):
        pass


async def perform_handshake(stream: Stream, handshake: NoiseHandshake) -> None:
    """Run `handshake` over `stream`, reading whole frames only (nothing past the handshake)."""
    try:
        out = handshake.data_to_send()
        if out:
            await stream.write(out)
        while not handshake.complete:
            header = await stream.readexactly(FRAME_HEADER_LENGTH)
            body = await stream.readexactly(int.from_bytes(header, "big"))
            handshake.receive_data(header + body)
            out = handshake.data_to_send()
            if out:
                await stream.write(out)
    except asyncio.IncompleteReadError as exc:
        raise HandshakeFailed(
            f"the remote closed the connection in the middle of the Noise handshake "
            f"({handshake.stage}, {len(exc.partial)} bytes of a message received)"
        ) from exc
    except StreamReset as exc:
        raise HandshakeFailed(
            f"the connection broke during the Noise handshake ({handshake.stage}): {exc}"
        ) from exc
