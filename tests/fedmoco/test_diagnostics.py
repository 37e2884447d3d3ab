"""AUROC, sensitivity, specificity and operating points against hand-computed values."""

import json
import math

import numpy as np
import pytest

from fedmoco.diagnostics import (OperatingPoint, bootstrap_ci, bootstrap_gain_ci, choose_threshold, diagnose, plot_confusion_png,
                                 plot_roc, point_metrics)
from fedmoco.errors import ConfigError

# Binary test set: 4 negatives, 4 positives; scores of the positive class.
Y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
P1 = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.9, 0.3, 0.6])
SCORES = np.stack([1 - P1, P1], axis=1)


def test_binary_auroc_sensitivity_specificity_by_hand():
    # AUROC = share of (positive, negative) pairs ranked right: 0.7 beats 3, 0.9 beats 4,
    # 0.3 beats 1, 0.6 beats 3 -> 11 / 16.
    m = point_metrics(SCORES, Y, [0.5, 0.5], multi_label=False)
    assert m["auroc"] == pytest.approx(11 / 16)
    # At threshold 0.5: TP = 3 (0.7, 0.9, 0.6), FN = 1 (0.3), FP = 1 (0.8), TN = 3.
    assert m["sensitivity"] == pytest.approx(3 / 4) and m["specificity"] == pytest.approx(3 / 4)
    # Accuracy is of the arg-max class: same as threshold 0.5 here -> 6 / 8.
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert "top5" not in m


def test_operating_points_chosen_on_validation():
    # Youden: validation separable at 0.5 (J = 1).
    assert choose_threshold(np.array([0, 0, 1, 1]), np.array([0.2, 0.4, 0.5, 0.9]), OperatingPoint.parse("youden")) == 0.5
    # specificity >= 0.9 with 4 negatives means no false positive: threshold above 0.7 -> 0.8.
    spec = OperatingPoint.parse("specificity=0.9")
    y, s = np.array([0, 0, 0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.7, 0.6, 0.8])
    assert choose_threshold(y, s, spec) == 0.8
    assert choose_threshold(np.array([1, 1]), np.array([0.2, 0.3]), spec) is None  # no ROC on one class
    with pytest.raises(ConfigError, match="--operating-point"):
        OperatingPoint.parse("sensitivity=0.9")
    # The threshold from validation decides the test metrics: 0.65 -> TP 2 (0.7, 0.9), FP 1 (0.8).
    val_scores = np.stack([1 - np.array([0.2, 0.6, 0.65, 0.9]), np.array([0.2, 0.6, 0.65, 0.9])], 1)
    r = diagnose(SCORES, Y, val_scores=val_scores, val_targets=np.array([0, 0, 1, 1]),
                 point=OperatingPoint.parse("youden"), multi_label=False, resamples=0)
    assert r["thresholds"][1] == pytest.approx(0.65)
    assert r["sensitivity"] == pytest.approx(2 / 4) and r["specificity"] == pytest.approx(3 / 4)
    assert r["n_test"] == 8 and r["confusion"] == [[3, 1], [2, 2]]


def test_a_specificity_exactly_at_the_target_qualifies():
    """specificity=0.75 means at least 0.75: at 0.4, 3 of 4 negatives (0.1, 0.2, 0.3) fall below
    (specificity exactly 0.75) and every positive above (sensitivity 1); 0.7 would give only 0.5."""
    y, s = np.array([0, 0, 0, 0, 1, 1, 1, 1]), np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.5, 0.7, 0.9])
    assert choose_threshold(y, s, OperatingPoint.parse("specificity=0.75")) == 0.4


def test_multiclass_macro_auroc_and_top5_only_above_five_classes():
    y = np.array([0, 1, 2, 0, 1, 2])
    s = np.array([[.6, .3, .1], [.2, .5, .3], [.1, .2, .7], [.3, .4, .3], [.5, .4, .1], [.2, .2, .6]])
    m = point_metrics(s, y, [0.5] * 3, multi_label=False)
    # class 0 vs rest: positives .6, .3; negatives .2, .1, .5, .2 -> .6 beats 4, .3 beats 3 -> 7/8
    assert m["per_class_auroc"][0] == pytest.approx(7 / 8)
    assert m["auroc"] == pytest.approx(np.mean(m["per_class_auroc"]))
    assert "top5" not in m
    rng = np.random.default_rng(0)
    y7 = np.arange(14) % 7
    s7 = rng.dirichlet(np.ones(7), 14)
    assert "top5" in point_metrics(s7, y7, [0.5] * 7, multi_label=False)


