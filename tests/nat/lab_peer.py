"""A node for the NAT lab, driven by JSON lines on stdin (one answer per line on stdout).

    python -m tests.nat.lab_peer --listen /ip4/10.1.0.10/udp/4001/quic-v1 \
        --listen /ip4/10.1.0.10/tcp/4001 --bootstrap ADDR...

After bootstrap (reachability checked, relay slots reserved when NAT'd) it prints
{"event": "ready", "peer_id", "addrs", "reachability", "mapping", "relay_transports"}. Commands:
{"cmd": "connect", "peer", "addrs", "direct_timeout"}  -> path, transport, paths (every
    connection as transport/path), connect_ms, first_ping_ms, rtt_ms, punch (how waiting for a
    direct path ended: direct / failed / timeout, the reason, this round's attempts of each
    side), punches (hole punches run with the peer so far: 1 when the first got through)
{"cmd": "punch_state", "peer"} -> punch (this side's view of its punching with the peer)
{"cmd": "ping", "peer"}, {"cmd": "disconnect", "peer"}, {"cmd": "info"}, {"cmd": "stop"},
{"cmd": "dial_from_listen_port", "addr"} -> connected (one TCP dial, from the listen port)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time

from lattica_ray import Node
from transport.errors import ConnectionClosed, StreamReset, TransportError
from transport.identity import PeerId
from transport.multiaddr import Multiaddr
from transport.nat.manager import DirectOutcome
from transport.tcp import tcp_socket_address

READY_TIMEOUT = 60.0  # a UDP-blocked node waits out QUIC dials and AutoNAT dial-backs first


def _emit(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def _wait_ready(node: Node) -> None:
    """Until our relay slots are held (when NAT'd) and our advertised addresses settled."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        settled = str(node.reachability) != "unknown" or not node.bootstrap_addrs
        relays_held = not node.nat.wants_relays() or node.relay_client.circuit_addrs
        if settled and relays_held:
            return
        await asyncio.sleep(0.05)


async def _connect(node: Node, command: dict) -> dict:
    peer = PeerId.from_string(command["peer"])
    node.add_peer_addrs(peer, [Multiaddr.parse(a) for a in command.get("addrs", [])])
    started = time.perf_counter()
    await node.connect(peer)
    connect_ms = (time.perf_counter() - started) * 1000
    first_path = node.connection_to(peer).path
    outcome = await node.nat.wait_direct(peer, float(command.get("direct_timeout", 8.0)))
    path = outcome.path
    first_ping = await _ping(node, peer)
    rtts = [await _ping(node, peer) for _ in range(3)]
    connection = node.connection_to(peer)
    return {
        "path": path,
        "transport": connection.transport if connection is not None else "",
        "paths": _paths(node, peer),
        "first_path": first_path,
        "connect_ms": connect_ms,
        "time_to_path_ms": (time.perf_counter() - started) * 1000,
        "first_ping_ms": first_ping * 1000,
        "rtt_ms": sorted(rtts)[1] * 1000,
        "punch": _describe(outcome),
        "punches": node.nat.holepuncher.punches.get(peer, 0),
        "via": _via(node, peer),
    }


async def _ping(node: Node, peer: PeerId) -> float:
    """A ping; once more if the path under it died or stalled meanwhile (in-flight streams on
    a dead path fail, by design; liveness marks a silent path suspect within a second, and the
    next stream takes another path)."""
    try:
        return await node.ping(peer, timeout=3.0)
    except (StreamReset, ConnectionClosed, TimeoutError) as exc:
        logging.getLogger(__name__).warning("ping of %s: %r; once more", peer, exc)
        return await node.ping(peer)


class Monitor:
    """Pings a peer every `interval` s in the background, recording (time, ok, path)."""

    def __init__(self, node: Node, peer: PeerId, interval: float, timeout: float) -> None:
        self.samples: list[tuple[float, bool, str]] = []
        self._task = asyncio.get_running_loop().create_task(
            self._run(node, peer, interval, timeout)
        )

    async def _run(self, node: Node, peer: PeerId, interval: float, timeout: float) -> None:
        while True:
            sent = time.time()
            try:
                await node.ping(peer, timeout=timeout)
                connection = node.connection_to(peer)
                self.samples.append((sent, True, connection.path if connection else "?"))
            except (TransportError, TimeoutError, EOFError) as exc:
                self.samples.append((sent, False, type(exc).__name__))
            await asyncio.sleep(max(0.0, interval - (time.time() - sent)))

    async def stop(self) -> list[tuple[float, bool, str]]:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        return self.samples


def _describe(outcome: DirectOutcome) -> str:
    reason = f" ({outcome.reason})" if outcome.reason else ""
    return f"{outcome.status}{reason}, attempts ours {outcome.ours} theirs {outcome.theirs}"


def _punch_state(node: Node, command: dict) -> dict:
    state = node.nat.holepuncher.punch_state(PeerId.from_string(command["peer"]))
    return {"punch": f"{'over' if state.over else 'under way'}: {state.describe()}"}


def _paths(node: Node, peer: PeerId) -> list[str]:
    """Every open connection to `peer`, as transport/path ("tcp/holepunched")."""
    return sorted(f"{c.transport}/{c.path}" for c in node.swarm.connections_to(peer))


def _relay_transports(node: Node) -> list[str]:
    """The transports our relay reservations are held over."""
    return sorted(
        connection.transport
        for relay in node.relay_client.reservations
        if (connection := node.connection_to(relay)) is not None
    )


def _via(node: Node, peer: PeerId) -> str:
    connection = node.connection_to(peer)
    return str(connection.remote_addr) if connection and connection.remote_addr else ""


async def _dial_from_listen_port(node: Node, command: dict) -> dict:
    """One TCP dial from our listen port to `addr` (as an ordinary dial to a peer not yet
    known to be NAT'd makes); whether it connected."""
    addr = Multiaddr.parse(command["addr"])
    assert node.swarm.tcp is not None
    source = node.swarm.tcp_dial_source(tcp_socket_address(addr)[0])
    try:
        connection = await node.swarm.tcp.dial(addr, local_address=source)
    except TransportError as exc:
        return {"connected": False, "reason": f"{type(exc).__name__}: {exc}"}
    await connection.close("test dial")
    return {"connected": True}


async def _disconnect(node: Node, command: dict) -> dict:
    peer = PeerId.from_string(command["peer"])
    for connection in node.swarm.connections_to(peer):
        await connection.close("test disconnect")
    node.nat.holepuncher.results.pop(peer, None)
    node.nat.holepuncher.tracker.forget(peer)
    return {"ok": True}


async def serve(args: argparse.Namespace) -> None:
    node = Node(listen=args.listen, bootstrap=args.bootstrap)
    await node.start()
    await _wait_ready(node)
    _emit(
        {
            "event": "ready",
            "peer_id": str(node.peer_id),
            "addrs": [str(a) for a in node.addrs],
            "reachability": str(node.reachability),
            "mapping": str(node.nat.mapping),
            "relay_transports": _relay_transports(node),
            "observed": [str(a) for a in node.nat.observed_addrs()],
        }
    )
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    monitors: dict[str, Monitor] = {}
    try:
        while line := await reader.readline():
            command = json.loads(line)
            kind = command.get("cmd")
            try:
                if kind == "connect":
                    _emit(await _connect(node, command))
                elif kind == "ping":
                    peer = PeerId.from_string(command["peer"])
                    rtt = await node.ping(peer)
                    _emit({"rtt_ms": rtt * 1000, "path": node.connection_to(peer).path})
                elif kind == "punch_state":
                    _emit(_punch_state(node, command))
                elif kind == "dial_from_listen_port":
                    _emit(await _dial_from_listen_port(node, command))
                elif kind == "disconnect":
                    _emit(await _disconnect(node, command))
                elif kind == "info":
                    _emit(
                        {
                            "addrs": [str(a) for a in node.addrs],
                            "peers": len(node.connected_peers()),
                        }
                    )
                elif kind == "monitor":
                    peer = PeerId.from_string(command["peer"])
                    interval, timeout = command.get("interval", 0.1), command.get("timeout", 0.5)
                    monitors[command["peer"]] = Monitor(node, peer, interval, timeout)
                    _emit({"ok": True})
                elif kind == "monitor_stop":
                    samples = await monitors.pop(command["peer"]).stop()
                    _emit(
                        {"samples": samples, "via": _via(node, PeerId.from_string(command["peer"]))}
                    )
                elif kind == "stop":
                    break
                else:
                    _emit({"error": f"unknown command {kind!r}"})
            except (TransportError, TimeoutError, EOFError) as exc:
                _emit({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        await node.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", action="append", required=True)
    parser.add_argument("--bootstrap", action="append", default=[])
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args()
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
