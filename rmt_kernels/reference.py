"""Slow, obviously-correct versions of the ops: the yardstick of tests and benchmarks.

``denoise_exact`` is what arXiv 2510.01137 does every step: a full SVD of every matrix
(in float64 by default).
"""

from __future__ import annotations

import torch

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
