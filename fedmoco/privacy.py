"""Differential privacy for the key embeddings a site shares with the server.

Each round a site releases a Poisson sample (rate ``q``) of its images as noisy keys:
``k~ = normalize(normalize(f(x)) + N(0, (z * SENSITIVITY)^2 I_D))``. ``f`` is the key
encoder, ``z`` the noise multiplier, ``SENSITIVITY = 2`` the largest L2 distance between two
unit vectors (replace-one adjacency: one image swapped for any other). Renormalising the
noisy vector is post-processing and costs nothing.

Accounting (why not Opacus' stock ``"rdp"`` accountant)
-----------------------------------------------------
Opacus' ``RDPAccountant`` analyses the *sampled Gaussian mechanism* of DP-SGD: the noisy
SUM of the sampled gradients, where a record's presence is hidden inside the sum. Here
every sampled record gets its OWN noisy vector, so whether record ``i`` was sampled is not
hidden by anything; only the noise on its own key protects it. For one record's "slot"
the two neighbouring output distributions are

    P = (1 - q) * [not released] + q * N(f(x),  sigma^2 I)
    Q = (1 - q) * [not released] + q * N(f(x'), sigma^2 I),   ||f(x) - f(x')|| <= 2,

and, the atoms being disjoint, the Renyi divergence is exactly

    D_alpha(P || Q) = log(1 - q + q * exp(alpha (alpha - 1) / (2 z^2))) / (alpha - 1).

It is linear in ``q`` for small ``q``, whereas the sampled-Gaussian RDP is quadratic, so the
stock accountant would under-state epsilon by a large factor (tests/fedmoco/test_privacy.py
shows one round where the exact delta at Opacus' epsilon is over 100x the target delta).
:class:`KeyReleaseRDPAccountant` is an Opacus ``RDPAccountant`` (same ``history``, same
``step``, Opacus' own RDP -> (epsilon, delta) conversion) with this per-slot RDP; it is
registered with Opacus as ``"fedmoco-key-rdp"``, so :func:`calibrate_noise` still goes
through ``opacus.accountants.utils.get_noise_multiplier``. At ``q = 1`` it equals Opacus'
``"rdp"`` exactly. Slots of different images are independent and only one differs between
neighbouring data sets, so the bound holds for the whole release, whatever the data set size.

See docs/privacy.md for the threat model and what the guarantee does and does not cover.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from fedmoco.errors import ConfigError

__all__ = [
    "SENSITIVITY",
    "ACCOUNTANT",
    "KeyReleaseRDPAccountant",
    "KeyPrivacyLedger",
    "calibrate_noise",
    "key_epsilon",
    "privatize_keys",
    "poisson_sample",
    "release_keys",
    "no_dp_metrics",
    "sample_embeddings",
    "PROTOTYPE_ACCOUNTANT",
    "PrototypeRDPAccountant",
    "sampled_gaussian_rdp",
    "calibrate_prototype_noise",
    "prototype_noise_schedule",
    "prototype_history_epsilon",
    "prototype_epsilon",
    "assign_to_centres",
    "noisy_prototype_sums",
    "privatize_prototypes",
    "select_prototypes",
    "seeded_centres",
    "choose_centres",
    "merge_centres",
    "release_prototypes",
    "prototypes_from_sample",
]

#: Names of :mod:`fedmoco.accountants` (Opacus subclasses) reachable from this module too.
_ACCOUNTANT_CLASSES = ("KeyReleaseRDPAccountant", "PrototypeRDPAccountant", "_HistoryRDPAccountant")


def __getattr__(name: str) -> Any:
    """The Opacus accountant classes, imported on first use (PEP 562): the release mechanisms
    of this module must not pay for Opacus (see OPACUS_DEFAULT_ALPHAS)."""
    if name in _ACCOUNTANT_CLASSES:
        import fedmoco.accountants

        return getattr(fedmoco.accountants, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: L2 sensitivity of one unit-norm key under replace-one adjacency: ||u - v|| <= 2.
SENSITIVITY = 2.0
#: Name under which :class:`KeyReleaseRDPAccountant` is registered with Opacus.
ACCOUNTANT = "fedmoco-key-rdp"
#: Format tag of :meth:`KeyPrivacyLedger.state_dict`, checked on load.
LEDGER_FORMAT = "fedmoco-key-ledger/1"

#: ``opacus.accountants.RDPAccountant.DEFAULT_ALPHAS`` (Opacus 1.5-1.6; a test compares them), copied
#: so that the release mechanisms below load without Opacus: its package import takes 2-3 s and
#: every round of a deployed site is a fresh process. Only accounting imports it
#: (:mod:`fedmoco.accountants`), and a site's ledger plans its releases ahead (fedmoco.ledger).
OPACUS_DEFAULT_ALPHAS: list[float] = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))

# Opacus' orders plus larger ones: small epsilons at large z pick large alphas, and without
# them the conversion floors at epsilon ~ 0.1 for delta = 1e-5. More orders only tighten
# the bound (the conversion takes the minimum over orders).
ALPHAS: list[float] = OPACUS_DEFAULT_ALPHAS + [80, 96, 128, 192, 256, 384, 512, 768, 1024]


# -- accounting -----------------------------------------------------------------------------
def _slot_rdp(noise_multiplier: float, sample_rate: float, steps: int, orders: np.ndarray) -> np.ndarray:
    """RDP at each order of ``steps`` Poisson-subsampled per-record Gaussian releases.

    ``noise_multiplier`` z = sigma / SENSITIVITY (unitless), ``sample_rate`` q in (0, 1].
    """
    if noise_multiplier == 0:
        return np.full(orders.shape, np.inf)
    # log of E_Q[(P/Q)^alpha] for the Gaussian part: alpha (alpha - 1) Delta^2 / (2 sigma^2).
    x = orders * (orders - 1) / (2.0 * noise_multiplier**2)
    if sample_rate >= 1.0:
        log_moment = x
    else:  # log(1 - q + q e^x) without overflow for large alpha / small z
        log_moment = np.logaddexp(math.log1p(-sample_rate), math.log(sample_rate) + x)
    return steps * log_moment / (orders - 1)


def _is_real(x: Any) -> bool:
    # numbers.Real admits numpy scalars; bool is excluded (True is not a budget).
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and not math.isnan(x)


def _check_epsilon(epsilon: float, name: str = "epsilon") -> float:
    if not (_is_real(epsilon) and math.isfinite(epsilon) and epsilon > 0):
        raise ConfigError(f"{name}: must be a finite number > 0, got {epsilon!r}")
    return float(epsilon)


def _check_delta(delta: float) -> float:
    if not (_is_real(delta) and 0 < delta < 1):
        raise ConfigError(f"delta: must be in (0, 1), got {delta!r}")
    return float(delta)


def _check_sample_rate(sample_rate: float) -> float:
    if not (_is_real(sample_rate) and 0 < sample_rate <= 1):
        raise ConfigError(f"sample_rate: must be in (0, 1], got {sample_rate!r}")
    return float(sample_rate)


def _check_noise_multiplier(noise_multiplier: float, allow_zero: bool) -> float:
    ok = _is_real(noise_multiplier) and math.isfinite(noise_multiplier)
    ok = ok and (noise_multiplier >= 0 if allow_zero else noise_multiplier > 0)
    if not ok:
        bound = ">= 0 (0 = no DP)" if allow_zero else "> 0"
        raise ConfigError(f"noise_multiplier: must be a finite number {bound}, got {noise_multiplier!r}")
    return float(noise_multiplier)


def _check_count(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name}: must be an integer >= {minimum}, got {value!r}")
    return int(value)


def key_epsilon(noise_multiplier: float, sample_rate: float, releases: int, delta: float) -> float:
    """Epsilon of ``releases`` key releases at noise multiplier z and Poisson rate q.

    The (epsilon, delta) guarantee per image at one site (replace-one adjacency).
    Returns 0.0 for ``releases == 0`` and ``inf`` for z == 0.
    """
    _check_noise_multiplier(noise_multiplier, allow_zero=True)
    _check_sample_rate(sample_rate)
    _check_count(releases, "releases", 0)
    _check_delta(delta)
    from fedmoco.accountants import KeyReleaseRDPAccountant

    acc = KeyReleaseRDPAccountant()
    if releases:
        acc.history = [(float(noise_multiplier), float(sample_rate), int(releases))]
    return acc.get_epsilon(delta)


def calibrate_noise(epsilon: float, delta: float, rounds: int, sample_rate: float) -> float:
    """Noise multiplier z so that ``rounds`` key releases at rate q cost at most (epsilon, delta).

    Uses ``opacus.accountants.utils.get_noise_multiplier(steps=rounds)`` with this module's
    accountant (``accountant="fedmoco-key-rdp"``, see the module docstring for why not
    ``"rdp"``). The result is the smallest z found by bisection whose epsilon is <= the
    target and within 0.5 % of it. The per-coordinate noise std on a key is
    ``z * SENSITIVITY``. Raises :class:`ConfigError` naming a bad argument, or when
    epsilon is too small to reach at this delta.
    """
    epsilon = _check_epsilon(epsilon)
    delta = _check_delta(delta)
    rounds = _check_count(rounds, "rounds", 1)
    sample_rate = _check_sample_rate(sample_rate)
    from opacus.accountants.utils import get_noise_multiplier

    import fedmoco.accountants  # noqa: F401 registers ACCOUNTANT with Opacus

    try:
        return float(
            get_noise_multiplier(
                target_epsilon=epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=rounds,
                accountant=ACCOUNTANT,
                # Opacus' default is 0.01 absolute, i.e. 10 % of epsilon = 0.1: make it relative.
                epsilon_tolerance=0.005 * epsilon,
            )
        )
    except ValueError as e:  # "The privacy budget is too low."
        raise ConfigError(
            f"epsilon: {epsilon} cannot be reached with delta={delta} (no noise multiplier "
            f"up to 1e6 gets there); raise epsilon or delta ({e})"
        ) from None


# -- mechanism ------------------------------------------------------------------------------
def _add_gaussian_noise(keys: Tensor, noise_multiplier: float, generator: torch.Generator | None) -> Tensor:
    """Unit-normalised ``keys`` (n, D) plus N(0, (z * SENSITIVITY)^2) per coordinate, NOT
    renormalised; float32 or float64 on ``keys.device``. Split out so tests can check the std."""
    dtype = keys.dtype if keys.dtype == torch.float64 else torch.float32
    unit = F.normalize(keys.detach().to(dtype), dim=1)
    if noise_multiplier == 0 or unit.numel() == 0:
        return unit
    gen_device = generator.device if generator is not None else unit.device
    # Drawn on the generator's device so a seeded CPU generator gives the same noise
    # whether the keys live on CPU or GPU.
    noise = torch.randn(unit.shape, generator=generator, dtype=dtype, device=gen_device)
    return unit + noise.to(unit.device) * (noise_multiplier * SENSITIVITY)


def privatize_keys(keys: Tensor, noise_multiplier: float, generator: torch.Generator | None = None) -> Tensor:
    """Gaussian mechanism on keys: (n, D) -> (n, D) unit-norm rows, float32 (float64 kept).

    Rows are L2-normalised first (that is what bounds the sensitivity by 2; a key that is
    already unit-norm is unchanged), get i.i.d. N(0, (noise_multiplier * 2)^2) noise per
    coordinate, and are renormalised (post-processing). ``noise_multiplier == 0`` means
    explicitly NO differential privacy: the keys are only normalised. Never pass 0 to get
    "a little" privacy; use :func:`calibrate_noise`.
    """
    if keys.dim() != 2:
        raise ValueError(f"privatize_keys: expected keys of shape (n, D), got {tuple(keys.shape)}")
    if not keys.is_floating_point():
        raise ValueError(f"privatize_keys: expected floating-point keys, got {keys.dtype}")
    noise_multiplier = _check_noise_multiplier(noise_multiplier, allow_zero=True)
    return F.normalize(_add_gaussian_noise(keys, noise_multiplier, generator), dim=1)


def poisson_sample(n: int, sample_rate: float, generator: torch.Generator | None = None) -> Tensor:
    """Indices (int64, ascending, shape (m,)) of a Poisson sample of ``range(n)``.

    Each index is included independently with probability ``sample_rate``, so m is
    Binomial(n, q) and may be 0. This independence is what the accountant assumes.
    """
    n = _check_count(n, "n", 0)
    sample_rate = _check_sample_rate(sample_rate)
    mask = torch.rand(n, generator=generator) < sample_rate
    return torch.nonzero(mask, as_tuple=False).flatten()


# -- ledger ---------------------------------------------------------------------------------
class KeyPrivacyLedger:
    """Per-site record of the epsilon spent on key releases, at a fixed (z, q, delta).

    One :meth:`record_release` = one round's release (however many keys it held, even 0).
    The state is five numbers and one count, so it survives a Flower ``Context.state``
    ``ConfigRecord`` round trip exactly (:meth:`state_dict` / :meth:`load_state_dict`).
    Not for "no DP": a ledger needs ``noise_multiplier > 0``; see :func:`no_dp_metrics`.
    """

    def __init__(self, epsilon_budget: float, delta: float, noise_multiplier: float, sample_rate: float) -> None:
        self.epsilon_budget = _check_epsilon(epsilon_budget, "epsilon_budget")
        self.delta = _check_delta(delta)
        self.noise_multiplier = _check_noise_multiplier(noise_multiplier, allow_zero=False)
        self.sample_rate = _check_sample_rate(sample_rate)
        from fedmoco.accountants import KeyReleaseRDPAccountant

        self._accountant = KeyReleaseRDPAccountant()

    @property
    def releases(self) -> int:
        """Number of releases recorded so far."""
        return sum(n for _, _, n in self._accountant.history)

    def _epsilon_after(self, releases: int) -> float:
        return key_epsilon(self.noise_multiplier, self.sample_rate, releases, self.delta)

    def spent(self) -> float:
        """Epsilon spent so far at ``self.delta`` (0.0 before the first release)."""
        return self._accountant.get_epsilon(self.delta)

    def would_exceed(self) -> bool:
        """True if one more release would push epsilon above ``epsilon_budget``."""
        return self._epsilon_after(self.releases + 1) > self.epsilon_budget

    @property
    def exhausted(self) -> bool:
        """True once the budget cannot pay for another release (same as :meth:`would_exceed`)."""
        return self.would_exceed()

    def record_release(self) -> float:
        """Account one release (one accountant step); returns the new epsilon spent.

        Records even when it goes over budget: the caller decides with
        :meth:`would_exceed` before releasing, and a release that happened must be counted.
        """
        self._accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return self.spent()

    def state_dict(self) -> dict[str, Any]:
        """Plain str/int/float values (Flower ``ConfigRecord``-safe)."""
        return {
            "format": LEDGER_FORMAT,
            "epsilon_budget": self.epsilon_budget,
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "releases": self.releases,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` output; raises ConfigError if it is not one.

        Restores (epsilon_budget, delta, z, q) too: the saved ledger is the truth about
        what was spent at which noise level, even if the run's config changed since.
        """
        missing = {"format", "epsilon_budget", "delta", "noise_multiplier", "sample_rate", "releases"} - set(d)
        if missing:
            raise ConfigError(f"ledger state: missing {sorted(missing)}")
        if d["format"] != LEDGER_FORMAT:
            raise ConfigError(f"ledger state: format {d['format']!r}, expected {LEDGER_FORMAT!r}")
        fresh = KeyPrivacyLedger(d["epsilon_budget"], d["delta"], d["noise_multiplier"], d["sample_rate"])
        releases = _check_count(d["releases"], "releases", 0)
        self.epsilon_budget, self.delta = fresh.epsilon_budget, fresh.delta
        self.noise_multiplier, self.sample_rate = fresh.noise_multiplier, fresh.sample_rate
        self._accountant = fresh._accountant  # a new, empty accountant
        if releases:
            self._accountant.history = [(self.noise_multiplier, self.sample_rate, releases)]

    def to_metrics(self) -> dict[str, float]:
        """The ``dp-keys-*`` entries of the site's MetricRecord (see docs/privacy.md)."""
        return {
            "dp-keys-epsilon": float(self.spent()),
            "dp-keys-delta": float(self.delta),
            "dp-keys-releases": float(self.releases),
            "dp-keys-exhausted": 1.0 if self.exhausted else 0.0,
        }

    def __repr__(self) -> str:
        return (
            f"KeyPrivacyLedger(spent={self.spent():.4g} of {self.epsilon_budget:g}, delta={self.delta:g}, "
            f"z={self.noise_multiplier:.4g}, q={self.sample_rate:g}, releases={self.releases})"
        )


