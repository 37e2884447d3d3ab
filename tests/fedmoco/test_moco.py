import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmoco.config import MoCoConfig
from fedmoco.errors import ConfigError
from fedmoco.losses import info_nce
from fedmoco.moco import MoCo, cosine_momentum, global_share, momentum_update


def _cfg(**kw):
    base = dict(arch="tiny", in_channels=1, small_input=True, queue_size=32, hidden_dim=32, dim=16, norm="group")
    return MoCoConfig(**{**base, **kw})


def _views(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 16, 16, generator=g)
    return x, (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)


def test_momentum_update_by_hand():
    k, q = nn.Linear(2, 1), nn.Linear(2, 1)
    k.add_module("bn", nn.BatchNorm1d(1))
    q.add_module("bn", nn.BatchNorm1d(1))
    with torch.no_grad():
        k.weight.copy_(torch.tensor([[1.0, 2.0]]))
        q.weight.copy_(torch.tensor([[3.0, -2.0]]))
        k.bias.fill_(0.0)
        q.bias.fill_(1.0)
        q.bn.running_mean.fill_(7.0)
    momentum_update(k, q, 0.9)
    assert torch.allclose(k.weight, torch.tensor([[0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * -2]]))
    assert torch.allclose(k.bias, torch.tensor([0.1]))
    assert k.bn.running_mean.item() == 7.0  # buffers are copied, not averaged
    with pytest.raises(ValueError, match="momentum"):
        momentum_update(k, q, 1.5)


def test_cosine_momentum_schedule_goes_to_one():
    assert cosine_momentum(0.99, 0, 100) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 50, 100) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 100, 100) == pytest.approx(1.0)


def test_key_encoder_starts_equal_and_is_frozen():
    m = MoCo(_cfg())
    for pq, pk in zip(m.encoder_q.parameters(), m.encoder_k.parameters()):
        assert torch.equal(pq, pk) and not pk.requires_grad


def test_forward_loss_equals_info_nce_against_queue_and_enqueues():
    torch.manual_seed(0)
    m = MoCo(_cfg(momentum=0.0))  # m = 0: key encoder == query encoder after the update
    x_q, x_k = _views()
    m(x_q, x_k)  # fill the queue with 8 keys
    queue_before = m.queue.keys.clone()
    out = m(x_q, x_k)
    q = F.normalize(m.encoder_q(x_q), dim=1)
    k = F.normalize(m.encoder_k(x_k), dim=1)  # GroupNorm: shuffling does not change keys
    expected = info_nce(q, k, queue_before, m.cfg.temperature)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert len(m.queue) == 16
    assert torch.allclose(m.queue.keys[8:], k, atol=1e-6)
    assert float(out.stats["pos_mean"]) == pytest.approx((q * k).sum(1).mean().item(), rel=1e-5)
    neg = q @ queue_before.t()
    assert float(out.stats["neg_mean"]) == pytest.approx(neg.mean().item(), rel=1e-5)
    assert float(out.stats["neg_var"]) == pytest.approx(neg.var(unbiased=False).item(), rel=1e-4)
    assert float(out.stats["emb_std"]) == pytest.approx(q.std(0).mean().item(), rel=1e-5)


def test_a_forward_in_eval_mode_leaves_the_queue_alone():
    """Evaluating (eval()) must not push keys into the queue: the negatives of training would
    otherwise be keys of validation images."""
    m = MoCo(_cfg())
    m(*_views())  # training step: 8 keys in
    buffer, ptr = m.queue.buffer.clone(), int(m.queue.ptr)
    m.eval()
    with torch.no_grad():
        m(*_views(seed=1))
    assert len(m.queue) == 8 and int(m.queue.ptr) == ptr == 8 and torch.equal(m.queue.buffer, buffer)


def test_first_step_with_empty_queue_uses_other_keys_of_batch():
    torch.manual_seed(0)
    m = MoCo(_cfg(momentum=0.0))
    x_q, x_k = _views(4)
    out = m(x_q, x_k)
    q = F.normalize(m.encoder_q(x_q), dim=1)
    k = F.normalize(m.encoder_k(x_k), dim=1)
    T = m.cfg.temperature
    ref = [-torch.log(torch.exp(q[i] @ k[i] / T) / torch.exp(q[i] @ k.t() / T).sum()) for i in range(4)]
    assert out.loss.item() == pytest.approx(torch.stack(ref).mean().item(), rel=1e-5)


def test_extra_negatives_are_used_but_not_enqueued():
    torch.manual_seed(0)
    m = MoCo(_cfg(momentum=0.0))
    x_q, x_k = _views()
    m(x_q, x_k)
    extra = F.normalize(torch.randn(5, 16), dim=1)
    queue_before = m.queue.keys.clone()
    out = m(x_q, x_k, extra_negatives=extra)
    q = F.normalize(m.encoder_q(x_q), dim=1)
    k = F.normalize(m.encoder_k(x_k), dim=1)
    expected = info_nce(q, k, torch.cat([queue_before, extra]), m.cfg.temperature)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert len(m.queue) == 16  # only the 8 new local keys were added


