"""The white-box audit sees per-step, per-example and per-parameter bugs (audit.whitebox):
the per-step scores, the pair scores across parameters, the sensitivity check, and the audited
model's parameter types (Linear weight and bias, Embedding, LayerNorm weight and bias, and
release-guard canaries summed apart in float64 by rmt_kernels/rules/release_guard.py).

Set-up: m = 1024 canaries, 64 ordinary examples, 4 full-batch steps at noise multiplier 8 (mu =
sqrt(4) / 8 = 0.25, the accountant's epsilon at delta 1e-12 is the Gaussian mechanism's 1.669),
p_fail = 1e-7 (split among the scores and the check as
rmt_kernels.audit.whitebox_scores.P_FAIL_SHARES says), the f-DP bound (sample rate 1).

False failures. Honest engine: by the one-run theorem and the union bound over the score
families, the best bound exceeds the true epsilon (<= the accountant's) with probability <= the
families' share of p_fail; the sensitivity check flags an honest run with probability <= its
share (each of its m T step scores and m sums is its clipped contribution, in [0, 1] resp. [0, T],
plus exact Gaussian noise: a union bound over 2 m T resp. 2 m Gaussian tails at z, z the
threshold). So each honest test fails falsely with probability <= p_fail = 1e-7. The seeds are
fixed, so every run is the same.

Planted bugs: each gives all-right guesses on the score that sees it (or a score far beyond
the threshold), with the margins measured and stated per test; before these scores and this
model, each of them passed the audit (old code: the summed score of one Linear weight).
"""

import dataclasses

import numpy as np
import pytest
import torch

import rmt_kernels.dp.engine as engine_module
from rmt_kernels.audit import gaussian_epsilon
from rmt_kernels.audit.canaries import canary_layout
from rmt_kernels.audit.whitebox import white_box_audit
from rmt_kernels.audit.whitebox_config import WhiteBoxConfig
from rmt_kernels.audit.whitebox_scores import P_FAIL_SHARES
from rmt_kernels.dp.engine import PrivateEngine
from rmt_kernels.rules.linear import LinearTerms
from rmt_kernels.rules.release_guard import ReleaseGuard

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")

SMALL = WhiteBoxConfig(
    canaries=1024, examples=64, steps=4, noise_multiplier=8.0, p_fail=1e-7, delta=1e-12, seed=0
)
# The accountant's claim: 4 full-batch Gaussian steps of sigma 8 compose to mu = 0.25.
CLAIMED = gaussian_epsilon(0.25, 1e-12)


@pytest.fixture(scope="module")
def honest():
    return white_box_audit(SMALL)


def test_honest_run_passes_every_score_and_the_check(honest):
    # The PRV accountant is sound (above the exact value) and within its 0.02 error budget.
    assert CLAIMED <= honest.accountant_epsilon <= CLAIMED + 0.02
    assert set(honest.families) == {"sum", "pair", "step 0", "step 1", "step 2", "step 3"}
    assert all(a.epsilon < honest.accountant_epsilon for a in honest.families.values())
    assert honest.sensitivity is not None and not honest.sensitivity.flagged
    assert not honest.bug
    # The shares of p_fail add up to p_fail.
    assert sum(P_FAIL_SHARES.values()) == pytest.approx(1.0)
    per_step = [a.p_fail for k, a in honest.families.items() if k.startswith("step")]
    assert sum(per_step) + honest.families["sum"].p_fail + honest.families["pair"].p_fail + (
        honest.sensitivity.p_fail
    ) == pytest.approx(SMALL.p_fail)


def test_every_parameter_type_holds_canaries_and_each_releases_its_contribution(honest):
    """Each kind of canary (Linear weight and bias, Embedding, LayerNorm weight and bias,
    release-guard) adds 1 per step when IN: the mean step score of the IN canaries of a kind
    minus that of its OUT ones is 1 within 6 standard errors (the noise std is 8 per score)."""
    lay = canary_layout(SMALL)
    kinds = np.array(lay.kind)
    assert set(kinds) == {
        "linear.weight",
        "linear.bias",
        "embedding.weight",
        "norm.weight",
        "norm.bias",
    }
    inc = honest.included
    groups = {k: kinds == k for k in set(kinds)} | {"guard": lay.guard}
    for name, sel in groups.items():
        a, b = honest.step_scores[:, sel & inc], honest.step_scores[:, sel & ~inc]
        assert a.size and b.size, name
        se = 8.0 * np.sqrt(1 / a.size + 1 / b.size)
        assert abs(a.mean() - b.mean() - 1.0) < 6 * se, name


def test_release_guard_canaries_take_the_float64_path(monkeypatch):
    """The guard canaries' float32 terms are 2049 times their norm: the guard sums them apart
    (one float64 Linear GEMM per IN guard canary per step), and what it releases is their exact
    clipped contribution. At noise multiplier 0.05 every IN canary's step score is 1 within
    0.2 (6 sigma of the noise: 0.3) and every OUT one 0 within 0.3."""
    exact = []
    real = LinearTerms.exact

    def spy(self, idx):
        exact.append(int(idx.numel()))
        return real(self, idx)

    monkeypatch.setattr(LinearTerms, "exact", spy)
    res = white_box_audit(dataclasses.replace(SMALL, noise_multiplier=0.05))
    guard_in = int((canary_layout(SMALL).guard & res.included).sum())
    assert guard_in > 0 and sum(exact) == guard_in * SMALL.steps
    s, inc = res.step_scores, res.included
    assert np.all(np.abs(s[:, inc] - 1) < 0.3) and np.all(np.abs(s[:, ~inc]) < 0.3)
    assert res.sensitivity is not None and not res.sensitivity.flagged


