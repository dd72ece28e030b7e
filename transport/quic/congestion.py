"""A congestion controller for aioquic that a random loss does not shrink ("bdp").

Loss-based controllers (aioquic's reno and cubic, qh3's own) halve their window at every loss
event, so on a path that loses packets at random their rate is bounded by the loss rate, not by
the path: about MSS / RTT * 1.22 / sqrt(p) (Mathis et al.), 0.8 MB/s at 20 ms RTT and 1 %
loss, however fast the link. This one sizes the window from a model of the path, as BBR does
(Cardwell et al., 2016): the highest delivery rate measured over the last rounds times the
lowest RTT, times a gain of 2 (a queue of at most one bandwidth-delay product). It starts like
slow start and leaves it when the delivery rate stops growing. Loss shrinks the window only
when a round loses more than `CONGESTION_LOSS` of what it sent: that is a full queue, not
noise. Rounds in which the application, not the path, set the rate (less than a quarter of
the window in flight) neither lower the measured rate nor raise a loss ceiling, so a pause of
small calls does not send the next bulk transfer back to the minimum window. It is as
aggressive as BBR v1 against loss-based flows; use it where loss is random (Wi-Fi, long
paths), through `QuicConfig(engine="aioquic", congestion_control="bdp")`.

Sans-I/O like the rest of aioquic's recovery: packets, times and RTT samples in, a window out.
Importing this module registers it with aioquic.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from aioquic.quic.congestion.base import QuicCongestionControl, register_congestion_control
from aioquic.quic.packet_builder import QuicSentPacket

NAME = "bdp"
CWND_GAIN = 2.0  # window = gain x bandwidth x min RTT (BBR's cwnd_gain)
BANDWIDTH_ROUNDS = 10  # the delivery rate is the max over this many rounds (BBR: 10)
MIN_RTT_WINDOW_S = 10.0  # the min RTT is the min over this many seconds (BBR: 10 s)
FULL_PIPE_GROWTH = 1.25  # startup ends when the rate grew less than this...
FULL_PIPE_ROUNDS = 3  # ...for this many rounds in a row (BBR's full-pipe test)
CONGESTION_LOSS = 0.2  # a round losing more than this fraction of its bytes is congestion
LOSS_BACKOFF = 0.7  # after such a round, in flight stays under this much of what got through
CEILING_PROBE_DIVISOR = 16  # ...and that ceiling grows by a sixteenth each round without it
MINIMUM_WINDOW_PACKETS = 4
# A round that never had this share of the window in flight was limited by the application,
# not the path: its delivery rate says nothing of the path (BBR's app-limited samples).
APP_LIMITED_SHARE = 0.25


class BdpCongestionControl(QuicCongestionControl):
    """Window = CWND_GAIN x max delivery rate x min RTT; random loss does not shrink it."""

    def __init__(self, *, max_datagram_size: int) -> None:
        super().__init__(max_datagram_size=max_datagram_size)
        self._max_datagram_size = max_datagram_size  # raised by path MTU discovery (glue)
        self._delivered = 0  # bytes acknowledged so far
        self._delivered_time = 0.0  # when `_delivered` last grew (or sending resumed)
        self._at_send: dict[int, tuple[int, float]] = {}  # id(packet) -> delivered, its time
        self._round = 0
        self._round_end = 0  # a packet sent once this much was delivered ends the round
        self._round_bandwidth = 0.0  # the best delivery rate (bytes/s) of this round
        self._bandwidths: deque[float] = deque(maxlen=BANDWIDTH_ROUNDS)
        self._min_rtt: float | None = None
        self._min_rtt_time = 0.0
        self._filling = True  # startup: grow like slow start until the rate stops growing
        self._full_bandwidth = 0.0
        self._full_rounds = 0
        self._round_sent = 0  # bytes acked and lost in this round...
        self._round_lost = 0  # ...and of those, lost
        self._round_peak = 0  # the most bytes in flight during this round
        self._ceiling: int | None = None  # what a congested round got through, probed upwards

    @property
    def _minimum(self) -> int:
        return MINIMUM_WINDOW_PACKETS * self._max_datagram_size

    @property
    def bandwidth(self) -> float:
        """The delivery rate the window is sized for, in bytes per second (0: none measured)."""
        return max([*self._bandwidths, self._round_bandwidth])

    @property
    def min_rtt(self) -> float | None:
        return self._min_rtt

    @property
    def filling(self) -> bool:
        """Still in startup (growing until the delivery rate stops growing)."""
        return self._filling

    def _target(self) -> int:
        if self._min_rtt is None or not self.bandwidth:
            return self.congestion_window
        target = max(self._minimum, int(CWND_GAIN * self.bandwidth * self._min_rtt))
        return target if self._ceiling is None else min(target, self._ceiling)

    def on_packet_sent(self, *, packet: QuicSentPacket) -> None:
        if not self.bytes_in_flight:  # sending resumes: idle time is not a slow delivery
            self._delivered_time = packet.sent_time or self._delivered_time
        self.bytes_in_flight += packet.sent_bytes
        if self.bytes_in_flight > self._round_peak:
            self._round_peak = self.bytes_in_flight
        self._at_send[id(packet)] = (self._delivered, self._delivered_time)

    def on_packet_acked(self, *, now: float, packet: QuicSentPacket) -> None:
        self.bytes_in_flight -= packet.sent_bytes
        self._delivered += packet.sent_bytes
        self._delivered_time = now
        self._round_sent += packet.sent_bytes
        at_send = self._at_send.pop(id(packet), None)
        if at_send is None:
            return
        delivered_then, time_then = at_send
        if now > time_then:
            rate = (self._delivered - delivered_then) / (now - time_then)
            self._round_bandwidth = max(self._round_bandwidth, rate)
        if delivered_then >= self._round_end:
            self._end_round()
        if self._filling and (self._ceiling is None or self.congestion_window < self._ceiling):
            self.congestion_window += packet.sent_bytes
        elif not self._filling:  # grow towards the target by what was acked, never jump
            target = self._target()
            if self.congestion_window < target:
                self.congestion_window = min(target, self.congestion_window + packet.sent_bytes)
            else:
                self.congestion_window = target

    def _end_round(self) -> None:
        self._round += 1
        self._round_end = self._delivered
        # A pause of small sends must not make it forget the path: an app-limited round's
        # rate counts only if it is the best yet, and the ceiling is not probed by it.
        app_limited = (
            not self._filling and self._round_peak < APP_LIMITED_SHARE * self.congestion_window
        )
        self._round_peak = self.bytes_in_flight
        if not app_limited or self._round_bandwidth >= max(self._bandwidths, default=0.0):
            self._bandwidths.append(self._round_bandwidth)
        self._round_bandwidth = 0.0
        through = self._round_sent - self._round_lost
        congested = self._round_lost > CONGESTION_LOSS * max(1, self._round_sent)
        self._round_sent = self._round_lost = 0
        if congested:  # a full queue: keep in flight under what this round got through
            self._ceiling = max(self._minimum, int(through * LOSS_BACKOFF))
            self.congestion_window = min(self.congestion_window, self._ceiling)
        elif self._ceiling is not None and not app_limited:  # probe for more, a little a round
            self._ceiling += max(self._max_datagram_size, self._ceiling // CEILING_PROBE_DIVISOR)
        if self._filling:
            best = max(self._bandwidths)
            if best >= FULL_PIPE_GROWTH * self._full_bandwidth:
                self._full_bandwidth, self._full_rounds = best, 0
            else:
                self._full_rounds += 1
            if self._full_rounds >= FULL_PIPE_ROUNDS or congested:
                self._filling = False
                self.congestion_window = max(
                    self._minimum, min(self.congestion_window, self._target())
                )

    def on_packets_expired(self, *, packets: Iterable[QuicSentPacket]) -> None:
        for packet in packets:
            self.bytes_in_flight -= packet.sent_bytes
            self._at_send.pop(id(packet), None)

    def on_packets_lost(self, *, now: float, packets: Iterable[QuicSentPacket]) -> None:
        for packet in packets:
            self.bytes_in_flight -= packet.sent_bytes
            self._at_send.pop(id(packet), None)
            self._round_sent += packet.sent_bytes
            self._round_lost += packet.sent_bytes

    def on_persistent_congestion(self) -> None:
        """Nothing got through for several probe timeouts: start over from a small window."""
        self.congestion_window = self._minimum
        self._bandwidths.clear()
        self._round_bandwidth = 0.0
        self._filling, self._full_bandwidth, self._full_rounds = True, 0.0, 0
        self._ceiling = None

    def on_rtt_measurement(self, *, now: float, rtt: float) -> None:
        if (
            self._min_rtt is None
            or rtt <= self._min_rtt
            or now - self._min_rtt_time > MIN_RTT_WINDOW_S
        ):
            self._min_rtt, self._min_rtt_time = rtt, now


register_congestion_control(NAME, BdpCongestionControl)
