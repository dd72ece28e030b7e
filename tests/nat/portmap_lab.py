"""miniupnpd on a NAT lab router: a real UPnP-IGD + NAT-PMP/PCP gateway for port-mapping tests.

``enable_port_mapping(lab, router, stun_host=...)`` makes a started lab router offer port mapping
the way a home router running miniupnpd does. Three things the lab does not have are added from
here (tests/netlab is left as it is):

- **nftables chains for miniupnpd.** Debian's miniupnpd 2.3.1 (nftables backend) writes its rules
  into table ``inet filter``: DNAT rules in chain ``prerouting_miniupnpd``, accept rules in chain
  ``miniupnpd``; it does not create them. We create both and hook them in (nat prerouting,
  filter forward). The lab router's own forward chain (table ``ip netlab_router``) drops every
  new inbound flow, and a drop in any base chain is final, so we also let DNAT'ed flows through
  it (``ct status dnat accept``), which is what a router with port forwarding does. Only the
  router's DNAT rules, i.e. miniupnpd's, produce such flows on a port-restricted router.
- **A LAN interface with an address.** Lab LANs are point-to-point veths (the router's LAN
  address sits on ``lo``); miniupnpd needs an interface with an IPv4 address and prefix to
  listen for SSDP multicast. We put the router's LAN address on the veth of each given host
  (``noprefixroute``: the lab's routes stay as they were).
- **A public address miniupnpd believes in.** miniupnpd refuses port forwarding when its WAN
  address is in a reserved range, and RFC 5737's 203.0.113.0/24 (the lab's WAN range) is one; the
  only way around it is ``ext_perform_stun``. :func:`stun_responder` (run on a lab public host)
  answers every STUN Binding request from the socket it came to, ignoring CHANGE-REQUEST, so
  miniupnpd sees no filtering and takes its WAN address as public. It is a lab stand-in, not a
  STUN server; nothing here talks to anything outside the lab.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.netlab.lab import Lab, NodeInfo
from tests.netlab.netns import LabError
from tests.netlab.routers import TABLE as ROUTER_TABLE

MINIUPNPD = "/usr/sbin/miniupnpd"
APT_PACKAGE = "miniupnpd-nftables"  # with "miniupnpd" (config, scripts); no daemon is started
STUN_PORT = 3478
READY_TIMEOUT_S = 10.0
STUN_MAGIC_COOKIE = 0x2112A442  # RFC 5389
STUN_BINDING_REQUEST = 0x0001
STUN_BINDING_SUCCESS = 0x0101
STUN_XOR_MAPPED_ADDRESS = 0x0020
STUN_MAPPED_ADDRESS = 0x0001

# Table and chain names miniupnpd 2.3.1 uses by default (netfilter_nft/nftnlrdr_misc.c).
UPNP_TABLE = "filter"
UPNP_FORWARD_CHAIN = "miniupnpd"
UPNP_PREROUTING_CHAIN = "prerouting_miniupnpd"
UPNP_POSTROUTING_CHAIN = "postrouting_miniupnpd"


def upnp_ruleset() -> str:
    """Table ``inet filter`` with the chains miniupnpd fills, hooked in (accepting by default)."""
    return f"""\
table inet {UPNP_TABLE} {{
  chain forward {{
    type filter hook forward priority filter; policy accept;
    jump {UPNP_FORWARD_CHAIN}
  }}
  chain {UPNP_FORWARD_CHAIN} {{
  }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    jump {UPNP_PREROUTING_CHAIN}
  }}
  chain {UPNP_PREROUTING_CHAIN} {{
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    jump {UPNP_POSTROUTING_CHAIN}
  }}
  chain {UPNP_POSTROUTING_CHAIN} {{
  }}
}}
insert rule ip {ROUTER_TABLE} forward iifname "wan" ct status dnat accept
"""


def miniupnpd_config(
    *,
    ext_ifname: str,
    listening: list[str],
    lan: str,
    stun_host: str,
    secure_mode: bool = True,
    min_lifetime: int = 2,
    natpmp: bool = True,
    upnp: bool = True,
) -> str:
    """A miniupnpd.conf for one lab router (UDP and TCP mappings for its LAN only)."""
    lines = [
        f"ext_ifname={ext_ifname}",
        *(f"listening_ip={name}" for name in listening),
        "ext_perform_stun=yes",
        f"ext_stun_host={stun_host}",
        f"ext_stun_port={STUN_PORT}",
        "port=0",  # any free TCP port for the HTTP (SOAP) server; SSDP tells clients where
        f"enable_natpmp={'yes' if natpmp else 'no'}",
        f"enable_upnp={'yes' if upnp else 'no'}",
        f"secure_mode={'yes' if secure_mode else 'no'}",
        f"min_lifetime={min_lifetime}",
        "max_lifetime=86400",
        "system_uptime=yes",
        "notify_interval=60",
        "clean_ruleset_interval=600",
        "uuid=3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b",
        f"allow 1024-65535 {lan} 1024-65535",
        "deny 0-65535 0.0.0.0/0 0-65535",
    ]
    return "\n".join(lines) + "\n"


@dataclass
class PortMappingRouter:
    """A running miniupnpd on one lab router (``lab.stop()`` kills it; ``stop()`` does sooner)."""

    lab: Lab
    router: NodeInfo
    process: subprocess.Popen[str]
    log_lines: list[str] = field(default_factory=list)

    @property
    def lan_address(self) -> str:
        assert self.router.lan is not None
        return str(self.router.lan[1])

    def log(self) -> str:
        return "\n".join(self.log_lines)

    def ruleset(self) -> str:
        """The router's miniupnpd table as ``nft list`` prints it (mappings show as rules)."""
        return self.lab.run(self.router.name, ["nft", "list", "table", "inet", UPNP_TABLE]).stdout

    def dnat_rules(self) -> list[str]:
        """miniupnpd's live DNAT rules, one line each."""
        listed = self.lab.run(
            self.router.name,
            ["nft", "list", "chain", "inet", UPNP_TABLE, UPNP_PREROUTING_CHAIN],
        ).stdout
        return [line.strip() for line in listed.splitlines() if "dnat" in line]

    def stop(self) -> None:
        """Stop miniupnpd now (it removes its rules as it exits)."""
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=5)


