"""Drive one node of the third-party `lattica` SDK (rust-libp2p) from JSON commands on stdin.

Run it with the python of the lattica lab venv (see `benchmarks/lattica_sdk.py`), and ONLY inside
a private network namespace: the SDK sends STUN probes to public servers on every start.

On start it prints one JSON line ``{"peer_id": ..., "addrs": [...]}`` on stdout, then reads one
JSON command per line on stdin and answers each with one JSON line
(``{"ok": true, ...}`` or ``{"ok": false, "error": ...}``):

    {"cmd": "dial", "addr": MULTIADDR/p2p/ID}         connect (see the note below)
    {"cmd": "wait_peer", "peer": ID}                  wait for the peer's identify; its info
    {"cmd": "peer_info", "peer": ID}                  what the SDK knows of a peer, now
    {"cmd": "ping", "peer": ID}                       wait for an RTT measured by the SDK's ping
    {"cmd": "wait_disconnect", "peer": ID}            wait for a connection to close and none left
    {"cmd": "wait_event", "event": E, "peer": ID}     wait for one of the events listed by "events"
    {"cmd": "events"}                                 connection / identify / mismatch events
    {"cmd": "dht_put", "key": K, "value": V}          store V (utf-8) under K, raw bytes (no
                                                      pickle); "subkey": S stores it under K#S
    {"cmd": "dht_get", "key": K}                      look K up in the DHT
    {"cmd": "dht_store_object", "key": K, "value": V} the SDK's public store(): pickles bytes(V)
    {"cmd": "dht_get_object", "key": K}               the SDK's public get(): unpickles (only for
                                                      values the scenario itself wrote)
    {"cmd": "provide", "key": K}                      announce this node as a provider of K
    {"cmd": "get_providers", "key": K}                the peers the DHT names as providers of K
    {"cmd": "bench_unary", "peer": ID, "size": N, "count": C}    needs --bench-service on both
    {"cmd": "bench_stream", "peer": ID, "size": N, "direction": "upload"|"download", "repeat": R}
    {"cmd": "bench_call_beside_slow_handler", "peer": ID, "sleep_s": S}
    {"cmd": "stop"}                                   close the node and exit (so does EOF)

What the SDK (1.0.21) does and does not expose, which shapes these commands:
- There is no dial-by-multiaddr in its Python API: `connect(peer_id)` only dials addresses
  Kademlia already knows. A multiaddr is dialled by passing it as `--bootstrap` at start (the SDK
  dials it through a Kademlia bootstrap and re-dials it every 30 s); `dial` then waits for that
  connection, or asks `connect(peer_id)` for a peer whose address the node has learnt.
- Ping is rust-libp2p's ping behaviour, run by the SDK on every connection (first ping at once,
  then every 15 s); `ping` waits for its result, it cannot trigger one.
- Identify results are in `get_peer_info` except the observed address; the driver reads that, and
  the connection events, from the SDK's own debug log (`lattica::network`), which it captures by
  pointing file descriptor 1 (where the SDK's Rust logger writes) at a pipe. Every log line is
  forwarded to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
from typing import Any

DEFAULT_PROTOCOL_VERSION = "/lattica/1.0.0"  # the SDK's default identify protocolVersion
DEFAULT_LISTEN = ["/ip4/127.0.0.1/udp/0/quic-v1", "/ip4/127.0.0.1/tcp/0"]
DEFAULT_RUST_LOG = "info,lattica::network=debug"
START_TIMEOUT_S = 10.0
COMMAND_TIMEOUT_S = 20.0  # default wait of a command; events come in milliseconds when all is well
BENCH_SERVICE = "LatticaBench"  # service name on the wire is the handler class name

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LISTENING = re.compile(r"Listening on: (\S+)")
_CONNECTED = re.compile(r"Connection established with peer: (\S+), via: (\S+),")
_CLOSED = re.compile(r"Connection closed with peer: (\S+)")
_IDENTIFY = re.compile(
    r"Updated info for peer (\S+): Info \{.*?protocol_version: \"(.*?)\", "
    r"agent_version: \"(.*?)\", listen_addrs: \[(.*?)\], protocols: \[(.*?)\], "
    r"observed_addr: (\S+?)(?:,| \})"
)
_MISMATCH = re.compile(r"protocol version mismatch, disconnect from peer (\S+)")
_PING_OK = re.compile(r"Updated RTT for peer (\S+):")
_PING_FAILED = re.compile(r"Ping failed for peer (\S+): (.*)")


def _sdk_error(exc: BaseException) -> str:
    """The SDK's error message without the Rust backtrace it sometimes carries."""
    return str(exc).split("\n\nStack backtrace:")[0].strip()


