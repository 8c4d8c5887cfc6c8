"""The Denoiser's ``passthrough_below_edge`` option (rmt_kernels/dp/stages/denoiser.py): a matrix is
shrunk only while its released spectrum shows a component above the noise, passed through
unchanged otherwise; the decision reads the released gradient only; under AdamW it never makes
the huge coherent step that zeroed matrices made (the collapse of kappa-1 gradient shrinkage on
SST-2); its telemetry; ``rmt-glue train --denoise-passthrough``.

Statistical bounds: every random matrix here is drawn from a fixed seed; where a test relies on
pure noise staying below the detection threshold, the chance that it does not is bounded by the
Tracy-Widom tail at the threshold's quantile (about 1.4e-7 per matrix-step, see
PASSTHROUGH_TW_QUANTILE), and the tests use few enough matrix-steps to keep a false failure below
1e-6.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rmt_kernels.dp import make_private
from rmt_kernels.dp.stages import denoiser as pp
from rmt_kernels.dp.stages.denoiser import Denoiser, detection_threshold, top_singular_value
from rmt_kernels.dp.stages.options import check_denoise_options
from rmt_kernels.dp.stages.protocol import PostProcessor

pytestmark = pytest.mark.filterwarnings("ignore:make_private. seed=:UserWarning")

# MiniLM's two encoder shapes (attention 384 x 384; feed-forward 1536 x 384 and its transpose).
SQUARE, WIDE = (384, 384), (384, 1536)
SIGMA = 3e-4  # the per-entry noise std of the B = 2048 experiment (0.61 * 1 / 2048)
PASSTHROUGH = {"passthrough_below_edge": True}


def _noise(shape, seed, sigma=SIGMA):
    return sigma * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _planted(shape, seed, strength, sigma=SIGMA):
    """A rank-1 clean matrix whose singular value is ``strength`` times the BBP transition
    sigma (m n)^(1/4), where a component starts to stand out of the noise bulk."""
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    u = torch.randn(m, 1, generator=gen)
    v = torch.randn(n, 1, generator=gen)
    u, v = u / u.norm(), v / v.norm()
    return strength * sigma * (m * n) ** 0.25 * (u @ v.T)


def test_the_threshold_is_the_edge_plus_a_tracy_widom_margin():
    for m, n in (SQUARE, WIDE, (1536, 384)):
        edge = math.sqrt(m) + math.sqrt(n)
        ratio = detection_threshold(m, n, 1.0) / edge
        # Above the edge by a margin of the Tracy-Widom scale, n^(-2/3) relative: a few percent.
        assert 1.01 < ratio < 1.05, (m, n, ratio)
        assert detection_threshold(m, n, 2.5) == pytest.approx(2.5 * detection_threshold(m, n, 1))
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="sigma"):
            detection_threshold(10, 10, bad)
    with pytest.raises(ValueError, match="m and n"):
        detection_threshold(0, 10, 1.0)


def test_the_threshold_is_calibrated_on_pure_noise(monkeypatch):
    """The threshold's centre and scale (not only its far tail, which no affordable simulation
    reaches) against pure noise: at TW1's median (-1.2685) half of 300 draws exceed it, at its
    99% quantile (2.0234) 1%. Bounds: Binomial(300, 1/2) leaves 150 +- 45 with probability
    2e-7 (5.2 sd); Binomial(300, 0.01) (mean 3) reaches 15 with probability below 1e-6."""
    m, n, draws = 64, 48, 300
    gen = torch.Generator().manual_seed(2048)
    tops = [
        float(torch.linalg.matrix_norm(torch.randn(m, n, generator=gen), ord=2))
        for _ in range(draws)
    ]
    monkeypatch.setattr(pp, "PASSTHROUGH_TW_QUANTILE", -1.2685)
    median = detection_threshold(m, n, 1.0)
    monkeypatch.setattr(pp, "PASSTHROUGH_TW_QUANTILE", 2.0234)
    q99 = detection_threshold(m, n, 1.0)
    above_median = sum(t > median for t in tops)
    above_q99 = sum(t > q99 for t in tops)
    assert 105 <= above_median <= 195, above_median
    assert above_q99 < 15, above_q99


@pytest.mark.parametrize("shape", [SQUARE, WIDE])
def test_a_planted_signal_above_the_edge_is_shrunk(shape):
    """Twice the BBP transition: the noisy top singular value is then about 20% above the
    threshold (sqrt((t^2 + m)(t^2 + n)) / t in noise units), where its Gaussian fluctuation (sd
    about sigma) cannot bring it under: it is shrunk exactly as without the option."""
    released = _noise(shape, 1) + _planted(shape, 2, strength=2.0)
    passthrough = Denoiser({**PASSTHROUGH, "kappa": 1.0})
    plain = Denoiser({"kappa": 1.0})
    passthrough.record_stats = True
    out = passthrough({"w": released}, SIGMA, 0)["w"]
    assert torch.equal(out, plain({"w": released}, SIGMA, 0)["w"])
    assert not torch.equal(out, released)
    # Kappa 1 keeps the planted component only: rank 1, most of the noise gone.
    assert torch.linalg.matrix_rank(out).item() == 1
    assert float(out.norm()) < 0.5 * float(released.norm())
    stats = passthrough.take_stats()["w"]
    assert stats["passthrough"] is False and stats["rank"] == 1
    assert stats["top_ratio"] > 1.1 and stats["shrunk_steps"] == 1 == stats["steps"]


def test_pure_noise_passes_through_bit_identically():
    """2 shapes x 3 steps = 6 matrix-steps of pure noise: all below the threshold but with
    probability < 6 * 1.4e-7 < 1e-6. The same tensors come back (nothing copied, nothing
    rounded), and a matrix passed through keeps no warm-start basis."""
    den = Denoiser({**PASSTHROUGH, "kappa": 1.0})
    without = Denoiser({"kappa": 1.0})
    for step in range(3):
        grads = {"sq": _noise(SQUARE, 10 + step), "wide": _noise(WIDE, 20 + step)}
        den.record_stats = step == 2
        out = den(grads, SIGMA, step)
        for k, g in grads.items():
            assert out[k] is g, (step, k)
            # Kappa-1 shrinkage without the option deletes the whole matrix.
            assert float(without({k: g}, SIGMA, step)[k].abs().max()) == 0.0
        assert den.state_dict() == {}
    stats = den.take_stats()
    for k, shape in (("sq", SQUARE), ("wide", WIDE)):
        assert stats[k]["passthrough"] is True and stats[k]["norm_ratio"] == 1.0
        assert stats[k]["rank"] == min(shape)
        assert 0.9 < stats[k]["top_ratio"] < 1.0
        # Every step's decision is counted, not only the recorded step's.
        assert (stats[k]["shrunk_steps"], stats[k]["steps"]) == (0, 3)


def test_each_matrix_is_decided_alone_and_only_detected_ones_keep_a_basis():
    grads = {
        "noise": _noise(SQUARE, 30),
        "signal": _noise(SQUARE, 31) + _planted(SQUARE, 32, strength=2.0),
    }
    den = Denoiser(PASSTHROUGH)
    out = den(grads, SIGMA, 0)
    assert out["noise"] is grads["noise"] and not torch.equal(out["signal"], grads["signal"])
    assert set(den.state_dict()["bases"]) == {"signal"}


def test_a_non_finite_matrix_is_still_refused():
    g = _noise(SQUARE, 40)
    g[3, 4] = float("nan")
    with pytest.raises(ValueError):
        Denoiser(PASSTHROUGH)({"w": g}, SIGMA, 0)
    assert math.isnan(top_singular_value(g))


def test_the_option_is_a_bool():
    assert check_denoise_options(PASSTHROUGH).given_options() == PASSTHROUGH
    for bad in (1, "yes", None):
        with pytest.raises(TypeError, match="passthrough_below_edge must be a bool"):
            check_denoise_options({"passthrough_below_edge": bad})


class _Spy(PostProcessor):
    """Keeps a copy of the released gradients it is given; passes them on unchanged."""

    def __init__(self) -> None:
        self.seen: list[tuple[dict[str, torch.Tensor], float]] = []

    def __call__(self, grads, sigma, step):
        self.seen.append(({k: g.clone() for k, g in grads.items()}, sigma))
        return grads


@pytest.mark.parametrize("noise_multiplier", [0.02, 2.0])
def test_the_engine_decides_from_the_released_gradient_alone(noise_multiplier):
    """Through the native engine: each decision is the threshold rule applied to the released
    gradient the stage was handed (the clipped sum plus its noise, averaged) and the public
    sigma, and a matrix passed through is written as released. At noise multiplier 0.02 the
    48 x 40 weight's clean gradient (norm up to C = 0.5, sigma 0.00125, threshold about 0.02)
    stands out; at 2 (sigma 0.125, threshold about 2) it cannot (its norm is at most 0.5)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 48), nn.ReLU(), nn.Linear(48, 3))
    gen = torch.Generator().manual_seed(1)
    data = TensorDataset(
        torch.randn(8, 40, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    )
    spy = _Spy()
    den = Denoiser({**PASSTHROUGH, "min_dim": 32})
    model, opt, loader = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        DataLoader(data, batch_size=8),
        target_delta=1e-5,
        max_grad_norm=0.5,
        noise_multiplier=noise_multiplier,
        poisson_sampling=False,
        seed=7,
        accountant="rdp",
        post_processors=[spy, den],
    )
    den.record_stats = True
    x, y = next(iter(loader))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    ((released, sigma),) = spy.seen
    stats = den.take_stats()
    assert set(stats) == {"0.weight"}  # the only Linear weight with both sides >= 32
    g = released["0.weight"]
    expected = top_singular_value(g) / detection_threshold(48, 40, sigma)
    assert stats["0.weight"]["top_ratio"] == pytest.approx(expected, rel=1e-6)
    assert stats["0.weight"]["passthrough"] is (expected <= 1)
    assert stats["0.weight"]["passthrough"] is (noise_multiplier == 2.0)
    written = dict(model.named_parameters())["0.weight"].grad
    if noise_multiplier == 2.0:
        assert torch.equal(written, g)
    else:
        assert not torch.equal(written, g)


