"""Settings of the QUIC endpoint, with the reasons for their defaults."""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

from pydantic import BaseModel, Field, field_validator

ENGINE_VARIABLE = "LATTICA_RAY_QUIC_ENGINE"
CONGESTION_VARIABLE = "LATTICA_RAY_QUIC_CONGESTION"
QH3_INSTALLED = importlib.util.find_spec("qh3") is not None
# qh3 where it is installed: 5-20x less CPU per byte than aioquic (benchmarks/quic_engines.py);
# aioquic, the fallback, stays selectable.
DEFAULT_ENGINE = "qh3" if QH3_INSTALLED else "aioquic"


class QuicConfig(BaseModel):
    """One endpoint's QUIC settings. Every limit is explicit."""

    model_config = {"frozen": True}

    engine: Literal["aioquic", "qh3"] = Field(
        default_factory=lambda: os.environ.get(ENGINE_VARIABLE, DEFAULT_ENGINE),
        validate_default=True,
        description="the QUIC state machine: aioquic (pure Python) or qh3 (Rust core: 5-20x "
        "less CPU per byte; see transport.quic.engine_qh3 for how it differs). Unset, "
        f"${ENGINE_VARIABLE} decides (for processes configured by others)",
    )

    handshake_timeout: float = Field(10.0, gt=0, description="seconds a dial may take")
    idle_timeout: float = Field(
        30.0, gt=0, description="close a connection silent this long (both sides must agree)"
    )
    keepalive_interval: float = Field(
        10.0,
        gt=0,
        description="PING an idle connection this often, so NAT mappings stay open "
        "(many NATs forget UDP mappings after 30 s)",
    )
    max_datagram_size: int = Field(
        1350,
        ge=1200,
        le=65487,
        description="UDP payload size a connection starts with; 1350 fits every common Internet "
        "path (QUIC needs 1200). Path MTU probing may raise it where the path carries more",
    )
    pmtu_probing: bool = Field(
        True,
        description="probe bigger datagrams (padded PINGs, sent with Don't Fragment) and use the "
        "biggest the path acknowledges: loopback 64 KiB, jumbo frames 9000, Ethernet 1500",
    )
    max_probed_datagram_size: int = Field(
        65487,
        ge=1200,
        le=65487,  # the biggest UDP payload IPv6 carries in one 64 KiB packet
        description="largest UDP payload path MTU probing tries",
    )
    stream_window: int = Field(
        4 * 1024 * 1024, ge=65536, description="receive window per stream (bytes unread)"
    )
    connection_window: int = Field(
        16 * 1024 * 1024, ge=65536, description="receive window per connection"
    )
    max_streams: int = Field(256, ge=1, description="concurrent streams the remote may open")
    stream_slot_timeout: float = Field(
        30.0,
        gt=0,
        description="how long opening a stream waits for the remote to allow another one "
        "(its concurrent stream limit: qh3's is 100) before failing with StreamError",
    )
    send_buffer_high_water: int = Field(
        2 * 1024 * 1024,
        ge=65536,
        description="a writer waits while this many bytes of its stream are unacknowledged",
    )
    max_connections: int = Field(1024, ge=1, description="inbound connections accepted at once")
    congestion_control: Literal["reno", "cubic", "bdp"] = Field(
        default_factory=lambda: os.environ.get(CONGESTION_VARIABLE, "reno"),
        validate_default=True,
        description="aioquic's congestion controller (the same figures on loopback); 'bdp' "
        "(transport.quic.congestion) is not shrunk by random loss: for lossy paths; qh3 uses "
        f"its own. Unset, ${CONGESTION_VARIABLE} decides (with ${ENGINE_VARIABLE}=aioquic, "
        "for nodes started by the CLI or Ray)",
    )
    udp_offload: bool = Field(
        True,
        description="batch datagrams through the kernel with Linux UDP GSO/GRO where it offers "
        "them (one system call per run of datagrams); off: one system call per datagram",
    )

    @field_validator("engine")
    @classmethod
    def _engine_installed(cls, engine: str) -> str:
        if engine == "qh3" and not QH3_INSTALLED:
            raise ValueError("the qh3 QUIC engine needs the qh3 package (pip install qh3)")
        return engine
