import math

import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from torch import nn

from fedmoco.config import MoCoConfig
from fedmoco.errors import ConfigError
from fedmoco.moco import MoCo
from fedmoco.privacy import (
    SENSITIVITY,
    KeyPrivacyLedger,
    KeyReleaseRDPAccountant,
    _add_gaussian_noise,
    calibrate_noise,
    key_epsilon,
    no_dp_metrics,
    poisson_sample,
    privatize_keys,
    release_keys,
)

DELTA = 1e-5


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def _exact_delta_one_round(eps: float, z: float, q: float) -> float:
    """Tight delta(eps) of ONE Poisson-sampled per-record Gaussian release.

    Hockey-stick divergence of (1-q)[absent] + q N(a) vs (1-q)[absent] + q N(b) with
    ||a - b|| / sigma = 1 / z: the absent atoms cancel for eps >= 0, leaving q times the
    Gaussian mechanism's profile (Balle & Wang 2018, Thm 8)."""
    mu = 1.0 / z
    return q * (_phi(-eps / mu + mu / 2) - math.exp(eps) * _phi(-eps / mu - mu / 2))


# -- calibrate_noise ----------------------------------------------------------------------
@pytest.mark.parametrize("eps,rounds,q", [(1.0, 10, 0.01), (4.0, 100, 0.1), (8.0, 50, 1.0), (0.5, 20, 0.05)])
def test_calibrated_z_reaches_target_through_opacus_steps(eps, rounds, q):
    z = calibrate_noise(eps, DELTA, rounds, q)
    acc = KeyReleaseRDPAccountant()
    for _ in range(rounds):  # Opacus' own step(): history compaction as in training
        acc.step(noise_multiplier=z, sample_rate=q)
    assert acc.history == [(z, q, rounds)]
    got = acc.get_epsilon(DELTA)
    assert got <= eps
    assert got >= 0.98 * eps  # tight, not a wildly over-noised z


def test_full_participation_matches_opacus_rdp_exactly():
    # At q = 1 there is no subsampling and both analyses are the plain Gaussian mechanism.
    for z in (0.7, 2.0, 9.0):
        ours, stock = KeyReleaseRDPAccountant(), RDPAccountant()
        ours.history = stock.history = [(z, 1.0, 30)]
        assert ours.get_epsilon(DELTA, alphas=RDPAccountant.DEFAULT_ALPHAS) == pytest.approx(
            stock.get_epsilon(DELTA), rel=1e-12
        )
    stock_z = get_noise_multiplier(target_epsilon=3.0, target_delta=DELTA, sample_rate=1.0, steps=20)
    assert calibrate_noise(3.0, DELTA, 20, 1.0) == pytest.approx(stock_z, rel=0.02)


@pytest.mark.parametrize("z,q", [(1.0, 0.01), (2.0, 0.05), (0.8, 0.1), (3.0, 0.5)])
def test_one_round_epsilon_is_sound_and_opacus_sgm_is_not(z, q):
    ours = key_epsilon(z, q, 1, DELTA)
    assert _exact_delta_one_round(ours, z, q) <= DELTA
    # Opacus' sampled-Gaussian (DP-SGD) accountant hides the record's presence in a sum;
    # per-record releases have no sum, so its epsilon is too small for this mechanism.
    stock = RDPAccountant()
    stock.step(noise_multiplier=z, sample_rate=q)
    assert _exact_delta_one_round(stock.get_epsilon(DELTA), z, q) > 10 * DELTA


def test_noise_monotonicity():
    zs = [calibrate_noise(e, DELTA, 50, 0.05) for e in (0.5, 1.0, 2.0, 8.0)]
    assert zs == sorted(zs, reverse=True) and len(set(zs)) == 4
    assert calibrate_noise(2.0, DELTA, 200, 0.05) > calibrate_noise(2.0, DELTA, 20, 0.05)
    assert calibrate_noise(2.0, DELTA, 50, 0.5) > calibrate_noise(2.0, DELTA, 50, 0.01)
    assert calibrate_noise(2.0, 1e-8, 50, 0.05) > calibrate_noise(2.0, 1e-4, 50, 0.05)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(epsilon=0.0), "epsilon"),
        (dict(epsilon=-1.0), "epsilon"),
        (dict(epsilon=math.inf), "epsilon"),
        (dict(delta=0.0), "delta"),
        (dict(delta=1.0), "delta"),
        (dict(rounds=0), "rounds"),
        (dict(rounds=2.5), "rounds"),
        (dict(sample_rate=0.0), "sample_rate"),
        (dict(sample_rate=1.5), "sample_rate"),
        (dict(epsilon=1e-4, delta=1e-10), "epsilon"),  # unreachable: no z is enough
    ],
)
def test_calibrate_validation_names_argument(kwargs, name):
    args = dict(epsilon=2.0, delta=DELTA, rounds=10, sample_rate=0.1) | kwargs
    with pytest.raises(ConfigError, match=rf"^{name}:"):
        calibrate_noise(**args)


