"""Kademlia DHT (libp2p kad-dht, `/ipfs/kad/1.0.0`) and the object directory.

`DHT(host, key, DHTConfig())` runs on any `transport.host.Host`: put/get signed records,
provide/find_providers for content IDs, find_peer for addresses. To share one DHT with lattica
SDK nodes (rust-libp2p, `/lattica/1.0.0`, unsigned records: `lattica_ray.dht.sdk`), opt in with
`DHTConfig(protocols=("/ipfs/kad/1.0.0", "/lattica/1.0.0"), sdk_records=True)`.
"""

from lattica_ray.dht.cid import ContentId
from lattica_ray.dht.config import DHTConfig
from lattica_ray.dht.errors import (
    DHTError,
    InvalidContentId,
    InvalidRecord,
    MalformedMessage,
    NoPeersError,
    PeerNotFound,
    PutFailed,
    StoreFull,
)
from lattica_ray.dht.protocol import PROTOCOL_ID, PeerInfo
from lattica_ray.dht.records import lattica_key, pk_key
from lattica_ray.dht.service import DHT, FoundRecord, PeerLookupResult

__all__ = [
    "DHT",
    "PROTOCOL_ID",
    "ContentId",
    "DHTConfig",
    "DHTError",
    "FoundRecord",
    "InvalidContentId",
    "InvalidRecord",
    "MalformedMessage",
    "NoPeersError",
    "PeerInfo",
    "PeerLookupResult",
    "PeerNotFound",
    "PutFailed",
    "StoreFull",
    "lattica_key",
    "pk_key",
]
