"""Our Node against the lattica SDK (rust-libp2p), both directions, over one transport.

`--transport quic` (QUIC-v1, libp2p TLS) or `--transport tcp` (Noise + Yamux). Ours dials theirs,
then theirs dials ours; each way: the connection (peer IDs from the handshake), identify both
ways (protocolVersion, agent, listen and observed addresses), ping both ways, and the connection
still up at the end (the SDK drops peers whose identify it rejects). Then: our node with another
protocolVersion, which the SDK must drop; a dial to /p2p/X that reaches the SDK node; and the
`lattica-ray node` / `lattica-ray ping` CLI against the SDK. When our node cannot listen on the
transport yet, the verdict says so (`unsupported`) and the test skips.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
from pathlib import Path

from scenario_lib import LatticaPeer, Verdict, bare, run

from lattica_ray.node import Node
from transport.errors import DialError, TransportError
from transport.host import ConnectionEvent, PeerDisconnected
from transport.identity import KeyPair, PeerId
from transport.stream import Stream

LISTEN = {"quic": "/ip4/127.0.0.1/udp/0/quic-v1", "tcp": "/ip4/127.0.0.1/tcp/0"}
PROTOCOL_VERSION = "/lattica/1.0.0"
BITSWAP = "/ipfs/bitswap/1.2.0"


async def drain_bitswap(stream: Stream) -> None:
    """Take the SDK's bitswap messages (its opening, empty wantlist) and drop them."""
    with contextlib.suppress(TransportError):
        await stream.read_to_end(4 << 20)
    await stream.close()


def our_node(transport: str, protocol_version: str = PROTOCOL_VERSION) -> Node:
    """Our node on `transport`, also accepting the SDK's bitswap stream.

    The SDK's bitswap client (beetswap) opens a stream to every peer it connects to and, when
    the peer refuses `/ipfs/bitswap/1.2.0`, retries at once, in a loop: usually it gives up
    within half a second, but in about one connection in forty it went on at ~900 streams/s for
    10 s and more, and the SDK then did not process our identify. Draining the stream avoids it.
    """
    node = Node(listen=[LISTEN[transport]], protocol_version=protocol_version)
    node.set_stream_handler(BITSWAP, drain_bitswap)
    return node


def observed_ok(transport: str, observed: str | None, listen_addr: str, dialer: bool) -> bool:
    """Is `observed` what the remote should have seen of a peer that listens on `listen_addr`?

    QUIC peers (ours and quinn alike) dial from their one listening UDP socket, so the remote sees
    the listen address either way. Over TCP a dialer uses an ephemeral port (neither side reuses
    the listen port), so only the IP and the transport are known in advance.
    """
    if transport == "quic" or not dialer:
        return observed == listen_addr
    return observed is not None and observed.startswith("/ip4/127.0.0.1/tcp/")


def check_identify_from_lattica(
    verdict: Verdict,
    way: str,
    transport: str,
    node: Node,
    lattica: LatticaPeer,
    peer: PeerId,
    we_dialled: bool,
) -> None:
    """What our node learnt from the SDK's identify."""
    info = node.identify_info(peer)
    if not verdict.check(f"{way}: we got the SDK's identify", info is not None):
        return
    assert info is not None
    verdict.check(
        f"{way}: SDK's protocolVersion",
        info.protocol_version == PROTOCOL_VERSION,
        got=info.protocol_version,
    )
    verdict.check(
        f"{way}: SDK's agent",
        info.agent_version.startswith("rust-libp2p/"),
        got=info.agent_version,
    )
    listen = [str(addr) for addr in info.listen_addrs]
    want = bare(lattica.addr(transport))
    verdict.check(f"{way}: SDK's listen addrs", want in listen, got=listen, want=want)
    ours = bare(str(node.addrs[0]))
    got = None if info.observed_addr is None else str(info.observed_addr)
    verdict.check(
        f"{way}: SDK observed us",
        observed_ok(transport, got, ours, dialer=we_dialled),
        got=got,
        our_listen_addr=ours,
    )
    verdict.check(
        f"{way}: SDK speaks ping and identify",
        {"/ipfs/ping/1.0.0", "/ipfs/id/1.0.0"} <= set(info.protocols),
        got=info.protocols,
    )


