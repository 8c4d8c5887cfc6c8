"""Per-example squared gradient norms by the Gram ("ghost") route, without any T x T matrix in
memory: ``||G_b||^2 = sum_{t,s} (x_t . x_s)(dy_t . dy_s)`` for a Linear layer, or
``sum_{t,s} [id_t == id_s](dy_t . dy_s)`` for an Embedding.

Each program owns one example and one pair of T-tiles (ti <= tj): it builds the two Gram tiles in
registers over the feature dimension, multiplies them elementwise, reduces, and writes one partial
sum (doubled off the diagonal: the Gram matrices are symmetric, so the lower triangle is never
computed). Partials are summed in a fixed order afterwards, so results are deterministic (no
atomics).

Everything is float64 (inputs converted exactly, fp64 ``tl.dot``: DMMA on sm_80/sm_90, as fast
there as the fp32 "ieee" FMA path it replaces): float32 Gram sums cancel catastrophically on
crafted inputs (x = [u, -u + 10 w]). The result is the float64 sum P^, not yet a bound:
rmt_kernels/triton/device.py adds its rigorous rounding-error term (privacy invariant 6,
PRIVACY.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# T-tile and feature-chunk sizes: 32 x 32 Gram tiles keep two float64 accumulators in registers;
# 32-wide feature chunks (64 spilled 224 bytes at 255 registers on sm_90 in float64, 32 needs
# 96-166 registers, ptxas -v). Not yet tuned on a GPU.
BLOCK_T = 32
BLOCK_D = 32


@triton.jit
def _gram_tile(
    a_ptr, rows_i, rows_j, T, D, stride_t, stride_d, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr
):
    """(BLOCK_T, BLOCK_T) float64 tile of a a^T for rows rows_i x rows_j of one example."""
    acc = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float64)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds[None, :] < D
        ai = tl.load(
            a_ptr + rows_i[:, None] * stride_t + ds[None, :] * stride_d,
            mask=(rows_i[:, None] < T) & d_ok,
            other=0.0,
        ).to(tl.float64)
        aj = tl.load(
            a_ptr + rows_j[:, None] * stride_t + ds[None, :] * stride_d,
            mask=(rows_j[:, None] < T) & d_ok,
            other=0.0,
        ).to(tl.float64)
        acc += tl.dot(ai, tl.trans(aj))
    return acc


@triton.jit
def _gram_sq_norms_kernel(
    x_ptr,
    dy_ptr,
    pairs_ptr,
    part_ptr,
    T,
    D_IN,
    D_OUT,
    N_PAIRS,
    stride_xb,
    stride_xt,
    stride_xd,
    stride_db,
    stride_dt,
    stride_dd,
    IDS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pair = tl.program_id(1)
    ti = tl.load(pairs_ptr + 2 * pair)
    tj = tl.load(pairs_ptr + 2 * pair + 1)
    rows_i = ti * BLOCK_T + tl.arange(0, BLOCK_T)
    rows_j = tj * BLOCK_T + tl.arange(0, BLOCK_T)
    g_dy = _gram_tile(
        dy_ptr + b * stride_db, rows_i, rows_j, T, D_OUT, stride_dt, stride_dd, BLOCK_T, BLOCK_D
    )
    if IDS:
        # x holds token ids (B, T): the "Gram" of one-hot rows is id equality. Padding rows of
        # the tile load distinct sentinels so they never match.
        id_i = tl.load(x_ptr + b * stride_xb + rows_i * stride_xt, mask=rows_i < T, other=-1)
        id_j = tl.load(x_ptr + b * stride_xb + rows_j * stride_xt, mask=rows_j < T, other=-2)
        g_x = (id_i[:, None] == id_j[None, :]).to(tl.float64)
    else:
        g_x = _gram_tile(
            x_ptr + b * stride_xb, rows_i, rows_j, T, D_IN, stride_xt, stride_xd, BLOCK_T, BLOCK_D
        )
    weight = tl.where(ti == tj, 1.0, 2.0)  # symmetric: an off-diagonal tile stands for two
    tl.store(part_ptr + b * N_PAIRS + pair, weight * tl.sum(g_x * g_dy))


def _tile_pairs(T: int, device: torch.device) -> torch.Tensor:
    n = triton.cdiv(T, BLOCK_T)
    idx = torch.triu_indices(n, n)
    return idx.T.contiguous().to(device=device, dtype=torch.int32)


def gram_sq_norms(x: torch.Tensor, dy: torch.Tensor, ids: bool = False) -> torch.Tensor:
    """float64 (B,) Gram-route sums ``P^ = sum_{t,s} G^x_ts G^dy_ts``; arguments assumed checked.

    ``x`` (B, T, d_in) float, or token ids (B, T) when ``ids``; ``dy`` (B, T, d_out). Not a bound
    by itself: :func:`rmt_kernels.triton.device.linear_sq_norms_device` adds the error term.
    """
    # 16-bit loads feeding an fp64 tl.dot hit Triton 3.6's MMAv2 assertion "fp64 don't support
    # largeK MMA" (sm_80/sm_90); float32 copies (exact) avoid it.
    if dy.dtype != torch.float32:
        dy = dy.float()
    if not ids and x.dtype != torch.float32:
        x = x.float()
    B, T, d_out = dy.shape
    pairs = _tile_pairs(T, dy.device)
    n_pairs = pairs.shape[0]
    part = torch.empty((B, n_pairs), device=dy.device, dtype=torch.float64)
    x_strides = (*x.stride(), 0) if ids else x.stride()
    d_in = 1 if ids else x.shape[2]
    _gram_sq_norms_kernel[(B, n_pairs)](
        x,
        dy,
        pairs,
        part,
        T,
        d_in,
        d_out,
        n_pairs,
        *x_strides,
        *dy.stride(),
        IDS=ids,
        BLOCK_T=BLOCK_T,
        BLOCK_D=BLOCK_D,
    )
    return part.sum(1)
