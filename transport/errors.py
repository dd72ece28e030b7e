"""The transport layer's one error family: every failure says what went wrong and what to try."""

from __future__ import annotations


class TransportError(Exception):
    """Base class of every error raised by `transport`."""


class InvalidMultiaddr(TransportError, ValueError):
    """A multiaddr string or byte form could not be parsed."""


class InvalidPeerId(TransportError, ValueError):
    """A peer ID is malformed or uses a key type we do not support."""


class KeyFileError(TransportError):
    """The identity key file is unreadable or corrupt; it is never replaced silently."""


class InvalidSignature(TransportError):
    """A signature did not verify against the claimed key."""


class DialError(TransportError):
    """A connection to a peer could not be established."""


class PeerUnreachable(DialError):
    """Nothing answered at the address (no route, port closed, or every packet lost)."""


class DialTimeout(DialError):
    """The handshake did not complete in time."""


class HandshakeFailed(DialError):
    """The remote refused the handshake or presented an invalid libp2p certificate."""


class PeerIdMismatch(HandshakeFailed):
    """The remote proved a different identity than the `/p2p/` part of the address asked for."""

    def __init__(self, expected: object, actual: object) -> None:
        super().__init__(
            f"dialed peer {expected} but the remote proved it is {actual}; "
            "the address is stale or someone else now holds it"
        )
        self.expected = expected
        self.actual = actual


class ConnectionClosed(TransportError):
    """The connection was closed (locally, by the remote, or by the idle timeout)."""


class StreamError(TransportError):
    """A stream failed."""


class StreamReset(StreamError):
    """The remote (or we) reset the stream before it finished."""


class StreamClosed(StreamError):
    """Writing to a stream whose write side is already closed."""


class ProtocolNotSupported(StreamError):
    """The remote does not speak any of the stream protocols we proposed."""

    def __init__(self, protocols: object, peer: object = None) -> None:
        where = f" by peer {peer}" if peer is not None else ""
        super().__init__(f"none of the protocols {protocols} is supported{where}")
        self.protocols = protocols


class ProtocolViolation(TransportError):
    """The remote sent bytes that break a protocol's rules (malformed, oversized, out of order)."""


class MessageTooLarge(ProtocolViolation):
    """A length-prefixed message exceeds the configured limit."""

    def __init__(self, size: int, limit: int, what: str = "message") -> None:
        super().__init__(f"{what} of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit
