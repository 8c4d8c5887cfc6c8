"""Red team 28: a post-processing stage whose state hides where the tensor scan of
``checkpoint_state`` did not look (rmt_kernels/dp/stages/state_digest.py).

Before: a stage with the default ``state_dict`` that kept its momentum in a deque, a plain
object, a module's buffer, a numpy array, a decaying float, a torch.Generator, a closure's
variable or a ``functools.partial`` was checkpointed as ``{}``; the resumed run silently
diverged from the uninterrupted one (max |parameter difference| 0.005 to 0.3 after 3 steps on a
tiny model, /tmp/redteam-28/h_stages.py). Now the checkpoint is refused, on both engines, and a
stage that only reads what a checkpoint restores anyway (the model's weights, the optimizer's
learning rate) is not.
"""

from __future__ import annotations

import collections
import functools
import logging
import types

import numpy as np
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


def _momentum(m: dict, grads: dict) -> dict:
    return {k: g.clone() if k not in m else 0.9 * m[k] + g for k, g in grads.items()}


class _InDeque(PostProcessor):
    def __init__(self) -> None:
        self.history = collections.deque(maxlen=3)

    def __call__(self, grads, sigma, step):
        self.history.append(dict(grads))
        return {k: sum(h[k] for h in self.history) for k in grads}


class _InObject(PostProcessor):
    def __init__(self) -> None:
        self.state = types.SimpleNamespace(m={})

    def __call__(self, grads, sigma, step):
        self.state.m = _momentum(self.state.m, grads)
        return dict(self.state.m)


class _InBuffer(PostProcessor):
    def __init__(self) -> None:
        self.scale = nn.Module()
        self.scale.register_buffer("value", torch.ones(()))

    def __call__(self, grads, sigma, step):
        self.scale.value.mul_(0.5)
        return {k: g * self.scale.value for k, g in grads.items()}


class _InNumpy(PostProcessor):
    def __init__(self) -> None:
        self.total = np.zeros(1)

    def __call__(self, grads, sigma, step):
        self.total += 1.0
        return {k: g * float(self.total[0]) for k, g in grads.items()}


class _InFloat(PostProcessor):
    def __init__(self) -> None:
        self.scale = 1.0

    def __call__(self, grads, sigma, step):
        self.scale *= 0.5
        return {k: g * self.scale for k, g in grads.items()}


class _InGenerator(PostProcessor):
    def __init__(self) -> None:
        self.generator = torch.Generator().manual_seed(0)

    def __call__(self, grads, sigma, step):
        return {k: g + torch.randn(g.shape, generator=self.generator) for k, g in grads.items()}


def _closure():
    m: dict = {}

    def stage(grads, sigma, step):
        m.update(_momentum(m, grads))
        return dict(m)

    return stage


def _partial():
    def stage(m, grads, sigma, step):
        m.update(_momentum(m, grads))
        return dict(m)

    return functools.partial(stage, {})


HIDDEN = {
    "deque": _InDeque,
    "plain object": _InObject,
    "module buffer": _InBuffer,
    "numpy array": _InNumpy,
    "float": _InFloat,
    "torch.Generator": _InGenerator,
    "closure": _closure,
    "functools.partial": _partial,
}


def _native(stages, model=None, optimizer=None):
    model = nn.Linear(4, 2) if model is None else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1) if optimizer is None else optimizer
    data = TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    return make_private(
        model,
        optimizer,
        DataLoader(data, batch_size=4),
        target_delta=1e-5,
        max_grad_norm=1.0,
        noise_multiplier=1.0,
        poisson_sampling=False,
        seed=3,
        accountant="rdp",
        post_processors=stages,
    )


def _dropin(stages, model=None, optimizer=None):
    model = nn.Linear(4, 2) if model is None else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1) if optimizer is None else optimizer
    data = TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    return DenoisingPrivacyEngine(accountant="rdp").make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(data, batch_size=4),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
        post_processors=stages,
    )


def _checkpoint_after_steps(build, stage, model=None, optimizer=None, steps=1):
    model, optimizer, loader = build([stage], model, optimizer)
    x, y = next(iter(loader))
    for _ in range(steps):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer.engine.state_dict() if build is _native else optimizer.state_dict()


@pytest.mark.parametrize("build", [_native, _dropin], ids=["engine", "drop-in"])
@pytest.mark.parametrize("make", list(HIDDEN.values()), ids=list(HIDDEN))
def test_a_stage_whose_undeclared_state_changed_is_refused_at_checkpoint(make, build):
    with pytest.raises(TypeError, match=r"changed its state since the chain was built"):
        _checkpoint_after_steps(build, make())


@pytest.mark.parametrize("build", [_native, _dropin], ids=["engine", "drop-in"])
def test_a_stage_reading_the_weights_and_the_learning_rate_checkpoints(build):
    """Stateless stages that read what a checkpoint restores anyway (the model's weights, an
    optimizer whose momentum buffers change at every step), use a logger, or, as a plain
    function, collect floats for a log: not refused."""
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    weights = dict(enumerate(model.parameters()))
    before = [p.detach().clone() for p in model.parameters()]

    def weight_decay(grads, sigma, step):  # closes over the model's parameters
        return {k: g + 1e-3 * weights[i] for i, (k, g) in enumerate(grads.items())}

    class ScaledByRate(PostProcessor):
        def __init__(self) -> None:
            self.optimizer = optimizer  # read, never changed by the stage
            self.log = logging.getLogger("a_stage")  # its level cache fills as it logs

        def __call__(self, grads, sigma, step):
            self.log.debug("step %d", step)
            return {k: g * self.optimizer.param_groups[0]["lr"] for k, g in grads.items()}

    sigmas = []

    def logs_its_sigmas(grads, sigma, step):  # a plain function collecting floats for a log
        sigmas.append(sigma)
        return dict(grads)

    stages = (weight_decay, ScaledByRate(), logs_its_sigmas)
    for i, stage in enumerate(stages):
        model = nn.Linear(4, 2) if i else model
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if i else optimizer
        state = _checkpoint_after_steps(build, stage, model, optimizer, steps=2)
        assert state is not None
    # What the stages read did change (the test would pass vacuously otherwise).
    assert len(sigmas) == 2
    assert not all(torch.equal(p, b) for p, b in zip(weights.values(), before, strict=True))
