"""Baseline figures of the third-party `lattica` SDK (rust-libp2p, quinn) on loopback.

Two SDK nodes in a private network namespace (the SDK sends STUN probes to public servers on
every start, so it never runs anywhere else): a 100-byte unary call (p50/p99) and `call_stream`
throughput of a 64 MiB payload, upload and download, over QUIC and over TCP (Noise + Yamux).
Also a small call beside a handler that sleeps 0.5 s. The last stdout line is a JSON summary;
other benchmarks call `measure_lattica_sdk()`.

This module is also the lattica lab that the interop tests share: the pinned SDK in its own venv
(created on demand), the private-namespace runner, and `LatticaPeer`, a handle on one SDK node
run by `tests/interop/lattica_peer.py`. It imports only the standard library, because its inner
half runs under the SDK venv's python.

    .venv/bin/python benchmarks/lattica_sdk.py [--payload-mib 64] [--transport quic|tcp ...]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

LATTICA_VERSION = "1.0.21"
REPO = Path(__file__).resolve().parents[1]
LATTICA_VENV = REPO / ".lab-venvs" / "lattica"
LATTICA_PEER_SCRIPT = REPO / "tests" / "interop" / "lattica_peer.py"
PIP_TIMEOUT_S = 600.0
LISTEN = {"quic": "/ip4/127.0.0.1/udp/0/quic-v1", "tcp": "/ip4/127.0.0.1/tcp/0"}


class LatticaUnavailable(RuntimeError):
    """The lattica SDK venv cannot be made on this machine (no package index reachable)."""


class NetnsUnavailable(RuntimeError):
    """This machine cannot create a private network namespace for us."""


# -- the SDK venv ---------------------------------------------------------------------------------


def _installed_version(python: Path) -> str | None:
    probe = "import importlib.metadata as m; print(m.version('lattica'))"
    result = subprocess.run(
        [str(python), "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    return result.stdout.strip() if result.returncode == 0 else None


def lattica_python(venv: Path = LATTICA_VENV) -> Path:
    """The python of a venv holding lattica==LATTICA_VERSION, created (pip install) if needed."""
    python = venv / "bin" / "python"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test sessions must not build it at once
        if python.exists() and _installed_version(python) == LATTICA_VERSION:
            return python
        steps = [
            [sys.executable, "-m", "venv", "--clear", str(venv)],
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--quiet",
                f"lattica=={LATTICA_VERSION}",
            ],
        ]
        for step in steps:
            try:
                result = subprocess.run(
                    step, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False
                )
            except subprocess.TimeoutExpired as exc:
                raise LatticaUnavailable(f"{' '.join(step)} took over {PIP_TIMEOUT_S} s") from exc
            if result.returncode != 0:
                tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
                raise LatticaUnavailable(
                    f"cannot install lattica=={LATTICA_VERSION} into {venv}: "
                    f"{' '.join(step)} failed: " + " | ".join(tail)
                )
        if _installed_version(python) != LATTICA_VERSION:
            raise LatticaUnavailable(f"lattica=={LATTICA_VERSION} not importable from {python}")
        return python


# -- private network namespaces -------------------------------------------------------------------


def netns_unavailable_reason() -> str | None:
    """None when `unshare -rn` works here; otherwise why it does not."""
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (util-linux / iproute2)"
    probe = subprocess.run(
        ["unshare", "-rn", "ip", "link", "set", "lo", "up"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if probe.returncode != 0:
        return f"cannot create a private network namespace: {probe.stderr.strip()}"
    return None


def private_netns_argv(argv: Sequence[str]) -> list[str]:
    """`argv` run inside a new, private network namespace whose only link is loopback (up)."""
    return ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', *map(str, argv)]


@contextlib.contextmanager
def _process_group(argv: Sequence[str], **popen: Any) -> Iterator[subprocess.Popen[str]]:
    """Popen in a new session; the whole group is killed on the way out, whatever happened."""
    process = subprocess.Popen(list(argv), start_new_session=True, text=True, **popen)
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def run_in_private_netns(
    argv: Sequence[str], timeout: float, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    """Run `argv` in a private namespace; on timeout kill everything in it and raise."""
    with _process_group(
        private_netns_argv(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            raise TimeoutError(
                f"{argv[1] if len(argv) > 1 else argv[0]} ran over {timeout} s; "
                f"stderr tail:\n{stderr[-4000:]}"
            ) from exc
        return subprocess.CompletedProcess(list(argv), process.returncode, stdout, stderr)


def last_json_line(text: str) -> dict[str, Any]:
    """The JSON object on the last non-empty line of `text` (how our scripts report)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        raise ValueError("no output")
    return json.loads(lines[-1])


