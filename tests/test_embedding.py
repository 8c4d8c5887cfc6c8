"""rmt::embedding_sq_norms and rmt::embedding_clipped_noisy_sum against explicit per-example
gradients, including repeated tokens, on both norm routes and the device path."""

import pytest
import torch
from torch import nn

import rmt_kernels
from rmt_kernels.reference import clipped_sum, per_example_grads, per_example_sq_norms
from rmt_kernels.triton import device

# (B, T or None, vocabulary, d). A vocabulary of 5 forces many repeated tokens per example;
# T = 300 > EMBEDDING_GRAM_MAX_T takes the sort-and-segment route.
SHAPES = [(3, 7, 5, 4), (1, 9, 50, 3), (4, 1, 6, 5), (5, None, 4, 3), (3, 300, 5, 6)]


def _inputs(B, T, V, d, dtype=torch.float32):
    shape = (B,) if T is None else (B, T)
    return torch.randint(0, V, shape), torch.randn(*shape, d).to(dtype)


def _close(actual, expected, rtol=2e-5):
    atol = rtol * expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_embedding_matches_per_example_gradients(shape, dtype):
    ids, dy = _inputs(*shape, dtype)
    V = shape[2]
    scale = torch.rand(shape[0])
    grads = per_example_grads(nn.Embedding(V, shape[3]), ids, dy)
    _close(rmt_kernels.embedding_sq_norms(ids, dy), per_example_sq_norms(grads)["weight"])
    _close(rmt_kernels.embedding_sq_norms(ids.int(), dy), per_example_sq_norms(grads)["weight"])
    out = rmt_kernels.embedding_clipped_noisy_sum(ids, dy, scale, V, 0.0, 0, 0)
    assert out.shape == (V, shape[3]) and out.dtype == torch.float32
    _close(out, clipped_sum(grads, scale)["weight"])


def test_repeated_token_norm_adds_up():
    # One example, the same token twice with the same dy: its gradient row is 2 dy, norm^2 4|dy|^2.
    dy = torch.randn(1, 1, 8).expand(1, 2, 8).contiguous()
    norms = rmt_kernels.embedding_sq_norms(torch.tensor([[3, 3]]), dy)
    torch.testing.assert_close(norms, 4 * dy[0, 0].square().sum()[None])


def test_gram_blocks_cover_every_example():
    # T = 128: 8 T^2 bytes per example, 32 MiB budget -> blocks of 256; 300 examples need two.
    ids, dy = _inputs(300, 128, 7, 2)
    rows = torch.zeros(300, 7, 2, dtype=torch.float64)
    rows.scatter_add_(1, ids[..., None].expand(-1, -1, 2), dy.double())
    _close(rmt_kernels.embedding_sq_norms(ids, dy), rows.square().sum((1, 2)))


@pytest.mark.triton
@pytest.mark.parametrize("shape", [*SHAPES, (2, 40, 5, 6)])  # 40: two T-tiles of the Gram kernel
def test_device_path_matches_cpu(shape):
    ids, dy = _inputs(*shape)
    scale = torch.rand(shape[0])
    torch.testing.assert_close(
        device.embedding_sq_norms_device(ids, dy), rmt_kernels.embedding_sq_norms(ids, dy)
    )
    args = (ids, dy, scale, shape[2], 0.7, 5, 2**35)
    torch.testing.assert_close(
        device.embedding_clipped_noisy_sum_device(*args),
        rmt_kernels.embedding_clipped_noisy_sum(*args),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("device_path", [False, True])
@pytest.mark.parametrize(
    ("ids", "dy", "n_scale", "V", "exc", "message"),
    [
        (torch.zeros(3, 4, dtype=torch.long), torch.randn(2, 4, 5), 3, 6, ValueError, "batch"),
        (torch.zeros(3, 4, dtype=torch.long), torch.randn(3, 5, 5), 3, 6, ValueError, "sequence"),
        (torch.zeros(3, 4, 2, dtype=torch.long), torch.randn(3, 4, 2, 5), 3, 6, ValueError, "ids"),
        (torch.zeros(3, 4, dtype=torch.long), torch.randn(3, 4), 3, 6, ValueError, "dy must"),
        (torch.zeros(0, 4, dtype=torch.long), torch.randn(0, 4, 5), 0, 6, ValueError, "empty"),
        (torch.zeros(3, 4), torch.randn(3, 4, 5), 3, 6, TypeError, "ids must be int64"),
        (torch.full((3, 4), 6), torch.randn(3, 4, 5), 3, 6, ValueError, "ids must lie"),
        (torch.full((3, 4), -1), torch.randn(3, 4, 5), 3, 6, ValueError, "ids must lie"),
        (torch.zeros(3, 4, dtype=torch.long), torch.randn(3, 4, 5), 2, 6, ValueError, "scale"),
        (torch.zeros(3, 4, dtype=torch.long), torch.randn(3, 4, 5), 3, 0, ValueError, "num_emb"),
    ],
)
def test_bad_input_raises(ids, dy, n_scale, V, exc, message, device_path):
    fn = (
        device.embedding_clipped_noisy_sum_device
        if device_path
        else rmt_kernels.embedding_clipped_noisy_sum
    )
    with pytest.raises(exc, match=message):
        fn(ids, dy, torch.rand(n_scale), V, 1.0, 0, 0)
