"""PNG plots of a federated run from its ``rounds.jsonl`` (matplotlib, Agg backend).

Lives in the core package so ``fedmoco plot SERVER_OUT_DIR`` can draw a finished federation
without importing the server; ``server.plots`` re-exports it for the ServerApp.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from fedmoco.metrics import read_jsonl
from fedmoco.plots import save_figure, whole_number_ticks  # also selects the headless Agg backend

log = logging.getLogger(__name__)


def round_records(metrics_path: Path | str) -> list[dict[str, Any]]:
    """One record per round, the last one written (a resumed run may repeat a round)."""
    by_round: dict[int, dict[str, Any]] = {}
    for rec in read_jsonl(metrics_path):
        if rec.get("event") == "round":
            if isinstance(rec.get("round"), int) and not isinstance(rec["round"], bool):
                by_round[rec["round"]] = rec
            else:
                log.warning("%s: skipped a round record whose round is %r, not a number", metrics_path,
                            rec.get("round"))
    return [by_round[r] for r in sorted(by_round)]


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _sites(record: dict[str, Any]) -> list[dict[str, Any]]:
    """A round's site entries that can be drawn: dicts that name a site or a node (a hand-edited
    or cut-short log may hold ``"sites": null`` or an entry without either)."""
    sites = record.get("sites")
    return [s for s in sites if isinstance(s, dict) and (s.get("site") or isinstance(s.get("node"), int))] \
        if isinstance(sites, list) else []


def _site_series(records: list[dict[str, Any]], key: str) -> dict[str | int, tuple[list[int], list[float]]]:
    """Per site, every round's value of ``key``: NaN in the rounds where the site was not
    accepted, so its line breaks there instead of bridging the rounds it missed."""
    series: dict[str | int, tuple[list[int], list[float]]] = {}
    for rec in records:
        for site in _sites(rec):
            if site.get("status") == "accepted" and key in site:
                series.setdefault(_site_key(site), ([], []))
    for rec in records:
        values = {_site_key(s): _num(s[key]) for s in _sites(rec) if s.get("status") == "accepted" and key in s}
        for node, (xs, ys) in series.items():
            xs.append(rec["round"])
            ys.append(values.get(node, math.nan))
    return series


def _site_key(site: dict[str, Any]) -> str | int:
    """A site's node_config site-name when it reported one (stable across runs), else its node id."""
    return str(site["site"]) if site.get("site") else int(site["node"])


def _site_label(node: str | int, order: dict[str | int, int]) -> str:
    return node if isinstance(node, str) else f"site {order[node]} (node …{str(node)[-4:]})"


