"""A 1 GiB transfer streams through bounded memory (peak RSS measured in a fresh subprocess)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.rpc_memory import MIB, run_child

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="needs Linux /proc/self/status for VmHWM"
)


@pytest.mark.parametrize("direction", ["server", "client"])
def test_one_gib_stream_keeps_peak_rss_bounded(direction: str) -> None:
    result = run_child(direction, total_mib=1024, chunk_mib=4)
    assert result["total_bytes"] == 1024 * MIB
    assert result["peak_reset"], "could not reset VmHWM after warm-up; the peak is meaningless"
    chunk, window = result["chunk_bytes"], result["window_bytes"]
    # sender and receiver live in this one process: a few chunks each side, plus the window
    bound = 8 * chunk + 4 * window
    print(f"{direction}-streamed 1 GiB: peak RSS +{result['peak_growth'] / MIB:.1f} MiB")
    assert result["peak_growth"] < bound, (
        f"peak RSS grew {result['peak_growth'] / MIB:.1f} MiB during a 1 GiB transfer, "
        f"above {bound / MIB:.0f} MiB: memory is not bounded by chunk and window"
    )
