"""What busy polling (transport.busy_poll) costs and gains, each figure beside "off" from the run.

    .venv/bin/python benchmarks/busy_poll.py [--quick] [--rounds 3] [--limit-us 200]

Two processes on loopback QUIC: this one (the caller) and a server child (`--serve`), both with
`Node(busy_poll_us=0)`; the benchmark installs and removes busy polling on both loops itself,
so "on" and "off" run in the same processes, alternating for `--rounds` rounds; each figure is
the median of its rounds. Spin time is wall time: under load its yields give the CPU away.
Figures:

- idle: each process's CPU over a few idle seconds (a connection open, no calls).
- paced: 100 B calls back to back, one every 0.3 ms and one every 1 ms (scheduled on the
  caller's loop, so the 0.3 ms pace comes in bursts: asyncio's epoll waits in whole ms):
  p50, and both ends' CPU per call.
- def: the same back to back, served by a plain `def` handler (the server's thread pool).
- gil: a CPU-bound Python thread in the server (a Ray actor's main thread) while the caller
  calls back to back: the thread's work rate (beside the same thread with no calls) and p50.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

if pathlib.Path(sys.path[0]).resolve() == pathlib.Path(__file__).resolve().parent:
    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

from lattica_ray import Node
from transport import busy_poll
from transport.identity import PeerId
from transport.multiaddr import Multiaddr

LISTEN = "/ip4/127.0.0.1/udp/0/quic-v1"
PAYLOAD = os.urandom(100)


def set_busy_poll(limit_us: float) -> bool:
    """Busy polling on this loop at `limit_us` from now on (0: off); True if it spins."""
    loop = asyncio.get_running_loop()
    while busy_poll.window_of(loop) is not None:
        busy_poll.uninstall(loop)
    return busy_poll.install(loop, limit_us)


def spin_counters() -> dict[str, float]:
    """This loop's spin time and how its waits ended (zeros with busy polling off)."""
    window = busy_poll.window_of(asyncio.get_running_loop())
    counters = ("caught", "woken", "timers", "yields_lost")
    figures = {key: getattr(window, key, 0) for key in counters}  # (other versions: 0)
    return {"spin_s": getattr(window, "spin_ns", 0) / 1e9, **figures}


# -- the server child ------------------------------------------------------------------------
class Burner:
    """A CPU-bound pure-Python thread that counts its work (as an actor's main thread would)."""

    def __init__(self) -> None:
        self.done = 0
        self.running = False
        self.thread: threading.Thread | None = None

    def _run(self) -> None:
        while self.running:
            total = 0
            for index in range(1000):
                total += index * index
            self.done += 1

    def start(self) -> dict[str, Any]:
        self.done, self.running = 0, True
        self.started = time.perf_counter()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return {}

    def stop(self) -> dict[str, Any]:
        self.running = False
        assert self.thread is not None
        self.thread.join()
        return {"rate": self.done / (time.perf_counter() - self.started)}


async def serve() -> None:
    async with Node(listen=[LISTEN], busy_poll_us=0) as node:

        @node.rpc.method("bp.echo")
        async def echo(data: bytes) -> bytes:
            return data

        @node.rpc.method("bp.echo_def")
        def echo_def(data: bytes) -> bytes:  # a plain def: the thread pool runs it
            return data

        burner = Burner()
        commands = {
            "cpu": lambda: {"cpu_s": time.process_time(), **spin_counters()},
            "burn_start": lambda: {**burner.start(), **spin_counters()},
            "burn_stop": lambda: {**burner.stop(), **spin_counters()},
        }
        emit({"peer_id": str(node.peer_id), "addrs": [str(a) for a in node.addrs]})
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            command = json.loads(line)
            if command["cmd"] == "stop":
                break
            if command["cmd"] == "spin":
                set_busy_poll(command["limit_us"])
                emit({})
            else:
                emit(commands[command["cmd"]]())


def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


