"""Seeded, stratified splits that keep every group (patient, scene, file) on one side.

Slices of one patient, frames of one file and tiles of one raster are near-duplicates: a split
per image puts one copy in train and its twin in test and inflates every score. Here each
sample carries a group key; a split moves whole groups. Stratification is by class (for
multi-label targets, by the combination of labels).
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

from fedmoco.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def strata(targets: np.ndarray) -> np.ndarray:
    """One stratum id per sample: the class (N,) int, or the label combination of (N, L) 0/1."""
    targets = np.asarray(targets)
    if targets.ndim == 1:
        return targets.astype(np.int64)
    _, ids = np.unique(targets.astype(np.int8), axis=0, return_inverse=True)
    return ids.reshape(-1).astype(np.int64)


def group_ids(groups: np.ndarray) -> np.ndarray:
    """(N,) int64 group ids numbered in order of each group's first sample.

    The keys themselves are hashes salted afresh every run (fedmoco.labels), so their sorted
    order changes from run to run; numbering by first appearance in the (sorted) file list
    makes a seeded split the same in every run, whatever the salt.
    """
    groups = np.asarray(groups)
    if groups.size == 0:
        return np.zeros(0, dtype=np.int64)
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


def grouped_split(targets: np.ndarray, groups: np.ndarray, fraction: float, seed: int,
                  what: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices into (rest, held_out) with about ``fraction`` of the groups held out.

    ``targets`` (N,) class ids or (N, L) 0/1; ``groups`` (N,) hashable keys. Whole groups move,
    so no group is on both sides. Stratified by class with scikit-learn's
    ``StratifiedGroupKFold`` (``round(1/fraction)`` shuffled folds, the first one held out);
    when every class has fewer samples than that many folds, which scikit-learn refuses,
    ``fraction`` of the groups (rounded up, one group at least kept) are held out at random.
    Raises DataError when there are fewer than 2 groups.
    """
    if not 0 < fraction < 1:
        raise ConfigError(f"--{what}-fraction must be in (0, 1), got {fraction}")
    groups = group_ids(groups)
    n = len(groups)
    uniq = np.unique(groups)
    if len(uniq) < 2:
        raise DataError(f"{what} split: all {n} labelled samples belong to one group (patient/scene/file); "
                        f"a held-out {what} set needs at least 2 groups")
    n_splits = min(len(uniq), max(2, round(1 / fraction)))
    y = strata(targets)
    if np.bincount(y).max() < n_splits:
        # scikit-learn refuses to stratify when every class has fewer samples than folds (4
        # images a class and a 0.2 split: 5 folds); whole groups are then held out at random
        log.info("%s split: every class has fewer than %d samples, so the held-out groups are drawn without "
                 "stratifying by class", what, n_splits)
        held_groups = min(math.ceil(fraction * len(uniq)), len(uniq) - 1)  # both sides keep a group
        shuffled = GroupShuffleSplit(n_splits=1, test_size=held_groups, random_state=seed)
        rest, held = next(shuffled.split(np.zeros(n), groups=groups))
        return np.sort(rest), np.sort(held)
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    # sklearn warns when a class has fewer groups than folds; the split is still grouped.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        rest, held = next(folds.split(np.zeros(n), y, groups))
    return np.sort(rest), np.sort(held)


def subsample_groups(targets: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of a seeded subset of whole groups holding about ``fraction`` of the samples.

    Every class present keeps at least one group (so a 1% subset can still be trained on):
    first one random group per class (per label for multi-label), then random groups until
    ``ceil(fraction * N)`` samples are reached. ``fraction`` 1.0 returns every index.
    """
    if not 0 < fraction <= 1:
        raise ConfigError(f"--label-fraction must be in (0, 1], got {fraction}")
    n = len(groups)
    if fraction >= 1:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    uniq, inverse = np.unique(group_ids(groups), return_inverse=True)
    inverse = inverse.reshape(-1)
    targets = np.asarray(targets)
    chosen: set[int] = set()
    if targets.ndim == 1:
        needs = [targets == c for c in np.unique(targets)]
    else:
        needs = [targets[:, j] > 0 for j in range(targets.shape[1]) if targets[:, j].any()]
    for mask in [needs[i] for i in rng.permutation(len(needs))]:
        have = np.unique(inverse[mask])
        if not chosen.intersection(have.tolist()):
            chosen.add(int(rng.choice(have)))
    wanted = math.ceil(fraction * n)
    sizes = np.bincount(inverse, minlength=len(uniq))
    count = int(sizes[list(chosen)].sum())
    for g in rng.permutation(len(uniq)):
        if count >= wanted:
            break
        if int(g) not in chosen:
            chosen.add(int(g))
            count += int(sizes[g])
    return np.flatnonzero(np.isin(inverse, list(chosen)))
