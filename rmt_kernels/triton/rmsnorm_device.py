"""Device implementations of the RMSNorm DP ops, registered for CUDA in triton/register.py.

As the LayerNorm weight's (device.py): the per-example vectors are (B, d), small, so the
reductions are torch ops on the device and the noise is the Triton kernel of dp_noise.py
(imported when it runs, so a CPU install never needs Triton). The norm bound is the formula of
:func:`rmt_kernels.ops.rmsnorm_sq_norms`, the same as csrc/cpu/rmsnorm.cpp (privacy invariant 6,
PRIVACY.md).
"""

from __future__ import annotations

import math

import torch

from rmt_kernels._checks import check_rmsnorm_norms, check_rmsnorm_sum, check_scale_values
from rmt_kernels.triton.device import U64, _certified, _drop_zero_scaled, _noise_, _seq

__all__ = ["rmsnorm_clipped_noisy_sum_device", "rmsnorm_sq_norms_device"]


def rmsnorm_per_example(x: torch.Tensor, dy: torch.Tensor, eps: float) -> torch.Tensor:
    """(B, d) float32 per-example weight gradients ``sum_t dy_t * x_t / sqrt(mean(x_t^2) + eps)``
    (sqrt and division correctly rounded, as the C++ kernel)."""
    x3 = _seq(x).float()
    D = (x3.square().mean(2, keepdim=True) + eps).sqrt()
    return (_seq(dy).float() * (x3 / D)).sum(1)


def rmsnorm_sq_norms_device(x: torch.Tensor, dy: torch.Tensor, eps: float) -> torch.Tensor:
    """Device implementation of :func:`rmsnorm_sq_norms` (the bound stated there)."""
    check_rmsnorm_norms(x, dy, eps)
    x64, dy64 = _seq(x).double(), _seq(dy).double()
    T, d = x64.shape[1], x64.shape[2]
    sqd = math.sqrt(d)
    D = (x64.square().mean(2, keepdim=True) + eps).sqrt()
    Q = (dy64 * (x64 / D)).sum(1).square().sum(1)
    eps_t = 1.2 * (d + 12) * U64 * sqd * (1.0 + 8.0 * U64)
    M_t = dy64.abs().amax(2)
    err = (M_t * (eps_t + 1.2 * (T + 1) * U64 * sqd)).sum(1)
    route = ((Q * (1.0 + 2.0 * (d + 2) * U64)).sqrt() + err * (1.0 + 8.0 * U64)).square()
    route = route * (1.0 + 8.0 * U64)
    M = M_t.sum(1)
    trivial = M * M * (d * (1.0 + 3.0 * (T + 2) * U64))
    finite = torch.isfinite(M) & torch.isfinite(x64.sum((1, 2)))
    return _certified(route, trivial, finite)


def rmsnorm_clipped_noisy_sum_device(
    x: torch.Tensor,
    dy: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    noise_std: float,
    seed: int,
    offset: int,
) -> torch.Tensor:
    """Device implementation of :func:`rmsnorm_clipped_noisy_sum`."""
    check_rmsnorm_sum(x, dy, scale, eps, noise_std, seed, offset)
    check_scale_values("rmsnorm_clipped_noisy_sum", scale)
    per_example = _drop_zero_scaled(rmsnorm_per_example(x, dy, eps), scale)
    out = (per_example.mT @ scale.float()).contiguous()
    return _noise_(out, noise_std, seed, offset)
