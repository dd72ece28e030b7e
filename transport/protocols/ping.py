"""libp2p ping (`/ipfs/ping/1.0.0`): 32 random bytes out, the same 32 bytes back, timed."""

from __future__ import annotations

import os
import time

from transport.errors import ProtocolViolation
from transport.stream import Stream

PROTOCOL = "/ipfs/ping/1.0.0"  # ping spec
PAYLOAD_SIZE = 32  # ping spec
MAX_PINGS_PER_STREAM = 1024  # a stream that pings forever is closed after this many


async def serve_ping(stream: Stream) -> None:
    """Echo every 32-byte payload until the remote closes the stream."""
    for _ in range(MAX_PINGS_PER_STREAM):
        payload = await stream.read(PAYLOAD_SIZE)
        if not payload:
            break
        while len(payload) < PAYLOAD_SIZE:
            more = await stream.read(PAYLOAD_SIZE - len(payload))
            if not more:
                await stream.close()
                return
            payload += more
        await stream.write(payload)
    await stream.close()


async def ping_once(stream: Stream) -> float:
    """One round trip on an open ping stream; the RTT in seconds."""
    payload = os.urandom(PAYLOAD_SIZE)
    started = time.perf_counter()
    await stream.write(payload)
    echoed = await stream.readexactly(PAYLOAD_SIZE)
    rtt = time.perf_counter() - started
    if echoed != payload:
        stream.reset("ping mismatch")
        raise ProtocolViolation("ping: the remote echoed different bytes")
    return rtt