def test_guard_double_count_caught(monkeypatch):
    """Planted: the guard forgets to take the flagged examples out of the fused float32 pass,
    so each guard canary is released twice (2 per step). At noise multiplier 0.05 the step
    threshold is 1 + 7.2 x 0.05 = 1.36: the check flags it (measured excess 23.9 sigma against
    7.2); the honest run at this noise passes (previous test)."""
    real = ReleaseGuard.release
    monkeypatch.setattr(
        ReleaseGuard,
        "release",
        lambda self, name, terms, fused: real(self, name, terms, lambda s: fused(self.scale)),
    )
    res = white_box_audit(dataclasses.replace(SMALL, noise_multiplier=0.05))
    assert res.sensitivity.flagged and res.bug
    assert res.sensitivity.step_excess > 2 * res.sensitivity.step_threshold
    assert canary_layout(SMALL).guard[res.sensitivity.canary]


def test_noise_on_even_steps_only_caught(monkeypatch):
    """Planted: no noise on odd steps (they release the exact clipped sum: epsilon is
    infinite). The summed score averages it away (its bound stays below the accountant:
    measured 0.15 against 1.68), but the odd steps' scores are exactly 1 (IN) or 0 (OUT): every
    guess right, bound 4.55 > 2 x 1.68 from each."""
    real = PrivateEngine.sigma
    monkeypatch.setattr(
        PrivateEngine, "sigma", lambda self: real(self) if self.steps % 2 == 0 else 0.0
    )
    res = white_box_audit(SMALL)
    assert res.families["sum"].epsilon < res.accountant_epsilon  # the old audit's blind spot
    for t in (1, 3):
        step = res.families[f"step {t}"]
        assert step.correct == step.guesses >= 512
        assert step.epsilon > 2 * res.accountant_epsilon
    assert res.family in ("step 1", "step 3") and res.bug


def test_row_zero_unclipped_caught(monkeypatch):
    """Planted: the first row of every batch is never clipped. Here that row is the same IN
    canary at every step: it adds 100 per step instead of 1. One right guess proves nothing
    (every bound stays 0), but the sensitivity check flags it: step excess (100 - 1) / 8 =
    12.4 sigma against a threshold of 7.2, summed excess 24.2 against 7.0."""
    real = engine_module.clip_scales

    def row_zero_unclipped(sq, c):
        scale = real(sq, c).clone()
        scale[0] = 1.0
        return scale

    monkeypatch.setattr(engine_module, "clip_scales", row_zero_unclipped)
    res = white_box_audit(SMALL)
    assert res.audit.epsilon < res.accountant_epsilon  # no bound sees one example
    check = res.sensitivity
    assert check.flagged and res.bug
    assert check.step_excess > 1.5 * check.step_threshold
    assert check.sum_excess > 3 * check.sum_threshold
    # The flagged canary is the first row: the first included canary.
    assert check.canary == int(np.flatnonzero(res.included)[0])


def test_one_noise_stream_for_all_parameters_caught(monkeypatch):
    """Planted: every parameter's noise drawn from parameter 0's Philox counters (one stream
    for all). The pair score of two canaries at the same flat index of two parameters cancels
    the shared noise exactly: every pair score is the two coins' difference, every guess on it
    right, bound 3.65 > 2 x 1.68; every other score is unchanged (each parameter's noise is
    still Gaussian) and stays below."""
    real = engine_module.noise_offset
    monkeypatch.setattr(engine_module, "noise_offset", lambda step, i, n: real(step, 0, n))
    res = white_box_audit(SMALL)
    pair = res.families["pair"]
    assert pair.correct == pair.guesses >= 256
    assert pair.epsilon > 2 * res.accountant_epsilon
    assert res.families["sum"].epsilon < res.accountant_epsilon
    assert res.family == "pair" and res.bug


def test_sensitivity_thresholds_follow_the_union_bound(honest):
    """z solves 2 n Phi(-z) = p for n = m T step scores (resp. m sums) and p half the check's
    share of p_fail."""
    from scipy.stats import norm

    m, steps = SMALL.canaries, SMALL.steps
    p = SMALL.p_fail * P_FAIL_SHARES["sensitivity"] / 2
    check = honest.sensitivity
    assert 2 * m * steps * norm.sf(check.step_threshold) == pytest.approx(p, rel=1e-9)
    assert 2 * m * norm.sf(check.sum_threshold) == pytest.approx(p, rel=1e-9)
    # The statistics are those of the scores.
    s = torch.from_numpy(honest.step_scores)
    excess = torch.maximum(s - 1, -s).max() / SMALL.noise_multiplier
    assert check.step_excess == pytest.approx(float(excess))


def test_no_sensitivity_check_with_denoising():
    """A denoised release is not Gaussian around the clipped sum: the check does not apply
    (None), the bounds do."""
    cfg = dataclasses.replace(SMALL, canaries=256, examples=16, steps=2, denoise={"kappa": 1.0})
    res = white_box_audit(cfg)
    assert res.sensitivity is None and "step 1" in res.families
    assert res.audit.epsilon < res.accountant_epsilon
