"""Frozen-encoder evaluation: weighted kNN and a linear probe on backbone features."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from fedmoco.data import collate_views
from fedmoco.errors import UNREADABLE_SAMPLES_HINT, ConfigError, DataError

log = logging.getLogger(__name__)


@torch.no_grad()
def extract_features(backbone: nn.Module, dataset: Dataset, *, device: torch.device, batch_size: int = 128,
                     num_workers: int = 0, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Backbone features of a labelled dataset.

    Returns (features (N, F) float32 on CPU, labels (N,) int64, number of unreadable samples
    skipped). Samples that the dataset returns as ``None`` are dropped and counted.
    """
    backbone = backbone.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_views, pin_memory=device.type == "cuda")
    feats, labels, skipped = [], [], 0
    for batch, dropped in tqdm(loader, desc="features", disable=not progress, leave=False):
        skipped += dropped
        if batch is None:
            continue
        x, y = batch
        feats.append(backbone(x.to(device, non_blocking=True)).float().cpu())
        labels.append(torch.as_tensor(y))
    if not feats:
        raise DataError(f"none of the {len(dataset)} samples could be read {UNREADABLE_SAMPLES_HINT}")
    return torch.cat(feats), torch.cat(labels).long(), skipped


def knn_predict(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, num_classes: int,
                k: int = 200, temperature: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN class scores (InstDisc / moco's CIFAR demo).

    Features are L2-normalised; each of the k nearest training samples votes for its class
    with weight exp(cos / T), divided by exp(max cos / T) of that test image (which changes no
    share of the vote). train_f (M, F), train_y (M,), test_f (N, F) -> scores (N, C), the top
    class of each row scoring at least 1.
    """
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    if k > train_f.shape[0]:
        raise ConfigError(f"k={k} exceeds the {train_f.shape[0]} training samples; see effective_k")
    train_f = F.normalize(train_f, dim=1)
    out = []
    for start in range(0, test_f.shape[0], chunk):
        q = F.normalize(test_f[start:start + chunk], dim=1)
        sim, idx = (q @ train_f.t()).topk(k, dim=1)  # (n, k)
        # exp(cos / T) up to a factor per test image, which no vote share or argmax sees; from the
        # row's largest cos, so a small T (1/T > 88) cannot overflow float32 to inf and NaN votes
        weights = ((sim - sim[:, :1]) / temperature).exp()
        one_hot = F.one_hot(train_y[idx], num_classes).float()  # (n, k, C)
        out.append((weights.unsqueeze(-1) * one_hot).sum(dim=1))
    return torch.cat(out)


def effective_k(k: int, n_train: int) -> tuple[int, str | None]:
    """The k used for ``n_train`` training samples, and a note when it differs from ``k``.

    With k >= n_train every test image has the same neighbours (all training images), so the
    weighted vote is close to the majority class whatever the features: a figure that looks
    like a result and is not. Then k = round(sqrt(n_train)) (at least 1), the usual rule of
    thumb for kNN, and the note says so.
    """
    if k < 1:
        raise ConfigError(f"--k must be >= 1, got {k}")
    if n_train < 1:
        raise DataError("kNN: the training split is empty")
    if k < n_train:
        return k, None
    used = max(1, round(math.sqrt(n_train)))
    return used, (f"--k {k} >= {n_train} training images would vote every test image into the majority "
                  f"class; using k = round(sqrt({n_train})) = {used}")


def frozen_report(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Accuracy (top-5 only with more than 5 classes), per-class and macro AUROC, confusion
    matrix and n_test of class probabilities (N, C) (normalised kNN votes, softmax of logits)."""
    from sklearn.metrics import accuracy_score
    from sklearn.metrics import confusion_matrix as sk_confusion

    from fedmoco.diagnostics import point_metrics, top_k_accuracy

    p, y = probs.float().numpy(), labels.numpy()
    out = {"accuracy": float(accuracy_score(y, p.argmax(1)))}
    if num_classes > 5:
        out["top5"] = top_k_accuracy(y, p, 5)  # kNN's zero-vote classes tie: never a hit
    m = point_metrics(p, y, [0.5] * num_classes, multi_label=False)
    out.update({k: m[k] for k in ("balanced_accuracy", "macro_f1", "kappa", "per_class_precision",
                                  "per_class_recall")})
    out.update(auroc=m["auroc"], per_class_auroc=m["per_class_auroc"], n_test=int(len(y)),
               confusion=sk_confusion(y, p.argmax(1), labels=np.arange(num_classes)).tolist())
    return out


@dataclass
class ProbeConfig:
    epochs: int = 100
    lr: float = 0.1
    weight_decay: float = 0.0
    batch_size: int = 256
    seed: int = 0


def linear_probe(train_f: torch.Tensor, train_y: torch.Tensor, num_classes: int, cfg: ProbeConfig,
                 progress: bool = True) -> nn.Module:
    """Train a linear classifier on frozen features (M, F) -> module mapping (N, F) -> (N, C).

    Features are standardised with the training mean and std first (a BatchNorm without
    affine, as in MAE/MoCo v3 probes), which makes one learning rate work across encoders.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    mean, std = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    with torch.random.fork_rng(devices=[]):  # its initial weights from the seed, not from whatever ran before
        torch.manual_seed(cfg.seed)
        clf = nn.Linear(train_f.shape[1], num_classes)
    opt = torch.optim.SGD(clf.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(train_f.shape[0] / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    x = (train_f - mean) / std
    for _ in tqdm(range(cfg.epochs), desc="linear probe", disable=not progress, leave=False):
        perm = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], cfg.batch_size):
            b = perm[i:i + cfg.batch_size]
            loss = F.cross_entropy(clf(x[b]), train_y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return nn.Sequential(_Standardise(mean, std), clf).eval()


class _Standardise(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
