"""White-box audit of the native engine (rmt_kernels.audit.whitebox): the engine as shipped gives
a bound below its accountant's epsilon; engines broken on purpose here give bounds above it.

Set-up shared by the tests: m = 4096 Dirac canaries, 256 ordinary examples, full-batch steps
(sample rate 1), 4 steps at noise multiplier 8, so each canary's score is a Gaussian mechanism
with mu = sqrt(4) / 8 = 0.25: its exact epsilon at delta = 1e-12 is 1.669 (gaussian_epsilon,
Balle and Wang), which the PRV accountant must report within its error budget (0.02). The audit runs
at p_fail = 1e-7 with the Bonferroni correction over its 24 guess counts, with the default
method at sample rate 1: the f-DP bound on mu-GDP (rmt_kernels.audit.fdp), reported as the
Gaussian epsilon at delta.

False failures. Honest engine: by the one-run theorem the bound exceeds the true epsilon (<= the
accountant's) with probability <= p_fail = 1e-7, so the honest tests fail falsely with
probability < 1e-6 together (measured: mu 0.020, epsilon 0.125; the Steinke bound: 0.077).
Broken engines: each gross bug makes the IN and OUT scores separate almost perfectly, and 2048
right guesses (the largest one-sided guess count) give mu 0.959, epsilon 6.92 at this p_fail and
delta (the Steinke bound: 4.66), 4.1x the accountant's 1.68; the margins are stated per test.
Noise halved is the subtle bug: it has a test of its own at a setting sized for it (below).
Seeds are fixed, so every run is the same.
"""

import numpy as np
import pytest
import torch

import rmt_kernels.dp.engine as engine_module
from rmt_kernels.audit import gaussian_epsilon
from rmt_kernels.audit.canaries import canary_signs
from rmt_kernels.audit.whitebox import white_box_audit
from rmt_kernels.audit.whitebox_config import WhiteBoxConfig
from rmt_kernels.dp.engine import PrivateEngine

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")

BASE = WhiteBoxConfig(
    canaries=4096, examples=256, steps=4, noise_multiplier=8.0, p_fail=1e-7, delta=1e-12, seed=0
)


def test_honest_engine_bound_below_accountant():
    res = white_box_audit(BASE)
    exact = gaussian_epsilon(BASE.claimed_mu, BASE.delta)  # 1.669
    assert exact <= res.accountant_epsilon <= exact + 0.02
    assert res.audit.epsilon < res.accountant_epsilon and not res.bug
    # The scores are the mechanism the accountant assumes: IN canaries add ~1 per step, the
    # noise has standard deviation sigma * sqrt(steps) = 16 (4096 draws: 5% is > 8 sigma).
    out = res.scores[~res.included]
    assert abs(out.std() - 16.0) < 0.8
    assert abs(res.scores[res.included].mean() - out.mean() - 4.0) < 1.6  # 6 sigma


def test_honest_engine_with_sampling_accumulation_and_denoising():
    """Poisson sampling at rate 0.5, 3 physical batches per step, spectral denoising of the
    64 x 72 weight: the released mechanism is still below the accountant (p_fail = 1e-7)."""
    cfg = WhiteBoxConfig(
        canaries=4096,
        examples=256,
        steps=6,
        sample_rate=0.5,
        physical_batches=3,
        noise_multiplier=2.0,
        p_fail=1e-7,
        delta=1e-12,
        seed=1,
        denoise={"kappa": 1.0},
    )
    res = white_box_audit(cfg)
    assert np.isfinite(res.accountant_epsilon)
    assert res.audit.epsilon < res.accountant_epsilon


def test_unclipped_canary_caught(monkeypatch):
    """Clip factors of 1: a canary's gradient has norm 100 C instead of C, so its score moves by
    400 against noise of 16: every guess is right; 2048 of them give a bound of 6.92 (> 2.5 x
    1.68)."""
    real = engine_module.clip_scales
    # Whatever form the norms take (a total or per-parameter list), every factor becomes 1.
    monkeypatch.setattr(engine_module, "clip_scales", lambda sq, c: torch.ones_like(real(sq, c)))
    res = white_box_audit(BASE)
    assert res.audit.correct == res.audit.guesses >= 2048
    assert res.audit.epsilon > 2.5 * res.accountant_epsilon


