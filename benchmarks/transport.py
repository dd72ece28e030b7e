"""One QUIC connection on loopback against asyncio TCP on loopback, measured in the same run.

    python benchmarks/transport.py [--size-mib 64] [--rounds 2000] [--datagram 1350] [--repeat 3]
                                   [--stripes 1,2] [--sdk] [--json]

Prints small-message round-trip p50/p99 and bulk throughput over one stream for both, and the
ratios (QUIC / TCP), by the wall clock and per CPU-second (both ends run in this process, so
that is sender plus receiver). The machines are noisy: read the ratios, and the CPU figures.
Also the ceiling of aioquic's engine alone at that datagram size (two state machines passing
datagrams in memory: no sockets, no event loop, no glue), per side.

`--stripes N,...` also measures one transfer striped over N QUIC connections, each served by
its own sender process and receiver process, the payload shared through shared memory (the
prototype of spreading a big transfer over cores; 1 = one connection, sender and receiver in
two processes). `--sdk` also measures the `lattica` SDK (rust-libp2p on quinn, two processes
in a private network namespace: see benchmarks/lattica_sdk.py) in the same run, and prints each
QUIC figure as a fraction of the SDK's best `call_stream` (the two-process QUIC rows, `--stripes
1`, are the like-for-like ones).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import pathlib
import sys
import time
from multiprocessing import shared_memory

# Run as a script, this directory heads sys.path and this file would shadow the package.
if pathlib.Path(sys.path[0]).resolve() == pathlib.Path(__file__).resolve().parent:
    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # the repo: `benchmarks.*`

from aioquic.buffer import Buffer
from aioquic.quic.events import StreamDataReceived
from aioquic.quic.packet import pull_quic_header

from benchmarks.baselines import (
    CHUNK,
    percentiles,
    stream_rtt,
    tcp_rtt,
    tcp_throughput,
)
from transport.identity import KeyPair
from transport.quic import QuicConfig, QuicEndpoint
from transport.quic.endpoint import CONNECTION_ID_LENGTH
from transport.quic.glue import Libp2pQuicConnection
from transport.stream import Stream

STRIPE_TIMEOUT = 300.0


async def _quic_pair(config: QuicConfig) -> tuple[QuicEndpoint, QuicEndpoint, asyncio.Queue]:
    inbound: asyncio.Queue[Stream] = asyncio.Queue()

    def on_server_connection(connection) -> None:
        connection.set_inbound_stream_callback(inbound.put_nowait)

    client = QuicEndpoint(KeyPair.generate(), config)
    server = QuicEndpoint(KeyPair.generate(), config, on_server_connection)
    await client.listen("127.0.0.1")
    await server.listen("127.0.0.1")
    return client, server, inbound


async def quic_rtt(config: QuicConfig, rounds: int) -> list[float]:
    client, server, inbound = await _quic_pair(config)
    try:
        connection = await client.dial(server.local_address, server.key.peer_id)
        stream = await connection.open_stream()
        return await stream_rtt(stream, inbound, rounds)
    finally:
        await client.close()
        await server.close()


async def quic_throughput(config: QuicConfig, size: int) -> tuple[float, int]:
    """Bytes per second over one stream, and the datagram size the sender ended with."""
    client, server, inbound = await _quic_pair(config)
    try:
        connection = await client.dial(server.local_address, server.key.peer_id)
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
        return size / elapsed, connection.quic.max_datagram_size
    finally:
        await client.close()
        await server.close()


# -- the engine alone -------------------------------------------------------------------------
def engine_ceiling(datagram: int, size: int) -> dict[str, float]:
    """MB per CPU-second of aioquic's state machines alone: no sockets, no event loop, no glue.

    A client and a server `Libp2pQuicConnection` hand each other datagrams in memory while
    the client sends `size` bytes on one stream; the sender's side counts building packets
    and reading ACKs, the receiver's reading packets and building ACKs. No glue around this
    engine can move one connection faster than the slower side.
    """
    config = QuicConfig(max_datagram_size=datagram, pmtu_probing=False)
    client_end = QuicEndpoint(KeyPair.generate(), config)
    server_end = QuicEndpoint(KeyPair.generate(), config)

    def engine(endpoint: QuicEndpoint, is_client: bool, **extra: object) -> Libp2pQuicConnection:
        return Libp2pQuicConnection(
            configuration=endpoint._configuration(is_client),
            stream_window=config.stream_window,
            connection_window=config.connection_window,
            max_streams=config.max_streams,
            **extra,
        )

    now, client_address, server_address = 1000.0, ("127.0.0.1", 1), ("127.0.0.1", 2)
    client = engine(client_end, True)
    client.connect(server_address, now)
    first = client.datagrams_to_send(now)
    header = pull_quic_header(Buffer(data=first[0][0]), host_cid_length=CONNECTION_ID_LENGTH)
    server = engine(server_end, False, original_destination_connection_id=header.destination_cid)
    for data, _ in first:
        server.receive_datagram(data, client_address, now)
    for _ in range(10):  # the handshake
        for source, target, address in (
            (server, client, server_address),
            (client, server, client_address),
        ):
            for data, _ in source.datagrams_to_send(now):
                target.receive_datagram(data, address, now)
    while client.next_event() or server.next_event():
        pass
    stream_id = client.get_next_available_stream_id()
    block = bytes(256 * 1024)
    sent = received = 0
    sender_cpu = receiver_cpu = 0.0
    while received < size:
        if sent < size and client.send_buffer_size(stream_id) < config.send_buffer_high_water:
            client.send_stream_data(stream_id, block)
            sent += len(block)
        started = time.process_time()
        datagrams = client.datagrams_to_send(now)
        built = time.process_time()
        for data, _ in datagrams:
            server.receive_datagram(data, client_address, now)
        while (event := server.next_event()) is not None:
            if isinstance(event, StreamDataReceived):
                received += len(event.data)
                server.consume(stream_id, len(event.data))
        acks = server.datagrams_to_send(now)
        read = time.process_time()
        for data, _ in acks:
            client.receive_datagram(data, server_address, now)
        while client.next_event() is not None:
            pass
        done = time.process_time()
        sender_cpu += (built - started) + (done - read)
        receiver_cpu += read - built
        now += 0.0002
    return {"sender": size / sender_cpu / 1e6, "receiver": size / receiver_cpu / 1e6}


def _stripe_receiver(key: bytes, config: str, memory: str, span: tuple[int, int], pipe) -> None:
    asyncio.run(_receive_stripe(KeyPair.from_protobuf(key), config, memory, span, pipe))


async def _receive_stripe(key: KeyPair, config: str, memory: str, span: tuple[int, int], pipe):
    """Listen, tell the parent the port, write what arrives at `span` of the shared output."""
    inbound: asyncio.Queue[Stream] = asyncio.Queue()
    endpoint = QuicEndpoint(
        key,
        QuicConfig.model_validate_json(config),
        lambda connection: connection.set_inbound_stream_callback(inbound.put_nowait),
    )
    output = shared_memory.SharedMemory(name=memory)
    try:
        address = await endpoint.listen("127.0.0.1")
        pipe.send(address)
        stream = await inbound.get()
        cpu = time.process_time()
        start, stop = span
        view = output.buf
        while data := await stream.read(CHUNK):
            view[start : start + len(data)] = data
            start += len(data)
        del view
        await stream.close()
        pipe.send((time.perf_counter(), time.process_time() - cpu, start == stop))
        await asyncio.get_running_loop().run_in_executor(None, pipe.recv)  # bye
        await endpoint.close()
    finally:
        output.close()


def _stripe_sender(key: bytes, config: str, memory: str, span: tuple[int, int], pipe) -> None:
    asyncio.run(_send_stripe(KeyPair.from_protobuf(key), config, memory, span, pipe))


async def _send_stripe(key: KeyPair, config: str, memory: str, span: tuple[int, int], pipe):
    """Dial the receiver the parent names, wait for "go", send `span` of the shared input."""
    endpoint = QuicEndpoint(key, QuicConfig.model_validate_json(config))
    payload = shared_memory.SharedMemory(name=memory)
    try:
        await endpoint.listen("127.0.0.1")
        address, server = pipe.recv()
        connection = await endpoint.dial(tuple(address), server)
        stream = await connection.open_stream()
        pipe.send("ready")
        pipe.recv()  # go
        cpu = time.process_time()
        view = payload.buf
        for offset in range(span[0], span[1], CHUNK):
            await stream.write(view[offset : min(offset + CHUNK, span[1])])
        await stream.close()
        del view
        await stream.read()  # the receiver closes once it has everything
        pipe.send(time.process_time() - cpu)
        await endpoint.close()
    finally:
        payload.close()


def striped_throughput(config: QuicConfig, size: int, stripes: int) -> tuple[float, float]:
    """(bytes per second, bytes per CPU-second of all processes) of one striped transfer."""
    context = multiprocessing.get_context("spawn")
    source = shared_memory.SharedMemory(create=True, size=size)
    target = shared_memory.SharedMemory(create=True, size=size)
    processes, pipes = [], []
    try:
        source.buf[:size] = os.urandom(size)
        client_key, server_key = KeyPair.generate(), KeyPair.generate()
        spans = [(size * i // stripes, size * (i + 1) // stripes) for i in range(stripes)]
        for span in spans:
            receiver_end, receiver_pipe = context.Pipe()
            sender_end, sender_pipe = context.Pipe()
            for target_function, key, memory, pipe in (
                (_stripe_receiver, server_key, target.name, receiver_pipe),
                (_stripe_sender, client_key, source.name, sender_pipe),
            ):
                process = context.Process(
                    target=target_function,
                    args=(key.to_protobuf(), config.model_dump_json(), memory, span, pipe),
                    daemon=True,
                )
                process.start()
                processes.append(process)
            sender_end.send((receiver_end.recv(), server_key.peer_id))
            pipes.append((receiver_end, sender_end))
        for _, sender_end in pipes:
            assert sender_end.recv() == "ready"
        started = time.perf_counter()
        for _, sender_end in pipes:
            sender_end.send("go")
        finished, cpu = [], 0.0
        for receiver_end, sender_end in pipes:
            if not receiver_end.poll(STRIPE_TIMEOUT) or not sender_end.poll(STRIPE_TIMEOUT):
                raise TimeoutError(f"a striped transfer took over {STRIPE_TIMEOUT} s")
            done_at, receiver_cpu, complete = receiver_end.recv()
            assert complete
            finished.append(done_at)
            cpu += receiver_cpu + sender_end.recv()
        for receiver_end, _ in pipes:
            receiver_end.send("bye")
        assert bytes(target.buf[:size]) == bytes(source.buf[:size])
        return size / (max(finished) - started), size / cpu
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        for memory in (source, target):
            memory.close()
            memory.unlink()


async def run(
    size: int,
    rounds: int,
    datagram: int,
    repeat: int,
    stripes: list[int] | None = None,
    engine: str | None = None,
) -> dict:
    config = QuicConfig(max_datagram_size=datagram)
    if engine is not None:
        config = config.model_copy(update={"engine": engine})
    quic_samples = await quic_rtt(config, rounds)
    fixed_samples = await quic_rtt(config.model_copy(update={"pmtu_probing": False}), rounds)
    tcp_samples = await tcp_rtt(rounds)
    variants = {
        f"{datagram} B datagrams": config.model_copy(update={"pmtu_probing": False}),
        "path MTU probed": config,
    }
    rates: dict[str, list[float]] = {label: [] for label in [*variants, "tcp"]}
    cpu_rates: dict[str, list[float]] = {label: [] for label in rates}
    sizes: dict[str, int] = {}
    for _ in range(repeat):  # interleaved, so every variant sees the same machine load
        for label, variant in variants.items():
            cpu = time.process_time()
            rate, sizes[label] = await quic_throughput(variant, size)
            rates[label].append(rate)
            cpu_rates[label].append(size / (time.process_time() - cpu))
        cpu = time.process_time()
        rates["tcp"].append(await tcp_throughput(size))
        cpu_rates["tcp"].append(size / (time.process_time() - cpu))
    quic_p50, quic_p99 = percentiles(quic_samples)
    fixed_p50, _ = percentiles(fixed_samples)
    tcp_p50, tcp_p99 = percentiles(tcp_samples)
    tcp_rate, tcp_cpu = max(rates["tcp"]), max(cpu_rates["tcp"])
    engine = engine_ceiling(datagram, min(size, 32 * 2**20))
    striped: dict[str, dict[str, float]] = {}
    for count in stripes or []:
        for label, variant in variants.items():
            runs = [striped_throughput(variant, size, count) for _ in range(repeat)]
            striped[f"{count} x ({label})"] = {
                "stripes": count,
                "quic": max(rate for rate, _ in runs) / 1e6,
                "quic_per_cpu_s": max(cpu for _, cpu in runs) / 1e6,
                "ratio": max(rate for rate, _ in runs) / tcp_rate,
            }
    return {
        "datagram_size": datagram,
        "rtt_p50_us": {"quic": quic_p50 * 1e6, "tcp": tcp_p50 * 1e6, "ratio": quic_p50 / tcp_p50},
        "rtt_p99_us": {"quic": quic_p99 * 1e6, "tcp": tcp_p99 * 1e6, "ratio": quic_p99 / tcp_p99},
        # qh3 paces each datagram of a new connection as if it had the probed size: measured
        # apart, at the fixed size.
        "rtt_p50_us_fixed_datagrams": {
            "quic": fixed_p50 * 1e6,
            "tcp": tcp_p50 * 1e6,
            "ratio": fixed_p50 / tcp_p50,
        },
        "size_mib": size // 2**20,
        # Both ends run in this one process: per CPU-second counts sender plus receiver, and
        # other load on the machine disturbs it less than the wall clock.
        "throughput_mb_s": {
            label: {
                "datagram_size": sizes[label],
                "quic": max(rates[label]) / 1e6,
                "tcp": tcp_rate / 1e6,
                "ratio": max(rates[label]) / tcp_rate,
                "quic_per_cpu_s": max(cpu_rates[label]) / 1e6,
                "tcp_per_cpu_s": tcp_cpu / 1e6,
                "ratio_per_cpu_s": max(cpu_rates[label]) / tcp_cpu,
            }
            for label in variants
        },
        "striped_mb_s": striped,
        "engine_alone_mb_per_cpu_s": engine,
    }


def _sdk_figures(size: int) -> dict:
    """The lattica SDK's QUIC figures, or the reason they could not be measured here."""
    from benchmarks.lattica_sdk import LatticaUnavailable, NetnsUnavailable, measure_lattica_sdk

    try:
        figures = measure_lattica_sdk(transports=("quic",), payload=size, unary_count=1000)
    except (LatticaUnavailable, NetnsUnavailable, RuntimeError) as exc:
        return {"unavailable": str(exc)}
    quic = figures["transports"]["quic"]
    return {
        "call_stream_upload_mb_s": quic["call_stream_upload_mb_s"],
        "call_stream_download_mb_s": quic["call_stream_download_mb_s"],
        "best_call_stream_mb_s": figures["best_call_stream_mb_s"],
        "unary_100B_p50_us": quic["unary_100B_p50_s"] * 1e6,
    }


