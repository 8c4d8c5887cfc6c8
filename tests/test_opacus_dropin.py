"""The Opacus drop-in: DenoisingDPOptimizer and DenoisingPrivacyEngine.

The reference is Opacus itself: with the same noise generator, the denoising optimizer must hand
``denoise_many`` exactly the gradient plain Opacus would have released (privacy invariant 4,
PRIVACY.md: the op sees only the noisy, scaled gradient and public hyper-parameters), with the
right sigma, and must leave everything else (1-D gradients, accounting) as Opacus does.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

opacus = pytest.importorskip("opacus")

pytestmark = [
    # Opacus's hooks on a first layer whose input needs no gradient: expected, and harmless.
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    # make_private_with_epsilon's search over a tiny dataset hits the top RDP order.
    pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha:UserWarning"),
    # Fixed noise generators are the point of these tests; secure mode would forbid them.
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
]

from opacus import GradSampleModule, PrivacyEngine  # noqa: E402
from opacus.distributed import (  # noqa: E402
    DifferentiallyPrivateDistributedDataParallel as DPDDP,  # noqa: N817  (Opacus's own name)
)
from opacus.optimizers import (  # noqa: E402
    DistributedDPOptimizer,
    DistributedDPOptimizerFastGradientClipping,
    DPOptimizer,
    DPOptimizerFastGradientClipping,
    DPPerLayerOptimizer,
    FSDPOptimizerFastGradientClipping,
    SimpleDistributedPerLayerOptimizer,
)
from opacus.utils.batch_memory_manager import BatchMemoryManager  # noqa: E402

import rmt_kernels  # noqa: E402
from rmt_kernels.opacus import (  # noqa: E402
    DenoisingDPOptimizer,
    DenoisingDPOptimizerFastGradientClipping,
    DenoisingDPPerLayerOptimizer,
    DenoisingPrivacyEngine,
    denoising_optimizer_class,
)

IN, HIDDEN, CLASSES = 12, 16, 3
BATCH = 8
NOISE, CLIP = 0.7, 1.3


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def _batches(count: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(BATCH, IN, generator=gen), torch.randint(0, CLASSES, (BATCH,), generator=gen))
        for _ in range(count)
    ]


def _dataset(n: int = 64, seed: int = 2) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, IN, generator=gen), torch.randint(0, CLASSES, (n,)))


class _Spy:
    """Records what the denoising ops are given (``denoise_many``: the cold path;
    ``denoise_warm``: warm starts, the default) and returns the real ops' results.

    ``matrices``: one record per matrix denoised; ``calls``: those records grouped into steps
    (consecutive records with the same sketch seed: the seed is ``seed + step``).
    """

    def __init__(self) -> None:
        self.matrices: list[dict] = []
        self._many = rmt_kernels.ops.denoise_many
        self._warm = rmt_kernels.ops.denoise_warm

    def many(self, grads, sigmas, **options):
        grads = list(grads)
        out = self._many(grads, sigmas, **options)
        for g, o in zip(grads, out, strict=True):
            self._record(g, sigmas, options, o, basis=None, new_basis=None, passes=None)
        return out

    def warm(self, grad, sigma, basis=None, **options):
        estimate, new_basis, passes = self._warm(grad, sigma, basis, **options)
        self._record(grad, sigma, options, estimate, basis, new_basis, passes)
        return estimate, new_basis, passes

    def _record(self, grad, sigma, options, out, basis, new_basis, passes) -> None:
        self.matrices.append(
            {
                "grad": grad.detach().clone(),
                "sigma": sigma,
                "options": dict(options),
                "out": out.clone(),
                "basis": None if basis is None else basis.clone(),
                "new_basis": None if new_basis is None else new_basis.clone(),
                "passes": None if passes is None else int(passes),
            }
        )

    @property
    def calls(self) -> list[dict]:
        return self.group(self.matrices)

    @staticmethod
    def group(records: list[dict]) -> list[dict]:
        """Per step: ``sigma``, ``options`` (the first matrix's), and per matrix ``grads``,
        ``out``, ``ranks``, ``bases``, ``new_bases``, ``passes``."""
        steps: list[dict] = []
        for r in records:
            if not steps or steps[-1]["options"]["seed"] != r["options"]["seed"]:
                steps.append(
                    {
                        "sigma": r["sigma"],
                        "options": r["options"],
                        "grads": [],
                        "out": [],
                        "ranks": [],
                        "bases": [],
                        "new_bases": [],
                        "passes": [],
                    }
                )
            step = steps[-1]
            assert step["sigma"] == r["sigma"]
            for name, value in (
                ("grads", r["grad"]),
                ("out", r["out"]),
                ("ranks", r["options"]["rank"]),
                ("bases", r["basis"]),
                ("new_bases", r["new_basis"]),
                ("passes", r["passes"]),
            ):
                step[name].append(value)
        return steps

    def install(self, setattr_) -> None:
        setattr_(rmt_kernels.ops, "denoise_many", self.many)
        setattr_(rmt_kernels.ops, "denoise_warm", self.warm)


@pytest.fixture
def spy(monkeypatch) -> _Spy:
    spy = _Spy()
    spy.install(monkeypatch.setattr)
    return spy


def _run_direct(
    opacus_class: type[DPOptimizer],
    *,
    denoise: dict | None = None,
    twin: bool = False,
    steps: int = 2,
    accumulate: int = 1,
    loss_reduction: str = "mean",
    noise_multiplier: float = NOISE,
    lr: float = 0.0,
) -> tuple[GradSampleModule, DPOptimizer, list[dict[str, torch.Tensor]]]:
    """Train with Opacus's optimizer class or its denoising twin, built by hand; return the
    model, the optimizer and ``p.grad`` of every parameter after each step.

    lr=0 keeps the plain and denoising runs on the same weights, so every step's noisy gradient
    can be compared, not just the first.
    """
    model = GradSampleModule(_model(), loss_reduction=loss_reduction)
    cls = denoising_optimizer_class(opacus_class) if twin else opacus_class
    extra = {"denoise": denoise} if twin else {}
    max_grad_norm: float | list[float] = CLIP
    if opacus_class is DPPerLayerOptimizer:
        max_grad_norm = [CLIP / 2] * len(list(model.parameters()))
    optimizer = cls(
        torch.optim.SGD(model.parameters(), lr=lr),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=BATCH,
        loss_reduction=loss_reduction,
        generator=torch.Generator().manual_seed(123),
        **extra,
    )
    criterion = nn.CrossEntropyLoss(reduction=loss_reduction)
    grads = []
    data = iter(_batches(steps * accumulate))
    for _ in range(steps):
        optimizer.zero_grad()
        for _ in range(accumulate):
            x, y = next(data)
            criterion(model(x), y).backward()
        optimizer.step()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    return model, optimizer, grads


def _assert_grads_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("opacus_class", [DPOptimizer, DPPerLayerOptimizer])
def test_no_denoise_is_bit_identical_to_opacus(opacus_class):
    _, _, plain = _run_direct(opacus_class, steps=3, lr=0.1)
    _, _, ours = _run_direct(opacus_class, twin=True, denoise=None, steps=3, lr=0.1)
    for step_plain, step_ours in zip(plain, ours, strict=True):
        _assert_grads_equal(step_plain, step_ours)


@pytest.mark.parametrize(
    ("opacus_class", "accumulate", "loss_reduction"),
    [
        (DPOptimizer, 1, "mean"),
        (DPOptimizer, 2, "mean"),
        (DPOptimizer, 1, "sum"),
        (DPOptimizer, 2, "sum"),
        (DPPerLayerOptimizer, 1, "mean"),
    ],
)
@pytest.mark.parametrize("warm_start", [True, False])
def test_denoise_sees_exactly_opacus_noisy_scaled_grads(
    spy, opacus_class, accumulate, loss_reduction, warm_start
):
    steps = 3
    _, plain_opt, plain = _run_direct(
        opacus_class, steps=steps, accumulate=accumulate, loss_reduction=loss_reduction
    )
    model, opt, ours = _run_direct(
        opacus_class,
        twin=True,
        denoise={"seed": 5, "min_dim": 1, "warm_start": warm_start},
        steps=steps,
        accumulate=accumulate,
        loss_reduction=loss_reduction,
    )
    names = [name for name, p in model.named_parameters()]
    matrices = [name for name, p in model.named_parameters() if p.dim() == 2]
    noise_std = NOISE * plain_opt.max_grad_norm
    if opacus_class is DPPerLayerOptimizer:  # Opacus's total norm of the per-layer budgets
        assert plain_opt.max_grad_norm == pytest.approx(math.sqrt(len(names)) * CLIP / 2)
    expected_sigma = noise_std / (BATCH * accumulate) if loss_reduction == "mean" else noise_std
    assert len(spy.calls) == steps
    for step, call in enumerate(spy.calls):
        assert call["sigma"] == pytest.approx(expected_sigma, rel=1e-12)
        # Exactly the user's options, the step's sketch seed and the rank: nothing else reaches
        # the op (with grads and sigma checked here too, privacy invariant 4 of PRIVACY.md is
        # pinned down).
        assert call["options"] == {"seed": 5 + step, "rank": -1}
        assert len(call["grads"]) == len(matrices)
        for name, seen, out in zip(matrices, call["grads"], call["out"], strict=True):
            assert torch.equal(seen, plain[step][name]), (step, name)
            assert torch.equal(ours[step][name], out), (step, name)
        for name in names:
            if name not in matrices:  # biases: exactly as Opacus made them
                assert torch.equal(ours[step][name], plain[step][name]), (step, name)
        # The warm start: each matrix's basis is the one the op returned for it at the step
        # before (none at the first), so it too is a function of released gradients only.
        previous = spy.calls[step - 1]["new_bases"] if step else [None] * len(matrices)
        for name, basis, old in zip(matrices, call["bases"], previous, strict=True):
            if not warm_start or old is None:
                assert basis is None, (step, name)
            else:
                assert torch.equal(basis, old), (step, name)
    assert opt.accumulated_iterations == accumulate


def test_denoise_changes_the_matrices(spy):
    """Guard for the test above: the spy's outputs are not just its inputs."""
    _run_direct(DPOptimizer, twin=True, denoise={"min_dim": 1}, steps=1)
    (call,) = spy.calls
    assert any(not torch.equal(g, o) for g, o in zip(call["grads"], call["out"], strict=True))


def test_zero_noise_skips_denoising(spy):
    _, _, plain = _run_direct(DPOptimizer, noise_multiplier=0.0)
    _, _, ours = _run_direct(DPOptimizer, twin=True, denoise={"min_dim": 1}, noise_multiplier=0.0)
    assert spy.calls == []
    for a, b in zip(plain, ours, strict=True):
        _assert_grads_equal(a, b)


def test_fixed_rank_is_capped_per_matrix(spy):
    # The head is 3 x 16: rank 5 would be invalid for it alone, so it gets 3.
    _run_direct(DPOptimizer, twin=True, denoise={"rank": 5, "min_dim": 1}, steps=1)
    ((call,),) = [spy.calls]
    assert sorted(call["ranks"]) == [3, 5]


def test_batch_memory_manager_uses_the_logical_batch(spy):
    """Virtual steps: physical batches of 4, a logical batch of 16; sigma uses the logical one."""
    dataset = _dataset(64)
    model = _model()
    engine = DenoisingPrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(dataset, batch_size=16),
        noise_multiplier=NOISE,
        max_grad_norm=CLIP,
        denoise={"min_dim": 1},
    )
    criterion = nn.CrossEntropyLoss()
    real_steps = 0
    with BatchMemoryManager(
        data_loader=loader, max_physical_batch_size=4, optimizer=optimizer
    ) as physical:
        for x, y in physical:
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            skipped = optimizer._check_skip_next_step(pop_next=False)
            optimizer.step()
            real_steps += not skipped
    assert optimizer.expected_batch_size == 16
    assert real_steps > 0
    assert len(spy.calls) == real_steps
    for call in spy.calls:
        assert call["sigma"] == pytest.approx(NOISE * CLIP / 16, rel=1e-12)
    steps_counted = sum(n for _, _, n in engine.accountant.history)
    assert steps_counted == real_steps


