"""Public entry points of the ``torch.ops.rmt`` ops, their fake (meta) implementations and the
CUDA kernels registered from Triton launchers.

Layers, plainly stacked: C++ schema (csrc/rmt.cpp) -> per-backend kernel (csrc/cpu for CPU,
rmt_kernels/triton for CUDA) -> the documented Python functions below.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rmt_kernels._checks import check_denoise_arguments

__all__ = ["denoise", "denoise_many"]


def denoise(
    grad: torch.Tensor,
    sigma: float,
    *,
    shrinker: str = "frobenius",
    kappa: float = 1.0,
    rank: int = -1,
    oversample: int = 8,
    niter: int = 2,
    norm: str = "none",
    seed: int = 0,
) -> torch.Tensor:
    """Denoise a noisy gradient matrix by Marchenko-Pastur singular-value shrinkage.

    Same as ``torch.ops.rmt.denoise(grad, sigma, ...)``. A randomized range finder (Gaussian test
    matrix, ``niter`` power iterations, a small core SVD) finds the components above the noise
    bulk; their singular values are shrunk and everything at or below ``kappa`` times the bulk
    edge ``sigma * (sqrt(m) + sqrt(n))`` is zeroed. It reads only the noisy matrix and ``sigma``,
    so applied to a DP-SGD gradient it is post-processing: the privacy guarantee is unchanged.

    Args:
        grad: noisy matrix (m, n) or batch of matrices (b, m, n), float32, bfloat16 or float16,
            any strides. Computation is in float32; the result has ``grad``'s dtype.
        sigma: per-entry noise std of ``grad``. For the DP-SGD averaged gradient this is
            ``noise_multiplier * max_grad_norm / batch_size`` (public hyper-parameters only).
        shrinker: ``"frobenius"`` (Gavish-Donoho optimal for Frobenius loss), ``"operator"``
            (debiasing), ``"nuclear"``, or ``"hard"`` (keep values above the threshold as they are).
        kappa: multiplier of the bulk edge; the shrinkers are evaluated at noise level
            ``kappa * sigma`` so they stay continuous at the threshold.
        rank: -1 (adaptive: the sketch grows until its ``rank``-th value is below the threshold,
            so every component above it is kept) or a fixed number of components to keep at most.
        oversample: extra sketch columns beyond ``rank``, for accuracy of the kept components.
        niter: power iterations of the range finder (0 to 100).
        norm: ``"none"``; ``"preserve"`` rescales the estimate to ``||grad||_F``; ``"debiased"``
            rescales it to ``sqrt(max(||grad||_F^2 - sigma^2 m n, 0))``. A zero estimate stays zero.
        seed: seed of the Gaussian test matrix; same seed and input give the same output.

    Returns:
        The estimate: a new contiguous tensor of ``grad``'s shape and dtype.

    Raises:
        ValueError / TypeError naming the argument: wrong ndim, empty dimension, non-float dtype,
        sigma or kappa not finite and positive, rank outside [1, min(m, n)] and not -1, negative
        oversample or niter, unknown shrinker or norm, NaN or Inf in ``grad``.

    Example:
        >>> g = torch.randn(768, 3072) * 0.01            # a noisy DP gradient
        >>> clean = rmt_kernels.denoise(g, sigma=0.01)   # pure noise comes back as ~zero
    """
    # Checked here too, before C++: an int option past int64 (or near it, e.g. an oversample of
    # 2**63 - 1) would otherwise overflow in the kernel's arithmetic or fail with a binding error.
    check_denoise_arguments(grad, sigma, shrinker, kappa, rank, oversample, niter, norm, seed)
    return torch.ops.rmt.denoise(
        grad,
        float(sigma),
        shrinker=shrinker,
        kappa=float(kappa),
        rank=int(rank),
        oversample=int(oversample),
        niter=int(niter),
        norm=norm,
        seed=int(seed),
    )


def denoise_many(
    grads: Sequence[torch.Tensor],
    sigmas: float | Sequence[float],
    **options,
) -> list[torch.Tensor]:
    """Denoise a model's worth of matrices, grouping equal shapes into batched launches.

    On a GPU, matrices of equal shape, dtype and sigma are stacked into one batched call. On the
    CPU they are denoised one by one: the BLAS work is the same and stacking would copy them.

    Args:
        grads: 2-D matrices of any mix of shapes, dtypes and devices.
        sigmas: one per-entry noise std for all of them, or one per matrix.
        **options: keyword options of :func:`denoise` (shrinker, kappa, rank, ...).

    Returns:
        The estimates, in the order of ``grads``.
    """
    grads = list(grads)
    if isinstance(sigmas, (int, float)):
        sigma_list = [float(sigmas)] * len(grads)
    else:
        sigma_list = [float(s) for s in sigmas]
        if len(sigma_list) != len(grads):
            raise ValueError(
                f"denoise_many: sigmas must be one number or one per matrix: got {len(sigma_list)} "
                f"sigmas for {len(grads)} grads"
            )
    groups: dict[tuple, list[int]] = {}
    for i, (g, s) in enumerate(zip(grads, sigma_list, strict=True)):
        if not isinstance(g, torch.Tensor) or g.dim() != 2:
            shape = list(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
            raise ValueError(f"denoise_many: grads[{i}] must be a 2-D matrix, got {shape}")
        groups.setdefault((tuple(g.shape), g.dtype, g.device, s), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(grads)
    for (_, _, device, sigma), indices in groups.items():
        # On the CPU a batched call does the same BLAS work as separate calls, and stacking
        # would copy every gradient: only devices, where launches cost, get batched.
        if len(indices) == 1 or device.type == "cpu":
            for i in indices:
                out[i] = denoise(grads[i], sigma, **options)
            continue
        batch = denoise(torch.stack([grads[i] for i in indices]), sigma, **options)
        for i, estimate in zip(indices, batch.unbind(0), strict=True):
            out[i] = estimate
    return out  # type: ignore[return-value]


@torch.library.register_fake("rmt::denoise")
def _denoise_fake(
    grad: torch.Tensor,
    sigma: float,
    *,
    shrinker: str = "frobenius",
    kappa: float = 1.0,
    rank: int = -1,
    oversample: int = 8,
    niter: int = 2,
    norm: str = "none",
    seed: int = 0,
) -> torch.Tensor:
    check_denoise_arguments(grad, sigma, shrinker, kappa, rank, oversample, niter, norm)
    return torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)


@torch.library.register_kernel("rmt::denoise", "cuda")
def _denoise_cuda(
    grad: torch.Tensor,
    sigma: float,
    *,
    shrinker: str = "frobenius",
    kappa: float = 1.0,
    rank: int = -1,
    oversample: int = 8,
    niter: int = 2,
    norm: str = "none",
    seed: int = 0,
) -> torch.Tensor:
    # Imported here so that importing rmt_kernels never needs Triton (a CPU install has no use
    # for it).
    from rmt_kernels.triton.denoise import denoise_triton

    return denoise_triton(
        grad,
        sigma,
        shrinker=shrinker,
        kappa=kappa,
        rank=rank,
        oversample=oversample,
        niter=niter,
        norm=norm,
        seed=seed,
    )
