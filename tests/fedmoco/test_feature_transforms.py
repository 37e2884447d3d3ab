import pytest
import torch
import torch.nn.functional as F

from fedmoco.feature_transforms import (extrapolate_positives, interpolate_negatives, random_extrapolation,
                                        random_interpolation, sample_lambda)


def test_positive_extrapolation_follows_seed_score_identity():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(6, 16, generator=g), dim=1)
    k = F.normalize(torch.randn(6, 16, generator=g), dim=1)
    lam = torch.linspace(1.0, 2.0, 6).unsqueeze(1)
    qh, kh = extrapolate_positives(q, k, lam)
    assert torch.allclose(qh, lam * q + (1 - lam) * k)
    s = (q * k).sum(1)
    expected = s + 2 * lam.squeeze(1) * (1 - lam.squeeze(1)) * (1 - s)
    assert torch.allclose((qh * kh).sum(1), expected, atol=1e-6)
    assert ((qh * kh).sum(1) <= s + 1e-6).all()  # harder positives


def test_dimension_level_extrapolation_uses_per_entry_lambda():
    q, k = torch.ones(2, 3), torch.zeros(2, 3)
    lam = torch.tensor([[1.0, 1.5, 2.0], [1.2, 1.2, 1.2]])
    qh, kh = extrapolate_positives(q, k, lam)
    assert torch.allclose(qh, lam) and torch.allclose(kh, 1 - lam)


def test_negative_interpolation_mixes_with_permutation():
    z = torch.eye(3)
    perm = torch.tensor([2, 0, 1])
    lam = torch.tensor([[0.25], [0.5], [1.0]])
    out = interpolate_negatives(z, lam, perm)
    assert torch.allclose(out[0], torch.tensor([0.25, 0.0, 0.75]))
    assert torch.allclose(out[1], torch.tensor([0.5, 0.5, 0.0]))
    assert torch.allclose(out[2], z[2])


def test_sampled_lambdas_have_seed_ranges():
    torch.manual_seed(0)
    ex = sample_lambda((1000, 1), 2.0, offset=1.0)
    inn = sample_lambda((1000, 1), 2.0)
    assert ex.min() >= 1.0 and ex.max() <= 2.0 and abs(ex.mean().item() - 1.5) < 0.03
    assert inn.min() >= 0.0 and inn.max() <= 1.0 and abs(inn.mean().item() - 0.5) < 0.03
    with pytest.raises(ValueError, match="alpha"):
        sample_lambda((2, 1), 0.0)


def test_random_versions_shapes():
    q = F.normalize(torch.randn(4, 8), dim=1)
    qh, kh = random_extrapolation(q, q.flip(0), 1.0, "dimension")
    assert qh.shape == kh.shape == (4, 8)
    assert random_interpolation(torch.randn(10, 8), 1.0, "feature").shape == (10, 8)
    with pytest.raises(ValueError, match="level"):
        random_extrapolation(q, q, 1.0, "pixel")
