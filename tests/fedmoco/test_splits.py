"""Grouped, stratified, seeded splits: no group on both sides, every class kept."""

import math

import numpy as np
import pytest

from fedmoco.errors import ConfigError, DataError
from fedmoco.splits import grouped_split, strata, subsample_groups


def _patients(n_groups=40, per_group=5, seed=0):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, per_group * 2, n_groups)  # unequal slice counts per patient
    groups = np.repeat([f"p{g}" for g in range(n_groups)], sizes)
    labels = np.repeat(np.arange(n_groups) % 2, sizes)  # a patient's slices share the label
    return labels, groups


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_grouped_split_never_shares_a_group_and_keeps_both_classes(seed):
    labels, groups = _patients()
    train, test = grouped_split(labels, groups, 0.25, seed)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(labels)))
    assert not set(groups[train]) & set(groups[test])
    assert set(labels[test]) == {0, 1} and set(labels[train]) == {0, 1}
    assert 0.1 < len(set(groups[test])) / 40 < 0.4  # about a quarter of the patients


def test_grouped_split_is_seeded():
    labels, groups = _patients()
    a = grouped_split(labels, groups, 0.3, 3)
    b = grouped_split(labels, groups, 0.3, 3)
    c = grouped_split(labels, groups, 0.3, 4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])


def test_splits_are_the_same_whatever_the_runs_salt():
    # group keys are hashed with a salt drawn afresh every run: a seeded split must not move
    from fedmoco.labels import hash_group
    from fedmoco.splits import group_ids

    labels, groups = _patients()
    salted = [np.array([hash_group(g, salt) for g in groups]) for salt in (b"run-one", b"run-two")]
    assert sorted(salted[0]) != sorted(salted[1])
    a, b = (grouped_split(labels, s, 0.25, 5) for s in salted)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert np.array_equal(subsample_groups(labels, salted[0], 0.3, 2), subsample_groups(labels, salted[1], 0.3, 2))
    assert group_ids(np.array(["z", "z", "a", "m", "a"])).tolist() == [0, 0, 1, 2, 1]  # order of first sample


def test_grouped_split_refuses_one_group_and_bad_fraction():
    with pytest.raises(DataError, match="all 4 labelled samples belong to one group"):
        grouped_split(np.array([0, 1, 0, 1]), np.array(["a"] * 4), 0.3, 0)
    with pytest.raises(ConfigError, match="--test-fraction must be in"):
        grouped_split(np.array([0, 1]), np.array(["a", "b"]), 1.0, 0)


def test_multilabel_strata_are_label_combinations():
    y = np.array([[0, 1], [1, 1], [0, 1], [0, 0]])
    s = strata(y)
    assert s[0] == s[2] and len(set(s.tolist())) == 3


def test_subsample_keeps_whole_groups_and_every_class():
    labels, groups = _patients()
    for seed in range(5):
        idx = subsample_groups(labels, groups, 0.01, seed)
        assert set(labels[idx]) == {0, 1}  # 1% still has both classes
        chosen = set(groups[idx])
        assert all((groups == g).sum() == (groups[idx] == g).sum() for g in chosen)  # whole patients
    idx = subsample_groups(labels, groups, 0.5, 0)
    assert len(idx) >= math.ceil(0.5 * len(labels))
    assert np.array_equal(subsample_groups(labels, groups, 1.0, 0), np.arange(len(labels)))
    with pytest.raises(ConfigError, match="--label-fraction"):
        subsample_groups(labels, groups, 0.0, 0)


def test_a_split_with_too_few_samples_a_class_to_stratify_holds_out_whole_groups():
    # 4 classes x 4 images, each its own group (the satellite labelled demo after its test
    # split): a 0.2 split means 5 folds, which scikit-learn refuses to stratify
    targets = np.repeat(np.arange(4), 4)
    groups = np.array([f"g{i}" for i in range(16)])
    rest, held = grouped_split(targets, groups, 0.2, seed=3)
    assert len(held) == 4 and len(rest) == 12  # ceil(0.2 x 16 groups)
    assert set(rest).isdisjoint(held) and sorted([*rest, *held]) == list(range(16))
    assert np.array_equal(held, grouped_split(targets, groups, 0.2, seed=3)[1])
    assert not np.array_equal(held, grouped_split(targets, groups, 0.2, seed=4)[1])
    # groups of two stay whole
    pairs = np.array([f"p{i // 2}" for i in range(16)])
    rest, held = grouped_split(targets, pairs, 0.2, seed=0)
    assert set(pairs[rest]).isdisjoint(pairs[held]) and len(held) == 4
    # one image a class: a 0.9 split still leaves a group on each side
    rest, held = grouped_split(np.arange(3), np.array(["a", "b", "c"]), 0.9, seed=0)
    assert len(rest) == 1 and len(held) == 2
