"""GEMM-based dense helpers for the device (Triton) path of the range finder.

On a GPU, Householder QR and the SVD of a tall matrix are slow launches of cuSOLVER; Gram
matrices of a thin sketch are one small GEMM each. The Gram matrices are formed in float64
(k x k, cheap), which keeps CholeskyQR accurate for condition numbers far beyond what float32
data can carry.
"""

from __future__ import annotations

import torch

# Relative shift added to the Gram matrix: far above float64 rounding, far below anything that
# float32 data can resolve. It lets Cholesky succeed on rank-deficient sketches (an exactly
# low-rank or zero gradient).
GRAM_SHIFT = 1e-12
# Absolute floor of the shift, so an all-zero sketch gives a zero basis instead of a NaN.
GRAM_SHIFT_FLOOR = 1e-300


def _cholesky_qr_step(y: torch.Tensor) -> torch.Tensor:
    y64 = y.double()
    gram = y64.mT @ y64
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    shift = (GRAM_SHIFT * trace + GRAM_SHIFT_FLOOR)[..., None, None]
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    # cholesky_ex does not synchronise with the host; the shift makes it succeed on finite input.
    lower = torch.linalg.cholesky_ex(gram + shift * eye).L
    lower_inv = torch.linalg.solve_triangular(lower, eye.expand_as(lower), upper=False)
    # Applied in float64 so that tiny (or zero) columns are not pushed past float32's range.
    return (y64 @ lower_inv.mT).to(y.dtype)


def cholesky_qr2(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (..., p, k) of the columns of ``y`` by shifted CholeskyQR, twice.

    The second pass restores orthogonality lost to rounding in the first (Fukaya et al., 2014).
    The shift lets Cholesky succeed on rank-deficient ``y``: float32 rounding directions are
    normalised like any other (harmless extra basis vectors), and an all-zero ``y`` gives zeros.
    """
    return _cholesky_qr_step(_cholesky_qr_step(y))


def _finite_gram(x: torch.Tensor) -> torch.Tensor:
    x64 = x.double()
    # NaN/Inf must not reach the eigensolver; callers raise on them after their one host
    # synchronisation.
    return torch.nan_to_num(x64.mT @ x64, nan=0.0, posinf=0.0, neginf=0.0)


def gram_svd(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values (descending) and right singular vectors of a tall ``c`` (..., p, k).

    Returns ``s`` (..., k) and ``v`` (..., k, k) with ``c = u diag(s) v^T``, from the float64
    Gram matrix: a k x k eigenproblem instead of a tall SVD, whose GPU solvers are slow for
    batches. Squaring in float64 keeps values down to ~1e-8 of the largest.
    """
    evals, evecs = torch.linalg.eigh(_finite_gram(c))
    s = evals.flip(-1).clamp_min(0.0).sqrt()
    return s.to(c.dtype), evecs.flip(-1).to(c.dtype)