def _engine_run(engine_class, *, denoise=None, steps: int = 3, **make_private_kwargs):
    model = _model()
    engine = engine_class(accountant="rdp")
    extra = {} if denoise is None else {"denoise": denoise}
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_dataset(64), batch_size=16),
        noise_multiplier=NOISE,
        max_grad_norm=CLIP,
        **extra,
        **make_private_kwargs,
    )
    criterion = nn.CrossEntropyLoss()
    done = 0
    while done < steps:
        for x, y in loader:
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    return engine, optimizer


def test_accountant_counts_steps_like_opacus(spy):
    plain_engine, plain_opt = _engine_run(PrivacyEngine)
    engine, opt = _engine_run(DenoisingPrivacyEngine, denoise={"norm": "preserve", "min_dim": 1})
    assert type(plain_opt) is DPOptimizer
    assert type(opt) is DenoisingDPOptimizer
    assert opt.step_hook is not None
    assert len(spy.calls) == 3
    assert engine.accountant.history == plain_engine.accountant.history
    assert engine.get_epsilon(1e-5) == plain_engine.get_epsilon(1e-5) > 0


def test_engine_without_denoise_returns_opacus_optimizer():
    # With a caller's noise_generator (Opacus's noise path): exactly Opacus's class. Without
    # one: its twin, which only draws Philox noise keyed from the OS (tests/test_secrets.py).
    generator = torch.Generator().manual_seed(0)
    with pytest.warns(UserWarning, match="private only if that generator's seed is secret"):
        _, opt = _engine_run(DenoisingPrivacyEngine, steps=1, noise_generator=generator)
    assert type(opt) is DPOptimizer
    _, opt = _engine_run(DenoisingPrivacyEngine, steps=1)
    assert type(opt) is DenoisingDPOptimizer and opt.post_processors == []