def _adamw_steps(grads: list[torch.Tensor], denoiser: Denoiser | None, lr=1e-3):
    """AdamW (torch's, weight decay 0) on one matrix fed ``grads`` through ``denoiser``; the
    updates W_t - W_{t-1} of every step."""
    w = nn.Parameter(torch.zeros_like(grads[0]))
    opt = torch.optim.AdamW([w], lr=lr, weight_decay=0.0)
    updates = []
    for step, g in enumerate(grads):
        before = w.detach().clone()
        w.grad = g if denoiser is None else denoiser({"w": g}, SIGMA, step)["w"]
        opt.step()
        updates.append(w.detach() - before)
    return updates


def _opnorm(x: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(x, ord=2))


def test_adamw_takes_no_huge_step_after_steps_below_the_edge():
    """The mechanism of the collapse on SST-2: kappa-1 shrinkage zeroes a matrix while nothing
    is above the edge, AdamW's m and v stay 0, and when a component appears every entry steps
    by about lr / 2 with the sign pattern of a rank-1 matrix: an update of operator norm
    ~lr sqrt(m n) / 2 (~190 lr at 384 x 384) against plain DP-Adam's noise steps of random
    signs, ~0.3 lr (sqrt(m) + sqrt(n)) (~12 lr); and its m keeps that coherent direction for
    the steps after. Passed through while below the edge, v holds the noise's scale and the
    shrunk steps are no larger than plain DP-Adam's; the other way round (a component shrunk for
    some steps, then gone) the first step passed through is a noise step of the usual size.
    10 noise steps, then 5 with a component at twice the BBP transition, then 5 of noise again
    (measured, in units of lr: plain 39 28 ... 12 14 17 19 21 19 17 ...; passthrough the same
    to step 10, then 12 12 14 15 17 15 14 ...; zeroing 0 x 10, then 182 183 187 200 ...). 15
    pure-noise matrix-steps for the threshold: a false detection below 15 * 1.4e-7."""
    clean = _planted(SQUARE, 50, strength=2.0)
    noise = [_noise(SQUARE, 100 + t) for t in range(20)]
    grads = [n + (clean if 10 <= t < 15 else 0) for t, n in enumerate(noise)]
    plain = [_opnorm(u) for u in _adamw_steps(grads, None)]
    passthrough = _adamw_steps(grads, Denoiser({**PASSTHROUGH, "kappa": 1.0}))
    zeroing = [_opnorm(u) for u in _adamw_steps(grads, Denoiser({"kappa": 1.0}))]
    # Below the edge the passthrough run is plain DP-Adam, bit for bit; the zeroing one stands.
    plain_updates = _adamw_steps(grads, None)
    for t in range(10):
        assert torch.equal(passthrough[t], plain_updates[t]), t
        assert zeroing[t] == 0.0, t
    # The huge step exists (so the test can fail): without the option it is > 8x plain's, at
    # the switch on and after the component is gone.
    for t in (10, 15):
        assert zeroing[t] > 8 * plain[t], (t, zeroing[t], plain[t])
    # With the option no step exceeds plain DP-Adam's at the same step by more than half.
    for t in range(20):
        assert _opnorm(passthrough[t]) < 1.5 * plain[t], (t, _opnorm(passthrough[t]), plain[t])


