"""multistream-select over in-memory streams: negotiation, refusal, laziness, bad input."""

from __future__ import annotations

import asyncio

import pytest

from tests.transport.conftest import wait_until
from transport.errors import MessageTooLarge, ProtocolNotSupported, ProtocolViolation
from transport.memory import MemoryStream, memory_stream_pair
from transport.multistream import (
    MAX_PROPOSALS,
    encode_message,
    encode_messages,
    select_inbound,
    select_inbound_now,
    select_outbound,
)
from transport.varint import encode_length_prefixed


async def test_first_supported_protocol_wins() -> None:
    dialer, listener = memory_stream_pair()
    chosen, accepted = await asyncio.gather(
        select_outbound(dialer, ["/a/1", "/b/1", "/c/1"]),
        select_inbound(listener, ["/b/1", "/c/1"]),
    )
    assert chosen == accepted == "/b/1"
    await dialer.write(b"payload")
    assert await listener.readexactly(7) == b"payload"


async def test_lazy_negotiation_sends_data_without_waiting() -> None:
    dialer, listener = memory_stream_pair()
    assert await select_outbound(dialer, ["/echo/1"]) == "/echo/1"
    await dialer.write(b"early data")  # before the listener answered anything
    assert await select_inbound(listener, ["/echo/1"]) == "/echo/1"
    assert await listener.readexactly(10) == b"early data"
    await listener.write(b"reply")
    assert await dialer.readexactly(5) == b"reply"  # the confirmation is checked here


async def test_lazy_refusal_surfaces_on_first_read() -> None:
    dialer, listener = memory_stream_pair()
    await select_outbound(dialer, ["/nope/1"])
    inbound = asyncio.ensure_future(select_inbound(listener, ["/echo/1"]))
    with pytest.raises(ProtocolNotSupported, match="/nope/1"):
        await dialer.read()
    with pytest.raises(ProtocolNotSupported):
        await inbound


async def test_eager_refusal_of_every_proposal() -> None:
    dialer, listener = memory_stream_pair()
    inbound = asyncio.ensure_future(select_inbound(listener, ["/x/1"]))
    with pytest.raises(ProtocolNotSupported):
        await select_outbound(dialer, ["/a/1", "/b/1"])
    with pytest.raises((ProtocolNotSupported, ProtocolViolation)):
        await inbound


async def test_ls_lists_protocols() -> None:
    dialer, listener = memory_stream_pair()
    inbound = asyncio.ensure_future(select_inbound(listener, ["/a/1", "/b/1"]))
    await dialer.write(encode_message("/multistream/1.0.0") + encode_message("ls"))
    assert await dialer.read_message() == b"/multistream/1.0.0\n"
    listing = await dialer.read_message()
    assert b"/a/1\n" in listing and b"/b/1\n" in listing
    dialer.reset()
    with pytest.raises(Exception):  # noqa: B017  (any error: the dialer walked away)
        await inbound


@pytest.mark.parametrize(
    "wire",
    [
        encode_message("/not-multistream/1.0.0"),
        encode_length_prefixed(b"/multistream/1.0.0"),  # no newline
        encode_length_prefixed(b"\xff\xfe\n"),  # not UTF-8
    ],
)
async def test_malformed_headers_are_refused(wire: bytes) -> None:
    dialer, listener = memory_stream_pair()
    await dialer.write(wire)
    with pytest.raises(ProtocolViolation):
        await select_inbound(listener, ["/a/1"])


async def test_oversized_protocol_id_is_refused() -> None:
    dialer, listener = memory_stream_pair()
    await dialer.write(encode_message("/multistream/1.0.0") + encode_message("/" + "x" * 5000))
    with pytest.raises(MessageTooLarge):
        await select_inbound(listener, ["/a/1"])


async def test_endless_proposals_are_cut_off() -> None:
    dialer, listener = memory_stream_pair()
    proposals = b"".join(encode_message(f"/p/{i}") for i in range(MAX_PROPOSALS + 5))
    await dialer.write(encode_message("/multistream/1.0.0") + proposals)
    with pytest.raises(ProtocolViolation, match="giving up"):
        await select_inbound(listener, ["/a/1"])


async def test_lazy_confirmation_split_across_reads_is_still_checked() -> None:
    """The dialer's fast path takes the whole echo at once; a partial one is parsed as it
    comes, and a wrong one is refused either way."""
    dialer, listener = memory_stream_pair()
    await select_outbound(dialer, ["/echo/1"])
    echo = encode_message("/multistream/1.0.0") + encode_message("/echo/1")
    reading = asyncio.ensure_future(dialer.read())
    await listener.write(echo[:5])
    await asyncio.sleep(0)
    assert not reading.done()
    await listener.write(echo[5:] + b"reply")
    assert await reading == b"reply"

    dialer, listener = memory_stream_pair()
    await select_outbound(dialer, ["/echo/1"])
    await listener.write(encode_message("/multistream/1.0.0") + encode_message("/other/1"))
    with pytest.raises(ProtocolViolation, match="/other/1"):
        await dialer.read()


