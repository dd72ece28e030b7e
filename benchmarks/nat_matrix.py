"""The NAT lab's connectivity matrix and recovery times, as tables (needs root).

    sudo .venv/bin/python benchmarks/nat_matrix.py [--json]

Builds a lab of two public relays and two routers of each kind (full cone, restricted cone,
port-restricted, symmetric, public, firewall, UDP blocked) with one peer behind each (every
node listens on QUIC and TCP), connects every ordered pair, and prints the path kind and the
transport new streams take, the time to that path, the time to the first ping, the RTT and
every path kept (transport/kind).
Then injects faults (relay killed, NAT mapping flushed, link cut) and prints recovery times.
Reference: libp2p DCUtR succeeds in ~70% of real-world attempts (2025 measurement).
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from tests.nat.mesh_lab import ROUTER_KINDS, build_lab, start_peers, start_relays
from tests.nat.recovery import RecoveryLab
from tests.netlab import Lab


def connectivity_matrix() -> list[dict]:
    lab = Lab()
    hosts = build_lab(lab, ROUTER_KINDS, per_kind=2)
    rows = []
    try:
        lab.start()
        started = time.monotonic()
        relays = start_relays(lab)
        peers = start_peers(lab, hosts, relays)
        print(
            f"lab and {len(peers) + 2} nodes up in {time.monotonic() - started:.1f} s", flush=True
        )
        for dialer_kind, target_kind in itertools.product(ROUTER_KINDS, repeat=2):
            dialer = peers[f"h{dialer_kind.value[:4]}0"]
            target = peers[f"h{target_kind.value[:4]}1"]
            result = dialer.command(
                timeout=60, cmd="connect", peer=target.peer_id, addrs=target.addrs
            )
            rows.append({"dialer": dialer_kind.value, "target": target_kind.value, **result})
            for a, b in ((dialer, target), (target, dialer)):
                a.command(cmd="disconnect", peer=b.peer_id)
    finally:
        lab.stop()
    return rows


def recovery_table() -> list[dict]:
    lab = Lab()
    scenario = RecoveryLab(lab)
    try:
        scenario.start()
        return [result.__dict__ for result in scenario.run_all()]
    finally:
        lab.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    matrix = connectivity_matrix()
    recovery = recovery_table()
    if args.json:
        print(json.dumps({"matrix": matrix, "recovery": recovery}))
        return
    print(
        f"\n{'dialer':16} {'target':16} {'path':12} {'via':5} {'to path':>9} {'1st ping':>9} "
        f"{'rtt':>8}  paths kept"
    )
    for row in matrix:
        print(
            f"{row['dialer']:16} {row['target']:16} {row['path']:12} {row['transport']:5} "
            f"{row['time_to_path_ms']:7.0f}ms {row['first_ping_ms']:7.2f}ms {row['rtt_ms']:6.2f}ms"
            f"  {' '.join(row['paths'])}"
        )
    direct = sum(1 for row in matrix if row["path"] in ("direct", "holepunched"))
    blocked = [row for row in matrix if "udp_blocked" in (row["dialer"], row["target"])]
    blocked_direct = sum(1 for row in blocked if row["path"] in ("direct", "holepunched"))
    punched = [row for row in matrix if row["first_path"] == "relayed"]
    upgraded = sum(1 for row in punched if row["path"] == "holepunched")
    print(
        f"\nconnected {len(matrix)}/{len(matrix)} pairs; direct or hole-punched {direct}/"
        f"{len(matrix)}; hole punching upgraded {upgraded}/{len(punched)} relayed connections "
        "(libp2p DCUtR in the wild: ~70%)"
    )
    cones = {"full_cone", "restricted_cone", "port_restricted"}
    tcp_punchable = [r for r in blocked if {r["dialer"], r["target"]} - {"udp_blocked"} <= cones]
    tcp_punched = sum(1 for row in tcp_punchable if row["path"] in ("direct", "holepunched"))
    print(
        f"UDP-blocked site: connected {len(blocked)}/{len(blocked)} pairs over TCP; direct or "
        f"hole-punched {blocked_direct}/{len(blocked)} (symmetric NAT pairs stay relayed); "
        f"TCP-punched through cone/port-restricted NATs {tcp_punched}/{len(tcp_punchable)}"
    )
    print(f"\n{'fault':32} {'path before':12} {'path after':12} {'lost':>5} {'recovery':>9}")
    for row in recovery:
        print(
            f"{row['fault']:32} {row['path_before']:12} {row['path_after']:12} "
            f"{row['lost_pings']:5d} {row['recovery_s']:8.2f}s"
        )


if __name__ == "__main__":
    main()