# -- privatize_keys -----------------------------------------------------------------------
def test_privatize_keys_shape_norm_determinism():
    keys = torch.randn(64, 16) * 5  # not unit-norm on purpose: privatize normalises first
    a = privatize_keys(keys, 1.3, _gen(7))
    assert a.shape == (64, 16) and a.dtype == torch.float32
    assert torch.allclose(a.norm(dim=1), torch.ones(64), atol=1e-5)
    assert torch.equal(a, privatize_keys(keys, 1.3, _gen(7)))
    assert not torch.allclose(a, privatize_keys(keys, 1.3, _gen(8)))
    assert torch.equal(a, F.normalize(_add_gaussian_noise(keys, 1.3, _gen(7)), dim=1))
    assert privatize_keys(torch.zeros(0, 16), 1.3, _gen()).shape == (0, 16)


def test_privatize_noise_std_is_z_times_sensitivity():
    z = 0.75
    keys = F.normalize(torch.randn(4000, 64, generator=_gen(1)), dim=1)
    noise = _add_gaussian_noise(keys, z, _gen(2)) - keys
    assert noise.mean().abs() < 0.01
    assert noise.std().item() == pytest.approx(z * SENSITIVITY, rel=0.01)  # 256k samples


def test_privatize_zero_is_explicit_no_dp():
    keys = torch.randn(10, 8)
    assert torch.allclose(privatize_keys(keys, 0.0), F.normalize(keys, dim=1))
    with pytest.raises(ConfigError, match="^noise_multiplier:"):
        privatize_keys(keys, -0.1)
    with pytest.raises(ValueError, match=r"\(n, D\)"):
        privatize_keys(torch.randn(8), 1.0)


# -- poisson_sample -----------------------------------------------------------------------
def test_poisson_sample_rate_and_form():
    n, q = 200_000, 0.03
    idx = poisson_sample(n, q, _gen(3))
    assert idx.dtype == torch.int64
    assert torch.equal(idx, torch.unique(idx)) and idx.min() >= 0 and idx.max() < n
    sd = math.sqrt(n * q * (1 - q))
    assert abs(len(idx) - n * q) < 4 * sd
    assert torch.equal(idx, poisson_sample(n, q, _gen(3)))
    assert torch.equal(poisson_sample(50, 1.0), torch.arange(50))
    assert poisson_sample(0, 0.5).shape == (0,)
    with pytest.raises(ConfigError, match="^sample_rate:"):
        poisson_sample(10, 0.0)
    with pytest.raises(ConfigError, match="^n:"):
        poisson_sample(-1, 0.5)


# -- KeyPrivacyLedger ---------------------------------------------------------------------
def test_ledger_spent_monotone_and_would_exceed_flips_at_budget():
    z, q = 1.5, 0.1
    budget = key_epsilon(z, q, 5, DELTA)  # exactly five releases fit
    ledger = KeyPrivacyLedger(budget, DELTA, z, q)
    assert ledger.spent() == 0.0 and ledger.releases == 0
    seen = [0.0]
    for i in range(5):
        assert not ledger.would_exceed() and not ledger.exhausted
        seen.append(ledger.record_release())
        assert ledger.releases == i + 1 and ledger.spent() == seen[-1]
    assert all(b > a for a, b in zip(seen, seen[1:]))
    assert ledger.spent() == budget
    assert ledger.would_exceed() and ledger.exhausted


def test_ledger_with_calibrated_z_allows_planned_rounds():
    z = calibrate_noise(3.0, DELTA, 10, 0.05)
    ledger = KeyPrivacyLedger(3.0, DELTA, z, 0.05)
    for _ in range(10):
        assert not ledger.would_exceed()
        ledger.record_release()
    assert ledger.spent() <= 3.0


def test_ledger_state_round_trips_exactly_through_config_record():
    from flwr.app import ConfigRecord

    ledger = KeyPrivacyLedger(6.0, 1e-6, 0.9173, 0.037)
    for _ in range(7):
        ledger.record_release()
    state = ledger.state_dict()
    assert all(isinstance(v, (str, int, float)) for v in state.values())
    restored = KeyPrivacyLedger(1.0, 0.5, 3.0, 1.0)  # different settings: state wins
    restored.load_state_dict(dict(ConfigRecord(state)))
    assert restored.spent() == ledger.spent()
    assert restored.state_dict() == state
    assert restored.to_metrics() == ledger.to_metrics()
    restored.record_release()
    ledger.record_release()
    assert restored.spent() == ledger.spent()


