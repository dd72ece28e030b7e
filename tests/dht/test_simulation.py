"""The quick simulation: 200 real DHT nodes on a virtual clock, 30% of them killed unwarned."""

from __future__ import annotations

import asyncio

import pytest

from lattica_ray.dht.simulation import (
    SimConfig,
    SimulationStalled,
    VirtualClockLoop,
    run_simulation,
    run_virtual,
)


def test_virtual_clock_jumps_over_sleeps() -> None:
    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, VirtualClockLoop)
        start = loop.time()
        await asyncio.gather(asyncio.sleep(3600), asyncio.sleep(10))
        return start, loop.time()

    start, end = run_virtual(main)
    assert end - start == pytest.approx(3600)


def test_virtual_clock_reports_a_deadlock() -> None:
    async def main() -> None:
        await asyncio.get_running_loop().create_future()  # nothing will ever set it

    with pytest.raises(SimulationStalled):
        run_virtual(main)


@pytest.mark.slow
def test_lookups_survive_30_percent_of_nodes_killed() -> None:
    report = run_simulation(
        SimConfig(
            nodes=200,
            lookups=200,
            closest_lookups=20,
            records=20,
            kill_fractions=(0.0, 0.3),
            seed=3,
        )
    )
    healthy, churned = report.phases
    assert healthy.success_rate == 1.0
    assert churned.alive == 140
    assert churned.success_rate >= 0.99, report.lines()
    assert churned.record_survival >= 0.99, report.lines()
    assert max(churned.hops) <= 4  # log2(200) is 7.6: lookups take O(log N) hops
    assert sum(churned.closest_overlap) / len(churned.closest_overlap) >= 0.9, report.lines()
