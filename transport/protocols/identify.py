"""libp2p identify (`/ipfs/id/1.0.0`): who the remote is, what it speaks, how it sees us.

The responder writes one length-prefixed `Identify` message and closes. The observed address
(the address the remote saw our packets come from) is what NAT traversal starts from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from transport.errors import InvalidMultiaddr, InvalidPeerId, ProtocolViolation
from transport.identity import PeerId, PublicKey
from transport.multiaddr import Multiaddr
from transport.pb import identify_pb2
from transport.stream import Stream

log = logging.getLogger(__name__)

PROTOCOL = "/ipfs/id/1.0.0"  # identify spec
PUSH_PROTOCOL = "/ipfs/id/push/1.0.0"  # identify spec
MAX_MESSAGE_SIZE = 64 * 1024  # rust-libp2p allows 4 KiB; we are a little more lenient
MAX_ADDRS = 64
MAX_PROTOCOLS = 256


@dataclass(frozen=True)
class IdentifyInfo:
    """What a peer told us about itself."""

    peer: PeerId
    protocol_version: str = ""
    agent_version: str = ""
    listen_addrs: list[Multiaddr] = field(default_factory=list)
    observed_addr: Multiaddr | None = None
    protocols: list[str] = field(default_factory=list)


def encode_identify(
    public_key: PublicKey,
    listen_addrs: list[Multiaddr],
    observed_addr: Multiaddr | None,
    protocols: list[str],
    protocol_version: str,
    agent_version: str,
) -> bytes:
    message = identify_pb2.Identify(
        protocolVersion=protocol_version,
        agentVersion=agent_version,
        publicKey=public_key.to_protobuf(),
        listenAddrs=[addr.without_peer_id().to_bytes() for addr in listen_addrs],
        protocols=protocols,
    )
    if observed_addr is not None:
        message.observedAddr = observed_addr.without_peer_id().to_bytes()
    return message.SerializeToString()


def decode_identify(data: bytes, remote_peer: PeerId) -> IdentifyInfo:
    """Parse and check an Identify message; the key in it must be the remote's."""
    message = identify_pb2.Identify()
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise ProtocolViolation(f"identify: malformed message: {exc}") from exc
    if message.HasField("publicKey"):
        try:
            key = PublicKey.from_protobuf(message.publicKey)
        except InvalidPeerId as exc:
            raise ProtocolViolation(f"identify: bad public key: {exc}") from exc
        if key.peer_id() != remote_peer:
            raise ProtocolViolation(
                f"identify: public key belongs to {key.peer_id()}, not to {remote_peer}"
            )
    listen_addrs = []
    for raw in message.listenAddrs[:MAX_ADDRS]:
        try:
            listen_addrs.append(Multiaddr.from_bytes(raw))
        except InvalidMultiaddr as exc:
            log.debug("identify from %s: skipping listen address: %s", remote_peer.short(), exc)
    observed = None
    if message.HasField("observedAddr"):
        try:
            observed = Multiaddr.from_bytes(message.observedAddr)
        except InvalidMultiaddr as exc:
            log.debug("identify from %s: bad observed address: %s", remote_peer.short(), exc)
    return IdentifyInfo(
        peer=remote_peer,
        protocol_version=message.protocolVersion,
        agent_version=message.agentVersion,
        listen_addrs=listen_addrs,
        observed_addr=observed,
        protocols=list(message.protocols[:MAX_PROTOCOLS]),
    )


async def read_pushed_identify(stream: Stream) -> IdentifyInfo:
    """The message a peer pushed to us (`/ipfs/id/push/1.0.0`) because something changed."""
    assert stream.remote_peer is not None
    data = await stream.read_message(MAX_MESSAGE_SIZE)
    await stream.close()
    return decode_identify(data, stream.remote_peer)


async def read_identify(stream: Stream) -> IdentifyInfo:
    """The responder's message from an identify stream we opened."""
    assert stream.remote_peer is not None
    data = await stream.read_message(MAX_MESSAGE_SIZE)
    info = decode_identify(data, stream.remote_peer)
    await stream.close()
    return info
