"""The one-run epsilon lower bound (Steinke, Nasr and Jagielski, NeurIPS 2023, arXiv 2305.08846).

Setting. ``m`` canaries; each is included in the training set independently with probability 1/2
(``S_i`` in {IN, OUT}). After training, an auditor makes ``r`` guesses (it may abstain on the
others) and ``v`` of them are right. If the training algorithm is (eps, delta)-DP, the paper's
Theorem (its appendix gives the computation) bounds the chance of ``v`` or more right guesses:

    q     = 1 / (1 + exp(-eps))                         (the best a single guess can do)
    beta  = P[Binomial(r, q) >= v]                      (the pure-DP tail)
    alpha = max_{1 <= i <= v} P[v > Binomial(r, q) >= v - i] / i
    p     = min(1, beta + 2 m delta alpha)              (a valid p-value for "(eps, delta)-DP")

The lower bound at confidence ``1 - p_fail`` is the largest ``eps`` whose claim is rejected,
``p(eps) <= p_fail``. Rejecting (eps, delta)-DP also rejects every smaller eps (a mechanism
that is (eps', delta)-DP with eps' < eps is (eps, delta)-DP), so any eps with
``p(eps) <= p_fail`` is a valid bound: the bisection keeps that invariant at its lower end and
returns it, whether or not ``p`` is monotone in eps.

Numerics. The binomial masses come from a log-factorial table in float64, and every tail or
window is a sum of non-negative masses (never a difference of two cumulative sums), so p-values
as small as 1e-300 keep their relative precision. Everything is vectorised over a batch of
(eps, r, v) triples: one bisection serves all the guess counts a threshold strategy tries.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["epsilon_lower_bound", "p_value"]

# Bisection steps: the bracket [0, 64] shrinks to 64 / 2**60 < 1e-16, float64's resolution.
_BISECTION_STEPS = 60
# No bound above this: at eps = 64 a guess is right with probability 1 - 1.6e-28, so no finite
# experiment rejects it; the doubling search stops here.
_EPS_MAX = 64.0


def _check_counts(canaries, guesses, correct) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    m = np.asarray(canaries)
    r = np.asarray(guesses)
    v = np.asarray(correct)
    for name, a in (("canaries", m), ("guesses", r), ("correct", v)):
        if a.dtype.kind not in "iu":
            raise TypeError(f"{name} must be integers, got dtype {a.dtype}")
        if np.any(a < 0):
            raise ValueError(f"{name} must be >= 0, got {a}")
    if np.any(v > r):
        raise ValueError(f"correct ({v}) must be <= guesses ({r})")
    if np.any(r > m):
        raise ValueError(f"guesses ({r}) must be <= canaries ({m})")
    return m.astype(np.int64), r.astype(np.int64), v.astype(np.int64)


def _check_p_fail(p_fail) -> None:
    # A bool is rejected by the range already (True == 1, False == 0).
    if not (isinstance(p_fail, (int, float)) and 0 < p_fail < 1):
        raise ValueError(f"p_fail must be a number in (0, 1), got {p_fail!r}")


def _check_delta(delta) -> np.ndarray:
    d = np.asarray(delta, dtype=np.float64)
    if np.any(~np.isfinite(d)) or np.any(d < 0) or np.any(d >= 1):
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    return d


def _p_value(eps: np.ndarray, m: np.ndarray, r: np.ndarray, v: np.ndarray, delta: np.ndarray):
    """p-values of a flat batch (all arrays of shape (n,), already checked)."""
    n = eps.shape[0]
    kmax = int(r.max(initial=0))
    k = np.arange(kmax + 1)
    log_fact = np.array([math.lgamma(i + 1.0) for i in range(kmax + 1)])
    # log q and log(1 - q) without cancellation at large |eps|.
    log_q = -np.logaddexp(0.0, -eps)
    log_1mq = -np.logaddexp(0.0, eps)
    valid = k[None, :] <= r[:, None]
    rk = np.where(valid, r[:, None] - k[None, :], 0)
    log_pmf = (
        log_fact[r][:, None]
        - log_fact[k][None, :]
        - log_fact[rk]
        + k[None, :] * log_q[:, None]
        + rk * log_1mq[:, None]
    )
    pmf = np.where(valid, np.exp(log_pmf), 0.0)
    beta = np.where(k[None, :] >= v[:, None], pmf, 0.0).sum(axis=1)
    # Window masses P[v - i <= B < v] for i = 1..v, summed outward from v - 1.
    i = np.arange(1, kmax + 1)
    idx = v[:, None] - i[None, :]
    in_window = idx >= 0
    window = np.cumsum(np.where(in_window, pmf[np.arange(n)[:, None], np.maximum(idx, 0)], 0.0), 1)
    alpha = np.where(in_window, window / i[None, :], 0.0).max(axis=1, initial=0.0)
    return np.minimum(1.0, beta + 2.0 * m * delta * alpha)


def p_value(eps, canaries, guesses, correct, delta=0.0) -> np.ndarray:
    """The one-run p-value of the claim "the training run is (eps, delta)-DP".

    Args:
        eps: claimed epsilon(s), >= 0.
        canaries: m, the number of canaries whose inclusion was a fair coin.
        guesses: r, the guesses made (the others abstained), <= m.
        correct: v, the right guesses, <= r.
        delta: claimed delta(s) in [0, 1).

    All arguments broadcast together (numpy rules).

    Returns:
        float64 array of the broadcast shape: an upper bound on the probability, under the
        claim, of ``correct`` or more right guesses out of ``guesses``.
    """
    eps_a = np.asarray(eps, dtype=np.float64)
    if np.any(~np.isfinite(eps_a)) or np.any(eps_a < 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    m, r, v = _check_counts(canaries, guesses, correct)
    d = _check_delta(delta)
    shape = np.broadcast_shapes(eps_a.shape, m.shape, r.shape, v.shape, d.shape)
    flat = [np.broadcast_to(a, shape).reshape(-1) for a in (eps_a, m, r, v, d)]
    if flat[0].size == 0:
        return np.zeros(shape)
    return _p_value(*flat).reshape(shape)


def epsilon_lower_bound(canaries, guesses, correct, *, p_fail: float, delta=0.0) -> np.ndarray:
    """The largest eps whose (eps, delta)-DP claim the guesses reject at level ``p_fail``.

    With probability at least ``1 - p_fail`` over the canaries' coin flips (and the training
    run's randomness), a training run that is (eps, delta)-DP gives a bound <= eps. The bound
    is 0 when even eps = 0 is not rejected. Vectorised: the counts and ``delta`` broadcast, and
    one bisection (60 halvings of [0, 64], so exact to float64) serves the whole batch.

    Closed form (a test): with ``delta = 0`` and all ``r`` guesses right, ``p = q^r``, so the
    bound is ``logit(p_fail ** (1 / r))``.

    Args:
        canaries: m, guesses: r, correct: v, delta: as in :func:`p_value`.
        p_fail: the allowed probability that the bound is wrong, in (0, 1). When several guess
            counts were tried and the best kept, pass p_fail divided by their number (see
            :mod:`rmt_kernels.audit.strategy`).

    Returns:
        float64 array of the broadcast shape, >= 0.
    """
    _check_p_fail(p_fail)
    m, r, v = _check_counts(canaries, guesses, correct)
    d = _check_delta(delta)
    shape = np.broadcast_shapes(m.shape, r.shape, v.shape, d.shape)
    m, r, v, d = (np.broadcast_to(a, shape).reshape(-1) for a in (m, r, v, d))
    n = m.size
    if n == 0:
        return np.zeros(shape)
    lo = np.zeros(n)
    rejected = _p_value(lo, m, r, v, d) <= p_fail
    # Doubling search for a bracket [lo, hi] with p(lo) <= p_fail < p(hi) (or hi = _EPS_MAX).
    hi = np.ones(n)
    while True:
        grow = rejected & (hi < _EPS_MAX) & (_p_value(hi, m, r, v, d) <= p_fail)
        if not grow.any():
            break
        lo = np.where(grow, hi, lo)
        hi = np.where(grow, np.minimum(2 * hi, _EPS_MAX), hi)
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        ok = rejected & (_p_value(mid, m, r, v, d) <= p_fail)
        lo = np.where(ok, mid, lo)
        hi = np.where(ok, hi, mid)
    return np.where(rejected, lo, 0.0).reshape(shape)
