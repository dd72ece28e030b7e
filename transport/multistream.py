"""multistream-select 1.0: which protocol a new stream speaks.

Messages are varint-length-prefixed and end in "\\n"; both sides first send the header
"/multistream/1.0.0". The initiator proposes protocols one by one; the listener echoes the one
it accepts or answers "na". With one proposal the initiator is *lazy* (as rust-libp2p's
V1Lazy): it sends header, proposal and its first data at once and checks the answer on its
first read, saving a round trip per stream. A listener whose dialer was lazy (its data came
with the proposal) sends its confirmation with its first reply, on transports that can hold
bytes for the next write (`Stream.holds_unsent`): one packet for both.
"""

from __future__ import annotations

from collections.abc import Collection
from functools import lru_cache

from transport.errors import ProtocolNotSupported, ProtocolViolation, StreamReset
from transport.stream import Stream
from transport.varint import VarintError, encode_length_prefixed, try_decode_varint

MULTISTREAM_PROTOCOL = "/multistream/1.0.0"  # multistream-select spec
NOT_AVAILABLE = "na"  # multistream-select spec
LIST = "ls"
MAX_PROTOCOL_ID_LENGTH = 1024  # a longer protocol ID is an attack, not a protocol
MAX_PROPOSALS = 32  # proposals a listener answers before giving up on the stream


def encode_message(text: str) -> bytes:
    """One multistream message: varint length, the text, a newline."""
    return encode_length_prefixed(text.encode("utf-8") + b"\n")


def decode_message(body: bytes) -> str:
    """The text of one message body (without its length prefix)."""
    if not body.endswith(b"\n"):
        raise ProtocolViolation("multistream message does not end in a newline")
    try:
        return body[:-1].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolViolation("multistream message is not UTF-8") from exc


_HEADER = encode_message(MULTISTREAM_PROTOCOL)  # every negotiation starts with it


@lru_cache(maxsize=256)
def encode_messages(*texts: str) -> bytes:
    """Several messages back to back (the header and a proposal, or their echo), memoized:
    every stream of a protocol sends the same ones."""
    return b"".join(encode_message(text) for text in texts)


async def _read_text(stream: Stream) -> str:
    return decode_message(await stream._read_message_raw(MAX_PROTOCOL_ID_LENGTH + 1))


def confirmed_now(stream: Stream, expected: list[str]) -> bool:
    """True (and consumed) if the listener's answers to our lazy proposals are all here and
    as expected: the usual case, checked without parsing. Else `read_confirmation`."""
    echo = encode_messages(*expected)
    if stream._buffer.startswith(echo):
        del stream._buffer[: len(echo)]
        stream._on_consumed(len(echo))
        return True
    return False


async def read_confirmation(stream: Stream, expected: list[str]) -> None:
    """Check the listener's answers to proposals we sent without waiting (lazy mode)."""
    if confirmed_now(stream, expected):
        return
    for want in expected:
        answer = await _read_text(stream)
        if answer == want:
            continue
        if answer == NOT_AVAILABLE:
            stream.reset("protocol not supported")
            raise ProtocolNotSupported([want], stream.remote_peer)
        stream.reset("multistream violation")
        raise ProtocolViolation(f"multistream: expected {want!r}, got {answer!r}")


async def select_outbound(stream: Stream, protocols: list[str], lazy: bool = True) -> str:
    """Propose `protocols` in order; return the one the remote accepted.

    With one protocol and `lazy`, returns at once; the answer is checked on the first read.
    """
    if not protocols:
        raise ValueError("propose at least one protocol")
    if lazy and len(protocols) == 1:
        await stream.write(encode_messages(MULTISTREAM_PROTOCOL, protocols[0]))
        stream._pending_confirmation = [MULTISTREAM_PROTOCOL, protocols[0]]
        stream.protocol = protocols[0]
        return protocols[0]
    await stream.write(_HEADER + encode_message(protocols[0]))
    await read_confirmation(stream, [MULTISTREAM_PROTOCOL])
    for index, protocol in enumerate(protocols):
        if index:
            await stream.write(encode_message(protocol))
        answer = await _read_text(stream)
        if answer == protocol:
            stream.protocol = protocol
            return protocol
        if answer != NOT_AVAILABLE:
            stream.reset("multistream violation")
            raise ProtocolViolation(f"multistream: proposed {protocol!r}, got {answer!r}")
    stream.reset("no common protocol")
    raise ProtocolNotSupported(protocols, stream.remote_peer)


def select_inbound_now(stream: Stream, supported: Collection[str]) -> str | None:
    """The common case of `select_inbound` without waiting: a lazy dialer's header, a proposal
    we support and its first data all came in one piece. Consumes them, holds our answer for
    the first reply and returns the protocol; None (nothing consumed) in every other case."""
    buffer = stream._buffer
    if not stream.holds_unsent or not buffer.startswith(_HEADER):
        return None
    try:
        decoded = try_decode_varint(buffer, len(_HEADER))
    except VarintError:
        return None  # `select_inbound` reports it
    if decoded is None:
        return None
    length, start = decoded
    end = start + length
    if length > MAX_PROTOCOL_ID_LENGTH + 1 or len(buffer) <= end or buffer[end - 1] != 0x0A:
        return None  # too long, not whole, no data after it (the dialer may wait), or bad
    try:
        proposal = bytes(buffer[start : end - 1]).decode("utf-8")
    except UnicodeDecodeError:
        return None
    if proposal not in supported:
        return None
    del buffer[:end]
    stream._on_consumed(end)
    stream.hold(encode_messages(MULTISTREAM_PROTOCOL, proposal))
    stream.protocol = proposal
    return proposal


async def select_inbound(stream: Stream, supported: Collection[str]) -> str:
    """Answer the remote's proposals; return the first one we support.

    Raises `ProtocolNotSupported` when the remote gives up (closes) and `ProtocolViolation`
    on malformed messages or after `MAX_PROPOSALS` refusals.
    """
    header = await _read_text(stream)
    if header != MULTISTREAM_PROTOCOL:
        stream.reset("multistream violation")
        raise ProtocolViolation(f"multistream: expected header, got {header!r}")
    unsent = _HEADER  # our header goes with our first answer
    refused: list[str] = []
    for _ in range(MAX_PROPOSALS):
        if unsent and not stream._buffer:  # the dialer may wait for our header to propose
            await stream.write(unsent)
            unsent = b""
        try:
            proposal = await _read_text(stream)
        except (EOFError, StreamReset) as exc:  # the remote gave up after our refusals
            raise ProtocolNotSupported(refused, stream.remote_peer) from exc
        except ProtocolViolation as exc:
            if refused:  # a lazy dialer's early data, sent before it saw our "na"
                raise ProtocolNotSupported(refused, stream.remote_peer) from exc
            raise
        if proposal in supported:
            answer = unsent + encode_messages(proposal)
            if stream.holds_unsent and stream._buffer:  # a lazy dialer: its data is here
                stream.hold(answer)  # the confirmation travels with our reply
            else:
                await stream.write(answer)
            stream.protocol = proposal
            return proposal
        if proposal == LIST:
            listing = b"".join(encode_message(p) for p in sorted(supported))
            await stream.write(unsent + encode_length_prefixed(listing))
            unsent = b""
            continue
        refused.append(proposal)
        await stream.write(unsent + encode_message(NOT_AVAILABLE))
        unsent = b""
    stream.reset("too many protocol proposals")
    raise ProtocolViolation(f"multistream: refused {len(refused)} proposals, giving up")