def test_global_share_by_hand():
    """Row 1: logits / T = [1 | 0, 1] -> the global column holds e / (2e + 1) of the softmax.
    Row 2: [0 | 1, -inf] (the global one cancelled) -> 0. The share is their mean."""
    l_pos = torch.tensor([[0.5], [0.0]])
    l_neg = torch.tensor([[0.0, 0.5], [0.5, float("-inf")]])
    e = math.e
    assert global_share(l_pos, l_neg, 1, 0.5).item() == pytest.approx(e / (2 * e + 1) / 2, rel=1e-6)
    assert global_share(l_pos, l_neg, 0, 0.5).item() == 0.0
    assert math.isnan(global_share(l_pos, l_neg, -1, 0.5).item())


def test_step_reports_the_share_of_its_global_negatives():
    torch.manual_seed(0)
    m = MoCo(_cfg(momentum=0.0))
    x_q, x_k = _views()
    assert m(x_q, x_k).stats["global_share"].item() == 0.0  # none given
    queue = m.queue.keys.clone()
    extra = F.normalize(torch.randn(5, 16), dim=1)
    out = m(x_q, x_k, extra_negatives=extra)
    q = F.normalize(m.encoder_q(x_q), dim=1)
    k = F.normalize(m.encoder_k(x_k), dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.t(), q @ extra.t()], dim=1) / m.cfg.temperature
    expected = torch.softmax(logits, dim=1)[:, -5:].sum(1).mean()
    assert out.stats["global_share"].item() == pytest.approx(expected.item(), rel=1e-5)
    filtered = MoCo(_cfg(momentum=0.0, hard_negative_fraction=0.5))
    filtered(x_q, x_k)
    assert math.isnan(filtered(x_q, x_k, extra_negatives=extra).stats["global_share"].item())


def test_global_negatives_in_the_keys_own_bucket_are_cancelled():
    torch.manual_seed(0)
    m = MoCo(_cfg(momentum=0.0))
    x_q, x_k = _views()
    m(x_q, x_k)
    queue_before = m.queue.keys.clone()
    state = {n: t.clone() for n, t in m.state_dict().items()}
    k = F.normalize(m.encoder_k(x_k), dim=1)
    # Two global negatives: one far away, one the mean of the batch's keys (every key's own
    # bucket when the centres are the two negatives themselves).
    far = F.normalize(-k.mean(0, keepdim=True) + 0.1 * torch.randn(1, 16), dim=1)
    own = F.normalize(k.mean(0, keepdim=True), dim=1)
    extra = torch.cat([far, own])
    out = m(x_q, x_k, extra_negatives=extra, extra_centres=extra)
    q = F.normalize(m.encoder_q(x_q), dim=1)
    expected = info_nce(q, k, torch.cat([queue_before, far]), m.cfg.temperature)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # Without centres both count, and the own-bucket prototype raises the loss.
    m2 = MoCo(_cfg(momentum=0.0))
    m2.load_state_dict(state)
    assert m2(x_q, x_k, extra_negatives=extra).loss.item() > out.loss.item()


def test_symmetric_v3_loss_is_mean_of_both_directions_with_predictor():
    torch.manual_seed(0)
    m = MoCo(_cfg(momentum=0.0, predictor=True, symmetric=True))
    x1, x2 = _views()
    m(x1, x2)
    queue_before = m.queue.keys.clone()
    out = m(x1, x2)
    T = m.cfg.temperature
    q1 = F.normalize(m.predictor(m.encoder_q(x1)), dim=1)
    q2 = F.normalize(m.predictor(m.encoder_q(x2)), dim=1)
    k1, k2 = F.normalize(m.encoder_k(x1), dim=1), F.normalize(m.encoder_k(x2), dim=1)
    expected = 0.5 * (info_nce(q1, k2, queue_before, T) + info_nce(q2, k1, queue_before, T))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert len(m.queue) == 32  # both key sets enqueued


def test_hard_negative_fraction_alone_filters_query_term():
    torch.manual_seed(0)
    m = MoCo(_cfg(momentum=0.0, hard_negative_fraction=0.25))
    x_q, x_k = _views()
    m(x_q, x_k)
    m(x_q, x_k)
    queue_before = m.queue.keys.clone()  # 16 keys -> 4 kept per query
    out = m(x_q, x_k)
    q = F.normalize(m.encoder_q(x_q), dim=1)
    k = F.normalize(m.encoder_k(x_k), dim=1)
    T = m.cfg.temperature
    ref = []
    for i in range(8):
        hard = (q[i] @ queue_before.t()).topk(4).values
        pos = torch.exp(q[i] @ k[i] / T)
        ref.append(-torch.log(pos / (pos + torch.exp(hard / T).sum())))
    assert out.loss.item() == pytest.approx(torch.stack(ref).mean().item(), rel=1e-5)


