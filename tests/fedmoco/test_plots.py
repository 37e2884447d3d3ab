"""fedmoco.plots: a pretraining run's plots label every axis and show the references they promise."""

from __future__ import annotations

import json

import pytest

from fedmoco import plots


def test_every_axis_of_a_run_plot_is_labelled(tmp_path, monkeypatch):
    steps = [{"event": "step", "step": i, "loss": 4.0 - 0.01 * i, "pos_mean": 0.8, "neg_mean": 0.7, "neg_var": 0.01,
              "emb_std": 0.03} for i in range(18)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(s) + "\n" for s in steps))
    figures = []
    real = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig) or real(fig, path))
    written = plots.plot_run(metrics, tmp_path / "plots", embedding_dim=128)
    assert [p.name for p in written][:2] == ["loss.png", "scores.png"]
    axes = [ax for fig in figures for ax in fig.axes]
    assert axes and all(ax.get_xlabel() and ax.get_ylabel() for ax in axes)
    monitor = next(ax for ax in axes if ax.get_title() == "collapse monitor")
    assert monitor.get_ylim()[0] == 0  # full collapse (0) is on the axis
    assert [line.get_ydata()[0] for line in monitor.lines if "uniform" in line.get_label()] == [pytest.approx(128 ** -0.5)]
    assert all(float(t).is_integer() for ax in axes if ax.get_xlabel() == "step" for t in ax.get_xticks())


def test_a_one_step_run_is_drawn_as_points_on_one_whole_tick(tmp_path, monkeypatch):
    step = {"event": "step", "step": 0, "loss": 4.0, "pos_mean": 0.8, "neg_mean": 0.7, "neg_var": 0.01, "emb_std": 0.03}
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps(step) + "\n")
    figures = []
    real = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig) or real(fig, path))
    plots.plot_run(metrics, tmp_path / "plots", embedding_dim=128)
    axes = [ax for fig in figures for ax in fig.axes]
    assert all(list(ax.get_xticks()) == [0.0] and ax.get_xlim() == (-1.0, 1.0) for ax in axes)
    data = [line for ax in axes for line in ax.lines if "uniform" not in line.get_label()]
    assert data and all(line.get_marker() == "o" for line in data)  # a lone point without a marker is invisible
    band = next(line for line in data if line.get_label() == "negative ±1 std")  # no zero-width band
    assert list(band.get_ydata()) == pytest.approx([0.6, 0.8])
    loss = next(line for line in data if line.get_label() == "loss")
    assert loss.get_alpha() == 1.0  # no running mean over it: drawn in full


def test_a_record_with_a_field_that_is_not_a_number_is_skipped_with_a_warning(tmp_path, caplog):
    """'loss': "high" in metrics.jsonl ended `fedmoco plot` and `pretrain --resume` in
    ValueError / TypeError tracebacks (found by an audit): such a record is skipped and named."""
    import logging

    from fedmoco.metrics import read_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "step", "epoch": 1, "step": 1, "loss": "high"}\n'
                    '{"event": "step", "epoch": 1, "step": "y", "loss": 3.0}\n'
                    '{"event": "step", "epoch": 1, "step": 3, "loss": null, "lr": 0.1}\n'
                    '{"event": "step", "epoch": 1, "step": 4, "loss": 2.5, "lr": true}\n')
    with caplog.at_level(logging.WARNING, logger="fedmoco.metrics"):
        kept = list(read_jsonl(path))
    assert [r["step"] for r in kept] == [3]  # null stands for a non-finite number and is kept
    assert f"{path}:1: skipped a record whose 'loss' is not a number" in caplog.text
    assert f"{path}:2: skipped a record whose 'step' is not a number" in caplog.text
    assert f"{path}:4: skipped a record whose 'lr' is not a number" in caplog.text


def test_a_plot_that_fails_mid_write_leaves_the_last_good_one(tmp_path, monkeypatch):
    """savefig wrote straight to the final name: a full disk or a stop mid-write left a truncated
    PNG in place of the good one (found by an audit). The write is atomic now."""
    import matplotlib.pyplot as plt
    from PIL import Image

    from fedmoco.plots import save_figure

    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    path = save_figure(fig, tmp_path / "loss.png")
    good = path.read_bytes()

    def full_disk(self, fh, **kw):
        fh.write(b"\x89PNG\r\n\x1a\n partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plt.Figure, "savefig", full_disk)
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    with pytest.raises(OSError, match="No space left"):
        save_figure(fig, path)
    assert path.read_bytes() == good and Image.open(path).size[0] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]  # no temp file left behind
    assert not plt.get_fignums()  # the figure was closed all the same