def test_ledger_metrics_and_validation():
    ledger = KeyPrivacyLedger(8.0, DELTA, 2.0, 0.1)
    ledger.record_release()
    m = ledger.to_metrics()
    assert set(m) == {"dp-keys-epsilon", "dp-keys-delta", "dp-keys-releases", "dp-keys-exhausted"}
    assert all(isinstance(v, float) for v in m.values())
    assert m["dp-keys-epsilon"] == ledger.spent() and m["dp-keys-releases"] == 1.0
    assert m["dp-keys-exhausted"] == 0.0
    assert no_dp_metrics(3) == {
        "dp-keys-epsilon": math.inf, "dp-keys-delta": 0.0, "dp-keys-releases": 3.0, "dp-keys-exhausted": 0.0
    }
    for args, name in [
        ((0.0, DELTA, 1.0, 0.1), "epsilon_budget"),
        ((1.0, 2.0, 1.0, 0.1), "delta"),
        ((1.0, DELTA, 0.0, 0.1), "noise_multiplier"),
        ((1.0, DELTA, 1.0, 0.0), "sample_rate"),
    ]:
        with pytest.raises(ConfigError, match=f"^{name}:"):
            KeyPrivacyLedger(*args)
    with pytest.raises(ConfigError, match="format"):
        ledger.load_state_dict(ledger.state_dict() | {"format": "other/9"})
    with pytest.raises(ConfigError, match="releases"):
        ledger.load_state_dict(ledger.state_dict() | {"releases": -1})


