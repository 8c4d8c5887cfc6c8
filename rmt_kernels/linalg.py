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


def _unit_columns(q: torch.Tensor) -> bool:
    """Whether every column has unit norm (one host synchronisation): what CholeskyQR gives
    unless the block had (nearly) dependent columns."""
    return bool(((q.double().square().sum(-2) - 1.0).abs() < 1e-5).all())


def orthonormal_block(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (b, m, w) float32 of the columns of ``y`` (b, m, w).

    CholeskyQR2, or Householder QR (``torch.linalg.qr``, slow on GPUs for batches) where the
    columns of ``y`` are (nearly) dependent, so the result is always orthonormal: the range
    finder's basis must be, even for a repeated or zero warm-start column. Columns that are
    orthonormal already come back unchanged (CholeskyQR's R has a positive diagonal).
    """
    q = cholesky_qr2(y.float())
    if _unit_columns(q):
        return q
    return torch.linalg.qr(y.float(), mode="reduced")[0]


def next_krylov_block(q: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The next block of a block Krylov basis: ``y`` (b, m, w) orthonormalised against the
    orthonormal ``q`` (b, m, W) and within itself (``next_block`` in csrc/cpu/denoise.cpp does
    the same with float32 Gram matrices, BCGS2, which MKL runs faster on CPUs).

    Block classical Gram-Schmidt twice, CholeskyQR2, and once more against ``q``; where a column
    lost most of its norm to ``q`` (the Krylov space is exhausted: an exactly low-rank matrix) or
    the result is not orthonormal, the last columns of a Householder QR of ``[q, y]``.
    """
    r = y - q @ (q.mT @ y)
    r = r - q @ (q.mT @ r)
    if bool((r.norm(dim=-2) >= 1e-2 * y.norm(dim=-2)).all()):
        block = cholesky_qr2(r)
        block = block - q @ (q.mT @ block)
        block = _cholesky_qr_step(block)
        if _unit_columns(block):
            return block
    return torch.linalg.qr(torch.cat([q, y], -1), mode="reduced")[0][..., q.shape[-1] :]
