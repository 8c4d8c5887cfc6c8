"""The f-DP one-run bound (Mahloujifar, Melis and Chaudhuri, "Auditing f-Differential Privacy in
One Run", ICML 2025, arXiv 2410.22235; the "audit_rh_with_cap" test).

Setting, as in :mod:`rmt_kernels.audit.bound`: ``m`` canaries, each IN or OUT by a fair coin;
after the run the auditor makes exactly ``c`` guesses (a function of the released output only)
and ``T`` of them are right. The claim tested is that the run is f-DP with respect to each
canary's coin, for a symmetric trade-off function ``f``. Write ``b(x) = 1 - f(x)`` (the
"blow-up": an event of probability ``x`` with the canary OUT has probability <= ``b(x)`` with
it IN, and vice versa); ``b`` is concave and increasing, so ``b^-1`` is convex.

The constraints. Let ``C_j`` / ``W_j`` be "the guess on canary j is right / wrong" and
``T_-j`` the right guesses on the other canaries (a function of the output and the other
coins only). Given the other coins, canary j's coin decides between two output laws that f-DP
relates, so by the blow-up inequality and the concavity of ``b`` (Jensen over j and the other
coins), for every ``i``

    R_{i+1} <= b(H_i),   R_i = E[T 1{T >= i}] / m,   H_i = E[(c - T) 1{T >= i}] / m

(on ``C_j``, ``T_-j >= i`` is ``T >= i + 1``; on ``W_j`` it is ``T >= i``). With
``a_k = P[T = k]``: ``R_i - R_{i+1} = i a_i / m``, ``H_i - H_{i+1} = (c - i) a_i / m``, and
``R_0 + H_0 = c / m`` (the a_k sum to 1).

The recursion. Suppose ``P[T >= v] >= tau``. The least total mass compatible with the
constraints is built greedily from the top: ``a_v = tau`` (mass above ``v`` moved down to ``v``
only relaxes the constraints below ``v``), so ``R = tau v / m``, ``H = tau (c - v) / m``; then
for ``i = v - 1, ..., 0``

    H_new = max(H, b^-1(R));   R <- R + i / (c - i) * (H_new - H);   H <- H_new

(the least ``a_i`` that satisfies ``R_{i+1} <= b(H_i)``). By induction the true ``(R_i, H_i)``
is >= the greedy one coordinate-wise, with ``R* - R >= i / (c - i) (H* - H)`` (because
``k / (c - k)`` grows with ``k``), so the greedy ``R_0 + H_0`` is <= the true ``c / m``. Hence if
the greedy ``R_0 + H_0 > c / m``, then ``P[T >= v] < tau``: the claim is rejected at level tau.
When ``b^-1(R) <= H`` nothing changes any more and the loop stops early.

Families of claims (``b^-1`` of each):

- mu-GDP: ``b^-1(y) = Phi(Phi^-1(y) - mu)``. A weaker claim (larger mu) has a larger ``b``,
  a smaller ``b^-1``, so a smaller greedy total (the same induction): rejecting mu rejects
  every mu' < mu, and the bound on mu is the largest rejected mu. So if the run is mu-GDP,
  the bound exceeds mu only if mu itself is rejected: probability < p_fail.
- (eps, delta)-DP: ``b(x) = min(1, e^eps x + delta, 1 - e^-eps (1 - delta - x))``, the
  trade-off of any (eps, delta)-DP mechanism; a sound epsilon lower bound for every mechanism.

The epsilon of :func:`gdp_epsilon_lower_bound` is the Gaussian mechanism's epsilon at delta of
the mu bound: a lower bound on the epsilon of a mechanism whose claimed trade-off is Gaussian
(DP-SGD at sample rate 1: a composition of Gaussians is exactly GDP with ``mu = sqrt(steps) /
sigma``). It uses the whole Gaussian curve, which is why it is far tighter than the (eps, delta)
bound for Gaussian noise; it says "the run is not mu-GDP", so it is the claim to test only when
the accountant's claim is a Gaussian one.

Numerics. Everything runs on a batch: the guess counts a threshold strategy tries times a grid
of 64 claims, so one pass of the (at most ``max v`` long) loop evaluates them all; the grid is
then refined around the largest rejected claim (three passes for mu, four for eps). Since
rejection is monotone in the claim, the rejected grid points form a prefix; the result is
always a rejected grid point (or 0), so the resolution never costs soundness, only tightness.
"""

from __future__ import annotations

