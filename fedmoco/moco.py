"""The MoCo model: query and momentum key encoders, a key queue, and the loss variants.

Modelled on moco's ``builder.py``: one small class, one private helper per idea.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fedmoco.config import MoCoConfig
from fedmoco.encoders import build_backbone
from fedmoco.feature_transforms import random_extrapolation, random_interpolation
from fedmoco.heads import prediction_head, projection_head
from fedmoco.losses import hard_negative_scores, nce_from_scores, same_bucket_mask
from fedmoco.queue import KeyQueue

# Fixed bins for score histograms, so histograms of different epochs and sites add up.
SCORE_BINS = 40


class Encoder(nn.Module):
    """Backbone plus projection head: (N, C, H, W) -> (N, dim), not normalised."""

    def __init__(self, cfg: MoCoConfig) -> None:
        super().__init__()
        self.backbone = build_backbone(
            cfg.arch, cfg.in_channels, small_input=cfg.small_input, norm=cfg.norm, norm_splits=cfg.norm_splits
        )
        self.head = projection_head(self.backbone.out_dim, cfg.dim, mlp=cfg.mlp, hidden_dim=cfg.hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@torch.no_grad()
def momentum_update(key_encoder: nn.Module, query_encoder: nn.Module, m: float) -> None:
    """theta_k <- m * theta_k + (1 - m) * theta_q over parameters; buffers are copied.

    Buffers (BatchNorm running statistics) are copied rather than averaged, as the seed's
    update rule is defined on parameters only.
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum m must be in [0, 1], got {m}")
    keys, queries = list(key_encoder.parameters()), list(query_encoder.parameters())
    if len(keys) != len(queries):
        raise ValueError(f"key encoder has {len(keys)} parameters, query encoder {len(queries)}")
    # One fused call per list instead of a kernel per tensor: ResNet-18 has ~120 parameters
    # and ~60 buffers, and per-tensor launches were a visible share of an H100 step.
    if keys:
        torch._foreach_lerp_(keys, [q.detach() for q in queries], 1.0 - m)
    buffers_k, buffers_q = list(key_encoder.buffers()), list(query_encoder.buffers())
    if len(buffers_k) != len(buffers_q):
        raise ValueError(f"key encoder has {len(buffers_k)} buffers, query encoder {len(buffers_q)}")
    if buffers_k:
        torch._foreach_copy_(buffers_k, buffers_q)


def cosine_momentum(base: float, step: int, total_steps: int) -> float:
    """MoCo v3 schedule: m = 1 - (1 - base) * (cos(pi * step / total) + 1) / 2, base -> 1."""
    if total_steps <= 0:
        return base
    t = min(max(step / total_steps, 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * t) + 1.0) / 2.0


@dataclass
class MoCoOutput:
    loss: torch.Tensor  # scalar
    q: torch.Tensor  # (N, D) normalised queries (detached)
    k: torch.Tensor  # (N, D) normalised keys
    stats: dict[str, float] = field(default_factory=dict)
    pos_scores: torch.Tensor | None = None  # (N,) q.k+ (detached)
    neg_scores: torch.Tensor | None = None  # (N, M) q.negatives (detached)


