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


def _write(tmp_path, recs) -> str:
    path = tmp_path / "rounds.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def test_one_round_gets_one_whole_tick(tmp_path):
    import fedmoco.federation_plots as fp

    captured = {}
    real = fp.save_figure

    def keep(fig, path):
        captured[path.name] = [list(ax.get_xticks()) for ax in fig.axes]
        return real(fig, path)

    fp.save_figure = keep
    try:
        plot_federation(_write(tmp_path, _records(shared=True)[:1]), tmp_path / "plots")
    finally:
        fp.save_figure = real
    assert captured["loss.png"] == [[1.0]] and captured["traffic.png"] == [[1.0]]


def test_a_site_line_breaks_where_the_site_was_missing_and_sits_above_the_mean():
    from fedmoco.federation_plots import _site_series

    recs = _records(shared=True)
    recs[1]["sites"][1]["status"] = "error"  # site-b missed round 2
    xs, ys = _site_series(recs, "train-loss")["site-b"]
    assert xs == [1, 2, 3] and ys[0] == 4.0 and ys[1] != ys[1] and ys[2] == 4.0  # NaN: a gap, no bridge


@pytest.mark.parametrize("sites", [None, [{"status": "accepted", "train-loss": 3.0}], "garbage"])
def test_malformed_site_entries_are_skipped_not_fatal(tmp_path, sites):
    recs = _records(shared=True)
    recs[1]["sites"] = sites
    assert len(plot_federation(_write(tmp_path, recs), tmp_path / "plots")) == 5


def test_a_run_where_no_reply_was_accepted_says_so(tmp_path):
    recs = [{"event": "round", "round": r, "updated": False,
             "sites": [{"node": 100, "status": "error", "reason": "site data unavailable"}]} for r in (1, 2, 3, 4)]
    import fedmoco.federation_plots as fp

    notes = {}
    real = fp.save_figure

    def keep(fig, path):
        notes[path.name] = ([t.get_text() for ax in fig.axes for t in ax.texts], fig.axes[0].get_xlim())
        return real(fig, path)

    fp.save_figure = keep
    try:
        plot_federation(_write(tmp_path, recs), tmp_path / "plots")
    finally:
        fp.save_figure = real
    texts, xlim = notes["loss.png"]
    assert texts == ["no site's reply was accepted in any round:\nsee each site's status in rounds.jsonl"]
    assert xlim == (0.5, 4.5)


def test_scores_give_each_measure_its_own_scale():
    from fedmoco.federation_plots import scores_figure

    recs = _records(shared=True)
    for r, std in zip(recs, (0.08, 0.02, 0.006)):  # a collapse: emb-std falls by 13x
        r.update({"pos-mean": 0.6, "neg-mean": 0.1, "emb-std": std, "global-share": 0.05})
    fig = scores_figure(recs, dim=128)
    cos_ax, std_ax, share_ax = fig.axes
    assert {ln.get_label() for ln in cos_ax.lines} == {"pos-mean", "neg-mean", "0 (orthogonal)"}
    std_line = next(ln for ln in std_ax.lines if ln.get_label() == "emb-std")
    assert list(std_line.get_ydata()) == [0.08, 0.02, 0.006]
    ref = next(ln for ln in std_ax.lines if ln.get_label().startswith("1/sqrt(D)"))
    assert ref.get_ydata()[0] == pytest.approx(128 ** -0.5)
    lo, hi = std_ax.get_ylim()  # the collapse spans most of its own axis, not 1% of a cosine axis
    assert lo == 0 and hi < 0.1
    assert share_ax.get_ylim() == (0, 1) and share_ax.get_xlabel() == "round"
    plt.close(fig)
    for r in recs:  # nothing weighed on global negatives: no empty third panel
        r["global-share"] = 0.0
    fig = scores_figure(recs, dim=128)
    assert len(fig.axes) == 2 and fig.axes[-1].get_xlabel() == "round"
    plt.close(fig)


def test_plot_on_a_simulations_out_dir_points_at_its_server_folder(tmp_path, capsys):
    from fedmoco.cli import main

    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records(shared=True)))
    assert main(["plot", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"is there; did you mean {tmp_path / 'server'}?")
    assert main(["-q", "plot", str(tmp_path / "server")]) == 0