def test_make_private_with_epsilon(spy):
    kwargs = {
        "data_loader": DataLoader(_dataset(64), batch_size=16),
        "target_epsilon": 3.0,
        "target_delta": 1e-5,
        "epochs": 2,
        "max_grad_norm": CLIP,
    }
    plain_model = _model()
    _, plain_opt, _ = PrivacyEngine(accountant="rdp").make_private_with_epsilon(
        module=plain_model,
        optimizer=torch.optim.SGD(plain_model.parameters(), lr=0.1),
        **kwargs,
    )
    model = _model()
    engine = DenoisingPrivacyEngine(accountant="rdp")
    model, opt, loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        denoise={"kappa": 1.5, "min_dim": 1},
        **kwargs,
    )
    assert type(opt) is DenoisingDPOptimizer
    assert opt.denoise_options.given_options() == {"kappa": 1.5, "min_dim": 1}
    assert opt.noise_multiplier == plain_opt.noise_multiplier
    x, y = next(iter(loader))
    nn.CrossEntropyLoss()(model(x), y).backward()
    opt.step()
    assert len(spy.calls) == 1
    assert spy.calls[0]["options"]["kappa"] == 1.5
    assert len(engine.accountant) == 1
    assert engine._denoise is None  # nothing pending after the call


@pytest.mark.parametrize(
    ("denoise", "error", "match"),
    [
        ({"kapa": 2.0}, TypeError, "kapa"),
        ({"shrinker": "bogus"}, ValueError, "shrinker"),
        ({"kappa": -1.0}, ValueError, "kappa"),
        ({"rank": 0}, ValueError, "rank"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"min_dim": 0}, ValueError, "min_dim"),
        ({"min_dim": 2.0}, TypeError, "min_dim"),
        ([("kappa", 1.0)], TypeError, "dict"),
    ],
)
def test_bad_denoise_options_fail_early(denoise, error, match):
    model = _model()
    with pytest.raises(error, match=match):
        DenoisingPrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(_dataset(64), batch_size=16),
            noise_multiplier=NOISE,
            max_grad_norm=CLIP,
            denoise=denoise,
        )
    # Before anything was wrapped: the model has no Opacus hooks.
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    with pytest.raises(error, match=match):
        DenoisingDPOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            noise_multiplier=NOISE,
            max_grad_norm=CLIP,
            expected_batch_size=BATCH,
            denoise=denoise,
        )


