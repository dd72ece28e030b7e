"""Cluster view settings: timing of heartbeats, gossip and anti-entropy, and every limit on what
peers may send. Durations are seconds; those about liveness are measured on the view's clock (which
tests replace), those about pacing I/O are real time.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

KIB = 1024
MIB = 1024 * KIB


class ViewConfig(BaseModel):
    """Everything tunable about one replica of the cluster view. Unknown fields are an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # -- membership (view clock) -------------------------------------------------------------
    heartbeat_interval: float = Field(2.0, gt=0, description="how often we sign a heartbeat")
    suspect_after: float = Field(
        10.0, gt=0, description="a member not heard from for this long is suspect"
    )
    gone_after: float = Field(
        30.0, gt=0, description="a member not heard from for this long is gone: actors hidden"
    )
    max_clock_skew: float = Field(
        30.0,
        ge=0,
        description="heartbeats whose author time is older than gone_after plus this are stale "
        "(relayed late) and do not count as signs of life",
    )

    # -- gossip and anti-entropy -------------------------------------------------------------
    gossip_fanout: int = Field(
        4,
        ge=1,
        le=64,
        description="peers each new update is pushed to, by its author and by "
        "every replica on first receipt",
    )
    heartbeat_fanout: int = Field(4, ge=1, le=64, description="the same for heartbeats")
    gossip_batch_delay: float = Field(
        0.005, ge=0, description="real seconds between gossip flushes: items in between batch"
    )
    anti_entropy_interval: float = Field(
        5.0, gt=0, description="view-clock seconds between syncs with one random member"
    )
    gap_grace: float = Field(
        1.0,
        ge=0,
        description="a heartbeat announcing updates we lack triggers a sync with its sender if "
        "gossip has not delivered them within this many view-clock seconds",
    )
    sync_cooldown: float = Field(
        0.5, ge=0, description="real seconds before syncing again with the same peer"
    )
    unreachable_backoff: float = Field(
        10.0, ge=0, description="view-clock seconds a peer we failed to reach is left out of gossip"
    )
    tick_interval: float = Field(0.25, gt=0, description="real seconds between timer checks")

    compact_after_updates: int = Field(
        1000,
        ge=10,
        description="after this many updates of one run, start a new run holding only the live "
        "entries and retire the old one: the log and document stay the size of what is live",
    )

    # -- I/O ---------------------------------------------------------------------------------
    request_timeout: float = Field(10.0, gt=0, description="one gossip push or one whole sync")
    max_concurrent_streams: int = Field(32, ge=1, description="outbound view streams at once")
    max_concurrent_syncs: int = Field(4, ge=1, description="syncs we initiate at once")

    # -- limits on what peers may send -------------------------------------------------------
    max_update_bytes: int = Field(256 * KIB, ge=1 * KIB, description="one Yjs update")
    max_message_bytes: int = Field(1 * MIB, ge=4 * KIB, description="one framed view message")
    sync_chunk_bytes: int = Field(
        64 * KIB, ge=1 * KIB, description="sync streams updates in chunks of this size"
    )
    max_gossip_items: int = Field(256, ge=1, description="updates+heartbeats in one gossip frame")
    max_chains: int = Field(
        10_000, ge=1, description="(author, incarnation) chains we track; more are refused"
    )
    pending_per_chain: int = Field(
        64, ge=1, description="updates held per chain while their predecessors are fetched"
    )
    pending_total: int = Field(1024, ge=1, description="updates held in all")
    pending_ttl: float = Field(
        60.0, gt=0, description="view-clock seconds an update may wait for its predecessors"
    )
    seen_cache_size: int = Field(
        65_536, ge=16, description="envelope IDs remembered for gossip de-duplication"
    )
    max_value_bytes: int = Field(
        64 * KIB, ge=16, description="one user-map value or record, JSON-encoded"
    )
    max_name_length: int = Field(256, ge=1, description="actor, map and key names")
    subscriber_queue: int = Field(
        4096, ge=1, description="changes buffered per subscriber before it overflows"
    )

    # -- sender scores -------------------------------------------------------------------------
    penalty_invalid: float = Field(
        20.0, ge=0, description="score lost for a forged or out-of-rule update or heartbeat"
    )
    penalty_malformed: float = Field(10.0, ge=0, description="score lost for undecodable bytes")
    ban_score: float = Field(
        -100.0, le=0, description="senders at or below this score are refused and not gossiped to"
    )

    @model_validator(mode="after")
    def _check_order(self) -> ViewConfig:
        if not self.heartbeat_interval < self.suspect_after < self.gone_after:
            raise ValueError(
                "need heartbeat_interval < suspect_after < gone_after, got "
                f"{self.heartbeat_interval}, {self.suspect_after}, {self.gone_after}"
            )
        if self.max_update_bytes + 256 > self.max_message_bytes:
            raise ValueError("max_message_bytes must leave room for one max_update_bytes update")
        if self.sync_chunk_bytes + 64 > self.max_message_bytes:
            raise ValueError("sync_chunk_bytes must fit in max_message_bytes")
        return self
