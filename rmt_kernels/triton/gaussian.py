"""The DP noise sampler shared by every Triton kernel that adds privacy noise.

Triton's ``tl.randn`` takes Box-Muller's radius from one 32-bit uniform clamped at 1e-7, so
``|z| <= 5.68``: a truncated Gaussian, for which the output region possible under one dataset
and impossible under its neighbour has probability ~P(Z > 5.68 - 1/noise_multiplier) per
coordinate and step, not negligible against delta. ``randn_wide`` is ``tl.randn`` everywhere
except where the first word's folded 31-bit value is below ``TAIL_BITS`` (probability
2^-20): there the radius comes from a 63-bit uniform (that value and the third Philox word) in
float64, which pushes the cut to ``|z| <= 9.4`` (tail mass ~1e-20). csrc/cpu/philox.h draws the
same stream.
"""

from __future__ import annotations

import triton
import triton.language as tl

TAIL_BITS: tl.constexpr = 2048  # folded first word < 2^11, i.e. u1 < 2^-20


@triton.jit
def randn_wide(seed, offset):
    w0, w1, w2, _ = tl.randint4x(seed, offset)
    u1 = tl.random.uint_to_uniform_float(w0)
    u2 = tl.random.uint_to_uniform_float(w1)
    radius = tl.sqrt(-2.0 * tl.log(tl.maximum(u1, 1.0e-7)))
    folded = w0.to(tl.int32, bitcast=True)
    folded = tl.where(folded < 0, -folded - 1, folded)
    low = w2.to(tl.uint32, bitcast=True).to(tl.float64)
    u_wide = (folded.to(tl.float64) * 4294967296.0 + low + 0.5) * 1.0842021724855044e-19  # 2^-63
    radius_wide = tl.sqrt(-2.0 * tl.log(u_wide)).to(tl.float32)
    radius = tl.where(folded < TAIL_BITS, radius_wide, radius)
    return radius * tl.cos(6.283185307179586 * u2)
