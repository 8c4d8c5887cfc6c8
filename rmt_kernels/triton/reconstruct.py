"""Shrinkage and reconstruction in one pass: ``out = left @ diag(w) @ right^T``.

``left`` (b, p, k) and ``right`` (b, q, k) come from the range finder: one has orthonormal
columns and the other's columns have norms equal to the singular values ``s``, so the estimate
``U diag(eta) V^T`` is ``left diag(eta / s) right^T``. The kernel shrinks ``s``
(mirroring rmt_kernels/shrinkage.py), applies the rank limit and the norm correction, and
writes the estimate straight into the output in its dtype and orientation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rmt_kernels import _C

BLOCK_P = 64
BLOCK_Q = 64
BLOCK_K = 16

SHRINKER_CODES = {"frobenius": 0, "operator": 1, "nuclear": 2, "hard": 3}
# Normalised value above which every shrinker is the identity (csrc/constants.h).
SHRINK_IDENTITY_ABOVE = tl.constexpr(_C.SHRINK_IDENTITY_ABOVE)


@triton.jit
def _shrink(s, noise_scale, beta, SHRINKER: tl.constexpr):
    """Shrunk values of ``s``; zero at or below the edge. The Triton copy of
    rmt_kernels.shrinkage.shrink_singular_values (tests/denoise/test_shrinkers_agree.py)."""
    y_in = s / noise_scale
    y = tl.minimum(y_in, SHRINK_IDENTITY_ABOVE)
    t = y * y - (beta + 1.0)
    root = tl.sqrt(tl.maximum(t * t - 4.0 * beta, 0.0))
    if SHRINKER == 0:
        shrunk = root / y
    elif SHRINKER == 3:
        shrunk = y
    else:
        x = tl.sqrt(tl.maximum((t + root) * 0.5, 0.0))
        if SHRINKER == 1:
            shrunk = x
        else:
            shrunk = tl.maximum(x * x * x * x - tl.sqrt(beta) * x * y - beta, 0.0) / (x * x * y)
    value = tl.where(y_in > SHRINK_IDENTITY_ABOVE, s, shrunk * noise_scale)
    return tl.where(y_in > 1.0 + tl.sqrt(beta), value, 0.0)


@triton.jit
def _shrink_reconstruct_kernel(
    left_ptr,
    right_ptr,
    s_ptr,
    target_ptr,
    out_ptr,
    P,
    Q,
    K,
    KEEP,
    noise_scale,
    beta,
    stride_lb,
    stride_lp,
    stride_lk,
    stride_rb,
    stride_rq,
    stride_rk,
    stride_sb,
    stride_ob,
    stride_op,
    stride_oq,
    SHRINKER: tl.constexpr,
    NORM_CORRECTION: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_q = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    s_base = s_ptr + pid_b * stride_sb

    # Norm correction: ||U diag(eta) V^T||_F = ||eta||_2, so the rescale factor needs only the
    # k shrunk values, which every program recomputes (k is tiny).
    factor = 1.0
    if NORM_CORRECTION:
        sq = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            s = tl.load(s_base + ks, mask=ks < K, other=1.0)
            eta = tl.where(ks < KEEP, _shrink(s, noise_scale, beta, SHRINKER), 0.0)
            sq += eta * eta
        estimate = tl.sqrt(tl.sum(sq, axis=0))
        target = tl.load(target_ptr + pid_b)
        factor = tl.where(estimate > 0.0, target / tl.maximum(estimate, 1e-30), 0.0)

    rows = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        s = tl.load(s_base + ks, mask=ks < K, other=1.0)
        eta = _shrink(s, noise_scale, beta, SHRINKER)
        # One factor's columns carry s: out = left diag(eta / s) right^T.
        weight = tl.where((ks < KEEP) & (eta > 0.0), eta * factor / s, 0.0)
        left = tl.load(
            left_ptr + pid_b * stride_lb + rows[:, None] * stride_lp + ks[None, :] * stride_lk,
            mask=(rows[:, None] < P) & (ks[None, :] < K),
            other=0.0,
        )
        right = tl.load(
            right_ptr + pid_b * stride_rb + cols[:, None] * stride_rq + ks[None, :] * stride_rk,
            mask=(cols[:, None] < Q) & (ks[None, :] < K),
            other=0.0,
        )
        acc += tl.dot(left * weight[None, :], tl.trans(right), input_precision="ieee")
    out_ptrs = out_ptr + pid_b * stride_ob + rows[:, None] * stride_op + cols[None, :] * stride_oq
    tl.store(
        out_ptrs,
        acc.to(out_ptr.dtype.element_ty),
        mask=(rows[:, None] < P) & (cols[None, :] < Q),
    )


def shrink_reconstruct(
    left: torch.Tensor,
    right: torch.Tensor,
    s: torch.Tensor,
    out: torch.Tensor,
    *,
    noise_scale: float,
    beta: float,
    shrinker: str,
    keep: int,
    target: torch.Tensor | None,
) -> torch.Tensor:
    """Write ``left diag(w) right^T`` into ``out`` (b, p, q), any dtype and strides.

    Args:
        left: (b, p, k) float32.
        right: (b, q, k) float32; one of the two has orthonormal columns, the other columns of
            norms ``s``.
        s: (b, k) float32 singular values, descending.
        out: destination view (b, p, q); pass a transposed view to write the other orientation.
        noise_scale: ``kappa * sigma * sqrt(q)``; beta: p / q.
        shrinker: name from rmt_kernels.shrinkage.SHRINKERS.
        keep: components beyond this index are dropped (the fixed-rank limit).
        target: (b,) float32 Frobenius norms to rescale to, or None for no correction.
    """
    b, p, k = left.shape
    q = right.shape[1]
    grid = (triton.cdiv(p, BLOCK_P), triton.cdiv(q, BLOCK_Q), b)
    _shrink_reconstruct_kernel[grid](
        left,
        right,
        s,
        target if target is not None else s,
        out,
        p,
        q,
        k,
        keep,
        noise_scale,
        beta,
        *left.stride(),
        *right.stride(),
        s.stride(0),
        *out.stride(),
        SHRINKER=SHRINKER_CODES[shrinker],
        NORM_CORRECTION=target is not None,
        BLOCK_P=BLOCK_P,
        BLOCK_Q=BLOCK_Q,
        BLOCK_K=BLOCK_K,
    )
    return out
