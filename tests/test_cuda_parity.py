"""On a real GPU only (skipped without CUDA; bench/gpu/run.sh runs them on the lent H200): the
compiled Triton noise is the CPU stream, and one private step of a tiny RoBERTa on CUDA equals
the same step on the CPU within float tolerance. This is what the static builds
(tests/test_triton_compile.py) cannot show: that the compiled kernels compute the right numbers.
"""

from __future__ import annotations

import pytest
import torch

import rmt_kernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (seed, offset, n): aligned, unaligned with a quad boundary at 2^32, and a tail draw beyond
# tl.randn's truncation (tests/test_dp_noise_tails.py: element 83691196 of seed 7, z = 5.979).
STREAMS = [(0, 0, 1 << 20), (2**40 + 3, 2**34 - 101, 5003), (7, 83691196 - 1000, 4096)]


@pytest.mark.parametrize(("seed", "offset", "n"), STREAMS)
def test_gpu_noise_is_the_cpu_stream(seed, offset, n):
    cpu = rmt_kernels.add_gaussian_noise(torch.zeros(n), 1.0, seed, offset)
    gpu = rmt_kernels.add_gaussian_noise(torch.zeros(n, device="cuda"), 1.0, seed, offset)
    # Same Philox words and uniforms; log, sin and cos of different math libraries: a few ulps.
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=4e-6)
    if seed == 7:
        assert cpu[1000].item() > 5.9  # the tail draw is in the compared range


def test_fused_linear_noise_is_the_cpu_stream():
    gen = torch.Generator().manual_seed(0)
    x, dy = torch.randn(4, 9, 70, generator=gen), torch.randn(4, 9, 130, generator=gen)
    scale = torch.rand(4, generator=gen)
    args = (1.0, 2**40 + 3, 7 << 32)
    cpu = rmt_kernels.linear_clipped_noisy_sum(x, dy, scale, *args)
    gpu = rmt_kernels.linear_clipped_noisy_sum(x.cuda(), dy.cuda(), scale.cuda(), *args)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:make_private. seed=:UserWarning")
def test_one_private_step_on_cuda_equals_the_cpu_step():
    pytest.importorskip("transformers")
    from torch.utils.data import DataLoader, TensorDataset

    from rmt_kernels.dp import make_private
    from tests.dp_models import padded_batch, tiny_model

    batch = padded_batch(batch=8)

    def step(device: str) -> dict[str, torch.Tensor]:
        model = tiny_model("roberta", "eager").to(device)
        ids, mask, labels = (t.to(device) for t in batch)
        loader = DataLoader(TensorDataset(ids, mask, labels), batch_size=len(ids))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model, opt, _ = make_private(
            model,
            opt,
            loader,
            target_delta=1e-5,
            max_grad_norm=0.5,
            noise_multiplier=1.0,
            poisson_sampling=False,
            seed=1234,
        )
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        return {n: p.detach().cpu() for n, p in model.named_parameters()}

    cpu, gpu = step("cpu"), step("cuda")
    for name, value in cpu.items():
        # The same noise (same stream on both devices) and the same clipped sum up to float32
        # reduction order: a step moves each weight by lr * (clipped mean + noise).
        torch.testing.assert_close(gpu[name], value, rtol=1e-4, atol=1e-5, msg=name)
