"""Our Node and the lattica SDK (rust-libp2p) over QUIC-v1: connect, identify and ping both ways."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.interop


def test_ours_and_lattica_over_quic(run_scenario):
    verdict = run_scenario("ours_quic")
    names = {check["name"] for check in verdict["checks"]}
    for way in ("ours->theirs", "theirs->ours"):
        for check in (
            "connect",
            "SDK's protocolVersion",
            "SDK observed us at our listen addr",
            "SDK got our protocolVersion",
            "we observed the SDK at its listen addr",
            "our ping to the SDK",
            "the SDK's ping to us",
            "still connected after identify and ping",
        ):
            assert f"{way}: {check}" in names
    assert "protocolVersion /not-lattica/1.0.0: the SDK drops us" in names
    assert "dial /p2p/X reaching the SDK node: refused, naming both peers" in names
    assert "cli ping to the SDK: 2 answers, direct" in names
