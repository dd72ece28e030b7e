"""The QUIC engines the transport tests run against, as a fixture of `QuicConfig`s."""

from __future__ import annotations

import importlib.util

import pytest

from transport.quic import QuicConfig

QH3_MISSING = importlib.util.find_spec("qh3") is None
ENGINES = [
    "aioquic",
    pytest.param("qh3", marks=pytest.mark.skipif(QH3_MISSING, reason="qh3 is not installed")),
]


def engine_config(engine: str, **settings) -> QuicConfig:
    """The transport tests' usual settings (short timeouts) on `engine`."""
    base = {"handshake_timeout": 2.0, "idle_timeout": 5.0, "keepalive_interval": 1.0}
    return QuicConfig(engine=engine, **{**base, **settings})


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return request.param


def skip_unless_aioquic(engine: str, reason: str) -> None:
    """Some tests check what only the aioquic engine does (its flow control, its internals)."""
    if engine != "aioquic":
        pytest.skip(f"{engine}: {reason}")
