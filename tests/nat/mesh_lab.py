"""Nodes in the NAT lab: public relays, and peers behind routers, driven over JSON lines.

Every node listens on QUIC and TCP at port 4001 (a network that drops UDP is reached over TCP).
Shared by the NAT tests and `benchmarks/nat_matrix.py`.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from dataclasses import dataclass, field

from tests.netlab import Lab, NatKind

PORT = 4001
ROUTER_KINDS = [
    NatKind.FULL_CONE,
    NatKind.RESTRICTED_CONE,
    NatKind.PORT_RESTRICTED,
    NatKind.SYMMETRIC,
    NatKind.PUBLIC,
    NatKind.FIREWALL,
    NatKind.UDP_BLOCKED,
]
RELAYS = ("relay1", "relay2")


class PeerError(RuntimeError):
    pass


@dataclass
class LabPeer:
    """One lab node process (a `tests.nat.lab_peer`), answering JSON commands."""

    name: str
    process: subprocess.Popen[str]
    ready: dict = field(default_factory=dict)

    def _readline(self, timeout: float) -> dict:
        assert self.process.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout, selectors.EVENT_READ)
        try:
            if not selector.select(timeout):
                raise PeerError(f"{self.name}: no answer within {timeout} s")
        finally:
            selector.close()
        line = self.process.stdout.readline()
        if not line:
            raise PeerError(f"{self.name}: process exited ({self.process.poll()})")
        return json.loads(line)

    def wait_ready(self, timeout: float = 30.0) -> dict:
        self.ready = self._readline(timeout)
        return self.ready

    def command(self, timeout: float = 30.0, **command: object) -> dict:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        answer = self._readline(timeout)
        if "error" in answer:
            raise PeerError(f"{self.name}: {answer['error']}")
        return answer

    @property
    def peer_id(self) -> str:
        return self.ready["peer_id"]

    @property
    def addrs(self) -> list[str]:
        return self.ready["addrs"]


def listen_addrs(address: str) -> list[str]:
    """QUIC and TCP, both on `PORT`."""
    return [f"/ip4/{address}/udp/{PORT}/quic-v1", f"/ip4/{address}/tcp/{PORT}"]


def tcp_twin(addr: str) -> str:
    """The TCP address of a lab node from its QUIC one (every lab node listens on both)."""
    return addr.replace(f"/udp/{PORT}/quic-v1/", f"/tcp/{PORT}/")


def start_relays(lab: Lab, processes: dict | None = None) -> list[str]:
    """Start `lattica-ray node` on each public relay host; their full QUIC multiaddrs (each
    relay listens on TCP too: `tcp_twin`).

    `processes`, when given, receives each relay's Popen by host name (to kill it in tests).
    """
    addrs = []
    for name in RELAYS:
        listen = [arg for addr in listen_addrs(lab.address(name)) for arg in ("--listen", addr)]
        process = lab.spawn(
            name,
            [
                sys.executable, "-m", "lattica_ray.cli", "node", *listen,
                "--relay-circuit-bytes", "0", "--relay-circuit-seconds", "0",
                "--log-level", "WARNING",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )  # fmt: skip
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise PeerError(f"relay {name} did not start")
        addrs.append(next(a for a in json.loads(line)["addrs"] if "/quic-v1/" in a))
        if processes is not None:
            processes[name] = process
    return addrs


def start_peer(lab: Lab, name: str, bootstrap: list[str]) -> LabPeer:
    """A `tests.nat.lab_peer` on host `name`, bootstrapped over QUIC and TCP."""
    argv = [sys.executable, "-m", "tests.nat.lab_peer"]
    for addr in listen_addrs(lab.address(name)):
        argv += ["--listen", addr]
    for addr in bootstrap:
        argv += ["--bootstrap", addr]
        if tcp_twin(addr) != addr:
            argv += ["--bootstrap", tcp_twin(addr)]
    debug_dir = os.environ.get("NATLAB_LOG_DIR")  # set it to keep each peer's log there
    if debug_dir:
        argv += ["--log-level", os.environ.get("NATLAB_LOG_LEVEL", "INFO")]
    stderr = open(f"{debug_dir}/{name}.log", "w") if debug_dir else subprocess.DEVNULL
    process = lab.spawn(
        name, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True
    )
    return LabPeer(name, process)


def build_lab(lab: Lab, kinds: list[NatKind], per_kind: int = 2) -> list[str]:
    """Relays plus `per_kind` routers of each kind with one host behind each; host names."""
    for name in RELAYS:
        lab.add_public_host(name)
    hosts = []
    for kind in kinds:
        for index in range(per_kind):
            router = f"r{kind.value[:4]}{index}"
            host = f"h{kind.value[:4]}{index}"
            lab.add_nat(router, kind)
            lab.add_host(host, behind=router)
            hosts.append(host)
    return hosts


def start_peers(lab: Lab, hosts: list[str], bootstrap: list[str]) -> dict[str, LabPeer]:
    peers = {host: start_peer(lab, host, bootstrap) for host in hosts}
    deadline = time.monotonic() + 120  # a loaded machine starts 14 Python nodes slowly
    for peer in peers.values():
        peer.wait_ready(max(1.0, deadline - time.monotonic()))
    return peers
