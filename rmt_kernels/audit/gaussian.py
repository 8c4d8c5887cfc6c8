"""The exact (eps, delta) curve of the Gaussian mechanism (Balle and Wang, ICML 2018).

A mechanism that releases ``f(D) + N(0, sigma^2)`` with sensitivity ``||f(D) - f(D')|| <= 1``
(any number of steps of full-batch DP-SGD composes into one, with ``mu = sqrt(steps) /
noise_multiplier``) is (eps, delta)-DP exactly when

    delta >= Phi(mu / 2 - eps / mu) - exp(eps) * Phi(-mu / 2 - eps / mu),   mu = 1 / sigma

(Balle and Wang, Theorem 8). This is the yardstick of the audit's tests: a mechanism whose true
epsilon is known in closed form.
"""

from __future__ import annotations

import math

__all__ = ["gaussian_delta", "gaussian_epsilon"]


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _check_mu(mu: float) -> None:
    if not (isinstance(mu, (int, float)) and 0 < mu < float("inf")):
        raise ValueError(f"mu must be a finite number > 0, got {mu!r}")


def gaussian_delta(eps: float, mu: float) -> float:
    """Smallest delta for which the Gaussian mechanism of ``mu`` (sensitivity / noise std) is
    (eps, delta)-DP."""
    _check_mu(mu)
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    # exp(eps) * Phi(b) in log space: at large eps exp(eps) overflows while Phi(b) underflows.
    b = -mu / 2 - eps / mu
    second = math.exp(eps + math.log(_phi(b))) if _phi(b) > 0 else 0.0
    return max(0.0, _phi(mu / 2 - eps / mu) - second)


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Smallest eps for which the Gaussian mechanism of ``mu`` is (eps, delta)-DP (bisection on
    the decreasing :func:`gaussian_delta`, to 1e-12)."""
    _check_mu(mu)
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"delta must be a number in (0, 1), got {delta!r}")
    if gaussian_delta(0.0, mu) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gaussian_delta(hi, mu) > delta:
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if gaussian_delta(mid, mu) > delta else (lo, mid)
    return hi
