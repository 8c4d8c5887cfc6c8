"""Post-processing stages across steps (rmt_kernels/dp/stages/: temporal.py, dp_adam.py,
trajectory.py) and the chain both engines build (chain.py): what each stage reads (privacy),
exactness against straightforward references, the filtered gradient's noise level against
simulation, and their state through a resume."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rmt_kernels.dp import make_private
from rmt_kernels.dp.stages.chain import build_chain, post_process
from rmt_kernels.dp.stages.denoiser import Denoiser
from rmt_kernels.dp.stages.dp_adam import DPAdam
from rmt_kernels.dp.stages.temporal import (
    DiSKExtrapolation,
    DiSKFilter,
    EMAFilter,
    disk_noise_std,
    ema_noise_std,
)
from rmt_kernels.dp.stages.trajectory import TrajectoryDenoiser
from rmt_kernels.ops import add_gaussian_noise, noise_offset

pytest.importorskip("opacus")

# Public seeds keep these tests reproducible; the warning is tested in test_dp_adversarial.py.
pytestmark = pytest.mark.filterwarnings("ignore:make_private. seed=:UserWarning")

IN, HIDDEN, CLASSES, BATCH, C, SEED = 40, 48, 3, 8, 0.5, 1234
# Two-sided normal quantile for a per-check false failure of 2e-8 (a few dozen checks per test
# stay far below 1e-6 together).
Z = 5.6


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def _data(n: int, seed: int = 1) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, IN, generator=gen), torch.randint(0, CLASSES, (n,), generator=gen)
    )


def _private(model=None, *, noise=1.0, chain=None, denoise=None, n=BATCH, lr=0.1, poisson=False):
    model = _mlp() if model is None else model
    loader = DataLoader(_data(n), batch_size=BATCH, generator=torch.Generator().manual_seed(11))
    return make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=lr),
        loader,
        target_delta=1e-5,
        max_grad_norm=C,
        noise_multiplier=noise,
        poisson_sampling=poisson,
        seed=SEED,
        accountant="rdp",
        denoise=denoise,
        post_processors=chain,
    )


def _backward(model, x, y) -> None:
    nn.functional.cross_entropy(model(x), y).backward()


def _noisy(shape, sigma, seed, t):
    gen = torch.Generator().manual_seed(seed * 1000 + t)
    return torch.randn(shape, generator=gen) * sigma


# ------------------------------------------------------------------------------------------
# EMAFilter: exactness, the noise formula, state
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 0.99])
def test_ema_filter_equals_a_float64_reference(beta, bias_correction):
    ema = EMAFilter(beta, bias_correction=bias_correction)
    m = {k: torch.zeros(s, dtype=torch.float64) for k, s in (("a", (5, 7)), ("b", (3,)))}
    for t in range(1, 13):
        grads = {"a": torch.randn(5, 7), "b": torch.randn(3)}
        out = ema(grads, 0.1, step=99)
        for k, g in grads.items():
            m[k] = beta * m[k] + (1 - beta) * g.double()
            expected = m[k] / (1 - beta**t) if bias_correction else m[k]
            assert out[k].dtype == g.dtype
            torch.testing.assert_close(out[k].double(), expected, rtol=2e-6, atol=1e-7)
        assert ema.output_sigma(0.1, 99) == pytest.approx(
            ema_noise_std(0.1, beta, t, bias_correction=bias_correction), rel=1e-12
        )


def test_ema_noise_formula_matches_simulation():
    """Pure noise in, the output's per-entry std out: the sample variance of N i.i.d. entries
    has relative std sqrt(2 / (N - 1)); Z of those bounds each check (false failure < 1e-6)."""
    s, beta, shape = 0.3, 0.9, (400, 500)
    n = shape[0] * shape[1]
    ema = EMAFilter(beta)
    checked = 0
    for t in range(1, 61):
        out = ema({"w": _noisy(shape, s, 7, t)}, s, t)["w"].double()
        predicted = s * math.sqrt(
            (1 - beta) * (1 - beta ** (2 * t)) / ((1 + beta) * (1 - beta**t) ** 2)
        )
        assert ema.output_sigma(s, t) == pytest.approx(predicted, rel=1e-12)
        if t in (1, 2, 3, 5, 10, 20, 60):
            ratio = float(out.var()) / predicted**2
            assert abs(ratio - 1) < Z * math.sqrt(2 / (n - 1)), (t, ratio)
            checked += 1
    assert checked == 7
    # The asymptote the issue quotes: ~0.23 s at beta 0.9.
    assert ema_noise_std(1.0, 0.9, 10**6) == pytest.approx(math.sqrt(0.1 / 1.9), rel=1e-9)
    # Guard: the formula without bias correction is far off at t = 5 (the test can fail).
    wrong = ema_noise_std(s, beta, 5, bias_correction=False)
    assert abs(wrong**2 / ema_noise_std(s, beta, 5) ** 2 - 1) > 10 * Z * math.sqrt(2 / (n - 1))


def test_ema_tracks_a_changing_sigma_exactly():
    ema = EMAFilter(0.8)
    sigmas = [0.1, 0.3, 0.2, 0.2, 0.05]
    var = 0.0
    for t, s in enumerate(sigmas, 1):
        ema({"w": torch.zeros(2, 2)}, s, 0)
        var = 0.64 * var + 0.04 * s**2
        assert ema.output_sigma(s, 0) == pytest.approx(math.sqrt(var) / (1 - 0.8**t), rel=1e-12)


def test_a_denoiser_after_the_ema_shrinks_at_the_moments_noise_level(monkeypatch):
    seen = []
    real = Denoiser.__call__

    def spy(self, grads, sigma, step):
        seen.append(sigma)
        return real(self, grads, sigma, step)

    monkeypatch.setattr(Denoiser, "__call__", spy)
    chain = [EMAFilter(0.9), Denoiser({"kappa": 1.0})]
    for t in range(1, 6):
        post_process(chain, {"w": torch.randn(40, 50)}, 0.5, t)
        assert seen[-1] == pytest.approx(ema_noise_std(0.5, 0.9, t), rel=1e-12)


def _round_trip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_ema_state_round_trips_and_is_validated():
    ema = EMAFilter(0.9)
    for _ in range(3):
        ema({"a": torch.randn(4, 4), 3: torch.randn(2)}, 0.2, 0)
    state = _round_trip(ema.state_dict())
    other = EMAFilter(0.9)
    other.load_state_dict(state)
    g = {"a": torch.randn(4, 4), 3: torch.randn(2)}
    a, b = ema(g, 0.2, 0), other(g, 0.2, 0)
    assert all(torch.equal(a[k], b[k]) for k in g)
    assert ema.output_sigma(0.2, 0) == other.output_sigma(0.2, 0)
    with pytest.raises(ValueError, match=r"beta=0\.9, this stage has beta=0\.5"):
        EMAFilter(0.5).load_state_dict(state)
    with pytest.raises(ValueError, match="not a EMAFilter state"):
        EMAFilter(0.9).load_state_dict({"t": 1})
    bad = {**state, "m": {"a": torch.full((4, 4), float("nan"))}}
    with pytest.raises(ValueError, match="not finite"):
        EMAFilter(0.9).load_state_dict(bad)
    with pytest.raises(ValueError, match="gradients changed"):
        ema({"a": torch.randn(4, 4)}, 0.2, 0)
    for beta in (1.0, -0.1):
        with pytest.raises(ValueError, match="beta must be in"):
            EMAFilter(beta)


# ------------------------------------------------------------------------------------------
# DPAdam
# ------------------------------------------------------------------------------------------


def test_plain_dp_adam_with_sgd_is_torch_adam():
    torch.manual_seed(3)
    w0 = torch.randn(6, 5)
    a, b = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    adam = torch.optim.Adam([a], lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    sgd = torch.optim.SGD([b], lr=0.01)
    stage = DPAdam(variance_correction=False, second_moment_from="input")
    for _ in range(20):
        g = torch.randn(6, 5)
        a.grad = g.clone()
        adam.step()
        b.grad = stage({"w": g.clone()}, 0.1, 0)["w"]
        sgd.step()
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("beta1", [0.0, 0.9])
@pytest.mark.parametrize("source", ["released", "input"])
@pytest.mark.parametrize("correction", [True, False])
def test_dp_adam_equals_a_float64_reference(beta1, source, correction):
    stage = DPAdam(beta1=beta1, beta2=0.99, eps=1e-6, variance_correction=correction,
                   second_moment_from=source, floor=1e-4)  # fmt: skip
    m = v = torch.zeros(7, 3, dtype=torch.float64)
    phi = 0.0
    for t in range(1, 9):
        x, released = torch.randn(7, 3) * 0.1, torch.randn(7, 3) * 0.1
        s_in, s_rel = 0.05 * t, 0.07
        out = post_process([stage], {"w": x}, s_in, 0) if source == "input" else None
        if source == "released":
            out = stage({"w": x}, s_in, 0, released={"w": released}, released_sigma=s_rel)
        y = (released if source == "released" else x).double()
        s_y = s_rel if source == "released" else s_in
        m = beta1 * m + (1 - beta1) * x.double()
        v = 0.99 * v + 0.01 * y * y
        phi = 0.99 * phi + 0.01 * s_y**2
        m_hat, v_hat = m / (1 - beta1**t), v / (1 - 0.99**t)
        if correction:
            v_hat = torch.clamp(v_hat - phi / (1 - 0.99**t), min=1e-4)
        expected = m_hat / (v_hat.sqrt() + 1e-6)
        torch.testing.assert_close(out["w"].double(), expected, rtol=1e-5, atol=1e-6)
    assert math.isnan(stage.output_sigma(0.1, 0)) and stage.terminal


def test_dp_adam_bc_subtracts_the_noise_variance():
    """On pure noise, v_hat -> s^2: DP-AdamBC's corrected v is ~0 (floored), Adam's is s^2."""
    s = 0.01
    plain = DPAdam(variance_correction=False, second_moment_from="input", beta2=0.9)
    bc = DPAdam(variance_correction=True, second_moment_from="input", beta2=0.9, floor=1e-12)
    for t in range(200):
        g = {"w": _noisy((300, 300), s, 5, t)}
        a, b = plain(g, s, 0)["w"], bc(g, s, 0)["w"]
    # Adam's update of pure noise has entries of size ~|m_hat| / s ~ 0.2; DP-AdamBC's are
    # larger wherever the corrected v fell to the floor.
    assert float(b.abs().median()) > 10 * float(a.abs().median())


def test_dp_adam_needs_the_released_gradient_and_checks_its_options():
    with pytest.raises(ValueError, match="needs the released gradient"):
        DPAdam()({"w": torch.zeros(2)}, 0.1, 0)
    with pytest.raises(ValueError, match="second_moment_from must be one of"):
        DPAdam(second_moment_from="clean")
    with pytest.raises(ValueError, match="beta2 must be in"):
        DPAdam(beta2=1.0)
    with pytest.raises(ValueError, match="floor must be > 0"):
        DPAdam(floor=0.0)


def test_dp_adam_state_round_trips():
    stage = DPAdam()
    for _ in range(4):
        g = {"w": torch.randn(3, 3)}
        stage(g, 0.1, 0, released=g, released_sigma=0.1)
    other = DPAdam()
    other.load_state_dict(_round_trip(stage.state_dict()))
    g = {"w": torch.randn(3, 3)}
    r = {"w": torch.randn(3, 3)}
    assert torch.equal(
        stage(g, 0.1, 0, released=r, released_sigma=0.1)["w"],
        other(g, 0.1, 0, released=r, released_sigma=0.1)["w"],
    )
    with pytest.raises(ValueError, match="variance_correction=True, this stage has"):
        DPAdam(variance_correction=False).load_state_dict(stage.state_dict())


# ------------------------------------------------------------------------------------------
# DiSK
# ------------------------------------------------------------------------------------------


def test_disk_filter_equals_a_float64_reference_and_its_noise_formula():
    kappa = 0.7
    disk = DiSKFilter(kappa)
    d = None
    for t in range(1, 10):
        g = torch.randn(6, 4)
        out = disk({"w": g}, 0.2, 0)["w"]
        d = g.double() if d is None else (1 - kappa) * d + kappa * g.double()
        torch.testing.assert_close(out.double(), d, rtol=2e-6, atol=1e-7)
        # Sum of squared weights of the g's in d_t, times sigma^2.
        weights = [(1 - kappa) ** (t - 1)] + [
            kappa * (1 - kappa) ** (t - s) for s in range(2, t + 1)
        ]
        assert disk.output_sigma(0.2, 0) == pytest.approx(
            0.2 * math.sqrt(sum(w * w for w in weights)), rel=1e-12
        )
        assert disk.output_sigma(0.2, 0) == pytest.approx(disk_noise_std(0.2, kappa, t), rel=1e-12)


def test_disk_noise_formula_matches_simulation():
    s, kappa, shape = 0.3, 0.6, (400, 500)
    n = shape[0] * shape[1]
    disk = DiSKFilter(kappa)
    for t in range(1, 21):
        out = disk({"w": _noisy(shape, s, 9, t)}, s, t)["w"].double()
        if t in (1, 2, 5, 20):
            ratio = float(out.var()) / disk_noise_std(s, kappa, t) ** 2
            assert abs(ratio - 1) < Z * math.sqrt(2 / (n - 1)), (t, ratio)


def _quadratic(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(12, 8, generator=gen, dtype=torch.float64)
    b = torch.randn(12, generator=gen, dtype=torch.float64)
    return lambda x: a.T @ (a @ x - b)  # the gradient of 0.5 |a x - b|^2


@pytest.mark.parametrize("with_adam", [False, True])
def test_disk_chain_with_sgd_is_disk(with_adam):
    """The reference: DiSK's loop on a quadratic with known noise, x_{t+1} = x_t - lr a_t,
    a_t = d_t (DiSK-SGD) or an Adam direction of d_t, d_t filtered from the gradient at
    z_t = x_t + gamma (x_t - x_{t-1}). The chain: the parameters hold z, SGD applies its
    output, x = z + lr * iterate_offset()."""
    grad, kappa, lr = _quadratic(), 0.6, 0.05
    gamma = (1 - kappa) / kappa
    noise = [torch.randn(8, dtype=torch.float64) * 0.1 for _ in range(15)]
    # Reference.
    x_prev = x = torch.zeros(8, dtype=torch.float64)
    d = None
    reference_adam = DPAdam(beta1=0.0, variance_correction=False, second_moment_from="input")
    xs = []
    for t in range(15):
        z = x + gamma * (x - x_prev)
        g = grad(z) + noise[t]
        d = g if d is None else (1 - kappa) * d + kappa * g
        a = reference_adam({"w": d}, 0.1, t)["w"] if with_adam else d
        x_prev, x = x, x - lr * a
        xs.append(x)
    # The chain.
    stages = [DiSKFilter(kappa)]
    if with_adam:
        stages.append(DPAdam(beta1=0.0, variance_correction=False, second_moment_from="input"))
    stages.append(DiSKExtrapolation(kappa))
    z = torch.zeros(8, dtype=torch.float64)
    for t in range(15):
        u = post_process(stages, {"w": grad(z) + noise[t]}, 0.1, t)["w"]
        z = z - lr * u
        x = z + lr * stages[-1].iterate_offset()["w"]
        # The stages compute in float32: agreement to its rounding (a wrong gamma or weight
        # convention is off by percents).
        torch.testing.assert_close(x, xs[t], rtol=1e-5, atol=1e-6)
    if not with_adam:  # DiSK-SGD: z moves by the released gradient itself (after step 1)
        stages = [DiSKFilter(kappa), DiSKExtrapolation(kappa)]
        for t in range(4):
            g = torch.randn(8, dtype=torch.float64)
            u = post_process(stages, {"w": g}, 0.1, t)["w"]
            torch.testing.assert_close(u, g / kappa if t == 0 else g, rtol=1e-5, atol=1e-6)


def test_disk_extrapolation_may_only_end_the_chain():
    build_chain(None, [DiSKFilter(), DPAdam(0.0), DiSKExtrapolation()])
    with pytest.raises(ValueError, match="must be the last stage"):
        build_chain(None, [DiSKExtrapolation(), DiSKFilter()])
    with pytest.raises(ValueError, match="kappa must be in"):
        DiSKFilter(0.0)


# ------------------------------------------------------------------------------------------
# TrajectoryDenoiser
# ------------------------------------------------------------------------------------------


def test_trajectory_denoiser_equals_shrinking_the_running_sum(monkeypatch):
    options = {"kappa": 0.5, "min_dim": 1, "seed": 5}
    stage = TrajectoryDenoiser(options)
    reference = Denoiser(options)  # the same op sequence (seeds, any warm start) on the sums
    total, previous, lr, w = torch.zeros(30, 40), torch.zeros(30, 40), 0.1, torch.zeros(30, 40)
    sigmas = []
    for t in range(6):
        sigma = 0.2
        grads = {"w": torch.randn(30, 40) * sigma, "b": torch.randn(40)}
        stage.record_stats = t == 5
        out = stage(grads, sigma, t)
        total = total + grads["w"]
        sigmas.append(sigma)
        level = math.sqrt(sum(s * s for s in sigmas))
        assert stage.noise_std() == pytest.approx(level, rel=1e-12)
        shrunk = reference({"w": total.clone()}, level, t)["w"]
        assert torch.equal(out["w"], shrunk - previous) or t == 0
        if t == 0:
            assert torch.equal(out["w"], shrunk)
        assert out["b"] is grads["b"]  # not a matrix: passed on
        previous = shrunk
        w = w - lr * out["w"]
    # Plain SGD at a constant lr: W_t = W_0 - lr * D_t (up to the rounding of the steps).
    torch.testing.assert_close(w, -lr * previous, rtol=1e-5, atol=1e-6)
    stats = stage.take_stats()
    assert stats["w"]["sigma"] == pytest.approx(0.2 * math.sqrt(6), rel=1e-12)
    assert math.isnan(stage.output_sigma(0.2, 0)) and stage.terminal


def test_trajectory_state_round_trips_and_is_validated():
    stage = TrajectoryDenoiser({"kappa": 0.5, "min_dim": 1})
    for t in range(3):
        stage({"w": torch.randn(8, 9), "b": torch.randn(9)}, 0.3, t)
    other = TrajectoryDenoiser({"kappa": 0.5, "min_dim": 1})
    other.load_state_dict(_round_trip(stage.state_dict()))
    g = {"w": torch.randn(8, 9), "b": torch.randn(9)}
    assert torch.equal(stage(g, 0.3, 3)["w"], other(g, 0.3, 3)["w"])
    restricted = TrajectoryDenoiser({"kappa": 0.5, "min_dim": 1}, keys=["v"])
    with pytest.raises(ValueError, match="which it does not shrink"):
        restricted.load_state_dict(stage.state_dict())
    with pytest.raises(ValueError, match="changed since the last step"):
        stage({"w": torch.randn(8, 10), "b": torch.randn(9)}, 0.3, 4)


# ------------------------------------------------------------------------------------------
# The chain in the native engine
# ------------------------------------------------------------------------------------------


def test_chain_rules():
    ema, adam = EMAFilter(), DPAdam()
    with pytest.raises(ValueError, match="must be the last stage"):
        build_chain(None, [adam, ema])
    with pytest.raises(ValueError, match="appears twice"):
        build_chain(None, [ema, ema])
    with pytest.raises(TypeError, match="post_processors must be a list"):
        build_chain(None, ema)
    with pytest.raises(TypeError, match=r"post_processors\[0\] must be a PostProcessor"):
        build_chain(None, [3])
    # denoise= is a Denoiser at the front.
    chain = build_chain({"kappa": 0.5}, [ema])
    assert type(chain[0]) is Denoiser and chain[1] is ema
    assert chain[0].options.given_options() == {"kappa": 0.5}


def _clean_grads() -> dict[str, torch.Tensor]:
    model, opt, loader = _private(noise=0.0)
    x, y = next(iter(loader))
    _backward(model, x, y)
    opt.step()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _copy(value):
    return {k: g.clone() for k, g in value.items()} if isinstance(value, dict) else value


class Spy:
    """Wraps a stage's ``__call__`` to keep a copy of every argument it gets."""

    def __init__(self, stage, monkeypatch):
        self.calls: list[tuple[tuple, dict]] = []
        real = type(stage).__call__

        def call(this, *args, **kwargs):
            if this is stage:
                copied = {k: _copy(v) for k, v in kwargs.items()}
                self.calls.append((tuple(_copy(a) for a in args), copied))
            return real(this, *args, **kwargs)

        monkeypatch.setattr(type(stage), "__call__", call)