# -- the caller ------------------------------------------------------------------------------
class Server:
    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, sys.argv[0], "--serve"],  # (this script, or one running it)
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.ready = self._answer()

    def _answer(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the server exited ({self.process.poll()})")
        return json.loads(line)

    async def command(self, cmd: str, **args: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.process.stdin.flush()
        return await asyncio.to_thread(self._answer)

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.write('{"cmd": "stop"}\n')
            self.process.stdin.close()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


async def both(server: Server, limit_us: float) -> None:
    set_busy_poll(limit_us)
    await server.command("spin", limit_us=limit_us)


async def calls(
    node: Node, peer: PeerId, count: int, interval_s: float, method: str = "bp.echo"
) -> list[float]:
    samples = []
    next_at = time.perf_counter()
    for _ in range(count):
        if interval_s:
            next_at += interval_s
        began = time.perf_counter()
        reply = await node.rpc.call(peer, method, PAYLOAD, timeout=30)
        samples.append(time.perf_counter() - began)
        assert reply == PAYLOAD
        if interval_s and (delay := next_at - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
    return sorted(samples)


async def measure_calls(
    node: Node, server: Server, peer: PeerId, count: int, interval_s: float, method: str
) -> dict[str, float]:
    await calls(node, peer, count // 10, interval_s, method)  # warm up
    server_before = await server.command("cpu")
    client_before = spin_counters()
    cpu, wall = time.process_time(), time.perf_counter()
    samples = await calls(node, peer, count, interval_s, method)
    wall = time.perf_counter() - wall
    client_us = (time.process_time() - cpu) / count * 1e6
    client_after = spin_counters()
    server_after = await server.command("cpu")
    per_call = {
        f"{side}_{key}": (after[key] - before[key]) / count * (1e6 if key == "spin_s" else 1)
        for side, before, after in (
            ("client", client_before, client_after),
            ("server", server_before, server_after),
        )
        for key in ("spin_s", "caught", "woken", "timers", "yields_lost")
    }
    return {
        "p50_us": samples[len(samples) // 2] * 1e6,
        "client_cpu_us": client_us,
        "server_cpu_us": (server_after["cpu_s"] - server_before["cpu_s"]) / count * 1e6,
        "calls_per_s": count / wall,
        **{key.replace("spin_s", "spin_us"): value for key, value in per_call.items()},
    }


async def measure_idle(server: Server, seconds: float) -> dict[str, float]:
    server_cpu = (await server.command("cpu"))["cpu_s"]
    cpu = time.process_time()
    await asyncio.sleep(seconds)
    return {
        "client_cpu_pct": (time.process_time() - cpu) / seconds * 100,
        "server_cpu_pct": ((await server.command("cpu"))["cpu_s"] - server_cpu) / seconds * 100,
    }


async def measure_gil(
    node: Node, server: Server, peer: PeerId, seconds: float, with_calls: bool
) -> dict[str, float]:
    before = await server.command("burn_start")
    samples: list[float] = []
    ends = time.perf_counter() + seconds
    if with_calls:
        while time.perf_counter() < ends:
            samples += await calls(node, peer, 50, 0.0)
        samples.sort()
    else:
        await asyncio.sleep(seconds)
    after = await server.command("burn_stop")
    figures = {"thread_work_per_s": after["rate"]}
    if samples:
        figures["p50_us"] = samples[len(samples) // 2] * 1e6
        figures["calls_per_s"] = len(samples) / seconds
        for key in ("caught", "woken", "timers", "yields_lost"):
            figures[f"server_{key}"] = (after[key] - before[key]) / len(samples)
        figures["server_spin_us"] = (after["spin_s"] - before["spin_s"]) / len(samples) * 1e6
    return figures


def median_of(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(one[key] for one in rounds) for key in rounds[0]}


def show(name: str, off: dict[str, float], on: dict[str, float]) -> None:
    for key in off:
        ratio = on[key] / off[key] if off[key] else float("nan")
        figures = f"off {off[key]:>10.1f}   on {on[key]:>10.1f}   on/off {ratio:5.2f}"
        print(f"{name:<22} {key:<18} {figures}")


async def bench(opts: argparse.Namespace) -> None:
    server = Server()
    try:
        async with Node(listen=[LISTEN], busy_poll_us=0) as node:
            peer = PeerId.from_string(server.ready["peer_id"])
            node.add_peer_addrs(peer, [Multiaddr.parse(a) for a in server.ready["addrs"]])
            await node.connect(peer)
            count = 300 if opts.quick else 1000
            seconds = 1.0 if opts.quick else 2.0
            runs: list[tuple[str, Any]] = [
                ("idle", lambda: measure_idle(server, seconds)),
                ("back_to_back", lambda: measure_calls(node, server, peer, count, 0, "bp.echo")),
                ("every_0.3ms", lambda: measure_calls(node, server, peer, count, 3e-4, "bp.echo")),
                ("every_1ms", lambda: measure_calls(node, server, peer, count, 1e-3, "bp.echo")),
                ("def_handler", lambda: measure_calls(node, server, peer, count, 0, "bp.echo_def")),
                ("gil_no_calls", lambda: measure_gil(node, server, peer, seconds, False)),
                ("gil_with_calls", lambda: measure_gil(node, server, peer, seconds, True)),
            ]
            for name, run in runs:
                if opts.only and not any(name.startswith(only) for only in opts.only.split(",")):
                    continue
                rounds: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
                for _ in range(opts.rounds):  # off and on alternate: the load changes
                    for limit in (0, opts.limit_us):
                        await both(server, limit)
                        rounds["on" if limit else "off"].append(await run())
                await both(server, 0)
                show(name, median_of(rounds["off"]), median_of(rounds["on"]))
    finally:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--limit-us", type=float, default=busy_poll.DEFAULT_LIMIT_US)
    parser.add_argument("--only", default="", help="figures whose names start so (a,b,...)")
    parser.add_argument("--rounds", type=int, default=3, help="off/on rounds (medians shown)")
    opts = parser.parse_args()
    asyncio.run(serve() if opts.serve else bench(opts))


if __name__ == "__main__":
    main()
