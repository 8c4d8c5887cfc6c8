"""bench/early_exit.py's derived numbers are what its docstring says they are."""

from __future__ import annotations

import math

import pytest

from bench.early_exit import FAILURE, lanczos_steps, missed_signal_cost, signal_that_matters


def test_signal_that_matters_costs_the_budget_and_lands_where_the_bbp_map_says():
    x, noisy_over_edge = signal_that_matters(0.02)
    assert missed_signal_cost(x) == pytest.approx(0.02, rel=1e-9)
    # The cost grows with x (a stronger signal is worth more to keep).
    assert missed_signal_cost(0.99 * x) < 0.02 < missed_signal_cost(1.01 * x)
    # Square case, noise units: the bulk edge is 2 and a spike x lands at (1 + x^2) / x.
    assert noisy_over_edge == pytest.approx(math.sqrt((1 + x * x) ** 2) / x / 2, rel=1e-12)
    assert 1.0 < noisy_over_edge < 1.01


@pytest.mark.parametrize(("n", "eps"), [(768, 0.01), (768, 0.005), (3072, 0.02)])
def test_lanczos_steps_is_the_smallest_k_meeting_the_kuczynski_wozniakowski_bound(n, eps):
    def bound(k: int) -> float:
        return 1.648 * math.sqrt(n) * math.exp(-math.sqrt(eps) * (2 * k - 1))

    k = lanczos_steps(n, eps)
    assert bound(k) <= FAILURE < bound(k - 1)
