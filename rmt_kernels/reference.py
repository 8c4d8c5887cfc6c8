"""Slow, obviously-correct versions of the ops: the yardstick of tests and benchmarks.

``denoise_exact`` is what arXiv 2510.01137 does every step: a full SVD of every matrix
(in float64 by default). The fused DP ops are checked against explicit per-example gradients,
computed with ``torch.func`` (``vmap`` of ``grad`` of ``<module(x_b), dy_b>``) in float64 and
materialised: B copies of every parameter.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.func import grad as func_grad

from rmt_kernels._checks import check_denoise_arguments
from rmt_kernels.shrinkage import norm_correction_factor, shrink_singular_values, target_norm


def denoise_exact(
    grad: torch.Tensor,
    sigma: float,
    *,
    shrinker: str = "frobenius",
    kappa: float = 1.0,
    rank: int = -1,
    norm: str = "none",
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Full-SVD singular-value shrinkage with the options of :func:`rmt_kernels.denoise`.

    Args:
        grad: noisy matrix (m, n) or batch (b, m, n); float32, bfloat16 or float16.
        sigma: per-entry noise std of ``grad``.
        shrinker, kappa, norm: as in :func:`rmt_kernels.denoise`.
        rank: -1 keeps every component above the threshold; k keeps at most the top k.
        compute_dtype: float64 for the yardstick of tests; float32 to time what a full-SVD
            implementation (arXiv 2510.01137) costs.

    Returns:
        The estimate, same shape and dtype as ``grad`` (computed in ``compute_dtype``).
    """
    check_denoise_arguments(grad, sigma, shrinker, kappa, rank, 0, 0, norm)
    if not torch.isfinite(grad).all():
        raise ValueError("denoise: grad contains NaN or Inf")
    m, n = grad.shape[-2:]
    a = grad.to(compute_dtype)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    shrunk = shrink_singular_values(s, m, n, sigma, shrinker, kappa)
    if rank > 0:
        shrunk[..., rank:] = 0.0
    if norm != "none":
        target = target_norm(a.square().sum((-2, -1)), m, n, sigma, norm)
        shrunk = shrunk * norm_correction_factor(shrunk, target).unsqueeze(-1)
    return ((u * shrunk.unsqueeze(-2)) @ vh).to(grad.dtype)


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

    return vmap(func_grad(inner), in_dims=(None, 0, 0))(params, x64, dy)


def per_example_sq_norms(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-parameter squared norms (B,) of per-example gradients."""
    return {k: g.flatten(1).square().sum(1) for k, g in grads.items()}


def clipped_sum(grads: dict[str, torch.Tensor], scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """``sum_b scale[b] * g_b`` per parameter, float64."""
    return {k: torch.einsum("b,b...->...", scale.double(), g) for k, g in grads.items()}
