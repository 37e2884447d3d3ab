"""Fixtures of the integration tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models train fastest on one thread, and on a shared 2-core machine two threads
    spin against each other (20x slower conv2d under load); restored for other tests."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