def _split_list(text: str) -> list[str]:
    return [item.strip().strip('"') for item in text.split(",") if item.strip()]


class LogWatcher:
    """Reads the SDK's log from a pipe, forwards it to stderr, and turns lines into events."""

    def __init__(self, read_fd: int) -> None:
        self._file = os.fdopen(read_fd, "r", errors="replace")
        self.changed = threading.Condition()
        self.listen_addrs: list[str] = []
        self.connections: dict[str, int] = {}  # peer -> open connections
        self.connected_via: dict[str, str] = {}
        self.identify: dict[str, dict[str, Any]] = {}
        self.mismatches: list[str] = []
        self.pings_ok: dict[str, int] = {}
        self.ping_failures: dict[str, str] = {}
        self.events: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._run, name="lattica-log", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for raw in self._file:
            line = _ANSI.sub("", raw.rstrip("\n"))
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
            with self.changed:
                if self._ingest(line):
                    self.changed.notify_all()

    def _ingest(self, line: str) -> bool:
        if match := _LISTENING.search(line):
            self.listen_addrs.append(match.group(1))
        elif match := _CONNECTED.search(line):
            peer = match.group(1)
            self.connections[peer] = self.connections.get(peer, 0) + 1
            self.connected_via[peer] = match.group(2)
            self.events.append({"event": "connected", "peer": peer, "via": match.group(2)})
        elif match := _CLOSED.search(line):
            peer = match.group(1)
            self.connections[peer] = max(0, self.connections.get(peer, 0) - 1)
            self.events.append({"event": "closed", "peer": peer})
        elif match := _IDENTIFY.search(line):
            peer, version, agent, listen, protocols, observed = match.groups()
            self.identify[peer] = {
                "protocol_version": version,
                "agent_version": agent,
                "listen_addrs": _split_list(listen),
                "protocols": _split_list(protocols),
                "observed_addr": observed,
            }
            self.events.append({"event": "identify", "peer": peer, "protocol_version": version})
        elif match := _MISMATCH.search(line):
            self.mismatches.append(match.group(1))
            self.events.append({"event": "protocol_version_mismatch", "peer": match.group(1)})
        elif match := _PING_OK.search(line):
            peer = match.group(1)
            self.pings_ok[peer] = self.pings_ok.get(peer, 0) + 1
        elif match := _PING_FAILED.search(line):
            self.ping_failures[match.group(1)] = match.group(2)
            self.events.append({"event": "ping_failed", "peer": match.group(1)})
        else:
            return False
        return True

    def wait_for(self, predicate: Any, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(predicate, timeout=timeout)


def _redirect_sdk_log() -> tuple[Any, LogWatcher]:
    """Keep a private stdout for JSON and send fd 1 (the SDK's log) through a LogWatcher."""
    json_out = os.fdopen(os.dup(1), "w", buffering=1)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 1)
    os.close(write_fd)
    sys.stdout = sys.stderr  # a stray print must not corrupt the JSON channel
    return json_out, LogWatcher(read_fd)


