"""End-to-end fine-tuning of a fedmoco encoder with few labels, against a random-init baseline.

Protocol (docs/finetune.md): one grouped, stratified test split and one validation split, fixed
for the whole report; for each label fraction and seed a grouped subset of the training pool;
on it, the pretrained encoder and a randomly initialised one of the same architecture are each
trained end to end (optional frozen warm-up, lower backbone learning rate, class weighting,
early stopping on validation AUROC); the operating point is chosen on validation; metrics
on the test set.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from fedmoco.atomic import atomic_write_json, json_safe
from fedmoco.checkpoint import atomic_save
from fedmoco.config import MoCoConfig
from fedmoco.data import collate_views
from fedmoco.diagnostics import (METRICS, MIN_BOOTSTRAP_UNITS, OperatingPoint, bootstrap_units, diagnose,
                                 plot_confusion_png, plot_roc)
from fedmoco.errors import UNREADABLE_SAMPLES_HINT, ConfigError, DataError, TrainingDiverged
from fedmoco.labels import LabelledSet
from fedmoco.moco import MoCo
from fedmoco.splits import grouped_split, subsample_groups

log = logging.getLogger(__name__)

# Labelled sets up to this size are decoded once and kept in memory: every evaluation view is
# deterministic, so the cache is exact, and 2 x seeds x fractions runs then cost no decoding.
MAX_CACHE_BYTES = 2 * 1024**3
FINETUNED_FORMAT = "fedmoco-finetuned"


@dataclass
class FinetuneConfig:
    """Hyper-parameters of one fine-tuning run (see ``fedmoco finetune --help``)."""

    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    backbone_lr_mult: float = 0.1
    weight_decay: float = 1e-4
    warmup_frozen_epochs: int = 1
    class_weighting: str = "balanced"
    patience: int = 5
    workers: int = 0
    amp: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:  # a batch of one is skipped (BatchNorm heads need two): nothing would train
            raise ConfigError(f"--batch-size must be >= 2, got {self.batch_size}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.backbone_lr_mult:
            raise ConfigError(f"--backbone-lr-mult must be >= 0, got {self.backbone_lr_mult}")
        if not 0 <= self.warmup_frozen_epochs <= self.epochs:
            raise ConfigError(f"--warmup-frozen-epochs must be in [0, --epochs], got {self.warmup_frozen_epochs}")
        if self.class_weighting not in ("balanced", "none"):
            raise ConfigError(f"--class-weighting must be balanced or none, got {self.class_weighting!r}")
        if self.patience < 1:
            raise ConfigError(f"--patience must be >= 1, got {self.patience}")


@dataclass
class ProtocolConfig:
    """The report's protocol: splits, label fractions, seeds, operating point, bootstrap."""

    label_fractions: list[float] = field(default_factory=lambda: [1.0])
    seeds: list[int] = field(default_factory=lambda: [0])
    test_fraction: float = 0.3
    val_fraction: float = 0.2
    split_seed: int = 0
    operating_point: str = "youden"
    positive: int | None = None
    bootstrap: int = 1000

    def __post_init__(self) -> None:
        if not self.label_fractions or any(not 0 < f <= 1 for f in self.label_fractions):
            raise ConfigError(f"--label-fraction values must be in (0, 1], got {self.label_fractions}")
        if not self.seeds:
            raise ConfigError("--seeds: give at least one seed")
        bad = [s for s in self.seeds if not 0 <= s < 2**32]
        if bad:  # numpy's and torch's generators take no other seed
            raise ConfigError(f"--seeds must be whole numbers in [0, 2**32), got {bad[0]}")
        repeated = sorted({s for s in self.seeds if self.seeds.count(s) > 1})
        if repeated:  # one run per seed: a repeat would count twice in the bootstrap, once in the means
            raise ConfigError(f"--seeds: {', '.join(map(str, repeated))} given more than once; "
                              "each seed is one fine-tuning run")
        if self.bootstrap < 0:
            raise ConfigError(f"--bootstrap must be >= 0, got {self.bootstrap}")
        self.label_fractions = sorted(set(float(f) for f in self.label_fractions))
        OperatingPoint.parse(self.operating_point)


