"""Black-box audit: mislabelled canaries, scored by the final model's loss.

Works with any model and data: the caller's ``train`` function receives the included canaries
(a dataset), trains on its own data plus them (through ``make_private`` for a private run), and
returns the final model and its accountant's epsilon. Each canary is an example with a wrong
label (:func:`mislabel`), so a model that memorises it has an unusually low loss on it; the
score is the negative per-example loss, computed on every canary after training.

Only the final model is used, so this audits what a user can see (the weights), and the bound is
usually far below the white-box one: the noise of every step and the other examples both hide
the canary. For GLUE, build the canaries from held-out sentences of the task
(``rmt_kernels.glue``'s data helpers) with :func:`mislabel`'d labels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from rmt_kernels.audit.guesses import draw_inclusion
from rmt_kernels.audit.strategy import AuditResult, Bonferroni, Fixed, Split, audit

__all__ = ["BlackBoxResult", "black_box_audit", "mislabel"]


def mislabel(labels: torch.Tensor, num_classes: int, seed: int) -> torch.Tensor:
    """Each label replaced by a different class, uniformly at random (seeded).

    Args:
        labels: int64 class labels in [0, num_classes).
        num_classes: >= 2.
        seed: seeds the choice.
    """
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, num_classes = {num_classes})")
    g = torch.Generator().manual_seed(seed)
    shift = torch.randint(1, num_classes, labels.shape, generator=g)
    return (labels + shift) % num_classes


@dataclasses.dataclass
class BlackBoxResult:
    """The bound, the accountant's epsilon of the run, and the raw material."""

    audit: AuditResult
    accountant_epsilon: float
    scores: np.ndarray
    included: np.ndarray

    def to_dict(self) -> dict:
        return {
            "mode": "black-box",
            "accountant_epsilon": self.accountant_epsilon,
            "epsilon_lower_bound": self.audit.epsilon,
            "confidence": 1 - self.audit.p_fail,
            "audit": self.audit.to_dict(),
        }


def black_box_audit(
    canaries: Dataset,
    train: Callable[[Dataset], tuple[nn.Module, float]],
    per_example_loss: Callable[[nn.Module, object], torch.Tensor],
    *,
    p_fail: float = 0.05,
    delta: float = 1e-6,
    seed: int = 0,
    strategy: Bonferroni | Split | Fixed | None = None,
    batch_size: int = 256,
) -> BlackBoxResult:
    """One training run with mislabelled canaries, each included with probability 1/2.

    Args:
        canaries: a map-style dataset of m >= 2 canaries (e.g. a TensorDataset of inputs and
            :func:`mislabel`'d labels).
        train: ``train(included_canaries) -> (model, accountant_epsilon)``: trains once on the
            caller's data plus these canaries (with ``make_private`` for a private run).
        per_example_loss: ``per_example_loss(model, batch) -> (B,)`` losses of a batch of
            canaries as the default collate makes it; run under ``torch.no_grad()`` and the
            model's eval mode.
        p_fail, delta, strategy: as in :func:`rmt_kernels.audit.audit`; ``accountant_epsilon``
            should be at this ``delta``.
        seed: seeds the coin flips.
        batch_size: canaries scored per batch.
    """
    m = len(canaries)
    if m < 2:
        raise ValueError(f"canaries must hold at least 2 examples, got {m}")
    included = draw_inclusion(m, np.random.default_rng([seed, 2]))
    model, accountant_epsilon = train(Subset(canaries, np.flatnonzero(included).tolist()))
    if not isinstance(model, nn.Module):
        raise TypeError(f"train must return (model, epsilon), got a {type(model).__name__}")
    was_training = model.training
    model.eval()
    losses = []
    with torch.no_grad():
        for batch in DataLoader(canaries, batch_size=batch_size, shuffle=False):
            loss = per_example_loss(model, batch)
            if loss.dim() != 1:
                raise ValueError(f"per_example_loss must return (B,) losses, got {loss.shape}")
            losses.append(loss.double())
    model.train(was_training)
    scores = -torch.cat(losses).numpy()
    result = audit(scores, included, p_fail=p_fail, delta=delta, strategy=strategy)
    return BlackBoxResult(result, float(accountant_epsilon), scores, included)