def enable_port_mapping(
    lab: Lab,
    router: str,
    *,
    stun_host: str,
    hosts: list[str] | None = None,
    secure_mode: bool = True,
    natpmp: bool = True,
    upnp: bool = True,
) -> PortMappingRouter:
    """Run miniupnpd on ``router`` (a NAT kind) for the LAN ``hosts`` (default: all of them).

    ``stun_host`` is a lab public host; a STUN stand-in is started there (see the module
    docstring). Returns once miniupnpd listens and has accepted its public address.
    """
    if not Path(MINIUPNPD).exists():
        raise LabError(f"{MINIUPNPD} is missing: apt-get install -y miniupnpd {APT_PACKAGE}")
    node = lab.node(router)
    if node.role != "router" or node.lan is None:
        raise ValueError(f"{router!r} is not a router of this lab")
    lan_hosts = [n for n in lab.nodes if n.role == "host" and n.upstream == router]
    if hosts is not None:
        lan_hosts = [lab.node(h) for h in hosts]
    if not lan_hosts:
        raise ValueError(f"router {router!r} has no LAN hosts to serve")
    start_stun_responder(lab, stun_host)
    lan_gateway = node.lan[1]
    prefix = node.lan.prefixlen
    for host in lan_hosts:
        address = f"{lan_gateway}/{prefix}"
        lab.run(router, ["ip", "addr", "add", address, "dev", host.upstream_iface, "noprefixroute"])
    lab.run(router, ["nft", "-f", "-"], input=upnp_ruleset())
    workdir = Path(tempfile.mkdtemp(prefix=f"miniupnpd-{lab.id}-{router}-"))
    config = workdir / "miniupnpd.conf"
    config.write_text(
        miniupnpd_config(
            ext_ifname=node.uplink_iface,
            listening=[h.upstream_iface for h in lan_hosts],
            lan=str(node.lan),
            stun_host=lab.address(stun_host),
            secure_mode=secure_mode,
            natpmp=natpmp,
            upnp=upnp,
        )
    )
    proc = lab.spawn(
        router,
        [MINIUPNPD, "-d", "-f", str(config), "-P", str(workdir / "miniupnpd.pid")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    running = PortMappingRouter(lab, node, proc)
    ready = threading.Event()
    wanted = ["Port forwarding is now enabled"]
    if natpmp:
        wanted.append("Listening for NAT-PMP/PCP traffic")
    if upnp:
        wanted.append("HTTP listening on port")

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            running.log_lines.append(line.rstrip())
            if all(any(w in seen for seen in running.log_lines) for w in wanted):
                ready.set()
        ready.set()  # exited: let the waiter look

    threading.Thread(target=pump, name=f"miniupnpd-{router}", daemon=True).start()
    try:
        if not ready.wait(READY_TIMEOUT_S) or proc.poll() is not None:
            raise LabError(
                f"miniupnpd on {router} did not become ready (exit {proc.poll()}); log:\n"
                + running.log()
            )
    finally:
        # It has read its config; its pid file only guards against a second daemon, and a
        # missing one at exit costs a log line. Nothing is left in /tmp.
        shutil.rmtree(workdir, ignore_errors=True)
    return running


def start_stun_responder(lab: Lab, host: str) -> None:
    """Start the STUN stand-in on lab public host ``host`` (UDP :3478); waits until it answers."""
    proc = lab.spawn(
        host,
        [sys.executable, "-m", "tests.nat.portmap_lab", "stun", "--port", str(STUN_PORT)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        raise LabError(f"STUN stand-in on {host} did not start (exit {proc.poll()}): {line!r}")


def stun_binding_response(request: bytes, source: tuple[str, int]) -> bytes | None:
    """The Binding success response for ``request`` from ``source`` (None: not a Binding)."""
    if len(request) < 20:
        return None
    kind, _length, cookie = struct.unpack_from("!HHI", request)
    if kind != STUN_BINDING_REQUEST or cookie != STUN_MAGIC_COOKIE:
        return None
    transaction = request[8:20]
    host, port = source
    address = socket.inet_aton(host)
    xor_port = port ^ (STUN_MAGIC_COOKIE >> 16)
    xor_address = bytes(
        a ^ b for a, b in zip(address, struct.pack("!I", STUN_MAGIC_COOKIE), strict=True)
    )
    attributes = struct.pack("!HHBBH", STUN_XOR_MAPPED_ADDRESS, 8, 0, 1, xor_port) + xor_address
    attributes += struct.pack("!HHBBH", STUN_MAPPED_ADDRESS, 8, 0, 1, port) + address
    header = struct.pack("!HHI", STUN_BINDING_SUCCESS, len(attributes), STUN_MAGIC_COOKIE)
    return header + transaction + attributes


def stun_responder(port: int) -> None:
    """Answer STUN Binding requests forever (the lab kills us)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    print("ready", flush=True)
    while True:
        request, source = sock.recvfrom(2048)
        response = stun_binding_response(request, source)
        if response is not None:
            sock.sendto(response, source)


def wait_for(predicate: object, timeout: float, what: str) -> None:
    """Poll ``predicate()`` until true (router state has no event to wait on)."""
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def figures(rounds: int) -> str:
    """Time map_port (and unmap) per method against miniupnpd, and without any support."""
    import asyncio
    import statistics

    from tests.netlab.netns import call_in
    from transport.nat.portmap import PortMapConfig, map_port, unmap

    configs = {
        "pcp": PortMapConfig(upnp=False),
        "natpmp": PortMapConfig(pcp=False, upnp=False),
        "upnp": PortMapConfig(pcp=False, natpmp=False),
        "all (race)": PortMapConfig(),
    }
    lab = Lab()
    lab.add_public_host("pub1")
    lab.add_nat("nat_a", kind="port_restricted")
    lab.add_host("a1", behind="nat_a")
    lab.add_nat("nat_b", kind="port_restricted")
    lab.add_host("b1", behind="nat_b")
    rows = [f"{'method':<12} {'map ms (median / max)':>22} {'unmap ms (median)':>18}  result"]
    with lab:
        began = time.perf_counter()
        enable_port_mapping(lab, "nat_a", stun_host="pub1")
        startup = time.perf_counter() - began

        async def measure(config: PortMapConfig) -> tuple[list[float], list[float], str]:
            map_ms, unmap_ms, what = [], [], ""
            for index in range(rounds):
                began = time.perf_counter()
                mapping = await map_port(42_000 + index, config=config)
                map_ms.append((time.perf_counter() - began) * 1000)
                if mapping is None:
                    return map_ms, unmap_ms, "None"
                what = f"{mapping.method} {mapping.external_ip}:{mapping.external_port}"
                began = time.perf_counter()
                await unmap(mapping)
                unmap_ms.append((time.perf_counter() - began) * 1000)
            return map_ms, unmap_ms, what

        for name, config in configs.items():
            mapped, unmapped, what = call_in(
                lab.netns("a1"), lambda c=config: asyncio.run(measure(c))
            )
            rows.append(
                f"{name:<12} {statistics.median(mapped):>10.1f} / {max(mapped):>8.1f} "
                f"{statistics.median(unmapped) if unmapped else float('nan'):>18.1f}  {what}"
            )
        missing, _, what = call_in(lab.netns("b1"), lambda: asyncio.run(measure(PortMapConfig())))
        rows.append(
            f"{'no support':<12} {missing[0]:>10.1f} / {max(missing):>8.1f} {'':>18}  {what}"
        )
    rows.append(
        f"miniupnpd ready in {startup * 1000:.0f} ms (incl. STUN stand-in); {rounds} rounds"
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.nat.portmap_lab")
    sub = parser.add_subparsers(dest="command", required=True)
    stun = sub.add_parser("stun", help="STUN Binding stand-in for miniupnpd (lab only)")
    stun.add_argument("--port", type=int, default=STUN_PORT)
    measure = sub.add_parser("figures", help="time port mapping against miniupnpd (needs root)")
    measure.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    if args.command == "stun":
        stun_responder(args.port)
    elif args.command == "figures":
        print(figures(args.rounds))


if __name__ == "__main__":
    main()
