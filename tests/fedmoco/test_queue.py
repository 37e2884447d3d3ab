import pytest
import torch

from fedmoco.errors import ConfigError
from fedmoco.queue import KeyQueue


def _keys(start, n, dim=2):
    return torch.arange(start, start + n, dtype=torch.float32).unsqueeze(1).repeat(1, dim)


def test_queue_fills_then_wraps_with_uneven_batches():
    q = KeyQueue(size=5, dim=2)
    assert len(q) == 0 and q.keys.shape == (0, 2)
    q.enqueue(_keys(0, 3))  # 0 1 2
    assert len(q) == 3
    assert q.keys[:, 0].tolist() == [0, 1, 2]
    q.enqueue(_keys(3, 3))  # size % 3 != 0: 5 overwrites slot 0
    assert len(q) == 5
    assert q.buffer[:, 0].tolist() == [5, 1, 2, 3, 4]
    q.enqueue(_keys(6, 4))  # 6..9 into slots 1,2,3,4
    assert q.buffer[:, 0].tolist() == [5, 6, 7, 8, 9]
    assert int(q.ptr) == 0


def test_queue_batch_larger_than_queue_keeps_newest():
    q = KeyQueue(size=3, dim=2)
    q.enqueue(_keys(0, 7))
    assert sorted(q.keys[:, 0].tolist()) == [4, 5, 6]


def test_queue_state_round_trip():
    q = KeyQueue(size=4, dim=2)
    q.enqueue(_keys(0, 6))
    r = KeyQueue(size=4, dim=2)
    r.load_state_dict(q.state_dict())
    assert torch.equal(r.keys, q.keys) and len(r) == len(q) and int(r.ptr) == int(q.ptr)
    r.enqueue(_keys(10, 1))
    q.enqueue(_keys(10, 1))
    assert torch.equal(r.buffer, q.buffer)


@pytest.mark.parametrize("ptr,count", [(99, 4), (-1, 4), (0, -2), (0, 5)])
def test_queue_state_with_a_pointer_or_count_outside_it_is_refused_at_load(ptr, count):
    """An edited checkpoint's ptr 99 loaded, then failed the first enqueue with a shape error
    (count -2: len() < 0); found by an audit. Refused at load, naming both."""
    state = KeyQueue(size=4, dim=2).state_dict()
    state["ptr"], state["count"] = torch.tensor(ptr), torch.tensor(count)
    with pytest.raises(ValueError, match=f"ptr {ptr} / count {count} outside a queue of 4 keys"):
        KeyQueue(size=4, dim=2).load_state_dict(state)


def test_queue_rejects_bad_input():
    with pytest.raises(ConfigError, match="queue size K must be >= 1"):
        KeyQueue(0, 4)
    with pytest.raises(ValueError, match=r"expected keys of shape \(N, 4\)"):
        KeyQueue(3, 4).enqueue(torch.zeros(2, 5))
