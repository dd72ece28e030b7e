"""Our DHT and the lattica SDK's (rust-libp2p Kademlia on `/lattica/1.0.0`) as one DHT.

Over QUIC-v1 and over TCP (Noise + Yamux): records put by either node are read by the other,
raw and through the SDK's pickling Python API; provider records both ways; the SDK node stays up.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.interop

DHT_SCENARIO_TIMEOUT_S = 55.0  # it takes about a second; the must-show asks for under a minute


@pytest.mark.parametrize("transport", ["quic", "tcp"])
def test_one_dht_with_lattica(run_scenario, transport):
    verdict = run_scenario("dht", "--transport", transport, timeout=DHT_SCENARIO_TIMEOUT_S)
    names = {check["name"] for check in verdict["checks"]}
    for check in (
        "connect: the SDK answers our kad requests on /lattica/1.0.0",
        "SDK put -> our get: node.dht.get reads the SDK's bytes",
        "SDK put -> our get: with our copy gone, GET_VALUE to the SDK returns it",
        "SDK put -> our get: the SDK's public store() (a pickle), read without unpickling",
        "SDK put -> our get: subkeys and their index",
        "our put -> SDK get: the SDK reads our bytes",
        "our put -> SDK get: the SDK's GET_VALUE to us returns a record only we hold",
        "our put -> SDK get: the SDK's public get() unpickles our value into the same bytes",
        "providers: we find the SDK as a provider of its key",
        "providers: the SDK finds us as a provider of ours",
        "the SDK node is alive and still connected to us",
    ):
        assert f"{transport}: {check}" in names