def test_multilabel_auroc_per_label():
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    s = np.array([[.9, .2], [.3, .8], [.6, .4], [.7, .1]])
    m = point_metrics(s, y, [0.5, 0.5], multi_label=True)
    # label 0: positives .9, .6 vs negatives .3, .7 -> .9 beats 2, .6 beats 1 -> 3/4; label 1: 4/4
    assert m["per_class_auroc"] == pytest.approx([0.75, 1.0]) and m["auroc"] == pytest.approx(0.875)
    # at 0.5: label 0 TP 2 FP 1 (0.7) TN 1; label 1 TP 1 (0.8) FN 1 (0.4) TN 2
    assert m["sensitivity"] == pytest.approx((1.0 + 0.5) / 2)
    assert m["specificity"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["subset_accuracy"] == pytest.approx(2 / 4)  # rows 0 and 1 are all right


def test_bootstrap_interval_brackets_the_estimate_and_resamples_groups():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 50)
    p = np.clip(y * 0.3 + rng.uniform(0, 0.7, 100), 0, 1)
    s = np.stack([1 - p, p], 1)
    point = point_metrics(s, y, [0.5, 0.5], multi_label=False)
    ci = bootstrap_ci(s, y, [0.5, 0.5], multi_label=False, positive=None, groups=None, resamples=200, seed=0)
    for k in ("auroc", "accuracy", "sensitivity", "specificity"):
        assert ci[k][0] <= point[k] <= ci[k][1]
    # 10 samples per group: the cluster bootstrap is wider than the per-sample one
    groups = np.arange(100) // 10
    wide = bootstrap_ci(s, y, [0.5, 0.5], multi_label=False, positive=None, groups=groups, resamples=200, seed=0)
    assert wide["auroc"][1] - wide["auroc"][0] >= 0.5 * (ci["auroc"][1] - ci["auroc"][0])
    json.dumps(ci)


def test_plots_have_n_in_the_title(tmp_path, monkeypatch):
    import fedmoco.plots

    titles = []
    real = fedmoco.plots.save_figure

    def spy(fig, path):
        titles.extend(ax.get_title() for ax in fig.axes)
        return real(fig, path)

    monkeypatch.setattr(fedmoco.plots, "save_figure", spy)
    r = diagnose(SCORES, Y, val_scores=SCORES, val_targets=Y, point=OperatingPoint(), multi_label=False, resamples=0)
    roc = plot_roc(SCORES, Y, ["normal", "lesion"], tmp_path / "roc.png", thresholds=r["thresholds"])
    cm = plot_confusion_png(np.asarray(r["confusion"]), ["normal", "lesion"], tmp_path / "cm.png", "test")
    assert roc.stat().st_size > 1000 and cm.stat().st_size > 1000
    assert "ROC, n = 8" in titles and "test, n = 8" in titles
    ml = plot_confusion_png(np.zeros((2, 2, 2)) + 1, ["a", "b"], tmp_path / "ml.png", "multi")
    assert ml.exists()


def test_bootstrap_of_several_runs_brackets_their_mean():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 40)
    runs = []
    for _ in range(3):
        p = np.clip(y * 0.25 + rng.uniform(0, 0.75, 80), 0, 1)
        runs.append(np.stack([1 - p, p], 1))
    thr = np.full((3, 2), 0.5)
    mean = np.mean([point_metrics(r, y, t, multi_label=False)["sensitivity"] for r, t in zip(runs, thr)])
    ci = bootstrap_ci(np.stack(runs), y, thr, multi_label=False, positive=None, groups=np.arange(80) // 4,
                      resamples=200, seed=0)
    assert ci["sensitivity"][0] <= mean <= ci["sensitivity"][1]


def test_gain_of_a_model_over_itself_is_exactly_zero_and_of_a_perfect_over_an_inverted_one_is_one():
    thr = [0.5, 0.5]
    scores, y = np.tile(SCORES, (2, 1)), np.tile(Y, 2)  # 16 samples: a bootstrap needs 10 units
    same = bootstrap_gain_ci(scores, thr, scores, thr, y, multi_label=False, positive=None, groups=None,
                             resamples=100, seed=0)
    assert same["ci95"]["auroc"] == [0.0, 0.0] and same["p_no_gain"]["auroc"] == 1.0
    perfect = np.stack([1 - y, y], 1).astype(float)
    inverted = perfect[:, ::-1].copy()
    # every draw holding both classes: AUROC 1 against 0; draws with one class are left out
    flip = bootstrap_gain_ci(perfect, thr, inverted, thr, y, multi_label=False, positive=None,
                             groups=np.arange(16) % 12, resamples=100, seed=0)
    assert flip["ci95"]["auroc"] == [1.0, 1.0] and flip["p_no_gain"]["auroc"] == 0.0
    assert flip["ci95"]["sensitivity"] == [1.0, 1.0] and flip["ci95"]["specificity"] == [1.0, 1.0]


