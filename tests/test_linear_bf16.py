"""The bf16 route of rmt::linear_clipped_noisy_sum (csrc/cpu/linear_bf16.cpp, issue 28 item 4).

bfloat16 x and dy (torch.autocast) with at least LINEAR_BF16_MIN_TOKENS tokens go through one bf16
GEMM per example with the clip factor applied to the float32 product, never folded into a bf16
operand. Checked here: the float64 reference on ordinary inputs (tiles crossed, a zero-scaled
example with inf entries), a crafted cancelling example whose spread is just under ReleaseGuard's
limit (rounding s * dy to bf16 would move the released sum by ~0.1 C beyond C), and the gate
that keeps subnormal and tiny entries off the bf16 units (they flush them to zero).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rmt_kernels
from rmt_kernels import _C
from rmt_kernels.rules import get_layer_rule
from rmt_kernels.rules.release_guard import AMPLIFICATION_LIMIT

C = 1.0
MIN_T = _C.LINEAR_BF16_MIN_TOKENS
pytestmark = pytest.mark.skipif(
    not _C.linear_bf16_available(), reason="no hardware bf16 GEMM (AMX / AVX512-BF16) here"
)


def _exact(x, dy, scale):
    """float64 sum_b scale_b dy_b^T x_b of the bf16 values (products exact, error ~1e-16)."""
    return torch.einsum("b,bto,bti->oi", scale.double(), dy.double(), x.double())


def _rel_error(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("B, T, d_in, d_out", [(5, MIN_T, 40, 24), (3, MIN_T + 9, 260, 300)])
def test_bf16_route_matches_the_float64_reference(B, T, d_in, d_out):
    # 260 x 300 crosses the 256 x 256 output tiles in both directions.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, d_in, generator=gen).bfloat16()
    dy = (1e-3 * torch.randn(B, T, d_out, generator=gen)).bfloat16()
    scale = torch.rand(B, generator=gen)
    got = rmt_kernels.linear_clipped_noisy_sum(x, dy, scale, 0.0, 0, 0)
    assert got.dtype == torch.float32 and got.shape == (d_out, d_in)
    # Exact products, float32 sums over T terms and B examples: ~1e-7 (the float32 route: ~3e-7).
    assert _rel_error(got, _exact(x, dy, scale)) < 1e-6
    # Noise: the same Philox stream as the float32 route, added once.
    noisy = rmt_kernels.linear_clipped_noisy_sum(x, dy, scale, 0.5, 3, 11)
    noise = rmt_kernels.add_gaussian_noise(torch.zeros(d_out, d_in), 0.5, 3, 11)
    torch.testing.assert_close(noisy - got, noise, rtol=0, atol=1e-5)
    # Deterministic, and independent of the number of threads (tiles own their output).
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = rmt_kernels.linear_clipped_noisy_sum(x, dy, scale, 0.0, 0, 0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, got)


def test_zero_scaled_example_contributes_nothing_even_when_not_finite():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, MIN_T, 16, generator=gen).bfloat16()
    dy = torch.randn(3, MIN_T, 8, generator=gen).bfloat16()
    x[1, 4, 2], dy[1, 0, 0] = float("inf"), float("nan")
    scale = torch.tensor([0.5, 0.0, 0.25])
    got = rmt_kernels.linear_clipped_noisy_sum(x, dy, scale, 0.0, 0, 0)
    keep = torch.tensor([0, 2])
    assert torch.isfinite(got).all()
    assert _rel_error(got, _exact(x[keep], dy[keep], scale[keep])) < 1e-6


def _crafted_batch(seed: int, B: int = 4, d_in: int = 24, d_out: int = 16, ratio: float = 200.0):
    """Ordinary examples plus the last one, whose tokens cancel: x rows u and -u, dy rows a and
    a + delta (|delta| = 2 |a| / ratio), so its spread sum_t |x_t||dy_t| is ~ratio times its
    gradient's norm (under ReleaseGuard's limit R = 256: not set apart) and it is clipped."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, MIN_T, d_in, generator=gen)
    dy = torch.randn(B, MIN_T, d_out, generator=gen)
    u = 500.0 * torch.randn(d_in, generator=gen)
    a = torch.randn(d_out, generator=gen)
    delta = torch.randn(d_out, generator=gen)
    delta *= 2.0 * a.norm() / (ratio * delta.norm())
    x[-1], dy[-1] = 0.0, 0.0
    x[-1, 0], x[-1, 1] = u, -u
    dy[-1, 0], dy[-1, 1] = a, a + delta
    return x.bfloat16(), dy.bfloat16()


def _clipped_sums(x, dy, keep):
    """Certified norms, clip factors and the released sum (noise off) of examples ``keep``,
    through the nn.Linear rule (ReleaseGuard and the fused op)."""
    module = nn.Linear(x.shape[-1], dy.shape[-1], bias=False)
    rule = get_layer_rule(module)
    xs, dys = x[keep], dy[keep]
    norms = rule.sq_norms(module, xs, dys)
    scale = rmt_kernels.clip_scales(list(norms.values()), C)
    sums = rule.clipped_noisy_sums(module, xs, dys, scale, 0.0, 0, {"weight": 0})
    return scale, sums["weight"].double()


@pytest.mark.parametrize("seed", range(6))
def test_crafted_cancelling_example_moves_the_clipped_sum_by_at_most_c(seed):
    x, dy = _crafted_batch(seed)
    B = x.shape[0]
    exact_grad = _exact(x[-1:], dy[-1:], torch.ones(1))
    spread = (x[-1].double().norm(dim=1) * dy[-1].double().norm(dim=1)).sum()
    assert 100 < spread / exact_grad.norm() < AMPLIFICATION_LIMIT  # crafted, not set apart
    assert exact_grad.norm() > 10 * C  # clipped
    scale, full = _clipped_sums(x, dy, torch.arange(B))
    _, without = _clipped_sums(x, dy, torch.arange(B - 1))
    moved = (full - without).norm().item()
    assert moved <= C * (1 + 1e-5), f"one example moved the sum by {moved / C:.6f} C"
    # And the release is the exact clipped sum of the bf16 values (a bf16-rounded s * dy: ~0.1 C).
    error = (full - _exact(x, dy, scale)).norm().item()
    assert error <= 1e-5 * C, f"released sum off the exact clipped sum by {error / C:.3g} C"


@pytest.mark.parametrize(
    "x_value, dy_value",
    [
        (2.0**-130, 2.0**100),  # subnormal bf16 input: the bf16 units read it as 0
        (2.0**-70, 2.0**-60),  # normal inputs whose product (2^-130) the units flush to 0
    ],
)
def test_subnormal_and_tiny_entries_are_kept_off_the_bf16_units(x_value, dy_value):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, MIN_T, 8, generator=gen)
    dy = torch.randn(3, MIN_T, 4, generator=gen)
    x[1], dy[1] = 0.0, 0.0
    x[1, 0, 0], dy[1, 0, 0] = x_value, dy_value
    x[1, 1, 1], dy[1, 1, 1] = 1.0, x_value * dy_value * 2.0**10  # a normal term beside it
    x, dy = x.bfloat16(), dy.bfloat16()
    assert x[1, 0, 0].item() == x_value and dy[1, 0, 0].item() == dy_value
    scale = torch.tensor([0.0, 1.0, 0.0])  # example 1 alone
    got = rmt_kernels.linear_clipped_noisy_sum(x, dy, scale, 0.0, 0, 0)
    want = _exact(x, dy, scale)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
