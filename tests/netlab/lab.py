"""The NAT lab: a small Internet of Linux network namespaces on one machine.

Topology (every line is a veth pair; every node is a namespace ``netlab-<id>-<name>``)::

    public hosts 198.51.100.10+ ──┐
                                  core (routes; 198.51.100.1, 203.0.113.1)
    routers, WAN 203.0.113.10+ ───┘
      └── LAN: hosts 10.<n>.0.10+ (NAT kinds) or 192.0.2.<16k+2>+ (public, firewall kinds)

A link is named after its lower end: ``set_link("a1", ...)`` shapes the link between host a1 and
its router, ``set_link("nat_a", ...)`` the router's WAN link, ``set_link("relay1", ...)`` a
public host's link. Conditions apply to each direction (see :mod:`tests.netlab.netem`).

Build the topology, then start::

    with Lab() as lab:            # or lab.start() ... lab.stop()
        ...
    lab = Lab()
    lab.add_public_host("relay1")
    lab.add_nat("nat_a", kind="symmetric")
    lab.add_host("a1", behind="nat_a")
    lab.start()
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Literal

from tests.netlab import netns as ns
from tests.netlab.netem import (
    QUEUE_RULE,
    LinkCondition,
    counter_name,
    links_ruleset,
    segmentation_command,
)
from tests.netlab.netem import TABLE as LINKS_TABLE
from tests.netlab.netns import LabError
from tests.netlab.routers import (
    BEHAVIOUR,
    INBOUND_DROPPED,
    UDP_DROPPED,
    WAN_IFACE,
    NatKind,
    flush_mappings_script,
    router_ruleset,
)
from tests.netlab.routers import TABLE as ROUTER_TABLE
from tests.netlab.state import NAMESPACE_PREFIX, STATE_DIR, LabRecord, cleanup_stale, destroy

logger = logging.getLogger(__name__)

Role = Literal["public", "router", "host"]
Direction = Literal["both", "up", "down"]

PUBLIC_HOSTS = IPv4Network("198.51.100.0/24")  # RFC 5737 TEST-NET-2
ROUTER_WANS = IPv4Network("203.0.113.0/24")  # RFC 5737 TEST-NET-3
PUBLIC_LANS = IPv4Network("192.0.2.0/24")  # RFC 5737 TEST-NET-1, /28 per public/firewall router
PUBLIC_LAN_PREFIX = 28
CORE_PUBLIC_GW = PUBLIC_HOSTS[1]
CORE_WAN_GW = ROUTER_WANS[1]
FIRST_NODE_OFFSET = 10  # .1 .. .9 stay free for gateways
HOST_IFACE = "eth0"
CORE = "core"
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,12}$")  # "l-" + name must fit IFNAMSIZ (15)
MAX_ROUTERS = 200
KILL_GRACE_S = 3.0
DEFAULT_CONE_TIMEOUT_S = 120  # like conntrack's UDP stream timeout
LINKEMU_READY_TIMEOUT_S = 10.0
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class NodeInfo:
    """One namespace of the lab and where it sits."""

    name: str
    role: Role
    netns: str
    address: IPv4Address  # on its uplink: private for hosts behind NAT
    external_address: IPv4Address  # what public hosts see as its source address
    upstream: str  # "core" or the router a host is behind
    kind: NatKind | None  # routers: their kind; hosts: the kind of router they are behind
    lan: IPv4Network | None = None  # routers only
    mapping_timeout_s: int | None = None  # routers only; None: kernel defaults

    @property
    def uplink_iface(self) -> str:
        return WAN_IFACE if self.role == "router" else HOST_IFACE

    @property
    def upstream_iface(self) -> str:
        return f"l-{self.name}"


@dataclass(frozen=True)
class RouterDrops:
    """Packets a router dropped: unsolicited from the WAN side, and UDP (udp_blocked only)."""

    inbound: int
    udp: int


class Lab:
    """A NAT lab: build a topology, ``start()``, use it, ``stop()`` (always; it is idempotent)."""

    def __init__(self, *, lab_id: str | None = None) -> None:
        self.id = lab_id or secrets.token_hex(3)
        if not re.fullmatch(r"[0-9a-z]{1,8}", self.id):
            raise ValueError(f"lab id must be 1..8 lowercase letters or digits, got {self.id!r}")
        self.netns_prefix = f"{NAMESPACE_PREFIX}{self.id}-"
        self._nodes: dict[str, NodeInfo] = {}
        self._topology: list[dict[str, object]] = []
        self._public_lan_index = 0
        self._router_index = 0
        self._host_index: dict[str, int] = {}
        self._started = False  # built by start() or found by attach()
        self._stopped = False  # torn down
        self._owner = False  # this object tears the lab down at stop() / interpreter exit
        self._record: LabRecord | None = None
        self._processes: list[subprocess.Popen[bytes] | subprocess.Popen[str]] = []
        self._conditions: dict[tuple[str, Literal["up", "down"]], LinkCondition] = {}
        self._cut: set[str] = set()
        self._queued_netns: set[str] = set()
        self._linkemu: subprocess.Popen[bytes] | None = None
        self._linkemu_pid: int | None = None
        self.start_seconds: float | None = None
        self.stop_seconds: float | None = None

    # ----------------------------------------------------------------- topology

    def add_public_host(self, name: str) -> NodeInfo:
        """A host on the public segment with a 198.51.100.x address (bootstrap, relay, echo)."""
        self._check_new(name)
        count = sum(1 for n in self._nodes.values() if n.role == "public")
        address = self._pick(PUBLIC_HOSTS, FIRST_NODE_OFFSET + count, "public hosts")
        node = NodeInfo(name, "public", self._netns_name(name), address, address, CORE, None)
        return self._add(node, {"role": "public", "name": name})

    def add_nat(
        self,
        name: str,
        kind: NatKind | str = NatKind.PORT_RESTRICTED,
        *,
        lan: str | None = None,
        mapping_timeout_s: int | None = None,
    ) -> NodeInfo:
        """A router with a WAN address 203.0.113.x and its own LAN.

        ``lan`` picks the LAN of a NAT kind (default 10.<n>.0.0/24; give two routers the same
        LAN to model two homes on 192.168.1.0/24). Hosts behind ``public`` and firewall kinds get
        public addresses from 192.0.2.0/24 instead. ``mapping_timeout_s`` shortens how long the
        router keeps an idle UDP mapping (conntrack's UDP timeouts; kernel default 30 s before a
        reply, 120 s after).
        """
        self._check_new(name)
        kind = NatKind(kind)
        if self._router_index >= MAX_ROUTERS:
            raise LabError(f"at most {MAX_ROUTERS} routers per lab")
        if mapping_timeout_s is not None and not 1 <= mapping_timeout_s <= 86_400:
            raise ValueError(f"mapping_timeout_s must be within 1..86400, got {mapping_timeout_s}")
        wan = self._pick(ROUTER_WANS, FIRST_NODE_OFFSET + self._router_index, "routers")
        self._router_index += 1
        if BEHAVIOUR[kind].nat:
            if lan is None:
                network = IPv4Network(f"10.{self._router_index}.0.0/24")
            else:
                network = IPv4Network(lan, strict=True)
                if not network.is_private or network.prefixlen > 27:
                    raise ValueError(f"lan must be a private IPv4 network of /27 or larger: {lan}")
        else:
            if lan is not None:
                raise ValueError(f"a {kind} router gets a public LAN from {PUBLIC_LANS}; no lan=")
            subnets = list(PUBLIC_LANS.subnets(new_prefix=PUBLIC_LAN_PREFIX))
            if self._public_lan_index >= len(subnets):
                raise LabError(f"at most {len(subnets)} public/firewall routers per lab")
            network = subnets[self._public_lan_index]
            self._public_lan_index += 1
        node = NodeInfo(
            name, "router", self._netns_name(name), wan, wan, CORE, kind, network, mapping_timeout_s
        )
        self._host_index[name] = 0
        entry: dict[str, object] = {"role": "router", "name": name, "kind": str(kind), "lan": lan}
        entry["mapping_timeout_s"] = mapping_timeout_s
        return self._add(node, entry)

    def add_host(self, name: str, *, behind: str) -> NodeInfo:
        """A host on router ``behind``'s LAN (default route through that router)."""
        self._check_new(name)
        router = self._nodes.get(behind)
        if router is None or router.role != "router":
            raise ValueError(f"{behind!r} is not a router of this lab (add_nat first)")
        assert router.lan is not None and router.kind is not None
        index = self._host_index[behind]
        offset = FIRST_NODE_OFFSET + index if BEHAVIOUR[router.kind].nat else 2 + index
        address = self._pick(router.lan, offset, f"hosts behind {behind}")
        self._host_index[behind] = index + 1
        external = router.address if BEHAVIOUR[router.kind].nat else address
        node = NodeInfo(
            name, "host", self._netns_name(name), address, external, behind, router.kind
        )
        return self._add(node, {"role": "host", "name": name, "behind": behind})

    def _check_new(self, name: str) -> None:
        if self._started:
            raise LabError("add nodes before start(); the topology is fixed once the lab runs")
        if not NAME_RE.fullmatch(name) or name == CORE:
            raise ValueError(
                f"node name must match {NAME_RE.pattern} and not be {CORE!r}, got {name!r}"
            )
        if name in self._nodes:
            raise ValueError(f"node {name!r} already exists")

    @staticmethod
    def _pick(network: IPv4Network, offset: int, what: str) -> IPv4Address:
        if offset >= network.num_addresses - 1:
            raise LabError(f"no address left in {network} for more {what}")
        return network[offset]

    def _netns_name(self, name: str) -> str:
        return self.netns_prefix + name

    def _add(self, node: NodeInfo, entry: dict[str, object]) -> NodeInfo:
        self._nodes[node.name] = node
        self._topology.append(entry)
        return node

    # ----------------------------------------------------------------- queries

    def node(self, name: str) -> NodeInfo:
        try:
            return self._nodes[name]
        except KeyError:
            known = sorted(self._nodes)
            raise KeyError(f"no node {name!r} in lab {self.id} (have {known})") from None

    @property
    def nodes(self) -> list[NodeInfo]:
        return list(self._nodes.values())

    def address(self, name: str) -> str:
        """The node's own address (hosts behind NAT: private; routers: their WAN address)."""
        return str(self.node(name).address)

    def external_address(self, name: str) -> str:
        """The source address public hosts see from this node."""
        return str(self.node(name).external_address)

    def netns(self, name: str) -> str:
        """The namespace name (for `ip netns exec`); ``"core"`` names the core router."""
        return self._netns_name(CORE) if name == CORE else self.node(name).netns

    def kind(self, name: str) -> NatKind | None:
        return self.node(name).kind

    @property
    def started(self) -> bool:
        return self._started and not self._stopped

    def describe(self) -> str:
        """A table of every node: what it is, its namespace and addresses."""
        rows = [("node", "role", "kind/behind", "address", "external", "netns")]
        for n in self._nodes.values():
            what = str(n.kind) if n.role == "router" else (n.upstream if n.role == "host" else "-")
            rows.append((n.name, n.role, what, str(n.address), str(n.external_address), n.netns))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join(
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
        )

    def diagnostics(self) -> str:
        """Everything worth seeing when a lab test fails: nodes, links, router rules, conntrack."""
        parts = [f"lab {self.id}", self.describe()]
        shaped = {f"{n}/{d}": c for (n, d), c in self._conditions.items() if not c.clean}
        parts.append(f"link conditions: {shaped or 'none'}; cut: {sorted(self._cut) or 'none'}")
        if self._linkemu_log.exists():
            log = self._linkemu_log.read_text(errors="replace")[-2000:]
            parts.append(f"link emulator log: {log.strip() or '(empty)'}")
        if not self.started:
            return "\n".join(parts)
        for node in self._routers():
            rules = ns.run_in(node.netns, ["nft", "list", "ruleset"], check=False)
            tracked = ns.run_in(node.netns, ["conntrack", "-L"], check=False)
            parts += [
                f"== {node.name} ({node.kind}) nft ruleset:",
                rules.stdout.strip() or rules.stderr.strip(),
                f"== {node.name} conntrack:",
                tracked.stdout.strip() or "(empty)",
            ]
        return "\n".join(parts)

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> Lab:
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> Lab:
        """Create every namespace, link, address, route and router rule (0.1-0.3 s for 20 nodes)."""
        if self._started:
            raise LabError("lab already started (a Lab object runs once)")
        if not self._nodes:
            raise LabError("empty topology: add public hosts, routers and hosts first")
        missing = ns.missing_tools()
        if missing:
            raise LabError(f"missing tools {missing}: apt-get install -y {ns.APT_PACKAGES}")
        reason = ns.unavailable_reason()
        if reason is not None:
            raise LabError(reason)
        began = time.perf_counter()
        try:
            removed = cleanup_stale()
            if removed:
                logger.info("removed stale labs %s", removed)
        except LabError as exc:
            logger.warning("stale lab cleanup failed: %s", exc)
        if (STATE_DIR / f"{self.id}.json").exists() or ns.list_namespaces(self.netns_prefix):
            raise LabError(f"lab id {self.id} is in use by another lab; pick another id")
        self._started = True
        self._owner = True
        pid = os.getpid()
        self._record = LabRecord(self.id, pid, ns.process_start_time(pid), self._topology)
        self._record.save()  # before anything exists, so a crash leaves findable leftovers
        atexit.register(self.stop)
        try:
            self._build()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.perf_counter() - began
        logger.info(
            "lab %s up in %.2f s (%d namespaces)", self.id, self.start_seconds, len(self._nodes) + 1
        )
        return self

    def _build(self) -> None:
        all_netns = [self._netns_name(CORE), *(n.netns for n in self._nodes.values())]
        ns.ip_batch(f"netns add {name}" for name in all_netns)
        common = {
            "net.ipv6.conf.all.disable_ipv6": "1",
            "net.ipv6.conf.default.disable_ipv6": "1",
            "net.ipv4.conf.all.rp_filter": "0",
            "net.ipv4.conf.default.rp_filter": "0",
        }
        forwarding = {**common, "net.ipv4.ip_forward": "1"}
        ns.write_sysctls(self._netns_name(CORE), forwarding)
        for node in self._nodes.values():
            ns.write_sysctls(node.netns, forwarding if node.role == "router" else common)
        ns.ip_batch(
            f"link add {n.uplink_iface} netns {n.netns} type veth "
            f"peer name {n.upstream_iface} netns {self.netns(n.upstream)}"
            for n in self._nodes.values()
        )
        jobs = [(self._netns_name(CORE), self._core_commands())]
        jobs += [(n.netns, self._node_commands(n)) for n in self._nodes.values()]
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda job: ns.ip_batch(job[1], netns=job[0]), jobs))
            list(pool.map(self._configure_router, self._routers()))

    def _routers(self) -> list[NodeInfo]:
        return [n for n in self._nodes.values() if n.role == "router"]

    def _children(self, upstream: str) -> list[NodeInfo]:
        return [n for n in self._nodes.values() if n.upstream == upstream]

    def _core_commands(self) -> list[str]:
        cmds = [
            "link set lo up",
            f"addr add {CORE_PUBLIC_GW}/32 dev lo",
            f"addr add {CORE_WAN_GW}/32 dev lo",
        ]
        for child in self._children(CORE):
            cmds += [
                f"link set {child.upstream_iface} up",
                f"route add {child.address}/32 dev {child.upstream_iface}",
            ]
            if child.role == "router" and child.kind is not None and not BEHAVIOUR[child.kind].nat:
                cmds.append(
                    f"route add {child.lan} via {child.address} dev {child.upstream_iface} onlink"
                )
        return cmds

    def _node_commands(self, node: NodeInfo) -> list[str]:
        if node.role == "host":
            gateway = self.node(node.upstream).lan[1]  # type: ignore[index]
        else:
            gateway = CORE_PUBLIC_GW if node.role == "public" else CORE_WAN_GW
        up = node.uplink_iface
        cmds = [
            "link set lo up",
            f"link set {up} up",
            f"addr add {node.address}/32 dev {up}",
            f"route add default via {gateway} dev {up} onlink",
        ]
        if node.role == "router":
            assert node.lan is not None
            cmds.append(f"addr add {node.lan[1]}/32 dev lo")
            for child in self._children(node.name):
                cmds += [
                    f"link set {child.upstream_iface} up",
                    f"route add {child.address}/32 dev {child.upstream_iface}",
                ]
        return cmds

    def _configure_router(self, router: NodeInfo) -> None:
        assert router.kind is not None
        timeout = router.mapping_timeout_s
        ruleset = router_ruleset(router.kind, mapping_timeout_s=timeout or DEFAULT_CONE_TIMEOUT_S)
        ns.run_in(router.netns, ["nft", "-f", "-"], input=ruleset)
        if timeout is not None:
            ns.write_sysctls(
                router.netns,
                {
                    "net.netfilter.nf_conntrack_udp_timeout": str(timeout),
                    "net.netfilter.nf_conntrack_udp_timeout_stream": str(timeout),
                },
            )

    def stop(self) -> None:
        """Kill every process of the lab and delete its namespaces. Safe to call twice."""
        if not self._started or self._stopped:
            return
        self._stopped = True
        began = time.perf_counter()
        atexit.unregister(self.stop)
        procs = [*self._processes, *([self._linkemu] if self._linkemu else [])]
        _terminate_all(procs)
        try:
            destroy(self.id)  # also SIGKILLs whatever is still inside the namespaces
        finally:
            self.stop_seconds = time.perf_counter() - began

    def detach(self) -> None:
        """Leave the lab running after this process exits (the CLI's ``up``)."""
        if not self.started or self._record is None:
            raise LabError("only a running lab can be detached")
        self._record.owner_pid = None
        self._record.owner_start = None
        if self._linkemu is not None:
            self._linkemu_pid = self._linkemu.pid
        self._save()
        atexit.unregister(self.stop)
        self._owner = False
        self._processes.clear()
        self._linkemu = None

    @classmethod
    def attach(cls, lab_id: str) -> Lab:
        """A Lab object for a lab another process started (rebuilt from its record).

        It does not tear the lab down when this process exits; ``stop()`` does.
        """
        record = LabRecord.load(lab_id)
        lab = cls(lab_id=lab_id)
        for entry in record.topology:
            role, name = entry["role"], str(entry["name"])
            if role == "public":
                lab.add_public_host(name)
            elif role == "router":
                timeout = entry.get("mapping_timeout_s")
                lan = entry.get("lan")
                lab.add_nat(
                    name,
                    str(entry["kind"]),
                    lan=str(lan) if lan is not None else None,
                    mapping_timeout_s=int(str(timeout)) if timeout is not None else None,
                )
            else:
                lab.add_host(name, behind=str(entry["behind"]))
        lab._started = True
        lab._record = record
        for name, by_direction in record.links.items():
            for direction, fields in by_direction.items():
                key = (name, "up" if direction == "up" else "down")
                lab._conditions[key] = LinkCondition(**fields)  # type: ignore[arg-type]
        lab._cut = set(record.cut)
        lab._queued_netns = set(record.queued_netns)
        if record.linkemu_pid and ns.process_start_time(record.linkemu_pid) == record.linkemu_start:
            lab._linkemu_pid = record.linkemu_pid
        return lab

    def _save(self) -> None:
        if self._record is None:
            return
        self._record.links = {}
        for (name, direction), condition in self._conditions.items():
            self._record.links.setdefault(name, {})[direction] = asdict(condition)
        self._record.cut = sorted(self._cut)
        self._record.queued_netns = sorted(self._queued_netns)
        self._record.save()

    def _require_running(self) -> None:
        if not self.started:
            raise LabError(f"lab {self.id} is not running (start() it first)")

    # ----------------------------------------------------------------- processes

    def spawn(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        **popen_kwargs: object,
    ) -> subprocess.Popen:  # type: ignore[type-arg]
        """Start ``argv`` inside node ``name``; the lab kills it (and its children) on stop.

        ``env`` is added to this process's environment. The process gets its own session, so
        ``stop()`` can signal its whole process group.
        """
        self._require_running()
        full_env = {**os.environ, **(env or {})}
        popen_kwargs.setdefault("cwd", str(REPO_ROOT))
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.netns(name), *argv],
            env=full_env,
            start_new_session=True,
            **popen_kwargs,  # type: ignore[arg-type]
        )
        self._processes.append(proc)
        return proc

    def run(
        self,
        name: str,
        argv: list[str],
        *,
        check: bool = True,
        timeout: float = 30.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command inside node ``name`` and return its output (text)."""
        self._require_running()
        result = subprocess.run(
            ["ip", "netns", "exec", self.netns(name), *argv],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=str(REPO_ROOT),
        )
        if check and result.returncode != 0:
            raise LabError(
                f"{' '.join(argv)} in {name} failed (exit {result.returncode}): "
                f"{result.stderr.strip()}"
            )
        return result

    def socket(
        self, name: str, type: int = socket.SOCK_DGRAM, family: int = socket.AF_INET
    ) -> socket.socket:
        """A socket of this process that lives in node ``name``'s namespace.

        Pass it to asyncio (``create_datagram_endpoint(sock=...)``) to run protocol code for a
        lab host inside the test process. The caller closes it.
        """
        self._require_running()
        return ns.socket_in(self.netns(name), family, type)

    # ----------------------------------------------------------------- faults

    def flush_conntrack(self, router: str) -> None:
        """Forget every NAT mapping of ``router`` (conntrack table and cone maps): a reboot."""
        node = self._router(router)
        assert node.kind is not None
        ns.run_in(node.netns, ["conntrack", "-F"], check=False)
        script = flush_mappings_script(node.kind)
        if script:
            ns.run_in(node.netns, ["nft", "-f", "-"], input=script)
        # Live traffic re-creates entries at once, so only surviving *replied* entries (a
        # mapping that was not flushed) are an error; fresh [UNREPLIED] ones are new traffic.
        stale = [e for e in self.mappings(router) if "[UNREPLIED]" not in e]
        if stale and not self._quiet_after_flush(router):
            raise LabError(f"conntrack table of {router} not empty after flush: {stale}")

    def _quiet_after_flush(self, router: str) -> bool:
        """Whether the replied entries seen after a flush are younger than the flush."""
        # An entry that survived would keep its old timeout countdown; a new one starts fresh
        # at the full UDP stream timeout (120 s) or the unreplied one (30 s). Accept those.
        for entry in self.mappings(router):
            fields = entry.split()
            if len(fields) > 2 and fields[2].isdigit() and int(fields[2]) < 25:
                return False
        return True

    def mappings(self, router: str) -> list[str]:
        """The router's conntrack entries, one ``conntrack -L`` line each: its live NAT state."""
        node = self._router(router)
        listed = ns.run_in(node.netns, ["conntrack", "-L"], check=False).stdout
        return [line for line in listed.splitlines() if line.strip()]

    def cut_link(self, name: str) -> None:
        """Silently drop everything on ``name``'s uplink, both ways, until restore_link."""
        self.node(name)
        self._cut.add(name)
        self._apply_link(name)

    def restore_link(self, name: str) -> None:
        """Undo cut_link (delay and loss set with set_link stay as they were)."""
        self.node(name)
        self._cut.discard(name)
        self._apply_link(name)

    def set_link(
        self,
        name: str,
        *,
        delay_ms: int = 0,
        jitter_ms: int = 0,
        loss: float = 0.0,
        direction: Direction = "both",
    ) -> None:
        """Delay (+- jitter, uniform) and random loss on ``name``'s uplink, per direction.

        "up" is traffic from the node towards the Internet, "down" towards the node. Zero values
        clear the condition. Takes effect for the next packet. A shaped direction carries
        MTU-sized packets (no GSO super-packets), so loss and delay act on each one.
        """
        self.node(name)
        condition = LinkCondition(delay_ms=delay_ms, jitter_ms=jitter_ms, loss=loss)
        directions: tuple[Literal["up", "down"], ...] = (
            ("up", "down") if direction == "both" else (direction,)
        )
        if direction not in ("both", "up", "down"):
            raise ValueError(f"direction must be 'both', 'up' or 'down', got {direction!r}")
        for d in directions:
            self._conditions[(name, d)] = condition
        self._apply_link(name)
        node = self.node(name)
        senders = {"up": (node.netns, node.uplink_iface)}
        senders["down"] = (self.netns(node.upstream), node.upstream_iface)
        for d in directions:
            ns.run(segmentation_command(*senders[d], condition))

    def link_drops(self, name: str) -> int:
        """Packets dropped on ``name``'s uplink (cut or loss) since its conditions last changed."""
        node = self.node(name)
        total = 0
        for netns, iface in self._link_ends(node):
            total += self._read_counter(netns, LINKS_TABLE, counter_name(iface))
        return total

    def router_drops(self, router: str) -> RouterDrops:
        """What ``router`` dropped so far: unsolicited inbound packets, and UDP if it blocks it."""
        node = self._router(router)
        return RouterDrops(
            inbound=self._read_counter(node.netns, ROUTER_TABLE, INBOUND_DROPPED),
            udp=self._read_counter(node.netns, ROUTER_TABLE, UDP_DROPPED),
        )

    def _router(self, name: str) -> NodeInfo:
        node = self.node(name)
        if node.role != "router":
            raise ValueError(f"{name!r} is not a router")
        return node

    def _read_counter(self, netns: str, table: str, counter: str) -> int:
        result = ns.run_in(
            netns, ["nft", "-j", "list", "counter", "ip", table, counter], check=False
        )
        if result.returncode != 0:
            return 0  # table or counter not there yet: nothing dropped
        for item in json.loads(result.stdout)["nftables"]:
            if "counter" in item:
                return int(item["counter"]["packets"])
        return 0

    def _link_ends(self, node: NodeInfo) -> list[tuple[str, str]]:
        """(namespace, interface) where each direction arrives: up first, then down."""
        return [(self.netns(node.upstream), node.upstream_iface), (node.netns, node.uplink_iface)]

    def _apply_link(self, name: str) -> None:
        self._require_running()
        node = self.node(name)
        (up_ns, _), (down_ns, _) = self._link_ends(node)
        wanted = {self._condition(name, "up"), self._condition(name, "down")}
        if any(c.delayed and not c.cut for c in wanted):
            self._ensure_delay_queue([up_ns, down_ns])
        for netns in {up_ns, down_ns}:
            ns.run_in(netns, ["nft", "-f", "-"], input=links_ruleset(self._conditions_in(netns)))
        self._save()

    def _condition(self, name: str, direction: Literal["up", "down"]) -> LinkCondition:
        condition = self._conditions.get((name, direction), LinkCondition())
        return replace(condition, cut=True) if name in self._cut else condition

    def _conditions_in(self, netns: str) -> dict[str, LinkCondition]:
        """Every non-clean condition on links that arrive in ``netns``, by interface."""
        found = {}
        for node in self._nodes.values():
            for (end_ns, iface), direction in zip(
                self._link_ends(node), ("up", "down"), strict=True
            ):
                condition = self._condition(node.name, direction)  # type: ignore[arg-type]
                if end_ns == netns and not condition.clean:
                    found[iface] = condition
        return found

    def _ensure_delay_queue(self, namespaces: Iterable[str]) -> None:
        if not self._linkemu_running():
            self._start_linkemu()
        for netns in namespaces:
            if netns not in self._queued_netns:
                ns.run_in(netns, QUEUE_RULE)
                self._queued_netns.add(netns)

    @property
    def _linkemu_log(self) -> Path:
        return STATE_DIR / f"{self.id}.linkemu.log"

    def _linkemu_running(self) -> bool:
        if self._linkemu is not None:
            return self._linkemu.poll() is None
        return (
            self._linkemu_pid is not None and ns.process_start_time(self._linkemu_pid) is not None
        )

    def _start_linkemu(self) -> None:
        """Start the NFQUEUE delayer (in the core namespace, so teardown finds it there)."""
        read_fd, write_fd = os.pipe()
        all_netns = [self._netns_name(CORE), *(n.netns for n in self._nodes.values())]
        argv = [
            sys.executable,
            "-m",
            "tests.netlab.linkemu",
            "--ready-fd",
            str(write_fd),
            *all_netns,
        ]
        # Its own log file: a delayer that outlives a CLI command must not hold its pipes open.
        with open(self._linkemu_log, "ab") as log:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self._netns_name(CORE), *argv],
                cwd=str(REPO_ROOT),
                pass_fds=(write_fd,),
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        os.close(write_fd)
        try:
            ready = _read_line(read_fd, LINKEMU_READY_TIMEOUT_S)
        finally:
            os.close(read_fd)
        if ready != b"ready\n":
            _terminate(proc)
            raise LabError(
                f"link emulator (NFQUEUE delayer) did not start (exit {proc.poll()}); "
                f"delay needs nfnetlink_queue and xt_NFQUEUE in the kernel; its log:\n"
                f"{self._linkemu_log.read_text(errors='replace')[-2000:]}"
            )
        if self._owner:
            self._linkemu = proc
        else:
            # An attached lab (CLI): the delayer outlives this process; `down` kills it.
            self._linkemu_pid = proc.pid
        assert self._record is not None
        self._record.linkemu_pid = proc.pid
        self._record.linkemu_start = ns.process_start_time(proc.pid)


def _read_line(fd: int, timeout: float) -> bytes:
    import select

    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        readable, _, _ = select.select([fd], [], [], remaining)
        if not readable:
            break
        chunk = os.read(fd, 64)
        if not chunk:
            break
        data += chunk
    return data


def _terminate(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    _terminate_all([proc])


def _terminate_all(procs: list[subprocess.Popen]) -> None:  # type: ignore[type-arg]
    """SIGTERM each process group, SIGKILL those still there after one shared grace period."""
    running = [p for p in procs if p.poll() is None]
    for proc in running:
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + KILL_GRACE_S
    for proc in running:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=KILL_GRACE_S)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:  # type: ignore[type-arg]
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