def _ghost_step(engine_class, **extra):
    model = _model()
    engine = engine_class(accountant="rdp")
    model, optimizer, criterion, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        criterion=nn.CrossEntropyLoss(),
        data_loader=DataLoader(_dataset(32), batch_size=BATCH),
        noise_multiplier=NOISE,
        max_grad_norm=CLIP,
        grad_sample_mode="ghost",
        poisson_sampling=False,
        noise_generator=torch.Generator().manual_seed(7),
        **extra,
    )
    for x, y in list(loader)[:2]:
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return engine, optimizer, grads


def test_ghost_clipping(spy):
    # The reference is the engine without denoising: in ghost mode both use the certified norms
    # (tests/test_opacus_ghost_certified.py), whose clip factors differ from plain Opacus's in
    # the last bits, so plain Opacus is only close.
    opacus_engine, _, opacus_grads = _ghost_step(PrivacyEngine)
    plain_engine, plain_opt, plain = _ghost_step(DenoisingPrivacyEngine)
    for name, grad in opacus_grads.items():
        torch.testing.assert_close(plain[name], grad, rtol=1e-5, atol=1e-6)
    assert len(spy.calls) == 0
    engine, opt, ours = _ghost_step(DenoisingPrivacyEngine, denoise={"min_dim": 1})
    assert type(plain_opt) is DPOptimizerFastGradientClipping
    assert type(opt) is DenoisingDPOptimizerFastGradientClipping
    assert len(spy.calls) == 2
    call = spy.calls[-1]
    assert call["sigma"] == pytest.approx(NOISE * CLIP / BATCH, rel=1e-12)
    matrices = [name for name, p in plain.items() if p.dim() == 2]
    for name, seen, out in zip(matrices, call["grads"], call["out"], strict=True):
        assert torch.equal(seen, plain[name]), name
        assert torch.equal(ours[name], out), name
    for name in plain:
        if name not in matrices:
            assert torch.equal(ours[name], plain[name]), name
    assert engine.get_epsilon(1e-5) == plain_engine.get_epsilon(1e-5)
    assert engine.get_epsilon(1e-5) == opacus_engine.get_epsilon(1e-5)


