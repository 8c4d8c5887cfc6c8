"""rmt::linear_sq_norms, rmt::linear_clipped_noisy_sum and the bias pair against explicit
per-example gradients (torch.func), on the C++ CPU kernels and the Triton device path."""

import pytest
import torch
from torch import nn

import rmt_kernels
from rmt_kernels.reference import clipped_sum, per_example_grads, per_example_sq_norms
from rmt_kernels.triton import device  # the device paths and BLOCK_BYTES

# (B, T or None for 2-D input, d_in, d_out): both norm routes, B = 1, T = 1, no sequence dim,
# sizes that are not multiples of the Triton tiles.
SHAPES = [
    (4, 6, 5, 3),  # per-example route: T (d_in + d_out) > d_in d_out
    (3, 5, 33, 17),  # Gram route
    (1, 7, 20, 20),  # B = 1
    (5, 1, 9, 4),  # T = 1
    (6, None, 13, 7),  # (B, d) input
    (2, 70, 8, 9),  # long sequence, thin layer: per-example route
    (2, 150, 320, 320),  # Gram route over several T-tiles (3 x 3, upper triangle)
]
# Inputs are upcast to float32 inside the ops, so bf16 inputs are compared with the float64
# reference on the same bf16 values and get float32 accumulation tolerances.
DTYPES = [torch.float32, torch.bfloat16]
RTOL = 2e-5


def _inputs(B, T, d_in, d_out, dtype):
    shape = (B,) if T is None else (B, T)
    x = torch.randn(*shape, d_in).to(dtype)
    dy = torch.randn(*shape, d_out).to(dtype)
    return x, dy


def _reference(x, dy, scale):
    layer = nn.Linear(x.shape[-1], dy.shape[-1])
    grads = per_example_grads(layer, x, dy)
    return per_example_sq_norms(grads), clipped_sum(grads, scale)


def _assert_close(actual, expected, rtol=RTOL):
    # Relative to the largest entry: fp32 accumulation error scales with the magnitudes summed.
    atol = rtol * expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_linear_matches_per_example_gradients(shape, dtype):
    x, dy = _inputs(*shape, dtype)
    scale = torch.rand(shape[0])
    norms, sums = _reference(x, dy, scale)
    _assert_close(rmt_kernels.linear_sq_norms(x, dy), norms["weight"])
    _assert_close(rmt_kernels.bias_sq_norms(dy), norms["bias"])
    weight = rmt_kernels.linear_clipped_noisy_sum(x, dy, scale, 0.0, 0, 0)
    assert weight.dtype == torch.float32 and weight.shape == (shape[3], shape[2])
    _assert_close(weight, sums["weight"])
    _assert_close(rmt_kernels.bias_clipped_noisy_sum(dy, scale, 0.0, 0, 0), sums["bias"])


def test_padding_rows_contribute_nothing():
    x, dy = _inputs(3, 9, 12, 10, torch.float32)
    x[1, 4:] = 0  # example 1 is 4 tokens long, padded to 9
    dy[1, 4:] = 0
    short = rmt_kernels.linear_sq_norms(x[1:2, :4], dy[1:2, :4])
    norms = rmt_kernels.linear_sq_norms(x, dy)
    torch.testing.assert_close(norms[1:2], short)
    norms_ref, _ = _reference(x, dy, torch.ones(3))
    _assert_close(norms, norms_ref["weight"])


def test_norm_blocks_cover_every_example():
    # Gram route with 8 T^2 bytes per example: 1025 examples of T = 64 need two blocks of the
    # 32 MiB budget, so the last (1-example) block is exercised.
    x, dy = _inputs(1025, 64, 128, 128, torch.float32)
    expected = torch.einsum("bto,bti->boi", dy.double(), x.double()).square().sum((1, 2))
    _assert_close(rmt_kernels.linear_sq_norms(x, dy), expected)


def test_noise_is_added_with_the_documented_counters():
    x, dy = _inputs(3, 4, 7, 5, torch.float32)
    scale = torch.rand(3)
    seed, offset, std = 11, 3 * 2**32 + 5, 0.3
    clean = rmt_kernels.linear_clipped_noisy_sum(x, dy, scale, 0.0, seed, offset)
    noisy = rmt_kernels.linear_clipped_noisy_sum(x, dy, scale, std, seed, offset)
    # Element (i, j) uses counter offset + i * d_in + j: the row-major flattening.
    noise = rmt_kernels.add_gaussian_noise(torch.zeros(5, 7), std, seed, offset)
    torch.testing.assert_close(noisy - clean, noise, rtol=0, atol=1e-6)
    bias_clean = rmt_kernels.bias_clipped_noisy_sum(dy, scale, 0.0, seed, offset)
    bias_noisy = rmt_kernels.bias_clipped_noisy_sum(dy, scale, std, seed, offset)
    bias_noise = rmt_kernels.add_gaussian_noise(torch.zeros(5), std, seed, offset)
    torch.testing.assert_close(bias_noisy - bias_clean, bias_noise, rtol=0, atol=1e-6)


