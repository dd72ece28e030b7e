"""The real `lattica-ray` node runs in the lab: a public node answers pings from a host behind a
symmetric NAT over a delayed, lossy link. This is the recipe NAT traversal tests build on."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import pytest

from tests.netlab import Lab, NatKind

pytestmark = pytest.mark.root

DELAY_MS = 15


def test_quic_ping_from_behind_a_symmetric_nat(netlab: Callable[[], Lab]) -> None:
    lab = netlab()
    lab.add_public_host("relay1")
    lab.add_nat("nat_sym", NatKind.SYMMETRIC)
    lab.add_host("sym1", behind="nat_sym")
    lab.start()
    lab.set_link("sym1", delay_ms=DELAY_MS, loss=0.01)
    listen = f"/ip4/{lab.address('relay1')}/udp/4001/quic-v1"
    node = lab.spawn(
        "relay1",
        [sys.executable, "-m", "lattica_ray.cli", "node", "--listen", listen],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert node.stdout is not None
    peer_id = json.loads(node.stdout.readline())["peer_id"]  # printed once it listens
    ping = lab.run(
        "sym1",
        [sys.executable, "-m", "lattica_ray.cli", "ping", f"{listen}/p2p/{peer_id}",
         "--count", "3", "--interval", "0.1", "--json"],
        timeout=30,
    )  # fmt: skip
    replies = [json.loads(line) for line in ping.stdout.splitlines()]
    assert [r["path"] for r in replies] == ["direct"] * 3, ping.stdout
    rtts = [r["rtt_ms"] for r in replies]
    print(f"\nQUIC ping relay1 <- sym1 (2 x {DELAY_MS} ms link delay): {rtts}")
    assert all(rtt >= 2 * DELAY_MS for rtt in rtts)
