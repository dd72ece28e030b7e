"""The in-memory Host network that protocol tests and simulations run on."""

from __future__ import annotations

import asyncio

import pytest

from transport.errors import DialTimeout, PeerUnreachable, ProtocolNotSupported, StreamReset
from transport.host import Host, PeerConnected, PeerDisconnected
from transport.identity import KeyPair
from transport.memory_host import MemoryNetwork
from transport.stream import Stream


async def _echo(stream: Stream) -> None:
    await stream.write(await stream.read_to_end())
    await stream.close()


async def test_hosts_speak_multistream_and_echo() -> None:
    network = MemoryNetwork()
    a, b = network.add_host(), network.add_host()
    assert isinstance(a, Host)
    b.set_stream_handler("/echo/1", _echo)
    events = []
    a.add_connection_listener(events.append)
    stream = await a.open_stream(b.peer_id, ["/echo/1"])
    await stream.write(b"hi")
    await stream.close()
    assert await stream.read_to_end() == b"hi"
    assert events == [PeerConnected(b.peer_id, "memory")]
    assert a.connected_peers() == [b.peer_id]
    with pytest.raises(ProtocolNotSupported):
        other = await a.open_stream(b.peer_id, ["/nope/1"])
        await other.read()
    await a.aclose()
    await b.aclose()


async def test_killed_host_resets_streams_and_times_out_dials() -> None:
    network = MemoryNetwork(dead_peer_timeout=0.01)
    a, b = network.add_host(), network.add_host()
    started = asyncio.Event()

    async def hang(stream: Stream) -> None:
        started.set()
        await stream.read()

    b.set_stream_handler("/hang/1", hang)
    events = []
    a.add_connection_listener(events.append)
    stream = await a.open_stream(b.peer_id, ["/hang/1"])
    await stream.write(b"x")
    await started.wait()
    network.kill(b.peer_id)
    with pytest.raises(StreamReset):
        await stream.read()
    assert events[-1] == PeerDisconnected(b.peer_id)
    with pytest.raises(DialTimeout):
        await a.open_stream(b.peer_id, ["/hang/1"])
    with pytest.raises(PeerUnreachable):
        await a.open_stream(KeyPair.generate().peer_id, ["/hang/1"])
    await a.aclose()
    await b.aclose()


async def test_crashing_handler_resets_the_stream_and_logs(caplog) -> None:
    network = MemoryNetwork()
    a, b = network.add_host(), network.add_host()

    async def crash(stream: Stream) -> None:
        raise RuntimeError("bug in handler")

    b.set_stream_handler("/crash/1", crash)
    stream = await a.open_stream(b.peer_id, ["/crash/1"])
    await stream.write(b"x")
    with pytest.raises(StreamReset):
        await stream.read()
    assert "bug in handler" in caplog.text
    await a.aclose()
    await b.aclose()
