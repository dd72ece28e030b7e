"""Review of the "bdp" congestion controller (sans-I/O, no clock): its accounting holds over
any mix of acks, losses and expiries, and a pause of small sends does not make it forget the
path (the window after it is not back at the minimum)."""

from __future__ import annotations

import random

from aioquic.quic.packet import QuicPacketType
from aioquic.quic.packet_builder import QuicSentPacket
from aioquic.tls import Epoch

from tests.transport.quic.test_congestion import BDP, MSS, RTT, simulate
from transport.quic.congestion import MINIMUM_WINDOW_PACKETS, BdpCongestionControl


def _packet(number: int, now: float) -> QuicSentPacket:
    packet = QuicSentPacket(Epoch.ONE_RTT, True, True, False, number, QuicPacketType.ONE_RTT)
    packet.sent_time, packet.sent_bytes = now, MSS
    return packet


def test_accounting_holds_over_random_acks_losses_and_expiries() -> None:
    rng = random.Random(7)
    cc = BdpCongestionControl(max_datagram_size=MSS)
    outstanding: list[QuicSentPacket] = []
    now = 0.0
    for number in range(20_000):
        now += rng.random() * 0.002
        if rng.random() < 0.6 or not outstanding:
            packet = _packet(number, now)
            cc.on_packet_sent(packet=packet)
            outstanding.append(packet)
            continue
        packet = outstanding.pop(rng.randrange(len(outstanding)))
        fate = rng.random()
        if fate < 0.9:
            cc.on_rtt_measurement(now=now, rtt=max(1e-4, now - packet.sent_time))
            cc.on_packet_acked(now=now, packet=packet)
        elif fate < 0.97:
            cc.on_packets_lost(now=now, packets=[packet])
        else:
            cc.on_packets_expired(packets=iter([packet]))  # aioquic passes a filter
        assert cc.bytes_in_flight == MSS * len(outstanding)
        assert cc.congestion_window >= MINIMUM_WINDOW_PACKETS * MSS
    assert len(cc._at_send) == len(outstanding)  # nothing left behind for a reused id()


def _app_limited(cc: BdpCongestionControl, start: float, seconds: float, first: int) -> float:
    """One small send per RTT (a trickle of small calls), each acked one RTT later."""
    now, number = start, first
    while now < start + seconds:
        packet = _packet(number, now)
        cc.on_packet_sent(packet=packet)
        now += RTT
        cc.on_rtt_measurement(now=now, rtt=RTT)
        cc.on_packet_acked(now=now, packet=packet)
        number += 1
    return now


def test_a_pause_of_small_sends_keeps_what_it_learned_of_the_path() -> None:
    """A bulk transfer, then a second of small calls (one packet per round trip: the sender,
    not the path, sets that rate), then the next bulk transfer: its window must still be about
    the path's, not the minimum it would climb back from."""
    cc = BdpCongestionControl(max_datagram_size=MSS)
    simulate(cc, seconds=2.0, loss=0.0, buffer_bytes=BDP)
    learned = cc.congestion_window
    assert learned > 0.5 * BDP
    cc.bytes_in_flight = 0  # what the simulation left in flight is forgotten (expired)
    cc._at_send.clear()
    _app_limited(cc, 10.0, 1.0, 10**6)
    assert cc.congestion_window >= learned // 2
    assert cc.congestion_window <= 2 * learned  # and it did not grow while barely used


def test_a_pause_of_small_sends_does_not_probe_the_ceiling_away() -> None:
    """After a congested round the window stays under a ceiling probed upwards round by round;
    rounds of small sends are no evidence that the path takes more, so they do not raise it."""
    cc = BdpCongestionControl(max_datagram_size=MSS)
    simulate(cc, seconds=2.0, loss=0.0, buffer_bytes=MSS * 2)
    ceiling = cc._ceiling
    assert ceiling is not None
    cc.bytes_in_flight = 0  # what the simulation left in flight is forgotten (expired)
    cc._at_send.clear()
    _app_limited(cc, 10.0, 1.0, 10**6)
    # (the round under way when the pause began had the bulk transfer's data: one probe step)
    assert cc._ceiling <= ceiling + max(MSS, ceiling // 16)