class MoCo(nn.Module):
    """Momentum contrast with a queue of keys (v1/v2), optionally v3-style heads and loss.

    ``forward(x_q, x_k, extra_negatives, extra_centres)`` updates the key encoder with
    momentum ``self.momentum``, computes the loss and enqueues the new keys.
    ``extra_negatives`` (M, D) are negatives that are used but never enqueued: the
    federation's global keys or prototypes. With ``extra_centres`` (C, D), each query skips
    the extra negatives in its key's bucket of those centres (false-negative cancellation);
    ``extra_centres`` that is ``extra_negatives`` itself (the same tensor) cancels, per query,
    the one extra negative nearest its key.
    """

    def __init__(self, cfg: MoCoConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder_q = Encoder(cfg)
        self.predictor = prediction_head(cfg.dim, cfg.hidden_dim) if cfg.predictor else nn.Identity()
        # Built by copy before any optimizer or DP wrapper touches encoder_q.
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        self.queue = KeyQueue(cfg.queue_size, cfg.dim)
        self.momentum = cfg.momentum

    # -- encoding -------------------------------------------------------------------
    def _query(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.predictor(self.encoder_q(x)), dim=1)  # (N, D)

    @torch.no_grad()
    def _key(self, x: torch.Tensor) -> torch.Tensor:
        # Shuffle so each key is normalised with a different sub-batch than its query
        # (the single-device stand-in for shuffle BN); a no-op for GroupNorm statistics.
        if self.cfg.norm != "split-batch":  # no sub-batches to mix: the shuffle would be pure cost
            return F.normalize(self.encoder_k(x), dim=1)
        perm = torch.randperm(x.shape[0], device=x.device)
        k = F.normalize(self.encoder_k(x[perm]), dim=1)
        return k[torch.argsort(perm)]  # (N, D), back in batch order

    @torch.no_grad()
    def encode_keys(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised key embeddings (N, D) of images (N, C, H, W), from the key encoder."""
        return F.normalize(self.encoder_k(x), dim=1)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features (N, F) of the query encoder, for kNN and linear probes."""
        return self.encoder_q.backbone(x)

    # -- loss -----------------------------------------------------------------------
    def _negatives(self, extra: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        # A copy: the queue is overwritten in place by enqueue() before backward().
        parts = [self.queue.keys.clone()]
        if extra is not None and extra.numel():
            parts.append(extra.to(device=device, dtype=self.queue.buffer.dtype))
        neg = torch.cat(parts) if len(parts) > 1 else parts[0]
        if self.cfg.neg_interpolation_alpha > 0:
            neg = random_interpolation(neg, self.cfg.neg_interpolation_alpha, self.cfg.mix_level)
        return neg  # (M, D)

    def _cancel_mask(self, k: torch.Tensor, negatives: torch.Tensor, n_extra: int,
                     centres: torch.Tensor | str | None) -> torch.Tensor | None:
        """(N, M) bool over all negatives: True for the extra (global) negatives in the bucket
        of each key; the local queue's columns are never cancelled. None when nothing is.
        ``centres="self"``: the extra negatives are their own centres, so each key's bucket
        holds only its nearest extra negative. That is same_bucket_mask with the negatives as
        centres, without its (M, M) products: at M = 65,536 they took 17 GB every step."""
        if centres is None or n_extra == 0 or (not isinstance(centres, str) and centres.numel() == 0):
            return None
        if isinstance(centres, str):
            nearest = (k.detach() @ negatives[-n_extra:].t()).argmax(dim=1, keepdim=True)  # (N, 1)
            extra = torch.zeros(k.shape[0], n_extra, dtype=torch.bool, device=k.device).scatter_(1, nearest, True)
        else:
            extra = same_bucket_mask(k.detach(), negatives[-n_extra:], centres.to(k.device))  # (N, n_extra)
        return F.pad(extra, (negatives.shape[0] - n_extra, 0), value=False)

    def _contrast(self, q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, n_extra: int = 0,
                  centres: torch.Tensor | str | None = None):
        """Loss of queries q against keys k, plus the scores for diagnostics. The last
        ``n_extra`` negatives are global ones, cancelled per key bucket when ``centres``."""
        cfg = self.cfg
        exclude = self._cancel_mask(k, negatives, n_extra, centres)
        q_pos, k_pos = q, k
        if cfg.pos_extrapolation_alpha > 0:
            q_pos, k_pos = random_extrapolation(q, k, cfg.pos_extrapolation_alpha, cfg.mix_level)
        l_pos = (q_pos * k_pos).sum(dim=1, keepdim=True)  # (N, 1)
        if negatives.shape[0]:
            use_filter = cfg.dual_view_weight == 0.0 and cfg.hard_negative_fraction < 1.0
            frac = cfg.hard_negative_fraction if use_filter else 1.0
            l_neg = hard_negative_scores(q.detach(), q, negatives, frac, exclude)  # (N, K')
        else:
            # Empty queue (first step of a run): the other keys of the batch are the
            # negatives, rather than the random vectors moco starts its queue with.
            l_neg = q @ k.t()
            l_neg = l_neg.masked_fill(torch.eye(len(q), dtype=torch.bool, device=q.device), float("-inf"))
        loss = nce_from_scores(l_pos, l_neg, cfg.temperature)
        # the filter keeps a subset of the columns, in another order: then the global ones are unknown
        known = n_extra == 0 or l_neg.shape[1] == negatives.shape[0]
        share = global_share(l_pos, l_neg, n_extra if known else -1, cfg.temperature)
        if cfg.dual_view_weight > 0 and negatives.shape[0]:
            l_pos_k = (k_pos * q_pos).sum(dim=1, keepdim=True)
            l_neg_k = hard_negative_scores(q.detach(), k, negatives, cfg.hard_negative_fraction, exclude)
            loss_k = nce_from_scores(l_pos_k, l_neg_k, cfg.temperature)
            loss = (1 - cfg.dual_view_weight) * loss + cfg.dual_view_weight * loss_k
        return loss, l_pos.detach().squeeze(1), l_neg.detach(), share

    def forward(
        self, x_q: torch.Tensor, x_k: torch.Tensor, extra_negatives: torch.Tensor | None = None,
        extra_centres: torch.Tensor | None = None,
    ) -> MoCoOutput:
        """x_q, x_k: (N, C, H, W) two views of N images; extra_negatives (M, D) and
        extra_centres (C, D) unit rows or None. Returns loss and diagnostics."""
        with torch.no_grad():
            momentum_update(self.encoder_k, self.encoder_q, self.momentum)
        negatives = self._negatives(extra_negatives, x_q.device)
        n_extra = extra_negatives.shape[0] if extra_negatives is not None and extra_negatives.numel() else 0
        q = self._query(x_q)
        k = self._key(x_k)
        if extra_centres is not None and extra_centres is extra_negatives:
            extra_centres = "self"  # type: ignore[assignment]  # see _cancel_mask
        loss, pos, neg, share = self._contrast(q, k, negatives, n_extra, extra_centres)
        new_keys = [k]
        if self.cfg.symmetric:
            q2, k2 = self._query(x_k), self._key(x_q)
            loss2, _, _, _ = self._contrast(q2, k2, negatives, n_extra, extra_centres)
            loss = 0.5 * (loss + loss2)
            new_keys.append(k2)
        if self.training:
            for keys in new_keys:
                self.queue.enqueue(keys)
        stats = {**score_stats(q.detach(), pos, neg), "global_share": share}
        return MoCoOutput(loss=loss, q=q.detach(), k=k, stats=stats,
                          pos_scores=pos, neg_scores=neg)


def global_share(l_pos: torch.Tensor, l_neg: torch.Tensor, n_extra: int, temperature: float) -> torch.Tensor:
    """How much the global negatives weigh in the loss: the mean over queries of the InfoNCE
    softmax mass on the last ``n_extra`` columns of ``l_neg`` (N, M), next to ``l_pos`` (N, 1).
    A 0-dim tensor on the scores' device: 0 without global negatives, NaN when ``n_extra`` < 0
    (the hard-negative filter reordered the columns, so the global ones are not known).
    Cancelled (-inf) columns weigh 0."""
    if n_extra <= 0:
        return torch.full((), 0.0 if n_extra == 0 else float("nan"), device=l_pos.device)
    with torch.no_grad():
        p = torch.softmax(torch.cat([l_pos, l_neg], dim=1).float() / temperature, dim=1)  # (N, 1 + M)
        return p[:, -n_extra:].sum(dim=1).mean()


def score_stats(q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-step diagnostics of the score-distribution seed, as 0-dim tensors.

    pos_mean: mean q.k+; neg_mean / neg_var: over all finite q.negative scores;
    emb_std: mean over dimensions of the std of normalised queries — a collapse monitor
    (about 1/sqrt(D) when healthy, near 0 when all embeddings coincide).
    They stay on the device, and none of them is read here: reading one is a GPU sync, which
    the Trainer does for all of them together, every few steps on a GPU.
    """
    finite = torch.isfinite(neg)
    count = finite.sum().clamp_min(1)
    neg0 = torch.where(finite, neg, torch.zeros_like(neg)).float()
    neg_mean = neg0.sum() / count
    neg_var = torch.where(finite, (neg0 - neg_mean) ** 2, torch.zeros_like(neg0)).sum() / count
    nan = torch.full((), float("nan"), device=q.device)  # a fill, not a host-to-device copy
    return {
        "pos_mean": pos.float().mean(),
        "neg_mean": neg_mean if neg.numel() else nan,
        "neg_var": neg_var if neg.numel() else nan,
        "emb_std": q.float().std(dim=0).mean() if q.shape[0] > 1 else nan,
    }


def score_histogram(scores: torch.Tensor) -> torch.Tensor:
    """Counts (SCORE_BINS,) of finite cosine scores in equal bins over [-1, 1], on the
    scores' device; -inf (masked) scores are not counted."""
    s = scores.detach().float()
    s = s.masked_fill(~torch.isfinite(s), float("nan")).clamp(-1.0, 1.0)  # histc ignores NaN
    return torch.histc(s, bins=SCORE_BINS, min=-1.0, max=1.0)