def test_unsupported_flavours_raise_naming_them():
    assert denoising_optimizer_class(DPOptimizer) is DenoisingDPOptimizer
    assert denoising_optimizer_class(DPPerLayerOptimizer) is DenoisingDPPerLayerOptimizer
    assert denoising_optimizer_class(DenoisingDPOptimizer) is DenoisingDPOptimizer
    with pytest.raises(NotImplementedError, match="FSDPOptimizerFastGradientClipping"):
        denoising_optimizer_class(FSDPOptimizerFastGradientClipping)

    class CustomNoise(DPOptimizer):  # may add noise its own way: sigma unknown
        pass

    with pytest.raises(NotImplementedError, match="CustomNoise"):
        denoising_optimizer_class(CustomNoise)
    model = _model()
    with pytest.raises(NotImplementedError, match="AdaClipDPOptimizer"):
        DenoisingPrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(_dataset(64), batch_size=16),
            noise_multiplier=NOISE,
            max_grad_norm=CLIP,
            clipping="adaptive",
            target_unclipped_quantile=0.5,
            clipbound_learning_rate=0.2,
            max_clipbound=10.0,
            min_clipbound=0.1,
            unclipped_num_std=NOISE,
            denoise={"min_dim": 1},
        )
    # Refused before Opacus attached its hooks to the caller's module.
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


# (Opacus class, loss_reduction) run by each rank of the distributed test; the ghost case goes
# through the engine (DPDDP module), the others build the optimizer by hand.
_DISTRIBUTED_CASES = [
    (DistributedDPOptimizer, "mean"),
    (DistributedDPOptimizer, "sum"),
    (SimpleDistributedPerLayerOptimizer, "mean"),
    (DistributedDPOptimizerFastGradientClipping, "mean"),
]
_WORLD_SIZE = 2


def _distributed_step(opacus_class, loss_reduction: str, twin: bool, rank: int):
    """One step of Opacus's distributed optimizer or its twin; return (model, optimizer)."""
    x, y = _batches(1, seed=10 + rank)[0]
    denoise = {"denoise": {"seed": 3, "min_dim": 1}} if twin else {}
    if opacus_class is DistributedDPOptimizerFastGradientClipping:
        # Both through our engine: its ghost norms are certified, not bitwise Opacus's.
        engine = DenoisingPrivacyEngine(accountant="rdp")
        model = DPDDP(_model())
        model, optimizer, criterion, _ = engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
            criterion=nn.CrossEntropyLoss(),
            data_loader=DataLoader(TensorDataset(x, y), batch_size=BATCH),
            noise_multiplier=NOISE,
            max_grad_norm=CLIP,
            grad_sample_mode="ghost",
            poisson_sampling=False,
            noise_generator=torch.Generator().manual_seed(123),
            **denoise,
        )
        assert type(optimizer) is (
            denoising_optimizer_class(opacus_class) if twin else opacus_class
        )
    else:
        model = GradSampleModule(_model(), loss_reduction=loss_reduction)
        cls = denoising_optimizer_class(opacus_class) if twin else opacus_class
        max_grad_norm: float | list[float] = CLIP
        if opacus_class is SimpleDistributedPerLayerOptimizer:
            max_grad_norm = [CLIP / 2] * len(list(model.parameters()))
        optimizer = cls(
            torch.optim.SGD(model.parameters(), lr=0.0),
            noise_multiplier=NOISE,
            max_grad_norm=max_grad_norm,
            expected_batch_size=BATCH,
            loss_reduction=loss_reduction,
            generator=torch.Generator().manual_seed(123),
            **denoise,
        )
        criterion = nn.CrossEntropyLoss(reduction=loss_reduction)
    optimizer.zero_grad()
    criterion(model(x), y).backward()
    optimizer.step()
    return model, optimizer


