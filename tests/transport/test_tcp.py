"""The libp2p TCP transport on loopback: upgrade, streams, identity checks, failures, cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.transport.conftest import wait_until
from transport.connection import DIRECT, RELAYED
from transport.errors import (
    DialTimeout,
    HandshakeFailed,
    InvalidMultiaddr,
    PeerIdMismatch,
    PeerUnreachable,
    StreamReset,
)
from transport.identity import KeyPair
from transport.memory import memory_stream_pair
from transport.multiaddr import Multiaddr
from transport.multistream import encode_message, select_inbound, select_outbound
from transport.stream import Stream
from transport.swarm import Swarm
from transport.tcp import (
    TcpConfig,
    TcpConnection,
    TcpTransport,
    is_tcp_address,
    secure_and_mux,
    tcp_multiaddr,
    tcp_socket_address,
    use_congestion_control,
)

FAST = TcpConfig(handshake_timeout=2.0, dial_timeout=2.0)


class TcpPair:
    """A dialing and a listening transport; the listener's connections and streams are kept."""

    def __init__(self, config: TcpConfig = FAST) -> None:
        self.client_key, self.server_key = KeyPair.generate(), KeyPair.generate()
        self.server_connections: asyncio.Queue[TcpConnection] = asyncio.Queue()
        self.server_streams: asyncio.Queue[Stream] = asyncio.Queue()
        self.client = TcpTransport(self.client_key, config)
        self.server = TcpTransport(self.server_key, config, self._on_connection)

    def _on_connection(self, connection: TcpConnection) -> None:
        connection.set_inbound_stream_callback(self.server_streams.put_nowait)
        self.server_connections.put_nowait(connection)

    async def start(self) -> Multiaddr:
        self.address = await self.server.listen("/ip4/127.0.0.1/tcp/0")
        return self.address

    async def dial(self) -> TcpConnection:
        return await self.client.dial(self.address.with_peer_id(self.server_key.peer_id))

    async def close(self) -> None:
        await self.client.close()
        await self.server.close()


@pytest.fixture
async def tcp_pair() -> AsyncIterator[TcpPair]:
    pair = TcpPair()
    await pair.start()
    try:
        yield pair
    finally:
        await pair.close()


async def _get(queue: asyncio.Queue) -> object:
    async with asyncio.timeout(5):
        return await queue.get()


async def test_dial_authenticates_and_streams_flow_both_ways(tcp_pair: TcpPair) -> None:
    connection = await tcp_pair.dial()
    assert connection.transport == "tcp" and connection.path == DIRECT
    assert connection.is_initiator
    assert connection.remote_peer == tcp_pair.server_key.peer_id
    assert connection.remote_addr == tcp_pair.address.with_peer_id(tcp_pair.server_key.peer_id)
    server_side = await _get(tcp_pair.server_connections)
    assert server_side.remote_peer == tcp_pair.client_key.peer_id
    assert not server_side.is_initiator

    stream = await connection.open_stream()
    assert await select_outbound(stream, ["/echo/1"]) == "/echo/1"
    await stream.write(b"ping")
    inbound = await _get(tcp_pair.server_streams)
    async with asyncio.timeout(5):
        assert await select_inbound(inbound, ["/other/1", "/echo/1"]) == "/echo/1"
        assert await inbound.readexactly(4) == b"ping"
        await inbound.write(b"pong")
        assert await stream.readexactly(4) == b"pong"  # also checks the lazy confirmation

    client_streams: asyncio.Queue[Stream] = asyncio.Queue()
    connection.set_inbound_stream_callback(client_streams.put_nowait)
    reverse = await server_side.open_stream()
    await reverse.write(b"server first")
    arrived = await _get(client_streams)
    async with asyncio.timeout(5):
        assert await arrived.readexactly(12) == b"server first"


async def test_protocol_refused_on_a_stream(tcp_pair: TcpPair) -> None:
    from transport.errors import ProtocolNotSupported

    connection = await tcp_pair.dial()
    stream = await connection.open_stream()
    answer = asyncio.ensure_future(select_outbound(stream, ["/nope/1", "/nope/2"], lazy=False))
    inbound = await _get(tcp_pair.server_streams)
    with pytest.raises(ProtocolNotSupported):
        async with asyncio.timeout(5):
            await select_inbound(inbound, ["/echo/1"])
    with pytest.raises(ProtocolNotSupported):
        await answer
    assert not connection.is_closed  # one refused stream does not hurt the connection