def plot_federation(metrics_path: Path | str, out_dir: Path | str, *, dim: int | None = None) -> list[Path]:
    """Draw ``loss.png``, ``scores.png``, ``privacy.png``, ``traffic.png`` and (when the rounds
    record it) ``queue.png``; return their paths."""
    records = round_records(metrics_path)
    if not records:
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rounds = [r["round"] for r in records]
    nodes = sorted({_site_key(s) for r in records for s in _sites(r)}, key=str)
    order = {n: i for i, n in enumerate(nodes)}
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    # the mean first, wide and pale, so that a site equal to it stays visible on top of it
    ax.plot(rounds, [_num(r.get("train-loss")) for r in records], "-o", color="0.6", lw=3, ms=9, zorder=1,
            label="weighted mean")
    for i, (node, (xs, ys)) in enumerate(_site_series(records, "train-loss").items()):
        ax.plot(xs, ys, **_stacked_style(i), zorder=2, label=_site_label(node, order))
    ax.set(xlabel="round", ylabel="InfoNCE loss", title="Local training loss per round")
    whole_number_ticks(ax)
    _no_reply_note(ax, records)
    ax.legend(fontsize=7)
    written.append(save_figure(fig, out / "loss.png"))

    written.append(save_figure(scores_figure(records, dim), out / "scores.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    privacy_axes(ax, records, order)
    written.append(save_figure(fig, out / "privacy.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (key, label) in enumerate((("up-arrays", "weights up"), ("weights", "weights down"),
                                      ("up-keys", "keys up"), ("queue", "global negatives down"))):
        # mean over the sites that sent / received this record in the round
        per_round = [sum(vals) / len(vals) if (vals := [_num(s[key]) for s in _sites(r) if key in s])
                     else math.nan for r in records]
        # weights up and down are the same size: distinct markers, each smaller, keep both visible
        ax.plot(rounds, [v / 1024 for v in per_round], **_stacked_style(i), label=label)
    # symlog, not log: a round that sent no keys (0 KiB) stays on the plot, at 0
    ax.set(xlabel="round", ylabel="KiB per site (0, then log scale)", title="Traffic per site and round")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylim(bottom=0)
    whole_number_ticks(ax)
    ax.legend(fontsize=7)
    written.append(save_figure(fig, out / "traffic.png"))

    if any("queue-added" in r for r in records):  # the global queue of DP summaries (docs/privacy.md)
        fig, ax = plt.subplots(figsize=(6, 4))
        queue_axes(ax, records)
        written.append(save_figure(fig, out / "queue.png"))
    return written


def scores_figure(records: list[dict[str, Any]], dim: int | None = None):
    """scores.png: one panel per measure, so that each keeps its own scale. Cosines span
    [-1, 1] while emb-std lives near 1/sqrt(D) (0.088 at D = 128): on one axis a collapse from
    0.088 to 0.006 would be a flat line at the bottom. The global share panel appears when
    some round put mass on global negatives."""
    rounds = [r["round"] for r in records]
    share = [_num(r.get("global-share")) for r in records]
    shared = any(v > 0 for v in share)
    fig, axes = plt.subplots(3 if shared else 2, 1, figsize=(6, 7 if shared else 5.5), sharex=True)
    cos_ax, std_ax = axes[0], axes[1]
    for key, style in (("pos-mean", "g-o"), ("neg-mean", "r-o")):
        cos_ax.plot(rounds, [_num(r.get(key)) for r in records], style, label=key)
    cos_ax.axhline(0.0, color="0.5", ls=":", lw=1, label="0 (orthogonal)")
    cos_ax.set(ylabel="mean cosine score", title="Score statistics (weighted over sites)")
    cos_ax.legend(fontsize=7)
    std_ax.plot(rounds, [_num(r.get("emb-std")) for r in records], "b-o", label="emb-std")
    if dim:
        std_ax.axhline(1 / math.sqrt(dim), color="b", ls=":", label="1/sqrt(D) (spread over the sphere)")
    std_ax.set_ylim(bottom=0)
    std_ax.set(ylabel="embedding std per dimension")
    std_ax.legend(fontsize=7)
    if shared:
        axes[2].plot(rounds, share, "m-s", label="global-share")
        axes[2].set_ylim(0, 1)
        axes[2].set(ylabel="softmax mass on\nglobal negatives")
        axes[2].legend(fontsize=7)
    axes[-1].set(xlabel="round")
    for ax in axes:
        whole_number_ticks(ax)
    _no_reply_note(cos_ax, records)
    return fig


def privacy_axes(ax, records: list[dict[str, Any]], order: dict[str | int, int]) -> None:
    """Epsilon each site has spent on its DP summaries, per round, with each site's budget as a
    dashed line. Sites with the same settings spend identically, so each site gets its own
    marker and a smaller one than the site before: overlapping series all stay visible."""
    series = dict(sorted(_site_series(records, "dp-keys-epsilon").items(), key=lambda kv: order.get(kv[0], 0)))
    for i, (node, (xs, ys)) in enumerate(series.items()):
        ax.plot(xs, ys, **_stacked_style(i), clip_on=False,  # unclipped: markers at 0 stay whole
                label=_site_label(node, order))
    if any("model-dp-epsilon" in r for r in records):
        ax.plot([r["round"] for r in records], [_num(r.get("model-dp-epsilon")) for r in records], "k--",
                label="model updates (central)")
    budgets: dict[float, list[str]] = {}
    for node, budget in _last_site_values(records, "dp-keys-budget").items():
        if budget > 0:
            budgets.setdefault(budget, []).append(_site_label(node, order))
    for budget, names in sorted(budgets.items()):
        who = "every site" if len(names) == len(series) else ", ".join(names)
        ax.axhline(budget, color="grey", ls="--", lw=1, label=f"budget {budget:g} ({who})")
    ax.set(xlabel="round", ylabel="epsilon spent", title="Privacy spent on DP summaries, per site")
    spent = [y for _, ys in series.values() for y in ys if math.isfinite(y)]
    ax.set_ylim(0, 1.08 * max([1.0, *spent, *budgets]))  # epsilon >= 0; an all-zero run still shows 0..1
    whole_number_ticks(ax)
    note = sharing_note(records)
    if note and not any(y > 0 for y in spent):
        _centre_note(ax, note)
    if ax.get_legend_handles_labels()[0]:  # a round with no site reply has nothing to name
        ax.legend(fontsize=7)


def queue_axes(ax, records: list[dict[str, Any]]) -> None:
    """The server's global queue per round: held after the round, added and aged out."""
    rounds = [r["round"] for r in records]
    held, added, expired = ([_num(r.get(key)) for r in records] for key in ("queue-size", "queue-added",
                                                                            "queue-expired"))
    ax.plot(rounds, held, "k-o", clip_on=False, label="held after the round")
    ax.bar([x - 0.2 for x in rounds], added, width=0.4, color="g", alpha=0.6, label="added")
    ax.bar([x + 0.2 for x in rounds], expired, width=0.4, color="r", alpha=0.6, label="aged out")
    ax.set(xlabel="round", ylabel="DP summaries (prototypes or keys)", title="Global queue per round")
    counts = [v for v in (*held, *added, *expired) if math.isfinite(v)]
    ax.set_ylim(0, 1.08 * max([1.0, *counts]))  # counts: from 0, and at least 0..1 when all are 0
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    whole_number_ticks(ax)
    note = sharing_note(records)
    if note:
        _centre_note(ax, note)
    ax.legend(fontsize=7)


def sharing_note(records: list[dict[str, Any]]) -> str | None:
    """When no DP summary reached the server in any round: a line saying so, with the reasons
    the sites gave (``dp-reason``); None when some did."""
    if not any("queue-added" in r for r in records) or any(_num(r.get("queue-added")) > 0 for r in records):
        return None
    reasons = sorted({str(s["dp-reason"]) for r in records for s in _sites(r) if s.get("dp-reason")})
    return "no site released DP summaries" + (":\n" + "\n".join(reasons) if reasons else "")


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _stacked_style(i: int) -> dict[str, Any]:
    """Style of the i-th of series that may coincide: its own marker, smaller than the one
    drawn before it, so that every series stays visible where they overlap."""
    return {"marker": _MARKERS[i % len(_MARKERS)], "ms": max(3.0, 10.0 - 2.0 * i), "alpha": 0.8}


def _last_site_values(records: list[dict[str, Any]], key: str) -> dict[str | int, float]:
    """Each site's last reported value of ``key``."""
    return {node: ys[-1] for node, (_, ys) in _site_series(records, key).items() if ys}


def _no_reply_note(ax, records: list[dict[str, Any]]) -> None:
    """Say so, and keep the rounds on the x axis, when no site's reply was accepted in any round."""
    if any(s.get("status") == "accepted" for r in records for s in _sites(r)):
        return
    rounds = [r["round"] for r in records]
    ax.set_xlim(min(rounds) - 0.5, max(rounds) + 0.5)
    _centre_note(ax, "no site's reply was accepted in any round:\nsee each site's status in rounds.jsonl")


def _centre_note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=8, color="0.3",
            wrap=True)


def plot_federation_dir(server_dir: Path | str, out_dir: Path | str) -> list[Path]:
    """Plot a federation server's out-dir (``rounds.jsonl``; ``encoder.pt`` gives D if present)."""
    from fedmoco.checkpoint import load_checkpoint
    from fedmoco.errors import CheckpointError, ConfigError

    server_dir = Path(server_dir)
    dim = None
    if (server_dir / "encoder.pt").is_file():
        try:
            dim = int(load_checkpoint(server_dir / "encoder.pt")["moco_config"]["dim"])
        except (CheckpointError, KeyError, TypeError, ValueError):
            dim = None  # the reference line is optional; the plots are not
    written = plot_federation(server_dir / "rounds.jsonl", out_dir, dim=dim)
    if not written:
        raise ConfigError(f"{server_dir / 'rounds.jsonl'}: holds no finished round to plot")
    return written