def _stage_chains():
    return {
        "ema": lambda: [EMAFilter(0.9)],
        "moment": lambda: [
            EMAFilter(0.9),
            Denoiser({"kappa": 1.0, "min_dim": 1}),
            DPAdam(beta1=0.0),
        ],
        "dp_adam_bc": lambda: [DPAdam()],
        "dp_adam_input": lambda: [EMAFilter(0.5), DPAdam(second_moment_from="input")],
        "disk": lambda: [DiSKFilter(0.7), DiSKExtrapolation(0.7)],
        "disk_adam": lambda: [
            DiSKFilter(0.6),
            Denoiser({"kappa": 0.5, "min_dim": 1}),
            DPAdam(beta1=0.0),
            DiSKExtrapolation(0.6),
        ],
        "trajectory": lambda: [TrajectoryDenoiser({"kappa": 0.5, "min_dim": 1})],
    }


@pytest.mark.parametrize("name", list(_stage_chains()))
def test_the_clean_gradient_never_reaches_a_stage(name, monkeypatch):
    """Every stage gets the released gradient (clean + the engine's noise, exactly) or what an
    earlier stage made of it, and public numbers; what reaches ``p.grad`` is the same chain run
    again, outside the engine, on the recorded released gradients alone."""
    clean = _clean_grads()
    chain = _stage_chains()[name]()
    spies = [Spy(stage, monkeypatch) for stage in chain]
    # lr 0: the weights stay, so each step's clean gradient is the same full batch's.
    model, opt, loader = _private(noise=1.0, chain=chain, lr=0.0)
    engine = opt.engine
    released_per_step, written = [], []
    for step in range(3):
        x, y = next(iter(loader))
        _backward(model, x, y)
        opt.step()
        written.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.zero_grad()
        (args, _) = spies[0].calls[-1]
        grads, sigma, seen_step = args
        assert sigma == engine.sigma() and seen_step == step
        released_per_step.append(grads)
    # The first stage's input is the noisy release of the clean gradient (the engine's noise
    # draw, fused into the clipped sum: rounded differently), every entry moved.
    for step, grads in enumerate(released_per_step):
        for i, key in enumerate(engine.param_names):
            offset = noise_offset(step, i, len(engine.params))
            noisy = add_gaussian_noise(clean[key], engine.sigma(), SEED, offset)
            torch.testing.assert_close(grads[key], noisy, rtol=0, atol=1e-6)
            assert bool((grads[key] != clean[key]).all()), key
    # A stage that needs the released gradient gets exactly the first stage's input.
    for stage, spy in zip(chain, spies, strict=True):
        if stage.needs_released:
            for (_, kwargs), released in zip(spy.calls, released_per_step, strict=True):
                assert kwargs["released_sigma"] == engine.sigma()
                assert all(torch.equal(kwargs["released"][k], released[k]) for k in released)
    # The same chain, fresh, on the recorded releases alone: the same gradients written.
    replay = _stage_chains()[name]()
    for stage, original in zip(replay, chain, strict=True):
        if stage.shrinks_matrices:
            stage.restrict_to(original.keys)
    monkeypatch.undo()
    for step, (released, out) in enumerate(zip(released_per_step, written, strict=True)):
        got = post_process(replay, released, engine.sigma(), step)
        for key in out:
            assert torch.equal(got[key].to(out[key].dtype), out[key]), (step, key)