async def test_large_transfer_arrives_intact(tcp_pair: TcpPair) -> None:
    connection = await tcp_pair.dial()
    stream = await connection.open_stream()
    payload = hashlib.shake_256(b"seed").digest(24 * 1024 * 1024)

    async def send() -> None:
        view = memoryview(payload)
        for start in range(0, len(payload), 3_000_001):  # odd sizes: frames split anywhere
            await stream.write(view[start : start + 3_000_001])
        await stream.close()

    sender = asyncio.ensure_future(send())
    inbound = await _get(tcp_pair.server_streams)
    digest = hashlib.sha256()
    async with asyncio.timeout(30):
        while chunk := await inbound.read(1 << 20):
            digest.update(chunk)
        await sender
    assert digest.digest() == hashlib.sha256(payload).digest()


async def test_concurrent_connections_and_streams_stay_intact(tcp_pair: TcpPair) -> None:
    """Connections share one receive buffer per event loop: bytes must never cross over."""
    others = [TcpTransport(KeyPair.generate(), FAST) for _ in range(2)]
    try:
        connections = [await tcp_pair.dial()] + [
            await other.dial(tcp_pair.address, tcp_pair.server_key.peer_id) for other in others
        ]

        async def serve(count: int) -> None:
            async with asyncio.TaskGroup() as group:
                for _ in range(count):
                    stream = await _get(tcp_pair.server_streams)
                    group.create_task(echo_digest(stream))

        async def echo_digest(stream: Stream) -> None:
            data = await stream.read_to_end(1 << 24)
            await stream.write(hashlib.sha256(data).digest())
            await stream.close()

        async def call(connection: TcpConnection, index: int) -> None:
            stream = await connection.open_stream()
            payload = hashlib.shake_256(bytes([index])).digest(1_000_000 + index * 7919)
            await stream.write(payload)
            await stream.close()
            assert await stream.read_to_end() == hashlib.sha256(payload).digest()

        calls = [call(connection, index) for index in range(4) for connection in connections]
        async with asyncio.timeout(30):
            server = asyncio.ensure_future(serve(len(calls)))
            await asyncio.gather(*calls)
            await server
    finally:
        for other in others:
            await other.close()


async def test_dialing_the_wrong_peer_id_is_refused(tcp_pair: TcpPair) -> None:
    impostor_expected = KeyPair.generate().peer_id
    with pytest.raises(PeerIdMismatch) as failure:
        await tcp_pair.client.dial(tcp_pair.address.with_peer_id(impostor_expected))
    assert failure.value.actual == tcp_pair.server_key.peer_id
    assert "stale" in str(failure.value)
    await wait_until(lambda: not tcp_pair.server._handshakes)
    assert tcp_pair.server_connections.empty()  # the listener never got a connection
    assert not tcp_pair.client.connections and not tcp_pair.server.connections


async def test_expected_peer_must_agree_with_the_address(tcp_pair: TcpPair) -> None:
    address = tcp_pair.address.with_peer_id(tcp_pair.server_key.peer_id)
    with pytest.raises(ValueError, match="not the expected"):
        await tcp_pair.client.dial(address, KeyPair.generate().peer_id)
    connection = await tcp_pair.client.dial(tcp_pair.address, tcp_pair.server_key.peer_id)
    assert connection.remote_peer == tcp_pair.server_key.peer_id


async def test_peer_dying_mid_stream_is_a_clear_error(tcp_pair: TcpPair) -> None:
    connection = await tcp_pair.dial()
    stream = await connection.open_stream()
    await stream.write(b"start")
    server_side = await _get(tcp_pair.server_connections)
    inbound = await _get(tcp_pair.server_streams)
    reader = asyncio.ensure_future(stream.readexactly(10))
    writer = asyncio.ensure_future(stream.write(bytes(8 * 1024 * 1024)))
    await wait_until(lambda: len(inbound._buffer) > 100_000)  # the writer is mid-transfer
    server_side._channel.abort("killed")  # the remote process dies: no GoAway
    with pytest.raises(StreamReset, match=r"connection closed: (connection lost|.*no GoAway)"):
        async with asyncio.timeout(5):
            await reader
    with pytest.raises(StreamReset, match="connection closed"):
        async with asyncio.timeout(5):
            await writer
    async with asyncio.timeout(5):
        await connection.closed
    await wait_until(lambda: not tcp_pair.client.connections)