def test_train_flag_reaches_the_denoise_options():
    from rmt_kernels.glue.cli import _train_config, build_parser, main

    parse = build_parser().parse_args
    base = ["train", "--task", "sst2", "--model", "m", "--denoise"]
    assert (
        _train_config(parse([*base, "--denoise-passthrough"])).denoise_options[
            "passthrough_below_edge"
        ]
        is True
    )
    # Left out: None, dropped from the options the op and the log get (logs stay as before).
    assert _train_config(parse(base)).denoise_options["passthrough_below_edge"] is None
    with pytest.raises(SystemExit) as err:
        main(["train", "--task", "sst2", "--model", "m", "--denoise-passthrough"])
    assert err.value.code == 2


def test_a_resumed_passthrough_denoiser_replays_bit_identically():
    """Its state is the warm-start bases of the matrices shrunk at the last step (the decision
    itself reads only each step's released matrix): a denoiser rebuilt from state_dict after
    step 2 returns exactly what the uninterrupted one does, through switches both ways. The
    pure-noise matrix-steps here (3 of "a", 2 of "b") keep a false detection below 1e-6."""
    steps = [{"a": _noise(SQUARE, 60 + t), "b": _noise(SQUARE, 70 + t)} for t in range(5)]
    for t in (1, 2, 3):  # "a" carries a component at steps 1-3, "b" at step 2 onwards
        steps[t]["a"] = steps[t]["a"] + _planted(SQUARE, 80, strength=2.0)
    for t in (2, 3, 4):
        steps[t]["b"] = steps[t]["b"] + _planted(SQUARE, 81, strength=2.5)
    whole = Denoiser(PASSTHROUGH)
    expected = [whole(g, SIGMA, t) for t, g in enumerate(steps)]
    first = Denoiser(PASSTHROUGH)
    for t in range(3):
        first(steps[t], SIGMA, t)
    resumed = Denoiser(PASSTHROUGH)
    resumed.load_state_dict(first.state_dict())
    for t in (3, 4):
        out = resumed(steps[t], SIGMA, t)
        for k in ("a", "b"):
            assert torch.equal(out[k], expected[t][k]), (t, k)
    assert expected[4]["a"] is steps[4]["a"] and expected[0]["b"] is steps[0]["b"]
