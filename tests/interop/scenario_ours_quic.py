"""Our Node against the lattica SDK (rust-libp2p) over QUIC-v1, both directions.

Ours dials theirs, then theirs dials ours; each way: the connection (peer IDs from the libp2p TLS
handshake), identify both ways (protocolVersion, agent, listen and observed addresses) and ping
both ways, with the connection still up at the end (the SDK drops peers whose identify it
rejects). Then our node with another protocolVersion, which the SDK must drop.
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
from transport.errors import DialError
from transport.host import ConnectionEvent, PeerDisconnected
from transport.identity import KeyPair, PeerId

QUIC = "/ip4/127.0.0.1/udp/0/quic-v1"
PROTOCOL_VERSION = "/lattica/1.0.0"


def check_identify_from_lattica(
    verdict: Verdict, way: str, node: Node, lattica: LatticaPeer, peer: PeerId
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
    verdict.check(
        f"{way}: SDK's listen addrs",
        bare(lattica.addr("quic")) in listen,
        got=listen,
        want=bare(lattica.addr("quic")),
    )
    # Both sides send from their one listening UDP socket, so the SDK saw us at our listen addr.
    ours = bare(str(node.addrs[0]))
    verdict.check(
        f"{way}: SDK observed us at our listen addr",
        str(info.observed_addr) == ours,
        got=str(info.observed_addr),
        want=ours,
    )
    verdict.check(
        f"{way}: SDK speaks ping and identify",
        {"/ipfs/ping/1.0.0", "/ipfs/id/1.0.0"} <= set(info.protocols),
        got=info.protocols,
    )


def check_identify_at_lattica(
    verdict: Verdict, way: str, node: Node, lattica: LatticaPeer, seen: dict
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
    verdict.check(
        f"{way}: we observed the SDK at its listen addr",
        seen.get("observed_addr") == bare(lattica.addr("quic")),
        got=seen.get("observed_addr"),
        want=bare(lattica.addr("quic")),
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


async def we_dial_them(args: argparse.Namespace, verdict: Verdict) -> None:
    way = "ours->theirs"
    lattica = await asyncio.to_thread(
        LatticaPeer, args.lattica_python, listen=[QUIC], log=sys.stderr
    )
    try:
        async with Node(listen=[QUIC], protocol_version=PROTOCOL_VERSION) as node:
            peer = await node.connect(lattica.addr("quic"))
            verdict.check(f"{way}: connect", str(peer) == lattica.peer_id, got=str(peer))
            check_identify_from_lattica(verdict, way, node, lattica, peer)
            seen = await asyncio.to_thread(lattica.command, "wait_peer", peer=str(node.peer_id))
            check_identify_at_lattica(verdict, way, node, lattica, seen)
            await check_pings(verdict, way, node, lattica, peer)
    finally:
        await asyncio.to_thread(lattica.close)


async def they_dial_us(args: argparse.Namespace, verdict: Verdict) -> None:
    way = "theirs->ours"
    async with Node(listen=[QUIC], protocol_version=PROTOCOL_VERSION) as node:
        our_addr = str(node.addrs[0])
        lattica = await asyncio.to_thread(
            LatticaPeer, args.lattica_python, listen=[QUIC], bootstrap=[our_addr], log=sys.stderr
        )
        try:
            dialled = await asyncio.to_thread(lattica.command, "dial", addr=our_addr)
            verdict.check(f"{way}: connect", "/quic-v1" in dialled["via"], via=dialled["via"])
            seen = await asyncio.to_thread(lattica.command, "wait_peer", peer=str(node.peer_id))
            check_identify_at_lattica(verdict, way, node, lattica, seen)
            peer = PeerId.from_string(lattica.peer_id)
            await node.connect(peer)  # the SDK's connection: returns once identify has run
            check_identify_from_lattica(verdict, way, node, lattica, peer)
            await check_pings(verdict, way, node, lattica, peer)
        finally:
            await asyncio.to_thread(lattica.close)


async def mismatch_is_dropped(args: argparse.Namespace, verdict: Verdict) -> None:
    name = "protocolVersion /not-lattica/1.0.0"
    lattica = await asyncio.to_thread(
        LatticaPeer, args.lattica_python, listen=[QUIC], log=sys.stderr
    )
    try:
        async with Node(listen=[QUIC], protocol_version="/not-lattica/1.0.0") as node:
            peer = PeerId.from_string(lattica.peer_id)
            dropped = asyncio.Event()

            def on_event(event: ConnectionEvent) -> None:
                if isinstance(event, PeerDisconnected) and event.peer == peer:
                    dropped.set()

            node.add_connection_listener(on_event)
            await node.connect(lattica.addr("quic"))
            mismatch = await asyncio.to_thread(
                lattica.command,
                "wait_event",
                event="protocol_version_mismatch",
                peer=str(node.peer_id),
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await dropped.wait()
            verdict.check(
                f"{name}: the SDK drops us",
                dropped.is_set() and node.connection_to(peer) is None,
                sdk_event=mismatch["found"],
            )
    finally:
        await asyncio.to_thread(lattica.close)


async def wrong_peer_id_is_refused(args: argparse.Namespace, verdict: Verdict) -> None:
    """A dial to /p2p/X that reaches the SDK node (not X) fails on the SDK's TLS certificate."""
    lattica = await asyncio.to_thread(
        LatticaPeer, args.lattica_python, listen=[QUIC], log=sys.stderr
    )
    try:
        async with Node(listen=[QUIC]) as node:
            someone_else = KeyPair.generate().peer_id
            addr = f"{bare(lattica.addr('quic'))}/p2p/{someone_else}"
            try:
                await node.connect(addr)
                error: Exception | None = None
            except DialError as exc:
                error = exc
            # The certificate proves who the SDK node is: the error names both peers. (The swarm
            # reports it as PeerUnreachable carrying the PeerIdMismatch text.)
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
    node = await asyncio.create_subprocess_exec(
        *_cli(), "node", "--listen", QUIC, stdout=asyncio.subprocess.PIPE, stderr=sys.stderr
    )
    try:
        assert node.stdout is not None
        hello = json.loads(await node.stdout.readline())
        lattica = await asyncio.to_thread(
            LatticaPeer,
            args.lattica_python,
            listen=[QUIC],
            bootstrap=hello["addrs"][:1],
            log=sys.stderr,
        )
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
                lattica.addr("quic"),
                "--count",
                "2",
                "--interval",
                "0.1",
                "--json",
                "--listen",
                QUIC,
                stdout=asyncio.subprocess.PIPE,
                stderr=sys.stderr,
            )
            out, _ = await ping.communicate()
            lines = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
            verdict.check(
                "cli ping to the SDK: 2 answers, direct",
                ping.returncode == 0
                and len(lines) == 2
                and all(
                    line.get("path") == "direct" and line.get("rtt_ms", 0) > 0 for line in lines
                ),
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


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.DEBUG, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    logging.getLogger("aioquic").setLevel(logging.INFO)
    run(
        we_dial_them, they_dial_us, mismatch_is_dropped, wrong_peer_id_is_refused, cli_node_and_ping
    )
