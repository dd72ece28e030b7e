"""Tensor RPC figures of issues 5 and 8, each beside its baseline measured in the same run.

    .venv/bin/python benchmarks/rpc.py [--quick] [--json] [--skip sdk,tcp,memory,relay,lab]

Every end is its own process (`benchmarks/rpc_peer.py`), as the `lattica` SDK's server and client
are, so the figures compare like with like. What it measures, in order:

- sdk: the `lattica` SDK (rust-libp2p, quinn and TCP) on loopback in a private namespace
  (benchmarks/lattica_sdk.py): call_stream MB/s, 100 B unary p50, a call beside a 0.5 s handler.
- direct: one direct connection on loopback, QUIC at Internet-size datagrams (1350 B, path MTU
  probing off) and libp2p TCP: a 64 MiB float32 tensor as a unary argument and as a unary
  result, server-streamed and client-streamed in chunks; 100 B unary p50/p99; small calls while
  another handler sleeps 0.5 s (async, and a plain `def` in the thread pool); plain asyncio TCP
  between the same two processes (the loopback ceiling).
- memory: 1 GiB server- and client-streamed between two fresh processes; the peak RSS (VmHWM,
  reset just before) of each, beside the chunk window (the larger of the chunk and the
  transport's per-stream receive window: what may sit in memory at once).
- relay: the 64 MiB through a circuit relay v2 relay (a third process; hole punching refused),
  beside the direct figure.
- lab: the 64 MiB over a NAT-lab link with 20 ms RTT and 1 % loss each way (needs root), beside
  the link's rate measured through the same link with plain UDP (a blast) and plain TCP (the
  kernel's controller, and cubic); QUIC also on the aioquic engine with the "bdp" controller.

MB/s are 10^6 bytes per second, best of `--repeat`; the SDK and the direct figures alternate
over `--rounds` rounds and each keeps its best; the machine is shared, so read the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import pathlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

# Run as a script, this directory heads sys.path and would shadow the repo's packages.
if pathlib.Path(sys.path[0]).resolve() == pathlib.Path(__file__).resolve().parent:
    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

from benchmarks.rpc_peer import PeerError, RpcPeer

MIB = 1024 * 1024
LOOPBACK = {"quic": "/ip4/127.0.0.1/udp/0/quic-v1", "tcp": "/ip4/127.0.0.1/tcp/0"}
MODES = {
    "unary_up": "unary, tensor as argument",
    "unary_down": "unary, tensor as result",
    "stream_down": "server-streamed chunks",
    "stream_up": "client-streamed chunks",
}
STREAM_MODES = ("stream_down", "stream_up")
SECTIONS = ("sdk", "tcp", "memory", "relay", "lab")
GOAL_QUIC_X_SDK = 1.5  # issue 5: >= 1.5x the SDK's best call_stream
GOAL_TCP_X_SDK = 2.0  # issue 8: >= 2x the SDK's TCP call_stream
GOAL_UNARY_P50_X_SDK = 0.5  # issue 5: at most half the SDK's unary p50
GOAL_BESIDE_SLOW_S = 0.002  # issue 5: under 2 ms
GOAL_RSS_X_WINDOW = 3.0  # issue 5: peak RSS under 3x the chunk window
LAB_RTT_MS = 20
LAB_LOSS = 0.01
# QUIC for a path that loses at random: the aioquic engine with the "bdp" controller
LAB_LOSSY_QUIC = {"engine": "aioquic", "congestion_control": "bdp"}
UDP_BLAST_S = 3.0


@contextlib.contextmanager
def peers(*specs: tuple[str, list[str], dict[str, Any]]) -> Iterator[list[RpcPeer]]:
    """Start one `RpcPeer` per (name, listen, options), all at once; all are stopped on the way
    out, whatever happened."""
    with contextlib.ExitStack() as stack:
        started = []
        for name, listen, opts in specs:
            peer = RpcPeer(name, listen, **opts)
            stack.callback(peer.close)
            started.append(peer)
        yield [peer.wait_ready() for peer in started]


def bulk_rounds(
    client: RpcPeer,
    server: RpcPeer,
    modes: Sequence[str],
    size: int,
    chunk: int,
    repeat: int,
    *witnesses: RpcPeer,
    plain_tcp_host: str | None = None,
) -> dict[str, Any]:
    """Each mode's figure (best of `repeat`) with the CPU time both processes spent on it. The
    rounds interleave the modes, so every mode sees the same machine load; with
    `plain_tcp_host`, plain asyncio TCP between the same processes joins each round (the
    figure "asyncio_tcp"). A failed transfer is a finding, not the end of the run: its error
    and every process's log tail are kept beside the runs that worked."""
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    cpu = dict.fromkeys(modes, 0.0)
    last: dict[str, dict[str, Any]] = {}
    failures: dict[str, dict[str, Any]] = {}
    plain: list[float] = []
    port = server.command("tcp_sink", host=plain_tcp_host)["port"] if plain_tcp_host else 0
    for _ in range(repeat):
        for mode in modes:
            try:
                server_cpu = server.command("cpu")["cpu_s"]
                result = client.command(
                    "bulk", peer=server.peer_id, mode=mode, size=size, chunk=chunk, repeat=1
                )
                cpu[mode] += result["cpu_s"] + server.command("cpu")["cpu_s"] - server_cpu
            except PeerError as exc:
                failure = failures.setdefault(mode, {"error": str(exc).splitlines()[0]})
                failure["failed_runs"] = failure.get("failed_runs", 0) + 1
                failure["logs"] = {p.name: p.log_tail() for p in (client, server, *witnesses)}
                continue
            seconds[mode] += result["seconds"]
            last[mode] = result
        if plain_tcp_host:
            sent = client.command("tcp_send", host=plain_tcp_host, port=port, size=size, repeat=1)
            plain += sent["seconds"]
    figures: dict[str, Any] = {}
    for mode in modes:
        figures[mode] = dict(failures.get(mode, {}))
        if seconds[mode]:
            figures[mode].update(
                seconds=seconds[mode],
                mb_s=size / min(seconds[mode]) / 1e6,
                mb_per_cpu_s=size * len(seconds[mode]) / cpu[mode] / 1e6,
                **{key: last[mode][key] for key in ("path", "transport", "remote_addr")},
            )
    if plain:
        figures["asyncio_tcp"] = {"seconds": plain, "mb_s": size / min(plain) / 1e6}
    return figures