def no_dp_metrics(releases: int) -> dict[str, float]:
    """The ``dp-keys-*`` metrics of a site that releases keys WITHOUT noise (z = 0).

    Epsilon is ``inf``: there is no guarantee. ``dp-keys-exhausted`` is 0 (nothing stops it).
    """
    return {
        "dp-keys-epsilon": math.inf,
        "dp-keys-delta": 0.0,
        "dp-keys-releases": float(_check_count(releases, "releases", 0)),
        "dp-keys-exhausted": 0.0,
    }


# -- release helper -------------------------------------------------------------------------
def _image_of(item: Any) -> Tensor | None:
    """The image (C, H, W) of a dataset item: a tensor, ``(view_q, view_k)`` (first view),
    ``(image, label)``, or ``None`` for an unreadable sample."""
    if item is None:
        return None
    if isinstance(item, (tuple, list)):
        item = item[0]
    if not isinstance(item, Tensor) or item.dim() != 3:
        raise ValueError(f"release_keys: dataset items must be (C, H, W) tensors or tuples starting with one, got {type(item).__name__}")
    return item


def _owner_module(encoder: Callable[[Tensor], Tensor]) -> nn.Module | None:
    if isinstance(encoder, nn.Module):
        return encoder
    owner = getattr(encoder, "__self__", None)  # a bound method such as MoCo.encode_keys
    return owner if isinstance(owner, nn.Module) else None


