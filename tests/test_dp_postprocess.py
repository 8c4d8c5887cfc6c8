"""The post-processing stage of the private step (rmt_kernels/dp/stages/), shared by the
native engine and the Opacus drop-in: what a post-processor sees, its state through a checkpoint,
one Denoiser and one option check for both engines, and the engine's public step API."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rmt_kernels import ops
from rmt_kernels.dp import (
    CheckpointError,
    DiSKExtrapolation,
    DPAdam,
    EMAFilter,
    PrivateEngine,
    load_checkpoint,
    make_private,
)
from rmt_kernels.dp import save_checkpoint as save
from rmt_kernels.dp.noise_key import derived_seed, seed_id_of
from rmt_kernels.dp.stages.denoiser import Denoiser
from rmt_kernels.dp.stages.options import (
    DENOISE_OPTIONS,
    DenoiseOptionError,
    DenoiseOptions,
    check_denoise_options,
)
from rmt_kernels.dp.stages.protocol import CallableStage, PostProcessor
from rmt_kernels.ops import add_gaussian_noise, noise_offset

pytest.importorskip("opacus")

# Public seeds keep these tests reproducible; the warning is tested in test_dp_adversarial.py.
pytestmark = pytest.mark.filterwarnings("ignore:make_private. seed=:UserWarning")

IN, HIDDEN, CLASSES, BATCH, C, SEED = 40, 48, 3, 8, 0.5, 1234
ROOT = Path(__file__).resolve().parents[1]


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def _data(n: int = BATCH, seed: int = 1) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, IN, generator=gen), torch.randint(0, CLASSES, (n,), generator=gen)
    )


def _private(model=None, *, noise=1.0, denoise=None, poisson=False, n=BATCH, lr=0.0):
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
    )


def _backward(model, x, y) -> None:
    nn.functional.cross_entropy(model(x), y).backward()


class Recorder(PostProcessor):
    """Keeps what it is given; returns every gradient doubled (to see its output used)."""

    def __init__(self) -> None:
        self.seen: list[tuple[dict[str, torch.Tensor], float, int]] = []

    def __call__(self, grads, sigma, step):
        self.seen.append(({k: g.clone() for k, g in grads.items()}, sigma, step))
        return {k: 2 * g for k, g in grads.items()}


class EMA(PostProcessor):
    """A stateful post-processor: exponential moving average of the released gradients."""

    def __init__(self, beta: float = 0.5) -> None:
        self.beta = beta
        self.m: dict[str, torch.Tensor] = {}

    def __call__(self, grads, sigma, step):
        for k, g in grads.items():
            old = self.m.get(k)
            self.m[k] = g.clone() if old is None else self.beta * old + (1 - self.beta) * g
        return dict(self.m)

    def state_dict(self):
        return {"m": {k: v.clone() for k, v in self.m.items()}}

    def load_state_dict(self, state):
        self.m = {k: v.clone() for k, v in state["m"].items()}


def _clean_grads() -> dict[str, torch.Tensor]:
    """The noise-free clipped averaged gradient of one batch, by parameter name."""
    model, opt, loader = _private(noise=0.0)
    x, y = next(iter(loader))
    _backward(model, x, y)
    opt.step()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("accumulated", [True, False])
def test_post_processor_sees_clean_plus_the_engines_noise_and_public_numbers(accumulated):
    clean = _clean_grads()
    model, opt, loader = _private(noise=1.0)
    engine = opt.engine
    recorder = Recorder()
    engine.post_processors.append(recorder)
    x, y = next(iter(loader))
    _backward(model, x, y)
    if accumulated:  # folded in without noise: the noise is added on its own at the step
        opt.signal_skip_step(True)
        opt.step()
        opt.zero_grad()
    opt.step()
    ((grads, sigma, step),) = recorder.seen
    assert sigma == engine.sigma() == 1.0 * C / BATCH and step == 0
    assert list(grads) == engine.param_names == [n for n, _ in model.named_parameters()]
    for i, (name, p) in enumerate(model.named_parameters()):
        offset = noise_offset(0, i, len(engine.params))
        expected = add_gaussian_noise(clean[name], engine.sigma(), SEED, offset)
        if accumulated:
            assert torch.equal(grads[name], expected), name
        else:  # the noise fused into the clipped sum: the same draw, rounded differently
            torch.testing.assert_close(grads[name], expected, rtol=0, atol=1e-6, msg=name)
        noise = grads[name] - clean[name]
        # Never the clean gradient: every entry moved, by noise of std sigma (the smallest
        # tensor has 3 entries: a loose bound, the 1920-entry one is checked tightly below).
        assert bool((noise != 0).all()), name
        if noise.numel() > 1000:
            assert 0.85 < float(noise.std()) / engine.sigma() < 1.15, name
        assert torch.equal(p.grad, 2 * grads[name]), name  # its output is what is written


def test_a_post_processor_that_drops_a_gradient_is_refused():
    model, opt, loader = _private()
    opt.engine.post_processors.append(CallableStage(lambda grads, sigma, step: {}))
    x, y = next(iter(loader))
    _backward(model, x, y)
    with pytest.raises(RuntimeError, match=r"returned no gradient for \['0.weight'"):
        opt.step()


def _run(path: Path, steps: int, *, resume_at: int | None = None, restore_ema=True):
    """Train ``steps`` logical steps over the Poisson loader with [Denoiser, EMA]; with
    ``resume_at`` stop after that many steps, checkpoint, rebuild everything and resume."""

    def build(seed):
        model, opt, loader = _private(
            _mlp(seed), denoise={"kappa": 0.5, "min_dim": 1}, poisson=True, n=64, lr=0.1
        )
        ema = EMA()
        opt.engine.post_processors.append(ema)
        return model, opt, loader, ema

    model, opt, loader, ema = build(0)
    while opt.engine.steps < steps:
        for x, y in loader:
            if len(x):
                _backward(model, x, y)
            opt.step()
            opt.zero_grad()
            if resume_at is not None and opt.engine.steps == resume_at:
                save(path, model, opt, loader)
                model, opt, loader, ema = build(7)  # another initialisation: all from the file
                load_checkpoint(path, model, opt, loader)
                if not restore_ema:
                    ema.m = {}  # as if its state had not been checkpointed
                resume_at = None
                break
            if opt.engine.steps == steps:
                break
    return {n: p.detach().clone() for n, p in model.named_parameters()}, ema


def test_post_processor_state_round_trips_and_a_resumed_run_is_bit_identical(tmp_path):
    straight, ema_straight = _run(tmp_path / "a.pt", 4)
    resumed, ema_resumed = _run(tmp_path / "b.pt", 4, resume_at=2)
    for n in straight:
        assert torch.equal(straight[n], resumed[n]), n
    for k in ema_straight.m:
        assert torch.equal(ema_straight.m[k], ema_resumed.m[k]), k
    # Guard: without its state the EMA restarts, and the resumed run differs.
    forgot, _ = _run(tmp_path / "c.pt", 4, resume_at=2, restore_ema=False)
    assert any(not torch.equal(straight[n], forgot[n]) for n in straight)


def test_checkpoint_of_other_post_processors_is_refused(tmp_path):
    model, opt, loader = _private(poisson=True, n=64, denoise={})
    opt.engine.post_processors.append(EMA())
    opt.step()
    save(tmp_path / "c.pt", model, opt, loader)
    model, opt, loader = _private(poisson=True, n=64, denoise={})
    with pytest.raises(CheckpointError, match="2 post-processor states for 1 post-processors"):
        load_checkpoint(tmp_path / "c.pt", model, opt, loader)


def test_checkpoint_without_post_processor_states_is_refused(tmp_path, monkeypatch):
    """The layout written before post-processors kept state: format version 1 read it, version
    2 refuses it, naming the field, before anything is loaded."""
    real = PrivateEngine.state_dict

    def old_format(self):
        state = real(self)
        del state["post_processors"]
        return state

    model, opt, loader = _private(poisson=True, n=64, denoise={})
    opt.step()
    with monkeypatch.context() as m:
        m.setattr(PrivateEngine, "state_dict", old_format)
        save(tmp_path / "old.pt", model, opt, loader)
    model, opt, loader = _private(poisson=True, n=64, denoise={})
    with pytest.raises(CheckpointError, match=r"lacks engine\.post_processors"):
        load_checkpoint(tmp_path / "old.pt", model, opt, loader)
    assert opt.engine.steps == 0


OPTIONS = {"kappa": 0.5, "min_dim": 1, "seed": 7}


def test_both_engines_run_the_same_denoiser_with_the_same_result(monkeypatch):
    from opacus import GradSampleModule

    from rmt_kernels.opacus import DenoisingDPOptimizer

    calls = []
    real = Denoiser.__call__

    def spy(self, grads, sigma, step):
        out = real(self, grads, sigma, step)
        calls.append((self, {k: g.clone() for k, g in grads.items()}, sigma, step, out))
        return out

    monkeypatch.setattr(Denoiser, "__call__", spy)
    # The native engine: one step.
    model, opt, loader = _private(denoise=OPTIONS)
    x, y = next(iter(loader))
    _backward(model, x, y)
    opt.step()
    ((denoiser, noisy, sigma, step, out),) = calls
    assert denoiser is opt.engine.denoiser and type(denoiser) is Denoiser
    assert not torch.equal(out["0.weight"], noisy["0.weight"])  # it did denoise
    # The Opacus drop-in: a step goes through a Denoiser too.
    gsm = GradSampleModule(_mlp())
    opacus_opt = DenoisingDPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=0.0),
        noise_multiplier=1.0,
        max_grad_norm=C,
        expected_batch_size=BATCH,
        generator=torch.Generator().manual_seed(1),
        denoise=OPTIONS,
    )
    _backward(gsm, x, y)
    opacus_opt.step()
    assert calls[1][0] is opacus_opt.denoiser and type(opacus_opt.denoiser) is Denoiser
    # Same noisy gradient, sigma and step in: the same result out of the drop-in's own path.
    layer = nn.Linear(IN, HIDDEN)
    opacus_opt = DenoisingDPOptimizer(
        torch.optim.SGD(layer.parameters(), lr=0.0),
        noise_multiplier=1.0,
        max_grad_norm=C,
        expected_batch_size=BATCH,
        denoise=OPTIONS,
    )
    layer.weight.grad, layer.bias.grad = noisy["0.weight"].clone(), noisy["0.bias"].clone()
    opacus_opt.denoise_sigma = lambda: sigma  # what scale_grad leaves: the engine's sigma
    opacus_opt.denoise_steps = step
    opacus_opt._denoise_grads()
    assert torch.equal(layer.weight.grad, out["0.weight"])
    assert torch.equal(layer.bias.grad, noisy["0.bias"])


@pytest.mark.parametrize(
    "denoise",
    [
        {"kapa": 2.0},
        {"shrinker": "bogus"},
        {"kappa": -1.0},
        {"rank": 0},
        {"seed": 1.5},
        {"seed": None},
        {"seed": 2**63},
        {"niter": 2.0},
        {"min_dim": 0},
        {"min_dim": 2.0},
        {"warm_start": 1},
        {"warm_start": "no"},
        {"warm_start": None},
        [("kappa", 1.0)],
    ],
)
def test_one_validation_error_for_both_engines(denoise):
    from rmt_kernels.opacus import DenoisingDPOptimizer, DenoisingPrivacyEngine

    errors = []
    with pytest.raises((TypeError, ValueError)) as native:
        _private(denoise=denoise)
    errors.append(native.value)
    model = _mlp()
    with pytest.raises((TypeError, ValueError)) as opacus:
        DenoisingDPOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            noise_multiplier=1.0,
            max_grad_norm=C,
            expected_batch_size=BATCH,
            denoise=denoise,
        )
    errors.append(opacus.value)
    model = _mlp()
    with pytest.raises((TypeError, ValueError)) as drop_in:
        DenoisingPrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(_data(), batch_size=BATCH),
            noise_multiplier=1.0,
            max_grad_norm=C,
            denoise=denoise,
        )
    errors.append(drop_in.value)
    with pytest.raises((TypeError, ValueError)) as direct:
        check_denoise_options(denoise)
    errors.append(direct.value)
    assert len({type(e) for e in errors}) == 1 and len({str(e) for e in errors}) == 1, errors


def test_unknown_option_is_both_a_type_and_a_value_error():
    # make_private raised ValueError for it, the Opacus drop-in TypeError: both still catch it.
    for kind in (TypeError, ValueError, DenoiseOptionError):
        with pytest.raises(kind, match=r"unknown option.*'kapa'"):
            check_denoise_options({"kapa": 1.0})


def test_denoise_options_are_one_frozen_object_with_the_ops_defaults():
    import dataclasses
    import inspect

    op = {
        name: p.default
        for name, p in inspect.signature(ops.denoise).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    # Every op option is a DenoiseOptions field with the op's default (no drift), plus the
    # Denoiser's own three.
    assert {k: DENOISE_OPTIONS[k] for k in op} == op
    assert set(DENOISE_OPTIONS) - set(op) == {"min_dim", "warm_start", "passthrough_below_edge"}
    given = {"kappa": 0.5, "seed": np.int64(3), "min_dim": 1}
    options = check_denoise_options(given)
    assert isinstance(options, DenoiseOptions) and options.kappa == 0.5 and options.rank == -1
    assert options.given_options() == {"kappa": 0.5, "seed": 3, "min_dim": 1}
    assert type(options.seed) is int  # a NumPy integer would overflow in seed + step
    # Only the given op options reach the op, the seed always, advanced by the step.
    assert options.op_options(5) == {"kappa": 0.5, "seed": 8}
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.kappa = 2.0  # type: ignore[misc]
    given["kappa"] = 2.0  # the caller's dict is not the run's
    assert options.kappa == 0.5
    # Validated once, then carried: the chain's Denoiser holds the very object.
    assert check_denoise_options(options) is options
    _, opt, _ = _private(denoise=options)
    assert opt.engine.denoiser.options is options
    assert opt.engine.denoise_options == {"kappa": 0.5, "seed": 3}
    # Built directly, the options are checked the same way, and all count as given.
    with pytest.raises(ValueError, match="min_dim must be >= 1"):
        DenoiseOptions(min_dim=0)
    assert DenoiseOptions(kappa=0.5).given_options() == DENOISE_OPTIONS | {"kappa": 0.5}


def test_the_protocol_declares_every_hook_with_its_default():
    """The chain calls each hook directly: a stage overriding only ``__call__`` (and a plain
    function, wrapped) gets the documented defaults."""

    class Minimal(PostProcessor):
        def __call__(self, grads, sigma, step):
            return grads

    stage = Minimal()
    assert not stage.terminal and not stage.after_direction and not stage.needs_released
    assert not stage.shrinks_matrices and not stage.record_stats and stage.keys is None
    assert stage.output_sigma(0.3, 2) == 0.3 and not stage.eligible((64, 64))
    assert stage.selected({"w": torch.zeros(64, 64)}) == [] and stage.take_stats() == {}
    assert stage.state_dict() == {}
    stage.restrict_to(["w"])  # nothing to restrict
    with pytest.raises(ValueError, match="keeps no state"):
        stage.load_state_dict({"m": 1})
    assert Denoiser().shrinks_matrices and DPAdam().terminal and DiSKExtrapolation().terminal
    assert DiSKExtrapolation().after_direction and not EMAFilter().shrinks_matrices


def test_a_plain_function_is_a_stage_through_both_engines_and_a_checkpoint(tmp_path):
    from rmt_kernels.opacus import DenoisingDPOptimizer

    seen = []

    def halve(grads, sigma, step):
        seen.append(sigma)
        return {k: g / 2 for k, g in grads.items()}

    with pytest.raises(ValueError, match="appears twice"):
        _private_with([halve, halve])
    with pytest.raises(ValueError, match="appears twice"):
        _private_with([CallableStage(halve), halve])
    model, opt, loader = _private_with([halve], poisson=True, n=64)
    (stage,) = opt.engine.post_processors
    assert isinstance(stage, CallableStage) and stage.function is halve
    assert repr(stage) == repr(halve)
    x, y = next(iter(loader))
    _backward(model, x, y)
    opt.step()
    assert seen == [opt.engine.sigma()]
    save(tmp_path / "c.pt", model, opt, loader)  # its state: {}
    model, opt, loader = _private_with([halve], poisson=True, n=64)
    load_checkpoint(tmp_path / "c.pt", model, opt, loader)
    assert opt.engine.steps == 1
    # The Opacus drop-in wraps it the same way; its state rides in the optimizer's.
    other = _mlp()
    dropin = DenoisingDPOptimizer(
        torch.optim.SGD(other.parameters(), lr=0.1),
        noise_multiplier=1.0,
        max_grad_norm=C,
        expected_batch_size=BATCH,
        post_processors=[halve],
    )
    assert isinstance(dropin.post_processors[0], CallableStage)
    assert dropin.state_dict()["rmt_denoise"]["post_processors"] == [{}]
    dropin.load_state_dict(dropin.state_dict())
    with pytest.raises(ValueError, match="keeps no state"):
        dropin.load_state_dict(
            {**dropin.state_dict(), "rmt_denoise": {"steps": 0, "post_processors": [{"m": 1}]}}
        )


def _private_with(post_processors, *, poisson=False, n=BATCH):
    model = _mlp()
    loader = DataLoader(_data(n), batch_size=BATCH, generator=torch.Generator().manual_seed(11))
    return make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        loader,
        target_delta=1e-5,
        max_grad_norm=C,
        noise_multiplier=1.0,
        poisson_sampling=poisson,
        seed=SEED,
        accountant="rdp",
        post_processors=post_processors,
    )


def test_a_fixed_rank_is_capped_per_matrix_in_the_native_engine_too():
    # rank 45 is above the 40 x 48 weight's smaller side and the 3 x 48 head's: capped, as the
    # Opacus drop-in always did (the native engine used to fail at the first step).
    model, opt, loader = _private(denoise={"rank": 45, "min_dim": 1})
    x, y = next(iter(loader))
    _backward(model, x, y)
    opt.step()
    assert all(bool(p.grad.isfinite().all()) for p in model.parameters())


def test_engine_public_step_api():
    model, opt, loader = _private()
    engine = opt.engine
    x, y = next(iter(loader))
    assert not engine.step_in_progress()
    _backward(model, x, y)
    assert engine.step_in_progress()
    engine.accumulate_pending()  # folded in, not released: still in progress
    assert engine.step_in_progress()
    with pytest.raises(RuntimeError, match="logical step is in progress"):
        engine.state_dict()
    opt.step()
    state = engine.state_dict()
    assert state["steps"] == 1 and state["seed"] == SEED  # a public seed is state
    assert state["post_processors"] == []
    seed_id = engine.seed_id
    engine.rekey_noise(3)
    # Reproducible from the old seed and the salt (what a crashed run's restart relies on).
    assert engine.noise_key.seed == derived_seed(SEED, 3) != SEED
    assert engine.seed_id == seed_id_of(engine.noise_key.seed) != seed_id
    assert engine.state_dict()["seed"] == engine.noise_key.seed


def test_rekey_is_refused_in_secure_mode():
    model = _mlp()
    _, opt, _ = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        DataLoader(_data(), batch_size=BATCH),
        target_delta=1e-5,
        max_grad_norm=C,
        noise_multiplier=1.0,
        secure_mode=True,
    )
    with pytest.raises(RuntimeError, match="fresh from the OS"):
        opt.engine.rekey_noise(1)
    assert opt.engine.state_dict()["seed"] is None  # a secret seed is never state


def test_optimizer_and_checkpoint_use_only_the_engines_public_api():
    for name in ("optimizer.py", "checkpoint.py"):
        source = (ROOT / "rmt_kernels" / "dp" / name).read_text()
        assert not re.findall(r"engine\._\w+", source), name


# ------------------------------------------------------------------------------------------
# Warm starts: the Denoiser keeps each matrix's basis across steps (issue 14, item 2)
# ------------------------------------------------------------------------------------------


class Passthrough(PostProcessor):
    """Keeps the released gradients it is given (run first: the stage's input) and changes
    nothing."""

    def __init__(self) -> None:
        self.seen: list[dict[str, torch.Tensor]] = []

    def __call__(self, grads, sigma, step):
        self.seen.append({k: g.clone() for k, g in grads.items()})
        return grads


class WarmSpy:
    """Records what denoise_warm is given and returns, and refuses denoise_many (or the
    reverse, ``cold=True``)."""

    def __init__(self, monkeypatch, *, cold: bool = False) -> None:
        self.calls: list[dict] = []
        self._warm, self._many = ops.denoise_warm, ops.denoise_many
        if cold:
            monkeypatch.setattr(ops, "denoise_warm", self._refused)
            monkeypatch.setattr(ops, "denoise_many", self.many)
        else:
            monkeypatch.setattr(ops, "denoise_warm", self.warm)
            monkeypatch.setattr(ops, "denoise_many", self._refused)

    def warm(self, grad, sigma, basis=None, **options):
        estimate, new_basis, passes = self._warm(grad, sigma, basis, **options)
        self.calls.append(
            {
                "grad": grad.clone(),
                "sigma": sigma,
                "basis": None if basis is None else basis.clone(),
                "options": options,
                "estimate": estimate.clone(),
                "new_basis": new_basis.clone(),
                "passes": int(passes),
            }
        )
        return estimate, new_basis, passes

    def many(self, grads, sigma, **options):
        out = self._many(grads, sigma, **options)
        self.calls.append({"grads": [g.clone() for g in grads], "options": options, "out": out})
        return out

    @staticmethod
    def _refused(*args, **kwargs):
        raise AssertionError("the other denoising path was taken")


def test_warm_start_is_on_by_default_and_not_an_op_option():
    assert DENOISE_OPTIONS["warm_start"] is True
    assert check_denoise_options({"warm_start": False}).given_options() == {"warm_start": False}
    assert Denoiser().warm_start and not Denoiser({"warm_start": False}).warm_start


def test_the_warm_start_basis_is_a_function_of_released_gradients_only(monkeypatch):
    """Privacy invariant 4 (PRIVACY.md) with a state: the op sees the released noisy gradient and
    a basis the op itself returned at the step before, so the whole chain can be recomputed from
    the released gradients and public numbers alone, and the clean gradient never reaches it."""
    spy = WarmSpy(monkeypatch)
    clean = _clean_grads()
    options = {"kappa": 0.5, "min_dim": 1, "seed": 3}
    model, opt, loader = _private(denoise=options, lr=0.1)
    engine = opt.engine
    released = Passthrough()
    engine.post_processors.insert(0, released)
    written = []
    batches = list(loader)
    for step in range(3):
        x, y = batches[step % len(batches)]
        _backward(model, x, y)
        opt.step()
        written.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.zero_grad()
    keys = sorted(engine.denoiser.keys)
    assert keys == ["0.weight", "2.weight"] and len(spy.calls) == 3 * len(keys)
    for step in range(3):
        calls = spy.calls[step * len(keys) : (step + 1) * len(keys)]
        for key, call in zip(keys, calls, strict=True):
            assert torch.equal(call["grad"], released.seen[step][key]), (step, key)
            assert call["sigma"] == engine.sigma() and call["options"]["seed"] == 3 + step
            if step == 0:
                assert call["basis"] is None
                assert not torch.equal(call["grad"], clean[key])  # noisy, never the clean one
            else:
                previous = spy.calls[(step - 1) * len(keys) + keys.index(key)]
                assert torch.equal(call["basis"], previous["new_basis"]), (step, key)
    # Replayed from the released gradients alone (no model, no data): same outputs, same state.
    replay = Denoiser(options, keys=keys)
    for step in range(3):
        out = replay(released.seen[step], engine.sigma(), step)
        for key in keys:
            assert torch.equal(out[key], written[step][key]), (step, key)
    assert_same_state(replay.state_dict(), engine.denoiser.state_dict())


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a.get("shapes") == b.get("shapes")
    for key, basis in a.get("bases", {}).items():
        assert torch.equal(basis, b["bases"][key]), key


def _low_rank_steps(steps: int, shapes=((64, 48), (40, 72)), seed: int = 0):
    """A slowly rotating rank-2 signal under unit noise: ``steps`` dicts of noisy matrices."""
    gen = torch.Generator().manual_seed(seed)
    out = [{} for _ in range(steps)]
    for i, (m, n) in enumerate(shapes):
        u = torch.linalg.qr(torch.randn(m, 2, generator=gen))[0]
        v = torch.linalg.qr(torch.randn(n, 2, generator=gen))[0]
        for t in range(steps):
            drift = 0.05 * t * torch.linalg.qr(torch.randn(m, 2, generator=gen))[0]
            signal = 4.0 * (m**0.5 + n**0.5) * ((u + drift) @ v.T)
            out[t][f"w{i}"] = signal + torch.randn(m, n, generator=gen)
    return out


def test_denoiser_state_round_trips_and_a_resumed_denoiser_is_bit_identical(tmp_path):
    steps = _low_rank_steps(4)
    straight = Denoiser()
    outs = [straight(grads, 1.0, t) for t, grads in enumerate(steps)]
    first = Denoiser()
    for t in range(2):
        first(steps[t], 1.0, t)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert set(state["bases"]) == {"w0", "w1"} and state["shapes"] == {
        "w0": [64, 48],
        "w1": [40, 72],
    }
    assert all(
        b.dtype == torch.float32 and b.shape[0] == m
        for b, m in zip(state["bases"].values(), (64, 40), strict=True)
    )
    resumed = Denoiser()
    resumed.load_state_dict(state)
    for t in (2, 3):
        out = resumed(steps[t], 1.0, t)
        for key in out:
            assert torch.equal(out[key], outs[t][key]), (t, key)
    assert_same_state(resumed.state_dict(), straight.state_dict())
    # Guard: started cold at step 2, the output differs (the bases do matter).
    cold = Denoiser()(steps[2], 1.0, 2)
    assert any(not torch.equal(cold[k], outs[2][k]) for k in cold)


def _state(m: int = 64, n: int = 48, k: int = 3, key="w0", **change):
    basis = torch.linalg.qr(torch.randn(m, k))[0]
    state = {"bases": {key: basis}, "shapes": {key: [m, n]}}
    for name, value in change.items():
        state[name] = value
    return state


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({"bases": {}}, "expected the entries 'bases' and 'shapes'"),
        ({**_state(), "extra": 1}, "expected the entries"),
        (_state(shapes={"w1": [64, 48]}), r"keys \['w0', 'w1'\] have a basis or a shape"),
        (_state(shapes={"w0": [64]}), r"shape of 'w0' must be \[m, n\]"),
        (_state(shapes={"w0": [64, 48.0]}), r"shape of 'w0' must be \[m, n\]"),
        (_state(shapes={"w0": [64, 8]}), r"at least min_dim = 32, got \[64, 8\]"),
        (
            _state(bases={"w0": torch.zeros(48, 3)}),
            r"\(a 64 x 48 gradient\) must be a float32 "
            r"\(64, k\) tensor with k <= 48, got a torch.float32 tensor of shape \(48, 3\)",
        ),
        (_state(bases={"w0": torch.zeros(64, 3, dtype=torch.float64)}), "torch.float64 tensor"),
        (_state(bases={"w0": torch.zeros(64, 49)}), r"k <= 48"),
        (_state(bases={"w0": torch.zeros(2, 64, 3)}), "float32"),
        (_state(bases={"w0": [[0.0]]}), "got list"),
        (_state(bases={"w0": torch.full((64, 3), float("nan"))}), "NaN or Inf"),
        (_state(key="other"), "a basis for 'other', which this denoiser does not denoise"),
    ],
)
def test_denoiser_state_is_checked_on_load(state, match):
    denoiser = Denoiser(keys=["w0", "w1"])
    good = _state()
    denoiser.load_state_dict(good)
    with pytest.raises(ValueError, match=match):
        denoiser.load_state_dict(state)
    assert_same_state(denoiser.state_dict(), good)  # a refused state changes nothing


def test_bases_are_refused_by_a_cold_denoiser_and_an_empty_state_means_cold():
    with pytest.raises(ValueError, match="warm_start=False"):
        Denoiser({"warm_start": False}).load_state_dict(_state())
    Denoiser({"warm_start": False}).load_state_dict({})
    denoiser = Denoiser()
    denoiser.load_state_dict(_state())
    denoiser.load_state_dict({})  # a checkpoint written before the denoiser kept state
    assert denoiser.state_dict() == {}
    with pytest.raises(TypeError, match="state must be a dict"):
        denoiser.load_state_dict([])


def test_keys_that_appear_disappear_or_change_shape_start_cold(monkeypatch):
    spy = WarmSpy(monkeypatch)
    steps = _low_rank_steps(3, shapes=((64, 48), (40, 72), (48, 36)))
    denoiser = Denoiser()
    denoiser({k: steps[0][k] for k in ("w0", "w1")}, 1.0, 0)
    assert [c["basis"] is None for c in spy.calls] == [True, True]
    # w0 comes back transposed (same key, another shape), w1 is gone, w2 is new.
    with pytest.warns(
        UserWarning,
        match=r"'w0' is \(48, 64\), its warm-start basis was for a "
        r"\(64, 48\) matrix: starting this one cold",
    ):
        denoiser({"w0": steps[1]["w0"].T.contiguous(), "w2": steps[1]["w2"]}, 1.0, 1)
    assert [c["basis"] is None for c in spy.calls[2:]] == [True, True]
    assert denoiser.state_dict()["shapes"] == {"w0": [48, 64], "w2": [48, 36]}
    # w1 comes back: it lost its basis when a step went by without it; w0 and w2 are warm.
    denoiser(
        {"w0": steps[2]["w0"].T.contiguous(), "w1": steps[2]["w1"], "w2": steps[2]["w2"]}, 1.0, 2
    )
    assert [c["basis"] is None for c in spy.calls[4:]] == [False, True, False]
    # A step that denoises nothing (no noise) keeps the bases as they are.
    before = denoiser.state_dict()
    denoiser(steps[2], 0.0, 3)
    assert_same_state(denoiser.state_dict(), before)


def test_warm_start_off_is_the_cold_path_of_before(monkeypatch):
    spy = WarmSpy(monkeypatch, cold=True)
    grads = _low_rank_steps(1)[0]
    options = {"warm_start": False, "rank": 60, "seed": 4}
    denoiser = Denoiser(options)
    denoiser.record_stats = True
    out = denoiser(grads, 1.0, 2)
    # One denoise_many call per capped rank (48 and 40), the op's options only, seed + step.
    assert [c["options"] for c in spy.calls] == [{"seed": 6, "rank": 48}, {"seed": 6, "rank": 40}]
    for key, call in zip(grads, spy.calls, strict=True):
        expected = ops.denoise(grads[key], 1.0, seed=6, rank=call["options"]["rank"])
        assert torch.equal(out[key], expected), key
    assert denoiser.state_dict() == {}
    stats = denoiser.take_stats()
    assert set(stats) == {"w0", "w1"} and all("passes" not in s for s in stats.values())


def test_stats_report_the_passes_each_matrix_took(monkeypatch):
    spy = WarmSpy(monkeypatch)
    model, opt, loader = _private(denoise={"kappa": 0.5, "min_dim": 1})
    engine = opt.engine
    engine.record_denoise_stats = True
    x, y = next(iter(loader))
    for _ in range(2):
        _backward(model, x, y)
        opt.step()
        stats = engine.take_denoise_stats()
        calls = spy.calls[-2:]
        assert list(stats) == ["0.weight", "2.weight"]
        for (key, s), call in zip(stats.items(), calls, strict=True):
            assert isinstance(s["passes"], int) and s["passes"] == call["passes"] >= 1, key
            assert {"rank", "norm_ratio", "passes"} <= set(s)
