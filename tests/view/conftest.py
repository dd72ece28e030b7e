"""Fixtures for the cluster view tests (helpers live in helpers.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.view.helpers import Mesh


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    """Views on one in-memory network with a shared fake clock; all stopped even on failure."""
    m = Mesh()
    try:
        yield m
    finally:
        await m.aclose()
