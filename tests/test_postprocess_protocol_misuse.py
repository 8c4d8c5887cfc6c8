"""A user's post-processing stage that misuses the protocol (rmt_kernels/dp/stages/protocol.py)
is refused, never silently half-run: a stateful object that does not subclass
:class:`~rmt_kernels.dp.PostProcessor` (its ``state_dict`` and ``terminal`` were ignored: it was
wrapped as a plain function and a resume reset it), a stage that keeps state but left
``load_state_dict`` at its default, a stage that returns a gradient of another shape or dtype."""

from __future__ import annotations

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
]


class DuckMomentum:
    """A stateful stage written to the protocol's names but not subclassing it."""

    terminal = True

    def __init__(self) -> None:
        self.m: dict | None = None

    def __call__(self, grads, sigma, step):
        self.m = {k: g.clone() if self.m is None else 0.9 * self.m[k] + g for k, g in grads.items()}
        return dict(self.m)

    def state_dict(self):
        return {"m": self.m}

    def load_state_dict(self, state):
        self.m = state["m"]


class SavesButCannotLoad(PostProcessor):
    """Keeps a counter and checkpoints it, but forgot ``load_state_dict``."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, grads, sigma, step):
        self.calls += 1
        return grads

    def state_dict(self):
        return {"calls": self.calls}


class MomentumWithoutStateDict(PostProcessor):
    """Keeps a momentum tensor per key but leaves state_dict at the (empty) default."""

    def __init__(self) -> None:
        self.m: dict = {}

    def __call__(self, grads, sigma, step):
        self.m = {
            k: g.clone() if k not in self.m else 0.9 * self.m[k] + g for k, g in grads.items()
        }
        return dict(self.m)


class ConstantProjection(PostProcessor):
    """Holds a constant tensor and says so: an explicit empty state_dict."""

    def __init__(self) -> None:
        self.scale = torch.tensor(0.5)

    def __call__(self, grads, sigma, step):
        return {k: g * self.scale for k, g in grads.items()}

    def state_dict(self):
        return {}


def _private(stages, model=None, **options):
    model = nn.Linear(4, 2) if model is None else model
    data = TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    return make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        DataLoader(data, batch_size=4),
        target_delta=1e-5,
        max_grad_norm=1.0,
        noise_multiplier=1.0,
        poisson_sampling=False,
        seed=3,
        accountant="rdp",
        post_processors=stages,
        **options,
    )


def _dropin(stages):
    model = nn.Linear(4, 2)
    data = TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    return DenoisingPrivacyEngine(accountant="rdp").make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=4),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
        post_processors=stages,
    )


def test_a_stateful_stage_that_is_not_a_post_processor_is_refused_not_reset():
    # Before: wrapped as a plain function; engine.state_dict() held {} for it (its momentum
    # lost at every resume) and its terminal flag was ignored (a stage after it accepted).
    match = r"post_processors\[0\] \(DuckMomentum\) defines load_state_dict, state_dict, terminal"
    with pytest.raises(TypeError, match=match):
        _private([DuckMomentum(), lambda grads, sigma, step: grads])
    with pytest.raises(TypeError, match=match):
        _dropin([DuckMomentum()])
    # A plain function (no hook) is still a stage with every default.
    _, optimizer, _ = _private([lambda grads, sigma, step: grads])
    assert optimizer.engine.state_dict()["post_processors"] == [{}]


def test_a_stage_keeping_tensors_with_the_default_state_dict_is_refused_at_checkpoint():
    # Before: engine.state_dict() held {} for it; a resume silently restarted its momentum.
    match = r"post_processors\[0\] \(MomentumWithoutStateDict\) keeps tensors in \['m'\]"
    for build in (_private, _dropin):
        stage = MomentumWithoutStateDict()
        model, optimizer, loader = build([stage])
        x, y = next(iter(loader))
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        assert stage.m  # it did keep state
        with pytest.raises(TypeError, match=match):
            optimizer.engine.state_dict() if build is _private else optimizer.state_dict()
    # A stage that declares its (constant) tensors stateless checkpoints fine.
    _, optimizer, _ = _private([ConstantProjection()])
    assert optimizer.engine.state_dict()["post_processors"] == [{}]


def test_a_stage_that_saves_state_it_cannot_load_is_refused_at_resume():
    stage = SavesButCannotLoad()
    model, optimizer, loader = _private([stage])
    x, y = next(iter(loader))
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    state = optimizer.engine.state_dict()
    assert state["post_processors"] == [{"calls": 1}]
    _, resumed, _ = _private([SavesButCannotLoad()])
    with pytest.raises(ValueError, match=r"SavesButCannotLoad.load_state_dict: it keeps no state"):
        resumed.engine.load_state_dict(state)


@pytest.mark.parametrize(
    "returned",
    [
        lambda g: g.t().contiguous() if g.dim() == 2 else g,  # transposed
        lambda g: g.reshape(-1),  # flattened, same size
        lambda g: g[..., :1],  # fewer entries
    ],
    ids=["transposed", "flattened", "cut"],
)
def test_a_stage_returning_another_shape_is_refused_by_both_engines(returned):
    def bad(grads, sigma, step):
        return {k: returned(g) for k, g in grads.items()}

    model, optimizer, loader = _private([bad])
    x, y = next(iter(loader))
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"has shape .* but the parameter has shape"):
        optimizer.step()
    model, optimizer, loader = _dropin([bad])
    x, y = next(iter(loader))
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="attempting to assign a gradient of size"):
        optimizer.step()


def test_a_stage_returning_another_dtype_is_cast_by_the_engine_and_refused_by_the_drop_in():
    def double(grads, sigma, step):
        return {k: g.double() for k, g in grads.items()}

    model, optimizer, loader = _private([double])
    x, y = next(iter(loader))
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    model, optimizer, loader = _dropin([double])
    x, y = next(iter(loader))
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="attempting to assign a gradient with dtype"):
        optimizer.step()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_stage_returning_a_non_finite_gradient_is_refused_before_any_is_written(bad):
    # The released gradient is finite (privacy invariant 6, PRIVACY.md: a non-finite example
    # contributes nothing); a stage that makes it NaN trained every parameter into NaN silently.
    def poison(grads, sigma, step):
        out = dict(grads)
        key = next(iter(out))
        out[key] = out[key].clone()
        out[key].view(-1)[0] = bad
        return out

    model, optimizer, loader = _private([poison])
    x, y = next(iter(loader))
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"non-finite gradient for \['weight'\]"):
        optimizer.step()
    assert all(p.grad is None for p in model.parameters())


def test_the_refusal_names_the_users_index_when_denoise_puts_its_denoiser_first():
    # denoise= puts a Denoiser before the user's stages; the message must still name the stage
    # by its index in the user's post_processors (it named post_processors[1] before).
    stage = MomentumWithoutStateDict()
    model, optimizer, loader = _private([stage], denoise={})
    x, y = next(iter(loader))
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    assert len(optimizer.engine.post_processors) == 2
    with pytest.raises(TypeError, match=r"post_processors\[0\] \(MomentumWithoutStateDict\)"):
        optimizer.engine.state_dict()
