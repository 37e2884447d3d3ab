"""Fixtures of the server tests (helpers live in server_test_helpers.py)."""

from __future__ import annotations

import pytest

from server.inprocess import InProcessGrid


@pytest.fixture
def grid3() -> InProcessGrid:
    """A grid with three nodes (101, 102, 103) whose handlers are never called."""
    return InProcessGrid({n: (lambda m, c: m, None) for n in (101, 102, 103)})


@pytest.fixture(autouse=True)
def _task_identity():
    """Message() needs the sender's identity, which Flower's runtime sets in a ServerApp."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 0
    yield
