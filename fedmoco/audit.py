"""Privacy audit: a membership-inference attack on a site's releases, against the DP bound.

A canary (one image whose embedding the attacker knows: the release encoder is public) is
put into a site's data set, or not, and the site's releases over ``rounds`` rounds are
simulated many times in each world, with the site's real mechanism
(:func:`fedmoco.privacy.prototypes_from_sample` for prototypes,
:func:`fedmoco.privacy.privatize_keys` for per-record keys), fresh Poisson samples and
fresh noise. The worlds differ as the mechanism's adjacency says:

- prototypes (add/remove): IN = data + canary, OUT = data;
- keys (replace-one): IN = data with its first record replaced by the canary, OUT = data.

The attacker knows everything but the membership bit, including the canary's embedding c.
Each round it scores the release by the largest cosine of a released vector with c (the
Gaussian likelihood ratio of "c was added to the sum / is this key" against "it was not" is
increasing in <v, c>, and the noise is isotropic), and adds the scores over rounds (log
likelihood ratios of independent rounds add). Its AUC is compared with the largest AUC any
test can reach against an (epsilon, delta)-DP mechanism (:func:`dp_auc_bound`), from the
hypothesis-testing view of DP (Kairouz et al. 2015): TPR <= e^eps FPR + delta and
1 - FPR <= e^eps (1 - TPR) + delta.

An empirical AUC above the bound (beyond sampling error) means the implementation leaks
more than it claims. Below the bound says only that THIS attack did not find a leak.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

from fedmoco.data import one_thread
from fedmoco.errors import ConfigError
from fedmoco.privacy import (calibrate_noise, key_epsilon, poisson_sample, privatize_keys, prototype_history_epsilon,
                             prototype_noise_schedule, prototypes_from_sample)

MODES = ("prototypes", "keys")


def dp_auc_bound(epsilon: float, delta: float, grid: int = 200_001) -> float:
    """Largest ROC AUC of any membership test against an (epsilon, delta)-DP mechanism.

    The optimal trade-off curve is FNR = max(0, 1 - delta - e^eps FPR, e^-eps (1 - delta - FPR));
    AUC = 1 - its integral over FPR in [0, 1] (trapezoids on ``grid`` points)."""
    if math.isinf(epsilon):
        return 1.0
    alpha = np.linspace(0.0, 1.0, grid)
    fnr = np.maximum.reduce([np.zeros_like(alpha), 1 - delta - math.exp(epsilon) * alpha,
                             math.exp(-epsilon) * (1 - delta - alpha)])
    return float(1.0 - np.trapezoid(fnr, alpha))


def empirical_epsilon(scores_in: np.ndarray, scores_out: np.ndarray, delta: float,
                      confidence: float = 0.95) -> float:
    """A lower bound on the mechanism's true epsilon that the attack demonstrates, at the
    given confidence: the largest log((TPR_low - delta) / FPR_high) (and its mirror) over the
    ROC thresholds, with Clopper-Pearson bounds on both rates (each side at (1 + c) / 2);
    0 when no threshold shows anything."""
    n_in, n_out = len(scores_in), len(scores_out)
    y = np.r_[np.ones(n_in), np.zeros(n_out)]
    fpr, tpr, _ = roc_curve(y, np.r_[scores_in, scores_out])
    a = (1 - confidence) / 2
    best = 0.0
    for hit, n_hit, false, n_false in ((tpr, n_in, fpr, n_out), (1 - fpr, n_out, 1 - tpr, n_in)):
        k_hit, k_false = np.rint(hit * n_hit), np.rint(false * n_false)
        lo = np.where(k_hit > 0, stats.beta.ppf(a, k_hit, n_hit - k_hit + 1), 0.0)
        hi = np.where(k_false < n_false, stats.beta.ppf(1 - a, k_false + 1, n_false - k_false), 1.0)
        ok = lo - delta > 0
        if ok.any():
            best = max(best, float(np.max(np.log((lo[ok] - delta) / hi[ok]))))
    return best


def _round_score(mode: str, data: torch.Tensor, canary: torch.Tensor, centres: torch.Tensor | None, z: float,
                 q: float, min_cosine: float, max_keys: int | None, gen: torch.Generator) -> float:
    idx = poisson_sample(len(data), q, gen)
    idx = idx[torch.randperm(len(idx), generator=gen)]
    if mode == "keys":
        if max_keys is not None:
            idx = idx[:max_keys]
        released = privatize_keys(data[idx], z, gen)
    else:
        released = prototypes_from_sample(data[idx], centres, z, min_cosine=min_cosine, generator=gen)
    return float((released @ canary).max()) if len(released) else -1.0


@dataclass
class AuditResult:
    mode: str
    epsilon: float
    delta: float
    rounds: int
    sample_rate: float
    noise_multiplier: float
    trials: int
    auc: float
    auc_bound: float
    empirical_epsilon: float  # 95 % lower bound shown by the attack (Clopper-Pearson)

    @property
    def within_bound(self) -> bool:
        """AUC at most the bound plus 3 standard errors of the AUC estimate (Hanley-McNeil)."""
        return self.auc <= self.auc_bound + 3 * auc_standard_error(self.auc, self.trials, self.trials)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "within_bound": self.within_bound}


def auc_standard_error(auc: float, n_pos: int, n_neg: int) -> float:
    """Hanley & McNeil (1982) standard error of an empirical AUC."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    return math.sqrt(max(var, 0.0))


