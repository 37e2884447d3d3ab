"""fedmoco.federation_plots: what the coordinator's plots show when sites overlap or share nothing."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import pytest

from fedmoco.federation_plots import plot_federation, privacy_axes, queue_axes, sharing_note


def _site(name: str, eps: float, budget: float, reason: str | None = None) -> dict:
    site = {"node": 100 + "ab".index(name[-1]), "site": name, "status": "accepted", "train-loss": 4.0,
            "dp-keys-epsilon": eps, "dp-keys-budget": budget, "up-arrays": 4096, "weights": 4096,
            "up-keys": 128, "queue": 128}
    if reason:
        site["dp-reason"] = reason
    return site


def _records(shared: bool) -> list[dict]:
    recs = []
    for r in (1, 2, 3):
        if shared:  # two sites with the same budget spend the same epsilon every round
            sites = [_site("site-a", 2.0 * r, 8.0), _site("site-b", 2.0 * r, 8.0)]
            queue = {"queue-size": 16 * r, "queue-added": 16, "queue-expired": 0}
        else:
            why = "nothing to release: run_config key-release=none"
            sites = [_site("site-a", 0.0, 0.0, why), _site("site-b", 0.0, 0.0, why)]
            queue = {"queue-size": 0, "queue-added": 0, "queue-expired": 0}
        recs.append({"event": "round", "round": r, "train-loss": 4.0, "sites": sites, **queue})
    return recs


def test_sharing_note_says_why_nothing_was_shared():
    assert sharing_note(_records(shared=False)) == (
        "no site released DP summaries:\nnothing to release: run_config key-release=none")
    assert sharing_note(_records(shared=True)) is None
    assert sharing_note([{"round": 1, "sites": []}]) is None  # rounds that predate the queue metrics


def test_identical_sites_stay_visible_and_budget_is_drawn():
    fig, ax = plt.subplots()
    privacy_axes(ax, _records(shared=True), {"site-a": 0, "site-b": 1})
    lines = {line.get_label(): line for line in ax.lines}
    a, b = lines["site-a"], lines["site-b"]
    assert list(a.get_ydata()) == list(b.get_ydata()) == [2.0, 4.0, 6.0]
    # the later series is drawn on top with another marker, smaller: both remain visible
    assert a.get_marker() != b.get_marker() and a.get_markersize() > b.get_markersize()
    budget = lines["budget 8 (every site)"]
    assert list(budget.get_ydata()) == [8.0, 8.0]
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= 8.0
    assert not ax.texts  # something was shared: no note
    plt.close(fig)


def test_a_federation_that_shared_nothing_says_so_on_both_plots():
    recs = _records(shared=False)
    for draw in (lambda ax: queue_axes(ax, recs), lambda ax: privacy_axes(ax, recs, {"site-a": 0, "site-b": 1})):
        fig, ax = plt.subplots()
        draw(ax)
        assert [t.get_text() for t in ax.texts] == [sharing_note(recs)]
        lo, hi = ax.get_ylim()
        assert lo == 0 and hi >= 1.0  # counts and epsilon start at 0; an all-zero run is not -0.05..0.05
        assert all(float(t).is_integer() for t in ax.get_xticks())  # whole rounds only
        plt.close(fig)


def test_plot_federation_writes_every_plot(tmp_path):
    metrics = tmp_path / "rounds.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in _records(shared=True)))
    drawn = plot_federation(metrics, tmp_path / "plots", dim=16)
    assert [p.name for p in drawn] == ["loss.png", "scores.png", "privacy.png", "traffic.png", "queue.png"]
    assert all(p.stat().st_size > 1000 for p in drawn)
    with pytest.raises(FileNotFoundError):
        plot_federation(tmp_path / "missing.jsonl", tmp_path / "plots")