class Classifier(nn.Module):
    """backbone (N, C, H, W) -> (N, F) features -> linear head -> (N, K) logits."""

    def __init__(self, backbone: nn.Module, num_outputs: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.out_dim, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


# Offset of the random-init baseline's seeds, so that --seeds 0 does not rebuild the weights of
# a checkpoint that was itself initialised with torch.manual_seed(0) and never trained.
RANDOM_INIT_SEED_OFFSET = 1_000_003


def fresh_backbone(moco_config: dict[str, Any], seed: int) -> nn.Module:
    """A randomly initialised backbone of the checkpoint's architecture (the baseline)."""
    torch.manual_seed(RANDOM_INIT_SEED_OFFSET + seed)
    return MoCo(MoCoConfig.from_dict(moco_config)).encoder_q.backbone


def plain_batchnorm(module: nn.Module) -> nn.Module:
    """Make split BatchNorm layers plain: the sub-batch statistics only matter for the
    contrastive shuffle-BN stand-in, and fine-tuning batches are small."""
    for m in module.modules():
        if hasattr(m, "splits"):
            m.splits = 1
    return module


# ------------------------------------------------------------------------------ data


@dataclass
class Samples:
    """Labelled samples after load-time drops: a Dataset giving (image, row) plus per-sample
    ``targets``, ``groups`` and ``rows`` aligned with it."""

    dataset: Dataset
    targets: np.ndarray
    groups: np.ndarray
    rows: np.ndarray
    skipped: int = 0


def prepare_samples(data: LabelledSet, *, workers: int = 0, progress: bool = True,
                    max_cache_bytes: int | None = None) -> Samples:
    """Decode every labelled sample once into memory when it fits in ``max_cache_bytes``
    (default :data:`MAX_CACHE_BYTES`); otherwise stream from the domain dataset. Unreadable
    samples are dropped and counted."""
    max_cache_bytes = MAX_CACHE_BYTES if max_cache_bytes is None else max_cache_bytes
    tried = min(len(data.dataset), 8)
    first = next((s for i in range(tried) if (s := data.dataset[i]) is not None), None)
    if first is None:
        raise DataError(f"none of the first {tried} labelled samples could be read {UNREADABLE_SAMPLES_HINT}")
    per_sample = first[0].numel() * first[0].element_size()
    if per_sample * len(data.dataset) > max_cache_bytes:
        log.info("labelled set of %.1f GiB streams from disk", per_sample * len(data.dataset) / 1024**3)
        return Samples(data.dataset, data.targets, data.groups, data.rows)
    loader = DataLoader(data.dataset, batch_size=64, num_workers=workers, collate_fn=collate_views)
    xs, rows, skipped = [], [], 0
    for batch, dropped in tqdm(loader, desc="loading labelled samples", disable=not progress, leave=False):
        skipped += dropped
        if batch is not None:
            xs.append(batch[0])
            rows.append(torch.as_tensor(batch[1]))
    if not xs:
        raise DataError("no readable labelled sample")
    x, r = torch.cat(xs), torch.cat(rows).numpy()
    if skipped:
        log.warning("skipped %d unreadable labelled samples", skipped)
    row_target = {int(k): i for i, k in enumerate(data.rows)}
    index = np.asarray([row_target[int(k)] for k in r])
    return Samples(TensorDataset(x, torch.as_tensor(r)), data.targets[index], data.groups[index], r, skipped)


def _targets_of(rows: torch.Tensor, lookup: dict[int, int], table: torch.Tensor) -> torch.Tensor:
    return table[[lookup[int(k)] for k in rows]]


# ------------------------------------------------------------------------------ training


def class_weights(targets: np.ndarray, num_outputs: int, multi_label: bool) -> torch.Tensor:
    """Single-label: N / (K * count_c) per class (scikit-learn's 'balanced'); 0 for a class
    absent from training. Multi-label: BCE pos_weight = negatives / positives per label."""
    if multi_label:
        pos = targets.sum(0)
        return torch.as_tensor(np.where(pos > 0, (len(targets) - pos) / np.maximum(pos, 1), 1.0), dtype=torch.float32)
    counts = np.bincount(targets, minlength=num_outputs).astype(float)
    present = counts > 0
    w = np.zeros(num_outputs)
    w[present] = len(targets) / (present.sum() * counts[present])
    return torch.as_tensor(w, dtype=torch.float32)


def _loader(ds: Dataset, batch_size: int, *, shuffle: bool, seed: int, workers: int, device: torch.device):
    gen = torch.Generator().manual_seed(seed)
    streamed = not isinstance(ds, TensorDataset) and not (hasattr(ds, "dataset") and isinstance(ds.dataset, TensorDataset))
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen, collate_fn=collate_views,
                      num_workers=workers if streamed else 0, pin_memory=device.type == "cuda")


