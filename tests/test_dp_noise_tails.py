"""The DP noise has untruncated tails.

``tl.randn`` clamps Box-Muller's uniform at 1e-7, so its normals never exceed 5.68 in absolute
value. A truncated Gaussian breaks the Gaussian mechanism's guarantee: an output beyond the cut
around one dataset's sum but inside it around a neighbour's reveals which one it was. Our sampler
(csrc/cpu/philox.h, rmt_kernels/triton/gaussian.py) takes the radius of the rare draws with
u1 < 2^-20 from a 63-bit uniform in float64. These tests find such draws with an independent
NumPy Philox and check both backends against a float64 reference.
"""

import math

import numpy as np
import pytest
import torch

import rmt_kernels

KEY_A, KEY_B, ROUND_A, ROUND_B = 0x9E3779B9, 0xBB67AE85, 0xD2511F53, 0xCD9E8D57
MASK = np.uint64(0xFFFFFFFF)
TAIL_BITS = 2048


def philox_words(seed: int, counters: np.ndarray):
    """Philox4x32-10 of Triton's randint4x: counter split (low, high, 0, 0), key = seed."""
    c = counters.astype(np.uint64)
    c0, c1 = c & MASK, c >> np.uint64(32)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    for _ in range(10):
        pb, pa = np.uint64(ROUND_B) * c2, np.uint64(ROUND_A) * c0
        c0, c2, c1, c3 = (
            ((pb >> np.uint64(32)) ^ c1 ^ k0) & MASK,
            ((pa >> np.uint64(32)) ^ c3 ^ k1) & MASK,
            pb & MASK,
            pa & MASK,
        )
        k0, k1 = (k0 + np.uint64(KEY_A)) & MASK, (k1 + np.uint64(KEY_B)) & MASK
    return c0, c1, c2


def folded(words: np.ndarray) -> np.ndarray:
    x = words.astype(np.int64)
    return np.where(x >= 2**31, 2**32 - 1 - x, x)


def tail_reference(seed: int, counter: int) -> float:
    w0, w1, w2 = (int(w[0]) for w in philox_words(seed, np.array([counter])))
    x0, x1 = (int(v) for v in folded(np.array([w0, w1])))
    assert x0 < TAIL_BITS
    u = (x0 * 4294967296.0 + w2 + 0.5) * 2.0**-63
    theta = float(np.float32(6.283185307179586) * np.float32(x1 * 4.6566127342e-10))
    return math.sqrt(-2.0 * math.log(u)) * math.cos(theta)


def _cpu(seed: int, counter: int) -> float:
    return rmt_kernels.add_gaussian_noise(torch.zeros(1), 1.0, seed, counter).item()


def _triton(seed: int, counter: int) -> float:
    from rmt_kernels.triton.dp_noise import add_noise_

    return add_noise_(torch.zeros(1), 1.0, seed, counter).item()


# Found by a NumPy search over the first 2^27 counters of seed 7: u1 ~ 1.2e-8, z = 5.978.
BEYOND_TRUNCATION = (7, 20922799)


@pytest.mark.parametrize("draw", [_cpu, _triton], ids=["cpu", "triton"])
def test_a_draw_beyond_tl_randn_truncation(draw):
    expected = tail_reference(*BEYOND_TRUNCATION)
    assert expected > 5.9  # tl.randn could not produce it: |z| <= sqrt(-2 ln 1e-7) = 5.68
    assert draw(*BEYOND_TRUNCATION) == pytest.approx(expected, abs=2e-5)


def test_every_tail_draw_in_a_range_matches_the_reference_on_both_backends():
    seed = 11
    counters = np.arange(1 << 22, dtype=np.uint64) + np.uint64(3 << 40)
    hits = counters[folded(philox_words(seed, counters)[0]) < TAIL_BITS]
    assert len(hits) >= 1  # 2^22 * 2^-20 = 4 expected; fixed key, so deterministic
    for counter in hits.tolist():
        expected = tail_reference(seed, counter)
        assert abs(expected) <= 9.5
        assert _cpu(seed, counter) == pytest.approx(expected, abs=2e-5)
        assert _triton(seed, counter) == pytest.approx(expected, abs=2e-5)


def test_non_tail_draws_are_tl_randn():
    # Outside the tail the stream is tl.randn's, bit for bit in the Philox words: a long run
    # without a tail draw agrees with tl.randn itself to float32 rounding.
    import triton
    import triton.language as tl

    @triton.jit
    def _randn(out_ptr, seed, offset, BLOCK: tl.constexpr):
        idx = tl.arange(0, BLOCK).to(tl.int64)
        tl.store(out_ptr + idx, tl.randn(seed, idx + offset))

    seed, offset, n = 3, 1000, 4096
    words = philox_words(seed, np.arange(offset, offset + n, dtype=np.uint64))[0]
    assert not (folded(words) < TAIL_BITS).any()
    ours = rmt_kernels.add_gaussian_noise(torch.zeros(n), 1.0, seed, offset)
    reference = torch.empty(n)
    _randn[(1,)](reference, seed, offset, BLOCK=n)
    torch.testing.assert_close(ours, reference, rtol=0, atol=4e-6)
