"""Command line for the NAT lab, for poking at it by hand (run from the repository root, as root).

python -m tests.netlab up                      # one router of each kind, hosts, 3 public hosts
python -m tests.netlab status
python -m tests.netlab exec sym1 -- python -m tests.netlab.echo --port 3478
python -m tests.netlab set-link sym1 --delay-ms 40 --jitter-ms 5 --loss 0.01
python -m tests.netlab cut nat_sym / restore nat_sym / flush nat_sym
python -m tests.netlab down                    # or: down --all, cleanup (stale labs only)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from tests.netlab.lab import Lab
from tests.netlab.netns import LabError
from tests.netlab.routers import NatKind
from tests.netlab.state import cleanup_stale, destroy, list_records

# Short names for the default topology: router nat_<short>, hosts <short>1, <short>2, ...
SHORT_NAMES = {
    NatKind.FULL_CONE: "full",
    NatKind.RESTRICTED_CONE: "restr",
    NatKind.PORT_RESTRICTED: "port",
    NatKind.SYMMETRIC: "sym",
    NatKind.PUBLIC: "pub",
    NatKind.FIREWALL: "fw",
    NatKind.UDP_BLOCKED: "noudp",
}


def build_default(lab: Lab, kinds: list[NatKind], public: int, hosts_per_nat: int) -> None:
    """public hosts relay1..N, and per kind a router nat_<short> with hosts <short>1..M."""
    for i in range(1, public + 1):
        lab.add_public_host(f"relay{i}")
    for kind in kinds:
        short = SHORT_NAMES[kind]
        lab.add_nat(f"nat_{short}", kind)
        for j in range(1, hosts_per_nat + 1):
            lab.add_host(f"{short}{j}", behind=f"nat_{short}")


def build_from_file(lab: Lab, path: str) -> None:
    """A JSON list of {"role": "public"|"router"|"host", "name", "kind", "lan", "behind"}."""
    with open(path) as f:
        entries = json.load(f)
    for entry in entries:
        role = entry.get("role")
        if role == "public":
            lab.add_public_host(entry["name"])
        elif role == "router":
            lab.add_nat(entry["name"], entry.get("kind", "port_restricted"), lan=entry.get("lan"))
        elif role == "host":
            lab.add_host(entry["name"], behind=entry["behind"])
        else:
            raise ValueError(f"{path}: unknown role {role!r} in {entry}")


def pick_lab(lab_id: str | None) -> Lab:
    if lab_id:
        return Lab.attach(lab_id)
    records = list_records()
    if not records:
        raise LabError("no lab is running (start one with: python -m tests.netlab up)")
    if len(records) > 1:
        ids = ", ".join(r.id for r in records)
        raise LabError(f"{len(records)} labs are running ({ids}): say which with --lab ID")
    return Lab.attach(records[0].id)


def cmd_up(args: argparse.Namespace) -> int:
    lab = Lab()
    if args.topology:
        build_from_file(lab, args.topology)
    else:
        kinds = [NatKind(k) for k in args.kinds.split(",")] if args.kinds else list(NatKind)
        build_default(lab, kinds, args.public, args.hosts)
    lab.start()
    lab.detach()
    if args.json:
        nodes = [
            {
                "name": n.name,
                "role": n.role,
                "kind": str(n.kind) if n.kind else None,
                "netns": n.netns,
                "address": str(n.address),
                "external_address": str(n.external_address),
            }
            for n in lab.nodes
        ]
        print(json.dumps({"id": lab.id, "start_seconds": lab.start_seconds, "nodes": nodes}))
    else:
        print(f"lab {lab.id} up in {lab.start_seconds:.2f} s\n{lab.describe()}")
        print(f"\nshell on a node: python -m tests.netlab exec --lab {lab.id} NODE -- bash")
        print(f"tear down:       python -m tests.netlab down {lab.id}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    if args.all:
        removed = cleanup_stale(include_detached=True)
    else:
        lab_id = args.lab_id or pick_lab(None).id
        destroy(lab_id)
        removed = [lab_id]
    print("removed: " + (", ".join(removed) or "nothing"))
    return 0


def cmd_cleanup(_args: argparse.Namespace) -> int:
    removed = cleanup_stale()
    print("removed stale labs: " + (", ".join(removed) or "none"))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    records = list_records()
    if args.lab:
        records = [r for r in records if r.id == args.lab]
    if not records:
        print("no labs")
    for record in records:
        owner = f"pid {record.owner_pid}" if record.owner_pid else "detached (CLI)"
        alive = "" if record.owner_alive() else " [STALE: owner gone; run cleanup]"
        print(f"lab {record.id}, owner {owner}{alive}")
        lab = Lab.attach(record.id)
        print(lab.describe())
        if record.links or record.cut:
            print(f"links: {record.links} cut: {record.cut}")
        print()
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    lab = pick_lab(args.lab)
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise LabError("nothing to run: exec NODE -- COMMAND [ARGS...]")
    os.execvp("ip", ["ip", "netns", "exec", lab.netns(args.node), *argv])
    return 1  # not reached


def cmd_set_link(args: argparse.Namespace) -> int:
    lab = pick_lab(args.lab)
    lab.set_link(
        args.node,
        delay_ms=args.delay_ms,
        jitter_ms=args.jitter_ms,
        loss=args.loss,
        direction=args.direction,
    )
    return 0


def cmd_cut(args: argparse.Namespace) -> int:
    pick_lab(args.lab).cut_link(args.node)
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    pick_lab(args.lab).restore_link(args.node)
    return 0


def cmd_flush(args: argparse.Namespace) -> int:
    pick_lab(args.lab).flush_conntrack(args.node)
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m tests.netlab",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = top.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start a lab that stays up until `down`")
    up.add_argument(
        "--kinds",
        help=f"comma-separated router kinds (default all: {','.join(k.value for k in NatKind)})",
    )
    up.add_argument("--public", type=int, default=3, help="public hosts relay1..N (default 3)")
    up.add_argument("--hosts", type=int, default=1, help="hosts behind each router (default 1)")
    up.add_argument("--topology", help="JSON topology file instead of the default")
    up.add_argument("--json", action="store_true", help="print the lab as JSON")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="tear a lab down")
    down.add_argument("lab_id", nargs="?")
    down.add_argument("--all", action="store_true", help="every lab, CLI-started ones included")
    down.set_defaults(func=cmd_down)

    sub.add_parser("cleanup", help="remove stale labs (owner process gone)").set_defaults(
        func=cmd_cleanup
    )

    status = sub.add_parser("status", help="list labs and their nodes")
    status.add_argument("--lab")
    status.set_defaults(func=cmd_status)

    exe = sub.add_parser("exec", help="run a command inside a node: exec NODE -- CMD...")
    exe.add_argument("--lab")
    exe.add_argument("node")
    exe.add_argument("argv", nargs=argparse.REMAINDER)
    exe.set_defaults(func=cmd_exec)

    link = sub.add_parser("set-link", help="delay/jitter/loss on a node's uplink")
    link.add_argument("--lab")
    link.add_argument("node")
    link.add_argument("--delay-ms", type=int, default=0)
    link.add_argument("--jitter-ms", type=int, default=0)
    link.add_argument("--loss", type=float, default=0.0, help="fraction per direction, 0..1")
    link.add_argument("--direction", choices=["both", "up", "down"], default="both")
    link.set_defaults(func=cmd_set_link)

    for name, func, text in (
        ("cut", cmd_cut, "silently drop everything on a node's uplink"),
        ("restore", cmd_restore, "undo cut"),
        ("flush", cmd_flush, "flush a router's NAT mappings (conntrack)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--lab")
        p.add_argument("node")
        p.set_defaults(func=func)
    return top


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="netlab: %(message)s")
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (LabError, LookupError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
