"""The fake (meta) implementation of every ``torch.ops.rmt`` op: shapes and metadata checks only.

``torch.compile``, ``torch.export`` and meta tensors call these instead of a kernel; registered
on import (rmt_kernels/__init__.py imports this module). Each runs its op's argument checks
(rmt_kernels/_checks.py), so a traced call fails as the eager one does, and returns empty tensors
of the kernel's output shapes and dtypes.
"""

from __future__ import annotations

import torch

from rmt_kernels import _checks
from rmt_kernels.op_options import DenoiseOpOptions


@torch.library.register_fake("rmt::denoise")
def _denoise_fake(grad: torch.Tensor, sigma: float, **options) -> torch.Tensor:
    # The dispatcher passes only the options that differ from the schema's defaults.
    DenoiseOpOptions(**options).check(grad, sigma, check_seed=False)
    return torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)


@torch.library.register_fake("rmt::denoise_warm")
def _denoise_warm_fake(
    grad: torch.Tensor, sigma: float, basis: torch.Tensor, *options, **named_options
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    DenoiseOpOptions(*options, **named_options).check(grad, sigma, check_seed=False)
    _checks.check_denoise_basis(grad, basis)
    # The new basis's width depends on how many components the data keeps: an unbacked size,
    # bounded by the matrix's smaller side where that is a plain int (meta tensors, which have no
    # such sizes, stop here).
    bound = min(grad.shape[-2:])
    width = torch.library.get_ctx().new_dynamic_size(
        min=0, max=bound if isinstance(bound, int) else None
    )
    estimate = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
    new_basis = grad.new_empty((*grad.shape[:-1], width), dtype=torch.float32)
    return estimate, new_basis, grad.new_empty((), dtype=torch.int64)


def _float_empty(like: torch.Tensor, *shape: int) -> torch.Tensor:
    return like.new_empty(shape, dtype=torch.float32)


@torch.library.register_fake("rmt::linear_sq_norms")
def _linear_sq_norms_fake(x, dy):
    _checks.check_linear("linear_sq_norms", x, dy)
    return _float_empty(x, x.shape[0])


@torch.library.register_fake("rmt::linear_clipped_noisy_sum")
def _linear_clipped_noisy_sum_fake(x, dy, scale, noise_std, seed, offset):
    _checks.check_linear_sum(x, dy, scale, noise_std, seed, offset)
    return _float_empty(x, dy.shape[-1], x.shape[-1])


@torch.library.register_fake("rmt::bias_sq_norms")
def _bias_sq_norms_fake(dy):
    _checks.check_bias("bias_sq_norms", dy)
    return _float_empty(dy, dy.shape[0])


@torch.library.register_fake("rmt::bias_clipped_noisy_sum")
def _bias_clipped_noisy_sum_fake(dy, scale, noise_std, seed, offset):
    _checks.check_bias_sum(dy, scale, noise_std, seed, offset)
    return _float_empty(dy, dy.shape[-1])


@torch.library.register_fake("rmt::embedding_sq_norms")
def _embedding_sq_norms_fake(ids, dy):
    _checks.check_embedding_norms(ids, dy)
    return _float_empty(dy, dy.shape[0])


@torch.library.register_fake("rmt::embedding_clipped_noisy_sum")
def _embedding_clipped_noisy_sum_fake(ids, dy, scale, num_embeddings, noise_std, seed, offset):
    _checks.check_embedding_sum(ids, dy, scale, num_embeddings, noise_std, seed, offset)
    return _float_empty(dy, num_embeddings, dy.shape[-1])


@torch.library.register_fake("rmt::layernorm_sq_norms")
def _layernorm_sq_norms_fake(x, dy, eps):
    _checks.check_layernorm_norms(x, dy, eps)
    return _float_empty(x, x.shape[0])


@torch.library.register_fake("rmt::layernorm_clipped_noisy_sum")
def _layernorm_clipped_noisy_sum_fake(x, dy, scale, eps, noise_std, seed, offset):
    _checks.check_layernorm_sum(x, dy, scale, eps, noise_std, seed, offset)
    return _float_empty(x, x.shape[-1])


@torch.library.register_fake("rmt::add_gaussian_noise")
def _add_gaussian_noise_fake(x, noise_std, seed, offset):
    _checks.check_add_gaussian_noise(x, noise_std, seed, offset)
    return x.new_empty(x.shape, dtype=torch.float32)


@torch.library.register_fake("rmt::rmsnorm_sq_norms")
def _rmsnorm_sq_norms_fake(x, dy, eps):
    _checks.check_rmsnorm_norms(x, dy, eps)
    return _float_empty(x, x.shape[0])


@torch.library.register_fake("rmt::rmsnorm_clipped_noisy_sum")
def _rmsnorm_clipped_noisy_sum_fake(x, dy, scale, eps, noise_std, seed, offset):
    _checks.check_rmsnorm_sum(x, dy, scale, eps, noise_std, seed, offset)
    return _float_empty(x, x.shape[-1])