# -- sections -------------------------------------------------------------------------------------
def measure_sdk(opts: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.lattica_sdk import LatticaUnavailable, NetnsUnavailable, measure_lattica_sdk

    try:
        return measure_lattica_sdk(payload=opts.size, unary_count=opts.calls)
    except (LatticaUnavailable, NetnsUnavailable, RuntimeError, TimeoutError) as exc:
        return {"unavailable": str(exc)}


def best_sdk(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The SDK's best figures over rounds (each figure its own best), as one report."""
    measured = [run for run in runs if "transports" in run]
    if not measured:
        return runs[-1]
    best = {**measured[0], "rounds": len(measured), "transports": {}}
    for transport in measured[0]["transports"]:
        rows = [run["transports"][transport] for run in measured]
        fastest = min(rows, key=lambda row: row["unary_100B_p50_s"])
        best["transports"][transport] = {
            **rows[0],
            "call_stream_upload_mb_s": max(row["call_stream_upload_mb_s"] for row in rows),
            "call_stream_download_mb_s": max(row["call_stream_download_mb_s"] for row in rows),
            "unary_100B_p50_s": fastest["unary_100B_p50_s"],
            "unary_100B_p99_s": fastest["unary_100B_p99_s"],
            "unary_100B_beside_0.5s_handler_s": min(
                row["unary_100B_beside_0.5s_handler_s"] for row in rows
            ),
        }
    figures = best["transports"].values()
    best["best_call_stream_mb_s"] = max(
        max(f["call_stream_upload_mb_s"], f["call_stream_download_mb_s"]) for f in figures
    )
    best["best_unary_100B_p50_s"] = min(f["unary_100B_p50_s"] for f in figures)
    return best


def best_direct(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Our best figures over rounds: per bulk mode the fastest run, the lowest p50."""
    measured = [run for run in runs if "error" not in run]
    if not measured:
        return runs[-1]
    best = {**measured[0], "rounds": len(measured)}
    best["asyncio_tcp"] = max((run["asyncio_tcp"] for run in measured), key=lambda r: r["mb_s"])
    best["bulk"] = {
        mode: max(
            (run["bulk"][mode] for run in measured),
            key=lambda row: row.get("mb_s", -1.0),
        )
        for mode in measured[0]["bulk"]
    }
    for key in ("unary_100B",):
        if key in measured[0]:
            best[key] = min((run[key] for run in measured), key=lambda row: row["p50_s"])
    if "beside_slow_handler" in measured[0]:
        best["beside_slow_handler"] = {
            kind: min(
                (run["beside_slow_handler"][kind] for run in measured),
                key=lambda row: row["p50_s"],
            )
            for kind in measured[0]["beside_slow_handler"]
        }
    return best


def measure_direct(transport: str, opts: argparse.Namespace) -> dict[str, Any]:
    """The bulk, latency and beside-a-slow-handler figures over one direct connection."""
    options = {"datagram": opts.datagram, "pmtu": transport == "quic-pmtu"}
    if opts.busy_poll_us is not None:
        options["busy_poll_us"] = opts.busy_poll_us
    listen = [LOOPBACK["tcp" if transport == "tcp" else "quic"]]
    ends = [(f"{transport}-{role}", listen, options) for role in ("server", "client")]
    with peers(*ends) as (server, client):
        connection = client.command("connect", addrs=server.addrs, peer=server.peer_id)
        for peer in (server, client):
            peer.command("prepare", sizes=[opts.size])
        bulk = bulk_rounds(
            client, server, MODES, opts.size, opts.chunk, opts.repeat, plain_tcp_host="127.0.0.1"
        )
        figures: dict[str, Any] = {"connection": connection, "asyncio_tcp": bulk.pop("asyncio_tcp")}
        figures["bulk"] = bulk
        if transport == "quic-pmtu":
            return figures
        figures["unary_100B"] = latency(client, server, opts.calls)
        # The same calls with busy polling off (transport.busy_poll; Node(busy_poll_us=0)):
        # what the spin buys, and its CPU cost, beside the default.
        for peer in (server, client):
            peer.command("busy_poll", limit_us=0)
        figures["unary_100B_no_busy_poll"] = latency(client, server, opts.calls)
        for peer in (server, client):
            peer.command("busy_poll")  # back to the node's own setting
        figures["beside_slow_handler"] = {
            kind: client.command(
                "beside_slow", peer=server.peer_id, method=method, calls=opts.beside_calls
            )
            for kind, method in (("async", "bench.sleep"), ("def", "bench.sleep_blocking"))
        }
    return figures


def latency(client: RpcPeer, server: RpcPeer, calls: int) -> dict[str, Any]:
    """100 B unary calls one after another: p50/p99, and both ends' CPU time per call."""
    server_cpu = server.command("cpu")["cpu_s"]
    row = client.command("latency", peer=server.peer_id, count=calls)
    # (the server's CPU includes the untimed warm-up tenth: a slight overstatement)
    server_cpu = server.command("cpu")["cpu_s"] - server_cpu
    row["cpu_per_call_s"] = (row.pop("cpu_s") + server_cpu) / calls
    return row


def measure_memory(transport: str, opts: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of both processes while `opts.memory` bytes stream each way in chunks."""
    listen = [LOOPBACK[transport]]
    chunk = opts.memory_chunk
    window = max(chunk, stream_window(transport))
    figures: dict[str, Any] = {"chunk_bytes": chunk, "window_bytes": window, "runs": {}}
    with peers(("mem-server", listen, {}), ("mem-client", listen, {})) as (server, client):
        client.command("connect", addrs=server.addrs, peer=server.peer_id)
        # The sender cuts every chunk from one chunk-sized tensor (as from a file): only what
        # is in flight can raise the peaks.
        transfer = functools.partial(
            client.command, "bulk", peer=server.peer_id, chunk=chunk, repeat=1, source=chunk
        )
        for mode in STREAM_MODES:  # warm up code paths and allocator pools
            transfer(mode=mode, size=4 * chunk)
        for mode in STREAM_MODES:
            before = {p.name: p.command("reset_peak") for p in (server, client)}
            result = transfer(mode=mode, size=opts.memory)
            after = {p.name: p.command("memory") for p in (server, client)}
            figures["runs"][mode] = {
                "mb_s": result["mb_s"],
                "processes": {
                    name: {
                        "rss_before": before[name]["VmRSS"],
                        "peak_rss": after[name]["VmHWM"]
                        if before[name]["reset"]
                        else max(after[name]["VmHWM"], before[name]["VmHWM"]),
                        "peak_reset": before[name]["reset"],
                    }
                    for name in before
                },
            }
    for run in figures["runs"].values():
        for process in run["processes"].values():
            process["growth"] = process["peak_rss"] - process["rss_before"]
            process["growth_x_window"] = process["growth"] / window
            process["growth_x_chunk"] = process["growth"] / chunk
    return figures


def stream_window(transport: str) -> int:
    """The most unread bytes one stream may hold on the receiving side (the defaults)."""
    if transport == "quic":
        from transport.quic import QuicConfig

        return QuicConfig().stream_window
    from transport.yamux import YamuxConfig

    return YamuxConfig().max_stream_window


def measure_relay(opts: argparse.Namespace) -> dict[str, Any]:
    """The bulk figures through a relay: caller -> relay -> hidden peer, three processes."""
    listen = [LOOPBACK["quic"]]
    options = {"datagram": opts.datagram, "holepunch": False}
    trio = [(name, listen, options) for name in ("relay", "hidden", "caller")]
    with peers(*trio) as (relay, hidden, caller):
        circuit = hidden.command("reserve_relay", relay=relay.addrs[0])["circuit_addrs"]
        connection = caller.command("connect", addrs=circuit, peer=hidden.peer_id)
        for peer in (hidden, caller):
            peer.command("prepare", sizes=[opts.size])
        bulk = bulk_rounds(caller, hidden, MODES, opts.size, opts.chunk, opts.far_repeat, relay)
    return {"connection": connection, "bulk": bulk}


def lab_unavailable() -> str | None:
    from tests.netlab import unavailable_reason

    return unavailable_reason()


def measure_lab(opts: argparse.Namespace) -> dict[str, Any]:
    """The streamed figures over a lab link of LAB_RTT_MS RTT and LAB_LOSS loss each way, beside
    plain UDP and plain TCP through the same link. QUIC runs twice: on the default engine, and
    on the aioquic engine with the "bdp" congestion controller (`LAB_LOSSY_QUIC`), which random
    loss does not shrink. Plain TCP runs with the kernel's default controller (named in the
    report: BBR ignores random loss) and with cubic (loss-based, like qh3's)."""
    from tests.netlab import Lab

    lab = Lab()
    lab.add_public_host("server")
    lab.add_public_host("client")
    try:
        lab.start()
        lab.set_link("client", delay_ms=LAB_RTT_MS // 2, loss=LAB_LOSS)
        host = lab.address("server")
        figures: dict[str, Any] = {
            "rtt_ms": LAB_RTT_MS,
            "loss": LAB_LOSS,
            "size": opts.lab_size,
            "transports": {},
            "variants": {},
        }
        runs = [("quic", "quic", {}), ("quic_bdp", "quic", LAB_LOSSY_QUIC), ("tcp", "tcp", {})]
        for name, transport, settings in runs:
            listen = [LOOPBACK[transport].replace("127.0.0.1", host)]
            server_opts = {
                "datagram": opts.datagram,
                "spawn": functools.partial(lab.spawn, "server"),
                **settings,
            }
            client_listen = [LOOPBACK[transport].replace("127.0.0.1", lab.address("client"))]
            client_opts = {**server_opts, "spawn": functools.partial(lab.spawn, "client")}
            with peers(
                (f"lab-{name}-server", listen, server_opts),
                (f"lab-{name}-client", client_listen, client_opts),
            ) as (server, client):
                connection = client.command("connect", addrs=server.addrs, peer=server.peer_id)
                for peer in (server, client):
                    peer.command("prepare", sizes=[opts.lab_size])
                bulk = bulk_rounds(client, server, STREAM_MODES, opts.lab_size, opts.chunk, 1)
                result = {"connection": connection, "bulk": bulk, "settings": settings}
                if transport == "quic":  # what each end's loss recovery saw
                    result["quic_stats"] = {
                        "client": client.command("quic_stats", peer=server.peer_id),
                        "server": server.command("quic_stats", peer=client.peer_id),
                    }
                if name == transport:
                    figures["transports"][transport] = result
                else:
                    figures["variants"][name] = result
                if name == "quic":  # the link's rate, between the same two namespaces
                    port = server.command("tcp_sink", host=host)["port"]
                    for key, congestion in (("plain_tcp", None), ("plain_tcp_cubic", "cubic")):
                        figures[key] = client.command(
                            "tcp_send", host=host, port=port, size=opts.lab_size, repeat=1,
                            congestion=congestion,
                        )  # fmt: skip
                    port = server.command("udp_sink", host=host)["port"]
                    sent = client.command(
                        "udp_blast", host=host, port=port, seconds=opts.udp_blast_s
                    )
                    figures["plain_udp"] = {**server.command("udp_stats"), "offered": sent}
        figures["link_drops"] = lab.link_drops("client")
    finally:
        lab.stop()
    return figures


# -- goals ----------------------------------------------------------------------------------------
def goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal of issues 5 and 8 with the figure that decides it; a figure that could not be
    measured misses its goal (figure NaN)."""
    rows: list[dict[str, Any]] = []

    def add(goal: str, figure: float, target: float, met: bool, unit: str = "") -> None:
        rows.append({"goal": goal, "figure": figure, "target": target, "met": met, "unit": unit})

    sdk = report.get("sdk", {})
    sdk_ok = "transports" in sdk
    direct = {t: f for t, f in report.get("direct", {}).items() if "error" not in f}
    size = f"{report['config']['size'] / MIB:g} MiB"
    for transport, factor, sdk_figure in (
        ("quic", GOAL_QUIC_X_SDK, sdk.get("best_call_stream_mb_s")),
        ("tcp", GOAL_TCP_X_SDK, sdk_tcp_best(sdk) if sdk_ok else None),
    ):
        if transport not in direct or not sdk_figure:
            continue
        for mode, row in direct[transport]["bulk"].items():
            ratio = row["mb_s"] / sdk_figure if "error" not in row else math.nan  # unreliable
            add(f"{transport} {size} {mode} >= {factor}x SDK", ratio, factor, ratio >= factor, "x")
    if sdk_ok:
        sdk_p50 = sdk["best_unary_100B_p50_s"]
        for transport in ("quic", "tcp"):
            if transport in direct:
                ratio = direct[transport]["unary_100B"]["p50_s"] / sdk_p50
                add(
                    f"{transport} 100 B unary p50 <= {GOAL_UNARY_P50_X_SDK}x SDK p50",
                    ratio,
                    GOAL_UNARY_P50_X_SDK,
                    ratio <= GOAL_UNARY_P50_X_SDK,
                    "x",
                )
    for transport, figures in direct.items():
        for kind, row in figures.get("beside_slow_handler", {}).items():
            p50_ms = row["p50_s"] * 1e3
            add(
                f"{transport} small call beside a sleeping {kind} handler, p50 < 2 ms",
                p50_ms,
                GOAL_BESIDE_SLOW_S * 1e3,
                row["p50_s"] < GOAL_BESIDE_SLOW_S,
                "ms",
            )
    memory_size = f"{report['config']['memory'] / MIB:g} MiB"
    for transport, figures in report.get("memory", {}).items():
        for mode, run in figures.get("runs", {"stream_down": None, "stream_up": None}).items():
            worst = (
                max(p["growth_x_window"] for p in run["processes"].values()) if run else math.nan
            )
            add(
                f"{transport} {memory_size} {mode}: peak RSS growth < {GOAL_RSS_X_WINDOW}x "
                "chunk window",
                worst,
                GOAL_RSS_X_WINDOW,
                worst < GOAL_RSS_X_WINDOW,
                "x",
            )
    for name, _ in failed_sections(report):
        add(f"{name} measured", math.nan, math.nan, False)
    return rows


def failed_sections(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, figures) of each section that broke off with an error."""
    sections = [(f"direct {t}", f) for t, f in report.get("direct", {}).items()]
    sections += [(f"memory {t}", f) for t, f in report.get("memory", {}).items()]
    sections += [(name, report[name]) for name in ("relay", "lab") if name in report]
    return [(name, figures) for name, figures in sections if "error" in figures]


def sdk_tcp_best(sdk: dict[str, Any]) -> float | None:
    tcp = sdk.get("transports", {}).get("tcp")
    if tcp is None:
        return None
    return max(tcp["call_stream_upload_mb_s"], tcp["call_stream_download_mb_s"])


# -- printing --------------------------------------------------------------------------------------
def print_report(report: dict[str, Any]) -> None:
    config = report["config"]
    print(
        f"lattica-ray tensor RPC, {config['size'] / MIB:g} MiB tensor in "
        f"{config['chunk'] / MIB:g} MiB chunks when streamed, best of {config['repeat']} in each "
        f"of {config.get('rounds', 1)} rounds, QUIC "
        f"at {config['datagram']} B datagrams (path MTU probing off)"
    )
    sdk = report.get("sdk")
    print_sdk(sdk)
    sdk = sdk if sdk and "transports" in sdk else None
    direct = report.get("direct", {})
    ceiling = max(
        (f["asyncio_tcp"]["mb_s"] for f in direct.values() if "asyncio_tcp" in f), default=0.0
    )
    for transport, figures in direct.items():
        if "error" not in figures:
            print_direct(transport, figures, sdk, ceiling)
    for transport, figures in report.get("memory", {}).items():
        if "error" not in figures:
            print_memory(transport, figures, config["memory"])
    relay = report.get("relay")
    if relay is not None and "error" not in relay:
        print(
            f"\nrelayed ({relay['connection']['path']}, caller -> relay -> hidden peer, "
            f"three processes, best of 1), beside the direct QUIC figure"
        )
        direct_quic = direct.get("quic", {}).get("bulk", {})
        for mode, row in relay["bulk"].items():
            direct_mb_s = direct_quic.get(mode, {}).get("mb_s")
            print_row(row, mode, direct_mb_s and (direct_mb_s, "x direct"))
    print_lab(report.get("lab"))
    for name, figures in failed_sections(report):
        print(f"\n{name}: FAILED: {figures['error']}")
    print("\ngoals")
    for row in report["goals"]:
        mark = "met   " if row["met"] else "MISSED"
        print(f"  {mark} {row['goal']:68} {row['figure']:8.3f} {row['unit']}")


def print_sdk(sdk: dict[str, Any] | None) -> None:
    if sdk is None:
        return
    if "transports" not in sdk:
        print(f"\nlattica SDK not measured: {sdk['unavailable']}")
        return
    rounds = sdk.get("rounds", 1)
    print(
        f"\nbaseline: lattica SDK {sdk['sdk']} (same payload, same run, best of 3 per round, "
        f"{rounds} round{'s' if rounds > 1 else ''} alternating with ours)"
    )
    for transport, row in sdk["transports"].items():
        print(
            f"  {transport:4} call_stream upload {row['call_stream_upload_mb_s']:7.1f} MB/s"
            f"  download {row['call_stream_download_mb_s']:7.1f} MB/s   unary 100 B p50 "
            f"{row['unary_100B_p50_s'] * 1e3:.3f} ms  p99 {row['unary_100B_p99_s'] * 1e3:.3f}"
            f" ms   beside a 0.5 s handler "
            f"{row['unary_100B_beside_0.5s_handler_s'] * 1e3:.0f} ms"
        )


def print_direct(
    transport: str, figures: dict[str, Any], sdk: dict[str, Any] | None, ceiling: float
) -> None:
    connection = figures["connection"]
    print(
        f"\n{transport}: one {connection['path']} {connection['transport']} connection on "
        f"loopback, two processes"
    )
    if sdk is None:
        versus = None
    elif transport == "tcp":
        versus = (sdk_tcp_best(sdk), "x SDK TCP")
    else:
        versus = (sdk["best_call_stream_mb_s"], "x SDK best")
    for mode, row in figures["bulk"].items():
        print_row(row, mode, versus, ceiling)
    if "asyncio_tcp" in figures:
        print(
            f"  {'asyncio TCP, same processes (ceiling)':36} "
            f"{figures['asyncio_tcp']['mb_s']:8.1f} MB/s"
        )
    if "unary_100B" in figures:
        row = figures["unary_100B"]
        beside = ""
        if sdk is not None:
            beside = f" = {row['p50_s'] / sdk['best_unary_100B_p50_s']:.2f} x SDK p50"
        print(
            f"  100 B unary ({row['count']} calls): p50 {row['p50_s'] * 1e3:.3f} ms{beside}, "
            f"p99 {row['p99_s'] * 1e3:.3f} ms, CPU {row['cpu_per_call_s'] * 1e6:.0f} us per "
            "call (both ends)"
        )
    if "unary_100B_no_busy_poll" in figures:
        off, on = figures["unary_100B_no_busy_poll"], figures["unary_100B"]
        beside = ""
        if sdk is not None:
            beside = f" = {off['p50_s'] / sdk['best_unary_100B_p50_s']:.2f} x SDK p50"
        print(
            f"  ... busy polling off:  p50 {off['p50_s'] * 1e3:.3f} ms{beside}, p99 "
            f"{off['p99_s'] * 1e3:.3f} ms, CPU {off['cpu_per_call_s'] * 1e6:.0f} us per call; "
            f"on/off p50 {on['p50_s'] / off['p50_s']:.2f}x, CPU "
            f"{on['cpu_per_call_s'] / off['cpu_per_call_s']:.2f}x"
        )
    for kind, row in figures.get("beside_slow_handler", {}).items():
        print(
            f"  100 B calls while a {kind} handler sleeps 0.5 s: p50 {row['p50_s'] * 1e3:.2f} "
            f"ms, first {row['first_s'] * 1e3:.2f} ms, max {row['max_s'] * 1e3:.2f} ms (all "
            f"during the sleep: {row['all_during_slow_call']})"
        )


def print_row(
    row: dict[str, Any], mode: str, versus: tuple[float, str] | None, ceiling: float = 0.0
) -> None:
    """One bulk figure and its ratios to `versus` (figure, label) and to the TCP ceiling."""
    if "mb_s" in row:
        line = f"  {MODES[mode]:36} {row['mb_s']:8.1f} MB/s"
        if versus:
            line += f" = {row['mb_s'] / versus[0]:5.2f} {versus[1]}"
        if ceiling:
            line += f" = {row['mb_s'] / ceiling:5.3f} x asyncio TCP"
        print(line + f"   ({row['mb_per_cpu_s']:.1f} MB per CPU-second, both ends)")
    print_failure(row, mode)


def print_failure(row: dict[str, Any], mode: str) -> None:
    if "error" in row:
        runs = f"{row['failed_runs']} of {row['failed_runs'] + len(row.get('seconds', []))}"
        print(f"  {MODES[mode]:36} {runs} runs FAILED: {row['error']}")


def print_memory(transport: str, figures: dict[str, Any], total: int) -> None:
    print(
        f"\nmemory, {transport}: {total / MIB:g} MiB in {figures['chunk_bytes'] / MIB:g} MiB "
        f"chunks, chunk window {figures['window_bytes'] / MIB:g} MiB (the larger of the chunk "
        "and the stream's receive window)"
    )
    for mode, run in figures["runs"].items():
        print(f"  {MODES[mode]:24} {run['mb_s']:7.1f} MB/s")
        for name, p in run["processes"].items():
            growth = p["growth"] / MIB
            print(
                f"    {name:10} peak RSS {p['peak_rss'] / MIB:6.1f} MiB, +{growth:5.1f}"
                f" MiB over the {p['rss_before'] / MIB:.1f} MiB before = "
                f"{p['growth_x_window']:.2f} x window ({p['growth_x_chunk']:.2f} x chunk)"
            )


def print_lab(lab: dict[str, Any] | None) -> None:
    if lab is None or "error" in lab:
        return
    if "skipped" in lab:
        print(f"\nlab link not measured: {lab['skipped']}")
        return
    udp, tcp = lab["plain_udp"]["mb_s"], lab["plain_tcp"]["mb_s"]
    cubic = lab.get("plain_tcp_cubic", {})
    print(
        f"\nlab link, {lab['rtt_ms']} ms RTT and {lab['loss']:.0%} loss each way "
        f"({lab['link_drops']} packets dropped on it), {lab['size'] / MIB:g} MiB once: plain UDP"
        f" blast {udp:.1f} MB/s (the link's rate); plain TCP "
        f"({lab['plain_tcp'].get('congestion', '?')}) {tcp:.2f} MB/s = {tcp / udp:.3f} of it"
        + (f", with cubic {cubic['mb_s']:.2f} MB/s = {cubic['mb_s'] / udp:.3f}" if cubic else "")
    )
    rows = [*lab["transports"].items(), *lab.get("variants", {}).items()]
    for name, figures in rows:
        rtt = figures["connection"]["rtt_s"] * 1e3
        settings = figures.get("settings") or {}
        label = name if not settings else f"{name} ({', '.join(map(str, settings.values()))})"
        for mode, row in figures["bulk"].items():
            print_failure(row, mode)
            if "mb_s" not in row:
                continue
            print(
                f"  {label:26} {MODES[mode]:24} {row['mb_s']:7.2f} MB/s = "
                f"{row['mb_s'] / udp:.3f} of the link's rate, {row['mb_s'] / tcp:.2f} x plain "
                f"TCP (ping {rtt:.1f} ms)"
            )
        stats = figures.get("quic_stats", {})
        losses = {end: s["loss_total"] for end, s in stats.items() if "loss_total" in s}
        if losses:
            print(f"  {'':26} packets declared lost: {losses}")


# -- main -----------------------------------------------------------------------------------------
def options(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the smoke test)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line")
    parser.add_argument("--skip", default="", help=f"comma-separated sections of {SECTIONS}")
    parser.add_argument("--pmtu", action="store_true", help="also QUIC with path MTU probing")
    parser.add_argument("--size-mib", type=float, default=64)
    parser.add_argument("--chunk-mib", type=float, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="the SDK baseline and our direct figures alternate this many times; best of each",
    )
    parser.add_argument("--calls", type=int, default=1000, help="100 B unary calls timed")
    parser.add_argument("--memory-mib", type=float, default=1024)
    parser.add_argument("--memory-chunk-mib", type=float, default=4)
    parser.add_argument("--lab-mib", type=float, default=64)
    parser.add_argument("--datagram", type=int, default=1350, help="QUIC max datagram size")
    parser.add_argument(
        "--busy-poll-us", type=float, default=None, help="the direct peers' Node(busy_poll_us=)"
    )
    opts = parser.parse_args(argv)
    skip = {name for name in opts.skip.split(",") if name}
    if skip - set(SECTIONS):
        parser.error(f"--skip takes {', '.join(SECTIONS)}")
    opts.skip = skip
    if opts.quick:
        opts.size_mib, opts.chunk_mib, opts.repeat, opts.calls = 1, 0.25, 1, 50
        opts.rounds = 1
        opts.memory_mib, opts.memory_chunk_mib, opts.lab_mib = 8, 1, 1
    opts.size, opts.chunk = int(opts.size_mib * MIB), int(opts.chunk_mib * MIB)
    opts.memory, opts.memory_chunk = int(opts.memory_mib * MIB), int(opts.memory_chunk_mib * MIB)
    opts.lab_size = int(opts.lab_mib * MIB)
    opts.beside_calls = 5 if opts.quick else 20
    opts.far_repeat = 1
    opts.udp_blast_s = 0.5 if opts.quick else UDP_BLAST_S
    return opts


def run(opts: argparse.Namespace, progress: Callable[[str], None]) -> dict[str, Any]:
    report: dict[str, Any] = {
        "config": {
            key: getattr(opts, key)
            for key in (
                "size",
                "chunk",
                "repeat",
                "rounds",
                "calls",
                "memory",
                "memory_chunk",
                "lab_size",
                "datagram",
                "busy_poll_us",
            )
        },
    }
    started = time.perf_counter()

    def section(step: str, measure: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
        """One section's figures; if it breaks, why (the other sections still run)."""
        progress(step)
        try:
            return measure(*args)
        except (PeerError, RuntimeError, OSError, TimeoutError) as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}

    with_tcp = "tcp" not in opts.skip
    transports = ["quic"] + (["quic-pmtu"] if opts.pmtu else []) + (["tcp"] if with_tcp else [])
    # The SDK and our direct figures alternate, round by round, and each keeps its best: a
    # load that comes and goes on a shared machine then falls on both, not on whichever ran
    # while it lasted.
    sdk_runs: list[dict[str, Any]] = []
    direct_runs: dict[str, list[dict[str, Any]]] = {transport: [] for transport in transports}
    for number in range(1, opts.rounds + 1):
        if "sdk" not in opts.skip:
            progress(f"lattica SDK baseline, round {number} of {opts.rounds}")
            sdk_runs.append(measure_sdk(opts))  # reports its own failure as "unavailable"
        for transport in transports:
            step = f"direct {transport}, round {number} of {opts.rounds}"
            direct_runs[transport].append(section(step, measure_direct, transport, opts))
    if sdk_runs:
        report["sdk"] = best_sdk(sdk_runs)
    report["direct"] = {transport: best_direct(runs) for transport, runs in direct_runs.items()}
    if "memory" not in opts.skip:
        report["memory"] = {
            transport: section(f"memory {transport}", measure_memory, transport, opts)
            for transport in (["quic", "tcp"] if with_tcp else ["quic"])
        }
    if "relay" not in opts.skip:
        report["relay"] = section("relay", measure_relay, opts)
    if "lab" not in opts.skip:
        reason = lab_unavailable()
        skipped = {"skipped": f"needs root: {reason}"} if reason else None
        report["lab"] = skipped or section("lab link", measure_lab, opts)
    report["goals"] = goals(report)
    report["wall_s"] = time.perf_counter() - started
    return report


def main(argv: list[str] | None = None) -> int:
    opts = options(argv)

    def progress(step: str) -> None:
        print(f"# {step} ...", file=sys.stderr, flush=True)

    report = run(opts, progress)
    if opts.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