def test_too_few_groups_give_no_interval_rather_than_a_certain_one():
    """One patient resampled is that patient every time: the interval had zero width and
    p_no_gain read 0.000 (found by an audit). Under 10 groups every interval is nan (null in
    results.json); at 10 there is one again."""
    perfect = np.stack([1 - Y, Y], 1).astype(float)
    inverted = perfect[:, ::-1].copy()
    kw = dict(multi_label=False, positive=None, resamples=50, seed=0)
    for groups in (np.zeros(8, int), np.arange(8) // 2, None):  # 1, 4 and 8 units
        gain = bootstrap_gain_ci(perfect, [0.5, 0.5], inverted, [0.5, 0.5], Y, groups=groups, **kw)
        assert all(math.isnan(v) for v in gain["ci95"]["auroc"]) and math.isnan(gain["p_no_gain"]["auroc"])
        assert all(math.isnan(v) for v in bootstrap_ci(perfect, Y, [0.5, 0.5], groups=groups, **kw)["auroc"])
    y10 = np.tile(Y, 2)[:10]
    p10 = np.stack([1 - y10, y10], 1).astype(float)
    assert bootstrap_ci(p10, y10, [0.5, 0.5], groups=None, **kw)["accuracy"] == [1.0, 1.0]


def test_paired_gain_is_clear_of_zero_where_the_two_marginal_intervals_overlap():
    # Both models find the same patients hard (shared difficulty); the model ranks a little
    # better on every patient. Marginal intervals carry the shared variation, the paired one not.
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(30), 6)
    y = rng.integers(0, 2, 180)
    hard = rng.normal(0, 1.0, 30)[groups]
    base = y * 0.6 - hard * (2 * y - 1) * 0.5 + rng.normal(0, 0.6, 180)
    model = base + y * 0.25
    prob = lambda z: np.stack([1 - 1 / (1 + np.exp(-z)), 1 / (1 + np.exp(-z))], 1)  # noqa: E731
    thr = [0.5, 0.5]
    kw = dict(multi_label=False, positive=None, groups=groups, resamples=150, seed=0)
    gain = bootstrap_gain_ci(prob(model), thr, prob(base), thr, y, **kw)
    # each model's own interval comes from the same draws as bootstrap_ci's
    assert gain["baseline"] == bootstrap_ci(prob(base), y, thr, **kw)
    assert gain["model"]["auroc"][0] < gain["baseline"]["auroc"][1], "the marginal intervals should overlap here"
    point = (point_metrics(prob(model), y, thr, multi_label=False)["auroc"]
             - point_metrics(prob(base), y, thr, multi_label=False)["auroc"])
    lo, hi = gain["ci95"]["auroc"]
    assert 0 < lo <= point <= hi
    assert gain["p_no_gain"]["auroc"] < 0.025


def test_group_bootstrap_is_the_same_whatever_the_runs_salt():
    # group keys are hashes salted afresh every run: the same patients under other names (here
    # in the opposite sorted order) must give the same draws, hence the same intervals
    rng = np.random.default_rng(5)
    y = np.repeat([0, 1], 30)
    p = np.clip(y * 0.3 + rng.uniform(0, 0.7, 60), 0, 1)
    s = np.stack([1 - p, p], 1)
    patient = np.arange(60) // 3
    one_salt = np.array([f"h{g:02d}" for g in patient])
    other_salt = np.array([f"h{99 - g:02d}" for g in patient])
    kw = dict(multi_label=False, positive=None, resamples=100, seed=0)
    assert bootstrap_ci(s, y, [0.5, 0.5], groups=one_salt, **kw) == bootstrap_ci(s, y, [0.5, 0.5], groups=other_salt,
                                                                                   **kw)


def test_argmax_measures_against_hand_computed_values():
    from fedmoco.diagnostics import argmax_metrics

    targets = np.array([0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 1, 1, 1, 2, 0])  # class 3 (4 classes) occurs nowhere
    m = argmax_metrics(targets, predicted, 4)
    # recall 1/2, 2/2, 1/2 -> balanced 2/3; precision 1/2, 2/3, 1/1; F1 1/2, 4/5, 2/3
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    # p_o = 4/6, p_e = (2*2 + 2*3 + 2*1) / 36 = 1/3: kappa = (2/3 - 1/3) / (1 - 1/3) = 1/2
    assert m["kappa"] == pytest.approx(0.5)
    assert m["per_class_precision"][:3] == pytest.approx([1 / 2, 2 / 3, 1.0]) and np.isnan(m["per_class_precision"][3])
    assert m["per_class_recall"][:3] == pytest.approx([1 / 2, 1.0, 1 / 2]) and np.isnan(m["per_class_recall"][3])
    assert argmax_metrics(np.array([1, 1]), np.array([1, 1]), 2)["kappa"] == 1.0  # 0/0 by the formula
