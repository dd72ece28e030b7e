"""RPC over the in-memory network: peak memory of a 1 GiB transfer, and small-call latency.

Memory: streams `--total-mib` of numpy chunks (`--chunk-mib` each) over an in-memory network,
server- and client-streamed, each in a fresh subprocess that reports its resident memory just
before the transfer and its peak during it (VmHWM from /proc/self/status, reset through
/proc/self/clear_refs after warm-up). The process holds both peers, so the peak covers the
sender and the receiver together. The baseline beside it: the same total held in memory at once.

Latency (`--latency`): 100-byte unary calls, idle and while another handler (async, then plain
`def`) is blocked, beside the bare transport round trip (open a stream, echo 100 bytes) measured
in the same run.

    python benchmarks/rpc_memory.py                       # 1 GiB each way, 4 MiB chunks
    python benchmarks/rpc_memory.py --total-mib 256 --json
    python benchmarks/rpc_memory.py --latency
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

MIB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent


def memory_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes."""
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


async def transfer(direction: str, total: int, chunk: int) -> dict[str, object]:
    import numpy as np

    from lattica_ray.rpc import RpcService
    from transport.memory_host import MemoryNetwork

    network = MemoryNetwork()
    client_host, server_host = network.add_host(), network.add_host()
    client, server = RpcService(client_host), RpcService(server_host)
    await client.start()
    await server.start()
    block = np.zeros(chunk, dtype=np.uint8)

    @server.method()
    async def download(count: int) -> AsyncIterator[np.ndarray]:
        for i in range(count):
            block[0] = i % 256
            yield block

    @server.method()
    async def upload(requests: AsyncIterator[np.ndarray]) -> int:
        received = 0
        async for i, item in aenumerate(requests):
            assert item[0] == i % 256 and item.nbytes == chunk
            received += item.nbytes
        return received

    async def chunks(count: int) -> AsyncIterator[np.ndarray]:
        for i in range(count):
            block[0] = i % 256
            yield block

    async def run(count: int) -> int:
        if direction == "server":
            received = 0
            async for i, item in aenumerate(client.stream(server_host.peer_id, "download", count)):
                assert item[0] == i % 256 and item.nbytes == chunk
                received += item.nbytes
            return received
        return await client.call(server_host.peer_id, "upload", requests=chunks(count))

    try:
        await run(4)  # warm up code paths and allocator pools
        before = memory_status()
        peak_reset = reset_peak()
        started = time.perf_counter()
        received = await run(total // chunk)
        elapsed = time.perf_counter() - started
        after = memory_status()
    finally:
        await client.stop()
        await server.stop()
        await client_host.aclose()
        await server_host.aclose()
    assert received == total // chunk * chunk, received
    peak = after["VmHWM"] if peak_reset else max(after["VmHWM"], before["VmHWM"])
    return {
        "direction": direction,
        "total_bytes": received,
        "chunk_bytes": chunk,
        "window_bytes": network.window,
        "rss_before": before["VmRSS"],
        "peak_rss": peak,
        "peak_growth": peak - before["VmRSS"],
        "peak_reset": peak_reset,
        "seconds": elapsed,
        "mib_per_s": received / MIB / elapsed,
    }


async def aenumerate(items: AsyncIterator[object]) -> AsyncIterator[tuple[int, object]]:
    i = 0
    async for item in items:
        yield i, item
        i += 1


async def latency(calls: int) -> None:
    import threading

    from lattica_ray.rpc import RpcService
    from transport.memory_host import MemoryNetwork

    network = MemoryNetwork()
    client_host, server_host = network.add_host(), network.add_host()
    client, server = RpcService(client_host), RpcService(server_host)
    await client.start()
    await server.start()
    peer = server_host.peer_id
    payload = b"x" * 100
    release_async, release_sync = asyncio.Event(), threading.Event()
    entered_async, entered_sync = asyncio.Event(), threading.Event()

    async def echo_stream(stream: object) -> None:
        await stream.write_message(await stream.read_message())  # type: ignore[attr-defined]
        await stream.close()  # type: ignore[attr-defined]

    server_host.set_stream_handler("/bench/echo/1", echo_stream)

    @server.method()
    async def echo(data: bytes) -> bytes:
        return data

    @server.method()
    async def block_async() -> None:
        entered_async.set()
        await release_async.wait()

    @server.method()
    def block_sync() -> None:
        entered_sync.set()
        release_sync.wait(60)

    async def measure(one_call: object) -> tuple[float, float]:
        samples = []
        for _ in range(calls):
            began = time.perf_counter()
            await one_call()  # type: ignore[operator]
            samples.append(time.perf_counter() - began)
        samples.sort()
        return samples[len(samples) // 2] * 1e3, samples[int(len(samples) * 0.99)] * 1e3

    async def bare_round_trip() -> None:
        stream = await client_host.open_stream(peer, ["/bench/echo/1"])
        await stream.write_message(payload)
        await stream.read_message()
        await stream.close()

    async def rpc_call() -> None:
        await client.call(peer, "echo", payload)

    try:
        await measure(rpc_call)  # warm up
        rows = [("bare stream round trip (baseline)", await measure(bare_round_trip))]
        rows.append(("rpc unary call", await measure(rpc_call)))
        blocked = asyncio.create_task(client.call(peer, "block_async"))
        await entered_async.wait()
        rows.append(("rpc unary, an async handler blocked", await measure(rpc_call)))
        release_async.set()
        await blocked
        blocked = asyncio.create_task(client.call(peer, "block_sync"))
        await asyncio.to_thread(entered_sync.wait, 10)
        rows.append(("rpc unary, a def handler blocked", await measure(rpc_call)))
        release_sync.set()
        await blocked
    finally:
        await client.stop()
        await server.stop()
        await client_host.aclose()
        await server_host.aclose()
    print(f"100-byte calls over MemoryNetwork, {calls} each:")
    for name, (p50, p99) in rows:
        print(f"  {name:<38} p50 {p50:.3f} ms   p99 {p99:.3f} ms")


def run_child(direction: str, total_mib: int, chunk_mib: int) -> dict[str, object]:
    """One transfer in a fresh interpreter, so earlier runs do not raise its peak."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        direction,
        "--total-mib",
        str(total_mib),
        "--chunk-mib",
        str(chunk_mib),
    ]
    output = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    if output.returncode:
        raise RuntimeError(f"{direction} transfer failed:\n{output.stderr}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total-mib", type=int, default=1024)
    parser.add_argument("--chunk-mib", type=int, default=4)
    parser.add_argument("--direction", choices=["server", "client", "both"], default="both")
    parser.add_argument("--json", action="store_true", help="print one JSON object per run")
    parser.add_argument("--latency", action="store_true", help="measure small-call latency")
    parser.add_argument("--calls", type=int, default=2000, help="calls per latency row")
    parser.add_argument("--child", choices=["server", "client"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(ROOT))
        result = asyncio.run(transfer(args.child, args.total_mib * MIB, args.chunk_mib * MIB))
        print(json.dumps(result))
        return
    if args.latency:
        sys.path.insert(0, str(ROOT))
        asyncio.run(latency(args.calls))
        return
    directions = ["server", "client"] if args.direction == "both" else [args.direction]
    for direction in directions:
        result = run_child(direction, args.total_mib, args.chunk_mib)
        if args.json:
            print(json.dumps(result))
            continue
        growth = result["peak_growth"] / MIB
        print(
            f"{direction}-streamed {result['total_bytes'] / MIB:.0f} MiB in "
            f"{result['chunk_bytes'] / MIB:.0f} MiB chunks (window "
            f"{result['window_bytes'] / MIB:.0f} MiB): peak RSS {result['peak_rss'] / MIB:.0f} "
            f"MiB, +{growth:.1f} MiB over the {result['rss_before'] / MIB:.0f} MiB before "
            f"({growth / (result['chunk_bytes'] / MIB):.1f}x the chunk); baseline, the whole "
            f"transfer in memory: +{result['total_bytes'] / MIB:.0f} MiB; "
            f"{result['mib_per_s']:.0f} MiB/s"
        )


if __name__ == "__main__":
    main()
