"""The CUDA kernel of every ``torch.ops.rmt`` op, registered in one table.

The kernels themselves sit beside this file: rmt::denoise and rmt::denoise_warm in denoise.py,
the fused DP ops in device.py (torch code and the launchers of linear.py, sq_norms.py and
dp_noise.py) and rmsnorm_device.py. Neither this module nor those two import Triton: it is
imported when a kernel first runs, so a CPU install never needs it.
"""

from __future__ import annotations

import torch

from rmt_kernels.triton import device, rmsnorm_device


# Imported when called: rmt_kernels.triton.denoise imports Triton.
def _denoise_cuda(grad: torch.Tensor, sigma: float, **options) -> torch.Tensor:
    from rmt_kernels.triton.denoise import denoise_triton

    return denoise_triton(grad, sigma, **options)


def _denoise_warm_cuda(grad: torch.Tensor, sigma: float, basis: torch.Tensor, *args, **options):
    from rmt_kernels.triton.denoise import denoise_warm_triton

    return denoise_warm_triton(grad, sigma, basis, *args, **options)


_CUDA_KERNELS = {
    "denoise": _denoise_cuda,
    "denoise_warm": _denoise_warm_cuda,
    "linear_sq_norms": device.linear_sq_norms_device,
    "linear_clipped_noisy_sum": device.linear_clipped_noisy_sum_device,
    "bias_sq_norms": device.bias_sq_norms_device,
    "bias_clipped_noisy_sum": device.bias_clipped_noisy_sum_device,
    "embedding_sq_norms": device.embedding_sq_norms_device,
    "embedding_clipped_noisy_sum": device.embedding_clipped_noisy_sum_device,
    "layernorm_sq_norms": device.layernorm_sq_norms_device,
    "layernorm_clipped_noisy_sum": device.layernorm_clipped_noisy_sum_device,
    "add_gaussian_noise": device.add_gaussian_noise_device,
    "rmsnorm_sq_norms": rmsnorm_device.rmsnorm_sq_norms_device,
    "rmsnorm_clipped_noisy_sum": rmsnorm_device.rmsnorm_clipped_noisy_sum_device,
}


def _register() -> None:
    for name, kernel in _CUDA_KERNELS.items():
        torch.library.register_kernel(f"rmt::{name}", "cuda", kernel)


_register()