def test_every_denoiser_in_the_chain_takes_the_engines_filter_decision():
    chain = [EMAFilter(), Denoiser({"min_dim": 1}), Denoiser({"min_dim": 1}, keys=["0.weight"])]
    _, opt, _ = _private(chain=chain)
    # nn.Linear weights only (denoise_linear_weights), never biases.
    assert chain[1].keys == frozenset({"0.weight", "2.weight"})
    assert chain[2].keys == frozenset({"0.weight"})  # a caller's restriction narrows it
    assert opt.engine.denoiser is chain[1]


def test_denoise_and_post_processors_together_put_the_denoiser_first():
    ema = EMAFilter()
    _, opt, _ = _private(chain=[ema], denoise={"kappa": 0.5})
    chain = opt.engine.post_processors
    assert len(chain) == 2 and type(chain[0]) is Denoiser and chain[1] is ema
    assert opt.engine.denoiser is chain[0] and opt.engine.denoise_options == {"kappa": 0.5}


def test_denoise_stats_say_the_noise_level_each_stage_used():
    model, opt, loader = _private(chain=[EMAFilter(0.9), Denoiser({"kappa": 0.5}), DPAdam(0.0)])
    engine = opt.engine
    for step in range(3):
        engine.record_denoise_stats = step == 2
        x, y = next(iter(loader))
        _backward(model, x, y)
        opt.step()
        opt.zero_grad()
    stats = engine.take_denoise_stats()
    assert set(stats) == {"0.weight"}  # 40 x 48; the 3 x 48 head is below min_dim
    record = stats["0.weight"]
    assert record["stage"] == 1
    assert record["sigma"] == pytest.approx(ema_noise_std(engine.sigma(), 0.9, 3), rel=1e-12)
    assert 0 <= record["rank"] <= 40 and record["norm_ratio"] >= 0


