"""rmt::denoise on a device: Triton kernels for the two passes that touch the matrix
elementwise (the Gaussian sketch and shrink + reconstruct), GEMMs in between.

One host synchronisation per sketch reads the adaptive-rank decision, the NaN/Inf check and
the "nothing above the edge" fast path together.
"""

from __future__ import annotations

import math

import torch

from rmt_kernels._checks import check_denoise_arguments
from rmt_kernels.linalg import cholesky_qr2, gram_svd, project_on_right_sketch
from rmt_kernels.shrinkage import target_norm
from rmt_kernels.triton.reconstruct import shrink_reconstruct
from rmt_kernels.triton.sketch import gaussian_sketch

# The adaptive sketch starts at this rank and doubles (same as csrc/cpu/denoise.cpp).
INITIAL_RANK = 8


def denoise_triton(
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
    """Same contract as :func:`rmt_kernels.denoise`, computed with the Triton kernels."""
    check_denoise_arguments(grad, sigma, shrinker, kappa, rank, oversample, niter, norm)
    batched = grad.dim() == 3
    a = grad if batched else grad.unsqueeze(0)
    transposed = a.shape[1] > a.shape[2]
    if transposed:
        a = a.transpose(1, 2)
    _b, p, q = a.shape
    a32 = a.float()  # a view for float32 input; GEMMs take any strides
    beta = p / q
    noise_scale = kappa * sigma * math.sqrt(q)
    threshold = noise_scale * (1.0 + math.sqrt(beta))

    k = rank if rank > 0 else min(INITIAL_RANK, p)
    while True:
        width = min(k + oversample, p)
        # The range finder of csrc/cpu/denoise.cpp: y_0 = A Omega, z_{i+1} = A^T orth(y_i),
        # y_{i+1} = A z_{i+1}; then A ~ (A W) W^T with W = orth(z).
        y = gaussian_sketch(a, width, seed)
        finite = torch.isfinite(y).all()  # NaN/Inf anywhere in grad reaches its row of y
        y = torch.nan_to_num(y, nan=0.0, posinf=0.0, neginf=0.0)
        if niter == 0:  # left finish A ~ Q (A^T Q)^T, as in the CPU kernel
            basis = cholesky_qr2(y)
            z = a32.mT @ basis
            y = basis @ (z.mT @ z)
        for _ in range(niter):
            z = a32.mT @ cholesky_qr2(y)
            y = a32 @ z
        c, w = project_on_right_sketch(z, y)
        s, v = gram_svd(c)
        settled = (s[:, k - 1] <= threshold).all()
        anything_above = (s[:, 0] > threshold).any()
        finite_ok, settled_ok, anything = torch.stack([finite, settled, anything_above]).tolist()
        if not finite_ok:
            raise ValueError("denoise: grad contains NaN or Inf")
        if rank > 0 or width == p or settled_ok:
            break
        k = min(2 * k, p)

    out = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
    if not anything:  # fast path: nothing above the edge, no reconstruction
        return out.zero_()
    target = None
    if norm != "none":
        target = target_norm(a32.double().square().sum((1, 2)), p, q, sigma, norm).float()
    out3 = out if batched else out.unsqueeze(0)
    # c = U S V^T: A ~ (c V) diag(1/S) (W V)^T; the kernel divides the S back out.
    shrink_reconstruct(
        c @ v,
        w @ v,
        s.contiguous(),
        out3.transpose(1, 2) if transposed else out3,
        noise_scale=noise_scale,
        beta=beta,
        shrinker=shrinker,
        keep=rank if rank > 0 else width,
        target=target,
    )
    return out