def _distributed_worker(rank: int, init_file: str, out_dir: str) -> None:
    """One rank: the plain Opacus run and the denoising run of every case, saved for the parent.

    Ranks see different data and only rank 0 adds noise (Opacus's distributed scheme), so the
    all-reduced gradient differs from every rank's local one: denoising before the all-reduce,
    or with sigma not divided by world_size, fails the comparison in the parent.
    """
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=_WORLD_SIZE
    )
    spy = _Spy()
    spy.install(setattr)
    results = []
    try:
        for opacus_class, loss_reduction in _DISTRIBUTED_CASES:
            runs = {}
            for twin in (False, True):
                before = len(spy.matrices)
                model, optimizer = _distributed_step(opacus_class, loss_reduction, twin, rank)
                runs[twin] = {
                    "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
                    "calls": _Spy.group(spy.matrices[before:]),
                    "noise_std": NOISE * optimizer.max_grad_norm,
                    "expected_batch_size": optimizer.expected_batch_size,
                }
            results.append(runs)
    finally:
        dist.destroy_process_group()
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def test_distributed_denoises_after_the_all_reduce(tmp_path):
    torch.multiprocessing.spawn(
        _distributed_worker,
        args=(str(tmp_path / "init"), str(tmp_path)),
        nprocs=_WORLD_SIZE,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(_WORLD_SIZE)]
    for case, (_, loss_reduction) in enumerate(_DISTRIBUTED_CASES):
        for runs in (ranks[r][case] for r in range(_WORLD_SIZE)):
            plain, ours = runs[False], runs[True]
            assert plain["calls"] == []
            (call,) = ours["calls"]
            std, per_rank_batch = ours["noise_std"], ours["expected_batch_size"]
            expected = std / (per_rank_batch * _WORLD_SIZE) if loss_reduction == "mean" else std
            assert call["sigma"] == pytest.approx(expected, rel=1e-12), case
            matrices = [n for n, g in plain["grads"].items() if g.dim() == 2]
            for name, seen, out in zip(matrices, call["grads"], call["out"], strict=True):
                assert torch.equal(seen, plain["grads"][name]), (case, name)
                assert torch.equal(ours["grads"][name], out), (case, name)
            for name, grad in plain["grads"].items():
                if name not in matrices:
                    assert torch.equal(ours["grads"][name], grad), (case, name)
        # Same all-reduced input and seed on every rank: the replicas stay in sync.
        for name, grad in ranks[0][case][True]["grads"].items():
            assert torch.equal(ranks[1][case][True]["grads"][name], grad), (case, name)


def test_secure_mode_generator_is_passed_through():
    """In secure mode the twin must draw noise from the engine's secure RNG, like Opacus.

    torchcsprng is not installed here, so the engine's secure RNG is stood in for by hand.
    """
    engine = DenoisingPrivacyEngine(accountant="rdp")
    engine.secure_mode = True
    engine.secure_rng = torch.Generator().manual_seed(9)
    model = _model()
    _, optimizer, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_dataset(64), batch_size=16),
        noise_multiplier=NOISE,
        max_grad_norm=CLIP,
        denoise={"min_dim": 1},
    )
    assert type(optimizer) is DenoisingDPOptimizer
    assert optimizer.generator is engine.secure_rng
    assert optimizer.secure_mode is True


def _first_step(engine_class, **make_private_kwargs):
    """Noise of one step (zero clipping budget used: lr 0, one batch) and the batch drawn, with
    torch's global generator seeded publicly first, as training scripts do."""
    torch.manual_seed(0)
    model = _model()
    engine = engine_class(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=DataLoader(_dataset(64), batch_size=16),
        noise_multiplier=NOISE,
        max_grad_norm=CLIP,
        **make_private_kwargs,
    )
    x, y = next(iter(loader))
    nn.CrossEntropyLoss()(model(x), y).backward()
    optimizer.step()
    noise = torch.cat([p.grad.flatten() for p in model.parameters()])
    return engine, optimizer, noise, x


