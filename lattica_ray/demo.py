"""`lattica-ray demo`: what the mesh does, end to end, on this machine.

For now a loopback demo of the transport: a bootstrap node and a peer join, authenticate with
libp2p TLS, identify each other (each learns the address the other saw), ping, and stream
32 MiB over one QUIC stream. It grows into the cross-cluster Ray demo as the layers land.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from lattica_ray.node import Node
from transport.stream import Stream

DEMO_PROTOCOL = "/lattica-ray/demo-sink/1"
PAYLOAD = 32 * 1024 * 1024
CHUNK = 1024 * 1024


async def _sink(stream: Stream) -> None:
    received = 0
    while chunk := await stream.read(CHUNK):
        received += len(chunk)
    await stream.write_message(str(received).encode())
    await stream.close()


async def run_demo() -> int:
    console = Console()
    loopback = ["/ip4/127.0.0.1/udp/0/quic-v1"]
    console.rule("lattica-ray demo: two nodes on loopback")
    async with Node(listen=loopback) as bootstrap:
        bootstrap.set_stream_handler(DEMO_PROTOCOL, _sink)
        console.print(f"bootstrap node  [bold]{bootstrap.peer_id}[/]  {bootstrap.addrs[0]}")
        async with Node(listen=loopback, bootstrap=[str(bootstrap.addrs[0])]) as peer:
            console.print(f"peer node       [bold]{peer.peer_id}[/]  {peer.addrs[0]}")
            info = peer.identify_info(bootstrap.peer_id)
            table = Table(title="identify (as the peer sees the bootstrap node)")
            table.add_column("field")
            table.add_column("value")
            if info is not None:
                table.add_row("agent", info.agent_version)
                table.add_row("protocol version", info.protocol_version)
                table.add_row("protocols", ", ".join(info.protocols))
                table.add_row("our address as it saw it", str(info.observed_addr))
            console.print(table)
            rtts = [await peer.ping(bootstrap.peer_id) * 1000 for _ in range(5)]
            path = peer.connection_to(bootstrap.peer_id)
            console.print(
                f"ping x5: min {min(rtts):.2f} ms, max {max(rtts):.2f} ms, "
                f"path {path.path if path else '?'}"
            )
            stream = await peer.open_stream(bootstrap.peer_id, [DEMO_PROTOCOL])
            started = time.perf_counter()
            block = bytes(CHUNK)
            for _ in range(PAYLOAD // CHUNK):
                await stream.write(block)
            await stream.close()
            confirmed = int(await stream.read_message())
            seconds = time.perf_counter() - started
            console.print(
                f"streamed {confirmed / 2**20:.0f} MiB over one QUIC stream in {seconds:.2f} s "
                f"({confirmed / seconds / 1e6:.1f} MB/s)"
            )
            if confirmed != PAYLOAD:
                console.print("[red]the sink received a different byte count[/]")
                return 1
    console.rule("done: both nodes stopped")
    return 0