class HoldingStream(MemoryStream):
    """An in-memory stream that, like QUIC's, sends held bytes ahead of its next write or FIN;
    it counts its writes, as a transport would count packets."""

    holds_unsent = True
    writes: list[bytes]

    async def write(self, data: bytes) -> None:
        self.writes = getattr(self, "writes", [])
        self.writes.append(self._take_unsent() + bytes(data))
        await super().write(self.writes[-1])

    async def close(self) -> None:
        if self._unsent:
            await self.write(b"")
        await super().close()


def holding_pair() -> tuple[MemoryStream, HoldingStream]:
    dialer, listener = memory_stream_pair()
    held = HoldingStream(listener.remote_peer, 1 << 20)
    held.peer, dialer.peer = dialer, held
    return dialer, held


async def test_a_lazy_dialers_confirmation_travels_with_the_reply() -> None:
    dialer, listener = holding_pair()
    await select_outbound(dialer, ["/echo/1"])
    await dialer.write(b"ping")  # the dialer's data came with its proposal: it is lazy
    assert await select_inbound(listener, ["/echo/1"]) == "/echo/1"
    assert not getattr(listener, "writes", [])  # nothing sent yet
    assert await listener.readexactly(4) == b"ping"
    await listener.write(b"pong")
    assert listener.writes == [
        encode_message("/multistream/1.0.0") + encode_message("/echo/1") + b"pong"
    ]
    assert await dialer.readexactly(4) == b"pong"


async def test_a_held_confirmation_goes_out_with_the_close() -> None:
    dialer, listener = holding_pair()
    await select_outbound(dialer, ["/sink/1"])
    await dialer.write(b"data")
    await select_inbound(listener, ["/sink/1"])
    await listener.close()  # a listener that never replies still confirms, then ends
    assert await dialer.read() == b""  # confirmation checked, then the end


async def test_an_eager_dialer_gets_its_confirmation_at_once() -> None:
    dialer, listener = holding_pair()
    inbound = asyncio.ensure_future(select_inbound(listener, ["/b/1"]))
    assert await select_outbound(dialer, ["/a/1", "/b/1"]) == "/b/1"  # waits for each answer
    assert await inbound == "/b/1"
    assert listener.writes[0] == encode_message("/multistream/1.0.0") + encode_message("na")


def test_only_a_transport_that_holds_bytes_accepts_them() -> None:
    _, plain = memory_stream_pair()
    with pytest.raises(RuntimeError, match="cannot hold"):
        plain.hold(b"x")


async def test_a_whole_lazy_proposal_is_selected_without_waiting() -> None:
    dialer, listener = holding_pair()
    await select_outbound(dialer, ["/echo/1"])
    await dialer.write(b"ping")  # header, proposal and data in the listener's buffer
    assert select_inbound_now(listener, {"/echo/1": None, "/other/1": None}) == "/echo/1"
    assert listener.protocol == "/echo/1"
    assert bytes(listener._buffer) == b"ping"  # only the negotiation was consumed
    await listener.write(b"pong")  # the confirmation travels with the reply
    assert listener.writes == [encode_messages("/multistream/1.0.0", "/echo/1") + b"pong"]
    assert await dialer.readexactly(4) == b"pong"


@pytest.mark.parametrize(
    "case", ["no data after it", "unsupported", "cut in the proposal", "no newline", "eager"]
)
async def test_anything_else_is_left_to_select_inbound(case: str) -> None:
    """Where waiting or answering may be needed, nothing is consumed and the full negotiation
    (with its timeout and its errors) runs as before."""
    dialer, listener = holding_pair()
    header = encode_message("/multistream/1.0.0")
    wire = {
        "no data after it": header + encode_message("/echo/1"),
        "unsupported": header + encode_message("/nope/1") + b"ping",
        "cut in the proposal": header + encode_message("/echo/1")[:4],
        "no newline": header + encode_length_prefixed(b"/echo/1x") + b"ping",
        "eager": header,
    }[case]
    await dialer.write(wire)
    await wait_until(lambda: len(listener._buffer) == len(wire))
    assert select_inbound_now(listener, ["/echo/1"]) is None
    assert bytes(listener._buffer) == wire
    _, plain = memory_stream_pair()  # a transport that cannot hold the answer: never
    plain._buffer += header + encode_message("/echo/1") + b"ping"
    assert select_inbound_now(plain, ["/echo/1"]) is None