def _train(chain_factory, steps, *, resume_at=None, forget=False):
    """``steps`` private steps of an MLP through the chain; with ``resume_at``, the engine,
    model and optimizer states go through torch.save / torch.load(weights_only=True) there and
    a fresh model (another init), optimizer and chain continue (``forget``: without the
    stages' states)."""

    def build(init):
        # One full batch per step: the data of step k does not depend on where a run resumed.
        model, opt, loader = _private(_mlp(init), chain=chain_factory(), lr=0.05)
        return model, opt, loader

    model, opt, loader = build(0)
    done = 0
    while done < steps:
        for x, y in loader:
            _backward(model, x, y)
            opt.step()
            opt.zero_grad()
            done += 1
            if done == resume_at:
                saved = _round_trip(
                    {
                        "engine": opt.engine.state_dict(),
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                    }
                )
                model, opt, loader = build(7)
                if forget:  # the fresh stages' own states: as if none had been saved
                    saved["engine"]["post_processors"] = opt.engine.state_dict()["post_processors"]
                model.load_state_dict(saved["model"])
                opt.load_state_dict(saved["optimizer"])
                opt.engine.load_state_dict(saved["engine"])
                break
            if done == steps:
                break
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(_stage_chains()))
def test_a_resumed_run_is_bit_identical(name):
    factory = _stage_chains()[name]
    straight = _train(factory, 6)
    resumed = _train(factory, 6, resume_at=3)
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    # Guard: a resume without the stages' states differs.
    forgot = _train(factory, 6, resume_at=3, forget=True)
    assert any(not torch.equal(straight[k], forgot[k]) for k in straight)


