"""A hostile post-processor (privacy invariant 4, PRIVACY.md): a user's stage that tries to read
the clean gradient or per-example data at every moment one of its hooks runs, through every door
it has: the parameters' ``.grad`` (and any other attribute the engine leaves on a parameter),
the tracked layers' captured activations, every object reachable from the model, the optimizer
and the engine's own call frames (its ``self``: the engine, its capture, its layout verifier),
and autograd hooks on the tensors it is handed. Everything it can see must be released data:
the noisy gradient, what it wrote earlier, the parameters, public numbers.

Python cannot stop a stage from reaching the engine (PRIVACY.md, invariant 4, *Assumed*); what
these tests show is that there is nothing clean left to find there while a stage runs: the
engine forgets the clipped sums, the activations and the output gradients before stage 4.
"""

from __future__ import annotations

import copy
import gc
import inspect
import types

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("opacus")

from rmt_kernels.dp import PostProcessor, make_private
from rmt_kernels.opacus import DenoisingPrivacyEngine

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*seed.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha:UserWarning"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
]

BATCH, IN, HIDDEN, CLASSES = 6, 5, 7, 3
# A clip norm no example reaches: the clipped sum is then the plain sum, which the test can
# compute with autograd alone (the secrets below are exact, not a re-implementation).
HUGE_C = 1e6
STEPS = 3


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, IN, generator=gen), torch.randint(0, CLASSES, (BATCH,), generator=gen)


