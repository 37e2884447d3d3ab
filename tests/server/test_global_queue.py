"""GlobalKeyQueue: FIFO order, owners, per-site exclusion, checkpoint round trip."""

from __future__ import annotations

import pytest
import torch

from fedmoco.errors import ConfigError
from server.queue import GlobalKeyQueue


def keys(n: int, value: float, dim: int = 4) -> torch.Tensor:
    return torch.full((n, dim), float(value))


def test_fifo_wraps_and_keeps_the_newest():
    q = GlobalKeyQueue(5, 4)
    q.enqueue(keys(3, 1), node_id=11, server_round=1)
    q.enqueue(keys(3, 2), node_id=22, server_round=1)  # overwrites the oldest 1
    assert len(q) == 5
    values = sorted(q.keys[:, 0].tolist())
    assert values == [1, 1, 2, 2, 2]
    assert q.counts_by_site() == {11: 2, 22: 3}
    q.enqueue(keys(7, 3), node_id=33, server_round=2)  # more than size: only the newest 5
    assert q.counts_by_site() == {33: 5}
    assert q.round.tolist() == [2] * 5


def test_sample_excludes_the_receiving_sites_own_keys():
    q = GlobalKeyQueue(100, 4)
    q.enqueue(keys(30, 1), node_id=11, server_round=1)
    q.enqueue(keys(20, 2), node_id=22, server_round=1)
    g = torch.Generator().manual_seed(0)
    s = q.sample(1000, exclude=11, generator=g)
    assert s.shape == (20, 4) and (s == 2).all()
    s = q.sample(10, exclude=22, generator=g)
    assert s.shape == (10, 4) and (s == 1).all()
    assert q.sample(1000, generator=g).shape == (50, 4)
    assert q.sample(1000, exclude=999, generator=g).shape == (50, 4)  # unknown site: nothing excluded


def test_sample_is_a_copy_and_random():
    q = GlobalKeyQueue(50, 2)
    q.enqueue(torch.arange(100.0).view(50, 2), node_id=1, server_round=1)
    a = q.sample(10, generator=torch.Generator().manual_seed(1))
    b = q.sample(10, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(a, b)
    a.zero_()
    assert q.keys.abs().sum() > 0


def test_empty_queue_and_empty_enqueue():
    q = GlobalKeyQueue(8, 3)
    assert q.sample(4).shape == (0, 3)
    q.enqueue(torch.zeros(0, 3), node_id=5, server_round=1)
    assert len(q) == 0 and q.sites == []


def test_wrong_dimension_is_refused():
    q = GlobalKeyQueue(8, 3)
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        q.enqueue(torch.zeros(2, 4), node_id=1, server_round=1)
    with pytest.raises(ConfigError):
        GlobalKeyQueue(0, 3)


def test_state_dict_round_trip_is_exact():
    q = GlobalKeyQueue(6, 2)
    q.enqueue(torch.randn(4, 2), node_id=2**63 + 5, server_round=1)  # Flower ids are unsigned 64-bit
    q.enqueue(torch.randn(4, 2), node_id=7, server_round=2)
    r = GlobalKeyQueue(6, 2)
    r.load_state_dict(q.state_dict())
    assert torch.equal(r.keys, q.keys) and torch.equal(r.owner, q.owner) and r.ptr == q.ptr
    assert r.counts_by_site() == q.counts_by_site() == {2**63 + 5: 2, 7: 4}
    with pytest.raises(ConfigError, match="global-queue-size"):
        GlobalKeyQueue(7, 2).load_state_dict(q.state_dict())


def test_site_list_does_not_grow_when_nodes_come_and_go():
    q = GlobalKeyQueue(4, 2)
    for node in range(100):  # a new node id each round, each filling the whole queue
        q.enqueue(torch.randn(4, 2), node_id=node, server_round=node)
    assert len(q.sites) <= 2
    assert q.counts_by_site() == {99: 4}