# ------------------------------------------------------------------------------------------
# The Opacus drop-in
# ------------------------------------------------------------------------------------------


def _opacus_pair(chain, *, noise=1.0, seed=5):
    """A plain Opacus DPOptimizer and our twin with ``chain``, on copies of one model, with
    noise generators seeded alike: the same released gradients."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from rmt_kernels.opacus import DenoisingDPOptimizer

    made = []
    for post_processors in (None, chain):
        gsm = GradSampleModule(_mlp())
        kwargs = dict(
            noise_multiplier=noise,
            max_grad_norm=C,
            expected_batch_size=BATCH,
            generator=torch.Generator().manual_seed(seed),
        )
        sgd = torch.optim.SGD(gsm.parameters(), lr=0.0)
        if post_processors is None:
            made.append((gsm, DPOptimizer(sgd, **kwargs)))
        else:
            made.append((gsm, DenoisingDPOptimizer(sgd, post_processors=chain, **kwargs)))
    return made


@pytest.mark.parametrize("name", list(_stage_chains()))
def test_the_drop_in_feeds_the_chain_the_released_gradient_only(name, monkeypatch):
    """Opacus's released p.grad (a plain DPOptimizer with the same noise draws) is what the
    chain's first stage gets; what the twin writes is the chain replayed on those alone."""
    chain = _stage_chains()[name]()
    spy = Spy(chain[0], monkeypatch)
    (plain_model, plain), (model, twin) = _opacus_pair(chain)
    x, y = _data(BATCH)[:]
    released, written, steps = [], [], []
    for _ in range(3):
        for m, opt in ((plain_model, plain), (model, twin)):
            _backward(m, x, y)
            steps.append(twin.denoise_steps)
            opt.step()
        released.append({i: p.grad.clone() for i, p in enumerate(plain.params)})
        written.append({i: p.grad.clone() for i, p in enumerate(twin.params)})
        for opt in (plain, twin):
            opt.zero_grad()
    sigma = 1.0 * C / BATCH  # Opacus's noise std on the sum, over the expected batch
    for (args, _), grads in zip(spy.calls, released, strict=True):
        got, got_sigma, _ = args
        assert got_sigma == sigma
        assert set(got) == set(grads) and all(torch.equal(got[i], grads[i]) for i in grads)
    replay = _stage_chains()[name]()
    monkeypatch.undo()
    for t, (grads, out) in enumerate(zip(released, written, strict=True)):
        again = post_process(replay, grads, sigma, steps[2 * t + 1])
        assert all(torch.equal(again[i].to(out[i].dtype), out[i]) for i in out), t


