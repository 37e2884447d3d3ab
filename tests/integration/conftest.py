"""Fixtures of the integration tests."""

from __future__ import annotations

import pytest

from fedmoco.data import one_thread


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models: one intra-op thread (see fedmoco.data.one_thread), restored afterwards."""
    with one_thread():
        yield