async def test_closing_a_connection_tells_the_remote(tcp_pair: TcpPair) -> None:
    connection = await tcp_pair.dial()
    server_side = await _get(tcp_pair.server_connections)
    async with asyncio.timeout(5):
        await connection.close()
        reason = await server_side.closed
    assert reason == "the remote closed the connection"
    assert server_side._session.remote_go_away  # the GoAway arrived before the FIN
    await wait_until(lambda: not tcp_pair.client.connections and not tcp_pair.server.connections)


async def test_nothing_listening_is_unreachable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound but not listening: connections are refused
        transport = TcpTransport(KeyPair.generate(), FAST)
        with pytest.raises(PeerUnreachable, match="cannot reach"):
            await transport.dial(f"/ip4/127.0.0.1/tcp/{port}")
        await transport.close()


async def test_a_dial_from_a_local_address_says_when_its_syn_has_left() -> None:
    """`on_syn_sent` runs once the kernel has sent the SYN, before any answer: a hole puncher
    that must have its SYN out before it tells the peer to dial waits for exactly that."""
    client = TcpTransport(KeyPair.generate(), FAST)
    try:
        source = tcp_socket_address(await client.listen("/ip4/127.0.0.1/tcp/0"))[:2]
        with socket.socket() as deaf, socket.socket() as filler:
            deaf.bind(("127.0.0.1", 0))
            deaf.listen(0)  # one queued connection fills it: Linux then drops new SYNs
            filler.setblocking(False)
            filler.connect_ex(deaf.getsockname())
            port = deaf.getsockname()[1]
            sent = asyncio.Event()
            dial = asyncio.ensure_future(
                client.dial(
                    f"/ip4/127.0.0.1/tcp/{port}", local_address=source, on_syn_sent=sent.set
                )
            )
            try:
                await asyncio.wait_for(sent.wait(), 2.0)
                assert not dial.done()  # the SYN is out and still unanswered
            finally:
                dial.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await dial
        refused: list[str] = []
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))  # bound, not listening: the SYN is answered with a RST
            port = probe.getsockname()[1]
            with pytest.raises(PeerUnreachable, match="refused"):
                await client.dial(
                    f"/ip4/127.0.0.1/tcp/{port}",
                    local_address=source,
                    on_syn_sent=lambda: refused.append("sent"),
                )
        assert refused == ["sent"]
        with pytest.raises(ValueError, match="local_address"):
            await client.dial(f"/ip4/127.0.0.1/tcp/{port}", on_syn_sent=lambda: None)
    finally:
        await client.close()


async def test_garbage_and_silent_clients_are_dropped() -> None:
    pair = TcpPair(TcpConfig(handshake_timeout=0.3))
    await pair.start()
    host, port, _ = tcp_socket_address(pair.address)
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # closed on us
        writer.close()
        silent_reader, silent_writer = await asyncio.open_connection(host, port)
        async with asyncio.timeout(5):
            assert await silent_reader.read() == b""  # dropped after the handshake timeout
        silent_writer.close()
        await wait_until(lambda: not pair.server._handshakes)
        assert pair.server_connections.empty()
    finally:
        await pair.close()


async def test_pending_handshakes_are_bounded() -> None:
    pair = TcpPair(TcpConfig(max_pending_handshakes=1, handshake_timeout=5.0))
    await pair.start()
    host, port, _ = tcp_socket_address(pair.address)
    writers = []
    try:
        _, first = await asyncio.open_connection(host, port)
        writers.append(first)
        await wait_until(lambda: len(pair.server._handshakes) == 1)
        second_reader, second = await asyncio.open_connection(host, port)
        writers.append(second)
        async with asyncio.timeout(2):
            assert await second_reader.read() == b""  # refused at once, not after 5 s
        assert len(pair.server._handshakes) == 1
    finally:
        for writer in writers:
            writer.close()
        await pair.close()


