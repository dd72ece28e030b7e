"""Circuit relay v2 (`/libp2p/circuit/relay/0.2.0/hop` and `/stop`): relay and client."""

from transport.nat.relay.client import ActiveReservation, RelayClient
from transport.nat.relay.config import RelayClientConfig, RelayConfig
from transport.nat.relay.protocol import HOP_PROTOCOL, STOP_PROTOCOL, Limit, RelayError
from transport.nat.relay.server import RelayServer

__all__ = [
    "HOP_PROTOCOL",
    "STOP_PROTOCOL",
    "ActiveReservation",
    "Limit",
    "RelayClient",
    "RelayClientConfig",
    "RelayConfig",
    "RelayError",
    "RelayServer",
]
