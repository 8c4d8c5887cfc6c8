"""The noise multiplier for a target epsilon, found in bounded time, and the checks of delta and
of a run's final epsilon made before any step touches data.

Opacus's ``get_noise_multiplier`` bisects sigma towards 0 until the accountant reports the target
epsilon. For an absurd target (epsilon 1e3, 1e6) it evaluates the PRV accountant at ever smaller
sigma, where one evaluation takes minutes and gigabytes (the PRV's domain grows with the epsilon
it must cover: 85 s at sigma 0.05, q 1/16, 100 steps; out of memory at sigma 0.3 over 10,000
steps), and never stops. Here the same search (same sigmas, same answer when it ends) runs with
three bounds:

- a target above ``MAX_TARGET_EPSILON`` is refused up front: e^100 bounds no adversary's
  advantage, and no accountant computes it reliably;
- the PRV accountant is not evaluated where the (fast, upper-bounding) RDP accountant already
  reports more than ``SCREEN_FACTOR`` times the target: such a sigma is taken as too small,
  which can only make the returned sigma larger (more noise), never smaller;
- the PRV accountant is not evaluated where its grid (which it sizes from the step count and
  the RDP epsilon: :func:`prv_grid_points`) would exceed ``MAX_PRV_GRID_POINTS``: a run so long
  that the target's own grid is too large is refused up front (use RDP), a sigma whose grid is
  too large is taken as too small (again only more noise), and a search pinned there is
  refused;
- the search stops with a ValueError after ``time_limit`` seconds (checked between accountant
  calls, each of which the two screens keep to seconds) or ``MAX_EVALUATIONS`` evaluations.

The returned sigma's epsilon is computed by the accountant itself and must lie in
(0, target]: a numerically meaningless answer (a negative epsilon) is refused, not used.
"""

from __future__ import annotations

import math
import time
import warnings

# Beyond this no (epsilon, delta) statement means anything (e^100 ~ 1e43).
MAX_TARGET_EPSILON = 100.0
# The PRV accountant is skipped where RDP reports more than this times the target (RDP's epsilon
# exceeds the PRV's: measured ratios 1.05-1.2 at epsilon 4-200), so its slowest regime (epsilon
# in the hundreds or thousands) is never entered while calibrating a target of at most 100.
SCREEN_FACTOR = 4.0
# The PRV accountant discretises the privacy loss on a grid of 2 L / mesh points, mesh = 0.01 /
# sqrt(T ln(12 / delta_err) / 2) for T steps, L from the RDP epsilon (opacus's _get_domain); its
# time and memory grow with that count. Measured on one CPU core (opacus 1.6.0, delta 1e-5):
# 7.5e6 points (sigma 1, q 0.01, 1e5 steps) 6.4 s, 1.6 GB; 1.6e7 points (2e5 steps) 10.7 s,
# 3.0 GB; 1e6 steps over 100 s and 7.4 GB; sigma 3, q 0.1, 1e6 steps 24 GB (out of memory);
# make_private(target_epsilon=8, epochs=1e6, q 0.1) ran 450 s at 5 GB. The bound keeps one
# evaluation to seconds and about 2 GB; RDP has no such grid.
MAX_PRV_GRID_POINTS = 1e7
# get_epsilon's default eps_error.
_PRV_EPS_ERROR = 0.01
# Wall-clock bound of one calibration (seconds), and of its accountant calls.
CALIBRATION_SECONDS = 300.0
MAX_EVALUATIONS = 200
# Opacus's search: start at sigma 20 (10 doubled), give up above 1e6, stop within 0.01 of the
# target (opacus.accountants.utils.get_noise_multiplier).
_SIGMA_START = 10.0
_MAX_SIGMA = 1e6
_EPSILON_TOLERANCE = 0.01


def check_delta(delta: float, examples: int, name: str) -> None:
    """Raise ValueError unless ``0 < delta < 1 / examples``.

    A delta of 1/n or more allows a mechanism that publishes one of the n examples outright
    (each with probability delta): an (epsilon, delta) guarantee then protects nobody, and the
    accountants report a negative epsilon for large delta (0.5: -0.68 with PRV).
    """
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"{name} must be in (0, 1), got {delta}")
    if examples >= 1 and delta >= 1 / examples:
        raise ValueError(
            f"{name} {delta:.3g} is at least 1/n = {1 / examples:.3g} (n = {examples} training "
            "examples): such a delta allows publishing an example outright; give a delta below "
            "1/n (1/n^1.1 is the usual choice)"
        )