async def test_a_listener_without_noise_fails_the_dial() -> None:
    async def tls_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(encode_message("/multistream/1.0.0") + encode_message("na"))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(tls_only, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = TcpTransport(KeyPair.generate(), FAST)
    try:
        with pytest.raises(HandshakeFailed, match="/noise"):
            await transport.dial(f"/ip4/127.0.0.1/tcp/{port}")
    finally:
        await transport.close()
        server.close()
        await server.wait_closed()


async def test_handshake_timeout_is_a_dial_timeout() -> None:
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts, never answers
        writer.close()

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = TcpTransport(KeyPair.generate(), TcpConfig(handshake_timeout=0.2))
    try:
        with pytest.raises(DialTimeout, match=r"did not finish within 0\.2 s"):
            await transport.dial(f"/ip4/127.0.0.1/tcp/{port}")
    finally:
        await transport.close()
        server.close()
        await server.wait_closed()


async def test_inbound_connections_without_a_handler_are_closed() -> None:
    server = TcpTransport(KeyPair.generate(), FAST)  # no on_connection
    client = TcpTransport(KeyPair.generate(), FAST)
    try:
        address = await server.listen("/ip4/127.0.0.1/tcp/0")
        connection = await client.dial(address)
        async with asyncio.timeout(5):
            await connection.closed
    finally:
        await client.close()
        await server.close()


async def test_close_stops_listening_and_leaves_no_tasks() -> None:
    before = asyncio.all_tasks()
    pair = TcpPair()
    address = await pair.start()
    connection = await pair.dial()
    stream = await connection.open_stream()
    await stream.write(b"x")
    server_side = await _get(pair.server_connections)
    await pair.close()
    assert connection.is_closed and server_side.is_closed
    with pytest.raises(PeerUnreachable):
        await TcpTransport(KeyPair.generate(), FAST).dial(address)
    await asyncio.sleep(0)
    assert asyncio.all_tasks() - before == set()


async def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 support in this Python")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    pair = TcpPair()
    try:
        pair.address = await pair.server.listen("/ip6/::1/tcp/0")
        assert str(pair.address).startswith("/ip6/::1/tcp/")
        connection = await pair.dial()
        assert connection.remote_peer == pair.server_key.peer_id
    finally:
        await pair.close()


def test_tcp_addresses() -> None:
    assert tcp_socket_address(Multiaddr.parse("/ip4/10.0.0.1/tcp/4001"))[:2] == ("10.0.0.1", 4001)
    host, port, family = tcp_socket_address(Multiaddr.parse("/dns4/relay.example/tcp/443"))
    assert (host, port, family) == ("relay.example", 443, socket.AF_INET)
    for bad in ("/ip4/1.2.3.4/udp/1/quic-v1", "/ip4/1.2.3.4/tcp/1/ws", "/ip4/1.2.3.4"):
        with pytest.raises(InvalidMultiaddr, match="not a direct TCP address"):
            tcp_socket_address(Multiaddr.parse(bad))
    assert is_tcp_address(Multiaddr.parse("/ip6/::1/tcp/1/p2p/" + str(KeyPair.generate().peer_id)))
    assert not is_tcp_address(Multiaddr.parse("/ip4/1.2.3.4/udp/1/quic-v1"))
    peer = KeyPair.generate().peer_id
    assert str(tcp_multiaddr("::ffff:127.0.0.1", 5, peer)) == f"/ip4/127.0.0.1/tcp/5/p2p/{peer}"
    assert str(tcp_multiaddr("fe80::1%eth0", 6)) == "/ip6/fe80::1/tcp/6"


# -- the same upgrade over a relayed stream -------------------------------------------------


async def test_secure_and_mux_over_any_stream() -> None:
    alice, bob = KeyPair.generate(), KeyPair.generate()
    left, right = memory_stream_pair(alice.peer_id, bob.peer_id)
    async with asyncio.timeout(5):
        dialer, listener = await asyncio.gather(
            secure_and_mux(left, alice, True, bob.peer_id),
            secure_and_mux(right, bob, False),
        )
    try:
        assert dialer.path == RELAYED and dialer.transport == "relay"
        assert dialer.remote_peer == bob.peer_id and listener.remote_peer == alice.peer_id
        inbound: asyncio.Queue[Stream] = asyncio.Queue()
        listener.set_inbound_stream_callback(inbound.put_nowait)
        stream = await dialer.open_stream()
        await select_outbound(stream, ["/echo/1"])
        payload = bytes(range(256)) * 4000  # more than a window: flow control over the relay

        async def send() -> None:
            await stream.write(payload)
            await stream.close()

        async with asyncio.timeout(5):
            sender = asyncio.ensure_future(send())
            remote = await inbound.get()
            await select_inbound(remote, ["/echo/1"])
            assert await remote.read_to_end(1 << 24) == payload
            await sender
    finally:
        await dialer.close()
        await listener.close()


async def test_secure_and_mux_refuses_the_wrong_peer_and_resets_the_stream() -> None:
    alice, bob = KeyPair.generate(), KeyPair.generate()
    left, right = memory_stream_pair()
    async with asyncio.timeout(5):
        results = await asyncio.gather(
            secure_and_mux(left, alice, True, KeyPair.generate().peer_id),
            secure_and_mux(right, bob, False),
            return_exceptions=True,
        )
    assert isinstance(results[0], PeerIdMismatch)
    assert isinstance(results[1], HandshakeFailed)
    assert left._reset_reason is not None and right._reset_reason is not None


def test_dial_and_streams_work_on_uvloop() -> None:
    """Ray workers run asyncio on uvloop where it is installed; its transports are not
    registered as asyncio.Transport (a type check there broke every TCP connection)."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        pair = TcpPair()
        await pair.start()
        try:
            connection = await pair.dial()
            stream = await connection.open_stream()
            await select_outbound(stream, ["/echo/1"])
            await stream.write(b"ping")
            inbound = await _get(pair.server_streams)
            async with asyncio.timeout(5):
                await select_inbound(inbound, ["/echo/1"])
                assert await inbound.readexactly(4) == b"ping"
                await inbound.write(b"pong")
                assert await stream.readexactly(4) == b"pong"
        finally:
            await pair.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def _congestion_controls(port: int) -> list[str]:
    """What `ss` reports for the established TCP sockets on `port` (either end)."""
    ss = subprocess.run(
        ["ss", "-tinH", "state", "established", f"( sport = :{port} or dport = :{port} )"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout.split()
    return [word for word in ss if word in ("reno", "cubic", "bbr", "bbr2", "dctcp", "vegas")]


def _kernel_default_congestion_control() -> str:
    return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
@pytest.mark.parametrize("wanted", ["reno", None])
async def test_connections_run_the_configured_congestion_control(wanted: str | None) -> None:
    """Both ends of our TCP connections ask the kernel for TcpConfig.congestion_control
    (reno here: never the kernel's default); None leaves the kernel's default."""
    default = _kernel_default_congestion_control()
    pair = TcpPair(FAST.model_copy(update={"congestion_control": wanted}))
    await pair.start()
    try:
        await pair.dial()
        await _get(pair.server_connections)
        port = int(pair.address.value_for("tcp"))
        assert _congestion_controls(port) == [wanted or default] * 2
    finally:
        await pair.close()


def test_an_unknown_congestion_control_leaves_the_socket_as_it_was() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        with socket.create_connection(server.getsockname()) as sock:
            before = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
            assert not use_congestion_control(sock, "no-such-algorithm")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16) == before
            assert not use_congestion_control(None, "reno")


async def test_a_listen_port_dial_called_off_as_it_connects_becomes_a_path() -> None:
    """Another dial to the peer won (QUIC, at bootstrap) in the very turn our TCP dial from the
    listen port connected: that connection is kept as a path. Dropped unseen, it held the port
    pair, the next dial from the listen port failed (EADDRNOTAVAIL) and left from a fresh port,
    and a NAT'd node had no TCP mapping to offer for hole punching."""
    a, b = Swarm(KeyPair.generate()), Swarm(KeyPair.generate())
    try:
        for swarm in (a, b):
            await swarm.listen(Multiaddr.parse("/ip4/127.0.0.1/tcp/0"))
        assert a.tcp is not None
        dial_tcp = a.tcp.dial
        caller: asyncio.Task[object] | None = None

        async def connects_as_the_caller_is_called_off(*args: object, **kwargs: object) -> object:
            connection = await dial_tcp(*args, **kwargs)  # type: ignore[arg-type]
            assert caller is not None
            asyncio.get_running_loop().call_soon(caller.cancel)  # before the caller resumes
            return connection

        a.tcp.dial = connects_as_the_caller_is_called_off  # type: ignore[method-assign]
        caller = asyncio.ensure_future(a.dial_addr(b.addrs[0], b.peer_id))
        with pytest.raises(asyncio.CancelledError):
            await caller
        paths = a.connections_to(b.peer_id)
        assert [c.transport for c in paths] == ["tcp"], "the connection was dropped unseen"
        assert paths[0].local_addr == a.tcp.listen_addrs[0]  # from the listen port
    finally:
        await a.close()
        await b.close()
