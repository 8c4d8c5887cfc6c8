"""rmt::rmsnorm_sq_norms and rmt::rmsnorm_clipped_noisy_sum (the RMSNorm weight) against explicit
per-example gradients of nn.RMSNorm, on the CPU kernel and the device path (Triton noise under
TRITON_INTERPRET=1); the eps nn.RMSNorm(eps=None) adds; rows whose float32 normaliser under- or
overflows, which the release guard must compute in float64."""

import math

import pytest
import torch
from torch import nn

import rmt_kernels
from rmt_kernels.reference import clipped_sum, per_example_grads, per_example_sq_norms
from rmt_kernels.rules import get_layer_rule
from rmt_kernels.rules.rmsnorm import rmsnorm_eps
from rmt_kernels.triton import rmsnorm_device


def _close(actual, expected, rtol=2e-5):
    atol = rtol * expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 4, 6), (1, 9, 33), (4, 1, 5), (5, 7)])
def test_rmsnorm_matches_per_example_gradients(shape, dtype):
    # An offset on x: mean(x^2) is not the variance, so a centring kernel would fail.
    x = (3.0 + 2.0 * torch.randn(shape)).to(dtype)
    dy = torch.randn(shape).to(dtype)
    scale = torch.rand(shape[0])
    layer = nn.RMSNorm(shape[-1], eps=1e-3)
    grads = per_example_grads(layer, x, dy)
    norms, sums = per_example_sq_norms(grads), clipped_sum(grads, scale)
    bound = rmt_kernels.rmsnorm_sq_norms(x, dy, layer.eps)
    assert (bound.double() >= norms["weight"]).all()
    _close(bound, norms["weight"], rtol=1e-6)
    out = rmt_kernels.rmsnorm_clipped_noisy_sum(x, dy, scale, layer.eps, 0.0, 0, 0)
    _close(out, sums["weight"], rtol=1e-5)


@pytest.mark.triton
def test_device_path_matches_cpu():
    x, dy, scale = torch.randn(3, 5, 70) + 1.0, torch.randn(3, 5, 70), torch.rand(3)
    torch.testing.assert_close(
        rmsnorm_device.rmsnorm_sq_norms_device(x, dy, 1e-5),
        rmt_kernels.rmsnorm_sq_norms(x, dy, 1e-5),
    )
    args = (x, dy, scale, 1e-5, 0.3, 2, 77)
    torch.testing.assert_close(
        rmsnorm_device.rmsnorm_clipped_noisy_sum_device(*args),
        rmt_kernels.rmsnorm_clipped_noisy_sum(*args),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_eps_none_is_what_the_layer_adds(dtype):
    # A row with mean(x^2) = 1e-6, comparable to eps: the layer's output reveals its eps.
    layer = nn.RMSNorm(4, eps=None).to(dtype)
    x = torch.full((1, 4), 1e-3, dtype=dtype)
    eps = rmsnorm_eps(layer)
    x64 = x.double()
    expected = x64 / (x64.square().mean(-1, keepdim=True) + eps).sqrt()
    torch.testing.assert_close(layer(x).double(), expected, rtol=4e-3, atol=0)
    assert eps == torch.finfo(torch.float32).eps


def test_the_flagged_rows_come_out_finite_and_exact():
    # eps = 0 and a tiny row (float32's x^2 underflows: the float32 xhat is x * inf), a huge row
    # (x^2 overflows float32: xhat would be 0): the guard computes both in float64.
    B, T, d = 4, 3, 6
    gen = torch.Generator().manual_seed(3)
    x, dy = torch.randn(B, T, d, generator=gen), torch.randn(B, T, d, generator=gen)
    x[1, 0] *= 1e-30
    x[2, 2] *= 1e25
    layer = nn.RMSNorm(d, eps=0.0)
    rule = get_layer_rule(layer)
    scale = rmt_kernels.clip_scales(list(rule.sq_norms(layer, x, dy).values()), 1e3)
    assert bool((scale == 1).all())  # nothing clipped: the sums compare directly
    out = rule.clipped_noisy_sums(layer, x, dy, scale, 0.0, 0, {"weight": 0})["weight"]
    x64 = x.double()
    xhat = x64 / x64.square().mean(2, keepdim=True).sqrt()
    expected = (dy.double() * xhat).sum((0, 1))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    # Without the guard the float32 op is wrong on exactly those rows.
    plain = rmt_kernels.rmsnorm_clipped_noisy_sum(x, dy, scale, 0.0, 0.0, 0, 0)
    assert not torch.allclose(plain.double(), expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("device_path", [False, True])
@pytest.mark.parametrize(
    ("x_shape", "dy_shape", "eps", "message"),
    [
        ((3, 4, 6), (2, 4, 6), 1e-5, "batch size"),
        ((3, 4, 6), (3, 5, 6), 1e-5, "sequence length"),
        ((3, 4, 6), (3, 4, 7), 1e-5, "normalised size"),
        ((6,), (6,), 1e-5, "x must have 2"),
        ((0, 4, 6), (0, 4, 6), 1e-5, "empty batch"),
        ((3, 4, 6), (3, 4, 6), -1.0, "eps"),
        ((3, 4, 6), (3, 4, 6), math.nan, "eps"),
    ],
)
def test_bad_input_raises(x_shape, dy_shape, eps, message, device_path):
    x, dy = torch.randn(x_shape), torch.randn(dy_shape)
    norms = rmsnorm_device.rmsnorm_sq_norms_device if device_path else rmt_kernels.rmsnorm_sq_norms
    with pytest.raises(ValueError, match=message):
        norms(x, dy, eps)
    total = (
        rmsnorm_device.rmsnorm_clipped_noisy_sum_device
        if device_path
        else rmt_kernels.rmsnorm_clipped_noisy_sum
    )
    with pytest.raises(ValueError, match=message):
        total(x, dy, torch.ones(x_shape[0]), eps, 0.0, 0, 0)