# -- release_keys -------------------------------------------------------------------------
class _BNEncoder(nn.Module):
    """Key encoder with BatchNorm: in train mode its keys would depend on the batch."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, dim), nn.BatchNorm1d(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _images(n: int, seed: int = 0) -> list[torch.Tensor]:
    return list(torch.rand(n, 1, 4, 4, generator=_gen(seed)))


def test_release_keys_until_budget_then_empty_with_reason():
    z, q = 1.0, 0.5
    ledger = KeyPrivacyLedger(key_epsilon(z, q, 2, DELTA), DELTA, z, q)
    enc = _BNEncoder()
    data = [(im, im.flip(-1)) for im in _images(40)]  # view pairs
    g = _gen(4)
    for i in range(2):
        keys, reason = release_keys(enc, data, ledger, generator=g)
        assert reason is None and ledger.releases == i + 1
        assert keys.dtype == torch.float32 and keys.shape[1] == 8 and 5 < keys.shape[0] < 35
        assert torch.allclose(keys.norm(dim=1), torch.ones(len(keys)), atol=1e-5)
    for _ in range(2):  # stays closed, and closing costs nothing
        keys, reason = release_keys(enc, data, ledger, generator=g)
        assert keys.shape == (0, 8)
        assert reason.startswith("privacy budget exhausted: spent eps=") and ledger.releases == 2
    keys, reason = release_keys(enc, data, ledger, key_dim=8)
    assert keys.shape == (0, 8) and reason


def test_release_keys_no_dp_mode_is_per_sample_and_restores_train_mode():
    enc = _BNEncoder().train()
    with torch.no_grad():  # give BN running stats that differ from any batch's own
        enc.net[2].running_mean.fill_(0.3)
        enc.net[2].running_var.fill_(2.0)
    images = _images(12)
    data = images[:5] + [None] + images[5:]  # one unreadable sample
    keys, reason = release_keys(enc, data, None, noise_multiplier=0.0, sample_rate=1.0, batch_size=4, generator=_gen())
    assert reason is None and enc.training
    assert keys.shape == (13, 8)
    enc.eval()
    want = F.normalize(enc(torch.stack(images)), dim=1)
    want = torch.cat([want, F.one_hot(torch.tensor([0]), 8).float()])  # unreadable -> e_0 stand-in
    # Released in shuffled order: match every expected key to one released key.
    sims = want @ keys.t()
    assert torch.allclose(sims.max(dim=1).values, torch.ones(13), atol=1e-5)
    assert torch.equal(sims.argmax(dim=1).sort().values, torch.arange(13))


def test_release_keys_max_keys_and_real_moco():
    cfg = MoCoConfig(arch="tiny", in_channels=1, small_input=True, queue_size=32, hidden_dim=32, dim=16, norm="group")
    model = MoCo(cfg)
    data = list(torch.rand(60, 1, 16, 16, generator=_gen(5)))
    ledger = KeyPrivacyLedger(10.0, DELTA, 1.0, 1.0)
    keys, reason = release_keys(model.encode_keys, data, ledger, max_keys=10, generator=_gen(6))
    assert reason is None and keys.shape == (10, 16) and ledger.releases == 1
    assert model.training  # restored after the eval() around encoding


def test_release_keys_configuration_errors():
    enc, data = _BNEncoder(), _images(4)
    with pytest.raises(ConfigError, match="^noise_multiplier:"):
        release_keys(enc, data, None, noise_multiplier=1.0, sample_rate=0.5)
    ledger = KeyPrivacyLedger(1.0, DELTA, 2.0, 0.1)
    with pytest.raises(ConfigError, match="^noise_multiplier/sample_rate:"):
        release_keys(enc, data, ledger, noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="^max_keys:"):
        release_keys(enc, data, ledger, max_keys=0)
    assert ledger.releases == 0


# -- DP prototypes ---------------------------------------------------------------------------
from fedmoco.privacy import (  # noqa: E402
    calibrate_prototype_noise,
    choose_centres,
    merge_centres,
    noisy_prototype_sums,
    privatize_prototypes,
    prototype_epsilon,
    release_prototypes,
    seeded_centres,
    select_prototypes,
)


@pytest.mark.parametrize("eps,rounds,q", [(1.5, 10, 1.0), (1.5, 10, 0.2), (8.0, 10, 0.5), (0.5, 3, 1.0)])
def test_prototype_noise_spends_90_to_100_percent_by_stock_rdp(eps, rounds, q):
    z = calibrate_prototype_noise(eps, DELTA, rounds, q)
    acc = RDPAccountant()  # Opacus' stock accountant, not ours
    acc.history = [(z, q, rounds)]
    spent = acc.get_epsilon(DELTA)
    assert 0.9 * eps <= spent <= eps
    # our fast accountant (stock analysis, stock integer orders) is never below the stock one
    assert spent <= prototype_epsilon(z, q, rounds, DELTA) <= 1.03 * spent


@pytest.mark.parametrize("q,z", [(0.5, 1.3), (0.05, 0.9), (1.0, 3.0), (0.2, 20.0)])
def test_fast_prototype_rdp_equals_opacus_at_integer_orders(q, z):
    from opacus.accountants.analysis.rdp import compute_rdp

    from fedmoco.privacy import PROTOTYPE_ORDERS, sampled_gaussian_rdp

    ours = sampled_gaussian_rdp(z, q, 7, PROTOTYPE_ORDERS)
    stock = compute_rdp(q=q, noise_multiplier=z, steps=7, orders=list(PROTOTYPE_ORDERS))
    assert ours == pytest.approx(stock, rel=1e-9)


def test_prototype_noise_reference_value_and_errors():
    # privacy-maths.md: eps 1.5, 10 rounds, q = 1 -> z = 8.8 (Opacus rdp, delta 1e-5)
    assert calibrate_prototype_noise(1.5, 1e-5, 10, 1.0) == pytest.approx(8.83, abs=0.01)
    assert prototype_epsilon(3.0, 0.5, 0, DELTA) == 0.0 and prototype_epsilon(0.0, 0.5, 2, DELTA) == math.inf
    with pytest.raises(ConfigError, match="epsilon"):
        calibrate_prototype_noise(0.0, DELTA, 10, 1.0)
    with pytest.raises(ConfigError, match="delta"):
        calibrate_prototype_noise(1.0, 1.5, 10, 1.0)
    with pytest.raises(ConfigError, match="cannot be reached"):
        calibrate_prototype_noise(1e-4, 1e-12, 10, 1.0)


def _clustered(n_per: int, centres: torch.Tensor, spread: float, seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    rows = [F.normalize(c + spread * torch.randn(n_per, c.numel(), generator=g), dim=1) for c in centres]
    return torch.cat(rows)


def test_noise_on_the_sums_has_std_z_and_the_sums_are_exact_underneath():
    centres = seeded_centres(8, 32, seed=1)
    emb = _clustered(50, centres, 0.3)
    z = 2.5
    noisy, counts = noisy_prototype_sums(emb, centres, z, _gen(2))
    exact, counts0 = noisy_prototype_sums(emb, centres, 0.0)
    assert torch.equal(counts, counts0) and counts.sum() == 400
    # hand reference: the exact sums are the per-centre sums of the unit rows
    owner = (emb @ centres.T).argmax(1)
    for c in range(8):
        assert torch.allclose(exact[c], emb[owner == c].sum(0), atol=1e-5)
    noise = torch.cat([(noisy_prototype_sums(emb, centres, z, _gen(s))[0] - exact).flatten() for s in range(20)])
    assert noise.std().item() == pytest.approx(z, rel=0.03) and abs(noise.mean().item()) < 0.1
    # the noise is there for every centre, empty or not (an empty centre is pure noise)
    noisy_big, _ = noisy_prototype_sums(emb[:1], seeded_centres(200, 32, 3), 1.0, _gen(4))
    assert noisy_big.std().item() == pytest.approx(1.0, rel=0.05)


def test_privatize_prototypes_rows_for_nonempty_centres_in_order():
    centres = seeded_centres(6, 16, seed=5)
    emb = torch.cat([_clustered(30, centres[[0]], 0.2), _clustered(10, centres[[3]], 0.2, seed=1)])
    out = privatize_prototypes(emb, centres, 0.0)
    assert out.shape == (2, 16)
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(out[0], F.normalize(emb[:30].sum(0), dim=0), atol=1e-5)
    assert torch.allclose(out[1], F.normalize(emb[30:].sum(0), dim=0), atol=1e-5)
    noisy = privatize_prototypes(emb, centres, 1.0, _gen(7))
    sums, _ = noisy_prototype_sums(emb, centres, 1.0, _gen(7))
    assert torch.allclose(noisy, F.normalize(sums[[0, 3]], dim=1))
    # a non-unit embedding counts as its direction only (sensitivity 1)
    assert torch.allclose(privatize_prototypes(emb * 100, centres, 0.0), out, atol=1e-5)


def test_select_prototypes_drops_pure_noise_keeps_signal():
    z, d = 3.0, 64
    g = _gen(8)
    signal = torch.zeros(50, d)
    signal[:, 0] = 200.0  # n rho = 200 >> z sqrt(D) = 24: estimated cosine ~ 0.99
    rows = torch.cat([signal, torch.zeros(200, d)]) + z * torch.randn(250, d, generator=g)
    kept = select_prototypes(rows, z, min_cosine=0.5)
    assert 50 <= kept.shape[0] <= 50 + 200 * 0.1
    assert torch.allclose(kept.norm(dim=1), torch.ones(kept.shape[0]), atol=1e-5)
    assert select_prototypes(torch.cat([signal[:3], torch.zeros(4, d)]), 0.0).shape == (3, d)


def test_centres_come_from_public_inputs_only():
    received = F.normalize(torch.randn(40, 16, generator=_gen(9)), dim=1)
    a = choose_centres(received, 8, 16, seed=11)
    assert torch.equal(a, choose_centres(received.clone(), 8, 16, seed=11))  # deterministic
    assert ((a @ received.T).max(dim=1).values > 1 - 1e-6).all()  # all from what was sent
    assert (a @ a.T - torch.eye(8)).max() < 0.99  # spread out, no duplicates
    few = choose_centres(received[:3], 8, 16, seed=11)
    assert torch.allclose((few[:3] @ received[:3].T).max(dim=1).values, torch.ones(3))
    assert torch.equal(few[3:], seeded_centres(8, 16, 11)[:5])
    assert torch.equal(choose_centres(None, 8, 16, seed=11), seeded_centres(8, 16, 11))


def test_release_prototypes_uses_the_given_encoder_per_sample():
    enc = _BNEncoder(dim=8)
    data = [(im, im) for im in _images(60)]
    centres = seeded_centres(4, 8, 0)
    out = release_prototypes(enc, data, centres, 0.0, 1.0)
    assert enc.training  # restored
    enc.eval()
    with torch.no_grad():
        emb = F.normalize(enc(torch.stack([d[0] for d in data])), dim=1)
    assert torch.allclose(out, privatize_prototypes(emb, centres, 0.0), atol=1e-5)
    data[5] = None  # unreadable: left out of the sums
    out2 = release_prototypes(enc, data, centres, 0.0, 1.0)
    assert torch.allclose(out2, privatize_prototypes(torch.cat([emb[:5], emb[6:]]), centres, 0.0), atol=1e-5)


def test_merge_centres_is_weighted_spherical_kmeans_deterministic_unit_rows():
    truth = seeded_centres(4, 16, seed=21)
    pool = torch.cat([_clustered(6, truth, 0.15, seed=22), seeded_centres(1, 16, seed=23)])  # + one stray row
    before = pool.clone()
    merged = merge_centres(pool, 4)
    assert merged.shape == (4, 16) and torch.allclose(merged.norm(dim=1), torch.ones(4), atol=1e-6)
    assert torch.equal(merged, merge_centres(pool.clone(), 4)) and torch.equal(pool, before)  # deterministic, pure
    # each centre is exactly the normalised mean of the rows nearest to it (a fixed point of Lloyd's step)
    owner = (F.normalize(pool, dim=1) @ merged.T).argmax(1)
    ref = F.normalize(torch.stack([F.normalize(pool, dim=1)[owner == k].sum(0) for k in range(4)]), dim=1)
    assert torch.allclose(merged, ref, atol=1e-5)
    assert sorted((merged @ truth.T).argmax(1).tolist()) == [0, 1, 2, 3]  # one centre per true cluster
    assert (merged @ truth.T).max(1).values.min() > 0.95
    # weights: a zero weight removes a row; scaling all weights changes nothing
    w = torch.ones(len(pool))
    w[-1] = 0
    assert torch.allclose(merge_centres(pool, 4, w), merge_centres(pool[:-1], 4), atol=1e-6)
    assert torch.allclose(merge_centres(pool, 4, 3 * w), merge_centres(pool, 4, w), atol=1e-6)
    # fewer rows than centres: one per distinct row (sites top up with seeded directions); none -> (0, D)
    assert merge_centres(pool[:2], 4).shape == (2, 16)
    assert merge_centres(torch.cat([pool[:1], pool[:1]]), 4).shape == (1, 16)
    assert merge_centres(torch.zeros(0, 16), 4).shape == (0, 16)
    with pytest.raises(ValueError, match="^weights:"):
        merge_centres(pool, 4, -w)
    with pytest.raises(ConfigError, match="^count:"):
        merge_centres(pool, 0)


def test_centres_aligned_with_the_clusters_carry_more_signal_than_random_ones():
    """Why the server merges releases into centres: at epsilon 1.5 (z = 8.83), 4,000 images of
    16 diffuse clusters (resultant 0.5), random centres mix clusters in every bucket and the
    released cosine is ~0.75; centres on the cluster means (8 of 16) give buckets of whole
    clusters and ~0.9. Seeded; the margin (0.08) is > 5 standard errors of the difference."""
    g = _gen(31)
    mu = F.normalize(torch.randn(16, 128, generator=g), dim=1)
    sigma = ((1 / 0.5**2 - 1) / 128) ** 0.5
    emb = F.normalize(mu[torch.randint(0, 16, (4000,), generator=g)] + sigma * torch.randn(4000, 128, generator=g),
                      dim=1)
    z = calibrate_prototype_noise(1.5, DELTA, 10, 1.0)

    def released_cosine(centres: torch.Tensor) -> float:
        exact, counts = noisy_prototype_sums(emb, centres, 0.0)
        cos = [F.cosine_similarity(noisy_prototype_sums(emb, centres, z, _gen(100 + i))[0][counts > 0],
                                   exact[counts > 0]).mean() for i in range(20)]
        return float(torch.stack(cos).mean())

    random_cos = released_cosine(seeded_centres(8, 128, seed=7))
    aligned_cos = released_cosine(mu[:8])
    assert 0.6 < random_cos < 0.82
    assert aligned_cos > random_cos + 0.08 and aligned_cos > 0.85



@pytest.mark.parametrize("eps,rounds,q,share", [(1.5, 10, 1.0, 2.0), (1.5, 10, 0.2, 2.0), (8.0, 5, 1.0, 3.0)])
def test_front_loaded_schedule_spends_90_to_100_percent_by_stock_rdp(eps, rounds, q, share):
    from fedmoco.privacy import prototype_noise_schedule

    z_first, z_rest = prototype_noise_schedule(eps, DELTA, rounds, q, share)
    uniform = calibrate_prototype_noise(eps, DELTA, rounds, q)
    assert z_rest == pytest.approx(z_first * math.sqrt(share))
    assert z_first < uniform < z_rest  # less noise first, more later: budget moved, not added
    acc = RDPAccountant()  # Opacus' stock accountant composes the two noise levels
    acc.history = [(z_first, q, 1), (z_rest, q, rounds - 1)]
    assert 0.9 * eps <= acc.get_epsilon(DELTA) <= eps


def test_front_loaded_schedule_reference_and_errors():
    from fedmoco.privacy import prototype_noise_schedule

    # q = 1: RDP is alpha / (2 z^2) a release. With z_rest^2 = 2 z1^2 the ten releases cost
    # (1 + 9 / 2) / z1^2 = 10 / z^2 at the uniform z = 8.83, so z1 = z * sqrt(0.55) = 6.55 and
    # z_rest = z * sqrt(1.1) = 9.26 (to the calibration's 0.5 % of epsilon)
    z_first, z_rest = prototype_noise_schedule(1.5, 1e-5, 10, 1.0, 2.0)
    assert z_first == pytest.approx(8.83 * math.sqrt(0.55), rel=0.01)
    assert z_rest == pytest.approx(8.83 * math.sqrt(1.1), rel=0.01)
    assert prototype_noise_schedule(1.5, 1e-5, 10, 1.0, 1.0) == (calibrate_prototype_noise(1.5, 1e-5, 10, 1.0),) * 2
    assert prototype_noise_schedule(1.5, 1e-5, 1, 1.0, 4.0)[0] == calibrate_prototype_noise(1.5, 1e-5, 1, 1.0)
    # 1e14 planned z ~ 2e7 for later releases, which the ledger refuses to read back: the
    # site was locked out of its own ledger (found by an audit); 1.7e308 overflowed z**2
    for bad in (0.5, float("inf"), float("nan"), 1e14, 1.7e308):
        with pytest.raises(ConfigError, match=r"prototype-first-share must be a number in \[1, 100\]"):
            prototype_noise_schedule(1.5, 1e-5, 10, 1.0, bad)
    assert prototype_noise_schedule(1.5, 1e-5, 10, 1.0, 100.0)[1] < 1e3  # the largest share plans readable z


def test_the_copied_orders_are_opacus_own_and_the_classes_are_its_accountants():
    """fedmoco.privacy keeps Opacus' default orders without importing Opacus (fedmoco.accountants
    does); the copy must stay Opacus' list, and the lazily reached classes Opacus accountants."""
    from opacus.accountants import RDPAccountant, create_accountant

    import fedmoco.privacy as privacy

    assert privacy.OPACUS_DEFAULT_ALPHAS == RDPAccountant.DEFAULT_ALPHAS
    assert issubclass(privacy.KeyReleaseRDPAccountant, RDPAccountant)
    assert issubclass(privacy.PrototypeRDPAccountant, RDPAccountant)
    assert isinstance(create_accountant(privacy.PROTOTYPE_ACCOUNTANT), privacy.PrototypeRDPAccountant)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        privacy.Nope  # noqa: B018


