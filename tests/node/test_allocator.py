"""glibc's thresholds, fixed: freed multi-MiB buffers leave at once, 1 MiB ones are reused."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc and /proc: Linux only"
)

# What a bulk transfer does: a 4 MiB message buffer, a smaller buffer allocated after it that
# stays alive, the big one freed; eight times. Then 1 MiB read buffers made and freed in turn.
# Prints whether the thresholds were fixed, the RSS growth in MiB, and the page faults the
# 1 MiB buffers cost.
CHURN = textwrap.dedent(
    """
    import resource, sys
    from lattica_ray.allocator import fix_malloc_thresholds

    def rss_mib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024

    fixed = fix_malloc_thresholds() if sys.argv[1] == "fix" else False
    before, kept = rss_mib(), []
    for _ in range(8):
        message = bytearray(4 << 20)
        kept.append(bytearray(200 << 10))
        del message
    growth = rss_mib() - before
    source = bytearray(4 << 20)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(64):
        read = bytes(source[: 1 << 20])
        del read
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    print(fixed, growth, faults)
    """
)


def _churn(mode: str, **env: str) -> tuple[str, float, int]:
    done = subprocess.run(
        [sys.executable, "-c", CHURN, mode],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={"PATH": "/usr/bin:/bin", **env},
    )
    fixed, growth, faults = done.stdout.split()
    return fixed, float(growth), int(faults)


def test_freed_message_buffers_do_not_stay_resident() -> None:
    fixed, growth, _ = _churn("fix")
    assert fixed == "True"
    kept = 8 * 200 / 1024
    assert growth < kept + 1.5, f"{growth:.1f} MiB resident after freeing every 4 MiB buffer"
    # glibc's default keeps freed 4 MiB buffers on the heap: the effect is real here.
    _, default_growth, _ = _churn("default")
    assert default_growth > growth + 2


def test_freed_read_buffers_are_reused_without_faulting_pages_in_again() -> None:
    """Only the mmap threshold fixed, each freed 1 MiB buffer went back to the OS: 64 of them
    faulted ~33,000 pages in. Reused from the heap, they fault almost none."""
    _, _, faults = _churn("fix")
    assert faults < 64 * 256 // 10, f"{faults} page faults for 64 reused 1 MiB buffers"


@pytest.mark.parametrize(
    "env",
    [
        {"MALLOC_MMAP_THRESHOLD_": "65536"},
        {"MALLOC_TRIM_THRESHOLD_": "65536"},
        # glibc's current way to set them (MALLOC_*_ are its old aliases)
        {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"},
        {"GLIBC_TUNABLES": "glibc.malloc.check=0:glibc.malloc.trim_threshold=1048576"},
    ],
)
def test_thresholds_set_by_the_environment_are_left_alone(env: dict[str, str]) -> None:
    assert _churn("fix", **env)[0] == "False"


def test_other_glibc_tunables_do_not_stop_the_fix() -> None:
    assert _churn("fix", GLIBC_TUNABLES="glibc.malloc.arena_max=2")[0] == "True"


def test_fixing_twice_is_harmless() -> None:
    """In a child: fixed thresholds would slow NumPy for the rest of this test process."""
    done = subprocess.run(
        [sys.executable, "-c", TWICE],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert done.stdout.split() == ["True", "True"]


TWICE = "from lattica_ray.allocator import fix_malloc_thresholds as f; print(f(), f())"
