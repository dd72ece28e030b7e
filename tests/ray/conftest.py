"""Fixtures that start real Ray clusters (marked `ray`): each a separate `ray start --head` with
its own ports, temp dir, loopback IP and auth token, stopped by its own PIDs even on failure.

Ray is slow to start on two cores, so clusters and drivers are shared per test module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest


def _clusters_module():
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'lattica-ray[ray]')")
    from lattica_ray.ray import clusters

    return clusters


@contextlib.contextmanager
def running_clusters(*names: str) -> Iterator[list]:
    """Start one local Ray cluster per name (127.0.0.2, .3, ...); stop them all on exit."""
    clusters = _clusters_module()
    started = [
        clusters.LocalRayCluster(name, node_ip=f"127.0.0.{i + 2}") for i, name in enumerate(names)
    ]
    try:
        clusters.start_clusters(started)  # side by side: their start-ups overlap
        yield started
    finally:
        clusters.stop_clusters(started)


@contextlib.contextmanager
def running_driver(cluster) -> Iterator:
    clusters = _clusters_module()
    driver = clusters.RayDriver(cluster)
    try:
        driver.start()
        yield driver
    finally:
        driver.stop()


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster named "a"."""
    with running_clusters("a") as (cluster,):
        yield cluster


@pytest.fixture(scope="module")
def ray_cluster_pair():
    """Two local Ray clusters, "a" (127.0.0.2) and "b" (127.0.0.3)."""
    with running_clusters("a", "b") as pair:
        yield tuple(pair)


@pytest.fixture(scope="module")
def driver(ray_cluster):
    """A driver process connected to `ray_cluster`."""
    with running_driver(ray_cluster) as driver:
        yield driver
