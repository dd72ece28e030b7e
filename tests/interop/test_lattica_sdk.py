"""The third-party lattica SDK against itself: proves the namespace harness and the SDK driver."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.interop


def test_lattica_pair_quic_and_tcp(run_scenario):
    verdict = run_scenario("lattica_pair")
    names = {check["name"] for check in verdict["checks"]}
    for transport in ("quic", "tcp"):
        assert f"{transport}: identify a<-b protocolVersion" in names
        assert f"{transport}: ping b->a" in names
        assert f"{transport}: dht a->b" in names
    assert "protocolVersion mismatch: the connection is dropped" in names
