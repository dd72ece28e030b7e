"""Relay limits, explicit and configurable (defaults from go-libp2p's relay service)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class RelayConfig(BaseModel):
    """What a node serving circuit relay v2 allows. Every limit is explicit."""

    model_config = {"frozen": True}

    enabled: bool = Field(True, description="serve /libp2p/circuit/relay/0.2.0/hop")
    reservation_ttl: float = Field(3600.0, gt=0, description="seconds a reservation lasts")
    max_reservations: int = Field(128, ge=0, description="reservations held at once")
    # A peer holds at most ONE reservation per relay (a RESERVE refreshes it): stricter than
    # go-libp2p's 4 per peer, which counts a peer's addresses separately.
    max_reservations_per_ip: int = Field(8, ge=1)
    max_circuits: int = Field(64, ge=0, description="relayed connections at once")
    max_circuits_per_peer: int = Field(16, ge=1, description="per source and per target peer")
    circuit_duration: float = Field(
        120.0, ge=0, description="seconds a relayed connection may last; 0 = unlimited"
    )
    circuit_data: int = Field(
        128 * 1024, ge=0, description="bytes per direction per relayed connection; 0 = unlimited"
    )
    connect_timeout: float = Field(10.0, gt=0, description="seconds to reach the target")


class RelayClientConfig(BaseModel):
    """How a NAT'd node uses relays."""

    model_config = {"frozen": True}

    wanted_reservations: int = Field(2, ge=0, description="relays to hold slots on (redundancy)")
    refresh_margin: float = Field(
        0.25, gt=0, lt=1, description="refresh when this fraction of the reservation is left"
    )
    retry_delay: float = Field(5.0, gt=0, description="seconds before retrying a failed relay")
