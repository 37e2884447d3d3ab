"""A site's privacy budget across rounds, runs and restarts: what was spent, and what is left.

:class:`SiteLedger` is the accounting only (plain values in, plain values out); the file
it lives in, its lock and its atomic writes are ``clients.ledger``. One ledger holds one
release mechanism, because the two are stated under different adjacencies:

``prototypes``  noisy per-centre sums; add/remove one record; the subsampled Gaussian sum
                mechanism (sensitivity 1), Opacus' stock RDP analysis at its integer
                orders (``fedmoco.privacy.PrototypeRDPAccountant``).
``keys``        one noisy key per sampled record; replace-one record; the exact per-slot
                accountant ``fedmoco-key-rdp`` of :mod:`fedmoco.privacy`.

The budget is planned over ``planned_releases`` releases (node_config ``dp-rounds``, else
the ``num-server-rounds`` of the run that opened the ledger), across runs. Before each
round the site asks :meth:`SiteLedger.next_noise` for the noise with which the releases
still planned fit in what is left (the same z every round unless the budget was tightened,
the plan changed or q changed) and spends before it releases (:meth:`record`), so a crash
between the two can only over-count. Each release is one ``(z, q, 1)`` step in an
Opacus-style history, so releases at different noise levels compose exactly in RDP. Once
the planned releases are made, or the next one no longer fits, the ledger is exhausted:
without a plan, any leftover epsilon would "fit" one more release at an enormous z, i.e.
pure noise sent for nothing.

``DP_STATUS`` are the codes of the ``dp-status`` metric a site reports every round, so
the coordinator learns why a site sent no summaries without any free text in the reply.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from types import ModuleType
from typing import Any

from fedmoco.errors import ConfigError
from fedmoco.site_settings import MAX_PLANNED_RELEASES

log = logging.getLogger(__name__)


def _privacy() -> ModuleType:
    """fedmoco.privacy, imported on first use. It imports Opacus, whose package pulls in
    DP-SGD, scipy.stats and torch.distributed (2-3 s on a busy 2-core box); every round of a
    deployed site is a fresh process, and a site that releases nothing (key-release=none, no
    budget) only needs DP_STATUS and no_ledger_metrics. (Not importlib's LazyLoader: torch
    walks sys.modules and would trigger it anyway.)"""
    import fedmoco.privacy

    return fedmoco.privacy


LEDGER_FORMAT = "fedmoco-privacy-ledger/2"
#: The per-record ledger of an older fedmoco, carried over by :func:`read_ledger`.
LEGACY_LEDGER_FILE = "key-ledger.pt"
#: The adjacency of each mechanism's guarantee; a record is an image file, a DICOM file or a
#: raster (docs/privacy.md, "What one record is").
MECHANISMS = {"prototypes": "add/remove one record", "keys": "replace one record"}
#: Largest delta a site may state (and it must also be below 1 / its number of images).
MAX_DELTA = 1e-3

#: ``dp-status`` metric: code -> why (the server logs and records the text).
DP_STATUS: dict[int, str] = {
    0: "released under the site's differential-privacy budget",
    1: "released WITHOUT noise (dp-epsilon=inf): not private, for benchmarks only",
    2: "nothing to release: run_config key-release=none",
    3: "sharing refused: no persistent ledger (set ledger-path or state-dir, in node_config or fedmoco-site.toml)",
    4: "sharing refused: no budget (set dp-epsilon, in node_config or fedmoco-site.toml)",
    5: "privacy budget exhausted",
    6: "sharing refused: the ledger was started for another key-release mode",
    7: "sharing refused: the privacy ledger could not be read or written",
    8: "sharing refused: dp-epsilon=inf (no noise) would release past a ledger that records this site's budget",
    9: "sharing refused: one record of this site's data would move more than one summary (the site's log says why)",
}


def check_site_delta(delta: float, n_images: int, where: str = "node_config dp-delta") -> float:
    """A site's delta: in (0, MAX_DELTA] and below 1 / n_images (else one image may leak
    with probability delta and still 'satisfy' the guarantee). ConfigError naming ``where``
    (node_config's key, or the site's settings file and key)."""
    try:
        delta = _privacy()._check_delta(delta)
    except ConfigError:
        raise ConfigError(f"{where}: must be in (0, {MAX_DELTA:g}], got {delta!r}") from None
    if delta > MAX_DELTA:
        raise ConfigError(f"{where}: must be in (0, {MAX_DELTA:g}], got {delta:g} (e.g. 1e-5)")
    if delta >= 1.0 / max(n_images, 1):
        raise ConfigError(f"{where}: {delta:g} is too large for {n_images} images; it must be "
                          f"below one over the number of images (e.g. 1e-5)")
    return delta


class SiteLedger:
    """Budget (epsilon, delta) of one mechanism, and the history of releases paid from it."""

    def __init__(self, mechanism: str, epsilon_budget: float, delta: float, planned_releases: int,
                 history: list[tuple[float, float, int]] | None = None, plan: dict[str, Any] | None = None) -> None:
        if mechanism not in MECHANISMS:
            raise ConfigError(f"ledger mechanism: {mechanism!r}, expected one of {sorted(MECHANISMS)}")
        self.mechanism = mechanism
        self.epsilon_budget = _privacy()._check_epsilon(epsilon_budget, "epsilon_budget")
        self.delta = _privacy()._check_delta(delta)
        self.planned_releases = _planned(planned_releases)
        self.history = [(_recorded_noise(z), _privacy()._check_sample_rate(q), _privacy()._check_count(n, "releases", 1))
                        for z, q, n in (history or [])]
        #: The releases planned ahead and the epsilon after each (see :meth:`next_noise`).
        self.plan = _checked_plan(plan)

    @property
    def adjacency(self) -> str:
        return MECHANISMS[self.mechanism]

    @property
    def releases(self) -> int:
        return sum(n for _, _, n in self.history)

    def _accountant(self, history: list[tuple[float, float, int]]) -> Any:
        """This mechanism's Opacus accountant (fedmoco.accountants) holding ``history``."""
        privacy = _privacy()
        acc = privacy.PrototypeRDPAccountant() if self.mechanism == "prototypes" else privacy.KeyReleaseRDPAccountant()
        acc.history = list(history)
        return acc

    def _epsilon(self, history: list[tuple[float, float, int]]) -> float:
        if not history:
            return 0.0
        # the accountants' conversion (fedmoco.accountants._convert) already drops Opacus'
        # "Optimal order is the largest alpha" warning
        return float(self._accountant(history).get_epsilon(self.delta))

    def spent(self) -> float:
        """Epsilon spent so far, at ``self.delta``, under ``self.adjacency``: read from the plan
        while the history follows it, else computed by the accountant."""
        k = self._plan_offset()
        if k is not None and self.plan["delta"] == self.delta:
            return self.plan["epsilon"][k]
        return self._epsilon(self.history)

    def _plan_offset(self) -> int | None:
        """How many of the plan's releases the history holds (the history being exactly the
        plan's base and then those releases), or None when the history left the plan."""
        if self.plan is None:
            return None
        q, base = self.plan["sample_rate"], [tuple(h) for h in self.plan["base"]]
        k = self.releases - sum(n for _, _, n in base)  # the only candidate: one comparison, not one per k
        if not 0 <= k <= len(self.plan["noise"]):
            return None
        return k if _compress(base + [(z, q, 1) for z in self.plan["noise"][:k]]) == self.history else None

    @property
    def remaining(self) -> int:
        """Releases still planned."""
        return max(self.planned_releases - self.releases, 0)

    def next_noise(self, sample_rate: float, first_share: float = 1.0) -> float | None:
        """The smallest noise multiplier z (to 0.5 % of epsilon) with which the remaining
        planned releases at rate q fit in the budget; None when the ledger is exhausted.

        ``first_share`` (prototypes only, run_config ``prototype-first-share``): the ledger's
        first release gets that many times the privacy of each later one
        (:func:`fedmoco.privacy.prototype_noise_schedule`); the later ones then share what is
        left evenly, as without it. It moves budget between releases, never adds to it."""
        q = _privacy()._check_sample_rate(sample_rate)
        if not self.remaining:
            return None
        share = _privacy().check_first_share(first_share)
        k = self._plan_offset() if self._plan_holds(q, share) else None
        if k is None:
            self._make_plan(q, share)
            k = 0
        noise = self.plan["noise"]
        return noise[k] if k < len(noise) else None

    def _plan_holds(self, q: float, share: float) -> bool:
        """Whether the saved plan was made for this budget, delta, number of releases and q
        (and, before a ledger's first release, for this first share)."""
        p = self.plan
        if p is None or (p["epsilon_budget"], p["delta"], p["planned_releases"], p["sample_rate"]) != (
                self.epsilon_budget, self.delta, self.planned_releases, q):
            return False
        return bool(self.history) or p["first_share"] == share

    def _make_plan(self, q: float, share: float) -> None:
        """Plan the remaining releases and price each prefix of them (the accountant's work,
        which imports Opacus: once per plan, not once per round).

        Why a plan: every round of a deployed site is a fresh process, and pricing a round
        from scratch costs the Opacus import (2-5 s, benchmarks/results/round_overhead.md),
        more than the rest of a round's fixed cost. With the plan in the ledger file, a round
        that follows it reads its z and the epsilon after it. A tightened budget, a new delta,
        a new number of planned releases or a new q makes a new plan on top of the history."""
        base, remaining = list(self.history), self.remaining
        if not base and self.mechanism == "prototypes" and share != 1.0 and remaining > 1:
            try:
                first, rest = _privacy().prototype_noise_schedule(self.epsilon_budget, self.delta, remaining, q,
                                                                  share)
                noise = [first] + [rest] * (remaining - 1)
            except ConfigError as exc:  # the budget cannot be reached at this delta, as in _fit
                _unreachable(exc)
                noise = []
        else:
            z = self._fit(remaining, q)
            noise = [] if z is None else [z] * remaining
        epsilon = self._accountant(base).epsilons_after([(z, q) for z in noise], self.delta)
        self.plan = {"epsilon_budget": self.epsilon_budget, "delta": self.delta,
                     "planned_releases": self.planned_releases, "sample_rate": q, "first_share": share,
                     "base": [list(h) for h in base], "noise": noise, "epsilon": epsilon}

    def _fit(self, rounds: int, q: float) -> float | None:
        if not self.history:
            calibrate = (_privacy().calibrate_prototype_noise if self.mechanism == "prototypes"
                         else _privacy().calibrate_noise)
            try:
                return calibrate(self.epsilon_budget, self.delta, rounds, q)
            except ConfigError as exc:
                _unreachable(exc)
                return None
        # Same bisection as Opacus' get_noise_multiplier, on top of what was already spent.
        fits = lambda z: self._epsilon(self.history + [(z, q, rounds)]) <= self.epsilon_budget  # noqa: E731
        hi = 10.0
        while not fits(hi):
            hi *= 2
            if hi > 1e6:
                return None
        lo = 0.0
        while self.epsilon_budget - self._epsilon(self.history + [(hi, q, rounds)]) > 0.005 * self.epsilon_budget:
            mid = (lo + hi) / 2
            if fits(mid):
                hi = mid
            else:
                lo = mid
            if hi - lo < 1e-6 * hi:
                break
        return hi

    def record(self, noise_multiplier: float, sample_rate: float) -> float:
        """Account one release at (z, q); returns epsilon spent after it."""
        z, q = _privacy()._check_noise_multiplier(noise_multiplier, False), _privacy()._check_sample_rate(sample_rate)
        self.history = _compress(self.history + [(z, q, 1)])
        return self.spent()

    def replan(self, planned_releases: int) -> list[str]:
        """Set the number of planned releases (node_config ``dp-rounds``): the site's choice of
        how to spread its budget. It changes the noise, never the budget."""
        planned_releases = _planned(planned_releases)
        if planned_releases == self.planned_releases:
            return []
        note = f"planned releases {self.planned_releases} -> {planned_releases} (dp-rounds)"
        self.planned_releases = planned_releases
        return [note]

    def tighten(self, epsilon: float, delta: float) -> list[str]:
        """Lower the budget to (epsilon, delta) where that is tighter; never loosen.
        Returns what changed / what was refused, one line each, for the site's log."""
        notes = []
        epsilon, delta = _privacy()._check_epsilon(epsilon, "dp-epsilon"), _privacy()._check_delta(delta)
        if epsilon < self.epsilon_budget:
            notes.append(f"budget tightened: epsilon {self.epsilon_budget:g} -> {epsilon:g}")
            self.epsilon_budget = epsilon
        elif epsilon > self.epsilon_budget:
            notes.append(f"dp-epsilon {epsilon:g} ignored: the ledger's budget {self.epsilon_budget:g} is never loosened")
        if delta < self.delta:
            notes.append(f"budget tightened: delta {self.delta:g} -> {delta:g}")
            self.delta = delta
        elif delta > self.delta:
            notes.append(f"dp-delta {delta:g} ignored: the ledger's delta {self.delta:g} is never loosened")
        return notes

    def to_metrics(self, exhausted: bool) -> dict[str, float]:
        """``dp-keys-*`` entries of the reply (values of the ledger, not of the images)."""
        return {"dp-keys-epsilon": self.spent(), "dp-keys-delta": self.delta,
                "dp-keys-releases": float(self.releases), "dp-keys-exhausted": 1.0 if exhausted else 0.0,
                "dp-keys-budget": self.epsilon_budget}

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe plain values."""
        return {"format": LEDGER_FORMAT, "mechanism": self.mechanism, "adjacency": self.adjacency,
                "epsilon_budget": self.epsilon_budget, "delta": self.delta,
                "planned_releases": self.planned_releases, "history": [{"noise_multiplier": z, "sample_rate": q, "releases": n} for z, q, n in self.history],
                "epsilon_spent": self.spent(), **({"plan": self.plan} if self.plan is not None else {})}

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> "SiteLedger":
        """Inverse of :meth:`state_dict`; ConfigError if ``d`` is not one."""
        if not isinstance(d, dict) or d.get("format") != LEDGER_FORMAT:
            raise ConfigError(f"ledger: format {d.get('format') if isinstance(d, dict) else type(d).__name__!r}, "
                              f"expected {LEDGER_FORMAT!r}")
        try:
            history = [(_real(h["noise_multiplier"], "noise_multiplier"), _real(h["sample_rate"], "sample_rate"),
                        _whole(h["releases"], "releases")) for h in d["history"]]
            return cls(str(d["mechanism"]), _real(d["epsilon_budget"], "epsilon_budget"), _real(d["delta"], "delta"),
                       _whole(d["planned_releases"], "planned_releases"), history, d.get("plan"))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ConfigError(f"ledger: malformed ({type(exc).__name__}: {exc})") from None


def _unreachable(exc: ConfigError) -> None:
    """Say in the site's log why a budget plans no release: an epsilon too small to reach at
    its delta (0.05 at 1e-5) was reported only as an exhausted budget, which misleads."""
    log.warning("privacy budget: no release can be planned: %s (node_config dp-epsilon / dp-delta)", exc)


def _whole(value: Any, name: str) -> int:
    """A count as the ledger writes it (a JSON integer): 1.7 releases read as 1 under-counted."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} is {value!r}, expected a whole number")
    return value