def warn_delta(delta: float, examples: int, name: str) -> None:
    """Warn (not raise) when ``delta >= 1 / examples``: see :func:`check_delta`."""
    try:
        check_delta(delta, examples, name)
    except ValueError as err:
        warnings.warn(str(err), stacklevel=3)


def _prv_mesh(steps: int, delta: float) -> float:
    """The PRV accountant's grid spacing for ``steps`` steps at ``delta`` (its ``_get_domain``
    with ``get_epsilon``'s defaults, delta_error = delta / 1000)."""
    return _PRV_EPS_ERROR / math.sqrt(steps * math.log(12 / (delta / 1000)) / 2)


def prv_grid_points(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """The number of grid points Opacus's PRV accountant discretises ``steps`` steps at
    (sigma, q) on when asked for epsilon at ``delta``: 2 L / mesh, with L from the RDP
    accountant as the PRV accountant computes it (milliseconds; no PRV evaluated)."""
    from opacus.accountants.analysis.prv import (
        PoissonSubsampledGaussianPRV,
        compute_safe_domain_size,
    )

    half_width = compute_safe_domain_size(
        [PoissonSubsampledGaussianPRV(sample_rate, noise_multiplier)],
        [steps],
        eps_error=_PRV_EPS_ERROR,
        delta_error=delta / 1000,
    )
    return 2 * half_width / _prv_mesh(steps, delta)


def _refuse_prv_grid(points: float, steps: int, noise: str) -> None:
    """Raise the ValueError of a PRV evaluation whose grid exceeds ``MAX_PRV_GRID_POINTS``."""
    raise ValueError(
        f"the prv accountant cannot account {steps} steps at {noise} in bounded time: its "
        f"grid would hold {points:.3g} points (at most {MAX_PRV_GRID_POINTS:.3g}; 1.6e7 took "
        "11 s and 3 GB, 1e6 steps over 100 s and 7 GB); use the rdp accountant (an upper "
        "bound as well), or fewer steps"
    )


def run_epsilon(
    noise_multiplier: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """The epsilon the accountant reports after ``steps`` steps at (sigma, q); infinite without
    noise.

    Raises:
        ValueError: the accountant fails there or reports an epsilon that is not > 0 (for a run
            to check before it starts, not after its first step).
    """
    from opacus.accountants import create_accountant

    check_accountant(accountant)
    if noise_multiplier == 0:
        return math.inf
    if accountant == "prv":
        points = prv_grid_points(noise_multiplier, sample_rate, steps, delta)
        if points > MAX_PRV_GRID_POINTS:
            _refuse_prv_grid(points, steps, f"noise multiplier {noise_multiplier:.4g}")
    counter = create_accountant(mechanism=accountant)
    counter.history = [(noise_multiplier, sample_rate, steps)]
    try:
        epsilon = float(counter.get_epsilon(delta=delta))
    except (ValueError, ArithmeticError) as err:
        raise ValueError(
            f"the {accountant} accountant cannot compute epsilon for noise multiplier "
            f"{noise_multiplier:.4g} over {steps} steps at sampling rate {sample_rate:.4g} and "
            f"delta {delta:.3g} ({err}); use more noise or another accountant"
        ) from None
    if not epsilon > 0:
        raise ValueError(
            f"the {accountant} accountant reports epsilon {epsilon:.3g} for noise multiplier "
            f"{noise_multiplier:.4g} over {steps} steps at delta {delta:.3g}: not a valid "
            "guarantee (is delta far too large?)"
        )
    return epsilon


def run_steps(epochs: float, steps_per_epoch: int) -> int:
    """The optimizer steps of a run of ``epochs`` epochs of ``steps_per_epoch`` logical batches:
    the nearest whole number, at least 1. The count ``rmt-glue train`` runs, and the one
    ``make_private`` accounts for: Opacus's ``int(epochs / sample_rate)`` truncates a float
    quotient and drops a step the run still takes (1 epoch of 93 batches: 92, since
    1 / (1 / 93) < 93 in floating point), and noise calibrated for one step fewer than the run
    spends more than the target."""
    return max(1, round(epochs * steps_per_epoch))


def run_noise_multiplier(
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    *,
    target_epsilon: float | None = None,
    noise_multiplier: float | None = None,
) -> float:
    """The noise multiplier of a run of ``steps`` steps at sampling rate ``sample_rate``,
    checked before any step touches data: calibrated to ``target_epsilon``
    (:func:`calibrate_noise_multiplier`: its answer's epsilon lies in (0, target]), or
    ``noise_multiplier`` as given, which the accountant must account over the whole run
    (:func:`run_epsilon`: a positive epsilon, in bounded time). The check ``rmt-glue train``
    and ``make_private`` share.

    Raises:
        ValueError: both or neither given, or the checks of :func:`calibrate_noise_multiplier`
            / :func:`run_epsilon`.
    """
    if (target_epsilon is None) == (noise_multiplier is None):
        raise ValueError("give exactly one of target_epsilon and noise_multiplier")
    if target_epsilon is not None:
        return calibrate_noise_multiplier(target_epsilon, delta, sample_rate, steps, accountant)
    run_epsilon(noise_multiplier, delta, sample_rate, steps, accountant)
    return noise_multiplier


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    *,
    time_limit: float = CALIBRATION_SECONDS,
) -> float:
    """The noise multiplier that spends ``target_epsilon`` at ``delta`` over ``steps`` steps of
    Poisson sampling at ``sample_rate`` (Opacus's search, bounded: module docstring).

    Raises:
        ValueError: the target is not in (0, ``MAX_TARGET_EPSILON``], ``steps`` is not a
            positive integer, the PRV accountant's grid at the answer would exceed
            ``MAX_PRV_GRID_POINTS``, no noise multiplier up to 1e6
            reaches the target, the search ran past ``time_limit`` seconds, or the
            accountant's epsilon at the answer is not in (0, target].
    """
    if not (0 < target_epsilon <= MAX_TARGET_EPSILON):
        raise ValueError(
            f"target epsilon must be in (0, {MAX_TARGET_EPSILON:g}], got {target_epsilon}: a "
            "larger epsilon bounds nothing (for a fixed noise give the noise multiplier; for no "
            "privacy train without DP)"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(
            f"the run must have at least 1 step to calibrate for, got {steps} (epochs too small "
            "for the sampling rate?)"
        )
    check_accountant(accountant)
    if accountant == "prv":
        # Before any evaluation. At the answer the PRV's epsilon is the target (within the
        # tolerance and the PRV's own error, eps_error either way), and its grid's half-width
        # L is 3 more than the RDP epsilon at delta / 4000, which is at least the RDP epsilon
        # at delta, an upper bound of the true epsilon: so L >= target - 0.03 + 3 there.
        points = 2 * (max(target_epsilon - 3 * _PRV_EPS_ERROR, 0) + 3) / _prv_mesh(steps, delta)
        if points > MAX_PRV_GRID_POINTS:
            _refuse_prv_grid(points, steps, f"the noise epsilon {target_epsilon:g} needs")
    from opacus.accountants import create_accountant

    start = time.monotonic()
    evaluations = 0
    grid_screened: list[tuple[float, float]] = []  # (sigma, PRV grid points) not evaluated

    def epsilon_at(sigma: float) -> float:
        nonlocal evaluations
        elapsed = time.monotonic() - start
        if evaluations and elapsed > time_limit:
            raise ValueError(
                f"calibrating the noise for epsilon {target_epsilon} did not finish within "
                f"{time_limit:g} s ({evaluations} accountant evaluations); give the noise "
                "multiplier instead, or use the rdp accountant"
            )
        if evaluations >= MAX_EVALUATIONS:
            raise ValueError(
                f"calibrating the noise for epsilon {target_epsilon} did not converge in "
                f"{MAX_EVALUATIONS} accountant evaluations; give the noise multiplier instead"
            )
        evaluations += 1
        if accountant == "prv":
            screen = create_accountant(mechanism="rdp")
            screen.history = [(sigma, sample_rate, steps)]
            if screen.get_epsilon(delta=delta) > SCREEN_FACTOR * target_epsilon:
                return math.inf
            points = prv_grid_points(sigma, sample_rate, steps, delta)
            if points > MAX_PRV_GRID_POINTS:
                # The grid grows as sigma shrinks: taken as too little noise (more noise only).
                grid_screened.append((sigma, points))
                return math.inf
        counter = create_accountant(mechanism=accountant)
        counter.history = [(sigma, sample_rate, steps)]
        try:
            return float(counter.get_epsilon(delta=delta))
        except (ValueError, ArithmeticError):
            # GDP's root finder fails at small sigma (huge epsilon): too little noise.
            return math.inf

    sigma_low, sigma_high, eps_high = 0.0, _SIGMA_START, math.inf
    while eps_high > target_epsilon:
        sigma_high *= 2
        eps_high = epsilon_at(sigma_high)
        if sigma_high > _MAX_SIGMA:
            raise ValueError(
                f"no noise multiplier reaches epsilon={target_epsilon} at delta {delta:.3g} "
                f"over {steps} steps at sampling rate {sample_rate:.4g} (none up to "
                f"{_MAX_SIGMA:g}): the privacy budget is too low"
            )
    while target_epsilon - eps_high > _EPSILON_TOLERANCE:
        sigma = (sigma_low + sigma_high) / 2
        eps = epsilon_at(sigma)
        if eps < target_epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
            pinned = sigma_high - sigma_low < 1e-3 * sigma_high
            if pinned and grid_screened and grid_screened[-1][0] == sigma:
                # Pinned at the grid's limit, below the target: the answer needs a larger grid.
                _refuse_prv_grid(
                    grid_screened[-1][1], steps, f"the noise epsilon {target_epsilon:g} needs"
                )
    # The accountants' numerics can report epsilon <= 0 at the end of the search (tiny
    # targets): no real calibration.
    if not 0 < eps_high <= target_epsilon * (1 + 1e-6):
        raise ValueError(
            f"no noise multiplier reaches epsilon={target_epsilon} at delta {delta:.3g} over "
            f"{steps} steps at sampling rate {sample_rate:.4g}: the search ended at noise "
            f"multiplier {sigma_high:.4g}, where the {accountant} accountant reports epsilon "
            f"{eps_high:.3g}"
        )
    return sigma_high


def spent_epsilon(accountant, delta: float) -> float:
    """The accountant's epsilon at ``delta``, never below 0.

    The PRV accountant solves delta(eps) = delta on the hockey-stick curve, which it extends to
    negative eps: at a large delta and a few steps it returns a negative upper bound (-0.22 for
    one step at sigma 2, q 1, delta 0.3). Since delta(eps) is non-increasing in eps, a solution
    eps* < 0 means delta(0) <= delta(eps*) = delta: the run is (0, delta)-DP, so 0 is the true
    value, and a negative number in a log or a report would only be a number no DP statement
    means.
    """
    return max(0.0, float(accountant.get_epsilon(delta=delta)))


# The accountants whose epsilon is an upper bound. Opacus's "gdp" accountant is a central-limit
# approximation of the subsampled Gaussian mechanism, not a bound: at sigma 1, q 0.01, 100 steps
# and delta 1e-5 it reports 0.458 where the PRV accountant's upper bound is 0.728, and a noise
# multiplier calibrated with it for epsilon 1 there (0.691) spends 2.48 by PRV.
ACCOUNTANTS = ("prv", "rdp")


def check_accountant(accountant: str, name: str = "accountant") -> None:
    """Refuse an accountant whose epsilon is not an upper bound (``gdp``) or an unknown one."""
    if accountant == "gdp":
        raise ValueError(
            f"{name}='gdp': Opacus's GDP accountant is a central-limit approximation that "
            "under-reports epsilon (sigma 1, q 0.01, 100 steps, delta 1e-5: 0.458 where PRV's "
            "upper bound is 0.728); use 'prv' (the default) or 'rdp'"
        )
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"{name} must be one of {ACCOUNTANTS}, got {accountant!r}")
