"""Path MTU search, without a network: which sizes it probes, when it raises, when it falls back."""

from __future__ import annotations

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.packet import QuicPacketType
from aioquic.quic.packet_builder import QuicDeliveryState, QuicSentPacket
from aioquic.quic.rangeset import RangeSet
from aioquic.tls import Epoch
from hypothesis import given
from hypothesis import strategies as st

from transport.quic.glue import Libp2pQuicConnection
from transport.quic.pmtu import MAX_PROBES, PathMtuSearch, ladder


def test_ladder_tries_the_ceiling_then_jumbo_then_ethernet_frames() -> None:
    assert ladder(1350, 65487, ipv6=False) == [65487, 8972, 1472]
    assert ladder(1350, 65487, ipv6=True) == [65487, 8952, 1452]
    assert ladder(1350, 70000, ipv6=False) == [65507, 8972, 1472]  # IPv4 tops out at 64 KiB
    assert ladder(1350, 4000, ipv6=False) == [4000, 1472]
    assert ladder(1500, 9000, ipv6=False) == [9000, 8972]
    assert ladder(1350, 1350, ipv6=False) == []  # nothing above the base: no probing


def test_an_acknowledged_probe_raises_the_size_and_ends_the_search() -> None:
    search = PathMtuSearch(base=1350, candidates=[65487, 8972, 1472])
    assert search.size == 1350
    assert search.next_probe(now=0.0) == 65487
    assert search.next_probe(now=0.0) is None  # one probe in flight at a time
    assert search.probe_acked(65487)
    assert search.size == 65487
    assert search.next_probe(now=1.0) is None
    assert search.done


def test_a_size_fails_after_max_probes_losses_and_the_next_one_is_tried() -> None:
    search = PathMtuSearch(base=1350, candidates=[65487, 8972, 1472])
    for _ in range(MAX_PROBES):
        assert search.next_probe(now=0.0) == 65487
        search.probe_lost(65487)
    assert search.next_probe(now=0.0) == 8972
    search.probe_lost(8972)
    assert search.next_probe(now=0.0) == 8972  # one loss is not a verdict
    assert search.probe_acked(8972)
    assert search.size == 8972
    assert search.next_probe(now=0.0) is None  # 1472 would be smaller: nothing left to try


def test_a_size_the_interface_refuses_is_skipped_at_once() -> None:
    search = PathMtuSearch(base=1350, candidates=[65487, 8972, 1472])
    assert search.next_probe(now=0.0) == 65487
    search.size_refused(65487)
    assert search.next_probe(now=0.0) == 8972
    search.size_refused(8972)
    assert search.next_probe(now=0.0) == 1472
    search.probe_lost(65487)  # a late loss of the refused probe changes nothing
    assert search.probing == 1472


def test_failed_sizes_are_retried_after_the_raise_interval() -> None:
    search = PathMtuSearch(base=1350, candidates=[9000], max_probes=1, raise_interval=600.0)
    assert search.next_probe(now=0.0) == 9000
    search.probe_lost(9000)
    assert search.next_probe(now=1.0) is None
    assert search.done
    assert search.next_probe(now=500.0) is None
    assert search.next_probe(now=601.0) == 9000


def test_the_remote_limit_caps_the_candidates() -> None:
    search = PathMtuSearch(base=1350, candidates=[65487, 8972, 1472])
    search.limit(1500)
    assert search.next_probe(now=0.0) == 1472
    assert PathMtuSearch(base=1350, candidates=[65487]).candidates == [65487]
    assert PathMtuSearch(base=1350, candidates=[1200, 1350]).candidates == []


def _raised(size: int = 9000) -> PathMtuSearch:
    search = PathMtuSearch(base=1350, candidates=[size])
    search.next_probe(now=0.0)
    search.probe_acked(size)
    search.packet_acked(size, sent_time=1.0)
    return search


def test_big_packets_lost_with_none_acknowledged_later_is_a_black_hole() -> None:
    search = _raised()
    assert not search.packets_lost([(9000, 2.0), (9000, 2.1)])
    assert not search.packets_lost([(9000, 2.2)])
    assert search.packets_lost([(9000, 2.3)])  # the third loss event
    assert search.size == 1350
    assert search.black_holes == 1
    assert search.next_probe(now=3.0) == 9000  # a fresh search: the path may have changed


def test_losses_of_big_packets_sent_before_an_acknowledged_one_are_congestion() -> None:
    search = _raised()
    search.packet_acked(9000, sent_time=5.0)
    for _ in range(10):
        assert not search.packets_lost([(9000, 4.0), (9000, 4.5)])
    # Small packets lost say nothing about the size either.
    for _ in range(10):
        assert not search.packets_lost([(1200, 6.0)])
    assert search.size == 9000


def test_an_acknowledged_big_packet_clears_the_suspicion() -> None:
    search = _raised()
    assert not search.packets_lost([(9000, 2.0)])
    assert not search.packets_lost([(9000, 2.1)])
    search.packet_acked(9000, sent_time=2.2)
    assert not search.packets_lost([(9000, 2.3)])
    assert not search.packets_lost([(9000, 2.4)])
    assert search.size == 9000


def test_no_black_hole_at_the_base_size() -> None:
    search = PathMtuSearch(base=1350, candidates=[9000])
    for _ in range(10):
        assert not search.packets_lost([(1350, 1.0)])


