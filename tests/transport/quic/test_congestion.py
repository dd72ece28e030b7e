"""The "bdp" congestion controller against a simulated path (no network, no clock): over a link
that loses 1 % at random it keeps the link busy where reno collapses, and a full queue still
makes it back off."""

from __future__ import annotations

import heapq
import os
import random

import pytest
from aioquic.quic.congestion.base import create_congestion_control
from aioquic.quic.packet import QuicPacketType
from aioquic.quic.packet_builder import QuicSentPacket
from aioquic.tls import Epoch
from pydantic import ValidationError

from tests.transport.conftest import EndpointPair
from tests.transport.quic.engines import engine_config
from transport.quic import QuicConfig, congestion
from transport.quic.config import CONGESTION_VARIABLE, ENGINE_VARIABLE
from transport.quic.congestion import BdpCongestionControl

MSS = 1350
LINK_RATE = 10e6  # bytes per second
RTT = 0.020
BDP = LINK_RATE * RTT


def simulate(
    cc: object, *, seconds: float, loss: float, buffer_bytes: float, seed: int = 1
) -> dict[str, float]:
    """Send as the window allows through a link of LINK_RATE with a drop-tail queue of
    `buffer_bytes` and random `loss`; each packet's fate (ack or loss) reaches the sender one RTT
    after the link sends it. Returns the delivery rate and the fraction lost over the second
    half, and the worst queueing delay of that half."""
    rng = random.Random(seed)
    now, link_free, number = 0.0, 0.0, 0
    events: list[tuple[float, int, bool, QuicSentPacket]] = []
    delivered_late, lost_late, worst_queue = 0, 0, 0.0
    while now < seconds:
        while cc.bytes_in_flight + MSS <= cc.congestion_window:  # type: ignore[attr-defined]
            packet = QuicSentPacket(
                Epoch.ONE_RTT, True, True, False, number, QuicPacketType.ONE_RTT
            )
            packet.sent_time, packet.sent_bytes = now, MSS
            number += 1
            cc.on_packet_sent(packet=packet)  # type: ignore[attr-defined]
            queue = max(0.0, link_free - now)
            worst_queue = max(worst_queue, queue if now > seconds / 2 else 0.0)
            if queue * LINK_RATE + MSS > buffer_bytes:  # drop-tail
                heapq.heappush(events, (now + RTT, number, False, packet))
                continue
            link_free = max(now, link_free) + MSS / LINK_RATE
            arrives = rng.random() >= loss
            heapq.heappush(events, (link_free + RTT, number, arrives, packet))
        now, _, acked, packet = heapq.heappop(events)
        if acked:
            cc.on_rtt_measurement(now=now, rtt=now - packet.sent_time)  # type: ignore[attr-defined]
            cc.on_packet_acked(now=now, packet=packet)  # type: ignore[attr-defined]
            delivered_late += MSS if now > seconds / 2 else 0
        else:
            cc.on_packets_lost(now=now, packets=[packet])  # type: ignore[attr-defined]
            lost_late += MSS if now > seconds / 2 else 0
    return {
        "rate": delivered_late / (seconds / 2),
        "lost": lost_late / max(1, lost_late + delivered_late),
        "worst_queue_s": worst_queue,
    }


def test_registered_with_aioquic() -> None:
    made = create_congestion_control(congestion.NAME, max_datagram_size=MSS)
    assert isinstance(made, BdpCongestionControl)


def test_random_loss_does_not_shrink_the_window() -> None:
    bdp = simulate(BdpCongestionControl(max_datagram_size=MSS), seconds=4, loss=0.01,
                   buffer_bytes=2 * BDP)  # fmt: skip
    reno = simulate(create_congestion_control("reno", max_datagram_size=MSS), seconds=4,
                    loss=0.01, buffer_bytes=2 * BDP)  # fmt: skip
    print(f"\n1% random loss: bdp {bdp['rate'] / 1e6:.2f} MB/s, reno {reno['rate'] / 1e6:.2f}")
    assert bdp["rate"] > 0.8 * LINK_RATE * 0.99
    assert reno["rate"] < 0.3 * LINK_RATE  # the Mathis bound: the scenario is a lossy one
    assert bdp["rate"] > 3 * reno["rate"]


def test_queue_stays_about_one_bandwidth_delay_product() -> None:
    cc = BdpCongestionControl(max_datagram_size=MSS)
    path = simulate(cc, seconds=4, loss=0.0, buffer_bytes=100 * BDP)
    assert path["rate"] > 0.95 * LINK_RATE
    assert path["worst_queue_s"] < 2.5 * RTT
    assert not cc.filling
    assert cc.bandwidth == pytest.approx(LINK_RATE, rel=0.1)
    assert cc.congestion_window < 3.5 * BDP  # gain 2, plus what startup overshoots


def test_a_full_queue_makes_it_back_off() -> None:
    """A shallow buffer (a tenth of the BDP) loses whole tails of rounds: more than random loss,
    so the window must come down and the link still carry data."""
    cc = BdpCongestionControl(max_datagram_size=MSS)
    path = simulate(cc, seconds=4, loss=0.0, buffer_bytes=BDP / 10)
    print(f"\nshallow buffer: {path['rate'] / 1e6:.2f} MB/s, {path['lost']:.1%} lost")
    assert path["rate"] > 0.5 * LINK_RATE
    assert path["lost"] < 0.2


def test_persistent_congestion_starts_over() -> None:
    cc = BdpCongestionControl(max_datagram_size=MSS)
    simulate(cc, seconds=1, loss=0.0, buffer_bytes=2 * BDP)
    cc.on_persistent_congestion()
    assert cc.filling
    assert cc.bandwidth == 0
    assert cc.congestion_window == congestion.MINIMUM_WINDOW_PACKETS * MSS


async def test_an_aioquic_connection_moves_data_with_it() -> None:
    """Over real sockets on loopback: both ends run "bdp" when the config names it."""
    pair = EndpointPair(engine_config("aioquic", congestion_control=congestion.NAME))
    await pair.start()
    try:
        connection = await pair.dial()
        stream = await connection.open_stream()
        payload = os.urandom(2 * 1024 * 1024)
        await stream.write(payload)
        await stream.close()
        inbound = await pair.server_streams.get()
        assert await inbound.read_to_end(max_size=len(payload)) == payload
        for quic in (connection.quic, pair.server_connections[0].quic):
            assert isinstance(quic._loss._cc, BdpCongestionControl)
            assert quic._loss._cc.bandwidth > 0  # it measured the path
    finally:
        await pair.close()


def test_the_environment_chooses_the_controller_of_nodes_configured_by_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`lattica-ray up` and the LatticaActor build their QuicConfig themselves: a site on a
    lossy link picks bdp through the environment, and a typo is a clear error."""
    monkeypatch.setenv(CONGESTION_VARIABLE, "bdp")
    monkeypatch.setenv(ENGINE_VARIABLE, "aioquic")
    config = QuicConfig()
    assert (config.engine, config.congestion_control) == ("aioquic", "bdp")
    assert QuicConfig(congestion_control="cubic").congestion_control == "cubic"
    monkeypatch.setenv(CONGESTION_VARIABLE, "bbr")
    with pytest.raises(ValidationError, match="congestion_control"):
        QuicConfig()
    monkeypatch.delenv(CONGESTION_VARIABLE)
    assert QuicConfig().congestion_control == "reno"
