"""Our Node and a lattica SDK node (rust-libp2p) share one DHT: what one puts, the other reads.

The SDK's Kademlia speaks the kad-dht messages under its own protocol ID (`/lattica/1.0.0`) and
stores unsigned bincode records (`lattica_ray.dht.sdk`), so our node opts in to both:
`DHTConfig(protocols=("/ipfs/kad/1.0.0", "/lattica/1.0.0"), sdk_records=True)`. Over one
transport (`--transport quic|tcp`), the SDK bootstraps from our node and we bootstrap from it;
then, each way: a raw value (the SDK's bytes API), a value held only by the writer (so the reader
must ask over the network), a pickled `bytes` (the SDK's public Python API; we never unpickle:
`bytes_from_pickle` parses that one shape by hand), and subkeys. At the end the SDK node must still
be alive and connected. Then provider records, both ways, under the SDK's string keys.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

from scenario_lib import LatticaPeer, Verdict, run

from lattica_ray.dht import DHTConfig
from lattica_ray.dht.sdk import SdkValue, SubkeyIndex, bytes_from_pickle, pickle_of_bytes
from lattica_ray.node import Node
from transport.identity import PeerId

LISTEN = {"quic": "/ip4/127.0.0.1/udp/0/quic-v1", "tcp": "/ip4/127.0.0.1/tcp/0"}
KAD = "/ipfs/kad/1.0.0"
SDK_KAD = "/lattica/1.0.0"  # the SDK's Kademlia protocol ID (= its identify protocolVersion)
SDK_TTL = 600.0  # the driver's default record lifetime


def dht_config() -> DHTConfig:
    return DHTConfig(protocols=(KAD, SDK_KAD), sdk_records=True)


async def sdk(lattica: LatticaPeer, cmd: str, **args: object) -> dict:
    return await asyncio.to_thread(lattica.command, cmd, **args)


async def connect_and_bootstrap(
    verdict: Verdict, transport: str, node: Node, lattica: LatticaPeer
) -> PeerId:
    """The SDK bootstraps from us (its Kademlia learns us from identify); we from it."""
    way = f"{transport}: connect"
    our_addr = str(node.addrs[0])
    dialled = await sdk(lattica, "dial", addr=our_addr)
    verdict.check(f"{way}: the SDK dials us", bool(dialled.get("via")), via=dialled.get("via"))
    seen = await sdk(lattica, "wait_peer", peer=str(node.peer_id))
    verdict.check(
        f"{way}: our identify lists the SDK's kad protocol",
        SDK_KAD in seen.get("protocols", []),
        protocols=seen.get("protocols"),
    )
    peer = PeerId.from_string(lattica.peer_id)
    size = await node.dht.bootstrap([lattica.addr(transport)], refresh_buckets=False)
    verdict.check(
        f"{way}: the SDK answers our kad requests on {SDK_KAD}",
        peer in node.dht.table and node.dht.protocol_of(peer) == SDK_KAD,
        table_size=size,
        protocol=node.dht.protocol_of(peer),
    )
    return peer


async def sdk_writes_we_read(
    verdict: Verdict, transport: str, node: Node, lattica: LatticaPeer
) -> None:
    way = f"{transport}: SDK put -> our get"
    await sdk(lattica, "dht_put", key="sdk-raw", value="put by the SDK")
    stored = node.dht.records.get(b"sdk-raw", time.time())
    decoded = SdkValue.decode(stored) if stored is not None else None
    verdict.check(
        f"{way}: the SDK's PUT_VALUE reached our store",
        decoded is not None
        and decoded.value == b"put by the SDK"
        and abs(decoded.expiration - (time.time() + SDK_TTL)) < 60,
        stored=repr(stored),
    )
    found = await node.dht.get_record("sdk-raw")
    verdict.check(
        f"{way}: node.dht.get reads the SDK's bytes",
        found is not None and found.value == b"put by the SDK",
        found=repr(found),
    )
    # Forget our copy: the value can now only come from the SDK, over GET_VALUE.
    node.dht.records.remove(b"sdk-raw")
    fetched = await node.dht.get("sdk-raw")
    verdict.check(
        f"{way}: with our copy gone, GET_VALUE to the SDK returns it",
        fetched == b"put by the SDK",
        fetched=repr(fetched),
    )
    await sdk(lattica, "dht_store_object", key="sdk-pickled", value="pickled by the SDK")
    raw = await node.dht.get("sdk-pickled")
    try:
        unpickled: bytes | str | None = bytes_from_pickle(raw) if raw is not None else None
    except ValueError as exc:
        unpickled = f"not a pickled bytes object: {exc}"
    verdict.check(
        f"{way}: the SDK's public store() (a pickle), read without unpickling",
        unpickled == b"pickled by the SDK",
        got=repr(unpickled),
    )
    for subkey, value in (("one", "first"), ("two", "second")):
        await sdk(lattica, "dht_put", key="sdk-sub", value=value, subkey=subkey)
    first = await node.dht.get("sdk-sub#one")
    second = await node.dht.get("sdk-sub#two")
    index_raw = await node.dht.get("sdk-sub#index")
    index = SubkeyIndex.decode(index_raw) if index_raw is not None else None
    verdict.check(
        f"{way}: subkeys and their index",
        first == b"first"
        and second == b"second"
        and index is not None
        and set(index.subkeys) == {"one", "two"},
        first=repr(first),
        second=repr(second),
        index=repr(index),
    )


async def we_write_sdk_reads(
    verdict: Verdict, transport: str, node: Node, lattica: LatticaPeer
) -> None:
    way = f"{transport}: our put -> SDK get"
    stored = await node.dht.put("ours-raw", b"put by lattica-ray")
    got = await sdk(lattica, "dht_get", key="ours-raw")
    verdict.check(
        f"{way}: the SDK reads our bytes",
        stored >= 1 and got.get("found") and got.get("value") == "put by lattica-ray",
        stored_at=stored,
        got=got,
    )
    # Held only by us (never pushed): the SDK's lookup must fetch it from our node.
    value = SdkValue(b"held only by lattica-ray", time.time() + 300).encode()
    node.dht.records.put(b"ours-only", value, time.time(), publisher=node.peer_id.multihash)
    got = await sdk(lattica, "dht_get", key="ours-only")
    verdict.check(
        f"{way}: the SDK's GET_VALUE to us returns a record only we hold",
        got.get("found") and got.get("value") == "held only by lattica-ray",
        got=got,
    )
    await node.dht.put("ours-pickled", pickle_of_bytes(b"for the SDK's get()"))
    got = await sdk(lattica, "dht_get_object", key="ours-pickled")
    verdict.check(
        f"{way}: the SDK's public get() unpickles our value into the same bytes",
        got.get("found")
        and got.get("type") == "bytes"
        and got.get("value") == "for the SDK's get()",
        got=got,
    )


async def providers_both_ways(
    verdict: Verdict, transport: str, node: Node, lattica: LatticaPeer
) -> None:
    """The SDK's provider keys are plain strings (not multihashes): `sdk_records` takes them."""
    way = f"{transport}: providers"
    await sdk(lattica, "provide", key="sdk-provided")
    found = await node.dht.find_providers("sdk-provided")
    verdict.check(
        f"{way}: we find the SDK as a provider of its key",
        lattica.peer_id in {str(info.peer_id) for info in found},
        found=[str(info.peer_id) for info in found],
    )
    announced = await node.dht.provide("ours-provided")
    got = await sdk(lattica, "get_providers", key="ours-provided")
    verdict.check(
        f"{way}: the SDK finds us as a provider of ours",
        announced >= 1 and str(node.peer_id) in got.get("providers", []),
        announced_to=announced,
        got=got,
    )