@pytest.mark.parametrize("denoise", [None, {"min_dim": 1}])
def test_noise_and_sampling_are_seeded_from_the_os_by_default(denoise):
    # Plain Opacus draws both from torch's global generator: a public torch.manual_seed(0)
    # repeats them exactly, so anyone with the script can subtract the noise.
    _, _, plain_a, batch_a = _first_step(PrivacyEngine)
    _, _, plain_b, batch_b = _first_step(PrivacyEngine)
    assert torch.equal(plain_a, plain_b) and torch.equal(batch_a, batch_b)
    extra = {} if denoise is None else {"denoise": denoise}
    engine, opt, a, sample_a = _first_step(DenoisingPrivacyEngine, **extra)
    _, _, b, sample_b = _first_step(DenoisingPrivacyEngine, **extra)
    assert engine.noise_seed_is_secret is True and opt.noise_seed_is_secret is True
    assert not torch.equal(a, b)
    # Two Poisson draws of ~16 of 64 examples coincide with probability far below 1e-6.
    assert sample_a.shape != sample_b.shape or not torch.equal(sample_a, sample_b)


def test_a_callers_noise_generator_is_reported_as_not_secret():
    with pytest.warns(UserWarning, match="private only if that generator's seed is secret"):
        engine, opt, _, _ = _first_step(
            DenoisingPrivacyEngine, noise_generator=torch.Generator().manual_seed(3)
        )
    assert engine.noise_seed_is_secret is False and opt.noise_seed_is_secret is False


def test_import_rmt_kernels_does_not_import_opacus():
    import subprocess
    import sys

    code = "import sys, rmt_kernels; assert 'opacus' not in sys.modules, 'opacus imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_convergence_smoke():
    """A small MLP learns a linearly separable task with denoising on (chance is 50%)."""
    gen = torch.Generator().manual_seed(3)
    n, d = 512, 20
    direction = torch.randn(d, generator=gen)
    x = torch.randn(n, d, generator=gen)
    y = (x @ direction > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, 2))
    engine = DenoisingPrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=64),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        noise_generator=torch.Generator().manual_seed(4),
        denoise={"seed": 0, "min_dim": 1},
    )
    criterion = nn.CrossEntropyLoss()
    for _ in range(5):
        for xb, yb in loader:
            optimizer.zero_grad()
            criterion(model(xb), yb).backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert optimizer.denoise_steps > 0
    print(f"accuracy {accuracy:.3f} after {optimizer.denoise_steps} denoised steps")
    assert accuracy > 0.85, accuracy


# ------------------------------------------------------------------------------------------
# Warm-start state through a checkpoint (issue 14, item 2)
# ------------------------------------------------------------------------------------------

WARM = {"seed": 5, "min_dim": 1}


def _dropin(init: int = 0, denoise: dict | None = WARM):
    """A DenoisingDPOptimizer (SGD with momentum: optimizer state too) and its noise generator;
    ``init`` != 0 moves every weight (a resume must overwrite them all)."""
    model = GradSampleModule(_model())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(float(init))
    generator = torch.Generator().manual_seed(123)
    optimizer = DenoisingDPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        noise_multiplier=NOISE,
        max_grad_norm=CLIP,
        expected_batch_size=BATCH,
        generator=generator,
        denoise=denoise,
    )
    return model, optimizer, generator