@torch.no_grad()
def predict(model: nn.Module, ds: Dataset, *, multi_label: bool, device: torch.device, batch_size: int = 128,
            workers: int = 0, amp: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N, K), table rows (N,)) of ``ds``; softmax or sigmoid per ``multi_label``."""
    model.eval()
    probs, rows = [], []
    use_amp = amp and device.type == "cuda"
    for batch, _ in _loader(ds, batch_size, shuffle=False, seed=0, workers=workers, device=device):
        if batch is None:
            continue
        x, r = batch
        with torch.autocast(device.type, enabled=use_amp):
            logits = model(x.to(device, non_blocking=True)).float()
        probs.append((torch.sigmoid(logits) if multi_label else logits.softmax(1)).cpu())
        rows.append(torch.as_tensor(r))
    return torch.cat(probs).numpy(), torch.cat(rows).numpy()


def train_classifier(backbone: nn.Module, samples: Samples, train_idx: np.ndarray, val_idx: np.ndarray, *,
                     num_outputs: int, multi_label: bool, cfg: FinetuneConfig, seed: int, device: torch.device,
                     progress: bool = True, desc: str = "fine-tune") -> tuple[Classifier, dict[str, Any]]:
    """Train backbone + linear head on ``train_idx``; keep the epoch with the best validation
    macro AUROC (ties and undefined AUROC: lowest validation loss); stop after ``patience``
    epochs without improvement. Returns the model (best weights, eval mode) and its history."""
    from fedmoco.diagnostics import point_metrics

    torch.manual_seed(seed)
    model = Classifier(plain_batchnorm(copy.deepcopy(backbone)), num_outputs).to(device)
    lookup = {int(r): i for i, r in enumerate(samples.rows)}
    table = torch.as_tensor(samples.targets)
    weights = class_weights(samples.targets[train_idx], num_outputs, multi_label).to(device)
    loss_fn = (nn.BCEWithLogitsLoss(pos_weight=weights) if multi_label
               else nn.CrossEntropyLoss(weight=weights if cfg.class_weighting == "balanced" else None))
    if multi_label and cfg.class_weighting == "none":
        loss_fn = nn.BCEWithLogitsLoss()
    groups = [{"params": model.head.parameters(), "lr": cfg.lr},
              {"params": model.backbone.parameters(), "lr": cfg.lr * cfg.backbone_lr_mult}]
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    train_ds, val_ds = subset_of(samples, train_idx), subset_of(samples, val_idx)
    best = (-math.inf, math.inf)
    best_state, best_epoch, stale, history = None, 0, 0, []
    for epoch in tqdm(range(cfg.epochs), desc=desc, disable=not progress, leave=False):
        frozen = epoch < cfg.warmup_frozen_epochs
        model.train()
        model.backbone.requires_grad_(not frozen)
        if frozen:
            model.backbone.eval()  # frozen warm-up: BatchNorm statistics stay those of pretraining
        total, n = 0.0, 0
        for batch, _ in _loader(train_ds, cfg.batch_size, shuffle=True, seed=seed * 1000 + epoch,
                                workers=cfg.workers, device=device):
            if batch is None or len(batch[1]) < 2:
                continue  # BatchNorm cannot train on a single sample
            x = batch[0].to(device, non_blocking=True)
            y = _targets_of(batch[1], lookup, table).to(device)
            with torch.autocast(device.type, enabled=use_amp):
                logits = model(x)
            loss = loss_fn(logits.float(), y.float() if multi_label else y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            value = loss.detach().item()
            if not math.isfinite(value):
                raise TrainingDiverged(f"fine-tuning loss became {value} in epoch {epoch} ({desc}); lower --lr")
            total += value * len(y)
            n += len(y)
        if n == 0:  # every batch had one image (a training split of one): a report of an untrained head
            raise DataError(f"fine-tuning ({desc}) took no step: its training split gives no batch of 2 or more "
                            "readable images; label more images or raise the label fraction")
        sched.step()
        probs, rows = predict(model, val_ds, multi_label=multi_label, device=device, workers=cfg.workers, amp=cfg.amp)
        if not np.isfinite(probs).all():
            raise TrainingDiverged(f"fine-tuned model predicts NaN after epoch {epoch} ({desc}); lower --lr")
        vy = _targets_of(torch.as_tensor(rows), lookup, table).numpy()
        val_loss = _loss_np(probs, vy, multi_label)
        auc = point_metrics(probs, vy, [0.5] * num_outputs, multi_label=multi_label)["auroc"]
        history.append({"epoch": epoch, "train_loss": total / max(n, 1), "val_loss": val_loss,
                        "val_auroc": auc, "frozen": frozen})
        key = (auc if math.isfinite(auc) else -math.inf, -val_loss)
        if key > (best[0], -best[1]):
            best, best_state, best_epoch, stale = (key[0], val_loss), copy.deepcopy(model.state_dict()), epoch, 0
        else:
            stale += 1
            if stale >= cfg.patience and not frozen:
                break
    model.load_state_dict(best_state)
    return model.eval(), {"best_epoch": best_epoch, "epochs_run": len(history), "history": history}


def _loss_np(probs: np.ndarray, y: np.ndarray, multi_label: bool) -> float:
    p = torch.as_tensor(probs).clamp(1e-7, 1 - 1e-7)
    if multi_label:
        return float(F.binary_cross_entropy(p, torch.as_tensor(y, dtype=p.dtype)))
    return float(F.nll_loss(p.log(), torch.as_tensor(y, dtype=torch.long)))


def subset_of(samples: Samples, index: np.ndarray) -> Dataset:
    return torch.utils.data.Subset(samples.dataset, [int(i) for i in index])


# ------------------------------------------------------------------------------ protocol


@dataclass
class Split:
    """Indices into Samples: training pool, validation and test (no group in two of them)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def make_split(samples: Samples, protocol: ProtocolConfig, test_samples: Samples | None = None) -> Split:
    """Test: grouped ``test_fraction`` of the data (unless a separate test set is given);
    validation: grouped ``val_fraction`` of the rest; the remainder is the training pool."""
    if test_samples is None:
        rest, test = grouped_split(samples.targets, samples.groups, protocol.test_fraction, protocol.split_seed)
    else:
        rest, test = np.arange(len(samples.targets)), np.asarray([], dtype=np.int64)
    tr, va = grouped_split(samples.targets[rest], samples.groups[rest], protocol.val_fraction,
                           protocol.split_seed + 1, what="val")
    split = Split(rest[tr], rest[va], test)
    for name, idx in (("training", split.train), ("validation", split.val)):
        if len(idx) == 0:
            raise DataError(f"the {name} split is empty; label more samples or lower the other fractions")
    return split


