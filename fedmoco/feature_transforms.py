"""Feature-level transformations of the feature-transformation seed (Zhu et al., ICCV'21).

Positive extrapolation makes positives harder; negative interpolation makes the queue more
diverse. Both act on embeddings, not images, so they cost almost nothing. ``level``
"feature" draws one lambda per vector; "dimension" draws one per vector entry
(dimension-level mixing).
"""

from __future__ import annotations

import torch


def sample_lambda(shape: tuple[int, ...], alpha: float, *, offset: float = 0.0,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """lambda ~ Beta(alpha, alpha) + offset, of ``shape``."""
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    a = torch.full(shape, float(alpha), device=device)
    return torch.distributions.Beta(a, a).sample() + offset


def lambda_shape(x: torch.Tensor, level: str) -> tuple[int, ...]:
    """(N, 1) for feature-level mixing, (N, D) for dimension-level mixing of x (N, D)."""
    if level == "feature":
        return (x.shape[0], 1)
    if level == "dimension":
        return tuple(x.shape)
    raise ValueError(f"level must be 'feature' or 'dimension', got {level!r}")


def extrapolate_positives(
    q: torch.Tensor, k: torch.Tensor, lam: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q^ = lam*q + (1-lam)*k, k^ = lam*k + (1-lam)*q.

    q, k: (N, D); lam: (N, 1) or (N, D), >= 1. For unit vectors and scalar lam the positive
    score becomes S + 2 lam (1 - lam)(1 - S) <= S: a harder positive. The results are not
    re-normalised, as in the seed's score analysis.
    """
    return lam * q + (1 - lam) * k, lam * k + (1 - lam) * q


def interpolate_negatives(negatives: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Z^ = lam * Z + (1 - lam) * Z[perm]: negatives (K, D), lam (K, 1) or (K, D), perm (K,)."""
    return lam * negatives + (1 - lam) * negatives[perm]


def random_extrapolation(q: torch.Tensor, k: torch.Tensor, alpha: float, level: str):
    """:func:`extrapolate_positives` with lam ~ Beta(alpha, alpha) + 1."""
    lam = sample_lambda(lambda_shape(q, level), alpha, offset=1.0, device=q.device).to(q.dtype)
    return extrapolate_positives(q, k, lam)


def random_interpolation(negatives: torch.Tensor, alpha: float, level: str) -> torch.Tensor:
    """:func:`interpolate_negatives` with lam ~ Beta(alpha, alpha) and a random permutation."""
    if negatives.shape[0] < 2:
        return negatives
    lam = sample_lambda(lambda_shape(negatives, level), alpha, device=negatives.device).to(negatives.dtype)
    perm = torch.randperm(negatives.shape[0], device=negatives.device)
    return interpolate_negatives(negatives, lam, perm)