import numpy as np
from scipy import special

from rmt_kernels.audit.bound import _check_counts, _check_p_fail
from rmt_kernels.audit.gaussian import gaussian_epsilon

__all__ = [
    "dp_blow_up_inverse",
    "dp_epsilon_lower_bound",
    "fdp_rejects",
    "gdp_blow_up_inverse",
    "gdp_epsilon_lower_bound",
    "gdp_mu_lower_bound",
]

# Grid search: points per refinement pass, and the searched ranges. Each pass divides the
# bracket by 64: three passes resolve mu on [0, 16] to 16 / 64**3 = 6e-5, four resolve eps on
# [0, 64] to 64 / 64**4 = 4e-6. No experiment with fewer than 1e50 canaries rejects mu = 16
# (all-right guesses at level tau reject at most mu ~ sqrt(2 log(m / tau))), so the range
# is not a limit in practice; a claim at the top of a range is still a rejected (valid) one.
_GRID = 64
_MU_MAX, _MU_PASSES = 16.0, 3
_EPS_MAX, _EPS_PASSES = 64.0, 4


def gdp_blow_up_inverse(mu: np.ndarray):
    """``b^-1`` of mu-GDP: ``y -> Phi(Phi^-1(y) - mu)`` (``mu`` broadcast against ``y``)."""
    mu = np.asarray(mu, dtype=np.float64)

    def inv(y: np.ndarray) -> np.ndarray:
        return special.ndtr(special.ndtri(np.clip(y, 0.0, 1.0)) - mu)

    return inv


def dp_blow_up_inverse(eps: np.ndarray, delta: np.ndarray):
    """``b^-1`` of (eps, delta)-DP: ``y -> max(0, (y - delta) e^-eps, 1 - delta - e^eps (1 - y))``
    (the inverse of ``b(x) = min(1, e^eps x + delta, 1 - e^-eps (1 - delta - x))``; at ``y = 1``
    the second piece of ``b`` reaches 1 at ``x = 1 - delta``, the third gives the same)."""
    eps = np.asarray(eps, dtype=np.float64)
    delta = np.asarray(delta, dtype=np.float64)

    def inv(y: np.ndarray) -> np.ndarray:
        y = np.clip(y, 0.0, 1.0)
        second = (y - delta) * np.exp(-eps)
        third = 1.0 - delta - np.exp(eps) * (1.0 - y)
        return np.maximum(0.0, np.maximum(second, third))

    return inv


def fdp_rejects(blow_up_inverse, canaries, guesses, correct, *, p_fail: float) -> np.ndarray:
    """Whether ``correct`` right guesses out of ``guesses`` reject the f-DP claim at ``p_fail``.

    Args:
        blow_up_inverse: ``b^-1`` of the claim, a vectorised function of arrays of the
            broadcast shape (:func:`gdp_blow_up_inverse`, :func:`dp_blow_up_inverse`).
        canaries, guesses, correct: m, c, v (broadcast together; ints, ``v <= c <= m``).
        p_fail: the level tau in (0, 1).

    Returns:
        bool array of the broadcast shape: True where, under the claim, ``v`` or more right
        guesses have probability < ``p_fail``.
    """
    _check_p_fail(p_fail)
    m, c, v = _check_counts(canaries, guesses, correct)
    shape = np.broadcast_shapes(m.shape, c.shape, v.shape)
    m, c, v = (np.broadcast_to(a, shape).astype(np.float64) for a in (m, c, v))
    return _rejects(blow_up_inverse, m, c, v, p_fail)


def _rejects(inv, m: np.ndarray, c: np.ndarray, v: np.ndarray, tau: float) -> np.ndarray:
    """The greedy recursion on a batch (float arrays of one shape, already checked)."""
    safe_m = np.maximum(m, 1.0)
    r = tau * v / safe_m
    h = tau * (c - v) / safe_m
    vmax = int(v.max(initial=0))
    active = v > 0
    for i in range(vmax - 1, -1, -1):
        run = active & (v > i)
        if not run.any():
            if not active.any():
                break
            continue
        h_new = np.maximum(h, inv(r))
        grew = run & (h_new > h)
        # c - i >= 1 here: i < v <= c.
        r = np.where(grew, np.minimum(r + i / np.maximum(c - i, 1.0) * (h_new - h), 1.0), r)
        h = np.where(grew, h_new, h)
        # An element whose H did not grow is at a fixed point: it can never change again.
        active &= ~(run & ~grew)
    return (v > 0) & (r + h > c / safe_m)