def check_classes_present(targets: np.ndarray, idx: np.ndarray, names: Sequence[str], where: str,
                           multi_label: bool) -> str | None:
    """A warning (logged and returned for results.json) when a split lacks a class."""
    if multi_label or not len(idx):
        return None
    missing = sorted(set(range(len(names))) - set(np.unique(targets[idx]).tolist()))
    if not missing:
        return None
    msg = (f"the {where} split lacks class(es) {[names[m] for m in missing]}: too few groups (patients, "
           f"scenes, files) of them to put some in every split; their metrics are undefined or meaningless")
    log.warning("%s", msg)
    return msg


def run_protocol(pretrained: nn.Module, moco_config: dict[str, Any], data: LabelledSet, samples: Samples,
                 split: Split, *, test_samples: Samples | None, cfg: FinetuneConfig, protocol: ProtocolConfig,
                 device: torch.device, progress: bool = True) -> dict[str, Any]:
    """Every (label fraction, seed, init) run; returns the nested results and the main models.

    ``init`` is ``pretrained`` or ``random_init``; each report is :func:`diagnose`'s dict plus
    ``n_train``/``n_val`` and the training history summary.
    """
    point = OperatingPoint.parse(protocol.operating_point)
    k = len(data.names)
    test_src = test_samples or samples
    test_idx = np.arange(len(test_samples.targets)) if test_samples is not None else split.test
    test_ds = subset_of(test_src, test_idx)
    lookup_val = {int(r): i for i, r in enumerate(samples.rows)}
    lookup_test = {int(r): i for i, r in enumerate(test_src.rows)}
    val_ds = subset_of(samples, split.val)
    warnings = [w for where, src, idx in (("training", samples, split.train), ("validation", samples, split.val),
                                          ("test", test_src, test_idx))
                if (w := check_classes_present(src.targets, idx, data.names, where, data.multi_label))]
    units = bootstrap_units(test_src.targets[test_idx], test_src.groups[test_idx])
    if protocol.bootstrap and units < MIN_BOOTSTRAP_UNITS:
        warnings.append(f"test set: {units} group(s); a bootstrap interval needs at least {MIN_BOOTSTRAP_UNITS} "
                        "(resampling so few redraws the same patients), so ci95 and p_no_gain are left empty")
    runs: dict[str, Any] = {}
    models: dict[str, Classifier] = {}
    largest = max(protocol.label_fractions)
    for fraction in protocol.label_fractions:
        per_init: dict[str, dict[str, Any]] = {"pretrained": {}, "random_init": {}}
        scored: dict[str, list[tuple]] = {"pretrained": [], "random_init": []}
        for seed in protocol.seeds:
            pool = subsample_groups(samples.targets[split.train], samples.groups[split.train], fraction, seed)
            train_idx = split.train[pool]
            for init in ("pretrained", "random_init"):
                backbone = pretrained if init == "pretrained" else fresh_backbone(moco_config, seed)
                model, hist = train_classifier(
                    backbone, samples, train_idx, split.val, num_outputs=k, multi_label=data.multi_label, cfg=cfg,
                    seed=seed, device=device, progress=progress, desc=f"{init} {fraction:g} seed {seed}")
                vp, vr = predict(model, val_ds, multi_label=data.multi_label, device=device, amp=cfg.amp)
                tp, tr = predict(model, test_ds, multi_label=data.multi_label, device=device, amp=cfg.amp)
                vy = samples.targets[[lookup_val[int(r)] for r in vr]]
                ti = [lookup_test[int(r)] for r in tr]
                report = diagnose(tp, test_src.targets[ti], val_scores=vp, val_targets=vy, point=point,
                                  multi_label=data.multi_label, positive=protocol.positive, resamples=0)
                scored[init].append((tp, test_src.targets[ti], test_src.groups[ti], report["thresholds"]))
                report.update(n_train=int(len(train_idx)), n_val=int(len(vr)),
                              n_train_groups=int(len(np.unique(samples.groups[train_idx]))),
                              best_epoch=hist["best_epoch"], epochs_run=hist["epochs_run"])
                per_init[init][str(seed)] = report
                if fraction == largest and seed == protocol.seeds[0]:
                    models[init] = model.cpu()
                    report["_scores"] = (tp, test_src.targets[ti])
        runs[f"{fraction:g}"] = {init: summarise(reports) for init, reports in per_init.items()}
        if fraction == largest and protocol.bootstrap:
            paired = seed_mean_gain(scored["pretrained"], scored["random_init"], data.multi_label, protocol)
            for init, which in (("pretrained", "model"), ("random_init", "baseline")):
                runs[f"{fraction:g}"][init]["ci95"] = paired.pop(which)
                runs[f"{fraction:g}"][init]["bootstrap"] = {"resamples": protocol.bootstrap, "unit": "group",
                                                            "of": "mean over seeds"}
            # a gain in every seed, or one lucky seed: the paired CI above is conditioned on these seeds
            paired["per_seed"] = {seed: {m: per_init["pretrained"][seed][m] - per_init["random_init"][seed][m]
                                         for m in METRICS} for seed in per_init["pretrained"]}
            runs[f"{fraction:g}"]["gain"] = paired
    return {"runs": runs, "models": models, "warnings": warnings}


