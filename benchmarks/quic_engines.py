"""QUIC engines alone, no sockets: MB moved per CPU-second of each side, at one datagram size.

Two sans-I/O connections of the same engine pass datagrams to each other in memory (in batches,
as the endpoint's GRO reads hand them over); each side's calls are timed on the process CPU
clock separately. This is the ceiling an engine puts on one connection, before any event loop,
socket or stream glue. Engines: aioquic (pure Python) and qh3 (Rust connection core).

    python benchmarks/quic_engines.py --size-mib 32 --datagram 1350 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import pathlib
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

# Run as a script, this directory heads sys.path and transport.py here would shadow the package.
if pathlib.Path(sys.path[0]).resolve() == pathlib.Path(__file__).resolve().parent:
    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

from transport.identity import KeyPair
from transport.tls import ALPN, make_certificate

CHUNK = 64 * 1024  # bytes the sender writes per call
WINDOW = 16 * 1024 * 1024  # receive window of both engines (bytes)
SERVER_ADDR = ("127.0.0.1", 4433)
CLIENT_ADDR = ("127.0.0.1", 4434)


@dataclass
class Side:
    """One connection and the CPU time its calls took."""

    quic: object
    cpu: float = 0.0

    def timed(self, call: Callable, *args):
        start = time.process_time()
        try:
            return call(*args)
        finally:
            self.cpu += time.process_time() - start


def _aioquic_pair(datagram: int) -> tuple[object, object]:
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    certificate, key = make_certificate(KeyPair.generate())

    def config(is_client: bool) -> QuicConfiguration:
        return QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[ALPN],
            certificate=certificate,
            private_key=key,
            verify_mode=ssl.CERT_NONE,
            max_datagram_size=datagram,
            max_data=WINDOW,
            max_stream_data=WINDOW,
        )

    client = QuicConnection(configuration=config(True))
    server = QuicConnection(
        configuration=config(False),
        original_destination_connection_id=client.original_destination_connection_id,
    )
    return client, server


def _qh3_pair(datagram: int) -> tuple[object, object]:
    from qh3.quic.connection import QuicConnection

    from transport.quic.engine_qh3 import qh3_configuration

    certificate, key = make_certificate(KeyPair.generate())

    def config(is_client: bool):
        return qh3_configuration(
            is_client=is_client,
            certificate=certificate,
            private_key=key,
            alpn=ALPN,
            idle_timeout=30.0,
            max_datagram_size=datagram,
            probe_datagram_size=False,
            max_data=WINDOW,
            max_stream_data=WINDOW,
            connection_id_length=8,
            supported_versions=[1],
        )

    client = QuicConnection(configuration=config(True))
    server = QuicConnection(
        configuration=config(False),
        original_destination_connection_id=client.original_destination_connection_id,
    )
    return client, server


ENGINES = {"aioquic": _aioquic_pair, "qh3": _qh3_pair}


def _deliver(sender: Side, receiver: Side, now: float, batched: bool) -> int:
    """Move what `sender` has to send into `receiver`; the number of datagrams moved."""
    datagrams = sender.timed(sender.quic.datagrams_to_send, now)
    if not datagrams:
        return 0
    receive_many = getattr(receiver.quic, "receive_many_datagrams", None)
    if batched and receive_many is not None:
        receiver.timed(receive_many, [data for data, _ in datagrams], datagrams[0][1], now)
    else:
        for data, addr in datagrams:
            receiver.timed(receiver.quic.receive_datagram, data, addr, now)
    return len(datagrams)


def run_engine(name: str, size: int, datagram: int) -> dict:
    """Send `size` bytes on one stream from client to server; CPU time of each side."""
    client_quic, server_quic = ENGINES[name](datagram)
    client, server = Side(client_quic), Side(server_quic)
    now = 0.0
    client.timed(client.quic.connect, SERVER_ADDR, now)
    for _ in range(20):  # the handshake
        _deliver(client, server, now, batched=False)
        _deliver(server, client, now, batched=False)
        now += 0.001
    client.cpu = server.cpu = 0.0
    stream_id = client.quic.get_next_available_stream_id()
    payload = bytes(CHUNK)
    sent = received = 0
    datagrams = 0
    stalls = 0
    while received < size:
        while sent < size and sent - received < WINDOW // 2:
            n = min(CHUNK, size - sent)
            sent += n
            client.timed(client.quic.send_stream_data, stream_id, payload[:n], sent >= size)
        moved = _deliver(client, server, now, batched=True)
        datagrams += moved
        while (event := server.quic.next_event()) is not None:
            data = getattr(event, "data", None)
            if data is not None:
                received += len(data)
        _deliver(server, client, now, batched=True)
        while client.quic.next_event() is not None:
            pass
        now += 0.0002
        if moved == 0:  # paced or waiting for ACKs: let time pass and fire timers
            stalls += 1
            if stalls > 100_000:
                raise RuntimeError(f"{name}: stalled at {received} of {size} bytes")
            for side in (client, server):
                timer = side.quic.get_timer()
                if timer is not None and timer <= now:
                    side.timed(side.quic.handle_timer, now)
    mb = size / 1e6
    return {
        "engine": name,
        "datagram": datagram,
        "mib": size / 2**20,
        "datagrams": datagrams,
        "sender_cpu_s": round(client.cpu, 3),
        "receiver_cpu_s": round(server.cpu, 3),
        "sender_mb_per_cpu_s": round(mb / client.cpu, 1),
        "receiver_mb_per_cpu_s": round(mb / server.cpu, 1),
        "us_per_datagram_sent": round(client.cpu / datagrams * 1e6, 2),
        "us_per_datagram_received": round(server.cpu / datagrams * 1e6, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=32)
    parser.add_argument("--datagram", type=int, default=1350)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--engines", default="aioquic,qh3")
    args = parser.parse_args()
    size = args.size_mib * 2**20
    results: dict[str, list[dict]] = {}
    for round_ in range(args.repeat):
        for name in args.engines.split(","):
            result = run_engine(name, size, args.datagram)
            results.setdefault(name, []).append(result)
            print(json.dumps({"round": round_ + 1, **result}), flush=True)
    if {"aioquic", "qh3"} <= results.keys():
        for key in ("sender_mb_per_cpu_s", "receiver_mb_per_cpu_s"):
            ratios = [
                q[key] / a[key] for a, q in zip(results["aioquic"], results["qh3"], strict=True)
            ]
            print(f"qh3 / aioquic {key}: " + ", ".join(f"{r:.1f}x" for r in ratios))


if __name__ == "__main__":
    main()
