"""The DP noise sampler shared by every Triton kernel that adds privacy noise.

The stream (Philox4x32-10 per quad of elements, Box-Muller pairs, untruncated tails) is specified
in csrc/cpu/philox.h, which draws the same values on the CPU; this file only implements it in
Triton. Where it differs from the CPU loops: each element runs its quad's Philox itself (a GPU has
integer throughput to spare, and an element-wise definition keeps every kernel's epilogue a plain
function of its indices), and the float64 tail path runs only in blocks that hold a tail draw (a
block-level branch), so the common case pays neither its float64 instructions nor the second
Philox call.
"""

from __future__ import annotations

import triton
import triton.language as tl

from rmt_kernels import _C

# A module-level constant read inside a kernel must be a tl.constexpr *instance*: the compiler
# refuses any other global (an annotation ``TAIL_BITS: tl.constexpr = 2048`` leaves a plain int,
# which the interpreter accepts and the compiler does not).
# Folded first word < 2^11, i.e. u1 < 2^-20 (kTailBits of csrc/cpu/philox.h).
TAIL_BITS = tl.constexpr(_C.TAIL_BITS)


@triton.jit
def _folded(word):
    x = word.to(tl.int32, bitcast=True)
    return tl.where(x < 0, -x - 1, x)


@triton.jit
def _tail_radius(seed, lo, hi, zero, second_pair, folded):
    """Box-Muller radius from the 63-bit uniform of a tail pair, in float64."""
    e0, e1, _, _ = tl.random.philox(seed, lo, hi, zero + 1, zero)
    low = tl.where(second_pair, e1, e0).to(tl.uint32, bitcast=True).to(tl.float64)
    u_wide = (folded.to(tl.float64) * 4294967296.0 + low + 0.5) * 1.0842021724855044e-19  # 2^-63
    return tl.sqrt(-2.0 * tl.log(u_wide)).to(tl.float32)


@triton.jit
def dp_randn(seed, element):
    """Noise stream element(s) ``element`` (int64, >= 0) of key ``seed``: float32 N(0, 1)."""
    quad = element >> 2
    lane = element & 3
    lo = quad.to(tl.uint32)
    hi = (quad >> 32).to(tl.uint32)
    zero = lo * 0
    w0, w1, w2, w3 = tl.random.philox(seed, lo, hi, zero, zero)
    second_pair = lane >= 2
    first = tl.where(second_pair, w2, w0)
    second = tl.where(second_pair, w3, w1)
    u1 = tl.random.uint_to_uniform_float(first)
    u2 = tl.random.uint_to_uniform_float(second)
    radius = tl.sqrt(-2.0 * tl.log(tl.maximum(u1, 1.0e-7)))
    folded = _folded(first)
    tail = folded < TAIL_BITS
    # A tail pair is one in 2^20: a block-level branch keeps the second Philox call and the
    # float64 log off the common path (a block of 4096 draws enters it with probability ~2^-8),
    # and the blocks that enter it compute exactly what every block used to.
    if tl.max(tail.to(tl.int32)) > 0:
        radius = tl.where(tail, _tail_radius(seed, lo, hi, zero, second_pair, folded), radius)
    theta = 6.283185307179586 * u2
    return radius * tl.where((lane & 1) == 1, tl.sin(theta), tl.cos(theta))