def seed_mean_gain(scored: list[tuple], baseline: list[tuple], multi_label: bool,
                   protocol: ProtocolConfig) -> dict[str, Any]:
    """Pretrained minus random init (means over seeds) with its paired group-bootstrap 95% CI,
    the share of draws without a gain, and each init's own CI of its mean over seeds from the
    same draws (``model``, ``baseline``; :func:`fedmoco.diagnostics.bootstrap_gain_ci`). Every
    seed of both inits is scored on the same test set."""
    from fedmoco.diagnostics import bootstrap_gain_ci

    targets, groups = scored[0][1], scored[0][2]
    if any(not np.array_equal(t, targets) for _, t, _, _ in [*scored, *baseline]):
        raise RuntimeError("seeds were scored on different test samples")
    stack = lambda runs: (np.stack([s for s, _, _, _ in runs]), np.stack([t for *_, t in runs]))  # noqa: E731
    (a, ta), (b, tb) = stack(scored), stack(baseline)
    out = bootstrap_gain_ci(a, ta, b, tb, targets, multi_label=multi_label, positive=protocol.positive,
                            groups=groups, resamples=protocol.bootstrap, seed=protocol.split_seed)
    return {**out, "bootstrap": {"resamples": protocol.bootstrap, "unit": "group", "paired": True,
                                 "of": "mean over seeds, pretrained minus random init"}}


