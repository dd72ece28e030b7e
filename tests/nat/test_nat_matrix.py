"""The connectivity matrix in the NAT lab: every pair of router kinds, both directions.

Connected always (a relay is allowed); direct (public or hole-punched) in every pair where at
least one side maps endpoint-independently and neither side is the UDP-dropping firewall.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from tests.nat.mesh_lab import ROUTER_KINDS, build_lab, start_peers, start_relays
from tests.netlab import Lab, NatKind

pytestmark = [pytest.mark.root, pytest.mark.slow]

DIRECT_PATHS = {"direct", "holepunched"}


def direct_required(dialer: NatKind, target: NatKind) -> bool:
    if NatKind.FIREWALL in (dialer, target):
        return False
    return not (dialer == NatKind.SYMMETRIC and target == NatKind.SYMMETRIC)


@pytest.mark.timeout(600)
def test_every_pair_connects_and_punches_where_theory_allows(
    netlab: Callable[..., Lab],
) -> None:
    lab = netlab()
    hosts = build_lab(lab, ROUTER_KINDS, per_kind=2)
    lab.start()
    relays = start_relays(lab)
    peers = start_peers(lab, hosts, relays)
    # Each node knows what it is behind: two relays observe it, AutoNAT checks it.
    for kind in ROUTER_KINDS:
        ready = peers[f"h{kind.value[:4]}0"].ready
        expected = "endpoint-dependent" if kind == NatKind.SYMMETRIC else "endpoint-independent"
        assert ready["mapping"] == expected, (kind, ready)
        if kind in (NatKind.PORT_RESTRICTED, NatKind.SYMMETRIC, NatKind.FIREWALL):
            assert ready["reachability"] == "private", (kind, ready)
            assert any("/p2p-circuit" in a for a in ready["addrs"]), (kind, ready)
        if kind == NatKind.PUBLIC:
            assert ready["reachability"] == "public", ready
    table = []
    for dialer_kind, target_kind in itertools.product(ROUTER_KINDS, repeat=2):
        dialer = peers[f"h{dialer_kind.value[:4]}0"]
        target = peers[f"h{target_kind.value[:4]}1"]
        result = dialer.command(timeout=60, cmd="connect", peer=target.peer_id, addrs=target.addrs)
        table.append((dialer_kind.value, target_kind.value, result))
        for a, b in ((dialer, target), (target, dialer)):
            a.command(cmd="disconnect", peer=b.peer_id)
    print()
    for dialer_kind, target_kind, result in table:
        print(
            f"{dialer_kind:16} -> {target_kind:16} {result['path']:12} "
            f"{result['time_to_path_ms']:8.0f} ms to path, rtt {result['rtt_ms']:.2f} ms"
        )
    failures = [
        (d, t, r["path"])
        for d, t, r in table
        if direct_required(NatKind(d), NatKind(t)) and r["path"] not in DIRECT_PATHS
    ]
    assert not failures, failures
    symmetric_pair = [r for d, t, r in table if d == t == NatKind.SYMMETRIC.value]
    assert symmetric_pair[0]["path"] == "relayed"
