"""libp2p-compatible transport: identity, QUIC, stream negotiation, NAT traversal.

Knows nothing of Ray, numpy, Arrow or pycrdt: it moves authenticated byte streams between
peer IDs and hides whether the path is direct, hole-punched or relayed.
"""

from transport.errors import TransportError
from transport.identity import KeyPair, PeerId, PublicKey, load_or_create_key
from transport.multiaddr import Multiaddr
from transport.stream import Stream

__all__ = [
    "KeyPair",
    "Multiaddr",
    "PeerId",
    "PublicKey",
    "Stream",
    "TransportError",
    "load_or_create_key",
]
