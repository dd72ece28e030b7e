"""DHT settings: the kad-dht parameters, record lifetimes, and every limit on what peers may send.

Defaults follow the libp2p kad-dht spec and go-libp2p-kad-dht where they define a value; the
rest are ours and say why next to them. Durations are seconds.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

KAD_PROTOCOL_ID = "/ipfs/kad/1.0.0"  # kad-dht spec (protocol.PROTOCOL_ID)

HOUR = 3600.0

Mode = Literal["client", "server"]


class DHTConfig(BaseModel):
    """Everything tunable about one DHT node. Validated; unknown fields are an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # -- Kademlia -------------------------------------------------------------------------
    k: int = Field(20, ge=1, le=256, description="bucket size and replication factor (spec)")
    alpha: int = Field(10, ge=1, le=64, description="concurrent requests per lookup (spec)")
    disjoint_paths: int = Field(
        1,
        ge=1,
        le=16,
        description="S/Kademlia disjoint lookup paths; >1 bounds what one liar can steer",
    )
    mode: Mode = Field("server", description="initial mode; the node switches with set_mode()")
    protocols: tuple[str, ...] = Field(
        (KAD_PROTOCOL_ID,),
        min_length=1,
        max_length=8,
        description="kad protocol IDs served, and proposed (in this order) to peers whose own "
        "we do not know yet: add '/lattica/1.0.0' to share one DHT with lattica SDK nodes, "
        "whose rust-libp2p Kademlia speaks the same messages under that ID (with sdk_records: "
        "without it their record puts are refused as violations and they end up blocked)",
    )

    # -- timing ---------------------------------------------------------------------------
    request_timeout: float = Field(10.0, gt=0, description="one request/response")
    lookup_timeout: float = Field(60.0, gt=0, description="a whole iterative lookup")
    inbound_idle_timeout: float = Field(
        30.0, gt=0, description="an inbound stream may stay silent this long between requests"
    )
    refresh_interval: float = Field(
        10 * 60.0, gt=0, description="buckets not looked up for this long are refreshed (go)"
    )
    refresh_max_cpl: int = Field(
        15, ge=0, le=255, description="refresh buckets up to this common prefix length (go: 15)"
    )
    stale_peer_age: float = Field(
        10 * 60.0,
        ge=0,
        description="a full bucket's oldest entry is probed (and evicted if dead) only when "
        "not heard from for this long; fresher entries are kept: long-lived peers win",
    )
    max_failures: int = Field(
        2, ge=1, description="consecutive failed requests before a peer leaves the table"
    )
    peer_info_cache_ttl: float = Field(
        10.0,
        ge=0,
        description="addresses we name in responses are looked up at most this often per peer "
        "(the same table entries fill most responses); 0 = every time",
    )
    cleanup_interval: float = Field(HOUR, gt=0, description="expired records are pruned (spec)")

    # -- records --------------------------------------------------------------------------
    record_ttl: float = Field(36 * HOUR, gt=0, description="lifetime of records we sign (go)")
    record_republish_interval: float = Field(
        22 * HOUR, gt=0, description="authors re-sign and re-put their records this often"
    )
    record_replication_interval: float = Field(
        HOUR,
        ge=0,
        description="holders re-put stored records to the k closest (rust-libp2p); 0 = never",
    )
    max_record_ttl: float = Field(
        48 * HOUR, gt=0, description="records expiring later than now + this are refused"
    )
    max_clock_skew: float = Field(
        5 * 60.0, ge=0, description="tolerated clock difference for record timestamps"
    )
    sdk_records: bool = Field(
        False,
        description="also accept the lattica SDK's records (dht.sdk): UNSIGNED bincode values "
        "under keys outside /pk/ and /lattica/, which anyone may overwrite, and provider "
        "records under any key (the SDK's are strings, not multihashes); only for sharing the "
        "DHT with SDK nodes (expiry and size limits still apply)",
    )
    get_quorum: int = Field(
        3, ge=1, description="valid answers a get collects before it returns (spec: Q)"
    )
    put_quorum: int = Field(1, ge=1, description="stores a put needs to count as done")

    # -- providers ------------------------------------------------------------------------
    provider_record_ttl: float = Field(48 * HOUR, gt=0, description="provider records expire")
    provider_republish_interval: float = Field(
        22 * HOUR, gt=0, description="we re-announce what we provide this often"
    )
    provider_addr_ttl: float = Field(
        24 * HOUR, gt=0, description="addresses stored with a provider record are kept this long"
    )

    # -- limits on what peers send us -----------------------------------------------------
    max_message_size: int = Field(1 << 20, ge=1024, description="one kad message, bytes")
    max_key_size: int = Field(1024, ge=40, description="a record or provider key, bytes")
    max_record_size: int = Field(64 * 1024, ge=64, description="a record value, bytes")
    max_records: int = Field(100_000, ge=1, description="records this node stores for others")
    max_provider_keys: int = Field(100_000, ge=1, description="keys with provider records")
    max_providers_per_key: int = Field(64, ge=1, description="providers kept per key")
    max_providers_per_response: int = Field(20, ge=1, description="providers we return")
    max_closer_peers: int = Field(
        40, ge=1, description="closerPeers accepted in one response; more is a violation"
    )
    max_addrs_per_peer: int = Field(16, ge=1, description="addresses kept per peer entry")
    inbound_rate: float = Field(
        100.0, gt=0, description="sustained requests per second one peer may send us"
    )
    inbound_burst: int = Field(200, ge=1, description="request burst one peer may send us")
    max_inbound_streams: int = Field(
        512, ge=1, description="inbound kad streams served at once; more are reset"
    )
    max_concurrent_probes: int = Field(
        8, ge=1, description="liveness probes (for table admission/eviction) in flight"
    )

    # -- eclipse resistance ---------------------------------------------------------------
    diversity_filter: bool = Field(True, description="go-libp2p's routing-table IP diversity")
    max_peers_per_group_per_bucket: int = Field(2, ge=1, description="go-libp2p: 2")
    max_peers_per_group_per_table: int = Field(3, ge=1, description="go-libp2p: 3")
    diversity_exempt_private: bool = Field(
        True,
        description="loopback/private/link-local addresses are not grouped (a LAN or test "
        "network would otherwise be capped at 3 peers)",
    )
    bad_referral_threshold: int = Field(
        10, ge=1, description="dead peers a responder must refer us to before it is judged"
    )
    bad_referral_ratio: float = Field(
        0.8,
        gt=0,
        le=1,
        description="share of dead referrals that marks a responder as flooding fake peers "
        "(honest peers under 30% churn stay far below)",
    )
    block_duration: float = Field(HOUR, ge=0, description="a blocked peer is ignored this long")
    max_violations: int = Field(
        3, ge=1, description="malformed messages or forged records before a peer is blocked"
    )

    @model_validator(mode="after")
    def _check_relations(self) -> DHTConfig:
        if self.record_republish_interval >= self.record_ttl:
            raise ValueError("record_republish_interval must be shorter than record_ttl")
        if self.provider_republish_interval >= self.provider_record_ttl:
            raise ValueError("provider_republish_interval must be shorter than provider_record_ttl")
        if self.record_ttl > self.max_record_ttl:
            raise ValueError("record_ttl must not exceed max_record_ttl (peers would refuse ours)")
        if self.max_record_size + self.max_key_size + 1024 > self.max_message_size:
            raise ValueError("max_message_size must leave room for a record of max_record_size")
        if self.disjoint_paths > self.alpha:
            raise ValueError("disjoint_paths must not exceed alpha (each path needs a request)")
        if len(set(self.protocols)) != len(self.protocols):
            raise ValueError("protocols must not repeat a protocol ID")
        for protocol in self.protocols:
            if not protocol.startswith("/") or not protocol.isprintable() or len(protocol) > 100:
                raise ValueError(f"not a protocol ID (printable, from '/'): {protocol!r}")
        return self
