"""Membership-inference audit of the releases: the attack stays within what (epsilon, delta) allows."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedmoco.audit import auc_standard_error, dp_auc_bound, membership_audit
from fedmoco.errors import ConfigError
from fedmoco.privacy import calibrate_prototype_noise, seeded_centres

DELTA = 1e-5


@pytest.mark.parametrize("eps", [0.0, 0.5, 1.0, 3.0])
def test_auc_bound_matches_the_closed_form_for_pure_dp(eps):
    # delta = 0: FNR = max(1 - e^eps FPR, e^-eps (1 - FPR)), whose AUC is e^eps / (1 + e^eps)
    assert dp_auc_bound(eps, 0.0) == pytest.approx(math.exp(eps) / (1 + math.exp(eps)), abs=1e-6)
    assert dp_auc_bound(eps, 1e-3) > dp_auc_bound(eps, 0.0)
    assert dp_auc_bound(math.inf, DELTA) == 1.0


@pytest.fixture(scope="module")
def site():
    """60 embeddings around 4 of 8 public centres; the canary sits alone at a 5th: the worst case."""
    g = torch.Generator().manual_seed(0)
    centres = seeded_centres(8, 16, seed=1)
    data = F.normalize(centres[torch.randint(0, 4, (60,), generator=g)] + 0.3 * torch.randn(60, 16, generator=g),
                       dim=1)
    return data, centres[6], centres


@pytest.mark.parametrize("mode,q,min_cosine", [("prototypes", 1.0, 0.0), ("prototypes", 1.0, 0.5),
                                               ("keys", 0.5, 0.5)])
def test_audit_stays_within_the_bound(site, mode, q, min_cosine):
    data, canary, centres = site
    r = membership_audit(mode, data, canary, epsilon=2.0, delta=DELTA, rounds=2, sample_rate=q, trials=300,
                         centres=centres, min_cosine=min_cosine, seed=3)
    assert 1.9 <= r.epsilon <= 2.0 and r.auc_bound == pytest.approx(0.88, abs=0.01)
    assert r.within_bound and r.auc < r.auc_bound
    assert r.empirical_epsilon <= r.epsilon  # what the attack demonstrates never exceeds the claim


def test_audit_of_the_front_loaded_schedule_stays_within_the_bound(site):
    """The ledger's default schedule (first release at less noise, the rest at more): the same
    total epsilon, and the attack stays inside its bound."""
    data, canary, centres = site
    r = membership_audit("prototypes", data, canary, epsilon=2.0, delta=DELTA, rounds=3, sample_rate=1.0,
                         trials=300, centres=centres, min_cosine=0.0, first_share=2.0, seed=3)
    assert r.noise_multiplier < calibrate_prototype_noise(2.0, DELTA, 3, 1.0)  # the first release's z
    assert 1.8 <= r.epsilon <= 2.0 and r.within_bound and r.empirical_epsilon <= r.epsilon


def test_the_audit_catches_a_mechanism_noisier_on_paper_than_in_fact(site):
    """Noise 10x below what epsilon = 2 needs: the same attack then beats the epsilon = 2 bound."""
    data, canary, centres = site
    z = calibrate_prototype_noise(2.0, DELTA, 2, 1.0)
    r = membership_audit("prototypes", data, canary, epsilon=2.0, delta=DELTA, rounds=2, sample_rate=1.0,
                         trials=300, centres=centres, noise_multiplier=z / 10, seed=4)
    claimed = dp_auc_bound(2.0, DELTA)
    assert r.auc > claimed + 3 * auc_standard_error(r.auc, 300, 300)
    assert r.empirical_epsilon > 2.0


def test_audit_arguments():
    with pytest.raises(ConfigError, match="centres"):
        membership_audit("prototypes", torch.randn(4, 8), torch.randn(8), epsilon=1.0, delta=DELTA, rounds=1,
                         sample_rate=1.0, trials=2)
    with pytest.raises(ConfigError, match="audit mode"):
        membership_audit("weights", torch.randn(4, 8), torch.randn(8), epsilon=1.0, delta=DELTA, rounds=1,
                         sample_rate=1.0, trials=2)
