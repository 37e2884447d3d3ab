"""PNG plots of a run: loss curve, score statistics, score histograms, confusion matrix."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: sites and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from fedmoco.metrics import read_jsonl  # noqa: E402
from fedmoco.moco import SCORE_BINS  # noqa: E402


def plot_run(metrics_path: Path | str, out_dir: Path | str, embedding_dim: int | None = None) -> list[Path]:
    """Draw ``loss.png``, ``scores.png`` and ``score_hist.png`` from a run's metrics.jsonl."""
    records = list(read_jsonl(metrics_path))
    steps = [r for r in records if "step" in r and "loss" in r]
    epochs = [r for r in records if r.get("event") == "epoch"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if steps:
        written.append(_plot_loss(steps, out / "loss.png"))
        written.append(_plot_scores(steps, out / "scores.png", embedding_dim))
    if epochs:
        chosen = [epochs[0], epochs[-1]] if len(epochs) > 1 else epochs
        series = [(f"epoch {e['epoch'] + 1}", e["pos_hist"], e["neg_hist"]) for e in chosen]
        written.append(plot_score_histograms(series, out / "score_hist.png"))
    return written


def whole_number_ticks(ax) -> None:
    """Ticks on the x axis at whole numbers only (steps, rounds): never at 2.5. Call after the
    data is drawn: with a single x value the locator has no range to work with (it would tick
    0.95..1.05, or -0.06..0.06), so the axis is set to that value ± 1 with one tick."""
    # data lines only: a reference line (axhline) spans the axes in axes units
    xs = {float(x) for line in ax.get_lines() if line.get_transform() == ax.transData
          for x in np.atleast_1d(line.get_xdata()) if np.isfinite(float(x))}
    if len(xs) == 1:
        x = xs.pop()
        ax.set_xlim(x - 1, x + 1)
        ax.set_xticks([x])
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def point_marker(n: int) -> str:
    """A marker for a line of ``n`` points when a lone point would otherwise not be drawn."""
    return "o" if n <= 3 else ""


def save_figure(fig, path: Path) -> Path:
    """Lay out, write as a 100 dpi PNG atomically (a stop or a full disk mid-write leaves the
    last good plot, not a truncated one) and close ``fig``; returns ``path``."""
    from fedmoco.atomic import atomic_write

    try:
        fig.tight_layout()
        atomic_write(path, lambda fh: fig.savefig(fh, dpi=100, format="png"))
    finally:
        plt.close(fig)
    return Path(path)


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if len(y) < window or window < 2:
        return y
    kernel = np.ones(window) / window
    return np.convolve(y, kernel, mode="valid")


def _plot_loss(steps: list[dict], path: Path) -> Path:
    x = np.array([r["step"] for r in steps])
    y = np.array([r["loss"] if r["loss"] is not None else np.nan for r in steps], dtype=float)
    fig, ax = plt.subplots(figsize=(6, 4))
    w = max(1, len(y) // 20)
    # pale only when a running mean is drawn over it: alone, the raw loss is the plot
    ax.plot(x, y, alpha=0.35 if w > 1 else 1.0, marker=point_marker(len(x)), label="loss")
    if w > 1:
        ax.plot(x[w - 1:], _smooth(y, w), label=f"mean of {w} steps")
    ax.set_xlabel("step")
    whole_number_ticks(ax)
    ax.set_ylabel("InfoNCE loss")
    ax.set_title("MoCo training loss")
    ax.legend()
    return save_figure(fig, path)


def _plot_scores(steps: list[dict], path: Path, dim: int | None) -> Path:
    x = np.array([r["step"] for r in steps])
    get = lambda k: np.array([np.nan if r.get(k) is None else r[k] for r in steps], dtype=float)  # noqa: E731
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    marker = point_marker(len(x))
    a1.plot(x, get("pos_mean"), marker=marker, label="positive mean")
    neg, sd = get("neg_mean"), np.sqrt(get("neg_var"))
    a1.plot(x, neg, marker=marker, label="negative mean")
    if len(x) > 1:  # a band over one step has no width: an error bar shows it instead
        a1.fill_between(x, neg - sd, neg + sd, alpha=0.2, label="negative ±1 std")
    else:  # a bar between the two ends, each a point
        a1.plot(np.repeat(x, 2), [neg[0] - sd[0], neg[0] + sd[0]], "-o", color="C1", alpha=0.4,
                label="negative ±1 std")
    a1.set_xlabel("step")
    a1.set_ylabel("cosine score")
    a1.set_title("score statistics")
    whole_number_ticks(a1)
    a1.legend()
    a2.plot(x, get("emb_std"), marker=marker, label="std of normalised embeddings")
    whole_number_ticks(a2)
    if dim:
        a2.axhline(1 / math.sqrt(dim), ls="--", c="grey", label=f"1/sqrt({dim}) (uniform)")
    a2.set_xlabel("step")
    a2.set_ylabel("std per dimension")
    a2.set_ylim(bottom=0)  # 0 is full collapse: the reference a reader measures against
    a2.set_title("collapse monitor")
    a2.legend()
    return save_figure(fig, path)


def plot_score_histograms(series: Sequence[tuple[str, list[int], list[int]]], path: Path) -> Path:
    """Overlaid positive/negative score histograms (fixed bins over [-1, 1]) per label."""
    edges = np.linspace(-1, 1, SCORE_BINS + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 4), squeeze=False)
    for ax, (label, pos, neg) in zip(axes[0], series):
        for name, counts in (("positive", pos), ("negative", neg)):
            c = np.asarray(counts, dtype=float)
            if c.sum():
                ax.bar(centres, c / c.sum(), width=edges[1] - edges[0], alpha=0.5, label=name)
        ax.set_xlabel("cosine score q·k")
        ax.set_ylabel("share of pairs")
        ax.set_title(label)
        ax.legend()
    return save_figure(fig, path)


def plot_confusion(matrix: np.ndarray, classes: Sequence[str], path: Path | str, title: str) -> Path:
    """Confusion matrix (rows: true, columns: predicted) with counts in the cells."""
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n + 2, 1.0 + 0.6 * n + 1))
    im = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    hi = matrix.max() if matrix.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center",
                    color="white" if matrix[i, j] > hi / 2 else "black")
    fig.colorbar(im, ax=ax, label="test samples")
    return save_figure(fig, Path(path))
