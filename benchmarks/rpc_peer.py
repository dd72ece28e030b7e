"""One peer of `benchmarks/rpc.py`: a lattica-ray `Node` in its own process, driven by JSON lines.

    python -m benchmarks.rpc_peer --listen /ip4/127.0.0.1/udp/0/quic-v1 [--pmtu] [--no-holepunch]

Each peer serves the bench methods (`bench.put`, `bench.get`, `bench.download`, `bench.upload`,
`bench.echo`, `bench.sleep`, `bench.sleep_blocking`) and, told to, calls them on another peer
and times the calls. Separate processes make the figures like-for-like with the `lattica` SDK's
(a server and a client process), let each end report its own peak memory, and let the NAT lab
place the ends in different namespaces.

It prints {"event": "ready", "peer_id", "addrs", "pid"} once listening, then answers each command
line with one JSON line ({"error": "..."} when the command failed). `RpcPeer` is the parent's
handle on one such process. This module imports only the standard library at the top, so the
parent can use `RpcPeer` cheaply; the node and numpy are imported inside the child.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TENSOR_COLUMNS = 4096  # a 64 MiB float32 tensor is 4096 x 4096
BLOCK = 1024 * 1024  # plain TCP baselines write 1 MiB at a time
UDP_PAYLOAD = 1350  # the QUIC datagram size of the Internet-size figures
CALL_TIMEOUT = 600.0


class PeerError(RuntimeError):
    """A peer process failed a command, exited, or did not answer in time."""


# -- the parent's handle ------------------------------------------------------------------------
class RpcPeer:
    """One `rpc_peer` process: start it (`spawn` decides where, e.g. a lab namespace), wait until
    it is ready, send commands, stop it."""

    def __init__(
        self,
        name: str,
        listen: Sequence[str],
        *,
        pmtu: bool = False,
        datagram: int = 1350,
        holepunch: bool = True,
        spawn: Callable[..., subprocess.Popen[str]] | None = None,
        congestion_control: str = "reno",
        engine: str | None = None,
        log_level: str = "WARNING",
        busy_poll_us: float | None = None,
    ) -> None:
        argv = [sys.executable, "-m", "benchmarks.rpc_peer", "--datagram", str(datagram)]
        argv += [] if busy_poll_us is None else ["--busy-poll-us", str(busy_poll_us)]
        argv += ["--congestion-control", congestion_control, "--log-level", log_level]
        argv += ["--engine", engine] if engine else []
        argv += [arg for addr in listen for arg in ("--listen", addr)]
        argv += ["--pmtu"] if pmtu else []
        argv += [] if holepunch else ["--no-holepunch"]
        self.name = name
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"rpc-peer-{name}-", suffix=".log")
        start = spawn or _spawn_here
        self.process = start(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            cwd=str(REPO),
        )
        self.ready: dict[str, Any] = {}

    def wait_ready(self, timeout: float = 60.0) -> RpcPeer:
        """Wait until the node listens (separate from starting, so peers can start together)."""
        self.ready = self._answer(timeout)
        return self

    @property
    def peer_id(self) -> str:
        return self.ready["peer_id"]

    @property
    def addrs(self) -> list[str]:
        return self.ready["addrs"]

    @property
    def pid(self) -> int:
        return self.ready["pid"]

    def log_tail(self) -> str:
        """The last lines the process logged (stderr)."""
        self.log.flush()
        self.log.seek(0)
        return "".join(self.log.readlines()[-15:])

    def _answer(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                raise PeerError(f"{self.name}: no answer within {timeout} s\n{self.log_tail()}")
        line = self.process.stdout.readline()
        if not line:
            raise PeerError(f"{self.name} exited ({self.process.poll()})\n{self.log_tail()}")
        answer = json.loads(line)
        if "error" in answer:
            raise PeerError(f"{self.name}: {answer['error']}\n{self.log_tail()}")
        return answer

    def command(self, cmd: str, timeout: float = CALL_TIMEOUT, **args: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.process.stdin.flush()
        return self._answer(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Ask the process to stop; kill it if it does not within `timeout`."""
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
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError, ValueError):
                    pipe.close()
        self.log.close()

    def __enter__(self) -> RpcPeer:
        return self.wait_ready() if not self.ready else self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _spawn_here(argv: list[str], **popen: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(argv, **popen)


# -- memory of this process -----------------------------------------------------------------
def memory_status() -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of this process, in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# -- the child -------------------------------------------------------------------------------
def tensor(nbytes: int) -> Any:
    """The deterministic float32 tensor of `nbytes` both ends know (rows of 4096 when it fits)."""
    import numpy as np

    flat = np.arange(nbytes // 4, dtype=np.uint32).view(np.float32)
    return flat.reshape(-1, TENSOR_COLUMNS) if flat.size % TENSOR_COLUMNS == 0 else flat


def same_tensor(received: Any, expected: Any) -> bool:
    """Shape, dtype and a strided sample of the values (a full compare would time numpy)."""
    import numpy as np

    if received.shape != expected.shape or received.dtype != expected.dtype:
        return False
    step = max(1, expected.size // 65536)
    left, right = received.reshape(-1)[::step], expected.reshape(-1)[::step]
    return bool(np.array_equal(left.view(np.uint32), right.view(np.uint32)))


def chunks_of(source: Any, total: int, chunk: int) -> list[tuple[int, int]]:
    """(start, stop) byte spans of the `total` bytes sent as chunks cut from `source`, cycling."""
    size = source.nbytes
    spans = []
    for offset in range(0, total, chunk):
        start = offset % size
        spans.append((start, start + min(chunk, total - offset, size - start)))
    return spans


class Peer:
    """The child: the node, its bench methods, and the commands the parent sends."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.tensors: dict[int, Any] = {}
        self.udp_sink: dict[str, Any] | None = None
        self.tcp_server: asyncio.base_events.Server | None = None
        self._register()

    def tensor(self, nbytes: int) -> Any:
        if nbytes not in self.tensors:
            self.tensors[nbytes] = tensor(nbytes)
        return self.tensors[nbytes]

    def _register(self) -> None:
        rpc = self.node.rpc

        @rpc.method("bench.echo")
        async def echo(data: bytes) -> bytes:
            return data

        @rpc.method("bench.sleep")
        async def sleep(seconds: float) -> str:
            await asyncio.sleep(seconds)
            return "slept"

        @rpc.method("bench.sleep_blocking")
        def sleep_blocking(seconds: float) -> str:  # a plain def: the thread pool runs it
            time.sleep(seconds)
            return "slept"

        @rpc.method("bench.put")
        async def put(received: Any) -> int:
            if not same_tensor(received, self.tensor(received.nbytes)):
                raise ValueError("the tensor arrived altered")
            return int(received.nbytes)

        @rpc.method("bench.get")
        async def get(nbytes: int) -> Any:
            return self.tensor(nbytes)

        @rpc.method("bench.download")
        async def download(total: int, chunk: int, source: int) -> AsyncIterator[Any]:
            flat = self.tensor(source).reshape(-1).view("uint8")
            for start, stop in chunks_of(flat, total, chunk):
                yield flat[start:stop]

        @rpc.method("bench.upload")
        async def upload(requests: AsyncIterator[Any]) -> int:
            received = 0
            async for item in requests:
                received += int(item.nbytes)
            return received

    # -- commands ----------------------------------------------------------------------------
    async def cmd_connect(self, addrs: list[str], peer: str) -> dict[str, Any]:
        from transport.identity import PeerId
        from transport.multiaddr import Multiaddr

        peer_id = PeerId.from_string(peer)
        self.node.add_peer_addrs(peer_id, [Multiaddr.parse(a) for a in addrs])
        started = time.perf_counter()
        await self.node.connect(peer_id)
        connect_s = time.perf_counter() - started
        rtts = sorted([await self.node.ping(peer_id) for _ in range(5)])
        return {"connect_s": connect_s, "rtt_s": rtts[2], **self.path_to(peer_id)}

    def path_to(self, peer_id: Any) -> dict[str, str]:
        connection = self.node.connection_to(peer_id)
        if connection is None:
            return {"path": "none", "transport": "none", "remote_addr": ""}
        return {
            "path": connection.path,
            "transport": connection.transport,
            "remote_addr": str(connection.remote_addr),
        }

    async def cmd_quic_stats(self, peer: str) -> dict[str, Any]:
        """Loss recovery and congestion state of the QUIC connection to `peer` (qh3's core
        counts losses and probe timeouts; aioquic only has its window and RTT)."""
        from transport.identity import PeerId

        connection = self.node.connection_to(PeerId.from_string(peer))
        engine = getattr(connection, "quic", None)
        if engine is None:
            return {}
        core = getattr(getattr(engine, "_quic", None), "_core", None)
        if core is not None:
            return {
                "engine": "qh3",
                "loss_total": core.loss_total,
                "pto_total": core.pto_total,
                "congestion_window": core.congestion_window,
                "smoothed_rtt_s": core.smoothed_rtt,
            }
        recovery = engine._loss
        return {
            "engine": "aioquic",
            "congestion_window": recovery.congestion_window,
            "smoothed_rtt_s": recovery._rtt_smoothed,
        }

    async def cmd_reserve_relay(self, relay: str) -> dict[str, Any]:
        await self.node.reserve_relay(relay)
        return {"circuit_addrs": [str(a) for a in self.node.addrs if a.is_relayed]}

    async def cmd_bulk(
        self, peer: str, mode: str, size: int, chunk: int, repeat: int, source: int = 0
    ) -> dict[str, Any]:
        """Move `size` bytes `repeat` times; `mode`: unary_up (argument), unary_down (result),
        stream_down (server-streaming), stream_up (client-streaming). `source` (streams only) is
        the tensor the chunks are cut from, cycling (default: all `size` bytes)."""
        from transport.identity import PeerId

        peer_id = PeerId.from_string(peer)
        rpc = self.node.rpc
        source = source or size
        seconds = []
        cpu = time.process_time()
        for _ in range(repeat):
            started = time.perf_counter()
            if mode == "unary_up":
                received = await rpc.call(
                    peer_id, "bench.put", self.tensor(size), timeout=CALL_TIMEOUT
                )
            elif mode == "unary_down":
                result = await rpc.call(peer_id, "bench.get", size, timeout=CALL_TIMEOUT)
                if not same_tensor(result, self.tensor(size)):
                    raise ValueError("the tensor arrived altered")
                received = result.nbytes
                del result
            elif mode == "stream_down":
                received = 0
                replies = rpc.stream(
                    peer_id, "bench.download", size, chunk, source, timeout=CALL_TIMEOUT
                )
                async for item in replies:
                    received += item.nbytes
            elif mode == "stream_up":
                flat = self.tensor(source).reshape(-1).view("uint8")

                async def requests(flat: Any = flat) -> AsyncIterator[Any]:
                    for start, stop in chunks_of(flat, size, chunk):
                        yield flat[start:stop]

                received = await rpc.call(
                    peer_id, "bench.upload", requests=requests(), timeout=CALL_TIMEOUT
                )
            else:
                raise ValueError(f"unknown mode {mode!r}")
            seconds.append(time.perf_counter() - started)
            if received != size:
                raise ValueError(f"{mode}: {received} bytes arrived of {size}")
        return {
            "seconds": seconds,
            "mb_s": size / min(seconds) / 1e6,
            "cpu_s": time.process_time() - cpu,
            **self.path_to(peer_id),
        }

    async def cmd_latency(self, peer: str, count: int, size: int = 100) -> dict[str, Any]:
        from transport.identity import PeerId

        peer_id = PeerId.from_string(peer)
        payload = os.urandom(size)
        samples = []
        cpu_started = 0.0
        for index in range(count + count // 10):  # the first tenth warms up
            if index == count // 10:
                cpu_started = time.process_time()
            started = time.perf_counter()
            reply = await self.node.rpc.call(peer_id, "bench.echo", payload, timeout=30)
            if index >= count // 10:
                samples.append(time.perf_counter() - started)
            if reply != payload:
                raise ValueError("echo returned other bytes")
        cpu_s = time.process_time() - cpu_started
        samples.sort()
        return {
            "count": count,
            "cpu_s": cpu_s,  # this process's, over the timed calls
            "p50_s": samples[len(samples) // 2],
            "p99_s": samples[min(len(samples) - 1, int(len(samples) * 0.99))],
            **self.path_to(peer_id),
        }

    async def cmd_beside_slow(
        self, peer: str, method: str, sleep_s: float = 0.5, calls: int = 20
    ) -> dict[str, Any]:
        """Small calls made one after another while `method` sleeps `sleep_s` on the peer (as
        the SDK's benchmark: the slow call gets 50 ms to reach its handler first)."""
        from transport.identity import PeerId

        peer_id = PeerId.from_string(peer)
        rpc = self.node.rpc
        payload = os.urandom(100)
        await rpc.call(peer_id, "bench.echo", payload, timeout=30)  # the connection is up
        started = time.perf_counter()
        slow = asyncio.ensure_future(rpc.call(peer_id, method, sleep_s, timeout=30))
        await asyncio.sleep(0.05)
        samples = []
        for _ in range(calls):
            began = time.perf_counter()
            await rpc.call(peer_id, "bench.echo", payload, timeout=30)
            samples.append(time.perf_counter() - began)
        overlapped = not slow.done()
        await slow
        first = samples[0]
        samples.sort()
        return {
            "first_s": first,
            "p50_s": samples[len(samples) // 2],
            "max_s": samples[-1],
            "all_during_slow_call": overlapped,
            "slow_call_s": time.perf_counter() - started,
        }

    # -- plain-socket baselines -----------------------------------------------------------
    async def cmd_tcp_sink(self, host: str) -> dict[str, Any]:
        """Listen for plain TCP senders; each gets the byte count back when it closes its side."""

        async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            received = 0
            while data := await reader.read(BLOCK):
                received += len(data)
            writer.write(received.to_bytes(8, "big"))
            await writer.drain()
            writer.close()

        if self.tcp_server is None:
            self.tcp_server = await asyncio.start_server(sink, host, 0)
        return {"port": self.tcp_server.sockets[0].getsockname()[1]}

    async def cmd_tcp_send(
        self, host: str, port: int, size: int, repeat: int, congestion: str | None = None
    ) -> dict[str, Any]:
        """Send `size` bytes over plain TCP `repeat` times, with the kernel's congestion
        controller or `congestion` (e.g. "cubic"); the answer names the one used."""
        block = bytes(BLOCK)
        seconds = []
        used = ""
        for _ in range(repeat):
            started = time.perf_counter()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            if congestion:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion.encode())
            used = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
            used = used.rstrip(b"\0").decode()
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
            reader, writer = await asyncio.open_connection(sock=sock)
            for offset in range(0, size, BLOCK):
                writer.write(block[: min(BLOCK, size - offset)])
                await writer.drain()
            writer.write_eof()
            received = int.from_bytes(await reader.readexactly(8), "big")
            seconds.append(time.perf_counter() - started)
            writer.close()
            if received != size:
                raise ValueError(f"plain TCP: {received} bytes arrived of {size}")
        return {"seconds": seconds, "mb_s": size / min(seconds) / 1e6, "congestion": used}

    async def cmd_udp_sink(self, host: str) -> dict[str, Any]:
        """Count plain UDP datagrams arriving (bytes, first and last arrival)."""
        stats = {"bytes": 0, "datagrams": 0, "first": 0.0, "last": 0.0}

        class Sink(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                now = time.perf_counter()
                if not stats["datagrams"]:
                    stats["first"] = now
                stats["last"] = now
                stats["bytes"] += len(data)
                stats["datagrams"] += 1

        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
        sock.bind((host, 0))
        transport, _ = await loop.create_datagram_endpoint(Sink, sock=sock)
        self.udp_sink = {"transport": transport, "stats": stats}
        return {"port": sock.getsockname()[1]}

    async def cmd_udp_stats(self) -> dict[str, Any]:
        assert self.udp_sink is not None, "udp_sink first"
        stats = self.udp_sink["stats"]
        span = stats["last"] - stats["first"]
        return {
            "bytes": stats["bytes"],
            "datagrams": stats["datagrams"],
            "span_s": span,
            "mb_s": stats["bytes"] / span / 1e6 if span > 0 else 0.0,
        }

    async def cmd_udp_blast(self, host: str, port: int, seconds: float) -> dict[str, Any]:
        """Send UDP_PAYLOAD-byte datagrams as fast as the socket takes them, for `seconds`."""

        def blast() -> tuple[int, int]:
            payload = bytes(UDP_PAYLOAD)
            sent = 0
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.connect((host, port))
                deadline = time.perf_counter() + seconds
                while time.perf_counter() < deadline:
                    for _ in range(64):
                        with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
                            sock.send(payload)
                            sent += 1
            return sent, sent * UDP_PAYLOAD

        datagrams, nbytes = await asyncio.to_thread(blast)
        return {"datagrams": datagrams, "bytes": nbytes, "offered_mb_s": nbytes / seconds / 1e6}

    # -- this process ------------------------------------------------------------------------
    async def cmd_prepare(self, sizes: list[int]) -> dict[str, Any]:
        """Make the tensors of these sizes now, so that no timed call pays for them."""
        for size in sizes:
            self.tensor(size)
        return {}

    async def cmd_cpu(self) -> dict[str, Any]:
        return {"cpu_s": time.process_time()}

    async def cmd_busy_poll(self, limit_us: float | None = None) -> dict[str, Any]:
        """Spin up to `limit_us` before the loop sleeps from now on (0: never; None: the
        node's own setting), as `Node(busy_poll_us=...)` would have: the same processes
        measured both ways."""
        from benchmarks.busy_poll import set_busy_poll

        if limit_us is None:
            limit_us = self.node.busy_poll_us
        spinning = set_busy_poll(limit_us)
        self.node._busy_poll_loop = asyncio.get_running_loop() if spinning else None
        return {"busy_poll_us": limit_us}

    async def cmd_memory(self) -> dict[str, Any]:
        import gc

        gc.collect()
        return memory_status()

    async def cmd_reset_peak(self) -> dict[str, Any]:
        return {"reset": reset_peak(), **memory_status()}


async def serve(args: argparse.Namespace) -> None:
    from lattica_ray import Node
    from transport.nat.holepunch import DCUTR_PROTOCOL, EXTENDED_PROTOCOL
    from transport.nat.relay import RelayConfig
    from transport.quic import QuicConfig

    quic = QuicConfig(
        max_datagram_size=args.datagram,
        pmtu_probing=args.pmtu,
        congestion_control=args.congestion_control,
        **({"engine": args.engine} if args.engine else {}),
    )
    relay = RelayConfig(circuit_data=0, circuit_duration=0)  # any peer may be the bench's relay
    spin = {} if args.busy_poll_us is None else {"busy_poll_us": args.busy_poll_us}
    async with Node(listen=args.listen, quic_config=quic, relay=relay, **spin) as node:
        if args.no_holepunch:  # keep relayed connections relayed: refuse DCUtR both ways
            node.remove_stream_handler(DCUTR_PROTOCOL)
            node.remove_stream_handler(EXTENDED_PROTOCOL)
        peer = Peer(node)
        emit({"event": "ready", "peer_id": str(node.peer_id), "addrs": [str(a) for a in node.addrs],
              "pid": os.getpid()})  # fmt: skip
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            command = json.loads(line)
            name = command.pop("cmd")
            if name == "stop":
                break
            try:
                handler = getattr(peer, f"cmd_{name}")
                emit(await handler(**command))
            except Exception as exc:  # reported to the parent, which raises it
                emit({"error": f"{name}: {type(exc).__name__}: {exc}"})
        if peer.tcp_server is not None:
            peer.tcp_server.close()
        if peer.udp_sink is not None:
            peer.udp_sink["transport"].close()


def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", action="append", required=True)
    parser.add_argument("--datagram", type=int, default=1350, help="QUIC max datagram size")
    parser.add_argument("--pmtu", action="store_true", help="probe the path MTU (bigger datagrams)")
    parser.add_argument("--no-holepunch", action="store_true", help="refuse DCUtR")
    parser.add_argument("--congestion-control", choices=["reno", "cubic", "bdp"], default="reno")
    parser.add_argument(
        "--engine", choices=["qh3", "aioquic"], help="QUIC engine (default: the config's)"
    )
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--busy-poll-us", type=float, default=None, help="Node(busy_poll_us=)")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=args.log_level, stream=sys.stderr)
    logging.getLogger("aioquic").setLevel(logging.WARNING)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