class Driver:
    """One SDK node plus the command handlers."""

    def __init__(self, args: argparse.Namespace, log: LogWatcher, state_dir: str) -> None:
        from lattica import Lattica  # imported late: after the log redirection and RUST_LOG

        builder = (
            Lattica.builder()
            .with_listen_addrs(args.listen or DEFAULT_LISTEN)
            .with_mdns(False)
            .with_upnp(False)
            .with_protocol(args.protocol_version)
            .with_storage_path(os.path.join(state_dir, "blocks"))
            .with_dht_db_path(os.path.join(state_dir, "dht"))
            .with_key_path(os.path.join(state_dir, "key"))
        )
        if args.bootstrap:
            builder = builder.with_bootstraps(args.bootstrap)
        self.node = builder.build()
        self.bootstrap: list[str] = args.bootstrap or []
        self.sdk = self.node._lattica_instance  # raw bytes API: no pickle around DHT values
        self.peer_id: str = self.node.peer_id()
        self.log = log
        self.bench = _make_bench_service(self.node) if args.bench_service else None
        expected = len(args.listen or DEFAULT_LISTEN)
        if not log.wait_for(lambda: len(log.listen_addrs) >= expected, START_TIMEOUT_S):
            raise RuntimeError(f"lattica reported {log.listen_addrs} listening, wanted {expected}")

    # -- commands ------------------------------------------------------------------------------

    def cmd_dial(self, addr: str, timeout: float = COMMAND_TIMEOUT_S) -> dict[str, Any]:
        if "/p2p/" not in addr:
            raise ValueError(f"dial needs a multiaddr ending in /p2p/PEER_ID, got {addr!r}")
        peer = addr.rsplit("/p2p/", 1)[1]
        if not self._connected(peer) and addr not in self.bootstrap:
            try:
                self.sdk.connect(peer)
            except Exception as exc:
                raise RuntimeError(
                    f"lattica SDK cannot dial {addr}: its Python API has no dial-by-multiaddr and "
                    f"connect(peer_id) failed ({_sdk_error(exc)}); start the driver with "
                    f"--bootstrap {addr}"
                ) from exc
        if not self.log.wait_for(lambda: self._connected(peer), timeout):
            raise TimeoutError(f"no connection to {peer} within {timeout} s")
        return {"peer": peer, "via": self.log.connected_via.get(peer)}

    def cmd_wait_peer(self, peer: str, timeout: float = COMMAND_TIMEOUT_S) -> dict[str, Any]:
        log = self.log
        done = log.wait_for(lambda: peer in log.identify or peer in log.mismatches, timeout)
        if not done:
            raise TimeoutError(f"no identify from {peer} within {timeout} s")
        if peer in log.mismatches:
            raise RuntimeError(f"lattica disconnected {peer}: identify protocolVersion mismatch")
        return self.cmd_peer_info(peer)

    def cmd_peer_info(self, peer: str) -> dict[str, Any]:
        info = self.sdk.get_peer_info(peer)
        result: dict[str, Any] = {"peer": peer, "connected": self._connected(peer)}
        if info is not None:
            result.update(
                protocol_version=info.protocol_version,
                agent_version=info.agent_version,
                protocols=sorted(info.protocols),
                listen_addrs=list(info.listen_addresses),
                connection_addrs=list(info.addresses),
            )
        identify = self.log.identify.get(peer)
        result["observed_addr"] = identify["observed_addr"] if identify else None
        return result

    def cmd_ping(self, peer: str, timeout: float = COMMAND_TIMEOUT_S) -> dict[str, Any]:
        log = self.log
        done = log.wait_for(lambda: peer in log.pings_ok or peer in log.ping_failures, timeout)
        if not done:
            raise TimeoutError(f"the SDK's ping measured no RTT to {peer} within {timeout} s")
        if peer not in log.pings_ok:
            raise RuntimeError(f"the SDK's ping to {peer} failed: {log.ping_failures[peer]}")
        return {"peer": peer, "rtt_s": self.sdk.get_peer_rtt(peer), "pings": log.pings_ok[peer]}

    def cmd_wait_disconnect(self, peer: str, timeout: float = COMMAND_TIMEOUT_S) -> dict[str, Any]:
        closed = {"event": "closed", "peer": peer}
        gone = lambda: closed in self.log.events and not self._connected(peer)  # noqa: E731
        if not self.log.wait_for(gone, timeout):
            raise TimeoutError(
                f"no connection to {peer} closed, or one is still open, after {timeout} s"
            )
        return {"peer": peer, "mismatch": peer in self.log.mismatches}

    def cmd_wait_event(
        self, event: str, peer: str, timeout: float = COMMAND_TIMEOUT_S
    ) -> dict[str, Any]:
        def seen() -> dict[str, Any] | None:
            return next(
                (e for e in self.log.events if e["event"] == event and e["peer"] == peer), None
            )

        if not self.log.wait_for(lambda: seen() is not None, timeout):
            raise TimeoutError(f"no {event} event for {peer} within {timeout} s")
        return {"found": seen()}

    def cmd_events(self) -> dict[str, Any]:
        with self.log.changed:
            return {"events": list(self.log.events)}

    def cmd_dht_put(
        self, key: str, value: str, ttl: float = 600.0, subkey: str | None = None
    ) -> dict[str, Any]:
        self.sdk.store_with_subkey(key, value.encode(), time.time() + ttl, subkey)
        return {"key": key}

    def cmd_dht_store_object(self, key: str, value: str, ttl: float = 600.0) -> dict[str, Any]:
        """The SDK's public `store()`, which pickles what it is given (here: bytes)."""
        if not self.node.store(key, value.encode(), time.time() + ttl):
            raise RuntimeError("the SDK's store() reported a failure (see its log)")
        return {"key": key}

    def cmd_dht_get_object(self, key: str) -> dict[str, Any]:
        """The SDK's public `get()`, which unpickles what it finds: the SDK's own behaviour, run
        here only inside a private namespace on values the scenario itself put."""
        found = self.node.get(key)
        if found is None:
            return {"key": key, "found": False}
        value = found.value
        shown = value.decode(errors="replace") if isinstance(value, bytes) else repr(value)[:200]
        return {
            "key": key,
            "found": True,
            "type": type(value).__name__,
            "value": shown,
            "expiration": found.expiration_time,
        }

    def cmd_dht_get(self, key: str) -> dict[str, Any]:
        found = self.sdk.get_with_subkey(key)
        if found is None:
            return {"key": key, "found": False}
        if isinstance(found, dict):  # values stored under subkeys
            values = {sub: bytes(val).decode(errors="replace") for sub, (val, _) in found.items()}
            return {"key": key, "found": True, "subkeys": values}
        value, expiration = found
        return {
            "key": key,
            "found": True,
            "value": bytes(value).decode(errors="replace"),
            "expiration": expiration,
        }

    def cmd_provide(self, key: str) -> dict[str, Any]:
        self.sdk.start_providing(key)
        return {"key": key}

    def cmd_get_providers(self, key: str) -> dict[str, Any]:
        return {"key": key, "providers": sorted(self.sdk.get_providers(key))}

    def cmd_bench_unary(
        self, peer: str, size: int = 100, count: int = 1000, warmup: int = 50
    ) -> dict[str, Any]:
        client = self._bench_client(peer)
        payload = os.urandom(size)
        latencies = []
        for index in range(warmup + count):
            start = time.perf_counter()
            reply = client.call(f"{BENCH_SERVICE}.echo", payload).result(60)
            elapsed = time.perf_counter() - start
            if bytes(reply) != payload:
                raise RuntimeError("echo returned different bytes")
            if index >= warmup:
                latencies.append(elapsed)
        latencies.sort()
        return {
            "count": count,
            "size": size,
            "p50_s": latencies[len(latencies) // 2],
            "p99_s": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        }

    def cmd_bench_call_beside_slow_handler(
        self, peer: str, size: int = 100, sleep_s: float = 0.5
    ) -> dict[str, Any]:
        """Latency of a small call issued while another call's handler sleeps `sleep_s`."""
        client = self._bench_client(peer)
        slow = client.call(f"{BENCH_SERVICE}.sleep", str(sleep_s).encode())
        started = time.perf_counter()
        payload = os.urandom(size)
        time.sleep(0.05)  # let the slow call reach its handler first
        start = time.perf_counter()
        reply = client.call(f"{BENCH_SERVICE}.echo", payload).result(60)
        elapsed = time.perf_counter() - start
        slow.result(60)
        if bytes(reply) != payload:
            raise RuntimeError("echo returned different bytes")
        return {"small_call_s": elapsed, "slow_call_total_s": time.perf_counter() - started}

    def cmd_bench_stream(
        self, peer: str, size: int, direction: str, repeat: int = 3
    ) -> dict[str, Any]:
        client = self._bench_client(peer)
        if direction == "upload":
            method, request = "upload", os.urandom(size)
        elif direction == "download":
            method, request = "download", str(size).encode()
        else:
            raise ValueError(f"direction is 'upload' or 'download', not {direction!r}")
        seconds = []
        for _ in range(repeat):
            start = time.perf_counter()
            reply = bytes(client.call_stream(f"{BENCH_SERVICE}.{method}", request).result(600))
            seconds.append(time.perf_counter() - start)
            received = int(reply) if direction == "upload" else len(reply)
            if received != size:
                raise RuntimeError(f"{direction}: {received} bytes arrived, {size} sent")
        best = min(seconds)
        return {
            "direction": direction,
            "size": size,
            "repeat": repeat,
            "seconds": seconds,
            "best_mb_s": size / best / 1e6,
        }

    # -- helpers -------------------------------------------------------------------------------

    def _connected(self, peer: str) -> bool:
        return self.log.connections.get(peer, 0) > 0

    def _bench_client(self, peer: str) -> Any:
        if self.bench is None:
            raise RuntimeError("start the driver with --bench-service to run benchmarks")
        return self.sdk.get_client(peer)

    def close(self) -> None:
        self.node.close()


def _make_bench_service(node: Any) -> Any:
    """Register raw-bytes handlers (the SDK's fastest path: no pickle on either side)."""
    from lattica import ConnectionHandler, rpc_method, rpc_stream

    def echo(self: Any, data: bytes) -> bytes:
        return data

    def upload(self: Any, data: bytes) -> bytes:
        return str(len(data)).encode()

    def download(self: Any, data: bytes) -> bytes:
        return bytes(int(bytes(data)))

    def sleep(self: Any, data: bytes) -> bytes:
        time.sleep(float(bytes(data)))
        return b"slept"

    # The SDK calls `_handle_<m>` / `_handle_stream_<m>` with the request bytes; the decorated
    # stand-ins only make the metaclass list the methods.
    namespace = {
        "echo": rpc_method(lambda self: None),
        "sleep": rpc_method(lambda self: None),
        "upload": rpc_stream(lambda self: None),
        "download": rpc_stream(lambda self: None),
        "_handle_echo": echo,
        "_handle_sleep": sleep,
        "_handle_stream_upload": upload,
        "_handle_stream_download": download,
    }
    service_class = type(BENCH_SERVICE, (ConnectionHandler,), namespace)
    return service_class(node)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", action="append", help="multiaddr (repeatable)")
    parser.add_argument("--bootstrap", action="append", help="multiaddr/p2p/ID to dial at start")
    parser.add_argument("--protocol-version", default=DEFAULT_PROTOCOL_VERSION)
    parser.add_argument("--bench-service", action="store_true", help="serve echo/upload/download")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    os.environ.setdefault("RUST_LOG", DEFAULT_RUST_LOG)
    os.environ["NO_COLOR"] = "1"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    json_out, log = _redirect_sdk_log()

    def reply(message: dict[str, Any]) -> None:
        json_out.write(json.dumps(message) + "\n")
        json_out.flush()

    with tempfile.TemporaryDirectory(prefix="lattica-peer-") as state_dir:
        driver = Driver(args, log, state_dir)
        try:
            addrs = [f"{addr.split('/p2p/')[0]}/p2p/{driver.peer_id}" for addr in log.listen_addrs]
            reply({"peer_id": driver.peer_id, "addrs": addrs})
            for line in sys.stdin:
                if not line.strip():
                    continue
                try:
                    command = json.loads(line)
                    name = command.pop("cmd")
                    if name == "stop":
                        reply({"ok": True, "cmd": "stop"})
                        break
                    handler = getattr(driver, f"cmd_{name}", None)
                    if handler is None:
                        raise ValueError(f"unknown command {name!r}")
                    reply({"ok": True, "cmd": name, **handler(**command)})
                except Exception as exc:
                    reply({"ok": False, "error": f"{type(exc).__name__}: {_sdk_error(exc)}"})
        finally:
            driver.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
