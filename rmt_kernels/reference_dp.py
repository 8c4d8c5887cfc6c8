"""Slow, obviously-correct per-example gradients for the fused DP ops: the yardstick of their
tests and benchmarks.

Each example's gradient is computed explicitly with ``torch.func`` (``vmap`` of ``grad`` of
``<module(x_b), dy_b>``), in float64, and materialised: B copies of every parameter.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, grad, vmap


def per_example_grads(
    module: nn.Module, x: torch.Tensor, dy: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Explicit per-example gradients ``{name: (B, *param.shape)}`` of ``module``'s parameters.

    Args:
        module: the layer (Linear, Embedding, LayerNorm or any module whose output for one example
            depends only on that example).
        x: the layer input, batch first (token ids for an Embedding).
        dy: the gradient of the layer output, batch first.

    Returns:
        float64 per-example gradients of the parameters that require grad.
    """
    module64 = copy.deepcopy(module).double()
    params = {k: v.detach() for k, v in module64.named_parameters() if v.requires_grad}
    x64 = x if not x.is_floating_point() else x.double()

    def inner(p: dict[str, torch.Tensor], xb: torch.Tensor, dyb: torch.Tensor) -> torch.Tensor:
        out = functional_call(module64, p, (xb.unsqueeze(0),))
        return (out * dyb.unsqueeze(0).double()).sum()

    return vmap(grad(inner), in_dims=(None, 0, 0))(params, x64, dy)


def per_example_sq_norms(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-parameter squared norms (B,) of per-example gradients."""
    return {k: g.flatten(1).square().sum(1) for k, g in grads.items()}


def clipped_sum(grads: dict[str, torch.Tensor], scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """``sum_b scale[b] * g_b`` per parameter, float64."""
    return {k: torch.einsum("b,b...->...", scale.double(), g) for k, g in grads.items()}
