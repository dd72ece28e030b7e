"""Faults on live paths in the NAT lab: the node finds a working path again within 2 s."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.nat.recovery import RecoveryLab
from tests.netlab import Lab

pytestmark = [pytest.mark.root, pytest.mark.slow]

TARGET_SECONDS = 2.0  # issue 3: under 2 s to a working path while another path exists


@pytest.mark.timeout(300)
def test_paths_recover_after_faults(netlab: Callable[..., Lab]) -> None:
    scenario = RecoveryLab(netlab())
    scenario.start()
    results = scenario.run_all()
    print()
    for result in results:
        print(
            f"{result.fault:32} {result.path_before:12} -> {result.path_after:12} "
            f"lost {result.lost_pings:2} pings, working again after {result.recovery_s:.2f} s"
        )
    for result in results:
        assert result.recovery_s < TARGET_SECONDS, result
    relay_killed = results[-1]
    assert relay_killed.lost_pings > 0  # the fault really hit the path in use
    assert relay_killed.path_after == "relayed"  # ... and the other relay carries it now
