"""Two lattica SDK nodes on loopback, over QUIC and over TCP: proves the harness and the driver.

Checks for each transport: the dial, identify both ways (protocolVersion, agent, observed
address), ping both ways, a DHT value stored by one node and read by the other. Then a third node
with another identify protocolVersion, which the SDK disconnects.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from scenario_lib import LatticaPeer, Verdict, bare, run

LISTEN = {"quic": "/ip4/127.0.0.1/udp/0/quic-v1", "tcp": "/ip4/127.0.0.1/tcp/0"}
PROTOCOL_VERSION = "/lattica/1.0.0"


async def check_transport(python: str, transport: str, verdict: Verdict) -> None:
    peer = lambda **kw: LatticaPeer(python, log=sys.stderr, **kw)  # noqa: E731
    a = await asyncio.to_thread(peer, listen=list(LISTEN.values()))
    try:
        b = await asyncio.to_thread(peer, listen=[LISTEN[transport]], bootstrap=[a.addr(transport)])
        try:
            dial = await asyncio.to_thread(b.command, "dial", addr=a.addr(transport))
            marker = "/quic-v1" if transport == "quic" else "/tcp/"
            verdict.check(f"{transport}: b dials a", marker in dial["via"], via=dial["via"])

            a_sees_b = await asyncio.to_thread(a.command, "wait_peer", peer=b.peer_id)
            b_sees_a = await asyncio.to_thread(b.command, "wait_peer", peer=a.peer_id)
            for name, info, remote in (("a<-b", a_sees_b, b), ("b<-a", b_sees_a, a)):
                verdict.check(
                    f"{transport}: identify {name} protocolVersion",
                    info["protocol_version"] == PROTOCOL_VERSION,
                    got=info["protocol_version"],
                )
                verdict.check(
                    f"{transport}: identify {name} agent",
                    str(info["agent_version"]).startswith("rust-libp2p/"),
                    got=info["agent_version"],
                )
                verdict.check(
                    f"{transport}: identify {name} listen addrs",
                    {bare(x) for x in remote.addrs} <= set(info["listen_addrs"]),
                    got=info["listen_addrs"],
                    want=remote.addrs,
                )
            # What b reports having observed of a is a's listen address (b dialled it). What a
            # observed of b is b's socket: its listen port over QUIC (quinn dials from the
            # listening socket), an ephemeral port over TCP.
            verdict.check(
                f"{transport}: b observed a at a's listen addr",
                a_sees_b["observed_addr"] == bare(a.addr(transport)),
                got=a_sees_b["observed_addr"],
                want=bare(a.addr(transport)),
            )
            want_b = bare(b.addr(transport))
            got_b = b_sees_a["observed_addr"] or ""
            same = (
                got_b == want_b if transport == "quic" else got_b.startswith("/ip4/127.0.0.1/tcp/")
            )
            verdict.check(f"{transport}: a observed b", same, got=got_b, listen=want_b)

            for name, pinger, target in (("a->b", a, b), ("b->a", b, a)):
                ping = await asyncio.to_thread(pinger.command, "ping", peer=target.peer_id)
                verdict.check(
                    f"{transport}: ping {name}", 0 < ping["rtt_s"] < 1.0, rtt_s=ping["rtt_s"]
                )

            key = f"interop-{transport}"
            await asyncio.to_thread(a.command, "dht_put", key=key, value="from a")
            got = await asyncio.to_thread(b.command, "dht_get", key=key)
            verdict.check(f"{transport}: dht a->b", got.get("value") == "from a", got=got)
        finally:
            await asyncio.to_thread(b.close)
    finally:
        await asyncio.to_thread(a.close)


async def check_protocol_mismatch(python: str, verdict: Verdict) -> None:
    a = await asyncio.to_thread(LatticaPeer, python, listen=[LISTEN["quic"]], log=sys.stderr)
    try:
        c = await asyncio.to_thread(
            LatticaPeer,
            python,
            listen=[LISTEN["quic"]],
            bootstrap=[a.addr("quic")],
            protocol_version="/other/1.0.0",
            log=sys.stderr,
        )
        try:
            # Each side compares the other's protocolVersion with its own; whichever reads the
            # other's identify first drops the connection.
            gone = await asyncio.to_thread(c.command, "wait_disconnect", peer=a.peer_id)
            a_events = (await asyncio.to_thread(a.command, "events"))["events"]
            a_saw = {"event": "protocol_version_mismatch", "peer": c.peer_id} in a_events
            verdict.check(
                "protocolVersion mismatch: the connection is dropped",
                a_saw or gone["mismatch"],
                a_saw_mismatch=a_saw,
                c_saw_mismatch=gone["mismatch"],
            )
        finally:
            await asyncio.to_thread(c.close)
    finally:
        await asyncio.to_thread(a.close)


async def over_quic(args: argparse.Namespace, verdict: Verdict) -> None:
    await check_transport(args.lattica_python, "quic", verdict)


async def over_tcp(args: argparse.Namespace, verdict: Verdict) -> None:
    await check_transport(args.lattica_python, "tcp", verdict)


async def protocol_mismatch(args: argparse.Namespace, verdict: Verdict) -> None:
    await check_protocol_mismatch(args.lattica_python, verdict)


if __name__ == "__main__":
    run(over_quic, over_tcp, protocol_mismatch)
