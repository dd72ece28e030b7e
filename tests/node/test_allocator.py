"""glibc's mmap threshold, pinned: freed multi-MiB buffers leave the process at once."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from lattica_ray.allocator import pin_mmap_threshold

# What a bulk transfer does: a 4 MiB message buffer, a smaller buffer allocated after it that
# stays alive, the big one freed; eight times. Prints the RSS growth in MiB.
CHURN = textwrap.dedent(
    """
    import sys
    from lattica_ray.allocator import pin_mmap_threshold

    def rss_mib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024

    pinned = pin_mmap_threshold() if sys.argv[1] == "pin" else False
    before, kept = rss_mib(), []
    for _ in range(8):
        message = bytearray(4 << 20)
        kept.append(bytearray(200 << 10))
        del message
    print(pinned, rss_mib() - before)
    """
)


def _churn(mode: str, **env: str) -> tuple[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", CHURN, mode],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={"PATH": "/usr/bin:/bin", **env},
    )
    pinned, growth = done.stdout.split()
    return pinned, float(growth)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc: Linux only")
def test_freed_message_buffers_do_not_stay_resident() -> None:
    pinned, growth = _churn("pin")
    assert pinned == "True"
    kept = 8 * 200 / 1024
    assert growth < kept + 1.5, f"{growth:.1f} MiB resident after freeing every 4 MiB buffer"
    # glibc's default keeps freed 4 MiB buffers on the heap: the effect is real here.
    _, default_growth = _churn("default")
    assert default_growth > growth + 2


def test_a_threshold_set_by_the_environment_is_left_alone() -> None:
    pinned, _ = _churn("pin", MALLOC_MMAP_THRESHOLD_="65536")
    assert pinned == "False"


def test_pinning_twice_is_harmless() -> None:
    first = pin_mmap_threshold()
    assert pin_mmap_threshold() == first
