"""Review of the malloc thresholds: thresholds a user set through glibc's tunables are left."""

from __future__ import annotations

import pytest

from lattica_ray import allocator


@pytest.mark.parametrize(
    "tunables",
    [
        "glibc.malloc.mmap_threshold=65536",
        "glibc.malloc.check=0:glibc.malloc.trim_threshold=1048576",
    ],
)
def test_thresholds_set_through_glibc_tunables_are_left_alone(
    monkeypatch: pytest.MonkeyPatch, tunables: str
) -> None:
    """GLIBC_TUNABLES is how current glibc takes these settings (MALLOC_*_ are its old
    aliases): a process started with them keeps them."""
    monkeypatch.setattr(allocator, "_fixed", None)
    for name in allocator._ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", tunables)
    assert allocator.fix_malloc_thresholds() is False


def test_other_glibc_tunables_do_not_stop_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "_fixed", None)
    for name in allocator._ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert allocator.fix_malloc_thresholds() is True
