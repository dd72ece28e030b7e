"""A mesh member without Ray: a public bootstrap, relay and view/DHT peer for NAT'd clusters.

A bare `lattica-ray node` relays and answers identify and ping, but carries no DHT or cluster
view; clusters that meet only through it could not find each other's actors or objects. This
one runs the same services a LatticaActor runs (`NodeMesh`), so clusters behind NATs bootstrap
through it, sync the view and the object directory through it, and relay through it until
hole punching gives them a direct path.

    python -m lattica_ray.ray.mesh_node --listen /ip4/198.51.100.10/udp/4001/quic-v1

It prints one JSON line {"peer_id", "addrs"} once it listens, and stops on SIGTERM, SIGINT or
end of stdin.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

from lattica_ray.ray.config import LatticaConfig
from lattica_ray.ray.mesh import NodeMesh
from transport.nat.relay import RelayConfig

logger = logging.getLogger(__name__)

RELAY_CLUSTER = "relay"


def mesh_node(
    listen: list[str],
    *,
    cluster: str = RELAY_CLUSTER,
    bootstrap: list[str] | None = None,
    key_file: str | None = None,
    circuit_bytes: int = 0,
    circuit_seconds: float = 0.0,
) -> NodeMesh:
    """A mesh node (start()/stop() it): RPC, DHT, view, and a relay whose circuits are
    limited to `circuit_bytes` per direction and `circuit_seconds` (0: no limit)."""
    config = LatticaConfig(cluster=cluster, listen=tuple(listen), bootstrap=tuple(bootstrap or ()))
    relay = RelayConfig(circuit_data=circuit_bytes, circuit_duration=circuit_seconds)
    return NodeMesh(config, key_file, relay=relay)


async def serve(listen: list[str], stop: asyncio.Event, **options: Any) -> None:
    """Run a mesh node until `stop` is set; print {"peer_id", "addrs"} once it listens."""
    node = mesh_node(listen, **options)
    await node.start()
    try:
        print(json.dumps({"peer_id": node.peer_id, "addrs": node.addrs}), flush=True)
        await stop.wait()
    finally:
        await node.stop()


@contextlib.contextmanager
def running_mesh_node(
    listen: str,
    *,
    netns: str | None = None,
    cluster: str = RELAY_CLUSTER,
    key_file: str | None = None,
) -> Iterator[str]:
    """Run a mesh node in a child process (inside network namespace `netns`, if given) and
    yield its first address; on exit it leaves the mesh and is waited for (killed if stuck)."""
    from lattica_ray.ray.clusters import child_env, netns_prefix

    argv = [sys.executable, "-m", __name__, "--listen", listen, "--cluster", cluster]
    if key_file is not None:
        argv += ["--key", key_file]
    process = subprocess.Popen(
        [*netns_prefix(netns), *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=child_env({}),
        text=True,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"the mesh node ({' '.join(argv)}) exited before it listened")
        yield json.loads(line)["addrs"][0]
    finally:
        if process.stdin is not None:
            process.stdin.close()  # end of stdin: it leaves the mesh and exits
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", action="append", required=True)
    parser.add_argument("--bootstrap", action="append", default=[])
    parser.add_argument("--cluster", default=RELAY_CLUSTER)
    parser.add_argument("--key", default=None, help="key file (created if missing)")
    parser.add_argument("--circuit-bytes", type=int, default=0, help="per circuit; 0: no limit")
    parser.add_argument("--circuit-seconds", type=float, default=0.0, help="0: no limit")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        if not sys.stdin.isatty():
            loop.add_reader(sys.stdin.fileno(), lambda: sys.stdin.read(1) or stop.set())
        await serve(
            args.listen,
            stop,
            cluster=args.cluster,
            bootstrap=args.bootstrap,
            key_file=args.key,
            circuit_bytes=args.circuit_bytes,
            circuit_seconds=args.circuit_seconds,
        )

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