def seeds_ahead(gain: dict[str, Any], metric: str = "auroc") -> tuple[int, int]:
    """(seeds in which the pretrained encoder's ``metric`` beat random init's, seeds) of a
    ``gain`` block of results.json; (0, 0) without per-seed gains."""
    per_seed = gain.get("per_seed", {})
    return sum(g[metric] is not None and g[metric] > 0 for g in per_seed.values()), len(per_seed)


def summarise(reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean and std (over seeds, ddof 0) of the headline metrics, plus every seed's report."""
    out: dict[str, Any] = {"mean": {}, "std": {}, "seeds": reports}
    for m in (*METRICS, "top5", "subset_accuracy", "balanced_accuracy", "macro_f1", "kappa"):
        vals = [r[m] for r in reports.values() if m in r]
        if vals:
            v = np.asarray(vals, dtype=float)
            out["mean"][m] = float(np.nanmean(v)) if np.isfinite(v).any() else math.nan
            out["std"][m] = float(np.nanstd(v)) if np.isfinite(v).any() else math.nan
    return out


def headline(fraction_runs: dict[str, Any], init: str) -> dict[str, Any]:
    """Top-level keys of results.json for one init: the mean over seeds of accuracy, auroc,
    sensitivity, specificity (and top5), their std, n_test, and the bootstrap CIs of the mean."""
    s = fraction_runs[init]
    first = next(iter(s["seeds"].values()))
    out = {**s["mean"], "std": s["std"], "n_test": first["n_test"], "n_train": first["n_train"],
           "per_class_auroc": first["per_class_auroc"], "thresholds": first["thresholds"]}
    if "ci95" in s:
        out["ci95"] = s["ci95"]
        out["bootstrap"] = s["bootstrap"]
    return out


def write_report(out: Path, result: dict[str, Any], data: LabelledSet, protocol: ProtocolConfig,
                 extra: dict[str, Any]) -> dict[str, Any]:
    """results.json, ROC and confusion PNGs of both inits, and the label-efficiency curve."""
    out.mkdir(parents=True, exist_ok=True)
    runs = result["runs"]
    main_key = f"{max(protocol.label_fractions):g}"
    report = {**headline(runs[main_key], "pretrained"), "random_init": headline(runs[main_key], "random_init"),
              "label_fraction": float(main_key), "label_fractions": runs, "classes": data.names,
              "multi_label": data.multi_label, "operating_point": protocol.operating_point,
              "warnings": result["warnings"], **extra}
    gain = {m: report[m] - report["random_init"][m] for m in METRICS if m in report and m in report["random_init"]}
    report["gain"] = {**gain, **runs[main_key].get("gain", {})}
    plots = {}
    for init in ("pretrained", "random_init"):
        first = next(iter(runs[main_key][init]["seeds"].values()))
        scores, targets = first.pop("_scores")
        suffix = "" if init == "pretrained" else "_random_init"
        label = "pretrained encoder" if init == "pretrained" else "random-init encoder"
        plots[f"roc{suffix}"] = str(plot_roc(scores, targets, data.names, out / f"roc{suffix}.png",
                                             thresholds=first["thresholds"], title=f"ROC, {label}",
                                             positive=protocol.positive))
        plots[f"confusion{suffix}"] = str(plot_confusion_png(np.asarray(first["confusion"]), data.names,
                                                              out / f"confusion{suffix}.png", label))
    plots["label_efficiency"] = str(plot_label_efficiency(runs, out / "label_efficiency.png", n_test=report["n_test"]))
    report["plots"] = plots
    atomic_write_json(out / "results.json", json_safe(report, skip_private=True))
    return report


def plot_label_efficiency(runs: dict[str, Any], path: Path, metric: str = "auroc", n_test: int | None = None) -> Path:
    """Mean ± std over seeds of ``metric`` against the label fraction, pretrained vs random init."""
    from fedmoco.plots import plt, save_figure

    fracs = sorted(runs, key=float)
    pct = [float(f) * 100 for f in fracs]
    fig, ax = plt.subplots(figsize=(6, 4))
    # The two series share their x values: each is nudged 3% to its side on the log axis, so
    # equal results (and their error bars) never hide one another.
    for init, label, nudge in (("pretrained", "pretrained encoder", 0.97), ("random_init", "random init", 1.03)):
        mean = [runs[f][init]["mean"].get(metric, math.nan) for f in fracs]
        std = [runs[f][init]["std"].get(metric, math.nan) for f in fracs]
        ax.errorbar([x * nudge for x in pct], mean, yerr=std, marker="o", capsize=3, label=label)
    if metric == "auroc":
        ax.axhline(0.5, ls="--", c="grey", label="chance (AUROC 0.5)")
    ax.set_xscale("log")
    ax.set_xticks(pct, [f"{x:g}" for x in pct])  # the fractions that were run, not decades
    ax.minorticks_off()
    ax.set_xlim(min(pct) / 1.6, max(pct) * 1.6)
    ax.set_xlabel("labelled training data used (%)")
    ax.set_ylabel(f"test {metric.upper() if metric == 'auroc' else metric} (mean ± std over seeds)")
    ax.set_title("label efficiency" + (f", n_test = {n_test}" if n_test else ""))
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside the axes: it covers no result
    fig.set_size_inches(8.5, 4)
    return save_figure(fig, path)


def save_finetuned(path: Path, model: Classifier, *, names: list[str], multi_label: bool, thresholds: list[float],
                   moco_config: dict[str, Any], data_meta: dict[str, Any]) -> Path:
    """The fine-tuned classifier, loadable with ``torch.load(weights_only=True)``: backbone and
    head state dicts, class names, operating-point thresholds, and the input pipeline."""
    return atomic_save({"format": FINETUNED_FORMAT, "version": 1, "moco_config": moco_config, "data": data_meta,
                        "backbone": model.backbone.state_dict(), "head": model.head.state_dict(), "classes": names,
                        "multi_label": multi_label, "thresholds": thresholds}, path)


def config_dict(cfg: FinetuneConfig, protocol: ProtocolConfig) -> dict[str, Any]:
    return {"finetune": asdict(cfg), "protocol": asdict(protocol)}