def _secrets(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """What no stage may see, computed with autograd on a copy of the model: every example's
    gradient, the batch's clean gradient (sum and mean), and each layer's activation and output
    gradient (per-example data)."""
    twin = copy.deepcopy(model)
    found: dict[str, torch.Tensor] = {}
    for i in range(BATCH):
        twin.zero_grad()
        nn.functional.cross_entropy(twin(x[i : i + 1]), y[i : i + 1]).backward()
        for name, p in twin.named_parameters():
            found[f"example {i} grad {name}"] = p.grad.clone()
    for name, _ in twin.named_parameters():
        total = sum(found[f"example {i} grad {name}"] for i in range(BATCH))
        found[f"clean sum {name}"], found[f"clean mean {name}"] = total, total / BATCH
    hidden = twin[0](x)
    hidden.retain_grad()
    out = twin[2](twin[1](hidden))
    out.retain_grad()
    nn.functional.cross_entropy(out, y, reduction="sum").backward()
    found["hidden activation"] = twin[1](hidden).detach()
    found["hidden pre-activation"] = hidden.detach()
    found["output"] = out.detach()
    found["output gradient"] = out.grad
    found["hidden gradient"] = hidden.grad
    return found


def _reachable_tensors(roots: list, exclude: list) -> list[torch.Tensor]:
    """Every tensor reachable from ``roots`` by following references, closures, frames' locals,
    tensor attributes (Opacus keeps ``grad_sample``/``summed_grad`` there) and ``.grad``; not
    through modules, classes or functions' globals (the whole program), nor ``exclude`` (the
    stage's own records)."""
    seen: set[int] = {id(obj) for obj in exclude}
    stack, tensors = list(roots), []
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (type, types.ModuleType, str, bytes, int, float)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            tensors.append(obj)
            if obj.grad is not None:
                stack.append(obj.grad)
            stack.extend(getattr(obj, "__dict__", {}).values())
            continue
        if isinstance(obj, types.FunctionType):
            stack.extend(c.cell_contents for c in obj.__closure__ or () if _filled(c))
            stack.extend(obj.__defaults__ or ())
            continue
        if isinstance(obj, types.FrameType):
            stack.extend(obj.f_locals.values())
            continue
        stack.extend(gc.get_referents(obj))
    return tensors


def _filled(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018 (an empty cell raises)
    except ValueError:
        return False
    return True


def _engine_frames() -> list[types.FrameType]:
    """The call frames of the engine (rmt_kernels, opacus) above the stage: their locals hold
    the engine, the optimizer and what the step is working on."""
    return [
        f.frame
        for f in inspect.stack(context=0)
        if "/rmt_kernels/" in f.filename or "/opacus/" in f.filename
    ]


class HostileStage(PostProcessor):
    """Looks for clean data from every hook: ``__call__`` and each defaulted hook (called by
    the engines at moments a user may not expect: ``eligible``/``restrict_to`` at make_private,
    ``selected`` before the chain in the drop-in, ``output_sigma`` after the call, the stats
    hooks, ``state_dict``). Marked ``shrinks_matrices`` so that every hook is called."""

    shrinks_matrices = True

    def __init__(self, model: nn.Module, through_frames: bool = True) -> None:
        self.model, self.through_frames = model, through_frames
        #: What else the stage holds (the optimizer, set after make_private).
        self.roots: list = []
        self.looks: list[tuple[str, list[torch.Tensor], dict]] = []
        self.handed: list[dict] = []

    def look(self, hook: str) -> None:
        grads = {n: p.grad for n, p in self.model.named_parameters()}
        roots = [self.model, *self.roots, *(_engine_frames() if self.through_frames else ())]
        reached = _reachable_tensors(roots, exclude=[self.looks, self.handed])
        seen = [t.detach().clone() for t in reached]
        held = {n: None if g is None else g.clone() for n, g in grads.items()}
        self.looks.append((hook, seen, held))

    def __call__(self, grads, sigma, step):
        self.look("__call__")
        self.handed.append({k: g.clone() for k, g in grads.items()})
        for g in grads.values():  # no door into the model's graph through what it is handed
            assert g.grad_fn is None and not g.requires_grad
            with pytest.raises(RuntimeError, match="require"):
                g.register_hook(lambda grad: grad)
        return grads

    def output_sigma(self, sigma, step):
        self.look("output_sigma")
        return sigma

    def eligible(self, shape):
        self.look("eligible")
        return False

    def restrict_to(self, keys):
        self.look("restrict_to")

    def selected(self, grads):
        self.look("selected")
        return []

    def take_stats(self):
        self.look("take_stats")
        return {}

    def state_dict(self):
        self.look("state_dict")
        return {}


def _assert_nothing_clean(stage: HostileStage, secrets: dict[str, torch.Tensor]) -> None:
    assert stage.looks, "the stage never ran"
    hooks = {hook for hook, _, _ in stage.looks}
    for hook, seen, _ in stage.looks:
        for name, secret in secrets.items():
            for t in seen:
                if t.shape == secret.shape and t.dtype == secret.dtype:
                    same = torch.allclose(t, secret, rtol=1e-4, atol=1e-6)
                    assert not same, f"{hook} reached {name} (hooks looked: {sorted(hooks)})"


def test_a_hostile_stage_finds_nothing_clean_in_the_native_engine():
    model = _model()
    x, y = _batch()
    secrets = _secrets(model, x, y)
    stage = HostileStage(model)
    _, optimizer, _ = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),  # lr 0: every step has the same secrets
        DataLoader(TensorDataset(x, y), batch_size=BATCH),
        target_delta=1e-5,
        max_grad_norm=HUGE_C,
        noise_multiplier=1e-6,  # std 1 on the sum: every released entry far from the clean one
        poisson_sampling=False,
        seed=5,
        accountant="rdp",
        post_processors=[stage],
    )
    optimizer.engine.record_denoise_stats = True
    written = []
    for _ in range(STEPS):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.engine.take_denoise_stats()
        written.append({n: p.grad.clone() for n, p in model.named_parameters()})
    optimizer.engine.state_dict()
    calls = [hook for hook, _, _ in stage.looks]
    assert {"__call__", "output_sigma", "eligible", "restrict_to", "state_dict"} <= set(calls)
    _assert_nothing_clean(stage, secrets)
    # Through p.grad at the call: nothing at the first step, then the gradient written at the
    # step before (released, post-processed), never this step's clean gradient.
    at_calls = [grads for hook, _, grads in stage.looks if hook == "__call__"]
    assert all(g is None for g in at_calls[0].values())
    for grads, before in zip(at_calls[1:], written, strict=False):
        for name, g in grads.items():
            assert torch.equal(g, before[name]), name


def test_a_hostile_stage_finds_nothing_clean_in_the_opacus_drop_in():
    model = _model()
    x, y = _batch()
    secrets = _secrets(model, x, y)
    # Through the model and the optimizer (a stage holding them in its closure), not the call
    # frames: Opacus's accountant hook reads grad_sample after the chain, so the drop-in holds
    # the per-example gradients in a local while the chain runs (PRIVACY.md, invariant 4).
    stage = HostileStage(model, through_frames=False)
    engine = DenoisingPrivacyEngine(accountant="rdp")
    wrapped, optimizer, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=BATCH),
        noise_multiplier=1e-6,
        max_grad_norm=HUGE_C,
        poisson_sampling=False,
        post_processors=[stage],
    )
    stage.roots = [wrapped, optimizer, engine]
    for _ in range(STEPS):
        nn.functional.cross_entropy(wrapped(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    optimizer.state_dict()
    calls = {hook for hook, _, _ in stage.looks}
    assert {"__call__", "output_sigma", "selected", "state_dict"} <= calls
    _assert_nothing_clean(stage, secrets)
    # p.grad at the call is what the stage was handed: the released gradient.
    at_calls = [grads for hook, _, grads in stage.looks if hook == "__call__"]
    for grads, handed in zip(at_calls, stage.handed, strict=True):
        for i, (name, g) in enumerate(grads.items()):
            assert torch.equal(g, handed[i]), name