@given(
    st.lists(
        st.tuples(st.sampled_from(["ack", "lost", "refused", "probe"]), st.floats(0, 1000)),
        max_size=60,
    )
)
def test_the_size_is_always_the_base_or_an_acknowledged_candidate(
    steps: list[tuple[str, float]],
) -> None:
    candidates = [65487, 8972, 1472]
    search = PathMtuSearch(base=1350, candidates=candidates)
    acknowledged = {1350}
    now = 0.0
    for action, at in steps:
        now += at
        probing = search.probing
        if action == "probe":
            size = search.next_probe(now)
            assert size is None or (size in candidates and size > search.size)
        elif probing is not None and action == "ack":
            search.probe_acked(probing)
            acknowledged.add(probing)
        elif probing is not None and action == "lost":
            search.probe_lost(probing)
        elif probing is not None:
            search.size_refused(probing)
        assert search.size in acknowledged
        assert search.size == max(acknowledged)


@pytest.mark.parametrize("ceiling", [1200, 1350])
def test_limit_never_goes_below_the_base(ceiling: int) -> None:
    search = _raised()
    search.limit(ceiling)
    assert search.size == 1350


def _sent(packet_number: int, size: int, sent_time: float = 1.0) -> QuicSentPacket:
    return QuicSentPacket(
        epoch=Epoch.ONE_RTT,
        in_flight=True,
        is_ack_eliciting=True,
        is_crypto_packet=False,
        packet_number=packet_number,
        packet_type=QuicPacketType.ONE_RTT,
        sent_time=sent_time,
        sent_bytes=size,
    )


def _probing_connection(algorithm: str = "reno") -> Libp2pQuicConnection:
    quic = Libp2pQuicConnection(
        configuration=QuicConfiguration(
            is_client=True, congestion_control_algorithm=algorithm, max_datagram_size=1350
        ),
        stream_window=1 << 20,
        connection_window=1 << 22,
        max_streams=16,
        mtu_search=PathMtuSearch(base=1350, candidates=[9000]),
    )
    quic.connect(("127.0.0.1", 4433), now=0.0)  # creates the packet spaces
    quic.datagrams_to_send(now=0.0)
    return quic


def _send_probe(quic: Libp2pQuicConnection, packet_number: int, size: int) -> QuicSentPacket:
    """Register a probe as `mtu_probe` does, without the 1-RTT keys a real one needs."""
    assert quic.mtu_search.next_probe(now=0.0) == size
    probe = _sent(packet_number, size)
    probe.delivery_handlers.append((quic._on_mtu_probe_delivery, (size,)))
    quic._mtu_probes[packet_number] = size
    quic._loss.on_packet_sent(packet=probe, space=quic._spaces[Epoch.ONE_RTT])
    return probe


@pytest.mark.parametrize("algorithm", ["reno", "cubic"])
def test_a_lost_probe_leaves_the_congestion_window_alone(algorithm: str) -> None:
    """RFC 9000 14.4: loss of a PMTU probe is no sign of congestion."""
    quic = _probing_connection(algorithm)
    congestion, space = quic._loss._cc, quic._spaces[Epoch.ONE_RTT]
    window, in_flight = congestion.congestion_window, congestion.bytes_in_flight
    probe = _send_probe(quic, 1000, 9000)
    assert congestion.bytes_in_flight == in_flight  # a probe does not take window either
    # Loss detection: delivery handlers run, then the congestion controller hears of it.
    quic._loss._on_packets_lost(now=2.0, packets=[probe], space=space)
    assert congestion.congestion_window == window
    assert congestion.bytes_in_flight == in_flight
    assert quic.mtu_search.probing is None  # the search heard of the loss
    assert quic._mtu_probes == {}
    data = _sent(1001, 1350, sent_time=1.5)
    quic._loss.on_packet_sent(packet=data, space=space)
    quic._loss._on_packets_lost(now=2.0, packets=[data], space=space)
    assert congestion.congestion_window < window  # a lost data packet is congestion


def test_an_acknowledged_probe_neither_grows_the_window_nor_counts_as_data() -> None:
    quic = _probing_connection()
    congestion, space = quic._loss._cc, quic._spaces[Epoch.ONE_RTT]
    window, in_flight = congestion.congestion_window, congestion.bytes_in_flight
    _send_probe(quic, 1000, 9000)
    ranges = RangeSet()
    ranges.add(1000, 1001)
    quic._loss.on_ack_received(ack_rangeset=ranges, ack_delay=0.0, now=1.1, space=space)
    assert quic.max_datagram_size == 9000
    assert congestion.bytes_in_flight == in_flight
    assert congestion.congestion_window == window  # padding is no evidence of capacity
    assert quic._mtu_probes == {}


def test_a_raised_size_reaches_the_congestion_controller_and_the_pacer() -> None:
    quic = Libp2pQuicConnection(
        configuration=QuicConfiguration(is_client=True, max_datagram_size=1350),
        stream_window=1 << 20,
        connection_window=1 << 22,
        max_streams=16,
        mtu_search=PathMtuSearch(base=1350, candidates=[9000]),
    )
    quic.mtu_search.next_probe(now=0.0)
    quic._on_mtu_probe_delivery(QuicDeliveryState.ACKED, 9000)
    assert quic.max_datagram_size == 9000
    assert quic._loss._cc._max_datagram_size == 9000
    assert quic._loss._pacer._max_datagram_size == 9000
