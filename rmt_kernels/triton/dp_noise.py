"""Counter-based Gaussian noise added in place: ``out[k] += noise_std * randn(seed, offset + k)``.

The same stream as the C++ CPU kernels (csrc/cpu/philox.h): element k of the row-major
flattening of ``out`` gets stream element ``offset + k`` of key ``seed``, drawn by
:func:`rmt_kernels.triton.gaussian.dp_randn` (Philox4x32-10, four Box-Muller normals per call,
untruncated tails).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rmt_kernels.triton.gaussian import dp_randn

# One program per 1024 elements: enough independent Philox work per program to hide latency.
BLOCK = 1024


@triton.jit
def _add_noise_kernel(out_ptr, seed, offset, noise_std, N, BLOCK: tl.constexpr):
    # int64 indices: an embedding table has more elements than int32 counts comfortably, and the
    # counter must be the full 64-bit offset + k whatever width Triton picked for `offset`.
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < N
    value = tl.load(out_ptr + idx, mask=mask, other=0.0)
    value += noise_std * dp_randn(seed, idx + offset)
    tl.store(out_ptr + idx, value, mask=mask)


def add_noise_(out: torch.Tensor, noise_std: float, seed: int, offset: int) -> torch.Tensor:
    """Add ``noise_std * randn(seed, offset + k)`` to element k of contiguous float32 ``out``.

    Arguments are assumed checked (rmt_kernels._checks). ``noise_std == 0`` leaves ``out``
    untouched, so the result is the exact clipped sum.
    """
    assert out.is_contiguous() and out.dtype == torch.float32
    n = out.numel()
    if noise_std == 0.0 or n == 0:
        return out
    _add_noise_kernel[(triton.cdiv(n, BLOCK),)](out, seed, offset, noise_std, n, BLOCK=BLOCK)
    return out