@pytest.mark.parametrize("name", ["KeyReleaseRDPAccountant", "PrototypeRDPAccountant"])
def test_epsilons_after_each_release_equal_full_accountings(name):
    """A ledger prices its whole plan with one pass of added RDP: each prefix must equal the
    accountant run on that prefix's history."""
    import fedmoco.privacy as privacy

    cls = getattr(privacy, name)
    acc = cls()
    acc.history = [(3.0, 0.5, 2)]
    releases = [(2.0, 0.5), (4.0, 0.25), (4.0, 0.25), (4.0, 0.25)]
    got = acc.epsilons_after(releases, 1e-5)
    for k in range(len(releases) + 1):
        ref = cls()
        ref.history = [(3.0, 0.5, 2)] + [(z, q, 1) for z, q in releases[:k]]
        assert got[k] == pytest.approx(ref.get_epsilon(1e-5), rel=1e-12)
    assert got == sorted(got) and cls().epsilons_after([], 1e-5) == [0.0]


class _DrawHungry(torch.utils.data.Dataset):
    """Item i: a fixed image plus augmentation noise from torch's global generator; item 0
    takes 50 draws first (an image whose augmentation retries, like a crop resampled until it
    fits), so read in a row it would shift every later item's draws."""

    def __init__(self, n: int, dim: int = 6) -> None:
        self.base = torch.nn.functional.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(1)), dim=1)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        if i == 0:
            torch.rand(50)
        return (self.base[i] + 0.1 * torch.randn(self.base.shape[1])).view(-1, 1, 1)


