"""libp2p TCP (Noise + Yamux) on loopback against plain asyncio TCP, measured in the same run.

    python benchmarks/tcp.py [--size-mib 64] [--rounds 2000] [--repeat 3] [--json]

Prints the 64 B round trip (p50/p99) over one Yamux stream and the bulk throughput of one
Yamux stream (best of `--repeat`, by the wall clock and per CPU-second), next to asyncio TCP
streams doing the same, and the ratios (libp2p TCP / asyncio TCP). The machines are noisy:
read the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import sys
import time

# Run as a script, this directory heads sys.path and this file would shadow the package.
if pathlib.Path(sys.path[0]).resolve() == pathlib.Path(__file__).resolve().parent:
    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # the repo: `benchmarks.*`

from benchmarks.baselines import (
    CHUNK,
    percentiles,
    stream_rtt,
    tcp_rtt,
    tcp_throughput,
)
from transport.identity import KeyPair
from transport.stream import Stream
from transport.tcp import TcpConfig, TcpConnection, TcpTransport


# -- libp2p TCP -------------------------------------------------------------------------------
async def _libp2p_pair(
    config: TcpConfig,
) -> tuple[TcpTransport, TcpTransport, TcpConnection, asyncio.Queue[Stream]]:
    inbound: asyncio.Queue[Stream] = asyncio.Queue()

    def on_connection(connection: TcpConnection) -> None:
        connection.set_inbound_stream_callback(inbound.put_nowait)

    client = TcpTransport(KeyPair.generate(), config)
    server = TcpTransport(KeyPair.generate(), config, on_connection)
    address = await server.listen("/ip4/127.0.0.1/tcp/0")
    connection = await client.dial(address, server.peer_id)
    return client, server, connection, inbound


async def libp2p_rtt(config: TcpConfig, rounds: int) -> list[float]:
    client, server, connection, inbound = await _libp2p_pair(config)
    try:
        stream = await connection.open_stream()
        return await stream_rtt(stream, inbound, rounds)
    finally:
        await client.close()
        await server.close()


async def libp2p_throughput(config: TcpConfig, size: int) -> float:
    client, server, connection, inbound = await _libp2p_pair(config)
    try:
        stream = await connection.open_stream()
        block = bytes(CHUNK)
        started = time.perf_counter()

        async def send() -> None:
            for _ in range(size // CHUNK):
                await stream.write(block)
            await stream.close()

        sender = asyncio.ensure_future(send())
        remote = await inbound.get()
        received = 0
        while data := await remote.read(CHUNK):
            received += len(data)
        await sender
        elapsed = time.perf_counter() - started
        assert received == size, (received, size)
        return size / elapsed
    finally:
        await client.close()
        await server.close()


async def run(size: int, rounds: int, repeat: int) -> dict:
    config = TcpConfig()
    libp2p_samples = await libp2p_rtt(config, rounds)
    tcp_samples = await tcp_rtt(rounds)
    libp2p_rates, tcp_rates, libp2p_cpu, tcp_cpu = [], [], [], []
    for _ in range(repeat):  # interleaved, so both see the same machine load
        cpu = time.process_time()
        libp2p_rates.append(await libp2p_throughput(config, size))
        libp2p_cpu.append(size / (time.process_time() - cpu))
        cpu = time.process_time()
        tcp_rates.append(await tcp_throughput(size))
        tcp_cpu.append(size / (time.process_time() - cpu))
    libp2p_p50, libp2p_p99 = percentiles(libp2p_samples)
    tcp_p50, tcp_p99 = percentiles(tcp_samples)
    libp2p_rate, tcp_rate = max(libp2p_rates), max(tcp_rates)
    return {
        "rtt_p50_us": {
            "libp2p_tcp": libp2p_p50 * 1e6,
            "asyncio_tcp": tcp_p50 * 1e6,
            "ratio": libp2p_p50 / tcp_p50,
        },
        "rtt_p99_us": {
            "libp2p_tcp": libp2p_p99 * 1e6,
            "asyncio_tcp": tcp_p99 * 1e6,
            "ratio": libp2p_p99 / tcp_p99,
        },
        "throughput_mb_s": {
            "size_mib": size // 2**20,
            "libp2p_tcp": libp2p_rate / 1e6,
            "asyncio_tcp": tcp_rate / 1e6,
            "ratio": libp2p_rate / tcp_rate,
        },
        # Both ends run in this one process: bytes per CPU-second of sender plus receiver,
        # which other load on the machine disturbs less than the wall clock.
        "cpu_throughput_mb_s": {
            "libp2p_tcp": max(libp2p_cpu) / 1e6,
            "asyncio_tcp": max(tcp_cpu) / 1e6,
            "ratio": max(libp2p_cpu) / max(tcp_cpu),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3, help="throughput runs; best is shown")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(run(args.size_mib * 2**20, args.rounds, args.repeat))
    if args.json:
        print(json.dumps(result))
        return
    rtt50, rtt99, rate = result["rtt_p50_us"], result["rtt_p99_us"], result["throughput_mb_s"]
    print("one connection on loopback: libp2p TCP (Noise + Yamux) vs asyncio TCP")
    print(f"{'':28}{'libp2p TCP':>12}{'asyncio TCP':>14}{'ratio':>10}")
    for label, row in (("64 B round trip p50 (us)", rtt50), ("64 B round trip p99 (us)", rtt99)):
        print(f"{label:28}{row['libp2p_tcp']:12.1f}{row['asyncio_tcp']:14.1f}{row['ratio']:10.2f}")
    label = f"{rate['size_mib']} MiB one stream (MB/s)"
    print(f"{label:28}{rate['libp2p_tcp']:12.1f}{rate['asyncio_tcp']:14.1f}{rate['ratio']:10.3f}")
    cpu = result["cpu_throughput_mb_s"]
    label = "  per CPU-second (MB/s)"
    print(f"{label:28}{cpu['libp2p_tcp']:12.1f}{cpu['asyncio_tcp']:14.1f}{cpu['ratio']:10.3f}")


if __name__ == "__main__":
    main()
