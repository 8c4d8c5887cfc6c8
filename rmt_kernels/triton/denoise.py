"""rmt::denoise on a device: Triton kernels for the two passes that touch the matrix
elementwise (the Gaussian sketch and shrink + reconstruct), GEMMs in between.

One host synchronisation per sketch reads the adaptive-rank decision, the NaN/Inf check and
the "nothing above the edge" fast path together.
"""

from __future__ import annotations

import math

import torch

from rmt_kernels import _C
from rmt_kernels._checks import check_denoise_arguments
from rmt_kernels.linalg import cholesky_qr2, gram_svd
from rmt_kernels.shrinkage import target_norm
from rmt_kernels.triton.reconstruct import shrink_reconstruct
from rmt_kernels.triton.sketch import gaussian_sketch

# The adaptive sketch starts at this rank and doubles (csrc/constants.h).
INITIAL_RANK: int = _C.INITIAL_RANK


def denoise_triton(
    grad: torch.Tensor,
    sigma: float,
    *,
    shrinker: str = "frobenius",
    kappa: float = 1.0,
    rank: int = -1,
    oversample: int = 8,
    niter: int = -1,
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

    # The adaptive stopping rule (niter = -1) of the CPU kernel is not on the device path yet:
    # it takes the former default, two power iterations.
    niter = 2 if niter < 0 else niter
    k = rank if rank > 0 else min(INITIAL_RANK, p)
    while True:
        width = min(k + oversample, p)
        # The range finder of csrc/cpu/denoise.cpp: Q = orth((A A^T)^niter A Omega), then
        # the SVD of B = Q^T A, here from the Gram matrix of B^T.
        y = gaussian_sketch(a, width, seed)
        finite = torch.isfinite(y).all()  # NaN/Inf anywhere in grad reaches its row of y
        basis = cholesky_qr2(torch.nan_to_num(y, nan=0.0, posinf=0.0, neginf=0.0))
        for _ in range(niter):
            basis = cholesky_qr2(a32 @ (a32.mT @ basis))
        bt = a32.mT @ basis
        s, ub = gram_svd(bt)
        settled = (s[:, k - 1] <= threshold).all()
        above = (s > threshold).sum(1).max()
        finite_ok, settled_ok, above_count = torch.stack([finite, settled, above]).tolist()
        if not finite_ok:
            raise ValueError("denoise: grad contains NaN or Inf")
        if rank > 0 or width == p or settled_ok:
            break
        k = min(2 * k, p)

    out = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
    if above_count == 0:  # fast path: nothing above the edge, no reconstruction
        return out.zero_()
    # Only the components above the threshold in some matrix are reconstructed.
    kept = min(above_count, rank) if rank > 0 else above_count
    basis_u, s = basis @ ub[..., :kept], s[:, :kept].contiguous()
    right = bt @ ub[..., :kept]
    target = None
    if norm != "none":
        target = target_norm(a32.double().square().sum((1, 2)), p, q, sigma, norm).float()
    out3 = out if batched else out.unsqueeze(0)
    # A ~ (Q U_b) diag(1/S) (B^T U_b)^T; the kernel shrinks S and divides it back out.
    shrink_reconstruct(
        basis_u,
        right,
        s,
        out3.transpose(1, 2) if transposed else out3,
        noise_scale=noise_scale,
        beta=beta,
        shrinker=shrinker,
        keep=kept,
        target=target,
    )
    return out
