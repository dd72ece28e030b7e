"""The endpoint's UDP socket, read in batches.

asyncio's datagram transport hands over one datagram per event-loop wake-up, so a QUIC
connection would build an ACK and re-arm its timer after every single packet. Reading every
datagram the kernel holds (up to a bound) before telling the endpoint that the batch is over
lets each connection answer once per batch: fewer packets, far less Python per byte.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)

Address = tuple[str, int]
MAX_BATCH = 128  # datagrams read per wake-up before yielding to the loop
RECEIVE_BUFFER = 65535
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024  # kernel buffers: absorb bursts at loopback speed


class UdpSocket:
    """A non-blocking UDP socket driven by `loop.add_reader`."""

    def __init__(
        self,
        on_datagram: Callable[[bytes, Address], None],
        on_batch_end: Callable[[], None],
    ) -> None:
        self._on_datagram = on_datagram
        self._on_batch_end = on_batch_end
        self._socket: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.send_errors = 0

    def bind(self, host: str, port: int) -> Address:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
                except OSError:
                    pass  # the kernel caps it; the default still works
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        return self.adopt(sock)

    def adopt(self, sock: socket.socket) -> Address:
        """Serve an already bound socket (hole punching finds the one whose mapping works)."""
        sock.setblocking(False)
        self._socket = sock
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._read_ready)
        bound = sock.getsockname()
        return (bound[0], bound[1])

    def sendto(self, data: bytes, address: Address) -> None:
        if self._socket is None:
            return
        try:
            self._socket.sendto(data, address)
        except (BlockingIOError, InterruptedError):
            self.send_errors += 1  # the kernel queue is full: as good as a lost packet
        except OSError as exc:
            self.send_errors += 1
            log.debug("UDP send to %s failed: %r", address, exc)

    def _read_ready(self) -> None:
        sock = self._socket
        if sock is None:
            return
        try:
            for _ in range(MAX_BATCH):
                try:
                    data, address = sock.recvfrom(RECEIVE_BUFFER)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:  # ICMP errors surface here; they carry no address
                    log.debug("UDP receive error: %r", exc)
                    continue
                self._on_datagram(data, (address[0], address[1]))
        finally:
            self._on_batch_end()

    def close(self) -> None:
        if self._socket is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._socket.fileno())
            self._socket.close()
            self._socket = None

    @property
    def is_open(self) -> bool:
        return self._socket is not None
