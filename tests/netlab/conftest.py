"""The lab's own tests use the plugin directly (the suite may also load it from tests/conftest.py;
its hooks are idempotent, so loading it twice is harmless)."""

from tests.netlab.plugin import (  # noqa: F401
    netlab,
    pytest_runtest_makereport,
    pytest_runtest_setup,
)