def _largest_rejected(make_inv, m, c, v, tau: float, top: float, passes: int) -> np.ndarray:
    """Per batch element, the largest parameter in [0, top] whose claim is rejected (0 when
    none): grid refinement; every returned value is itself rejected."""
    n = m.size
    lo = np.zeros(n)
    hi = np.full(n, top)
    found = np.zeros(n, dtype=bool)
    for _ in range(passes):
        t = np.linspace(0.0, 1.0, _GRID + 1)[1:]
        grid = lo[:, None] + (hi - lo)[:, None] * t[None, :]  # (n, G), all > lo
        full = [np.broadcast_to(a[:, None], grid.shape) for a in (m, c, v)]
        rej = _rejects(make_inv(grid), *full, tau)
        # Rejection is monotone in the claim's strength, so the rejected points form a prefix;
        # take the last rejected one (any rejected point is a valid bound anyway).
        idx = np.where(rej.any(axis=1), rej.shape[1] - 1 - np.argmax(rej[:, ::-1], axis=1), -1)
        has = idx >= 0
        new_lo = np.where(has, grid[np.arange(n), np.maximum(idx, 0)], lo)
        new_hi = np.where(
            has & (idx + 1 < _GRID), grid[np.arange(n), np.minimum(idx + 1, _GRID - 1)], hi
        )
        new_hi = np.where(has, new_hi, grid[:, 0])
        found |= has
        lo, hi = new_lo, new_hi
    return np.where(found, lo, 0.0)


def _batch(canaries, guesses, correct):
    m, c, v = _check_counts(canaries, guesses, correct)
    shape = np.broadcast_shapes(m.shape, c.shape, v.shape)
    flat = [np.broadcast_to(a, shape).reshape(-1).astype(np.float64) for a in (m, c, v)]
    return shape, flat


def gdp_mu_lower_bound(canaries, guesses, correct, *, p_fail: float) -> np.ndarray:
    """The largest mu whose mu-GDP claim the guesses reject at level ``p_fail``.

    With probability >= 1 - p_fail over the coin flips and the run, a run that is mu-GDP per
    canary gives a bound <= mu. 0 when nothing is rejected. Counts broadcast (numpy rules).
    When several guess counts are tried and the best kept, pass p_fail divided by their number
    (:mod:`rmt_kernels.audit.strategy`).
    """
    _check_p_fail(p_fail)
    shape, (m, c, v) = _batch(canaries, guesses, correct)
    if m.size == 0:
        return np.zeros(shape)
    mu = _largest_rejected(gdp_blow_up_inverse, m, c, v, p_fail, _MU_MAX, _MU_PASSES)
    return mu.reshape(shape)


def gdp_epsilon_lower_bound(
    canaries, guesses, correct, *, p_fail: float, delta: float
) -> np.ndarray:
    """The Gaussian mechanism's epsilon at ``delta`` of :func:`gdp_mu_lower_bound`.

    Sound for a claim that is Gaussian (see the module docstring): if the run is mu-GDP, with
    probability >= 1 - p_fail the result is <= the epsilon of mu-GDP at ``delta``.
    """
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"delta must be a number in (0, 1), got {delta!r}")
    mu = gdp_mu_lower_bound(canaries, guesses, correct, p_fail=p_fail)
    out = np.array([gaussian_epsilon(float(x), delta) if x > 0 else 0.0 for x in mu.ravel()])
    return out.reshape(mu.shape)


def dp_epsilon_lower_bound(
    canaries, guesses, correct, *, p_fail: float, delta: float = 0.0
) -> np.ndarray:
    """The largest eps whose (eps, delta)-DP claim the f-DP recursion rejects at ``p_fail``.

    The claim's trade-off is the (eps, delta)-DP one, so this bounds the epsilon of any
    mechanism (as :func:`rmt_kernels.audit.bound.epsilon_lower_bound` does, from the same
    guesses, by another argument).
    """
    _check_p_fail(p_fail)
    if not (isinstance(delta, (int, float)) and 0 <= delta < 1):
        raise ValueError(f"delta must be a number in [0, 1), got {delta!r}")
    shape, (m, c, v) = _batch(canaries, guesses, correct)
    if m.size == 0:
        return np.zeros(shape)

    def make(eps):
        return dp_blow_up_inverse(eps, delta)

    return _largest_rejected(make, m, c, v, p_fail, _EPS_MAX, _EPS_PASSES).reshape(shape)