def test_each_released_image_is_read_with_its_own_randomness():
    """One image's presence must not change another image's view: the prototype sums'
    sensitivity of 1 (docs/privacy.md) needs each embedding to depend on its image alone."""
    from fedmoco.privacy import _encode, _read_alone

    data = _DrawHungry(5)
    alone = _read_alone(data, 3, seed=1234)
    _read_alone(data, 0, seed=99)  # a draw-hungry neighbour read before it changes nothing
    assert torch.equal(_read_alone(data, 3, seed=1234), alone)
    # the release leaves torch's generator as it found it: training augments as without it
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    _encode(lambda x: x.flatten(1), data, [0, 1, 2, 3, 4], 2, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert torch.equal(torch.rand(3), expected)
    # with the same per-item seeds, item 3's released row is the same with or without item 0
    encoder = lambda x: x.flatten(1)  # noqa: E731
    with_0, _ = _encode(encoder, data, [0, 3], 8, torch.device("cpu"), torch.Generator().manual_seed(5))
    seed_of_3 = torch.randint(0, 2**62, (2,), generator=torch.Generator().manual_seed(5)).tolist()[1]
    assert torch.allclose(with_0[1], torch.nn.functional.normalize(_read_alone(data, 3, seed_of_3).flatten(), dim=0))


def test_released_vectors_are_encoded_without_autograd():
    """The release encodes with gradients off: no graph is built or kept for what is sent."""
    from fedmoco.privacy import _encode

    linear = torch.nn.Linear(6, 4)
    keys, dim = _encode(lambda x: linear(x.flatten(1)), _DrawHungry(3), [0, 1, 2], 2, torch.device("cpu"),
                        torch.Generator().manual_seed(0))
    assert dim == 4 and all(k is not None and not k.requires_grad for k in keys)


def test_an_image_the_weights_overflow_on_counts_as_unreadable_not_as_a_dropped_bucket():
    """A server may send weights that overflow on one chosen image. Its NaN would make its
    bucket's noisy sum NaN, and the dropped row would reveal the image; it is left out instead
    (prototypes) or sent as the e_0 stand-in (keys), as an unreadable image is."""
    from fedmoco.privacy import _encode, privatize_prototypes, release_prototypes, sample_embeddings, seeded_centres

    images = _images(6)

    def overflowing(x):  # finite everywhere except on image 2
        out = x.flatten(1)[:, :8].clone()
        out[(x.flatten(1) - images[2].flatten()).abs().amax(dim=1) == 0] = float("inf")
        return out

    data = [(im, im) for im in images]
    keys, dim = _encode(overflowing, data, list(range(6)), 4, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert dim == 8 and keys[2] is None and all(torch.isfinite(keys[j]).all() for j in (0, 1, 3, 4, 5))
    centres = seeded_centres(4, 8, 0)
    out = release_prototypes(overflowing, data, centres, 0.0, 1.0)
    clean = F.normalize(torch.stack([images[j].flatten()[:8] for j in (0, 1, 3, 4, 5)]), dim=1)
    assert torch.isfinite(out).all() and torch.allclose(out, privatize_prototypes(clean, centres, 0.0), atol=1e-5)
    stand_in = sample_embeddings(overflowing, data, 1.0, key_dim=8, unreadable="stand-in")  # rows in random order
    e0 = F.one_hot(torch.tensor(0), 8).float()
    assert torch.isfinite(stand_in).all() and sum(torch.equal(row, e0) for row in stand_in) == 1


def test_key_noise_std_is_twice_z_in_absolute_terms():
    """A key's noise is N(0, (2z)^2) per coordinate: the sensitivity of a unit key under
    replace-one is 2, and the accountant's epsilon assumes exactly this much noise."""
    keys = F.normalize(torch.randn(4000, 64, generator=_gen(1)), dim=1)
    noise = _add_gaussian_noise(keys, 0.75, _gen(2)) - keys
    assert noise.std().item() == pytest.approx(1.5, rel=0.01)  # 2 * 0.75, over 256k draws


def test_release_keys_adds_the_ledgers_noise():
    """release_keys sends privatize_keys(clean keys, the ledger's z): the noise the ledger pays for."""
    from fedmoco.privacy import sample_embeddings

    enc, data = _BNEncoder(), _images(20)
    keys, reason = release_keys(enc, data, KeyPrivacyLedger(50.0, DELTA, 1.0, 1.0), generator=_gen(3))
    g = _gen(3)  # the same draws: sample, order and item seeds, then the noise
    clean = sample_embeddings(enc, data, 1.0, generator=g, unreadable="stand-in")
    assert reason is None and torch.equal(keys, privatize_keys(clean, 1.0, g))
    assert not torch.allclose(keys, clean, atol=0.1)


def test_merge_centres_weights_pull_the_centre():
    """A prototype of weight 3 pulls the merged centre three times as hard as one of weight 1:
    normalize(3 e_0 + e_1) = (3, 1) / sqrt(10)."""
    merged = merge_centres(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), 1, torch.tensor([3.0, 1.0]))
    assert torch.allclose(merged, torch.tensor([[3.0, 1.0]]) / math.sqrt(10), atol=1e-4)  # [[0.9487, 0.3162]]


def test_prototype_sums_add_unit_embeddings():
    """Each embedding adds its unit vector to its centre's sum (what bounds the sensitivity by 1),
    whatever its norm: [3, 4] adds [0.6, 0.8]."""
    sums, counts = noisy_prototype_sums(torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0]]), 0.0)
    assert torch.allclose(sums, torch.tensor([[0.6, 0.8]])) and counts.tolist() == [1]