def check_identify_at_lattica(
    verdict: Verdict,
    way: str,
    transport: str,
    node: Node,
    lattica: LatticaPeer,
    seen: dict,
    we_dialled: bool,
) -> None:
    """What the SDK learnt from our identify (its address book and its debug log)."""
    verdict.check(
        f"{way}: SDK got our protocolVersion",
        seen.get("protocol_version") == node.protocol_version,
        got=seen.get("protocol_version"),
    )
    verdict.check(
        f"{way}: SDK got our agent",
        seen.get("agent_version") == node.agent_version,
        got=seen.get("agent_version"),
    )
    ours = bare(str(node.addrs[0]))
    verdict.check(
        f"{way}: SDK got our listen addrs",
        ours in (seen.get("listen_addrs") or []),
        got=seen.get("listen_addrs"),
        want=ours,
    )
    theirs = bare(lattica.addr(transport))
    verdict.check(
        f"{way}: we observed the SDK",
        observed_ok(transport, seen.get("observed_addr"), theirs, dialer=not we_dialled),
        got=seen.get("observed_addr"),
        sdk_listen_addr=theirs,
    )


async def check_pings(
    verdict: Verdict, way: str, node: Node, lattica: LatticaPeer, peer: PeerId
) -> None:
    rtt = await node.ping(peer)
    verdict.check(f"{way}: our ping to the SDK", 0 < rtt < 1.0, rtt_s=rtt)
    theirs = await asyncio.to_thread(lattica.command, "ping", peer=str(node.peer_id))
    verdict.check(f"{way}: the SDK's ping to us", 0 < theirs["rtt_s"] < 1.0, rtt_s=theirs["rtt_s"])
    info = await asyncio.to_thread(lattica.command, "peer_info", peer=str(node.peer_id))
    verdict.check(
        f"{way}: still connected after identify and ping",
        info["connected"] and node.connection_to(peer) is not None,
        sdk_says=info["connected"],
    )


def start_lattica(args: argparse.Namespace, **options: object) -> LatticaPeer:
    return LatticaPeer(
        args.lattica_python, listen=[LISTEN[args.transport]], log=sys.stderr, **options
    )


async def our_node_listens(args: argparse.Namespace, verdict: Verdict) -> None:
    """Can our node listen on this transport at all? If not, the rest is unsupported."""
    try:
        async with our_node(args.transport):
            pass
    except DialError as exc:
        verdict.unsupported = f"our node cannot listen on {args.transport}: {exc}"


async def we_dial_them(args: argparse.Namespace, verdict: Verdict) -> None:
    way, transport = "ours->theirs", args.transport
    lattica = await asyncio.to_thread(start_lattica, args)
    try:
        async with our_node(transport) as node:
            peer = await node.connect(lattica.addr(transport))
            verdict.check(f"{way}: connect", str(peer) == lattica.peer_id, got=str(peer))
            check_identify_from_lattica(verdict, way, transport, node, lattica, peer, True)
            seen = await asyncio.to_thread(lattica.command, "wait_peer", peer=str(node.peer_id))
            check_identify_at_lattica(verdict, way, transport, node, lattica, seen, True)
            await check_pings(verdict, way, node, lattica, peer)
    finally:
        await asyncio.to_thread(lattica.close)


async def they_dial_us(args: argparse.Namespace, verdict: Verdict) -> None:
    way, transport = "theirs->ours", args.transport
    async with our_node(transport) as node:
        our_addr = str(node.addrs[0])
        lattica = await asyncio.to_thread(start_lattica, args, bootstrap=[our_addr])
        try:
            dialled = await asyncio.to_thread(lattica.command, "dial", addr=our_addr)
            verdict.check(
                f"{way}: connect", dialled["via"].startswith(bare(our_addr)), via=dialled["via"]
            )
            seen = await asyncio.to_thread(lattica.command, "wait_peer", peer=str(node.peer_id))
            check_identify_at_lattica(verdict, way, transport, node, lattica, seen, False)
            peer = PeerId.from_string(lattica.peer_id)
            await node.connect(peer)  # the SDK's connection: returns once identify has run
            check_identify_from_lattica(verdict, way, transport, node, lattica, peer, False)
            await check_pings(verdict, way, node, lattica, peer)
        finally:
            await asyncio.to_thread(lattica.close)


