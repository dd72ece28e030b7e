"""The endpoint's UDP socket: datagrams read and written in batches.

asyncio's datagram transport hands over one datagram per event-loop wake-up, so a QUIC
connection would build an ACK and re-arm its timer after every single packet. Reading every
datagram the kernel holds (up to a bound) before telling the endpoint that the batch is over
lets each connection answer once per batch: fewer packets, far less Python per byte.

On Linux the batches also reach the kernel as batches. Sending, a run of equal-size datagrams
to one address goes down in ONE `sendmsg` with a `UDP_SEGMENT` control message (generic
segmentation offload: the kernel, or the NIC, cuts it into datagrams). Receiving, `UDP_GRO`
lets the kernel hand over such a run as one buffer plus the segment size, which we cut again.
Both fall back to one datagram per system call where the kernel refuses them.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
import sys
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

Address = tuple[str, int]
MAX_BATCH = 128  # datagrams handled per wake-up before the batch is answered
RECEIVE_BUFFER = 65535
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024  # kernel buffers: absorb bursts at loopback speed

# Linux <linux/udp.h>; Python's socket module does not export them.
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
# Linux <linux/in.h>, <linux/in6.h>: "set Don't Fragment, whatever the route's cached MTU says".
IP_MTU_DISCOVER = 10
IPV6_MTU_DISCOVER = 23
PMTUDISC_PROBE = 3
IP_MTU = 14
IPV6_MTU = 24
GSO_MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS of older kernels (newer allow 128)
GSO_MAX_BYTES = 65000  # one GSO send is one IP packet before segmentation: under 64 KiB
# sendmsg errors that mean "this socket or path cannot segment": send one by one from now on.
GSO_REFUSED = {errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP}
_GRO_CMSG_SPACE = socket.CMSG_SPACE(4) if hasattr(socket, "CMSG_SPACE") else 0


class UdpSocket:
    """A non-blocking UDP socket driven by `loop.add_reader`."""

    def __init__(
        self,
        on_datagram: Callable[[bytes, Address], None],
        on_batch_end: Callable[[], None],
        *,
        use_gso: bool = True,
        use_gro: bool = True,
        on_segments: Callable[[bytes, int, Address], None] | None = None,
    ) -> None:
        self._on_datagram = on_datagram
        self._on_batch_end = on_batch_end
        # A receive-offload run (equal-size datagrams, one buffer) handed over whole; without
        # it the run is cut into datagrams here.
        self._on_segments = on_segments
        self._socket: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._want_gso = use_gso and sys.platform == "linux"
        self._want_gro = use_gro and sys.platform == "linux" and _GRO_CMSG_SPACE > 0
        self.gso = False  # segmentation offload in use for sends
        self._fragmentation_options: list[tuple[int, int, int]] = []  # (level, option, default)
        self.gro = False  # receive offload in use
        self.send_errors = 0
        self.datagrams_sent = 0
        self.send_calls = 0
        self.datagrams_received = 0
        self.receive_calls = 0
        self.max_batch = MAX_BATCH

    def bind(self, host: str, port: int) -> Address:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            _set_buffer(sock, socket.SO_RCVBUF, SO_RCVBUFFORCE)
            _set_buffer(sock, socket.SO_SNDBUF, SO_SNDBUFFORCE)
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
        self.gso = self._want_gso and sock.type == socket.SOCK_DGRAM
        self.gro = False
        if self._want_gro:
            try:
                sock.setsockopt(SOL_UDP, UDP_GRO, 1)
                self.gro = True
            except OSError:
                pass  # an old kernel: one datagram per receive call
        self._fragmentation_options = _fragmentation_options(sock)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._read_ready)
        bound = sock.getsockname()
        return (bound[0], bound[1])

    # -- sending ------------------------------------------------------------------------
    def sendto(self, data: bytes, address: Address) -> None:
        if self._socket is None:
            return
        self.send_calls += 1
        self.datagrams_sent += 1
        try:
            self._socket.sendto(data, address)
        except (BlockingIOError, InterruptedError):
            self.send_errors += 1  # the kernel queue is full: as good as a lost packet
        except OSError as exc:
            self.send_errors += 1
            log.debug("UDP send to %s failed: %r", address, exc)

    @property
    def can_send_unfragmented(self) -> bool:
        """Whether `send_unfragmented` can forbid fragmentation (path MTU probes need it)."""
        return bool(self._fragmentation_options)

    def send_unfragmented(self, data: bytes, address: Address) -> bool:
        """Send with Don't Fragment: the datagram arrives whole or not at all.

        A path MTU probe that IP fragmentation carried would prove nothing. Other datagrams
        keep the system's default, which fragments rather than drops when a route shrinks.
        False if the local system refused the size (bigger than the interface's MTU).
        """
        sock = self._socket
        if sock is None or not self._fragmentation_options:
            return False
        self.send_calls += 1
        try:
            for level, option, _default in self._fragmentation_options:
                sock.setsockopt(level, option, PMTUDISC_PROBE)
            try:
                sock.sendto(data, address)
                self.datagrams_sent += 1
                return True
            finally:
                for level, option, default in self._fragmentation_options:
                    sock.setsockopt(level, option, default)
        except (BlockingIOError, InterruptedError):
            self.send_errors += 1
            return True  # the size is fine; the queue was full (the probe counts as lost)
        except OSError as exc:
            self.send_errors += 1
            if exc.errno == errno.EMSGSIZE:
                return False
            log.debug("UDP send to %s failed: %r", address, exc)
            return True

    def send_batch(self, datagrams: Sequence[bytes], address: Address) -> None:
        """Send datagrams to one address, in as few system calls as the kernel allows."""
        count = len(datagrams)
        if count == 1 or not self.gso:
            for data in datagrams:
                self.sendto(data, address)
            return
        start = 0
        while start < count:
            # A GSO send is a run of equal sizes; only its last segment may be shorter.
            size = len(datagrams[start])
            limit = min(count, start + GSO_MAX_SEGMENTS, start + max(1, GSO_MAX_BYTES // size))
            stop = start + 1
            while stop < limit:
                length = len(datagrams[stop])
                if length != size:
                    if length < size:
                        stop += 1  # a shorter last segment ends the run
                    break
                stop += 1
            if stop - start == 1:
                self.sendto(datagrams[start], address)
            else:
                self._send_segmented(datagrams[start:stop], size, address)
            start = stop

    def _send_segmented(self, run: Sequence[bytes], size: int, address: Address) -> None:
        if self._socket is None:
            return
        try:
            self._socket.sendmsg(
                [b"".join(run)], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))], 0, address
            )
            self.send_calls += 1
            self.datagrams_sent += len(run)
        except (BlockingIOError, InterruptedError):
            self.send_errors += len(run)
        except OSError as exc:
            if exc.errno not in GSO_REFUSED:
                self.send_errors += len(run)
                log.debug("UDP send to %s failed: %r", address, exc)
                return
            log.info("UDP segmentation offload refused (%r): sending one datagram per call", exc)
            self.gso = False
            for data in run:
                self.sendto(data, address)

    # -- receiving ----------------------------------------------------------------------
    def _read_ready(self) -> None:
        sock = self._socket
        if sock is None:
            return
        on_datagram = self._on_datagram
        received = self.datagrams_received
        limit = received + self.max_batch
        try:
            while received < limit:
                try:
                    if self.gro:
                        data, ancillary, _flags, address = sock.recvmsg(
                            RECEIVE_BUFFER, _GRO_CMSG_SPACE
                        )
                    else:
                        data, address = sock.recvfrom(RECEIVE_BUFFER)
                        ancillary = None
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:  # ICMP errors surface here; they carry no address
                    log.debug("UDP receive error: %r", exc)
                    continue
                self.receive_calls += 1
                source = (address[0], address[1])
                segment = _gro_segment_size(ancillary) if ancillary else 0
                if segment and segment < len(data) and self._on_segments is not None:
                    received += -(-len(data) // segment)
                    self._on_segments(data, segment, source)
                elif segment and segment < len(data):
                    view = memoryview(data)
                    for offset in range(0, len(data), segment):
                        received += 1
                        on_datagram(bytes(view[offset : offset + segment]), source)
                else:
                    received += 1
                    on_datagram(data, source)
        finally:
            self.datagrams_received = received
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


def _gro_segment_size(ancillary: list[tuple[int, int, bytes]]) -> int:
    """The segment size the kernel reports for a coalesced receive (an int), else 0."""
    for level, kind, value in ancillary:
        if level == SOL_UDP and kind == UDP_GRO and len(value) >= 4:
            return struct.unpack("=i", value[:4])[0]
    return 0


def _set_buffer(sock: socket.socket, option: int, force_option: int) -> None:
    """Ask for big kernel buffers: beyond the system cap where allowed (root), else up to it."""
    options = (force_option, option) if sys.platform == "linux" else (option,)
    for level_option in options:
        try:
            sock.setsockopt(socket.SOL_SOCKET, level_option, SOCKET_BUFFER_BYTES)
            return
        except OSError:
            continue  # not permitted, or capped: the default still works


def _fragmentation_options(sock: socket.socket) -> list[tuple[int, int, int]]:
    """The (level, option, current value) that control fragmentation on this socket."""
    if sys.platform != "linux":
        return []
    candidates = [(socket.IPPROTO_IP, IP_MTU_DISCOVER)]
    if sock.family == socket.AF_INET6:  # a dual-stack socket sends IPv4 too
        candidates.append((socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER))
    options = []
    for level, option in candidates:
        try:
            options.append((level, option, sock.getsockopt(level, option)))
        except OSError:
            continue
    return options


def route_mtu(address: Address) -> int | None:
    """The MTU of the local route toward `address` (its interface's, or a smaller one learnt
    from ICMP), or None where the system does not say. No packet is sent."""
    if sys.platform != "linux":
        return None
    host = address[0]
    if host.startswith("::ffff:"):
        host = host[7:]
    if ":" in host:
        family, level, option = socket.AF_INET6, socket.IPPROTO_IPV6, IPV6_MTU
    else:
        family, level, option = socket.AF_INET, socket.IPPROTO_IP, IP_MTU
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((host, address[1]))
            return probe.getsockopt(level, option)
    except OSError:
        return None
