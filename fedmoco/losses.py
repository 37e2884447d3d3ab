"""Contrastive losses: InfoNCE (MoCo), the dual-view loss and hard-negative filtering (MoHN).

All embeddings are L2-normalised rows; scores are cosine similarities in [-1, 1].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def info_nce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean InfoNCE loss of the MoCo seed, a scalar.

    L_i = -log( exp(q_i.k_i / T) / (exp(q_i.k_i / T) + sum_j exp(q_i.n_j / T)) )

    q, k: (N, D) L2-normalised queries and their positive keys.
    negatives: (K, D) L2-normalised negative keys, shared by all queries (K may be 0).
    """
    _check_pairs(q, k)
    if negatives.dim() != 2 or negatives.shape[1] != q.shape[1]:
        raise ValueError(f"negatives must be (K, {q.shape[1]}), got {tuple(negatives.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    l_pos = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
    l_neg = q @ negatives.t()  # (N, K)
    return nce_from_scores(l_pos, l_neg, temperature)


def nce_from_scores(l_pos: torch.Tensor, l_neg: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE from precomputed scores: l_pos (N, 1), l_neg (N, M) -> mean loss.

    Entries of ``l_neg`` set to -inf are excluded from the denominator.
    """
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # (N, 1 + M)
    # The positive sits in column 0, as in moco's builder.py.
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits.float(), labels)


def hard_negative_scores(
    anchor: torch.Tensor, scorer: torch.Tensor, negatives: torch.Tensor, fraction: float,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scores of ``scorer`` against the hardest ``fraction`` of ``negatives`` per row.

    "Hardest" means most cosine-similar to ``anchor`` (the query, in MoHN), so the filter
    keeps the negatives that are closest to the anchor and drops the easy, far ones.
    anchor, scorer: (N, D); negatives: (K, D) -> (N, ceil(fraction * K)) scores
    ``scorer_i . n_j`` for the j kept for row i. ``exclude`` (N, K) bool marks pairs that are
    not negatives (cancelled false negatives): their score is -inf, which
    :func:`nce_from_scores` leaves out of the denominator, and the filter ranks them last.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    # The rounding slack: 0.07 * 100 is 7.000000000000001 in floats, and ceil kept 8 of 100.
    n_keep = max(1, math.ceil(fraction * negatives.shape[0] - 1e-9)) if negatives.shape[0] else 0
    scores = scorer @ negatives.t()  # (N, K)
    if exclude is not None:
        scores = scores.masked_fill(exclude, float("-inf"))
    if n_keep == negatives.shape[0]:
        return scores
    ranking = anchor @ negatives.t()
    if exclude is not None:
        ranking = ranking.masked_fill(exclude, float("-inf"))
    idx = ranking.topk(n_keep, dim=1).indices  # (N, n_keep)
    return scores.gather(1, idx)


def same_bucket_mask(keys: torch.Tensor, extra: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Global negatives that share a key's bucket: (N, M) bool, True where ``extra[j]`` and
    ``keys[i]`` have the same nearest centre.

    keys: (N, D), extra: (M, D), centres: (C, D), all unit rows. A DP prototype is the mean
    of one bucket of other sites' images; when it is the query's own bucket it is mostly
    images like the query, a false negative that pushes the query away from its own kind
    (benchmarks/notes/global_queue_benefit.md). Cancelling it keeps the prototypes of the
    other buckets, which are the negatives a label-skewed site lacks (false-negative
    cancellation, Huynh et al. 2022, with the public centres as the bucket definition).
    """
    c = centres.to(keys.dtype)
    own = (keys @ c.t()).argmax(dim=1)  # (N,)
    theirs = (extra.to(keys.dtype) @ c.t()).argmax(dim=1)  # (M,)
    return own[:, None] == theirs[None, :]


def dual_view_info_nce(
    q: torch.Tensor,
    k: torch.Tensor,
    negatives: torch.Tensor,
    temperature: float,
    weight: float,
    hard_fraction: float = 1.0,
) -> torch.Tensor:
    """MoHN dual-view loss: (1 - w) * L(q; k, queue) + w * L(k; q, F_N).

    The key-view term contrasts the key with its query against F_N, the hardest
    ``hard_fraction`` of the negatives by cosine similarity to the query (MoHN eq. 4).
    q, k: (N, D); negatives: (K, D); returns a scalar. ``weight`` = 0 gives plain InfoNCE.
    """
    _check_pairs(q, k)
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    loss_q = info_nce(q, k, negatives, temperature)
    if weight == 0.0:
        return loss_q
    l_pos_k = (k * q).sum(dim=1, keepdim=True)  # (N, 1)
    l_neg_k = hard_negative_scores(q.detach(), k, negatives, hard_fraction)  # (N, K')
    loss_k = nce_from_scores(l_pos_k, l_neg_k, temperature)
    return (1.0 - weight) * loss_q + weight * loss_k


def _check_pairs(q: torch.Tensor, k: torch.Tensor) -> None:
    if q.dim() != 2 or q.shape != k.shape:
        raise ValueError(f"q and k must both be (N, D), got {tuple(q.shape)} and {tuple(k.shape)}")