def _dropin_run(path, steps: int, *, resume_at: int | None = None, keep_bases: bool = True):
    """Train ``steps`` steps; with ``resume_at``, save model, optimizer and noise generator
    after that many steps (torch.save), rebuild from other weights and load it back
    (torch.load(weights_only=True)). Returns the final weights and the denoiser's state."""
    model, optimizer, generator = _dropin()
    criterion = nn.CrossEntropyLoss()
    for step, (x, y) in enumerate(_batches(steps)):
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()
        if step + 1 == resume_at:
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "generator": generator.get_state(),
                },
                path,
            )
            model, optimizer, generator = _dropin(init=3)
            state = torch.load(path, weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            generator.set_state(state["generator"])
            if not keep_bases:  # as if the bases had not been checkpointed
                optimizer.denoiser.load_state_dict({})
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return weights, optimizer.denoiser.state_dict(), optimizer.denoise_steps


def test_a_resumed_dropin_run_denoises_bit_identically(tmp_path, spy):
    straight, bases, steps = _dropin_run(tmp_path / "a.pt", 4)
    assert steps == 4 and set(bases["bases"]) == {0, 2}  # the two weight matrices
    resumed, resumed_bases, resumed_steps = _dropin_run(tmp_path / "b.pt", 4, resume_at=2)
    assert resumed_steps == 4
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    for key, basis in bases["bases"].items():
        assert torch.equal(basis, resumed_bases["bases"][key]), key
    # The resumed run's third step started from the bases the checkpoint carried.
    third = spy.calls[4 + 2]  # 4 straight steps, then 2 before the checkpoint
    assert all(b is not None for b in third["bases"])
    # Guard (the check above can fail): started cold after the resume, the third step gets no
    # bases. (Its weights need not differ: on these 16 x 12 and 3 x 16 matrices the op's range
    # reaches the smaller side, where it computes the exact SVD and a warm start changes
    # nothing.)
    _dropin_run(tmp_path / "c.pt", 4, resume_at=2, keep_bases=False)
    cold_third = spy.calls[4 + 4 + 2]  # after the two runs above, 2 steps before the checkpoint
    assert all(b is None for b in cold_third["bases"])


def test_opacus_checkpoints_carry_the_denoising_state(tmp_path):
    """Opacus's own PrivacyEngine.save_checkpoint/load_checkpoint go through the optimizer's
    state_dict, so the warm-start bases and the sketch seeds' step counter travel with it."""

    def build():
        engine = DenoisingPrivacyEngine(accountant="rdp")
        model = _model()
        model, optimizer, loader = engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(_dataset(64), batch_size=16),
            noise_multiplier=NOISE,
            max_grad_norm=CLIP,
            denoise=WARM,
        )
        return engine, model, optimizer, loader

    engine, model, optimizer, loader = build()
    x, y = next(iter(loader))
    nn.CrossEntropyLoss()(model(x), y).backward()
    optimizer.step()
    assert optimizer.denoiser.state_dict()  # bases after a denoised step
    engine.save_checkpoint(path=tmp_path / "o.pt", module=model, optimizer=optimizer)
    engine, model, fresh, _ = build()
    engine.load_checkpoint(path=tmp_path / "o.pt", module=model, optimizer=fresh)
    assert fresh.denoise_steps == optimizer.denoise_steps == 1
    saved, loaded = optimizer.denoiser.state_dict(), fresh.denoiser.state_dict()
    assert saved["shapes"] == loaded["shapes"]
    for key, basis in saved["bases"].items():
        assert torch.equal(basis, loaded["bases"][key]), key


def test_dropin_denoising_state_is_checked_on_load():
    model, optimizer, _ = _dropin()
    for x, y in _batches(1):
        nn.CrossEntropyLoss()(model(x), y).backward()
        optimizer.step()
    state = optimizer.state_dict()
    assert set(state) == {"state", "param_groups", "rmt_denoise"}
    # Without denoising the drop-in's state dict is Opacus's, and it refuses denoising state.
    _, plain, _ = _dropin(denoise=None)
    assert set(plain.state_dict()) == {"state", "param_groups"}
    with pytest.raises(ValueError, match="denoise=None"):
        plain.load_state_dict(state)
    _, fresh, _ = _dropin()
    bad = {**state, "rmt_denoise": {**state["rmt_denoise"], "post_processors": []}}
    with pytest.raises(ValueError, match="0 post-processor states for 1 post-processors"):
        fresh.load_state_dict(bad)
    bad = {**state, "rmt_denoise": {**state["rmt_denoise"], "steps": -1}}
    with pytest.raises(ValueError, match="'steps' must be an int >= 0"):
        fresh.load_state_dict(bad)
    basis = state["rmt_denoise"]["post_processors"][0]["bases"][0]
    wrong = {"bases": {0: basis[:-1]}, "shapes": {0: [HIDDEN, IN]}}
    bad = {**state, "rmt_denoise": {"steps": 1, "post_processors": [wrong]}}
    with pytest.raises(ValueError, match=r"basis of 0 \(a 16 x 12 gradient\) must be a float32"):
        fresh.load_state_dict(bad)
    assert fresh.denoise_steps == 0 and fresh.denoiser.state_dict() == {}  # nothing was loaded
    fresh.load_state_dict(state)
    assert fresh.denoise_steps == 1
    # A plain torch state dict (no denoising entry) leaves the denoising state alone.
    fresh.load_state_dict(optimizer.original_optimizer.state_dict())
    assert fresh.denoise_steps == 1 and fresh.denoiser.state_dict()
