"""The measurement of ``rmt-glue probe``: the clean mean clipped gradient (per-example clipping
at C as DP-SGD does, no noise) of the matrices the native engine denoises, over a fixed set of
training examples. It reads the examples without noise: NOT differentially private.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rmt_kernels.dp.stages.denoiser import denoise_linear_weights
from rmt_kernels.dp.stages.options import MIN_DENOISE_DIM
from rmt_kernels.glue.data import Encoded
from rmt_kernels.glue.model import forward, loss_fn
from rmt_kernels.glue.tasks import Task


def probed_matrices(model: nn.Module, min_dim: int = MIN_DENOISE_DIM) -> list[str]:
    """The parameter names the probe measures: what the native engine denoises by default (the
    trainable 2-D weights of ``nn.Linear`` with a smaller side of at least ``min_dim``)."""
    names = []
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if (
                p.requires_grad
                and denoise_linear_weights(module_name, module, name, p)
                and min(p.shape) >= min_dim
            ):
                names.append(f"{module_name}.{name}" if module_name else name)
    return names


@dataclass
class CleanGradient:
    """The mean over examples of the per-example gradients clipped to C, for some matrices."""

    matrices: dict[str, torch.Tensor]  # float64, by parameter name
    examples: int
    clipped_fraction: float  # examples whose gradient norm exceeded C
    median_example_norm: float  # of the unclipped per-example gradients (all parameters)
    seconds: float = 0.0


def _sparse_embeddings(model: nn.Module) -> list[tuple[nn.Embedding, bool]]:
    """Make every embedding's gradient sparse (the rows of the example's tokens only): a dense
    30522 x 384 gradient per example costs more than the rest of the backward. The values are
    the same; the caller restores the flags."""
    changed = []
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.weight.requires_grad:
            changed.append((module, module.sparse))
            module.sparse = True
    return changed


def clean_clipped_gradient(
    model: nn.Module,
    data: Encoded,
    indices: Sequence[int],
    task: Task,
    max_grad_norm: float,
    names: Sequence[str],
    device: torch.device | str = "cpu",
) -> CleanGradient:
    """``(1/N) sum_i min(1, C / ||g_i||) g_i`` over the examples ``indices`` of ``data``, for
    the parameters ``names``, in float64: DP-SGD's clipped mean with no noise and the batch
    being the whole set. ``||g_i||`` runs over all trainable parameters, as DP-SGD's clipping
    does. One example per forward and backward (exact: no padding, no per-sample machinery), in
    evaluation mode (no dropout: the gradient of the model, not of one dropout draw).

    Raises:
        ValueError: ``max_grad_norm`` not finite and positive, no examples, an index outside the
            data, a name that is not a trainable parameter, or a non-finite gradient.
    """
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm}")
    if not len(indices):
        raise ValueError("no examples to measure the gradient on")
    bad = [i for i in indices if not 0 <= int(i) < len(data)]
    if bad:
        raise ValueError(f"example index {bad[0]} is outside the {len(data)} examples")
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params or not params[n].requires_grad]
    if missing:
        raise ValueError(f"not trainable parameters of the model: {missing}")
    trainable = [p for p in params.values() if p.requires_grad]
    sums = {n: torch.zeros(params[n].shape, dtype=torch.float64) for n in names}
    was_training = model.training
    model.eval()
    flags = _sparse_embeddings(model)
    start = time.perf_counter()
    norms = []
    try:
        for i in indices:
            model.zero_grad(set_to_none=True)
            batch = data.batch([int(i)])
            loss = loss_fn(forward(model, batch, device), batch["labels"].to(device), task)
            loss.backward()
            sq = 0.0
            for p in trainable:
                if p.grad is not None:
                    g = p.grad.coalesce().values() if p.grad.is_sparse else p.grad
                    sq += float(torch.linalg.vector_norm(g, dtype=torch.float64)) ** 2
            norm = math.sqrt(sq)
            if not math.isfinite(norm):
                raise ValueError(f"example {int(i)}: its gradient is not finite")
            norms.append(norm)
            factor = min(1.0, max_grad_norm / norm) if norm > 0 else 1.0
            for n in names:
                grad = params[n].grad
                if grad is not None:
                    sums[n].add_(grad.to("cpu", torch.float64), alpha=factor)
    finally:
        model.zero_grad(set_to_none=True)
        for module, sparse in flags:
            module.sparse = sparse
        model.train(was_training)
    count = len(norms)
    return CleanGradient(
        matrices={n: s / count for n, s in sums.items()},
        examples=count,
        clipped_fraction=sum(v > max_grad_norm for v in norms) / count,
        median_example_norm=statistics.median(norms),
        seconds=time.perf_counter() - start,
    )