def _print_sdk(result: dict, sdk: dict) -> None:
    if "unavailable" in sdk:
        print(f"lattica SDK not measured: {sdk['unavailable']}")
        return
    best = sdk["best_call_stream_mb_s"]
    print(
        f"lattica SDK (quinn) call_stream upload {sdk['call_stream_upload_mb_s']:.1f} MB/s, "
        f"download {sdk['call_stream_download_mb_s']:.1f} MB/s; 100 B unary p50 "
        f"{sdk['unary_100B_p50_us']:.0f} us"
    )
    rows = {f"one process, {k}": v for k, v in result["throughput_mb_s"].items()}
    rows.update({f"striped {k}": v for k, v in result["striped_mb_s"].items()})
    for label, row in rows.items():
        print(f"  {label:58} {row['quic']:8.1f} MB/s = {row['quic'] / best:5.2f} x SDK best")


def result_tcp(result: dict) -> float:
    return next(iter(result["throughput_mb_s"].values()))["tcp"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--datagram", type=int, default=1350, help="QUIC max datagram size")
    parser.add_argument("--repeat", type=int, default=3, help="throughput runs; best is shown")
    parser.add_argument(
        "--stripes",
        default="",
        help="comma-separated connection counts for the striped multi-process transfer",
    )
    parser.add_argument("--sdk", action="store_true", help="also measure the lattica SDK")
    parser.add_argument("--engine", choices=["aioquic", "qh3"], help="QUIC engine (QuicConfig's)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    stripes = [int(count) for count in args.stripes.split(",") if count]
    if args.sdk and 1 not in stripes:
        stripes.insert(0, 1)
    result = asyncio.run(
        run(args.size_mib * 2**20, args.rounds, args.datagram, args.repeat, stripes, args.engine)
    )
    if args.sdk:
        result["sdk"] = _sdk_figures(args.size_mib * 2**20)
    if args.json:
        print(json.dumps(result))
        return
    rtt50, rtt99 = result["rtt_p50_us"], result["rtt_p99_us"]
    engine_name = args.engine or QuicConfig().engine
    print(
        f"QUIC engine {engine_name}; one connection on loopback, best of {args.repeat} "
        "(wall clock, and per CPU-second)"
    )
    print(f"{'':44}{'QUIC':>10}{'asyncio TCP':>13}{'QUIC/TCP':>10}")
    rtt_fixed = result["rtt_p50_us_fixed_datagrams"]
    for label, row in (
        ("64 B round trip p50 (us)", rtt50),
        ("64 B round trip p99 (us)", rtt99),
        (f"64 B round trip p50, {args.datagram} B, no probing (us)", rtt_fixed),
    ):
        print(f"{label:44}{row['quic']:10.1f}{row['tcp']:13.1f}{row['ratio']:10.2f}")
    for variant, row in result["throughput_mb_s"].items():
        ending = f"{row['datagram_size']} B datagrams at the end"
        print(f"{result['size_mib']} MiB one stream, {variant} ({ending})")
        label = "  MB/s"
        print(f"{label:44}{row['quic']:10.1f}{row['tcp']:13.1f}{row['ratio']:10.3f}")
        label = "  per CPU-second (MB/s)"
        print(
            f"{label:44}{row['quic_per_cpu_s']:10.1f}{row['tcp_per_cpu_s']:13.1f}"
            f"{row['ratio_per_cpu_s']:10.3f}"
        )
    engine = result["engine_alone_mb_per_cpu_s"]
    print(
        f"aioquic engine alone at {result['datagram_size']} B (no sockets, no loop, no glue): "
        f"sender {engine['sender']:.0f}, receiver {engine['receiver']:.0f} MB per CPU-second"
    )
    for variant, row in result["striped_mb_s"].items():
        print(f"{result['size_mib']} MiB striped, {variant}: one process per end of each")
        label = "  MB/s (per CPU-second of all processes)"
        print(
            f"{label:44}{row['quic']:10.1f}{result_tcp(result):13.1f}{row['ratio']:10.3f}"
            f"  ({row['quic_per_cpu_s']:.1f})"
        )
    sdk = result.get("sdk")
    if sdk is not None:
        _print_sdk(result, sdk)


if __name__ == "__main__":
    main()