def membership_audit(mode: str, embeddings: torch.Tensor, canary: torch.Tensor, *, epsilon: float, delta: float,
                     rounds: int, sample_rate: float, trials: int, centres: torch.Tensor | None = None,
                     min_cosine: float = 0.5, max_keys: int | None = None, noise_multiplier: float | None = None,
                     first_share: float = 1.0, seed: int = 0) -> AuditResult:
    """Run the attack ``trials`` times per world and compare its AUC with the DP bound.

    ``embeddings`` (n, D): the site's data as the public encoder embeds it; ``canary`` (D,).
    ``centres`` (C, D): the public centres (prototypes only). z is calibrated for
    (epsilon, delta, rounds, q) as the site would (``noise_multiplier`` overrides it, e.g. 0
    to check that the attack finds an unprotected canary); the bound uses the epsilon the
    site's accountant states for that z. ``first_share`` (prototypes): the ledger's schedule,
    the first release at the smaller z of ``prototype_noise_schedule`` and the rest at the
    larger (``AuditResult.noise_multiplier`` is then the first release's).
    """
    if mode not in MODES:
        raise ConfigError(f"audit mode: {mode!r}, expected one of {MODES}")
    if mode == "prototypes" and centres is None:
        raise ConfigError("audit: prototypes need the public centres")
    data = F.normalize(embeddings.float(), dim=1)
    c = F.normalize(canary.float(), dim=0)
    if mode == "prototypes":
        if noise_multiplier is not None:
            zs = [noise_multiplier] * rounds
        else:
            z_first, z_rest = prototype_noise_schedule(epsilon, delta, rounds, sample_rate, first_share)
            zs = [z_first] + [z_rest] * (rounds - 1)
        stated = prototype_history_epsilon([(zs[0], sample_rate, 1), (zs[-1], sample_rate, rounds - 1)], delta)
        worlds = {"in": torch.cat([data, c[None]]), "out": data}
    else:
        z = calibrate_noise(epsilon, delta, rounds, sample_rate) if noise_multiplier is None else noise_multiplier
        zs = [z] * rounds
        stated = key_epsilon(z, sample_rate, rounds, delta)
        worlds = {"in": torch.cat([c[None], data[1:]]), "out": data}
    z = zs[0]
    gen = torch.Generator().manual_seed(seed)
    with one_thread():  # thousands of tiny releases: threads only contend
        scores = {w: np.array([sum(_round_score(mode, d, c, centres, zr, sample_rate, min_cosine, max_keys, gen)
                                   for zr in zs) for _ in range(trials)]) for w, d in worlds.items()}
    y = np.r_[np.ones(trials), np.zeros(trials)]
    auc = float(roc_auc_score(y, np.r_[scores["in"], scores["out"]]))
    return AuditResult(mode=mode, epsilon=stated, delta=delta, rounds=rounds, sample_rate=sample_rate,
                       noise_multiplier=z, trials=trials, auc=auc, auc_bound=dp_auc_bound(stated, delta),
                       empirical_epsilon=empirical_epsilon(scores["in"], scores["out"], delta))