def _real(value: Any, name: str) -> float:
    """A number as the ledger writes it: ``true`` read as a budget of 1.0, "2" as 2.0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} is {value!r}, expected a number")
    return float(value)


#: Largest noise multiplier a release records: calibration gives up below 1e6 (SiteLedger._fit),
#: and the accountant overflows on z of the order of 1e150.
MAX_NOISE_MULTIPLIER = 1e6


def _recorded_noise(z: float) -> float:
    """A recorded release's noise multiplier, checked: finite, > 0 and one a release could have."""
    z = _privacy()._check_noise_multiplier(z, False)
    if z >= MAX_NOISE_MULTIPLIER:
        raise ConfigError(f"ledger: noise multiplier {z:g} is not one a release had (every release has one below {MAX_NOISE_MULTIPLIER:g})")
    return z


def _planned(n: int) -> int:
    """A number of planned releases (node_config ``dp-rounds``), checked: the plan prices and
    stores every one of them."""
    n = _privacy()._check_count(n, "dp-rounds", 1)
    if n > MAX_PLANNED_RELEASES:
        raise ConfigError(f"dp-rounds: {n:,} planned releases, more than {MAX_PLANNED_RELEASES:,}")
    return n


def _compress(history: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """Consecutive entries with the same (z, q) merged into one: Opacus' history form."""
    out: list[tuple[float, float, int]] = []
    for z, q, n in history:
        if out and out[-1][:2] == (z, q):
            out[-1] = (z, q, out[-1][2] + n)
        else:
            out.append((z, q, n))
    return out


def _checked_plan(plan: Any) -> dict[str, Any] | None:
    """A plan read from a ledger file, or None when it is absent or not well formed.

    The plan is derived data: the history is what was spent. A malformed plan is dropped and
    made again by the accountant (a slower round), never trusted; one that claims less than
    nothing spent, decreasing epsilon or more than the budget is malformed."""
    if plan is None:
        return None
    try:
        p = {"epsilon_budget": float(plan["epsilon_budget"]), "delta": float(plan["delta"]),
             "planned_releases": int(plan["planned_releases"]), "sample_rate": float(plan["sample_rate"]),
             "first_share": float(plan["first_share"]),
             "base": [[float(z), float(q), int(n)] for z, q, n in plan["base"]],
             "noise": [float(z) for z in plan["noise"]], "epsilon": [float(e) for e in plan["epsilon"]]}
    except (KeyError, TypeError, ValueError):
        return None
    eps = p["epsilon"]
    ok = (len(eps) == len(p["noise"]) + 1 and all(math.isfinite(e) and e >= 0 for e in eps)
          and all(b >= a for a, b in zip(eps, eps[1:])) and all(math.isfinite(z) and z > 0 for z in p["noise"])
          and (not p["noise"] or eps[-1] <= p["epsilon_budget"] * (1 + 1e-9)))
    return p if ok else None


def no_ledger_metrics(status: int, releases: int = 0) -> dict[str, float]:
    """``dp-*`` metrics of a round without a ledger (status 1-4, 7, 8): no spending reported."""
    inf = status == 1
    return {"dp-keys-epsilon": math.inf if inf else 0.0, "dp-keys-delta": 0.0,
            "dp-keys-releases": float(releases), "dp-keys-exhausted": 0.0,
            "dp-keys-budget": math.inf if inf else 0.0, "dp-status": float(status)}


#: What a ledger's lock file holds once the ledger has been written: with it and no ledger,
#: the ledger was removed, and the site refuses to share rather than start a new budget.
LOCK_NOTE = ("a privacy ledger has been written beside this file; if the ledger is gone, fedmoco refuses to share "
             "rather than forget what it spent. Delete this file too only to start a new budget on purpose.\n")


def ledger_lock(path: Path) -> Path:
    """The lock file of the ledger at ``path`` (``<ledger>.lock``, beside it)."""
    return Path(path).parent / f"{Path(path).name}.lock"


def ledger_was_written(path: Path) -> bool:
    """Whether a ledger has ever been written at ``path`` (a symbolic link is followed, as the
    ledger's writer follows it): the file is there, an older fedmoco's ``key-ledger.pt`` is
    beside it, or its lock file is marked (:data:`LOCK_NOTE`). A lock without the mark (an
    older fedmoco's) says nothing."""
    path = Path(path).expanduser().resolve()
    if path.exists() or (path.parent / LEGACY_LEDGER_FILE).is_file():
        return True
    return lock_is_marked(path)


def lock_is_marked(path: Path) -> bool:
    """Whether the lock file of the ledger at ``path`` (resolved) says a ledger was written."""
    try:
        return ledger_lock(path).stat().st_size > 0
    except OSError:
        return False


def missing_ledger_error(path: Path) -> ConfigError:
    """The error of a ledger that was written once and is gone (see :func:`ledger_was_written`)."""
    lock = ledger_lock(path)
    return ConfigError(f"{path}: the privacy ledger is missing but its lock file {lock.name} says one was written, "
                       f"so its spending would be forgotten; restore it, or delete {lock} too to start a new budget "
                       "on purpose")


def read_ledger(path: Path) -> SiteLedger | None:
    """The ledger at ``path`` (resolved), or carried over from a legacy ``key-ledger.pt``
    beside it, or None if the site has none yet. ConfigError naming the file if it cannot be
    read, or if it is gone while its lock file says one was written (:func:`missing_ledger_error`):
    starting again, or from an older key-ledger.pt it was carried over from, would forget
    what it spent."""
    if path.is_file():
        try:
            return SiteLedger.from_state_dict(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: privacy ledger unreadable ({exc}); fix or remove it deliberately") from None
    if lock_is_marked(path):  # removed (an rsync --delete, a wiped folder): fail closed
        raise missing_ledger_error(path)
    legacy = path.parent / LEGACY_LEDGER_FILE
    if legacy.is_file():
        try:
            import torch  # only for a ledger left by an older fedmoco

            d = torch.load(legacy, map_location="cpu", weights_only=True)
            history = [(float(d["noise_multiplier"]), float(d["sample_rate"]), int(d["releases"]))]
            # The old ledger planned (z, q) once; its releases so far are the plan's minimum.
            return SiteLedger("keys", float(d["epsilon_budget"]), float(d["delta"]), max(int(d["releases"]), 1),
                              [h for h in history if h[2] > 0])
        except Exception as exc:  # noqa: BLE001 - any damage: refuse, never start afresh
            raise ConfigError(f"{legacy}: old privacy ledger unreadable ({exc})") from None
    return None