def _read_alone(dataset: Dataset, index: int, seed: int) -> Any:
    """``dataset[index]`` with torch's global generator set to ``seed`` for this read only.

    A site's datasets draw every augmentation (and a satellite tile's window) from torch's
    global generator, MONAI's through a per-sample reseed from it. Read in a row, each item's
    draws would depend on how many draws the items before it took, so adding one image would
    change the views of the images after it, and the release would not be the one-image-
    sensitivity mechanism it is accounted as. With an independent seed per item, each image's
    view is a function of that image and its own fresh randomness only. The generator is
    restored afterwards: local training augments as it would without a release.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return dataset[index]


@torch.no_grad()
def _encode(
    encoder: Callable[[Tensor], Tensor], dataset: Dataset, indices: list[int], batch_size: int, device: torch.device,
    generator: torch.Generator | None = None,
) -> tuple[list[Tensor | None], int | None]:
    """Keys (D,) on CPU float32 per index (None where the sample is unreadable or its
    embedding is not finite), and D. Each item is read with its own seed from ``generator``
    (:func:`_read_alone`)."""
    out: list[Tensor | None] = [None] * len(indices)
    dim: int | None = None
    seeds = torch.randint(0, 2**62, (len(indices),), generator=generator).tolist()
    for start in range(0, len(indices), batch_size):
        chunk = range(start, min(start + batch_size, len(indices)))
        images = {j: _image_of(_read_alone(dataset, indices[j], seeds[j])) for j in chunk}
        readable = [j for j in chunk if images[j] is not None]
        if not readable:
            continue
        batch = torch.stack([images[j] for j in readable]).to(device)
        keys = encoder(batch)
        if keys.dim() != 2 or keys.shape[0] != len(readable):
            raise ValueError(f"release_keys: encoder must map (B, C, H, W) to (B, D), got {tuple(keys.shape)}")
        # A non-finite embedding (weights the server chose can overflow on one chosen image)
        # would turn its whole bucket sum into NaN, and dropping that row would tell whether
        # the image was there. It is treated as unreadable instead: left out, or the e_0
        # stand-in, each within the sensitivity of one image.
        finite = torch.isfinite(keys).all(dim=1).cpu()
        keys = F.normalize(keys.float(), dim=1).cpu()
        dim = keys.shape[1]
        for row, j in enumerate(readable):
            out[j] = keys[row] if finite[row] else None
    return out, dim


@contextlib.contextmanager
def _eval_mode(encoder: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """``eval()`` for the module behind ``encoder`` (if any), restored afterwards: BatchNorm
    in train mode would mix the batch into every embedding (no per-image sensitivity)."""
    module = _owner_module(encoder)
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    try:
        yield
    finally:
        if module is not None and was_training:
            module.train()


def _probe_dim(encoder: Callable[[Tensor], Tensor], dataset: Dataset, device: torch.device) -> int:
    with _eval_mode(encoder):
        return _probe_dim_eval(encoder, dataset, device)


def _probe_dim_eval(encoder: Callable[[Tensor], Tensor], dataset: Dataset, device: torch.device) -> int:
    # Only D, a property of the model, leaves this function; nothing data-dependent.
    for i in range(len(dataset)):
        image = _image_of(dataset[i])
        if image is not None:
            with torch.no_grad():
                return int(encoder(image.unsqueeze(0).to(device)).shape[1])
    raise ValueError("release_keys: cannot tell the key dimension (no readable image); pass key_dim")


def sample_embeddings(
    encoder: Callable[[Tensor], Tensor],
    dataset: Dataset,
    sample_rate: float,
    *,
    max_items: int | None = None,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    key_dim: int | None = None,
    unreadable: str = "stand-in",
) -> Tensor:
    """Unit embeddings (m, D) float32 on CPU of a Poisson sample (rate ``sample_rate``) of
    ``dataset``, in random order, cut to the first ``max_items`` (a uniformly random subset).

    ``encoder``: images (B, C, H, W) -> (B, D); an ``nn.Module`` (or a bound method of one)
    is put in ``eval()`` while encoding and restored afterwards, since BatchNorm in train
    mode would mix other images of the batch into each embedding and break the per-image
    sensitivity. ``unreadable``: ``"stand-in"`` releases an unreadable sampled image as the
    fixed unit vector e_0 (per-record keys: the number of keys must not depend on image
    contents), ``"drop"`` leaves it out (prototype sums: an image that contributes nothing
    is within the unit sensitivity). ``generator`` drives sampling, order and the cut.
    """
    if unreadable not in ("stand-in", "drop"):
        raise ValueError(f"unreadable: 'stand-in' or 'drop', got {unreadable!r}")
    q = _check_sample_rate(sample_rate)
    device = torch.device(device)
    with _eval_mode(encoder):
        indices = poisson_sample(len(dataset), q, generator)
        # Random order = a uniform subset when cut, and a release order unrelated to file order.
        indices = indices[torch.randperm(len(indices), generator=generator)]
        if max_items is not None:
            indices = indices[:max_items]
        rows, dim = _encode(encoder, dataset, indices.tolist(), batch_size, device, generator)
        if key_dim is not None:
            if dim is not None and dim != key_dim:
                raise ValueError(f"release: encoder gives D={dim} but key_dim={key_dim}")
            dim = key_dim
        elif dim is None:  # nothing readable was sampled (or nothing at all)
            dim = _probe_dim_eval(encoder, dataset, device)
    if unreadable == "drop":
        rows = [r for r in rows if r is not None]
    stand_in = torch.zeros(dim)
    stand_in[0] = 1.0
    return torch.stack([r if r is not None else stand_in for r in rows]) if rows else torch.zeros(0, dim)


def release_keys(
    encoder: Callable[[Tensor], Tensor],
    dataset: Dataset,
    ledger: KeyPrivacyLedger | None,
    *,
    noise_multiplier: float | None = None,
    sample_rate: float | None = None,
    max_keys: int | None = None,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    key_dim: int | None = None,
) -> tuple[Tensor, str | None]:
    """One round's key release of a site: ``(keys (n, D) float32 on CPU, None)``, or
    ``(empty (0, D), reason)`` when the privacy budget cannot pay for it.

    ``encoder``: images (B, C, H, W) -> keys (B, D), e.g. ``moco.encode_keys``. When it
    is an ``nn.Module`` or a bound method of one, that module is put in ``eval()`` for the
    encoding and restored afterwards: in train mode BatchNorm would mix the statistics of
    the batch into every key, so one image would move other images' keys and the
    per-key sensitivity of 2 would not hold. A plain callable must itself be per-sample.
    ``dataset[i]``: an image (C, H, W), a view pair (first view used), an (image, label)
    pair, or None (unreadable). An unreadable sampled image is released as a fixed
    stand-in unit vector (e_0) plus the same noise rather than dropped: dropping would make
    the number of released keys depend on the image's content.
    ``noise_multiplier`` / ``sample_rate`` default to the ledger's and must match it.
    ``ledger=None`` is allowed only with ``noise_multiplier=0``: the explicit no-DP mode.

    ``generator`` (a CPU ``torch.Generator``) drives sampling, subset, order and noise.
    ``key_dim`` (D) saves one forward pass when the budget is exhausted.

    Steps: Poisson-sample indices at rate q; shuffle them; keep the first ``max_keys``
    (a uniformly random subset); encode under ``torch.no_grad`` in batches of
    ``batch_size`` on ``device``; privatise; ``ledger.record_release()``. A round in
    which no image was sampled still counts as a release (an empty one).

    Why the ``max_keys`` cap is sound: the subset is drawn with the generator only, from
    the number of sampled indices (which does not depend on image contents), so the
    choice of which images are released is independent of the data and each image is
    still released with probability <= q. The accountant's bound for one image's slot,
    log(1 - q' + q' e^x) / (alpha - 1), depends only on that probability q' and grows with
    it, so q bounds the cost. (An order- or content-based cut, e.g. "first max_keys" of a
    sorted or filtered list, would NOT be covered.) Cutting before encoding rather than
    sub-sampling the noisy keys afterwards gives the same guarantee and skips needless
    forward passes. The shuffle also keeps the release order unrelated to file order.
    """
    if ledger is None:
        if noise_multiplier is None or noise_multiplier != 0:
            raise ConfigError(
                "noise_multiplier: a KeyPrivacyLedger is required unless noise_multiplier is 0 (explicit no-DP mode)"
            )
        if sample_rate is None:
            raise ConfigError("sample_rate: required when no ledger is given")
        z, q = 0.0, _check_sample_rate(sample_rate)
    else:
        z = ledger.noise_multiplier if noise_multiplier is None else _check_noise_multiplier(noise_multiplier, True)
        q = ledger.sample_rate if sample_rate is None else _check_sample_rate(sample_rate)
        if (z, q) != (ledger.noise_multiplier, ledger.sample_rate):
            raise ConfigError(
                f"noise_multiplier/sample_rate: ({z}, {q}) differ from the ledger's "
                f"({ledger.noise_multiplier}, {ledger.sample_rate}); the ledger would account the wrong release"
            )
    if max_keys is not None:
        max_keys = _check_count(max_keys, "max_keys", 1)
    batch_size = _check_count(batch_size, "batch_size", 1)
    if key_dim is not None:
        key_dim = _check_count(key_dim, "key_dim", 1)
    device = torch.device(device)

    if ledger is not None and ledger.would_exceed():
        dim = key_dim if key_dim is not None else _probe_dim(encoder, dataset, device)
        reason = f"privacy budget exhausted: spent eps={ledger.spent():.4g} of {ledger.epsilon_budget:g} (delta={ledger.delta:g})"
        return torch.zeros(0, dim), reason
    clean = sample_embeddings(encoder, dataset, q, max_items=max_keys, batch_size=batch_size, device=device,
                              generator=generator, key_dim=key_dim, unreadable="stand-in")
    keys = privatize_keys(clean, z, generator)
    if ledger is not None:
        ledger.record_release()
    return keys, None


# -- DP prototypes: noisy per-centre sums ----------------------------------------------------
#: Name under which :class:`PrototypeRDPAccountant` is registered with Opacus.
PROTOTYPE_ACCOUNTANT = "fedmoco-prototype-rdp"
# The integer orders among ALPHAS: Opacus' default integer orders (2-63) and the larger ones the
# keys' accountant adds. Without those, epsilons up to 0.103 at delta 1e-5 could not be reached
# at any noise (the conversion floors near log(1/delta) / (alpha_max - 1)) and a site asking for
# one was told its budget was exhausted. Every order gives a valid bound (the conversion takes
# the minimum), so adding orders only tightens it; dropping Opacus' fractional ones only loosens.
PROTOTYPE_ORDERS = np.array([a for a in ALPHAS if float(a).is_integer()], dtype=float)


def sampled_gaussian_rdp(noise_multiplier: float, sample_rate: float, steps: int, orders: np.ndarray) -> np.ndarray:
    """RDP of ``steps`` Poisson-subsampled Gaussian SUM releases at integer ``orders``
    (add/remove adjacency, sensitivity 1): Mironov, Talwar & Zhang (2019), the formula of
    Opacus' ``_compute_log_a_int``, vectorised. Opacus' own loop over its fractional orders
    takes 0.3-3 s per evaluation at q < 1, too slow for a ledger that plans every round."""
    z = noise_multiplier
    if z == 0:
        return np.full(orders.shape, np.inf)
    if sample_rate >= 1.0:
        return steps * orders / (2 * z**2)
    from scipy import special  # accounting only: the release mechanisms need no scipy

    out = np.empty(len(orders))
    log_q, log_1mq = math.log(sample_rate), math.log1p(-sample_rate)
    for j, a in enumerate(orders.astype(int)):
        k = np.arange(a + 1, dtype=float)
        terms = (special.gammaln(a + 1) - special.gammaln(k + 1) - special.gammaln(a - k + 1)
                 + k * log_q + (a - k) * log_1mq + (k * k - k) / (2 * z**2))
        out[j] = special.logsumexp(terms) / (a - 1)
    return steps * out


def calibrate_prototype_noise(epsilon: float, delta: float, rounds: int, sample_rate: float) -> float:
    """Noise multiplier z so that ``rounds`` prototype releases at Poisson rate q cost at most
    (epsilon, delta) under add/remove-one-image adjacency.

    A release is the subsampled Gaussian SUM mechanism with L2 sensitivity 1 (one image moves
    one centre's sum by at most a unit vector), the mechanism Opacus' stock ``"rdp"``
    accountant analyses. ``get_noise_multiplier(steps=rounds)`` with
    :class:`PrototypeRDPAccountant` (same analysis, integer orders 2-1024) and a relative
    tolerance: by the stock accountant the result spends between 0.9 and 1.0 times epsilon
    (tests). The per-coordinate noise std on each sum is z itself (sensitivity 1). Raises
    ConfigError naming a bad argument, or when epsilon cannot be reached at this delta.
    """
    epsilon = _check_epsilon(epsilon)
    delta = _check_delta(delta)
    rounds = _check_count(rounds, "rounds", 1)
    sample_rate = _check_sample_rate(sample_rate)
    from opacus.accountants.utils import get_noise_multiplier

    import fedmoco.accountants  # noqa: F401 registers PROTOTYPE_ACCOUNTANT with Opacus

    try:
        return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=rounds, accountant=PROTOTYPE_ACCOUNTANT,
                                          epsilon_tolerance=0.005 * epsilon))
    except ValueError as e:  # "The privacy budget is too low."
        raise ConfigError(f"epsilon: {epsilon} cannot be reached with delta={delta} for {rounds} prototype "
                          f"release(s); raise epsilon or delta ({e})") from None


#: The largest ``prototype-first-share``: a share of 1e14 planned later releases at z ~ 2e7,
#: past what the ledger reads back as a release's noise, which locked a site out of its own
#: ledger; 1.7e308 overflowed z**2 and failed every site's round. 100 already spends nearly
#: the whole budget on the first release.
MAX_FIRST_SHARE = 100.0


def check_first_share(first_share: float) -> float:
    """``prototype-first-share`` as a float >= 1 (finite); ConfigError naming it otherwise."""
    if not (isinstance(first_share, numbers.Real) and 1.0 <= first_share <= MAX_FIRST_SHARE):
        raise ConfigError(f"prototype-first-share must be a number in [1, {MAX_FIRST_SHARE:g}], got {first_share!r}")
    return float(first_share)


def prototype_history_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Epsilon (add/remove adjacency, at ``delta``) of prototype releases made at
    ``history`` = [(z, q, releases), ...] (:class:`PrototypeRDPAccountant`); ``inf`` if any
    of them had z == 0, 0.0 for none."""
    history = [h for h in history if h[2] > 0]
    if not history:
        return 0.0
    if min(z for z, _, _ in history) == 0:
        return math.inf
    from fedmoco.accountants import PrototypeRDPAccountant

    acc = PrototypeRDPAccountant()
    acc.history = list(history)
    return float(acc.get_epsilon(delta))  # its conversion drops the "Optimal order" warning


def prototype_noise_schedule(epsilon: float, delta: float, rounds: int, sample_rate: float,
                             first_share: float = 1.0) -> tuple[float, float]:
    """Noise multipliers (z_first, z_rest) for ``rounds`` prototype releases whose first gets
    ``first_share`` times the privacy of each later one: z_rest = z_first * sqrt(first_share).

    Why: a site's first release is bucketed by seeded public directions, which cut diffuse
    embeddings into short bucket means; later releases use the server's merged centres and
    have signal to spare (benchmarks/results/prototype_signal.md). For the Gaussian mechanism
    RDP is alpha / (2 z^2) per release, so at q = 1 a share s spends s times a later release's
    RDP on the first; at q < 1 the same ratio of z is kept and the accountant does the rest.
    Together the releases cost at most (epsilon, delta) by :class:`PrototypeRDPAccountant`
    (between 0.9 and 1.0 times epsilon, tests). ``first_share`` 1 (or one round) gives
    ``calibrate_prototype_noise`` for both. Raises ConfigError naming a bad argument.
    """
    first_share = check_first_share(first_share)
    z = calibrate_prototype_noise(epsilon, delta, rounds, sample_rate)
    if rounds == 1 or first_share == 1.0:
        return z, z
    q, root = float(sample_rate), math.sqrt(first_share)

    def spent(z_first: float) -> float:
        return prototype_history_epsilon([(z_first, q, 1), (z_first * root, q, rounds - 1)], delta)

    # Bisection on z_first as in Opacus' get_noise_multiplier: the uniform z is an upper bound
    # (every later release is noisier than it), z / sqrt(first_share) a lower one.
    lo, hi = z / root, z
    while hi - lo > 1e-4 * hi:
        mid = (lo + hi) / 2
        if spent(mid) <= epsilon:
            hi = mid
        else:
            lo = mid
    return hi, hi * root


def prototype_epsilon(noise_multiplier: float, sample_rate: float, releases: int, delta: float) -> float:
    """Epsilon (add/remove adjacency, at ``delta``) of ``releases`` prototype releases
    (:class:`PrototypeRDPAccountant`). 0.0 for no release, ``inf`` for z == 0."""
    z = _check_noise_multiplier(noise_multiplier, allow_zero=True)
    q = _check_sample_rate(sample_rate)
    releases = _check_count(releases, "releases", 0)
    delta = _check_delta(delta)
    return prototype_history_epsilon([(z, q, releases)], delta)


def _check_rows(x: Tensor, name: str, dim: int | None = None) -> Tensor:
    if x.dim() != 2 or (dim is not None and x.shape[1] != dim) or not x.is_floating_point():
        want = f"(n, {dim})" if dim is not None else "(n, D)"
        raise ValueError(f"{name}: expected a floating-point tensor of shape {want}, got {tuple(x.shape)} {x.dtype}")
    return x


def assign_to_centres(embeddings: Tensor, centres: Tensor) -> Tensor:
    """Index (n,) int64 of the centre with the largest cosine for each embedding (n, D).

    The partition is sound only when ``centres`` (C, D) do not depend on the data being
    released (public seed, earlier DP releases): see docs/privacy.md.
    """
    _check_rows(centres, "centres")
    _check_rows(embeddings, "embeddings", centres.shape[1])
    if len(centres) == 0:
        raise ValueError("centres: need at least one centre")
    if len(embeddings) == 0:
        return torch.zeros(0, dtype=torch.long)
    return (F.normalize(embeddings.float(), dim=1) @ F.normalize(centres.float(), dim=1).T).argmax(dim=1)


def noisy_prototype_sums(embeddings: Tensor, centres: Tensor, noise_multiplier: float,
                         generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """The Gaussian sum mechanism over ALL C centres: ``(noisy sums (C, D) float32, counts (C,))``.

    Each embedding is L2-normalised (what bounds its contribution by 1), added to the sum
    of its nearest centre, and every coordinate of every sum gets N(0, z^2): an empty
    centre's row is pure noise. ``counts`` are EXACT and must never be released; they are
    returned for measurement only. ``noise_multiplier == 0`` = no DP (exact sums).
    """
    z = _check_noise_multiplier(noise_multiplier, allow_zero=True)
    embeddings, centres = embeddings.detach().cpu(), centres.detach().cpu()  # the sums and noise live on the CPU
    _check_rows(embeddings, "embeddings", centres.shape[1])
    bad = int((~torch.isfinite(embeddings).all(dim=1)).sum())
    if bad:  # its centre's whole sum would be NaN, and dropping that row would tell the row was there
        raise ValueError(f"embeddings: {bad} row(s) are not finite; the sensitivity bound holds for finite rows only "
                         "(a site's release leaves such images out)")
    owner = assign_to_centres(embeddings, centres)
    unit = F.normalize(embeddings.float(), dim=1)
    sums = torch.zeros(centres.shape[0], centres.shape[1]).index_add_(0, owner, unit)
    counts = torch.bincount(owner, minlength=centres.shape[0])
    if z > 0:
        sums = sums + torch.randn(sums.shape, generator=generator) * z
    return sums, counts


def privatize_prototypes(embeddings: Tensor, centres: Tensor, noise_multiplier: float,
                         generator: torch.Generator | None = None) -> Tensor:
    """Assign + sum + noise + normalise: (n, D) unit rows, (C, D) centres -> (C', D) unit rows.

    One row per centre that received at least one embedding, in centre order, before any
    threshold: ``normalize(sum of its embeddings + N(0, z^2 I_D))``. The noise is drawn for
    all C centres, so with the same generator state these rows equal the corresponding
    rows of :func:`noisy_prototype_sums` / :func:`release_prototypes`. Note that WHICH rows
    come back depends on the exact counts: a site never releases this selection; it
    releases :func:`select_prototypes` of all C noisy sums (docs/privacy.md).
    """
    sums, counts = noisy_prototype_sums(embeddings, centres, noise_multiplier, generator)
    return F.normalize(sums[counts > 0], dim=1)


def select_prototypes(noisy_sums: Tensor, noise_multiplier: float, dim_noise: int | None = None,
                      min_cosine: float = 0.5) -> Tensor:
    """Post-processing of noisy sums (C, D): keep the rows whose estimated cosine with their
    noise-free sum is at least ``min_cosine``, normalised: (P, D) unit rows, P <= C.

    ||s + n||^2 has expectation ||s||^2 + z^2 D, so sqrt(max(||v||^2 - z^2 D, 0)) / ||v||
    estimates the cosine from the noisy row alone (no exact count is used). With z == 0
    (no DP) only the empty (zero) rows are dropped.
    """
    _check_rows(noisy_sums, "noisy_sums")
    z = _check_noise_multiplier(noise_multiplier, allow_zero=True)
    d = noisy_sums.shape[1] if dim_noise is None else int(dim_noise)
    sq = noisy_sums.double().pow(2).sum(dim=1)
    if z == 0:
        keep = sq > 0
    else:
        est = (sq - z * z * d).clamp_min(0).sqrt() / sq.sqrt().clamp_min(1e-30)
        keep = est >= min_cosine
    return F.normalize(noisy_sums[keep].float(), dim=1)


def seeded_centres(count: int, dim: int, seed: int) -> Tensor:
    """``count`` directions (count, dim), uniform on the sphere from a public ``seed``."""
    g = torch.Generator().manual_seed(int(seed) % (2**63))
    return F.normalize(torch.randn(_check_count(count, "count", 1), _check_count(dim, "dim", 1), generator=g), dim=1)


def choose_centres(received: Tensor | None, count: int, dim: int, seed: int) -> Tensor:
    """C public centres (count, dim): a spread-out subset of the prototypes the server sent
    (farthest-point: each next one least similar to those chosen), filled up with
    :func:`seeded_centres`. Depends only on public inputs, never on this site's data."""
    seeded = seeded_centres(count, dim, seed)
    if received is None or len(received) == 0:
        return seeded
    pool = F.normalize(_check_rows(received, "received", dim).float(), dim=1)
    chosen = [0]
    best = pool @ pool[0]  # largest cosine of each row with the chosen set
    while len(chosen) < min(count, len(pool)):
        nxt = int(best.argmin())
        if best[nxt] >= 1 - 1e-6:  # only duplicates left
            break
        chosen.append(nxt)
        best = torch.maximum(best, pool @ pool[nxt])
    return torch.cat([pool[chosen], seeded[: count - len(chosen)]])


def merge_centres(prototypes: Tensor, count: int, weights: Tensor | None = None, *, iterations: int = 25,
                  restarts: int = 4, seed: int = 0) -> Tensor:
    """Merge released prototypes (M, D) into at most ``count`` unit centres (k, D), float32.

    Weighted spherical k-means: ``restarts`` k-means++ starts (drawn from a generator seeded
    with the public ``seed``), each followed by up to ``iterations`` Lloyd steps that assign
    every row to its most similar centre, exactly as a site assigns its embeddings
    (:func:`assign_to_centres`), and set each centre to the normalised weighted sum of its
    rows; the start with the least weighted loss sum w (1 - cos) wins (one stray prototype
    then does not take a centre from two real clusters). ``weights`` (M,) >= 0, default all
    1; rows of weight 0 are ignored. The same input and seed give the same centres. k <
    ``count`` only when fewer distinct rows carry weight; sites top them up with seeded
    directions (:func:`choose_centres`).

    Used by the server on the prototypes the sites RELEASED (post-processing of DP outputs),
    so centres built from it are public: released prototypes point at the bucket means of the
    partition they were released on, and Lloyd's iteration carried over rounds moves the
    centres towards the data's clusters, which raises each bucket's resultant length
    (docs/privacy.md). Hand-written rather than scikit-learn's KMeans: that one is Euclidean
    with unnormalised centroids, while the site's partition is by cosine.
    """
    pool = _check_rows(prototypes, "prototypes").detach().float().cpu()
    count = _check_count(count, "count", 1)
    w = torch.ones(len(pool)) if weights is None else weights.detach().float().cpu().reshape(-1)
    if w.shape[0] != len(pool) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"weights: expected {len(pool)} finite values >= 0, got shape {tuple(w.shape)}")
    keep = (w > 0) & (pool.norm(dim=1) > 0)
    pool, w = F.normalize(pool[keep], dim=1), w[keep] / w[keep].sum().clamp_min(1e-30)
    if len(pool) == 0:
        return torch.zeros(0, prototypes.shape[1])
    g = torch.Generator().manual_seed(int(seed) % (2**63))
    best, best_loss = pool[:0], math.inf
    for _ in range(_check_count(restarts, "restarts", 1)):
        centres = _kmeans_pp(pool, w, count, g)
        for _ in range(int(iterations)):
            owner = (pool @ centres.T).argmax(dim=1)
            sums = torch.zeros_like(centres).index_add_(0, owner, pool * w[:, None])
            empty = sums.norm(dim=1) == 0  # a centre that lost every row keeps its place
            sums[empty] = centres[empty]
            moved = F.normalize(sums, dim=1)
            if torch.equal(moved, centres):
                break
            centres = moved
        loss = float((w * (1 - (pool @ centres.T).max(dim=1).values)).sum())
        if loss < best_loss - 1e-9:
            best, best_loss = centres, loss
    return best


def _kmeans_pp(pool: Tensor, w: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding on unit rows: each next centre drawn with probability proportional to
    weight x squared distance to the nearest chosen one; stops early when only copies are left."""
    chosen = [int(torch.multinomial(w, 1, generator=generator))]
    near = pool @ pool[chosen[0]]  # largest cosine of each row with the chosen set
    while len(chosen) < count:
        p = w * (2 - 2 * near).clamp_min(0)
        if float(p.sum()) <= 1e-12:
            break
        chosen.append(int(torch.multinomial(p, 1, generator=generator)))
        near = torch.maximum(near, pool @ pool[chosen[-1]])
    return pool[chosen]


def release_prototypes(
    encoder: Callable[[Tensor], Tensor],
    dataset: Dataset,
    centres: Tensor,
    noise_multiplier: float,
    sample_rate: float,
    *,
    min_cosine: float = 0.5,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """One round's prototype release: (P, D) float32 unit rows on CPU, P <= C.

    Poisson sample at rate q, embed with ``encoder`` (must be PUBLIC at release time: the
    global weights received this round), L2-normalise, sum per public centre, add
    N(0, z^2) per coordinate (:func:`noisy_prototype_sums`), keep rows by their noisy
    norm (:func:`select_prototypes`) and normalise. Unreadable images are left out. The
    caller accounts the release (one step of the subsampled Gaussian at (z, q)).
    """
    dim = _check_rows(centres, "centres").shape[1]
    emb = sample_embeddings(encoder, dataset, sample_rate, batch_size=batch_size, device=device,
                            generator=generator, key_dim=dim, unreadable="drop")
    return prototypes_from_sample(emb, centres, noise_multiplier, min_cosine=min_cosine, generator=generator)


def prototypes_from_sample(sample: Tensor, centres: Tensor, noise_multiplier: float, *, min_cosine: float = 0.5,
                           generator: torch.Generator | None = None) -> Tensor:
    """The release from an already drawn sample of embeddings (m, D): noisy sums over all C
    centres, kept by noisy norm, normalised -> (P, D). :func:`release_prototypes` after
    encoding; the privacy audit calls it on embeddings directly."""
    sums, _ = noisy_prototype_sums(sample, centres, noise_multiplier, generator)
    return select_prototypes(sums, noise_multiplier, min_cosine=min_cosine)
