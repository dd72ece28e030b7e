"""The DHT's error family: each says what failed and what to try."""

from __future__ import annotations


class DHTError(Exception):
    """Base class of every error raised by `lattica_ray.dht`."""


class MalformedMessage(DHTError, ValueError):
    """A kad message could not be decoded or breaks the spec's rules; it is refused whole."""


class InvalidRecord(DHTError, ValueError):
    """A record failed validation (unsigned, forged, expired, oversized, unknown namespace)."""


class StoreFull(DHTError):
    """This node holds as many records or provider keys as its limits allow; try other peers."""


class InvalidContentId(DHTError, ValueError):
    """A content ID string or byte form could not be parsed."""


class NoPeersError(DHTError):
    """The routing table is empty: call `bootstrap()` with at least one reachable peer."""


class PeerNotFound(DHTError):
    """No peer on the DHT knows addresses for the peer ID."""


class PutFailed(DHTError):
    """Too few peers stored a record or provider announcement."""