@pytest.mark.parametrize("variant", [
    dict(pos_extrapolation_alpha=1.0), dict(neg_interpolation_alpha=1.0, mix_level="dimension"),
    dict(dual_view_weight=0.5, hard_negative_fraction=0.5), dict(norm="split-batch", norm_splits=2),
])
def test_variants_train_and_backpropagate(variant):
    torch.manual_seed(0)
    m = MoCo(_cfg(**variant))
    x_q, x_k = _views()
    for _ in range(2):
        out = m(x_q, x_k)
        out.loss.backward()
    assert math.isfinite(out.loss.item())
    assert all(p.grad is not None for p in m.encoder_q.parameters())
    assert all(p.grad is None for p in m.encoder_k.parameters())


@pytest.mark.parametrize("field,value,msg", [
    ("queue_size", 0, "queue_size"), ("momentum", 1.0, r"momentum \(m\) must be in \[0, 1\)"),
    ("momentum", -0.1, "momentum"), ("temperature", 0.0, r"temperature \(T\) must be > 0"),
    ("hard_negative_fraction", 0.0, "hard_negative_fraction"), ("dual_view_weight", 2.0, "dual_view_weight"),
])
def test_nonsense_hyperparameters_are_rejected(field, value, msg):
    with pytest.raises(ConfigError, match=msg):
        _cfg(**{field: value})


def test_presets():
    v1, v3 = MoCoConfig.preset("v1"), MoCoConfig.preset("v3", arch="tiny")
    assert not v1.mlp and v1.temperature == 0.07
    assert v3.predictor and v3.symmetric and v3.momentum_schedule == "cosine" and v3.arch == "tiny"
    with pytest.raises(ConfigError, match="unknown 'v9'"):
        MoCoConfig.preset("v9")


def test_score_histogram_counts_finite_scores_in_fixed_bins():
    from fedmoco.moco import SCORE_BINS, score_histogram

    s = torch.tensor([[-1.0, 0.99, float("-inf")], [0.0, 0.01, 1.0]])
    h = score_histogram(s)
    assert h.shape == (SCORE_BINS,) and h.sum().item() == 5  # -inf is masked, not counted
    assert h[0].item() == 1 and h[-1].item() == 2  # -1 in the first bin; 0.99 and 1.0 in the last
    assert h[SCORE_BINS // 2].item() == 2  # 0.0 and 0.01 share the bin [0, 0.05)



@pytest.mark.parametrize("norm", ["split-batch", "group"])
def test_a_step_never_reads_a_device_value(norm, host_reads):
    m = MoCo(_cfg(norm=norm, queue_size=20)).train()  # 20: the third step's keys wrap around
    opt = torch.optim.SGD(m.encoder_q.parameters(), lr=0.1)
    extra = F.normalize(torch.randn(6, 16), dim=1)
    centres = F.normalize(torch.randn(3, 16), dim=1)
    for step in range(4):
        x_q, x_k = _views(seed=step)
        with host_reads() as spy:
            out = m(x_q, x_k, extra, centres)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        assert spy.reads == [], f"step {step} read {spy.reads}"
    assert len(m.queue) == 20 and int(m.queue.ptr) == 12 and int(m.queue.count) == 20  # 32 keys in, 20 kept


def test_negatives_as_their_own_centres_cancel_the_nearest_without_an_m_by_m_product(monkeypatch):
    """A site given global negatives but no centres uses the negatives as centres: each query
    skips the one nearest its key. Through same_bucket_mask that cost an (M, M) product every
    step (17 GB at M = 65,536); the same mask now comes from the keys' nearest negative."""
    import fedmoco.moco as moco_module
    from fedmoco.losses import same_bucket_mask

    extra = F.normalize(torch.randn(40, 16, generator=torch.Generator().manual_seed(3)), dim=1)
    m = MoCo(_cfg(queue_size=20)).train()
    k = F.normalize(torch.randn(8, 16), dim=1)
    negatives = torch.cat([F.normalize(torch.randn(20, 16), dim=1), extra])
    expected = F.pad(same_bucket_mask(k, extra, extra), (20, 0), value=False)
    assert torch.equal(m._cancel_mask(k, negatives, 40, "self"), expected)
    assert expected[:, 20:].sum(dim=1).eq(1).all()  # exactly one cancelled per key
    monkeypatch.setattr(moco_module, "same_bucket_mask", lambda *a: pytest.fail("built the (M, M) product"))
    x_q, x_k = _views()
    out = m(x_q, x_k, extra, extra)  # the same tensor: its own centres
    assert torch.isfinite(out.loss)
