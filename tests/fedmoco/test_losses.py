import math

import pytest
import torch
import torch.nn.functional as F

from fedmoco.losses import dual_view_info_nce, hard_negative_scores, info_nce, nce_from_scores, same_bucket_mask


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_info_nce_matches_seed_formula_by_hand():
    # Two 2-D unit vectors, one negative: every term computed by hand.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    neg = torch.tensor([[-1.0, 0.0]])
    T = 0.5
    # row 0: q.k = 0.6, q.n = -1 ; row 1: q.k = 1, q.n = 0
    l0 = -math.log(math.exp(0.6 / T) / (math.exp(0.6 / T) + math.exp(-1 / T)))
    l1 = -math.log(math.exp(1 / T) / (math.exp(1 / T) + math.exp(0 / T)))
    assert info_nce(q, k, neg, T).item() == pytest.approx((l0 + l1) / 2, rel=1e-6)


def test_info_nce_equals_loop_over_samples():
    q, k, neg = _unit(8, 16, seed=1), _unit(8, 16, seed=2), _unit(30, 16, seed=3)
    T = 0.2
    ref = []
    for i in range(8):
        pos = torch.exp(q[i] @ k[i] / T)
        ref.append(-torch.log(pos / (pos + torch.exp(neg @ q[i] / T).sum())))
    assert info_nce(q, k, neg, T).item() == pytest.approx(torch.stack(ref).mean().item(), rel=1e-5)


def test_info_nce_no_negatives_is_zero_and_shapes_are_checked():
    q = _unit(4, 8)
    assert info_nce(q, q, torch.empty(0, 8), 0.1).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="negatives must be"):
        info_nce(q, q, torch.zeros(3, 5), 0.1)
    with pytest.raises(ValueError, match="q and k"):
        info_nce(q, q[:2], torch.zeros(3, 8), 0.1)
    with pytest.raises(ValueError, match="temperature"):
        info_nce(q, q, torch.zeros(3, 8), 0.0)


def test_hard_negative_filter_keeps_most_similar_fraction():
    q = _unit(3, 8, seed=4)
    neg = _unit(10, 8, seed=5)
    kept = hard_negative_scores(q, q, neg, 0.3)  # ceil(0.3*10) = 3 per row
    assert kept.shape == (3, 3)
    full = q @ neg.t()
    for i in range(3):
        expected = full[i].sort(descending=True).values[:3]
        assert torch.allclose(kept[i].sort(descending=True).values, expected)
    assert torch.allclose(hard_negative_scores(q, q, neg, 1.0), full)


def test_hard_negative_count_rounds_up():
    """fraction 0.25 of 10 negatives keeps ceil(2.5) = 3 per row: a fraction never keeps fewer than asked."""
    q, neg = _unit(2, 8, seed=6), _unit(10, 8, seed=7)
    kept = hard_negative_scores(q, q, neg, 0.25)
    assert kept.shape == (2, 3)
    assert torch.allclose(kept.sort(dim=1).values, (q @ neg.t()).topk(3, dim=1).values.sort(dim=1).values)


def test_hard_negative_count_is_exact_where_the_product_rounds_up_in_floats():
    """0.07 * 100 is 7.000000000000001 in floats: ceil kept 8 negatives of 100, not 7."""
    q, neg = _unit(2, 8, seed=6), _unit(100, 8, seed=7)
    assert hard_negative_scores(q, q, neg, 0.07).shape == (2, 7)
    assert hard_negative_scores(q, q, neg, 0.071).shape == (2, 8)


def test_hard_negative_filter_selects_by_anchor_but_scores_scorer():
    anchor = torch.tensor([[1.0, 0.0]])
    scorer = torch.tensor([[0.0, 1.0]])
    neg = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # the negative most similar to the anchor is neg[0]; the scorer's score with it is 0.
    assert hard_negative_scores(anchor, scorer, neg, 0.2).tolist() == [[0.0]]


def test_dual_view_loss_is_weighted_sum_of_two_directions():
    q, k, neg = _unit(5, 8, seed=6), _unit(5, 8, seed=7), _unit(12, 8, seed=8)
    T, w, frac = 0.2, 0.3, 0.5
    loss_q = info_nce(q, k, neg, T)
    # key view: positive k.q against the 6 negatives most similar to q, scored with k
    ref = []
    for i in range(5):
        idx = (q[i] @ neg.t()).topk(6).indices
        pos = torch.exp(k[i] @ q[i] / T)
        ref.append(-torch.log(pos / (pos + torch.exp(neg[idx] @ k[i] / T).sum())))
    loss_k = torch.stack(ref).mean()
    got = dual_view_info_nce(q, k, neg, T, w, frac)
    assert got.item() == pytest.approx(((1 - w) * loss_q + w * loss_k).item(), rel=1e-5)
    assert dual_view_info_nce(q, k, neg, T, 0.0).item() == pytest.approx(loss_q.item())
    with pytest.raises(ValueError, match="weight"):
        dual_view_info_nce(q, k, neg, T, 1.5)


def test_same_bucket_mask_by_hand():
    # Centres on the two axes; keys and global negatives assigned to the nearer one.
    centres = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keys = F.normalize(torch.tensor([[0.9, 0.1], [0.2, 0.8]]), dim=1)  # buckets 0, 1
    extra = F.normalize(torch.tensor([[0.1, 0.9], [0.7, 0.3], [1.0, -0.2]]), dim=1)  # buckets 1, 0, 0
    mask = same_bucket_mask(keys, extra, centres)
    assert mask.tolist() == [[False, True, True], [True, False, False]]


def test_excluded_negatives_leave_the_denominator_and_rank_last():
    q = torch.tensor([[1.0, 0.0]])
    neg = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    exclude = torch.tensor([[True, False, False]])
    scores = hard_negative_scores(q, q, neg, 1.0, exclude)
    assert scores[0, 0] == float("-inf") and scores[0, 1:].tolist() == [0.0, -1.0]
    # Keeping the hardest 2 of 3: the cancelled one (the most similar) is not among them.
    kept = hard_negative_scores(q, q, neg, 2 / 3, exclude)
    assert sorted(kept[0].tolist()) == [-1.0, 0.0]
    # InfoNCE over the remaining negatives equals the loss without the cancelled one.
    k = torch.tensor([[0.6, 0.8]])
    masked = nce_from_scores((q * k).sum(1, keepdim=True), scores, 0.5)
    assert masked.item() == pytest.approx(info_nce(q, k, neg[1:], 0.5).item(), rel=1e-6)
