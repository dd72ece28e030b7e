"""Which datagram size a path carries: packetization-layer path MTU discovery, sans I/O.

RFC 9000 section 14.3 lets a QUIC sender use datagrams bigger than its safe starting size once
the path has proven that it carries them; RFC 8899 (DPLPMTUD) says how: send a padded,
ack-eliciting probe of the bigger size, and use that size once the probe is acknowledged. Loss
of a probe says nothing about congestion, so it never shrinks the congestion window.

The search tries a short ladder of sizes, biggest first: the ceiling (loopback carries 64 KiB
datagrams), then jumbo and Ethernet frames. A size fails after `MAX_PROBES` lost probes and the
next smaller one is tried. Once a bigger size is in use, big packets lost while none sent later
is acknowledged (`BLACK_HOLE_EVENTS` times) mean the path changed: fall back to the base size
and search again. This class only decides; the connection builds and sends the probes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_PROBES = 3  # RFC 8899 MAX_PROBES: lost probes of one size before that size fails
BLACK_HOLE_EVENTS = 3  # loss events of big packets, with no later big one acknowledged
RAISE_INTERVAL = 600.0  # RFC 8899 PMTU_RAISE_TIMER: seconds before failed sizes are retried
UDP_HEADER = 8
IPV4_HEADER = 20
IPV6_HEADER = 40
MAX_IP_PACKET = 65535  # an IPv4 total length, or an IPv6 payload length plus its header
COMMON_LINK_MTUS = (9000, 1500)  # jumbo and Ethernet frames


def ladder(base: int, ceiling: int, ipv6: bool) -> list[int]:
    """UDP payload sizes worth probing above `base`, biggest first, none above `ceiling`."""
    header = UDP_HEADER + (IPV6_HEADER if ipv6 else IPV4_HEADER)
    sizes = {min(ceiling, MAX_IP_PACKET - header)}
    sizes.update(mtu - header for mtu in COMMON_LINK_MTUS if mtu - header < ceiling)
    return sorted((size for size in sizes if size > base), reverse=True)


@dataclass
class PathMtuSearch:
    """The datagram size in use on one path, and the probes that may raise it."""

    base: int
    candidates: list[int]
    max_probes: int = MAX_PROBES
    black_hole_events: int = BLACK_HOLE_EVENTS
    raise_interval: float = RAISE_INTERVAL
    size: int = field(init=False)
    probing: int | None = field(init=False, default=None)  # size of the probe in flight
    _index: int = field(init=False, default=0)  # candidate being tried
    _losses: int = field(init=False, default=0)  # lost probes of that candidate
    _retry_at: float | None = field(init=False, default=None)  # search over until then
    _last_big_acked_at: float = field(init=False, default=float("-inf"))  # its sent time
    _suspicious_events: int = field(init=False, default=0)
    searches: int = field(init=False, default=0)
    black_holes: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.size = self.base
        self.candidates = sorted((c for c in self.candidates if c > self.base), reverse=True)

    # -- probing --------------------------------------------------------------------------
    def next_probe(self, now: float) -> int | None:
        """The size to probe now, or None (a probe is in flight, or the search is over)."""
        if self.probing is not None:
            return None
        if self._retry_at is not None:
            if now < self._retry_at:
                return None
            self._restart()
        while self._index < len(self.candidates):
            candidate = self.candidates[self._index]
            if candidate > self.size:
                self.probing = candidate
                return candidate
            self._index += 1  # everything from here down is no bigger than what works
        self._retry_at = now + self.raise_interval
        return None

    def limit(self, ceiling: int) -> None:
        """The remote receives nothing bigger (its max_udp_payload_size transport parameter)."""
        self.candidates = [c for c in self.candidates if c <= ceiling]
        if self.size > ceiling:
            self.size = max(self.base, ceiling)

    def probe_acked(self, size: int) -> bool:
        """A probe arrived: the path carries `size`. True if the size in use grew."""
        if size == self.probing:
            self.probing = None
        if size <= self.size:
            return False
        self.size = size
        self._losses = 0
        self._suspicious_events = 0
        self.searches += 1
        return True

    def probe_lost(self, size: int) -> None:
        if size != self.probing:
            return  # a late verdict on a size the search has moved past
        self.probing = None
        self._losses += 1
        if self._losses >= self.max_probes:
            self.size_refused(size)

    def size_refused(self, size: int) -> None:
        """`size` cannot be sent at all (the local interface is smaller): move on at once."""
        if self.probing == size:
            self.probing = None
        if self._index < len(self.candidates) and self.candidates[self._index] == size:
            self._index += 1
            self._losses = 0

    @property
    def done(self) -> bool:
        """No bigger size is left to try before the raise interval."""
        return self.probing is None and self._index >= len(self.candidates)

    def _restart(self) -> None:
        self._retry_at = None
        self._index = 0
        self._losses = 0

    # -- black holes: a path that stopped carrying the size in use -----------------------------
    def packet_acked(self, sent_bytes: int, sent_time: float) -> None:
        if sent_bytes > self.base and sent_time > self._last_big_acked_at:
            self._last_big_acked_at = sent_time
            self._suspicious_events = 0

    def packets_lost(self, lost: list[tuple[int, float]]) -> bool:
        """One loss event, as (sent_bytes, sent_time) of each lost packet (probes excluded).

        True if the path is now taken for a black hole: the size fell back to the base.
        """
        if self.size <= self.base:
            return False
        if not any(b > self.base and t > self._last_big_acked_at for b, t in lost):
            return False  # ordinary congestion: bigger packets sent later did arrive
        self._suspicious_events += 1
        if self._suspicious_events < self.black_hole_events:
            return False
        self.black_holes += 1
        self.reset()
        return True

    def reset(self) -> None:
        """Back to the base size and a fresh search (black hole, or a new path)."""
        self.size = self.base
        self.probing = None
        self._suspicious_events = 0
        self._last_big_acked_at = float("-inf")
        self._restart()
