"""The `lattica-ray` command: run a node, ping a peer, run the demo."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from typing import Annotated

import typer

from lattica_ray.node import DEFAULT_PROTOCOL_VERSION, Node
from transport.errors import TransportError
from transport.identity import PeerId
from transport.multiaddr import Multiaddr
from transport.nat.relay import RelayConfig

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="lattica-ray: Ray clusters bridged across NATs and firewalls.",
)
log = logging.getLogger("lattica_ray.cli")

ListenOption = Annotated[
    list[str] | None,
    typer.Option(
        "--listen", "-l", help="Multiaddr to listen on, e.g. /ip4/0.0.0.0/udp/4001/quic-v1"
    ),
]
BootstrapOption = Annotated[
    list[str] | None,
    typer.Option("--bootstrap", "-b", help="Full multiaddr of a peer to join through (repeatable)"),
]
LogLevelOption = Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING, ERROR")]


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("quic").setLevel(max(logging.WARNING, logging.getLevelName(level.upper())))


def _fail(message: str, hint: str) -> None:
    typer.echo(f"error: {message}\n  what to do: {hint}", err=True)
    raise typer.Exit(1)


@app.command()
def node(
    listen: ListenOption = None,
    bootstrap: BootstrapOption = None,
    key: Annotated[
        str | None, typer.Option("--key", help="Key file (created with mode 0600 if missing)")
    ] = None,
    protocol_version: Annotated[
        str, typer.Option(help="identify protocolVersion; Lattica peers require theirs")
    ] = DEFAULT_PROTOCOL_VERSION,
    relay: Annotated[bool, typer.Option(help="Relay circuits for NAT'd peers")] = True,
    port_mapping: Annotated[
        bool, typer.Option(help="Ask the LAN's router for a port (UPnP-IGD, NAT-PMP, PCP)")
    ] = False,
    cluster: Annotated[
        str | None, typer.Option(help="Join the signed cluster view under this cluster name")
    ] = None,
    relay_reservations: Annotated[
        int, typer.Option(help="Relay: reservations held at once")
    ] = RelayConfig().max_reservations,
    relay_circuit_bytes: Annotated[
        int, typer.Option(help="Relay: bytes per direction per circuit (0 = unlimited)")
    ] = RelayConfig().circuit_data,
    relay_circuit_seconds: Annotated[
        float, typer.Option(help="Relay: seconds per circuit (0 = unlimited)")
    ] = RelayConfig().circuit_duration,
    log_level: LogLevelOption = "INFO",
) -> None:
    """Run a standalone node (bootstrap / relay; no Ray needed) until SIGINT or SIGTERM."""
    _setup_logging(log_level)
    relay_config = RelayConfig(
        enabled=relay,
        max_reservations=relay_reservations,
        circuit_data=relay_circuit_bytes,
        circuit_duration=relay_circuit_seconds,
    )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        async with Node(
            listen=listen,
            bootstrap=bootstrap,
            key_file=key,
            protocol_version=protocol_version,
            relay=relay_config,
            port_mapping=port_mapping,
            cluster=cluster,
        ) as peer:
            print(
                json.dumps({"peer_id": str(peer.peer_id), "addrs": [str(a) for a in peer.addrs]}),
                flush=True,
            )
            await stop.wait()
            log.info("stopping on signal")

    try:
        asyncio.run(run())
    except (TransportError, ValueError) as exc:
        _fail(str(exc), "check the --listen / --bootstrap multiaddrs and the key file")


@app.command("ping")
def ping_command(
    target: Annotated[str, typer.Argument(help="Full multiaddr (.../p2p/ID) or a bare peer ID")],
    count: Annotated[int, typer.Option("--count", "-c", min=1, help="Pings to send")] = 4,
    interval: Annotated[float, typer.Option(help="Seconds between pings")] = 1.0,
    bootstrap: BootstrapOption = None,
    listen: ListenOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each answer")] = 10.0,
    log_level: LogLevelOption = "WARNING",
) -> None:
    """Ping a peer and show the round-trip time and the path (direct, holepunched, relayed)."""
    _setup_logging(log_level)
    try:
        destination: Multiaddr | PeerId = (
            Multiaddr.parse(target) if target.startswith("/") else PeerId.from_string(target)
        )
    except ValueError as exc:
        _fail(str(exc), "give a multiaddr like /ip4/1.2.3.4/udp/4001/quic-v1/p2p/12D3KooW...")
        return

    async def run() -> int:
        listen_on = listen or ["/ip4/0.0.0.0/udp/0/quic-v1"]
        failures = 0
        async with Node(listen=listen_on, bootstrap=bootstrap) as peer:
            for index in range(count):
                if index:
                    await asyncio.sleep(interval)
                try:
                    rtt = await peer.ping(destination, timeout=timeout)
                except (TransportError, TimeoutError) as exc:
                    failures += 1
                    _report_failure(index, exc, as_json)
                    continue
                remote = destination if isinstance(destination, PeerId) else destination.peer_id
                connection = peer.connection_to(remote) if remote else None
                path = connection.path if connection is not None else "unknown"
                if as_json:
                    print(
                        json.dumps({"seq": index, "rtt_ms": rtt * 1000, "path": path}), flush=True
                    )
                else:
                    print(f"seq={index} rtt={rtt * 1000:.3f} ms path={path}", flush=True)
        return failures

    failures = asyncio.run(run())
    if failures == count:
        _fail(
            f"no answer to any of {count} pings",
            "check the address and that the peer is running; behind NAT, pass --bootstrap",
        )


def _report_failure(index: int, exc: BaseException, as_json: bool) -> None:
    message = str(exc) or type(exc).__name__
    if as_json:
        print(json.dumps({"seq": index, "error": message}), flush=True)
    else:
        print(f"seq={index} error: {message}", flush=True)


AddressOption = Annotated[
    str | None,
    typer.Option(
        "--address", help="Ray cluster to use (default: $RAY_ADDRESS, else the one on this host)"
    ),
]
NamespaceOption = Annotated[
    str, typer.Option("--namespace", help="Ray namespace of the LatticaActors")
]


@app.command()
def up(
    bootstrap: BootstrapOption = None,
    cluster: Annotated[
        str | None,
        typer.Option("--cluster", "-c", help="This cluster's name in the mesh (default: hostname)"),
    ] = None,
    listen: ListenOption = None,
    address: AddressOption = None,
    namespace: NamespaceOption = "lattica_ray",
    log_level: LogLevelOption = "WARNING",
) -> None:
    """Start the LatticaActors on the local Ray cluster and join the mesh."""
    _setup_logging(log_level)
    from lattica_ray.ray.cli_commands import up as run_up

    code = run_up(
        address=address,
        bootstrap=bootstrap or [],
        cluster=cluster,
        listen=listen or [],
        namespace=namespace,
    )
    raise typer.Exit(code)


@app.command()
def down(
    address: AddressOption = None,
    namespace: NamespaceOption = "lattica_ray",
    log_level: LogLevelOption = "WARNING",
) -> None:
    """Stop the LatticaActors of the local Ray cluster (it leaves the mesh; Ray keeps running)."""
    _setup_logging(log_level)
    from lattica_ray.ray.cli_commands import down as run_down

    raise typer.Exit(run_down(address=address, namespace=namespace))


@app.command()
def status(
    address: AddressOption = None,
    namespace: NamespaceOption = "lattica_ray",
    as_json: Annotated[bool, typer.Option("--json", help="The snapshot as JSON")] = False,
    log_level: LogLevelOption = "WARNING",
) -> None:
    """The mesh as this cluster sees it: clusters, machines, resources, actors, path kinds."""
    _setup_logging(log_level)
    from lattica_ray.ray.cli_commands import status as run_status

    raise typer.Exit(run_status(address=address, namespace=namespace, as_json=as_json))


@app.command()
def demo(
    where: Annotated[
        str,
        typer.Option(
            help="auto (the NAT lab when this machine allows, else loopback), lab, loopback"
        ),
    ] = "auto",
    iterations: Annotated[int, typer.Option(min=4, help="Learning iterations")] = 15,
    log_level: LogLevelOption = "WARNING",
) -> None:
    """The main job: collaborative RL rollouts across three Ray clusters on this machine."""
    _setup_logging(log_level)
    from lattica_ray.demo import run_demo

    try:
        code = asyncio.run(run_demo(where, iterations=iterations))
    except KeyboardInterrupt:
        code = 130  # stopped at the next step; everything it started was cleaned up
    raise typer.Exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