def test_the_drop_in_advances_the_sketch_seed_for_any_shrinking_stage():
    (_, _), (model, twin) = _opacus_pair([TrajectoryDenoiser({"min_dim": 1})])
    x, y = _data(BATCH)[:]
    for t in range(3):
        assert twin.denoise_steps == t
        _backward(model, x, y)
        twin.step()
        twin.zero_grad()
    # A chain without one leaves it at 0, as before.
    (_, _), (model, twin) = _opacus_pair([EMAFilter()])
    _backward(model, x, y)
    twin.step()
    assert twin.denoise_steps == 0


@pytest.mark.parametrize("name", ["moment", "disk_adam", "trajectory"])
def test_the_drop_ins_chain_state_round_trips(name):
    """The twin's state_dict carries the stages' states (torch.load(weights_only=True)); a
    fresh twin loaded with it continues bit-identically."""
    (_, _), (model, twin) = _opacus_pair(_stage_chains()[name]())
    x, y = _data(BATCH)[:]
    for _ in range(2):
        _backward(model, x, y)
        twin.step()
        twin.zero_grad()
    state = _round_trip(twin.state_dict())
    # The documented key (DenoisingDPOptimizer.state_dict), one state per stage.
    assert len(state["rmt_denoise"]["post_processors"]) == len(twin.post_processors)
    (_, _), (model2, twin2) = _opacus_pair(_stage_chains()[name]())
    model2.load_state_dict(model.state_dict())
    twin2.load_state_dict(state)
    for m, opt in ((model, twin), (model2, twin2)):
        opt.generator.manual_seed(99)  # the same next noise draw
        _backward(m, x, y)
        opt.step()
    for p, q in zip(twin.params, twin2.params, strict=True):
        assert torch.equal(p.grad, q.grad)
    # Guard: without the loaded state the step differs.
    (_, _), (model3, twin3) = _opacus_pair(_stage_chains()[name]())
    model3.load_state_dict(model.state_dict())
    twin3.generator.manual_seed(99)
    _backward(model3, x, y)
    twin3.step()
    pairs = zip(twin.params, twin3.params, strict=True)
    assert any(not torch.equal(p.grad, q.grad) for p, q in pairs)
