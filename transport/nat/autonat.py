"""AutoNAT v1 (`/libp2p/autonat/1.0.0`): ask peers to dial us back, to learn if we are public.

The server dials back from a FRESH socket (another local port): a dial-back from the socket we
are already connected to would slip through any port-restricted NAT's existing mapping and
call a NAT'd node public. Per the spec it dials only addresses on the IP it observes the
requester at, never over relayed connections (no amplification against third parties).
QUIC and TCP addresses are both dialed back, at once, each transport from a fresh port and a
throwaway identity; the first to answer is the verdict.
"""

from __future__ import annotations

import asyncio
import logging

from google.protobuf.message import DecodeError

from transport.connection import RELAYED, Connection
from transport.errors import InvalidMultiaddr, TransportError
from transport.identity import KeyPair, PeerId
from transport.multiaddr import Multiaddr, quic_socket_address
from transport.nat.pb import autonat_pb2
from transport.quic import QuicEndpoint
from transport.stream import Stream
from transport.swarm import Swarm
from transport.tcp import TcpConfig, TcpTransport, is_tcp_address

log = logging.getLogger(__name__)

PROTOCOL = "/libp2p/autonat/1.0.0"  # autonat-v1 spec
MAX_MESSAGE_SIZE = 4096
MAX_ADDRS = 16
DIAL_BACK_TIMEOUT = 5.0
MAX_CONCURRENT_DIAL_BACKS = 8

Message = autonat_pb2.Message


def _ip_of(addr: Multiaddr | None) -> str | None:
    if addr is None:
        return None
    return addr.value_for("ip4") or addr.value_for("ip6")


