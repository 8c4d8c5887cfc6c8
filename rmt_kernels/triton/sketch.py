"""Gaussian sketch ``Y = A @ Omega`` with the test matrix generated inside the kernel.

``Omega[k, j] = randn(seed, k * width + j)`` is counter-based (Philox): it is never stored, costs no
memory traffic, and every program that needs a tile of it regenerates the same numbers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tile sizes: a sketch is tall and thin (width 16-64), so one column block covers it.
BLOCK_P = 64
BLOCK_Q = 32
BLOCK_L = 16


@triton.jit
def _gaussian_sketch_kernel(
    a_ptr,
    y_ptr,
    seed,
    P,
    Q,
    L,
    stride_ab,
    stride_ap,
    stride_aq,
    stride_yb,
    stride_yp,
    stride_yl,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_l = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    rows = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    a_base = a_ptr + pid_b * stride_ab
    acc = tl.zeros((BLOCK_P, BLOCK_L), dtype=tl.float32)
    for q0 in range(0, Q, BLOCK_Q):
        ks = q0 + tl.arange(0, BLOCK_Q)
        a_mask = (rows[:, None] < P) & (ks[None, :] < Q)
        a = tl.load(
            a_base + rows[:, None] * stride_ap + ks[None, :] * stride_aq, mask=a_mask, other=0.0
        ).to(tl.float32)
        omega = tl.randn(seed, ks[:, None] * L + cols[None, :])
        omega = tl.where((ks[:, None] < Q) & (cols[None, :] < L), omega, 0.0)
        acc += tl.dot(a, omega, input_precision="ieee")
    y_mask = (rows[:, None] < P) & (cols[None, :] < L)
    tl.store(
        y_ptr + pid_b * stride_yb + rows[:, None] * stride_yp + cols[None, :] * stride_yl,
        acc,
        mask=y_mask,
    )


def gaussian_sketch(a: torch.Tensor, width: int, seed: int) -> torch.Tensor:
    """Return ``a @ Omega`` in float32 for a batch ``a`` (b, p, q) of any float dtype and strides.

    ``Omega`` (q, width) has i.i.d. N(0, 1) entries drawn from Philox keyed by ``seed``.
    """
    b, p, q = a.shape
    y = torch.empty((b, p, width), device=a.device, dtype=torch.float32)
    grid = (triton.cdiv(p, BLOCK_P), triton.cdiv(width, BLOCK_L), b)
    _gaussian_sketch_kernel[grid](
        a,
        y,
        seed,
        p,
        q,
        width,
        *a.stride(),
        *y.stride(),
        BLOCK_P=BLOCK_P,
        BLOCK_Q=BLOCK_Q,
        BLOCK_L=BLOCK_L,
    )
    return y
