"""`lattica-ray ping PEER_ID --bootstrap RELAY` from behind one NAT to a peer behind another:
the DHT finds the peer's relay address, the relay connects, hole punching upgrades the path."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import pytest

from tests.nat.mesh_lab import build_lab, start_peers, start_relays
from tests.netlab import Lab, NatKind

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.mark.timeout(180)
def test_ping_a_bare_peer_id_across_two_nats(netlab: Callable[..., Lab]) -> None:
    lab = netlab()
    hosts = build_lab(lab, [NatKind.PORT_RESTRICTED], per_kind=2)
    lab.start()
    relays = start_relays(lab)
    target = start_peers(lab, [hosts[0]], relays)[hosts[0]]
    argv = [sys.executable, "-m", "lattica_ray.cli", "ping", target.peer_id]
    argv += ["--count", "4", "--interval", "0.5", "--json"]
    argv += ["--listen", f"/ip4/{lab.address(hosts[1])}/udp/4001/quic-v1"]
    for relay in relays:
        argv += ["--bootstrap", relay]
    result = lab.run(hosts[1], argv, timeout=120, check=False)
    print(result.stdout, result.stderr[-3000:])
    replies = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(replies) == 4 and all("rtt_ms" in reply for reply in replies), result.stdout
    assert replies[-1]["path"] == "holepunched", replies