class AutoNAT:
    """Both sides of AutoNAT v1 on a swarm."""

    def __init__(self, swarm: Swarm, dial_back_timeout: float = DIAL_BACK_TIMEOUT) -> None:
        self.swarm = swarm
        self.dial_back_timeout = dial_back_timeout
        self._dial_backs = asyncio.Semaphore(MAX_CONCURRENT_DIAL_BACKS)
        self._busy_peers: set[PeerId] = set()

    def start(self) -> None:
        self.swarm.set_stream_handler(PROTOCOL, self._serve)

    def stop(self) -> None:
        self.swarm.remove_stream_handler(PROTOCOL)

    # -- client ---------------------------------------------------------------------------
    async def check(self, server: PeerId, addrs: list[Multiaddr]) -> tuple[bool, Multiaddr | None]:
        """Ask `server` to dial `addrs`; (reachable, the address it reached)."""
        request = Message(type=Message.DIAL)
        request.dial.peer.id = self.swarm.peer_id.multihash
        request.dial.peer.addrs.extend(a.without_peer_id().to_bytes() for a in addrs[:MAX_ADDRS])
        stream = await self.swarm.open_stream(server, [PROTOCOL])
        try:
            await stream.write_message(request.SerializeToString())
            reply = Message()
            reply.ParseFromString(await stream.read_message(MAX_MESSAGE_SIZE))
        except DecodeError as exc:
            raise TransportError(f"autonat: malformed answer from {server}: {exc}") from exc
        finally:
            await stream.close()
        status = reply.dialResponse.status
        if status == Message.OK:
            try:
                return True, Multiaddr.from_bytes(reply.dialResponse.addr)
            except InvalidMultiaddr:
                return True, None
        if status == Message.E_DIAL_ERROR:
            return False, None
        raise TransportError(
            f"autonat: {server} declined ({Message.ResponseStatus.Name(status)}: "
            f"{reply.dialResponse.statusText})"
        )

    # -- server ---------------------------------------------------------------------------
    async def _serve(self, stream: Stream) -> None:
        peer = stream.remote_peer
        assert peer is not None
        try:
            request = Message()
            request.ParseFromString(await stream.read_message(MAX_MESSAGE_SIZE))
        except (DecodeError, TransportError) as exc:
            await self._respond(stream, Message.E_BAD_REQUEST, f"malformed request: {exc}")
            return
        connection = self.swarm.connection_to(peer)
        if connection is None or connection.path == RELAYED:
            await self._respond(stream, Message.E_DIAL_REFUSED, "no direct connection to check")
            return
        if request.type != Message.DIAL or peer in self._busy_peers:
            await self._respond(stream, Message.E_DIAL_REFUSED, "one request at a time")
            return
        observed_ip = _ip_of(connection.remote_addr)
        candidates = []
        for raw in list(request.dial.peer.addrs)[:MAX_ADDRS]:
            try:
                addr = Multiaddr.from_bytes(raw)
                if not is_tcp_address(addr):
                    quic_socket_address(addr)
            except InvalidMultiaddr:
                continue
            if _ip_of(addr) == observed_ip:  # the spec's anti-amplification rule
                candidates.append(addr)
        observed = connection.remote_addr
        if observed is not None and (
            not candidates or any(is_tcp_address(a) == is_tcp_address(observed) for a in candidates)
        ):  # where we see it, on a transport it asked about (a client that asks about TCP
            # only must not hear that its QUIC address works)
            candidates.append(observed.without_peer_id())
        self._busy_peers.add(peer)
        try:
            reached = await self._dial_back(peer, list(dict.fromkeys(candidates)))
        finally:
            self._busy_peers.discard(peer)
        if reached is None:
            await self._respond(stream, Message.E_DIAL_ERROR, "no address answered")
        else:
            await self._respond(stream, Message.OK, "", reached)

    async def _dial_back(self, peer: PeerId, addrs: list[Multiaddr]) -> Multiaddr | None:
        async with self._dial_backs:
            # A throwaway identity too: the dial-back must not look like our main connection,
            # or the requester might open streams on it just before we close it.
            key = KeyPair.generate()
            endpoint: QuicEndpoint | None = None
            tcp: TcpTransport | None = None
            try:
                if any(a.has("quic-v1") for a in addrs):
                    endpoint = QuicEndpoint(key, self.swarm.quic_config)
                    local = self.swarm.endpoints[0].local_address if self.swarm.endpoints else None
                    await endpoint.listen("::" if local and ":" in local[0] else "0.0.0.0", 0)
                if any(is_tcp_address(a) for a in addrs):
                    timeout = self.dial_back_timeout
                    tcp = TcpTransport(
                        key, TcpConfig(dial_timeout=timeout, handshake_timeout=timeout)
                    )
                return await self._first_reached(endpoint, tcp, peer, addrs)
            finally:
                if endpoint is not None:
                    await endpoint.close()
                if tcp is not None:
                    await tcp.close()

    async def _first_reached(
        self,
        endpoint: QuicEndpoint | None,
        tcp: TcpTransport | None,
        peer: PeerId,
        addrs: list[Multiaddr],
    ) -> Multiaddr | None:
        """Dial every candidate at once; the first that answers (the others are dropped)."""

        async def reach(addr: Multiaddr) -> Multiaddr:
            connection: Connection
            if is_tcp_address(addr):
                assert tcp is not None
                connection = await tcp.dial(addr, peer)  # from a fresh port: no local_address
            else:
                assert endpoint is not None
                connection = await endpoint.dial(
                    quic_socket_address(addr), peer, timeout=self.dial_back_timeout
                )
            await connection.close("autonat dial-back done")
            return addr

        attempts = [asyncio.ensure_future(reach(addr)) for addr in addrs]
        try:
            for attempt in asyncio.as_completed(attempts):
                try:
                    return await attempt
                except TransportError as exc:
                    log.debug("autonat: a dial-back to %s failed: %s", peer, exc)
            return None
        finally:
            for attempt in attempts:
                attempt.cancel()

    async def _respond(
        self, stream: Stream, status: int, text: str, addr: Multiaddr | None = None
    ) -> None:
        reply = Message(type=Message.DIAL_RESPONSE)
        reply.dialResponse.status = status
        reply.dialResponse.statusText = text
        if addr is not None:
            reply.dialResponse.addr = addr.to_bytes()
        await stream.write_message(reply.SerializeToString())
        await stream.close()
