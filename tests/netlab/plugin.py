"""pytest glue for the NAT lab: the ``root`` marker's skip and the ``netlab`` fixture.

Load it suite-wide with ``pytest_plugins = ["tests.netlab.plugin"]`` in tests/conftest.py
(tests/netlab/conftest.py imports it for the lab's own tests).

- A test marked ``@pytest.mark.root`` is skipped, with the reason, when this machine cannot create
  network namespaces (not root, no CAP_NET_ADMIN). Under CI (``CI`` set) that is a failure: CI
  must run the lab.
- ``netlab`` gives a factory of :class:`~tests.netlab.Lab` objects; every lab made through it is
  stopped after the test, and the test fails if any of its namespaces survived. When the test
  failed, the lab's state (nodes, router rules and counters, conntrack) is printed first.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from tests.netlab.lab import Lab
from tests.netlab.netns import list_namespaces, unavailable_reason


def netlab_unavailable(reason: str) -> None:
    """Skip (or, under CI, fail) a test that needs the lab on a machine that cannot host it."""
    if os.environ.get("CI"):
        pytest.fail(f"the NAT lab must run in CI: {reason}")
    pytest.skip(reason)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None:
        reason = unavailable_reason()
        if reason is not None:
            netlab_unavailable(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        item.stash[_FAILED] = True


_FAILED = pytest.StashKey[bool]()


@pytest.fixture
def netlab(request: pytest.FixtureRequest) -> Iterator[Callable[..., Lab]]:
    """Factory of labs: ``lab = netlab(); lab.add_...(); lab.start()``; all stopped afterwards."""
    reason = unavailable_reason()
    if reason is not None:
        netlab_unavailable(reason)
    labs: list[Lab] = []

    def make(**kwargs: object) -> Lab:
        lab = Lab(**kwargs)  # type: ignore[arg-type]
        labs.append(lab)
        return lab

    yield make
    if request.node.stash.get(_FAILED, False):
        for lab in labs:
            if lab.started:
                print(f"--- NAT lab {lab.id} at failure ---\n{lab.diagnostics()}")
    errors = []
    for lab in labs:
        try:
            lab.stop()
        except Exception as exc:  # keep stopping the others, then report
            errors.append(f"lab {lab.id}: {exc}")
        left = list_namespaces(lab.netns_prefix)
        if left:
            errors.append(f"lab {lab.id} left namespaces behind: {left}")
    if errors:
        pytest.fail("NAT lab teardown failed: " + "; ".join(errors))