async def sdk_still_well(
    verdict: Verdict, transport: str, node: Node, lattica: LatticaPeer
) -> None:
    info = await sdk(lattica, "peer_info", peer=str(node.peer_id))
    verdict.check(
        f"{transport}: the SDK node is alive and still connected to us",
        lattica.process.poll() is None and info.get("connected"),
        info=info,
    )


async def share_one_dht(args: argparse.Namespace, verdict: Verdict) -> None:
    transport = args.transport
    async with Node(listen=[LISTEN[transport]], dht=dht_config()) as node:
        lattica = await asyncio.to_thread(
            LatticaPeer,
            args.lattica_python,
            listen=[LISTEN[transport]],
            bootstrap=[str(node.addrs[0])],
            log=sys.stderr,
        )
        try:
            await connect_and_bootstrap(verdict, transport, node, lattica)
            await sdk_writes_we_read(verdict, transport, node, lattica)
            await we_write_sdk_reads(verdict, transport, node, lattica)
            await providers_both_ways(verdict, transport, node, lattica)
            await sdk_still_well(verdict, transport, node, lattica)
        finally:
            await asyncio.to_thread(lattica.close)


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--transport", choices=sorted(LISTEN), default="quic")


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.DEBUG, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    logging.getLogger("aioquic").setLevel(logging.INFO)
    run(share_one_dht, options=_options)
