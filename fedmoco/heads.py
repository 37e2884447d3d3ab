"""Projection and prediction heads (MoCo v1 linear, v2 MLP, v3 predictor)."""

from __future__ import annotations

from torch import nn


def projection_head(in_dim: int, out_dim: int, *, mlp: bool, hidden_dim: int) -> nn.Module:
    """(N, in_dim) -> (N, out_dim). v1: one linear layer. v2: Linear-ReLU-Linear.

    No BatchNorm in the head: it would reintroduce the batch-statistics leak that split BN
    or GroupNorm remove from the backbone.
    """
    if not mlp:
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


def prediction_head(dim: int, hidden_dim: int) -> nn.Module:
    """MoCo v3 / BYOL predictor on the query branch: (N, dim) -> (N, dim)."""
    return nn.Sequential(nn.Linear(dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, dim))
