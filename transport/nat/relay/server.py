"""The relay side of circuit relay v2: grant reservations, splice circuits within limits."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from transport.connection import RELAYED
from transport.envelope import seal
from transport.errors import TransportError
from transport.identity import PeerId
from transport.multiaddr import Multiaddr
from transport.nat.pb import circuit_pb2
from transport.nat.relay.config import RelayConfig
from transport.nat.relay.protocol import (
    HOP_PROTOCOL,
    MAX_MESSAGE_SIZE,
    STOP_PROTOCOL,
    VOUCHER_DOMAIN,
    VOUCHER_PAYLOAD_TYPE,
    HopMessage,
    Limit,
    RelayBooks,
    RelayError,
    Status,
    StopMessage,
    parse_hop,
    parse_stop,
    peer_of,
)
from transport.stream import Stream
from transport.swarm import Swarm

log = logging.getLogger(__name__)

SPLICE_CHUNK = 64 * 1024


class RelayServer:
    """Serves `/libp2p/circuit/relay/0.2.0/hop` on a swarm."""

    def __init__(
        self,
        swarm: Swarm,
        config: RelayConfig | None = None,
        public_addrs: Callable[[], list[Multiaddr]] | None = None,
    ) -> None:
        self.swarm = swarm
        self.config = config or RelayConfig()
        self.books = RelayBooks(self.config)
        self._public_addrs = public_addrs or (lambda: swarm.addrs)
        self.bytes_relayed = 0

    def start(self) -> None:
        if self.config.enabled:
            self.swarm.set_stream_handler(HOP_PROTOCOL, self._serve_hop)

    def stop(self) -> None:
        self.swarm.remove_stream_handler(HOP_PROTOCOL)

    async def _serve_hop(self, stream: Stream) -> None:
        source = stream.remote_peer
        assert source is not None
        try:
            message = parse_hop(await stream.read_message(MAX_MESSAGE_SIZE))
        except TransportError as exc:
            log.info("relay: bad hop message from %s: %s", source, exc)
            await self._answer(stream, Status.MALFORMED_MESSAGE)
            return
        connection = self.swarm.connection_to(source)
        if connection is not None and connection.path == RELAYED:
            # circuit-v2: "should not accept reservations or connections over relayed ones"
            await self._answer(stream, Status.PERMISSION_DENIED)
            return
        if message.type == HopMessage.RESERVE:
            await self._reserve(stream, source, connection)
        elif message.type == HopMessage.CONNECT:
            await self._connect(stream, source, message)
        else:
            await self._answer(stream, Status.UNEXPECTED_MESSAGE)

    async def _answer(self, stream: Stream, status: int) -> None:
        await stream.write_message(
            HopMessage(type=HopMessage.STATUS, status=status).SerializeToString()
        )
        await stream.close()

    async def _reserve(self, stream: Stream, peer: PeerId, connection) -> None:
        address = getattr(connection, "remote_addr", None)
        ip = (address.value_for("ip4") or address.value_for("ip6") or "") if address else ""
        try:
            reservation = self.books.reserve(peer, ip)
        except RelayError as exc:
            log.info("relay: refusing reservation of %s: %s", peer, exc)
            await self._answer(stream, exc.status)
            return
        expire = int(reservation.expire)
        voucher = circuit_pb2.Voucher(
            relay=self.swarm.peer_id.multihash, peer=peer.multihash, expiration=expire
        ).SerializeToString(deterministic=True)
        reply = HopMessage(type=HopMessage.STATUS, status=Status.OK)
        reply.reservation.expire = expire
        reply.reservation.addrs.extend(
            addr.with_peer_id(self.swarm.peer_id).to_bytes()
            for addr in self._public_addrs()
            if not addr.is_relayed
        )
        reply.reservation.voucher = seal(
            self.swarm.key, VOUCHER_DOMAIN, VOUCHER_PAYLOAD_TYPE, voucher
        )
        reply.limit.CopyFrom(Limit.from_config(self.config).to_pb())
        log.debug("relay: reservation for %s until %d", peer, expire)
        await stream.write_message(reply.SerializeToString())
        await stream.close()

    async def _connect(self, source_stream: Stream, source: PeerId, message: HopMessage) -> None:
        try:
            target = peer_of(message)
        except TransportError:
            await self._answer(source_stream, Status.MALFORMED_MESSAGE)
            return
        target_connection = self.swarm.connection_to(target)
        if not self.books.has_reservation(target) or target_connection is None:
            await self._answer(source_stream, Status.NO_RESERVATION)
            return
        try:
            self.books.open_circuit(source, target)
        except RelayError as exc:
            await self._answer(source_stream, exc.status)
            return
        try:
            target_stream = await self._open_stop(source, target)
        except RelayError as exc:
            self.books.close_circuit(source, target)
            await self._answer(source_stream, exc.status)
            return
        limit = Limit.from_config(self.config)
        reply = HopMessage(type=HopMessage.STATUS, status=Status.OK)
        reply.limit.CopyFrom(limit.to_pb())
        try:
            await source_stream.write_message(reply.SerializeToString())
            await self._splice(source_stream, target_stream, limit)
        finally:
            self.books.close_circuit(source, target)

    async def _open_stop(self, source: PeerId, target: PeerId) -> Stream:
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                stream = await self.swarm.open_stream(target, [STOP_PROTOCOL])
                request = StopMessage(type=StopMessage.CONNECT)
                request.peer.id = source.multihash
                request.limit.CopyFrom(Limit.from_config(self.config).to_pb())
                await stream.write_message(request.SerializeToString())
                answer = parse_stop(await stream.read_message(MAX_MESSAGE_SIZE))
        except (TransportError, TimeoutError, EOFError) as exc:
            log.info("relay: target %s did not take the circuit: %r", target, exc)
            raise RelayError(Status.CONNECTION_FAILED, str(exc)) from exc
        if answer.type != StopMessage.STATUS or answer.status != Status.OK:
            stream.reset("refused")
            raise RelayError(Status.CONNECTION_FAILED, f"target answered {answer.status}")
        return stream

    async def _splice(self, a: Stream, b: Stream, limit: Limit) -> None:
        """Copy both ways until both ends close; reset both when a limit is crossed."""

        async def pump(source: Stream, sink: Stream) -> None:
            moved = 0
            while chunk := await source.read(SPLICE_CHUNK):
                moved += len(chunk)
                if limit.data and moved > limit.data:
                    raise RelayError(Status.RESOURCE_LIMIT_EXCEEDED, "circuit data limit")
                await sink.write(chunk)
                self.bytes_relayed += len(chunk)
            await sink.close()

        try:
            async with asyncio.timeout(limit.duration or None), asyncio.TaskGroup() as group:
                group.create_task(pump(a, b))
                group.create_task(pump(b, a))
        except* (TransportError, TimeoutError, EOFError, ConnectionError) as failure:
            log.debug("relay: circuit cut: %r", failure.exceptions[0])
            a.reset("circuit cut by the relay")
            b.reset("circuit cut by the relay")
