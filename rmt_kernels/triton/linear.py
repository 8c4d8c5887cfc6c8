"""Clipped sum of per-example Linear weight gradients as one GEMM with Gaussian noise in its
epilogue: ``out = sum_r scale[r // T] * dy[r]^T x[r] + noise_std * N(seed, offset + i * d_in + j)``.

The reduction runs over the B*T rows of x and dy; each row of dy is scaled by its example's clip
factor as it is loaded, so no scaled copy exists, and the noisy tile is stored once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rmt_kernels.triton.gaussian import dp_randn

# Tile sizes: a weight gradient is a wide output (d_out x d_in, hundreds to thousands each) with a
# long reduction over B*T rows; 64x64 output tiles with 32-row steps suit both the H200 and the
# interpreter (small enough to interpret quickly).
BLOCK_O = 64
BLOCK_I = 64
BLOCK_R = 32
# "ieee" keeps fp32 products exact enough to compare with the CPU kernel at fp32 tolerance; the
# DP noise dwarfs tf32's error, so "tf32" is a candidate once measured on the GPU.
INPUT_PRECISION = "ieee"
# Warps per program. With the noise epilogue (Philox, log, sin and cos per element) at 4 warps,
# ptxas (sm_80 and sm_90) needs 255 registers and spills ~1.7 KB per thread; at 8 warps, half the
# elements per thread, 243 registers and no spill (bench/results/gpu-static.md). Without noise the
# GEMM needs 144 registers at 4 warps, so it keeps 4.
NUM_WARPS_NOISE = 8
NUM_WARPS_EXACT = 4


@triton.jit
def _linear_clipped_noisy_sum_kernel(
    x_ptr,
    dy_ptr,
    scale_ptr,
    out_ptr,
    seed,
    offset,
    noise_std,
    R,
    T,
    D_IN,
    D_OUT,
    stride_xr,
    stride_xi,
    stride_dr,
    stride_do,
    ADD_NOISE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_o = tl.program_id(0)
    pid_i = tl.program_id(1)
    outs = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    ins = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        rows64 = rows.to(tl.int64)
        scale = tl.load(scale_ptr + rows // T, mask=row_ok, other=0.0)
        dy_t = tl.load(
            dy_ptr + rows64[None, :] * stride_dr + outs[:, None] * stride_do,
            mask=row_ok[None, :] & (outs[:, None] < D_OUT),
            other=0.0,
        ).to(tl.float32)
        x = tl.load(
            x_ptr + rows64[:, None] * stride_xr + ins[None, :] * stride_xi,
            mask=row_ok[:, None] & (ins[None, :] < D_IN),
            other=0.0,
        ).to(tl.float32)
        acc += tl.dot(dy_t * scale[None, :], x, input_precision=INPUT_PRECISION)
    # Epilogue: the noise of element (i, j) is counter offset + i * d_in + j (int64 throughout).
    counters = outs[:, None].to(tl.int64) * D_IN + ins[None, :].to(tl.int64)
    if ADD_NOISE:
        acc += noise_std * dp_randn(seed, counters + offset)
    mask = (outs[:, None] < D_OUT) & (ins[None, :] < D_IN)
    tl.store(out_ptr + counters, acc, mask=mask)


def linear_clipped_noisy_sum_triton(
    x: torch.Tensor, dy: torch.Tensor, scale: torch.Tensor, noise_std: float, seed: int, offset: int
) -> torch.Tensor:
    """Launch the fused kernel; arguments are assumed checked (rmt_kernels._checks).

    ``x`` (B, T, d_in) and ``dy`` (B, T, d_out) of any float dtype (T = 1 for a layer without a
    sequence: rmt_kernels.triton.device makes it so); ``scale`` (B,). Returns a new contiguous
    float32 (d_out, d_in) tensor.
    """
    b, t, d_in = x.shape
    d_out = dy.shape[2]
    x2 = x.reshape(b * t, d_in)  # a view for contiguous input; strides go to the kernel
    dy2 = dy.reshape(b * t, d_out)
    out = torch.empty((d_out, d_in), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(d_out, BLOCK_O), triton.cdiv(d_in, BLOCK_I))
    add_noise = noise_std != 0.0
    _linear_clipped_noisy_sum_kernel[grid](
        x2,
        dy2,
        scale.to(torch.float32).contiguous(),
        out,
        seed,
        offset,
        noise_std,
        b * t,
        t,
        d_in,
        d_out,
        *x2.stride(),
        *dy2.stride(),
        ADD_NOISE=add_noise,
        INPUT_PRECISION=INPUT_PRECISION,
        BLOCK_O=BLOCK_O,
        BLOCK_I=BLOCK_I,
        BLOCK_R=BLOCK_R,
        num_warps=NUM_WARPS_NOISE if add_noise else NUM_WARPS_EXACT,
    )
    return out
