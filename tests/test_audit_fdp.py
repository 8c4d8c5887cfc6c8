"""The f-DP one-run bound (rmt_kernels.audit.fdp): the recursion computed literally, the pure-DP
case against the Steinke et al. bound, monotonicity, soundness on simulated Gaussian mechanisms
of known mu, and the power that the (eps, delta) bound lacks (noise halved)."""

import math

import numpy as np
import pytest
from scipy import stats

from rmt_kernels.audit import (
    Split,
    audit,
    dp_epsilon_lower_bound,
    draw_inclusion,
    epsilon_lower_bound,
    fdp_rejects,
    gaussian_epsilon,
    gdp_epsilon_lower_bound,
    gdp_mu_lower_bound,
)
from rmt_kernels.audit.fdp import dp_blow_up_inverse, gdp_blow_up_inverse


def _literal_rejects(inv, m, c, v, tau):
    """The greedy recursion written out as in the paper's 'audit_rh_with_cap', scalar by scalar
    (the independent yardstick of the vectorised one)."""
    r, h = tau * v / m, tau * (c - v) / m
    for i in range(v - 1, -1, -1):
        h_new = max(h, float(inv(np.float64(r))))
        r = min(r + i / (c - i) * (h_new - h), 1.0)
        h = h_new
    return v > 0 and r + h > c / m


@pytest.mark.parametrize(
    ("m", "c", "v", "tau"),
    [
        (100, 10, 10, 0.05),
        (1000, 100, 90, 0.05),
        (4096, 512, 480, 1e-3),
        (4096, 2048, 2048, 1e-7),
        (200, 50, 30, 0.2),
        (50, 50, 50, 0.5),
    ],
)
def test_recursion_is_the_papers(m, c, v, tau):
    mus = [0.05, 0.3, 0.8, 1.5, 3.0, 6.0]
    got = fdp_rejects(gdp_blow_up_inverse(np.array(mus)), m, c, v, p_fail=tau)
    want = [_literal_rejects(gdp_blow_up_inverse(mu), m, c, v, tau) for mu in mus]
    assert got.tolist() == want
    epss = [0.1, 0.7, 1.5, 3.0, 6.0]
    got = fdp_rejects(dp_blow_up_inverse(np.array(epss), 1e-6), m, c, v, p_fail=tau)
    want = [_literal_rejects(dp_blow_up_inverse(e, 1e-6), m, c, v, tau) for e in epss]
    assert got.tolist() == want


def test_blow_up_inverses_invert_the_trade_off():
    # b(x) = 1 - f(x): Gaussian b(x) = Phi(Phi^-1(x) + mu); (eps, delta) piecewise linear.
    x = np.linspace(0.0, 1.0, 101)[1:-1]
    for mu in (0.2, 1.0, 3.0):
        b = stats.norm.cdf(stats.norm.ppf(x) + mu)
        assert np.allclose(gdp_blow_up_inverse(mu)(b), x, atol=1e-9)
    for eps, delta in ((0.5, 0.0), (2.0, 1e-3)):
        b = np.minimum(1.0, np.minimum(np.exp(eps) * x + delta, 1 - np.exp(-eps) * (1 - delta - x)))
        inside = b < 1.0
        assert np.allclose(dp_blow_up_inverse(eps, delta)(b[inside]), x[inside], atol=1e-12)


@pytest.mark.parametrize(
    ("m", "r", "v"),
    [(1000, 100, 100), (1000, 100, 90), (4096, 512, 500), (10000, 1000, 990), (200, 50, 45)],
)
def test_pure_dp_case_reproduces_steinke(m, r, v):
    """With the (eps, 0)-DP trade-off the f-DP bound is the Steinke et al. bound within 2%
    (measured: equal to 4 digits at p_fail 1e-7, 0.0-1.2% lower at 0.05: its greedy places the
    tail mass at v exactly, which randomized response, the case where Steinke's binomial is
    exact, does not), and with a delta it is far stronger (its delta enters through the trade-off
    curve, not as a 2 m delta term)."""
    for p_fail in (0.05, 1e-7):
        s = float(epsilon_lower_bound(m, r, v, p_fail=p_fail))
        f = float(dp_epsilon_lower_bound(m, r, v, p_fail=p_fail))
        assert f == pytest.approx(s, rel=0.02, abs=1e-3)
    s = float(epsilon_lower_bound(m, r, v, p_fail=0.05, delta=1e-3))
    f = float(dp_epsilon_lower_bound(m, r, v, p_fail=0.05, delta=1e-3))
    assert f >= s


def test_bound_is_a_rejected_claim_and_the_next_is_not():
    for m, c, v in ((4096, 512, 480), (65536, 2048, 2040)):
        mu = float(gdp_mu_lower_bound(m, c, v, p_fail=0.01))
        assert mu > 0
        assert fdp_rejects(gdp_blow_up_inverse(mu), m, c, v, p_fail=0.01)
        assert not fdp_rejects(gdp_blow_up_inverse(mu + 1e-3), m, c, v, p_fail=0.01)
        assert float(gdp_epsilon_lower_bound(m, c, v, p_fail=0.01, delta=1e-6)) == pytest.approx(
            gaussian_epsilon(mu, 1e-6)
        )


