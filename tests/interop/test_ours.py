"""Our Node and the lattica SDK (rust-libp2p): connect, identify and ping both ways.

Over QUIC-v1 (libp2p TLS) and over TCP (Noise + Yamux). A transport our node cannot listen on
yet skips with the reason our node gives.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.interop


@pytest.mark.parametrize("transport", ["quic", "tcp"])
def test_ours_and_lattica(run_scenario, transport):
    verdict = run_scenario("ours", "--transport", transport)
    names = {check["name"] for check in verdict["checks"]}
    for way in ("ours->theirs", "theirs->ours"):
        for check in (
            "connect",
            "SDK's protocolVersion",
            "SDK observed us",
            "SDK got our protocolVersion",
            "we observed the SDK",
            "our ping to the SDK",
            "the SDK's ping to us",
            "still connected after identify and ping",
        ):
            assert f"{way}: {check}" in names
    assert "protocolVersion /not-lattica/1.0.0: the SDK drops us" in names
    assert "dial /p2p/X reaching the SDK node: refused, naming both peers" in names
    assert "cli ping to the SDK: 2 answers, direct" in names