async def mismatch_is_dropped(args: argparse.Namespace, verdict: Verdict) -> None:
    name = "protocolVersion /not-lattica/1.0.0"
    lattica = await asyncio.to_thread(start_lattica, args)
    try:
        async with our_node(args.transport, protocol_version="/not-lattica/1.0.0") as node:
            peer = PeerId.from_string(lattica.peer_id)
            dropped = asyncio.Event()

            def on_event(event: ConnectionEvent) -> None:
                if isinstance(event, PeerDisconnected) and event.peer == peer:
                    dropped.set()

            node.add_connection_listener(on_event)
            # Not awaited on its own: connect() waits for identify, which the drop cuts short.
            connecting = asyncio.create_task(node.connect(lattica.addr(args.transport)))
            try:
                mismatch = await asyncio.to_thread(
                    lattica.command,
                    "wait_event",
                    event="protocol_version_mismatch",
                    peer=str(node.peer_id),
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(20):
                        await dropped.wait()
            finally:
                connecting.cancel()
                with contextlib.suppress(asyncio.CancelledError, TransportError):
                    await connecting
            verdict.check(
                f"{name}: the SDK drops us",
                dropped.is_set() and node.connection_to(peer) is None,
                sdk_event=mismatch["found"],
            )
    finally:
        await asyncio.to_thread(lattica.close)


async def wrong_peer_id_is_refused(args: argparse.Namespace, verdict: Verdict) -> None:
    """A dial to /p2p/X that reaches the SDK node (not X) fails on the handshake's proof."""
    lattica = await asyncio.to_thread(start_lattica, args)
    try:
        async with our_node(args.transport) as node:
            someone_else = KeyPair.generate().peer_id
            addr = f"{bare(lattica.addr(args.transport))}/p2p/{someone_else}"
            try:
                await node.connect(addr)
                error: Exception | None = None
            except DialError as exc:
                error = exc
            # The error must name both peers: the one we asked for and the one that answered.
            verdict.check(
                "dial /p2p/X reaching the SDK node: refused, naming both peers",
                error is not None
                and lattica.peer_id in str(error)
                and str(someone_else) in str(error),
                error_type=type(error).__name__,
                error=str(error),
            )
    finally:
        await asyncio.to_thread(lattica.close)


def _cli() -> list[str]:
    script = Path(sys.executable).parent / "lattica-ray"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from lattica_ray.cli import main; main()"]


async def cli_node_and_ping(args: argparse.Namespace, verdict: Verdict) -> None:
    """`lattica-ray node` as its own process, dialled by the SDK; `lattica-ray ping` to the SDK."""
    listen = LISTEN[args.transport]
    node = await asyncio.create_subprocess_exec(
        *_cli(),
        "node",
        "--listen",
        listen,
        "--log-level",
        "DEBUG",
        stdout=asyncio.subprocess.PIPE,
        stderr=sys.stderr,
    )
    try:
        assert node.stdout is not None
        hello = json.loads(await node.stdout.readline())
        lattica = await asyncio.to_thread(start_lattica, args, bootstrap=hello["addrs"][:1])
        try:
            seen = await asyncio.to_thread(lattica.command, "wait_peer", peer=hello["peer_id"])
            verdict.check(
                "cli node: the SDK accepts its identify",
                seen["protocol_version"] == PROTOCOL_VERSION and seen["connected"],
                seen=seen,
            )
            pinged = await asyncio.to_thread(lattica.command, "ping", peer=hello["peer_id"])
            verdict.check("cli node: the SDK's ping", 0 < pinged["rtt_s"] < 1.0, rtt=pinged)
            ping = await asyncio.create_subprocess_exec(
                *_cli(),
                "ping",
                lattica.addr(args.transport),
                "--count",
                "2",
                "--interval",
                "0.1",
                "--json",
                "--listen",
                listen,
                stdout=asyncio.subprocess.PIPE,
                stderr=sys.stderr,
            )
            out, _ = await ping.communicate()
            lines = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
            answered = [line for line in lines if line.get("rtt_ms", 0) > 0]
            verdict.check(
                "cli ping to the SDK: 2 answers, direct",
                ping.returncode == 0
                and len(answered) == 2
                and all(line.get("path") == "direct" for line in answered),
                exit=ping.returncode,
                lines=lines,
            )
        finally:
            await asyncio.to_thread(lattica.close)
    finally:
        if node.returncode is None:
            node.terminate()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await node.wait()
            if node.returncode is None:
                node.kill()
                await node.wait()
    verdict.check("cli node: stops cleanly on SIGTERM", node.returncode == 0, exit=node.returncode)


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--transport", choices=sorted(LISTEN), default="quic")


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.DEBUG, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    logging.getLogger("aioquic").setLevel(logging.INFO)
    run(
        our_node_listens,
        we_dial_them,
        they_dial_us,
        mismatch_is_dropped,
        wrong_peer_id_is_refused,
        cli_node_and_ping,
        options=_options,
    )