def test_monotone():
    # Rejection of mu-GDP is a prefix in mu (a weaker claim is harder to reject).
    mus = np.linspace(0.01, 4.0, 400)
    rej = fdp_rejects(gdp_blow_up_inverse(mus), 4096, 512, 480, p_fail=1e-3)
    assert rej[0] and not rej[-1] and np.all(np.diff(rej.astype(int)) <= 0)
    # More right guesses, a larger p_fail, more canaries guessed at the same precision: higher.
    b = gdp_mu_lower_bound(4096, 512, np.arange(256, 513, 4), p_fail=0.05)
    assert np.all(np.diff(b) >= 0) and b[0] == 0.0 and b[-1] > 1.0
    b = [float(gdp_mu_lower_bound(4096, 512, 500, p_fail=p)) for p in (0.1, 1e-3, 1e-7)]
    assert b[0] > b[1] > b[2] > 0
    assert float(gdp_mu_lower_bound(100, 0, 0, p_fail=0.05)) == 0.0
    assert float(gdp_mu_lower_bound(100, 10, 5, p_fail=0.05)) == 0.0  # chance level


def _gaussian_scores(m, mu, seed):
    inc = draw_inclusion(m, seed)
    return np.random.default_rng([seed, 1]).normal(size=m) + mu * inc, inc


@pytest.mark.parametrize("strategy", [None, Split(seed=3)])
@pytest.mark.parametrize("mu", [0.25, 1.0, 4.0])
def test_simulated_gaussian_bound_below_true_mu(mu, strategy):
    """Scores of m = 4096 canaries under an exact mu-GDP mechanism (each canary's score is
    N(mu, 1) when IN, N(0, 1) when OUT, independently): the bound is below mu, and its epsilon
    below mu's. By the theorem each case fails with probability <= p_fail = 1e-7; fixed seeds."""
    for seed in range(2):
        scores, inc = _gaussian_scores(4096, mu, seed)
        res = audit(scores, inc, p_fail=1e-7, delta=1e-6, strategy=strategy, method="fdp")
        assert res.method == "fdp" and 0 <= res.mu < mu
        assert res.epsilon < gaussian_epsilon(mu, 1e-6)


def test_noise_halved_caught_where_steinke_is_not():
    """A mechanism claiming mu = 1 (epsilon 4.89 at delta 1e-6) that adds half the noise (mu =
    2, epsilon 11.0), m = 32768 canaries, 95% confidence, the default Bonferroni guess counts:
    the f-DP bound is above the claim (measured mu 1.204, epsilon 6.04; over seeds 0-29: mean
    1.237, sd 0.055, min 1.141, so the claim of 1 is 4.3 sd below the mean), while the Steinke
    bound from the same scores stays below it (measured 4.08). The honest mechanism (mu = 1)
    gives mu 0.596, epsilon 2.73 (seeds 0-29: mean 0.632, sd 0.037, max 0.718)."""
    claimed = gaussian_epsilon(1.0, 1e-6)
    scores, inc = _gaussian_scores(32768, 2.0, 0)
    fdp = audit(scores, inc, p_fail=0.05, delta=1e-6, method="fdp")
    steinke = audit(scores, inc, p_fail=0.05, delta=1e-6, method="steinke")
    assert fdp.mu > 1.0 and fdp.epsilon > claimed
    assert steinke.epsilon < claimed
    honest = audit(*_gaussian_scores(32768, 1.0, 0), p_fail=0.05, delta=1e-6, method="fdp")
    assert honest.mu < 0.8 and honest.epsilon < claimed


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: gdp_mu_lower_bound(10, 5, 6, p_fail=0.05), "correct"),
        (lambda: gdp_mu_lower_bound(10, 11, 6, p_fail=0.05), "guesses"),
        (lambda: gdp_mu_lower_bound(10, 5, 5, p_fail=0.0), "p_fail"),
        (lambda: gdp_mu_lower_bound(10, 5.0, 5, p_fail=0.05), "guesses"),
        (lambda: gdp_epsilon_lower_bound(10, 5, 5, p_fail=0.05, delta=0.0), "delta"),
        (lambda: dp_epsilon_lower_bound(10, 5, 5, p_fail=0.05, delta=1.0), "delta"),
        (lambda: audit([1.0, 2.0], [True, False], method="gdp"), "method"),
        (lambda: audit([1.0, 2.0], [True, False], method="fdp", delta=0.0), "delta"),
    ],
)
def test_bad_inputs_name_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_closed_form_one_guess_never_rejects():
    # c = v = 1: R_0 = tau / m, H_0 = b^-1(tau / m) <= tau / m, so R_0 + H_0 <= 2 tau / m, which
    # exceeds 1 / m only for tau > 1/2: one right guess proves nothing at any level below 1/2.
    for mu in (0.5, 5.0, 15.0):
        assert not fdp_rejects(gdp_blow_up_inverse(mu), 1000, 1, 1, p_fail=0.49)
    assert math.isclose(float(gdp_mu_lower_bound(1000, 1, 1, p_fail=0.49)), 0.0)
