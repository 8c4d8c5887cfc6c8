"""The DP noise sampler shared by every Triton kernel that adds privacy noise.

The stream is defined in csrc/cpu/philox.h, which draws the same values on the CPU: stream element
``e`` lies in quad ``q = e >> 2``, lane ``e & 3``; one Philox4x32-10 call per quad (key ``seed``,
counter ``(low q, high q, 0, 0)``, i.e. ``tl.randint4x(seed, q)``) gives four words, and lanes
(0, 1) / (2, 3) are the Box-Muller pairs ``r cos(theta), r sin(theta)`` of words (w0, w1) /
(w2, w3). Four normals per Philox call instead of ``tl.randn``'s one is what makes the CPU noise
~3x cheaper; here each element still runs its quad's Philox (a GPU has integer throughput to
spare, and an element-wise definition keeps every kernel's epilogue a plain function of its
indices).

Untruncated tails: ``tl.randn`` takes the radius from one 32-bit uniform clamped at 1e-7, so
``|z| <= 5.68``, a truncated Gaussian, for which the output region possible under one dataset and
impossible under its neighbour has probability ~P(Z > 5.68 - 1/noise_multiplier) per coordinate and
step, not negligible against delta. Where a pair's first word folds below ``TAIL_BITS``
(probability 2^-20) the radius comes from a 63-bit uniform in float64, its low 32 bits from word
``pair`` of a second Philox call on counter ``(low q, high q, 1, 0)``: ``|z| <= 9.4``, tail mass
~1e-20. That
float64 path runs only in blocks that hold a tail draw (a block-level branch), so the common case
pays neither its float64 instructions nor the second Philox call.
"""

from __future__ import annotations

import triton
import triton.language as tl

# A module-level constant read inside a kernel must be a tl.constexpr *instance*: the compiler
# refuses any other global (an annotation ``TAIL_BITS: tl.constexpr = 2048`` leaves a plain int,
# which the interpreter accepts and the compiler does not).
TAIL_BITS = tl.constexpr(2048)  # folded first word < 2^11, i.e. u1 < 2^-20


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