# -- one SDK node ------------------------------------------------------------------------------


class LatticaPeer:
    """One SDK node run by `lattica_peer.py`: start it, send it commands, stop it.

    Only use it inside a private network namespace. The child stays in the caller's process
    group, so killing that group (the test harness does) takes the node down too.
    """

    def __init__(
        self,
        python: Path | str,
        *,
        listen: Sequence[str] = (),
        bootstrap: Sequence[str] = (),
        protocol_version: str | None = None,
        bench_service: bool = False,
        log: TextIO | None = None,
        env: dict[str, str] | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        argv = [str(python), str(LATTICA_PEER_SCRIPT)]
        argv += [arg for addr in listen for arg in ("--listen", addr)]
        argv += [arg for addr in bootstrap for arg in ("--bootstrap", addr)]
        if protocol_version is not None:
            argv += ["--protocol-version", protocol_version]
        if bench_service:
            argv.append("--bench-service")
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log if log is not None else subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            hello = self._next(start_timeout)
        except BaseException:
            self.close()
            raise
        self.peer_id: str = hello["peer_id"]
        self.addrs: list[str] = hello["addrs"]

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _next(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"lattica peer gave no answer within {timeout} s") from None
        if line is None:
            raise RuntimeError(f"lattica peer exited (code {self.process.wait()})")
        return json.loads(line)

    def addr(self, transport: str) -> str:
        """The first listen address of `transport` ('quic' or 'tcp'), with /p2p/."""
        marker = "/quic-v1/" if transport == "quic" else "/tcp/"
        return next(addr for addr in self.addrs if marker in addr)

    def command(self, cmd: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
        """Send one command; its reply, or LatticaCommandError when the node says it failed."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.process.stdin.flush()
        reply = self._next(timeout)
        if not reply.get("ok"):
            raise LatticaCommandError(f"{cmd}: {reply.get('error')}")
        return reply

    def close(self, timeout: float = 5.0) -> None:
        """Ask the node to stop; kill it if it does not within `timeout`."""
        if self.process.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                assert self.process.stdin is not None
                self.process.stdin.write('{"cmd": "stop"}\n')
                self.process.stdin.close()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> LatticaPeer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class LatticaCommandError(RuntimeError):
    """A lattica peer answered a command with ok=false."""


# -- the benchmark ---------------------------------------------------------------------------------


def _measure_transport(
    python: str, transport: str, payload: int, unary_count: int, log: TextIO
) -> dict[str, Any]:
    """Inside the namespace: server and client SDK nodes (two processes) over one transport."""
    listen = [LISTEN[transport]]
    with LatticaPeer(python, listen=listen, bench_service=True, log=log) as server:
        with LatticaPeer(
            python, listen=listen, bootstrap=[server.addr(transport)], bench_service=True, log=log
        ) as client:
            client.command("wait_peer", peer=server.peer_id)
            unary = client.command(
                "bench_unary", timeout=300, peer=server.peer_id, size=100, count=unary_count
            )
            streams = {
                direction: client.command(
                    "bench_stream",
                    timeout=900,
                    peer=server.peer_id,
                    size=payload,
                    direction=direction,
                    repeat=3,
                )
                for direction in ("upload", "download")
            }
            beside_slow = client.command(
                "bench_call_beside_slow_handler", peer=server.peer_id, sleep_s=0.5
            )
            via = client.command("peer_info", peer=server.peer_id)["connection_addrs"]
    return {
        "connection": via,
        "unary_100B_p50_s": unary["p50_s"],
        "unary_100B_p99_s": unary["p99_s"],
        "unary_count": unary["count"],
        "unary_100B_beside_0.5s_handler_s": beside_slow["small_call_s"],
        "call_stream_upload_mb_s": streams["upload"]["best_mb_s"],
        "call_stream_download_mb_s": streams["download"]["best_mb_s"],
        "call_stream_seconds": {d: s["seconds"] for d, s in streams.items()},
    }


def _inner(config: dict[str, Any]) -> dict[str, Any]:
    results: dict[str, Any] = {
        "sdk": f"lattica=={LATTICA_VERSION}",
        "payload_bytes": config["payload"],
        "transports": {},
    }
    for transport in config["transports"]:
        results["transports"][transport] = _measure_transport(
            sys.executable, transport, config["payload"], config["unary_count"], sys.stderr
        )
    figures = results["transports"].values()
    results["best_call_stream_mb_s"] = max(
        max(f["call_stream_upload_mb_s"], f["call_stream_download_mb_s"]) for f in figures
    )
    results["best_unary_100B_p50_s"] = min(f["unary_100B_p50_s"] for f in figures)
    return results


def measure_lattica_sdk(
    transports: Sequence[str] = ("quic", "tcp"),
    payload: int = 64 * 1024 * 1024,
    unary_count: int = 1000,
    timeout: float = 1200.0,
) -> dict[str, Any]:
    """Measure the SDK baseline in a private namespace; raise LatticaUnavailable/NetnsUnavailable.

    Returns per transport the 100-byte unary p50/p99 (seconds), the latency of a 100-byte call
    issued while another call's handler sleeps 0.5 s, and the best of three `call_stream` runs
    of `payload` bytes in MB/s (10^6 bytes) for upload and download; plus the best figures over
    all transports (`best_call_stream_mb_s`, `best_unary_100B_p50_s`). Handlers take and return
    raw bytes (the SDK's fastest path; its stubs would add pickle on both sides).
    """
    unknown = set(transports) - set(LISTEN)
    if unknown:
        raise ValueError(f"transports are {sorted(LISTEN)}, not {sorted(unknown)}")
    reason = netns_unavailable_reason()
    if reason is not None:
        raise NetnsUnavailable(reason)
    python = lattica_python()
    config = {"transports": list(transports), "payload": payload, "unary_count": unary_count}
    result = run_in_private_netns(
        [python, Path(__file__).resolve(), "--inner", json.dumps(config)], timeout=timeout
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"lattica SDK benchmark failed (exit {result.returncode}):\n{result.stderr[-4000:]}"
        )
    return last_json_line(result.stdout)


def _print_table(figures: dict[str, Any]) -> None:
    print(f"lattica SDK {figures['sdk']}, payload {figures['payload_bytes'] / 2**20:.0f} MiB")
    for transport, f in figures["transports"].items():
        print(
            f"  {transport:4}  unary 100 B p50 {f['unary_100B_p50_s'] * 1e3:7.3f} ms"
            f"  p99 {f['unary_100B_p99_s'] * 1e3:7.3f} ms"
            f"  beside a 0.5 s handler {f['unary_100B_beside_0.5s_handler_s'] * 1e3:5.0f} ms"
            f"  call_stream upload {f['call_stream_upload_mb_s']:7.1f} MB/s"
            f"  download {f['call_stream_download_mb_s']:7.1f} MB/s"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", action="append", choices=sorted(LISTEN))
    parser.add_argument("--payload-mib", type=float, default=64)
    parser.add_argument("--unary-count", type=int, default=1000)
    parser.add_argument("--inner", help=argparse.SUPPRESS)  # runs inside the namespace
    args = parser.parse_args(argv)
    if args.inner:
        print(json.dumps(_inner(json.loads(args.inner))))
        return 0
    started = time.perf_counter()
    figures = measure_lattica_sdk(
        transports=args.transport or ("quic", "tcp"),
        payload=int(args.payload_mib * 2**20),
        unary_count=args.unary_count,
    )
    figures["wall_s"] = round(time.perf_counter() - started, 1)
    _print_table(figures)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
