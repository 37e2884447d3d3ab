"""Diagnostic metrics of a classifier's scores: AUROC, sensitivity/specificity at an operating
point chosen on validation data, accuracy, bootstrap 95% CIs, and their ROC/confusion PNGs.

Scores are probabilities: (N, C) softmax rows for single-label data with C classes, or (N, L)
independent sigmoid outputs for multi-label data with L labels. Targets are (N,) class ids or
(N, L) 0/1. Every metric comes from scikit-learn; only the choice of operating point and the
(group) bootstrap are written here.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, multilabel_confusion_matrix, roc_auc_score, roc_curve
from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score, f1_score, precision_recall_fscore_support

from fedmoco.errors import ConfigError

METRICS = ("accuracy", "auroc", "sensitivity", "specificity")


@dataclass(frozen=True)
class OperatingPoint:
    """How a per-class threshold is chosen on validation scores.

    ``youden``: maximise sensitivity + specificity - 1 (Youden's J).
    ``specificity=0.9``: the highest sensitivity whose specificity is at least 0.9.
    """

    rule: str = "youden"
    specificity: float | None = None

    @classmethod
    def parse(cls, text: str) -> "OperatingPoint":
        text = text.strip().lower()
        if text == "youden":
            return cls("youden")
        key, sep, value = text.partition("=")
        if sep and key.strip() == "specificity":
            try:
                spec = float(value)
            except ValueError:
                spec = -1.0
            if 0 < spec < 1:
                return cls("specificity", spec)
        raise ConfigError(f"--operating-point: expected 'youden' or 'specificity=X' with 0 < X < 1, got {text!r}")

    def __str__(self) -> str:
        return self.rule if self.specificity is None else f"specificity={self.specificity:g}"


def one_vs_rest(targets: np.ndarray, num_outputs: int) -> np.ndarray:
    """(N,) class ids -> (N, C) 0/1; (N, L) multi-label targets are returned as int."""
    targets = np.asarray(targets)
    if targets.ndim == 2:
        return targets.astype(np.int64)
    return (targets[:, None] == np.arange(num_outputs)[None, :]).astype(np.int64)


def choose_threshold(y: np.ndarray, score: np.ndarray, point: OperatingPoint) -> float | None:
    """The score threshold (predict positive when score >= threshold) for one binary column.

    ``y`` (N,) 0/1, ``score`` (N,). None when ``y`` holds a single class (no ROC exists).
    """
    if len(np.unique(y)) < 2:
        return None
    fpr, tpr, thr = roc_curve(y, score)
    if point.rule == "youden":
        i = int(np.argmax(tpr - fpr))
    else:
        ok = np.flatnonzero(1 - fpr >= point.specificity - 1e-12)
        i = int(ok[np.argmax(tpr[ok])])
    # roc_curve's first threshold is +inf ("nothing positive"); keep it finite for JSON.
    return float(thr[i]) if np.isfinite(thr[i]) else float(np.nextafter(score.max(), np.inf))


def choose_thresholds(val_targets: np.ndarray, val_scores: np.ndarray, point: OperatingPoint) -> list[float]:
    """One threshold per class/label column chosen on validation data; 0.5 for a column whose
    validation set holds one class only (no ROC to choose on)."""
    y = one_vs_rest(val_targets, val_scores.shape[1])
    out = []
    for j in range(val_scores.shape[1]):
        t = choose_threshold(y[:, j], val_scores[:, j], point)
        out.append(0.5 if t is None else t)
    return out


def sensitivity_specificity(y: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """(TP / (TP + FN), TN / (TN + FP)) of binary ``y`` and ``pred``; NaN for an empty class."""
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    sens = tp / (tp + fn) if tp + fn else math.nan
    spec = tn / (tn + fp) if tn + fp else math.nan
    return float(sens), float(spec)


def top_k_accuracy(targets: np.ndarray, scores: np.ndarray, k: int = 5) -> float:
    """Share of rows whose true class is among the ``k`` best scores (N,) and (N, C) -> [0, 1],
    ties counted against it: a hit needs fewer than ``k`` other classes scoring as high or higher.

    Hand-written because scikit-learn's ``top_k_accuracy_score`` breaks ties by class index: kNN
    gives every class that got no vote the score 0, and with more classes than votes its top 5
    was filled with those, the highest-indexed first (class 7 of 8 scored top-5 1.0 with no vote;
    found by an audit). With distinct scores (softmax) the two agree (tests)."""
    true = scores[np.arange(len(targets)), targets][:, None]  # (N, 1)
    at_least = (scores >= true).sum(axis=1) - 1  # other classes scoring as high or higher
    return float((at_least < k).mean()) if len(targets) else float("nan")


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else math.nan


def point_metrics(scores: np.ndarray, targets: np.ndarray, thresholds: Sequence[float], *,
                  multi_label: bool, positive: int | None = None) -> dict[str, Any]:
    """Accuracy, AUROC, sensitivity and specificity of one evaluation set.

    Single-label: accuracy of the arg-max class; per-class one-vs-rest AUROC, ``auroc`` their
    macro mean. With two classes sensitivity/specificity are those of class ``positive``
    (default 1) at its threshold; with more, the macro mean of per-class one-vs-rest values.
    Multi-label: per-label AUROC and sensitivity/specificity at each label's threshold,
    macro means; ``accuracy`` is the mean per-label accuracy, ``subset_accuracy`` the share of
    samples with every label right. Top-5 accuracy is added only with more than 5 classes.
    Single-label also gets the arg-max measures land-cover and multi-class reports use:
    ``balanced_accuracy`` (mean recall over the classes present), ``macro_f1``, Cohen's
    ``kappa``, and ``per_class_precision`` / ``per_class_recall`` (user's and producer's
    accuracy); multi-label gets ``macro_f1`` at the thresholds. Undefined values are NaN.
    """
    n_out = scores.shape[1]
    y = one_vs_rest(targets, n_out)
    pred = (scores >= np.asarray(thresholds)[None, :]).astype(np.int64)
    per_auc = [_auc(y[:, j], scores[:, j]) for j in range(n_out)]
    rates = [sensitivity_specificity(y[:, j], pred[:, j]) for j in range(n_out)]
    out: dict[str, Any] = {}
    if multi_label:
        out["accuracy"] = float((pred == y).mean())
        out["subset_accuracy"] = float((pred == y).all(axis=1).mean())
        out["macro_f1"] = float(f1_score(y, pred, average="macro", zero_division=np.nan))
    else:
        out["accuracy"] = float(accuracy_score(targets, scores.argmax(1)))
        if n_out > 5:
            out["top5"] = top_k_accuracy(targets, scores, 5)
        out.update(argmax_metrics(targets, scores.argmax(1), n_out))
    cols = [positive if positive is not None else 1] if (n_out == 2 and not multi_label) else range(n_out)
    out["auroc"] = _nanmean([per_auc[j] for j in (range(n_out) if len(cols) > 1 else cols)])
    out["sensitivity"] = _nanmean([rates[j][0] for j in cols])
    out["specificity"] = _nanmean([rates[j][1] for j in cols])
    out["per_class_auroc"] = per_auc
    out["per_class_sensitivity"] = [r[0] for r in rates]
    out["per_class_specificity"] = [r[1] for r in rates]
    return out


def argmax_metrics(targets: np.ndarray, predicted: np.ndarray, n_classes: int) -> dict[str, Any]:
    """Balanced accuracy, macro F1, Cohen's kappa and per-class precision / recall of class
    predictions (N,) against targets (N,), over classes 0..n_classes-1. A class absent from
    both gets NaN precision/recall and is left out of the macro F1."""
    labels = np.arange(n_classes)
    present = np.union1d(targets, predicted)
    agree = (targets == predicted).all()  # kappa is 0/0 when a single class is everything
    with warnings.catch_warnings():
        # "y_pred contains classes not in y_true", "a single label was found": a small test
        # set that lacks a class is expected here, and its undefined values are NaN above
        warnings.simplefilter("ignore", UserWarning)
        precision, recall, _, _ = precision_recall_fscore_support(targets, predicted, labels=labels,
                                                                  zero_division=np.nan)
        return {
            "balanced_accuracy": float(balanced_accuracy_score(targets, predicted)),
            "macro_f1": float(f1_score(targets, predicted, labels=present, average="macro", zero_division=np.nan)),
            "kappa": 1.0 if agree else float(cohen_kappa_score(targets, predicted, labels=labels)),
            "per_class_precision": [float(v) for v in precision],
            "per_class_recall": [float(v) for v in recall],
        }


def _nanmean(values: Sequence[float]) -> float:
    v = np.asarray(values, dtype=float)
    return float(np.nanmean(v)) if np.isfinite(v).any() else math.nan


#: Fewest resampling units (groups, or samples without groups) a bootstrap interval is given for.
#: Resampling one patient redraws that patient every time: the interval had zero width and the
#: share of draws without a gain read 0.000, a certain gain from one patient (found by an audit).
#: Below this the intervals are left empty (null) and the caller says why.
MIN_BOOTSTRAP_UNITS = 10


def bootstrap_units(targets: np.ndarray, groups: np.ndarray | None) -> int:
    """How many units a bootstrap of this test set resamples: its groups, else its samples."""
    return len(targets) if groups is None else len(np.unique(np.asarray(groups)))


def _bootstrap_draws(targets: np.ndarray, groups: np.ndarray | None, resamples: int, seed: int):
    """Index arrays of ``resamples`` bootstrap draws of the test set: samples, or whole groups
    (a cluster bootstrap) with ``groups``. The same seed gives the same draws, whatever the
    run's salt: groups are numbered by first appearance (:func:`fedmoco.splits.group_ids`), as
    the splits number them, not in the order of their salted hashes."""
    from fedmoco.splits import group_ids

    if bootstrap_units(targets, groups) < MIN_BOOTSTRAP_UNITS:
        return
    rng = np.random.default_rng(seed)
    n = len(targets)
    members = None
    if groups is not None:
        ids = group_ids(groups)
        members = [np.flatnonzero(ids == g) for g in range(ids.max() + 1)]
    for _ in range(resamples):
        if members is None:
            yield rng.integers(0, n, n)
        else:
            yield np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])


def _runs(scores: np.ndarray, thresholds: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    runs = np.asarray(scores)
    return (runs[None] if runs.ndim == 2 else runs), np.atleast_2d(np.asarray(thresholds, dtype=float))


def _mean_over_runs(runs: np.ndarray, run_thresholds: np.ndarray, targets: np.ndarray, idx: np.ndarray, *,
                    multi_label: bool, positive: int | None) -> dict[str, float]:
    ms = [point_metrics(r[idx], targets[idx], t, multi_label=multi_label, positive=positive)
          for r, t in zip(runs, run_thresholds)]
    return {k: _nanmean([m[k] for m in ms]) for k in METRICS}


def _percentile_ci(draws: dict[str, list[float]]) -> dict[str, list[float]]:
    out = {}
    for k, v in draws.items():
        v = np.asarray(v, dtype=float)
        v = v[np.isfinite(v)]
        out[k] = [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) else [math.nan, math.nan]
    return out


def bootstrap_ci(scores: np.ndarray, targets: np.ndarray, thresholds: Sequence[float] | np.ndarray, *,
                 multi_label: bool, positive: int | None, groups: np.ndarray | None, resamples: int = 1000,
                 seed: int = 0) -> dict[str, list[float]]:
    """Percentile 95% intervals of :data:`METRICS` over ``resamples`` bootstrap draws.

    ``scores`` (N, K) with ``thresholds`` (K,); or (R, N, K) with (R, K) for R runs (seeds)
    scored on the same test set: each draw then scores every run and averages them, giving
    the interval of the mean over runs that results.json reports.
    With ``groups`` the draw resamples whole groups (a cluster bootstrap): slices of one patient
    are not independent, and resampling them one by one would make intervals too narrow.
    Thresholds stay fixed (they were chosen on validation data). Draws where a metric is
    undefined (a class absent) are left out of that metric's interval. With fewer than
    :data:`MIN_BOOTSTRAP_UNITS` groups (samples) every interval is [nan, nan].
    """
    runs, run_thresholds = _runs(scores, thresholds)
    draws: dict[str, list[float]] = {m: [] for m in METRICS}
    for idx in _bootstrap_draws(targets, groups, resamples, seed):
        for k, v in _mean_over_runs(runs, run_thresholds, targets, idx, multi_label=multi_label,
                                    positive=positive).items():
            draws[k].append(v)
    return _percentile_ci(draws)


def bootstrap_gain_ci(scores: np.ndarray, thresholds: Sequence[float] | np.ndarray, baseline_scores: np.ndarray,
                      baseline_thresholds: Sequence[float] | np.ndarray, targets: np.ndarray, *, multi_label: bool,
                      positive: int | None, groups: np.ndarray | None, resamples: int = 1000,
                      seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap of the gain of one model over a baseline scored on the same test set.

    ``scores``/``baseline_scores`` are (N, K) or (R, N, K) as in :func:`bootstrap_ci`. Every
    draw resamples the test set (whole groups with ``groups``) once and scores both models on
    it, so the interval is that of the difference (mean over runs of the model minus that of
    the baseline) on a common resample, a paired comparison. Two marginal intervals that
    overlap do not mean the difference is noise: both models err on the same hard patients,
    and the paired interval removes that shared variation.

    Returns ``{"ci95": {metric: [lo, hi]} of the gain, "p_no_gain": {metric: share of draws
    whose gain is <= 0}, "model": ..., "baseline": ...}``, the last two being each model's own
    intervals from the same draws (equal to :func:`bootstrap_ci` with the same ``seed``). With
    fewer than :data:`MIN_BOOTSTRAP_UNITS` groups (samples) all of them are nan.
    """
    runs, run_thresholds = _runs(scores, thresholds)
    base, base_thresholds = _runs(baseline_scores, baseline_thresholds)
    draws: dict[str, dict[str, list[float]]] = {w: {m: [] for m in METRICS} for w in ("model", "baseline", "gain")}
    for idx in _bootstrap_draws(targets, groups, resamples, seed):
        a = _mean_over_runs(runs, run_thresholds, targets, idx, multi_label=multi_label, positive=positive)
        b = _mean_over_runs(base, base_thresholds, targets, idx, multi_label=multi_label, positive=positive)
        for k in METRICS:
            draws["model"][k].append(a[k])
            draws["baseline"][k].append(b[k])
            draws["gain"][k].append(a[k] - b[k])
    p_no_gain = {}
    for k, v in draws["gain"].items():
        v = np.asarray(v, dtype=float)
        v = v[np.isfinite(v)]
        p_no_gain[k] = float((v <= 0).mean()) if len(v) else math.nan
    return {"ci95": _percentile_ci(draws["gain"]), "p_no_gain": p_no_gain,
            "model": _percentile_ci(draws["model"]), "baseline": _percentile_ci(draws["baseline"])}


def diagnose(scores: np.ndarray, targets: np.ndarray, *, val_scores: np.ndarray, val_targets: np.ndarray,
             point: OperatingPoint, multi_label: bool, positive: int | None = None,
             groups: np.ndarray | None = None, resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The full report of one test set: thresholds chosen on (val_scores, val_targets), point
    metrics on the test set, bootstrap CIs, the confusion matrix and ``n_test``.

    scores (N, K) probabilities, targets (N,) or (N, K); the same shapes for validation.
    """
    thresholds = choose_thresholds(val_targets, val_scores, point)
    report = point_metrics(scores, targets, thresholds, multi_label=multi_label, positive=positive)
    report["n_test"] = int(len(targets))
    report["thresholds"] = thresholds
    report["operating_point"] = str(point)
    if resamples:
        report["ci95"] = bootstrap_ci(scores, targets, thresholds, multi_label=multi_label, positive=positive,
                                      groups=groups, resamples=resamples, seed=seed)
        report["bootstrap"] = {"resamples": resamples, "unit": "sample" if groups is None else "group"}
    report["confusion"] = confusion(scores, targets, thresholds, multi_label=multi_label, positive=positive).tolist()
    return report


def confusion(scores: np.ndarray, targets: np.ndarray, thresholds: Sequence[float], *, multi_label: bool,
              positive: int | None = None) -> np.ndarray:
    """Single-label: (C, C) counts, rows true, columns predicted (arg-max; with two classes
    the operating point decides, consistently with sensitivity/specificity). Multi-label:
    (L, 2, 2) per label, [[TN, FP], [FN, TP]]."""
    n_out = scores.shape[1]
    if multi_label:
        pred = (scores >= np.asarray(thresholds)[None, :]).astype(np.int64)
        return multilabel_confusion_matrix(np.asarray(targets).astype(np.int64), pred)
    if n_out == 2:
        pos = 1 if positive is None else positive
        pred = np.where(scores[:, pos] >= thresholds[pos], pos, 1 - pos)
    else:
        pred = scores.argmax(1)
    return confusion_matrix(targets, pred, labels=np.arange(n_out))


def plot_roc(scores: np.ndarray, targets: np.ndarray, names: Sequence[str], path: Path | str, *,
             thresholds: Sequence[float] | None = None, title: str = "ROC", positive: int | None = None) -> Path:
    """One ROC curve per class/label (the positive class only for binary single-label data),
    the chance diagonal, and the operating point of each curve; n in the title."""
    from fedmoco.plots import plt, save_figure

    y = one_vs_rest(targets, scores.shape[1])
    binary = scores.shape[1] == 2 and np.asarray(targets).ndim == 1
    cols = [1 if positive is None else positive] if binary else range(scores.shape[1])
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], ls="--", c="grey", label="chance")
    undefined = []
    for k, j in enumerate(cols):
        if not 0 < y[:, j].sum() < len(y):
            undefined.append(names[j])
            continue
        fpr, tpr, _ = roc_curve(y[:, j], scores[:, j])
        # curves of different classes can coincide: each its own dash and a thinner line than the
        # one before, so the one drawn first still shows around the later ones
        line, = ax.plot(fpr, tpr, ls=("-", "--", "-.", ":")[k % 4], lw=max(1.0, 3.0 - 0.5 * k),
                        label=f"{names[j]} (AUROC {roc_auc_score(y[:, j], scores[:, j]):.3f})")
        if thresholds is not None:
            sens, spec = sensitivity_specificity(y[:, j], (scores[:, j] >= thresholds[j]).astype(int))
            ax.plot([1 - spec], [sens], ("o", "s", "^", "D")[k % 4], ms=max(4.0, 9.0 - 1.5 * k), c=line.get_color(),
                    label=f"{names[j]}: operating point (chosen on validation)")
    if undefined:  # one class only in the test set: no ROC, said rather than silently left out
        ax.text(0.98, 0.02, f"no ROC (one class only in the test set): {', '.join(map(str, undefined))}",
                transform=ax.transAxes, ha="right", va="bottom", fontsize=7, color="0.3")
    ax.set_xlabel("1 - specificity (false-positive rate)")
    ax.set_ylabel("sensitivity (true-positive rate)")
    ax.set_title(f"{title}, n = {len(y)}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")  # beside the curves, over none
    fig.set_size_inches(8.5, 5)
    return save_figure(fig, Path(path))


def plot_confusion_png(matrix: np.ndarray, names: Sequence[str], path: Path | str, title: str) -> Path:
    """Confusion-matrix PNG with n (the number of test samples) in the title; a row of 2x2
    panels for multi-label (L, 2, 2) matrices."""
    from fedmoco.plots import plot_confusion, plt, save_figure

    matrix = np.asarray(matrix)
    if matrix.ndim == 2:
        return plot_confusion(matrix, names, path, f"{title}, n = {int(matrix.sum())}")
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 3), squeeze=False)
    for ax, m, name in zip(axes[0], matrix, names):
        ax.imshow(m, cmap="Blues")
        for i in range(2):
            for j in range(2):
                ax.text(j, i, int(m[i, j]), ha="center", va="center")
        ax.set_xticks([0, 1], ["no", "yes"])
        ax.set_yticks([0, 1], ["no", "yes"])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(name)
    fig.suptitle(f"{title}, n = {int(matrix[0].sum())}")
    return save_figure(fig, Path(path))
