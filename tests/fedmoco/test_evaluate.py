import math

import pytest
import torch

from fedmoco.errors import ConfigError
from fedmoco.evaluate import ProbeConfig, effective_k, frozen_report, knn_predict, linear_probe


def test_weighted_knn_by_hand():
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[2.0, 0.0]])  # normalised to (1, 0)
    scores = knn_predict(train, labels, test, num_classes=2, k=2, temperature=0.5)
    # 2 nearest: cos 1.0 (class 0) and 0.8 (class 1), weights exp(cos / T) / exp(1.0 / T)
    assert scores[0, 0].item() == pytest.approx(1.0)
    assert scores[0, 1].item() == pytest.approx(math.exp((0.8 - 1.0) / 0.5))
    # a small T: 1/T = 1000 overflowed exp(cos / T) to inf, and the vote shares to NaN
    sharp = knn_predict(train, labels, test, num_classes=2, k=2, temperature=0.001)
    assert torch.isfinite(sharp).all() and sharp[0].tolist() == pytest.approx([1.0, math.exp(-200)], abs=1e-30)
    # k larger than the training set is refused, not silently turned into a majority vote
    with pytest.raises(ConfigError, match="k=200 exceeds the 3 training samples"):
        knn_predict(train, labels, test, 2, k=200, temperature=0.1)
    with pytest.raises(ConfigError, match="k must be >= 1"):
        knn_predict(train, labels, test, 2, k=0)


def test_effective_k_says_when_k_covers_the_training_set():
    assert effective_k(3, 20) == (3, None)
    k, note = effective_k(200, 20)
    assert k == 4 and "--k 200 >= 20 training images" in note and "round(sqrt(20)) = 4" in note
    assert effective_k(5, 1)[0] == 1


def test_effective_k_equal_to_the_training_set_is_reduced_too():
    """k == n_train already makes every test image's neighbours the whole training set: k becomes
    round(sqrt(20)) = 4 and the note says why."""
    k, note = effective_k(20, 20)
    assert k == 4 and "--k 20 >= 20 training images" in note and "round(sqrt(20)) = 4" in note


def test_frozen_report_top5_only_above_five_classes():
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.6, 0.3]])
    rep = frozen_report(probs, torch.tensor([0, 1, 2]), 3)
    assert rep["accuracy"] == pytest.approx(1 / 3) and "top5" not in rep and rep["n_test"] == 3
    assert rep["confusion"] == [[1, 0, 0], [0, 0, 1], [0, 1, 0]]
    probs7 = torch.eye(7) * 0.5 + torch.linspace(0.07, 0.01, 7)  # distinct scores, true class first
    rep7 = frozen_report(probs7, torch.tensor([0, 1, 2, 3, 4, 5, 0]), 7)
    assert rep7["accuracy"] == pytest.approx(6 / 7) and rep7["top5"] == pytest.approx(1.0)


def test_knn_top5_never_counts_a_class_that_got_no_vote():
    """kNN scores every class without a vote 0. scikit-learn's top-k broke those ties by index,
    so a test image of class 7 of 8 with no vote for it was a top-5 hit, one of class 1 a miss
    (found by an audit). Ties now count against the true class, whatever its index."""
    votes = torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 0]])
    assert frozen_report(votes, torch.tensor([7]), 8)["top5"] == 0.0
    assert frozen_report(votes, torch.tensor([1]), 8)["top5"] == 0.0
    assert frozen_report(votes, torch.tensor([0]), 8)["top5"] == 1.0
    # 5 classes voted for: each is a hit, by hand; an unvoted one is not
    five = torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.1, 0.0, 0.0, 0.0]])
    assert [frozen_report(five, torch.tensor([c]), 8)["top5"] for c in range(8)] == [1.0] * 5 + [0.0] * 3


def test_top5_equals_scikit_learn_where_scores_are_distinct():
    import numpy as np
    from sklearn.metrics import top_k_accuracy_score

    from fedmoco.diagnostics import top_k_accuracy

    rng = np.random.default_rng(0)
    scores, y = rng.random((200, 9)), rng.integers(0, 9, 200)
    assert top_k_accuracy(y, scores, 5) == pytest.approx(top_k_accuracy_score(y, scores, k=5, labels=np.arange(9)))


def test_linear_probe_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    x = torch.randn(60, 8, generator=g) * 0.1 + torch.nn.functional.one_hot(y, 8).float() * 5
    clf = linear_probe(x, y, 3, ProbeConfig(epochs=30, lr=0.1), progress=False)
    assert (clf(x).argmax(1) == y).float().mean().item() == 1.0


def test_linear_probe_standardises_with_the_training_mean_and_std():
    """The probe's features are standardised by the training mean and (unbiased) std, so one
    learning rate works whatever the scale of an encoder's features."""
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(1)) * torch.tensor([0.01, 5.0, 300.0]) + 7
    probe = linear_probe(x, torch.arange(40) % 2, 2, ProbeConfig(epochs=1), progress=False)
    assert torch.allclose(probe[0].mean, x.mean(0)) and torch.allclose(probe[0].std, x.std(0))


def test_linear_probe_gives_the_same_classifier_for_the_same_seed_whatever_ran_before():
    """The layer's initial weights came from torch's global generator, which nothing seeds:
    `fedmoco linear-probe` run twice gave AUROC 0.974 and 0.978 (found by an audit). Its
    seed now decides them, and the caller's global generator is left as it was."""
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(2))
    y = torch.arange(30) % 3
    weights = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        before = torch.random.get_rng_state()
        probe = linear_probe(x, y, 3, ProbeConfig(epochs=2, seed=5), progress=False)
        assert torch.equal(torch.random.get_rng_state(), before)
        weights.append(probe[1].weight.detach().clone())
    assert torch.equal(weights[0], weights[1])
    other = linear_probe(x, y, 3, ProbeConfig(epochs=2, seed=6), progress=False)
    assert not torch.equal(other[1].weight, weights[0])
