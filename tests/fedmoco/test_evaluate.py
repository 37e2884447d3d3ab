import math

import pytest
import torch

from fedmoco.errors import ConfigError
from fedmoco.evaluate import ProbeConfig, confusion_matrix, knn_predict, linear_probe, stratified_split, topk_accuracy


def test_weighted_knn_by_hand():
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[2.0, 0.0]])  # normalised to (1, 0)
    scores = knn_predict(train, labels, test, num_classes=2, k=2, temperature=0.5)
    # 2 nearest: cos 1.0 (class 0) and 0.8 (class 1)
    assert scores[0, 0].item() == pytest.approx(math.exp(1.0 / 0.5))
    assert scores[0, 1].item() == pytest.approx(math.exp(0.8 / 0.5))
    # k larger than the training set is capped
    assert knn_predict(train, labels, test, 2, k=200, temperature=0.1).shape == (1, 2)
    with pytest.raises(ConfigError, match="k must be >= 1"):
        knn_predict(train, labels, test, 2, k=0)


def test_topk_accuracy_and_confusion():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.6, 0.3]])
    labels = torch.tensor([0, 1, 2])
    acc = topk_accuracy(scores, labels, ks=(1, 2, 5))
    assert acc["top1"] == pytest.approx(100 / 3)
    assert acc["top2"] == pytest.approx(100.0)
    assert acc["top5"] == pytest.approx(100.0)  # capped at 3 classes
    cm = confusion_matrix(scores.argmax(1), labels, 3)
    assert cm.tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 0]]


def test_linear_probe_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    x = torch.randn(60, 8, generator=g) * 0.1 + torch.nn.functional.one_hot(y, 8).float() * 5
    clf = linear_probe(x, y, 3, ProbeConfig(epochs=30, lr=0.1), progress=False)
    assert (clf(x).argmax(1) == y).float().mean().item() == 1.0


def test_stratified_split_keeps_every_class():
    labels = [0] * 10 + [1] * 4 + [2] * 1
    tr, te = stratified_split(labels, 0.25, seed=0)
    assert sorted(tr + te) == list(range(15))
    assert [labels[i] for i in te].count(0) == 2 and [labels[i] for i in te].count(1) == 1
    assert 14 in tr  # a single-sample class stays in train
    with pytest.raises(ConfigError, match="--test-fraction"):
        stratified_split(labels, 1.0)