@pytest.mark.triton
@pytest.mark.parametrize("shape", [(3, 5, 70, 33), (2, None, 9, 66), (1, 40, 5, 3)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_clipped_noisy_sum_matches_cpu(shape, dtype):
    x, dy = _inputs(*shape, dtype)
    scale = torch.rand(shape[0])
    for std in (0.0, 0.5):
        expected = rmt_kernels.linear_clipped_noisy_sum(x, dy, scale, std, 7, 2**33 + 1)
        actual = device.linear_clipped_noisy_sum_device(x, dy, scale, std, 7, 2**33 + 1)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.triton
def test_device_paths_match_cpu(monkeypatch):
    # A tiny block budget makes the per-example route loop over several blocks.
    monkeypatch.setattr(device, "BLOCK_BYTES", 2000)
    # per-example route (blocked), Gram route in one and in several T-tiles, T = 1
    for shape in [(5, 6, 5, 3), (5, 5, 33, 17), (2, 40, 100, 100), (4, 1, 3, 2)]:
        x, dy = _inputs(*shape, torch.float32)
        scale = torch.rand(shape[0])
        torch.testing.assert_close(
            device.linear_sq_norms_device(x, dy), rmt_kernels.linear_sq_norms(x, dy)
        )
        torch.testing.assert_close(device.bias_sq_norms_device(dy), rmt_kernels.bias_sq_norms(dy))
        torch.testing.assert_close(
            device.bias_clipped_noisy_sum_device(dy, scale, 0.4, 3, 9),
            rmt_kernels.bias_clipped_noisy_sum(dy, scale, 0.4, 3, 9),
        )


BAD_LINEAR = [
    # (x shape, dy shape, scale length, noise_std, seed, offset, exception, message)
    ((3, 4, 5), (2, 4, 6), 3, 1.0, 0, 0, ValueError, "batch size"),
    ((3, 4, 5), (3, 5, 6), 3, 1.0, 0, 0, ValueError, "sequence length"),
    ((3, 4, 5, 1), (3, 4, 5, 1), 3, 1.0, 0, 0, ValueError, "x must have 2"),
    ((3, 4, 5), (3, 6), 3, 1.0, 0, 0, ValueError, "dy must have as many dimensions"),
    ((0, 4, 5), (0, 4, 6), 0, 1.0, 0, 0, ValueError, "empty batch"),
    ((3, 0, 5), (3, 0, 6), 3, 1.0, 0, 0, ValueError, "empty dimension"),
    ((3, 4, 5), (3, 4, 6), 2, 1.0, 0, 0, ValueError, "scale must have one entry per example"),
    ((3, 4, 5), (3, 4, 6), 3, -1.0, 0, 0, ValueError, "noise_std"),
    ((3, 4, 5), (3, 4, 6), 3, float("nan"), 0, 0, ValueError, "noise_std"),
    ((3, 4, 5), (3, 4, 6), 3, float("inf"), 0, 0, ValueError, "noise_std"),
    ((3, 4, 5), (3, 4, 6), 3, 1.0, -1, 0, ValueError, "seed"),
    ((3, 4, 5), (3, 4, 6), 3, 1.0, 0, -5, ValueError, "offset"),
    ((3, 4, 5), (3, 4, 6), 3, 1.0, 0, 2**63 - 10, ValueError, "offset"),
]


@pytest.mark.parametrize("device_path", [False, True])
@pytest.mark.parametrize("case", BAD_LINEAR)
def test_bad_input_raises_naming_the_argument(case, device_path):
    x_shape, dy_shape, n_scale, std, seed, offset, exc, message = case
    x, dy, scale = torch.randn(x_shape), torch.randn(dy_shape), torch.rand(n_scale)
    fn = (
        device.linear_clipped_noisy_sum_device
        if device_path
        else rmt_kernels.linear_clipped_noisy_sum
    )
    with pytest.raises(exc, match=message):
        fn(x, dy, scale, std, seed, offset)
    if message in ("batch size", "sequence length", "x must have 2", "empty batch"):
        norms = device.linear_sq_norms_device if device_path else rmt_kernels.linear_sq_norms
        with pytest.raises(exc, match=message):
            norms(x, dy)


@pytest.mark.parametrize(
    ("scale", "message"),
    [
        (torch.tensor([1.0, -0.5, 1.0]), "scale must be finite and >= 0"),
        (torch.tensor([1.0, float("inf"), 1.0]), "scale must be finite and >= 0"),
        (torch.tensor([1.0, float("nan"), 1.0]), "scale must be finite and >= 0"),
        (torch.ones(3, 1), "scale must be 1-D"),
    ],
)
def test_bad_scale_raises(scale, message):
    x, dy = _inputs(3, 4, 5, 6, torch.float32)
    with pytest.raises(ValueError, match=message):
        rmt_kernels.linear_clipped_noisy_sum(x, dy, scale, 1.0, 0, 0)
    with pytest.raises(ValueError, match=message):
        rmt_kernels.bias_clipped_noisy_sum(dy, scale, 1.0, 0, 0)
    with pytest.raises(ValueError, match=message):
        device.linear_clipped_noisy_sum_device(x, dy, scale, 1.0, 0, 0)


def test_bad_dtype_raises_type_error():
    x = torch.randn(3, 4, 5)
    with pytest.raises(TypeError, match="x must be float32"):
        rmt_kernels.linear_sq_norms(x.long(), torch.randn(3, 4, 6))
    with pytest.raises(TypeError, match="dy must be float32"):
        rmt_kernels.linear_sq_norms(x, torch.randn(3, 4, 6).double())
    with pytest.raises(TypeError, match="scale must be float32"):
        rmt_kernels.linear_clipped_noisy_sum(x, torch.randn(3, 4, 6), torch.ones(3).long(), 1, 0, 0)
