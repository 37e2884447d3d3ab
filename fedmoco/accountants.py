"""Opacus accountants for fedmoco's two releases: the only module that imports Opacus.

Opacus' package import loads DP-SGD's privacy engine, optimizers and ``torch.distributed``
(2-3 s), and every round of a deployed site is a fresh process, so :mod:`fedmoco.privacy`
(the release mechanisms) does not import it and reaches these classes lazily. Both are
``opacus.accountants.RDPAccountant`` subclasses (same ``history`` of ``(z, q, steps)``, same
``step()``, Opacus' own RDP -> (epsilon, delta) conversion) registered with Opacus, so
``opacus.accountants.utils.get_noise_multiplier`` calibrates with them by name. The RDP of
each is defined, with the reasoning behind it, in :mod:`fedmoco.privacy`.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
from opacus.accountants import RDPAccountant, register_accountant
from opacus.accountants.analysis import rdp as opacus_rdp

from fedmoco.privacy import (ACCOUNTANT, ALPHAS, PROTOTYPE_ACCOUNTANT, PROTOTYPE_ORDERS, _slot_rdp,
                             sampled_gaussian_rdp)

__all__ = ["KeyReleaseRDPAccountant", "PrototypeRDPAccountant"]


class _HistoryRDPAccountant(RDPAccountant):
    """An Opacus ``RDPAccountant`` (same ``history`` of ``(z, q, steps)``, same ``step()``, Opacus'
    own RDP -> (epsilon, delta) conversion) whose RDP per history entry is :meth:`_rdp`."""

    @staticmethod
    def _rdp(noise_multiplier: float, sample_rate: float, steps: int, orders: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _orders(self, alphas: Sequence[float] | None) -> np.ndarray:
        return np.asarray(ALPHAS if alphas is None else alphas, dtype=float)

    def get_privacy_spent(
        self, *, delta: float, alphas: Sequence[float] | None = None
    ) -> tuple[float, float]:
        """(epsilon, best order) spent so far at ``delta``; (0, 0) before any step."""
        if not self.history:
            return 0.0, 0.0
        orders = self._orders(alphas)
        return _convert(orders, sum(self._rdp(z, q, n, orders) for z, q, n in self.history), delta)

    def epsilons_after(self, releases: Sequence[tuple[float, float]], delta: float) -> list[float]:
        """Epsilon at ``delta`` after the history, then after each further release (z, q) in turn:
        ``[eps(history), eps(history + releases[:1]), ..., eps(history + releases)]``.

        RDP is additive over releases, so each distinct (z, q) is evaluated once and added up;
        pricing a ledger's plan of R releases costs a few RDP evaluations and R conversions
        instead of R full accountings (at q < 1 the prototype RDP takes ~25 ms an evaluation)."""
        orders = self._orders(None)
        rdp = sum((self._rdp(z, q, n, orders) for z, q, n in self.history), np.zeros(len(orders)))
        out = [_convert(orders, rdp, delta)[0] if self.history else 0.0]
        step: dict[tuple[float, float], np.ndarray] = {}
        for z, q in releases:
            if (z, q) not in step:
                step[(z, q)] = self._rdp(z, q, 1, orders)
            rdp = rdp + step[(z, q)]
            out.append(_convert(orders, rdp, delta)[0])
        return out


def _convert(orders: np.ndarray, rdp: np.ndarray, delta: float) -> tuple[float, float]:
    """(epsilon, best order) at ``delta``: Opacus' RDP -> (epsilon, delta) conversion."""
    with warnings.catch_warnings():
        # "Optimal order is the largest alpha": only means the bound could be tighter.
        warnings.filterwarnings("ignore", message="Optimal order")
        eps, best = opacus_rdp.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps), float(best)


class KeyReleaseRDPAccountant(_HistoryRDPAccountant):
    """Opacus RDP accountant for Poisson-sampled, individually noised key releases.

    ``step(noise_multiplier=z, sample_rate=q)`` records one round's release; ``history``
    is Opacus' list of ``(z, q, steps)``. Only the RDP differs from
    :class:`opacus.accountants.RDPAccountant` (see the module docstring for the formula).
    """

    _rdp = staticmethod(_slot_rdp)

    @classmethod
    def mechanism(cls) -> str:
        return ACCOUNTANT


# force=True: re-importing the module (e.g. importlib.reload in tests) must not fail.
register_accountant(ACCOUNTANT, KeyReleaseRDPAccountant, force=True)


class PrototypeRDPAccountant(_HistoryRDPAccountant):
    """Opacus' RDP accountant for the subsampled Gaussian sum mechanism (the analysis of its
    stock ``"rdp"`` accountant), evaluated fast at integer orders (PROTOTYPE_ORDERS): ``history`` of
    ``(z, q, steps)``, ``step()``, and Opacus' RDP -> (epsilon, delta) conversion unchanged."""

    _rdp = staticmethod(sampled_gaussian_rdp)

    def _orders(self, alphas: Sequence[float] | None) -> np.ndarray:
        if alphas is None:
            return PROTOTYPE_ORDERS
        return np.asarray([a for a in alphas if float(a).is_integer()], dtype=float)

    @classmethod
    def mechanism(cls) -> str:
        return PROTOTYPE_ACCOUNTANT


register_accountant(PROTOTYPE_ACCOUNTANT, PrototypeRDPAccountant, force=True)
