"""Faults on live paths in the NAT lab, and how long until pings flow again.

Shared by tests/nat/test_recovery.py and benchmarks/nat_matrix.py. A peer pings its partner
every 100 ms (each ping given 500 ms); a fault is injected; recovery is the time from the fault
(or from the end of a link cut) to the first answered ping after the last unanswered one.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from tests.nat.mesh_lab import LabPeer, build_lab, start_peers, start_relays
from tests.netlab import Lab, NatKind

WATCH_BEFORE = 1.0  # seconds of pings before the fault
WATCH_AFTER = 6.0  # seconds of pings after it
CUT_SECONDS = 3.0


@dataclass
class Recovery:
    fault: str
    path_before: str
    path_after: str
    lost_pings: int
    recovery_s: float  # 0 when no ping was lost


def recovery_from(samples: list, fault_time: float) -> tuple[int, float, str]:
    after = [s for s in samples if s[0] >= fault_time - 0.5]
    failures = [s for s in after if not s[1]]
    last_path = next((s[2] for s in reversed(samples) if s[1]), "none")
    if not failures:
        return 0, 0.0, last_path
    last_failure = failures[-1][0]
    recovered = next((s[0] for s in after if s[1] and s[0] > last_failure), None)
    if recovered is None:
        return len(failures), float("inf"), last_path
    return len(failures), max(0.0, recovered - fault_time), last_path


class RecoveryLab:
    """Two relays; two peers behind each of two router kinds."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.hosts = build_lab(lab, [NatKind.PORT_RESTRICTED, NatKind.SYMMETRIC], per_kind=2)
        self.relay_processes: dict[str, subprocess.Popen[str]] = {}
        self.peers: dict[str, LabPeer] = {}

    def start(self) -> None:
        self.lab.start()
        relays = start_relays(self.lab, self.relay_processes)
        self.relay_addrs = dict(zip(self.relay_processes, relays, strict=True))
        self.peers = start_peers(self.lab, self.hosts, relays)

    def _measure(
        self,
        dialer: str,
        target: str,
        fault: str,
        inject: Callable[[LabPeer, LabPeer, dict], float],
    ) -> Recovery:
        a, b = self.peers[dialer], self.peers[target]
        connected = a.command(timeout=60, cmd="connect", peer=b.peer_id, addrs=b.addrs)
        a.command(cmd="monitor", peer=b.peer_id, interval=0.1, timeout=0.5)
        time.sleep(WATCH_BEFORE)  # pings flow on the healthy path meanwhile
        fault_time = inject(a, b, connected)
        time.sleep(WATCH_AFTER)
        samples = a.command(timeout=30, cmd="monitor_stop", peer=b.peer_id)["samples"]
        lost, seconds, path_after = recovery_from(samples, fault_time)
        for x, y in ((a, b), (b, a)):
            x.command(cmd="disconnect", peer=y.peer_id)
        return Recovery(fault, connected["path"], path_after, lost, seconds)

    def relay_killed(self) -> Recovery:
        """sym -> sym can only be relayed: kill the relay carrying it."""

        def inject(a: LabPeer, b: LabPeer, connected: dict) -> float:
            via = connected["via"]
            name = next(n for n, addr in self.relay_addrs.items() if via.startswith(addr))
            moment = time.time()
            self.relay_processes[name].send_signal(signal.SIGKILL)
            return moment

        return self._measure("hsymm0", "hsymm1", "relay killed", inject)

    def mapping_flushed(self, router: str, dialer: str, target: str) -> Recovery:
        def inject(a: LabPeer, b: LabPeer, connected: dict) -> float:
            moment = time.time()
            self.lab.flush_conntrack(router)
            return moment

        return self._measure(dialer, target, f"conntrack flush on {router}", inject)

    def link_cut(self, host: str, dialer: str, target: str) -> Recovery:
        def inject(a: LabPeer, b: LabPeer, connected: dict) -> float:
            self.lab.cut_link(host)
            time.sleep(CUT_SECONDS)
            self.lab.restore_link(host)
            return time.time()  # recovery counts from the link's return

        return self._measure(dialer, target, f"{host} link cut {CUT_SECONDS:.0f} s", inject)

    def run_all(self) -> list[Recovery]:
        return [
            self.mapping_flushed("rport1", "hport0", "hport1"),
            self.mapping_flushed("rsymm0", "hsymm0", "hport1"),
            self.link_cut("hport1", "hport0", "hport1"),
            self.relay_killed(),
        ]
