"""Circuit relay v2 wire and bookkeeping, free of I/O: messages, statuses, addresses, quotas."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from transport.errors import DialError, InvalidMultiaddr, InvalidPeerId, ProtocolViolation
from transport.identity import PeerId
from transport.multiaddr import Multiaddr
from transport.nat.pb import circuit_pb2
from transport.nat.relay.config import RelayConfig

HOP_PROTOCOL = "/libp2p/circuit/relay/0.2.0/hop"  # circuit-v2 spec
STOP_PROTOCOL = "/libp2p/circuit/relay/0.2.0/stop"  # circuit-v2 spec
VOUCHER_DOMAIN = "libp2p-relay-rsvp"  # circuit-v2 spec
VOUCHER_PAYLOAD_TYPE = bytes([0x03, 0x02])  # multicodec 0x0302 as a uvarint
MAX_MESSAGE_SIZE = 4096  # go-libp2p's limit for relay control messages

Status = circuit_pb2.Status
HopMessage = circuit_pb2.HopMessage
StopMessage = circuit_pb2.StopMessage


class RelayError(DialError):
    """The relay (or the target through it) refused; `status` is the spec's code."""

    def __init__(self, status: int, detail: str = "") -> None:
        self.status = status
        name = Status.Name(status) if status in Status.values() else str(status)
        super().__init__(f"relay refused: {name}" + (f" ({detail})" if detail else ""))


@dataclass(frozen=True)
class Limit:
    duration: float = 0.0  # seconds; 0 = none
    data: int = 0  # bytes per direction; 0 = none

    def to_pb(self) -> circuit_pb2.Limit:
        return circuit_pb2.Limit(duration=int(self.duration), data=self.data)

    @classmethod
    def from_pb(cls, message: HopMessage | StopMessage) -> Limit | None:
        if not message.HasField("limit"):
            return None
        return cls(duration=float(message.limit.duration), data=int(message.limit.data))

    @classmethod
    def from_config(cls, config: RelayConfig) -> Limit:
        return cls(duration=config.circuit_duration, data=config.circuit_data)


def parse_hop(data: bytes) -> HopMessage:
    message = HopMessage()
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise ProtocolViolation(f"relay: malformed HopMessage: {exc}") from exc
    if not message.HasField("type"):
        raise ProtocolViolation("relay: HopMessage without a type")
    return message


def parse_stop(data: bytes) -> StopMessage:
    message = StopMessage()
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise ProtocolViolation(f"relay: malformed StopMessage: {exc}") from exc
    if not message.HasField("type"):
        raise ProtocolViolation("relay: StopMessage without a type")
    return message


def peer_of(message: HopMessage | StopMessage) -> PeerId:
    if not message.HasField("peer") or not message.peer.HasField("id"):
        raise ProtocolViolation("relay: message names no peer")
    try:
        return PeerId.from_bytes(message.peer.id)
    except InvalidPeerId as exc:
        raise ProtocolViolation(f"relay: bad peer ID: {exc}") from exc


def hop_status(status: int, limit: Limit | None = None) -> bytes:
    message = HopMessage(type=HopMessage.STATUS, status=status)
    if limit is not None:
        message.limit.CopyFrom(limit.to_pb())
    return message.SerializeToString()


def stop_status(status: int) -> bytes:
    return StopMessage(type=StopMessage.STATUS, status=status).SerializeToString()


# -- addresses --------------------------------------------------------------------------------
def split_circuit_addr(addr: Multiaddr) -> tuple[Multiaddr, PeerId | None]:
    """`<relay addr>/p2p-circuit[/p2p/<target>]` -> (relay addr with its /p2p, target)."""
    components = addr.components
    index = next((i for i, (name, _) in enumerate(components) if name == "p2p-circuit"), None)
    if index is None:
        raise InvalidMultiaddr(f"{addr} is not a relay address (no /p2p-circuit)")
    relay = Multiaddr(components[:index])
    if relay.peer_id is None:
        raise InvalidMultiaddr(f"{addr}: the relay part must end in /p2p/<relay id>")
    rest = Multiaddr(components[index + 1 :])
    return relay, rest.peer_id


def circuit_addr(relay_addr: Multiaddr, relay: PeerId) -> Multiaddr:
    """Our address through `relay`: `<relay addr>/p2p/<relay>/p2p-circuit`."""
    return relay_addr.with_peer_id(relay) / "/p2p-circuit"


# -- the relay's books ------------------------------------------------------------------------
@dataclass
class Reservation:
    peer: PeerId
    ip: str
    expire: float  # Unix time


@dataclass
class RelayBooks:
    """Reservations and circuits a relay holds, with its quotas. Time is injectable."""

    config: RelayConfig
    clock: object = time.time
    reservations: dict[PeerId, Reservation] = field(default_factory=dict)
    circuits_by_peer: Counter[PeerId] = field(default_factory=Counter)
    circuits: int = 0

    def now(self) -> float:
        return self.clock()  # type: ignore[operator]

    def expire_old(self) -> None:
        now = self.now()
        for peer in [p for p, r in self.reservations.items() if r.expire <= now]:
            del self.reservations[peer]

    def reserve(self, peer: PeerId, ip: str) -> Reservation:
        """Grant or refresh a reservation; `RelayError(RESERVATION_REFUSED)` over a quota."""
        self.expire_old()
        existing = self.reservations.get(peer)
        if existing is None:
            if len(self.reservations) >= self.config.max_reservations:
                raise RelayError(Status.RESERVATION_REFUSED, "relay is full")
            same_ip = sum(1 for r in self.reservations.values() if r.ip == ip)
            if same_ip >= self.config.max_reservations_per_ip:
                raise RelayError(Status.RESERVATION_REFUSED, f"too many reservations from {ip}")
        reservation = Reservation(peer, ip, self.now() + self.config.reservation_ttl)
        self.reservations[peer] = reservation
        return reservation

    def has_reservation(self, peer: PeerId) -> bool:
        reservation = self.reservations.get(peer)
        return reservation is not None and reservation.expire > self.now()

    def drop(self, peer: PeerId) -> None:
        self.reservations.pop(peer, None)

    def open_circuit(self, source: PeerId, target: PeerId) -> None:
        if self.circuits >= self.config.max_circuits:
            raise RelayError(Status.RESOURCE_LIMIT_EXCEEDED, "relay carries too many circuits")
        for peer in (source, target):
            if self.circuits_by_peer[peer] >= self.config.max_circuits_per_peer:
                raise RelayError(Status.RESOURCE_LIMIT_EXCEEDED, f"too many circuits for {peer}")
        self.circuits += 1
        self.circuits_by_peer[source] += 1
        self.circuits_by_peer[target] += 1

    def close_circuit(self, source: PeerId, target: PeerId) -> None:
        self.circuits -= 1
        for peer in (source, target):
            self.circuits_by_peer[peer] -= 1
            if self.circuits_by_peer[peer] <= 0:
                del self.circuits_by_peer[peer]
