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
- the search stops with a ValueError after ``time_limit`` seconds (checked between accountant
  calls) or ``MAX_EVALUATIONS`` evaluations.

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

    if noise_multiplier == 0:
        return math.inf
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
        ValueError: the target is not in (0, ``MAX_TARGET_EPSILON``], no noise multiplier
            up to 1e6 reaches it, the search ran past ``time_limit`` seconds, or the
            accountant's epsilon at the answer is not in (0, target].
    """
    if not (0 < target_epsilon <= MAX_TARGET_EPSILON):
        raise ValueError(
            f"target epsilon must be in (0, {MAX_TARGET_EPSILON:g}], got {target_epsilon}: a "
            "larger epsilon bounds nothing (for a fixed noise give the noise multiplier; for no "
            "privacy train without DP)"
        )
    from opacus.accountants import create_accountant

    start = time.monotonic()
    evaluations = 0

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