def test_noise_reused_across_steps_caught(monkeypatch):
    """Noise keyed without the step (the same noise on every step): with each canary's balanced
    signs the repeated noise cancels exactly, OUT canaries score exactly 0 and IN ones 4: every
    guess is right, bound 6.92 > 2.5 x 1.68."""
    real = engine_module.noise_offset
    monkeypatch.setattr(engine_module, "noise_offset", lambda step, i, n: real(0, i, n))
    res = white_box_audit(BASE)
    assert np.all(res.scores[~res.included] == 0.0)
    assert res.audit.epsilon > 2.5 * res.accountant_epsilon


def test_noise_too_small_caught(monkeypatch):
    """Noise std 1/16 of what the accountant is told (mu = 4 instead of 0.25). With 4 standard
    deviations between IN and OUT scores the 2048 most extreme guesses are all right (the
    chance that one of them is wrong is below 1e-4), bound 6.92 > 2.5 x 1.68."""
    real = PrivateEngine.sigma
    monkeypatch.setattr(PrivateEngine, "sigma", lambda self: real(self) / 16)
    res = white_box_audit(BASE)
    assert res.audit.epsilon > 2.5 * res.accountant_epsilon


# Sized for noise halved: at BASE (mu 0.25, p_fail 1e-7) halving gives true mu 0.5 and the f-DP
# bound only 0.10 (Steinke: epsilon 0.48). The one-run f-DP bound reaches about 0.6 of the true
# mu at 95% confidence (0.4 at p_fail 1e-7, even with 262144 canaries), so a factor 2 is
# separable at 95% and not at 1e-7: m = 32768, 2 full-batch steps at sigma sqrt(2), so the
# claim is mu = 1 (epsilon 4.887 at delta 1e-6), and noise halved makes it mu = 2 (11.0).
HALVED = WhiteBoxConfig(
    canaries=32768,
    examples=256,
    steps=2,
    noise_multiplier=2**0.5,
    p_fail=0.05,
    delta=1e-6,
    seed=0,
)


def test_noise_halved_caught(monkeypatch):
    """The engine as shipped gives mu 0.602 (epsilon 2.77) below its claim of 1 (4.90); with the
    noise std halved the bound is mu 1.181 (epsilon 5.91): caught, at 95% confidence.

    False failures. Honest run: the theorem bounds a bound above the truth by p_fail = 0.05;
    the measured gap is 0.4 in mu, 10 standard deviations of the bound (0.037 over 30
    simulated runs of this setting, tests/test_audit_fdp.py). Halved run: the bound must exceed
    1; its mean over 30 simulated runs is 1.237, sd 0.055, min 1.141 (4.3 sd above 1). The
    seed is fixed, so the run is the same every time. The Steinke bound of the halved run is
    about 4.1 < 4.90: it does not catch this bug."""
    honest = white_box_audit(HALVED)
    assert honest.audit.method == "fdp" and honest.config.claimed_mu == pytest.approx(1.0)
    exact = gaussian_epsilon(1.0, HALVED.delta)  # 4.887
    assert exact <= honest.accountant_epsilon <= exact + 0.02
    assert honest.audit.mu < 0.8 and honest.audit.epsilon < honest.accountant_epsilon
    real = PrivateEngine.sigma
    monkeypatch.setattr(PrivateEngine, "sigma", lambda self: real(self) / 2)
    halved = white_box_audit(HALVED)
    assert halved.accountant_epsilon == honest.accountant_epsilon
    assert halved.audit.mu > 1.0 and halved.audit.epsilon > halved.accountant_epsilon


def test_canary_signs_balanced():
    s = canary_signs(100, 6, 0)
    assert s.shape == (6, 100) and np.all(s.sum(axis=0) == 0)
    assert np.all(canary_signs(10, 5, 0).sum(axis=0) == 1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"canaries": 1}, "canaries"),
        ({"steps": 0}, "steps"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"noise_multiplier": 0.0}, "noise_multiplier"),
        ({"delta": 0.0}, "delta"),
        ({"physical_batches": 0}, "physical_batches"),
        ({"p_fail": 1.0}, "p_fail"),
        ({"method": "gdp"}, "method"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WhiteBoxConfig(**kwargs)
