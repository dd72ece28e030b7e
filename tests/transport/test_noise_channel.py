"""The Noise handshake and secure channel over real (in-memory) streams, and their failures."""

from __future__ import annotations

import asyncio

import pytest

from transport.errors import ConnectionClosed, HandshakeFailed, PeerIdMismatch, ProtocolViolation
from transport.identity import KeyPair
from transport.memory import memory_stream_pair
from transport.noise import (
    NoiseHandshake,
    SecureChannel,
    StreamChannel,
    perform_handshake,
)


class Collector:
    """A ChannelReceiver that records what a started channel delivers."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = asyncio.Event()
        self.lost: list[Exception | None] = []
        self.lost_event = asyncio.Event()
        self.arrived = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.arrived.set()

    def eof_received(self) -> None:
        self.eof.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)
        self.lost_event.set()

    async def wait_for(self, size: int) -> bytes:
        async with asyncio.timeout(5):
            while len(self.data) < size:
                self.arrived.clear()
                await self.arrived.wait()
        return bytes(self.data)


async def _secure_pair() -> tuple[SecureChannel, SecureChannel, KeyPair, KeyPair]:
    alice, bob = KeyPair.generate(), KeyPair.generate()
    left, right = memory_stream_pair()
    initiator = NoiseHandshake(alice, True, bob.peer_id)
    responder = NoiseHandshake(bob, False)
    async with asyncio.timeout(5):
        await asyncio.gather(
            perform_handshake(left, initiator), perform_handshake(right, responder)
        )
    one = SecureChannel(StreamChannel(left), initiator.transport())
    two = SecureChannel(StreamChannel(right), responder.transport())
    return one, two, alice, bob


async def test_handshake_over_streams_then_encrypted_bytes_both_ways() -> None:
    one, two, _, _ = await _secure_pair()
    one_in, two_in = Collector(), Collector()
    try:
        # Before start(): the channel is a Stream (as used for the muxer negotiation).
        await one.prelude.write(b"negotiate")
        assert await two.prelude.readexactly(9) == b"negotiate"
        await one.prelude.write(b"left over")  # arrives before start(): must not be lost
        await asyncio.sleep(0)
        one.start(one_in)
        two.start(two_in)
        assert await two_in.wait_for(9) == b"left over"
        payload = bytes(range(256)) * 1000
        one.write(payload)
        two.write(b"reply")
        await one.drain()
        assert await two_in.wait_for(9 + len(payload)) == b"left over" + payload
        assert await one_in.wait_for(5) == b"reply"
        one.close()
        async with asyncio.timeout(5):
            await two_in.eof.wait()
            await one.wait_closed()
    finally:
        one.abort()
        two.abort()


async def test_handshake_with_wrong_peer_fails_on_both_sides() -> None:
    alice, bob, carol = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()
    left, right = memory_stream_pair()
    initiator = NoiseHandshake(alice, True, carol.peer_id)
    responder = NoiseHandshake(bob, False)

    async def dial() -> None:
        try:
            await perform_handshake(left, initiator)
        finally:
            left.reset("handshake failed")

    async with asyncio.timeout(5):
        results = await asyncio.gather(
            dial(), perform_handshake(right, responder), return_exceptions=True
        )
    assert isinstance(results[0], PeerIdMismatch)
    assert isinstance(results[1], HandshakeFailed)
    assert "broke during the Noise handshake" in str(results[1])
    assert responder.remote_peer is None


async def test_remote_closing_mid_handshake_is_a_clear_error() -> None:
    left, right = memory_stream_pair()
    responder = NoiseHandshake(KeyPair.generate(), False)
    first = NoiseHandshake(KeyPair.generate(), True).data_to_send()
    await left.write(first[:20])  # a truncated first message, then the dialer gives up
    await left.close()
    with pytest.raises(HandshakeFailed, match=r"closed the connection in the middle") as failure:
        async with asyncio.timeout(5):
            await perform_handshake(right, responder)
    assert "message 1 of 3" in str(failure.value)


async def test_garbage_instead_of_a_handshake_is_refused() -> None:
    left, right = memory_stream_pair()
    initiator = NoiseHandshake(KeyPair.generate(), True)
    await right.write(b"\x00\x60" + b"HTTP/1.1 200 OK\r\n" * 6)  # 96 bytes of not-Noise
    with pytest.raises(HandshakeFailed, match="failed authentication"):
        async with asyncio.timeout(5):
            await perform_handshake(left, initiator)


async def test_corrupted_transport_message_drops_the_channel() -> None:
    one, two, _, _ = await _secure_pair()
    received = Collector()
    try:
        two.start(received)
        raw = one.raw
        assert isinstance(raw, StreamChannel)
        frame = bytearray(one.noise.encrypt(b"secret"))
        frame[5] ^= 0xFF
        raw.write(bytes(frame))
        async with asyncio.timeout(5):
            await received.lost_event.wait()
        assert isinstance(received.lost[0], ProtocolViolation)
        assert "failed authentication" in str(received.lost[0])
        assert not received.data
        with pytest.raises(ConnectionClosed):
            await two.drain()
    finally:
        one.abort()
        two.abort()


async def test_lazy_multistream_confirmation_is_checked_then_stripped() -> None:
    from transport.multistream import select_inbound, select_outbound

    one, two, _, _ = await _secure_pair()
    one_in, two_in = Collector(), Collector()
    try:
        await select_outbound(one.prelude, ["/yamux/1.0.0"])  # lazy: returns at once
        one.start(one_in)  # the listener's answer is still owed
        one.write(b"first frames")
        assert await select_inbound(two.prelude, ["/yamux/1.0.0"]) == "/yamux/1.0.0"
        two.start(two_in)
        assert await two_in.wait_for(12) == b"first frames"
        two.write(b"answer")
        assert await one_in.wait_for(6) == b"answer"  # the confirmation never reaches it
    finally:
        one.abort()
        two.abort()


async def test_lazy_multistream_refusal_drops_the_channel() -> None:
    from transport.errors import ProtocolNotSupported
    from transport.multistream import select_inbound, select_outbound

    one, two, _, _ = await _secure_pair()
    one_in = Collector()
    try:
        await select_outbound(one.prelude, ["/yamux/1.0.0"])
        one.start(one_in)
        with pytest.raises(ProtocolNotSupported):
            async with asyncio.timeout(5):
                await select_inbound(two.prelude, ["/mplex/6.7.0"])
        async with asyncio.timeout(5):
            await one_in.lost_event.wait()
        assert isinstance(one_in.lost[0], ProtocolNotSupported)
    finally:
        one.abort()
        two.abort()
