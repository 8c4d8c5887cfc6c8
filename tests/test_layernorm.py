"""rmt::layernorm_sq_norms and rmt::layernorm_clipped_noisy_sum (weight; the bias is the bias
pair) against explicit per-example gradients of nn.LayerNorm."""

import pytest
import torch
from torch import nn

import rmt_kernels
from rmt_kernels.reference import clipped_sum, per_example_grads, per_example_sq_norms
from rmt_kernels.triton import device


def _close(actual, expected, rtol=2e-5):
    atol = rtol * expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 4, 6), (1, 9, 33), (4, 1, 5), (5, 7)])
def test_layernorm_matches_per_example_gradients(shape, dtype):
    # An offset and scale on x exercise the normalisation, not just the identity.
    x = (3.0 + 2.0 * torch.randn(shape)).to(dtype)
    dy = torch.randn(shape).to(dtype)
    scale = torch.rand(shape[0])
    layer = nn.LayerNorm(shape[-1], eps=1e-3)
    grads = per_example_grads(layer, x, dy)
    norms, sums = per_example_sq_norms(grads), clipped_sum(grads, scale)
    # Tolerance: the op normalises in float32 (as nn.LayerNorm does), the reference in float64.
    _close(rmt_kernels.layernorm_sq_norms(x, dy, layer.eps), norms["weight"], rtol=1e-4)
    _close(rmt_kernels.bias_sq_norms(dy), norms["bias"])
    out = rmt_kernels.layernorm_clipped_noisy_sum(x, dy, scale, layer.eps, 0.0, 0, 0)
    _close(out, sums["weight"], rtol=1e-4)
    _close(rmt_kernels.bias_clipped_noisy_sum(dy, scale, 0.0, 0, 0), sums["bias"])


@pytest.mark.triton
def test_device_path_matches_cpu():
    x, dy, scale = torch.randn(3, 5, 70), torch.randn(3, 5, 70), torch.rand(3)
    torch.testing.assert_close(
        device.layernorm_sq_norms_device(x, dy, 1e-5), rmt_kernels.layernorm_sq_norms(x, dy, 1e-5)
    )
    args = (x, dy, scale, 1e-5, 0.3, 2, 77)
    torch.testing.assert_close(
        device.layernorm_clipped_noisy_sum_device(*args),
        rmt_kernels.layernorm_clipped_noisy_sum(*args),
        rtol=1e-5,
        atol=1e-5,
    )


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
        ((3, 4, 6), (3, 4, 6), float("nan"), "eps"),
    ],
)
def test_bad_input_raises(x_shape, dy_shape, eps, message, device_path):
    x, dy = torch.randn(x_shape), torch.randn(dy_shape)
    fn = device.layernorm_sq_norms_device if device_path else rmt_kernels.layernorm_sq_norms
    with pytest.raises(ValueError, match=message):
        fn(x, dy, eps)
