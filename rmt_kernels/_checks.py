"""Argument checks of every op for its Python-side implementations (fake, CUDA/Triton, reference).

The C++ CPU kernels check the same conditions with the same messages (csrc/cpu/denoise.cpp,
csrc/cpu/dp_common.h and the DP kernels), since ``torch.ops.rmt.*`` can be called without going
through Python; tests check that both sides agree. ``check_*_metadata`` and the denoise checks look
only at shapes and dtypes (they run on fake tensors); ``check_*_values`` read data (one host sync)
and run on real tensors.
"""

from __future__ import annotations

import math
import numbers

import torch

from rmt_kernels import _C
from rmt_kernels.shrinkage import NORM_CORRECTIONS, SHRINKERS

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT64_MAX = 2**63 - 1
# Cap of denoise's niter (csrc/constants.h).
MAX_POWER_ITERATIONS: int = _C.MAX_POWER_ITERATIONS
# The sketch is min(rank + oversample, min(m, n)) wide, so any oversample past a matrix's smaller
# side means "all of it"; the cap keeps rank + oversample far from int64 overflow in C++.
MAX_OVERSAMPLE = 2**31 - 1
# Seeds are int64 in the ops' schemas (and reinterpreted as uint64 by the generators).
SEED_LIMIT = 2**63


def _check_int(name: str, value) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"denoise: {name} must be an int, got {type(value).__name__}")


def check_denoise_arguments(
    grad: torch.Tensor,
    sigma: float,
    shrinker: str,
    kappa: float,
    rank: int,
    oversample: int,
    niter: int,
    norm: str,
    seed: int | None = None,
) -> None:
    """Raise a ValueError/TypeError naming the first bad argument of ``denoise``.

    Looks only at metadata, so it also runs on fake and meta tensors. NaN/Inf in ``grad`` are
    checked by each kernel where it costs nothing extra. Every int option must fit its C++ type
    (int64) with room for the kernel's arithmetic on it; ``seed`` is checked when given.
    """
    if not isinstance(grad, torch.Tensor):
        raise TypeError(f"denoise: grad must be a torch.Tensor, got {type(grad).__name__}")
    if grad.dim() not in (2, 3):
        raise ValueError(
            "denoise: grad must be a matrix (m, n) or a batch of matrices (b, m, n), got a "
            f"tensor with {grad.dim()} dimensions"
        )
    if any(size == 0 for size in grad.shape):
        raise ValueError(
            f"denoise: grad must not have an empty dimension, got shape {list(grad.shape)}"
        )
    if grad.dtype not in FLOAT_DTYPES:
        raise TypeError(f"denoise: grad must be float32, bfloat16 or float16, got {grad.dtype}")
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(
            f"denoise: sigma (the per-entry noise std of grad) must be a finite number > 0, "
            f"got {sigma}"
        )
    if not (isinstance(kappa, (int, float)) and math.isfinite(kappa) and kappa > 0):
        raise ValueError(
            f"denoise: kappa (the multiplier of the bulk edge) must be a finite number > 0, "
            f"got {kappa}"
        )
    for name, value in (("rank", rank), ("oversample", oversample), ("niter", niter)):
        _check_int(name, value)
    if seed is not None:
        _check_int("seed", seed)
        if not 0 <= seed < SEED_LIMIT:
            raise ValueError(f"denoise: seed must be in [0, 2**63), got {seed}")
    full_rank = min(grad.shape[-2], grad.shape[-1])
    if not (rank == -1 or 1 <= rank <= full_rank):
        raise ValueError(
            f"denoise: rank must be -1 (adaptive) or between 1 and min(m, n) = {full_rank}, "
            f"got {rank}"
        )
    if not 0 <= oversample <= MAX_OVERSAMPLE:
        raise ValueError(
            f"denoise: oversample must be between 0 and {MAX_OVERSAMPLE}, got {oversample}"
        )
    if not -1 <= niter <= MAX_POWER_ITERATIONS:
        raise ValueError(
            f"denoise: niter must be -1 (adaptive) or between 0 and {MAX_POWER_ITERATIONS}, "
            f"got {niter}"
        )
    if shrinker not in SHRINKERS:
        raise ValueError(
            "denoise: shrinker must be one of 'frobenius', 'operator', 'nuclear', 'hard', "
            f"got '{shrinker}'"
        )
    if norm not in NORM_CORRECTIONS:
        raise ValueError(
            f"denoise: norm must be one of 'none', 'preserve', 'debiased', got '{norm}'"
        )


def check_denoise_basis(grad: torch.Tensor, basis: torch.Tensor) -> None:
    """Raise a ValueError/TypeError naming ``basis`` unless it can start ``denoise_warm`` on grad.

    ``basis``: (m, k) for a matrix grad (m, n), (b, m, k) for a batch (b, m, n); float32, on
    grad's device, 0 <= k <= min(m, n). Metadata only (runs on fake tensors); NaN/Inf in it are
    checked by each kernel. Call after :func:`check_denoise_arguments` (grad is known good).
    """
    op = "denoise_warm"
    if not isinstance(basis, torch.Tensor):
        raise TypeError(f"{op}: basis must be a torch.Tensor, got {type(basis).__name__}")
    if basis.dim() != grad.dim():
        layout = "(m, k)" if grad.dim() == 2 else "(b, m, k)"
        raise ValueError(
            f"{op}: basis must have {grad.dim()} dimensions like grad ({layout}), got {basis.dim()}"
        )
    if grad.dim() == 3 and basis.shape[0] != grad.shape[0]:
        raise ValueError(
            f"{op}: basis must have one block per matrix of grad ({grad.shape[0]}), "
            f"got {basis.shape[0]}"
        )
    if basis.shape[-2] != grad.shape[-2]:
        raise ValueError(
            f"{op}: basis must have m = {grad.shape[-2]} rows (grad's rows), got {basis.shape[-2]}"
        )
    full_rank = min(grad.shape[-2], grad.shape[-1])
    if basis.shape[-1] > full_rank:
        raise ValueError(
            f"{op}: basis must have at most min(m, n) = {full_rank} columns, got {basis.shape[-1]}"
        )
    if basis.dtype != torch.float32:
        raise TypeError(f"{op}: basis must be float32, got {basis.dtype}")
    if basis.device != grad.device:
        raise ValueError(
            f"{op}: basis must be on grad's device ({grad.device}), got {basis.device}"
        )


# ----------------------------------------------------------------------------------------------
# The fused DP ops (C++ side: csrc/cpu/dp_common.h and the kernels)
# ----------------------------------------------------------------------------------------------


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    """TypeError unless ``t`` is float32, bfloat16 or float16."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, bfloat16 or float16, got {t.dtype}")


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    """ValueError unless every tensor argument is on one device.

    The dispatcher sends a call with any meta tensor to the fake (meta) implementation, which
    would otherwise return an uninitialised tensor on the device of its first argument: a CPU
    tensor of garbage for ``x`` on the CPU beside ``dy`` on meta.
    """
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"{op}: all tensor arguments must be on one device, got {where}")


def _check_examples(
    op: str, name: str, lead: torch.Tensor, dy: torch.Tensor, has_sequence: bool
) -> None:
    """A non-empty batch, and dy with the batch size (and sequence length) of ``lead``."""
    if lead.shape[0] == 0:
        raise ValueError(f"{op}: empty batch: {name} has shape {list(lead.shape)}")
    if dy.shape[0] != lead.shape[0]:
        raise ValueError(
            f"{op}: dy must have the batch size of {name} ({lead.shape[0]}), got {dy.shape[0]}"
        )
    if has_sequence and dy.shape[1] != lead.shape[1]:
        raise ValueError(
            f"{op}: dy must have the sequence length of {name} ({lead.shape[1]}), got {dy.shape[1]}"
        )


def check_activations(op: str, x_name: str, x: torch.Tensor, dy: torch.Tensor) -> None:
    """x (B, d) or (B, T, d) and dy of the same ndim, batch and sequence length, nothing empty."""
    if x.dim() not in (2, 3):
        raise ValueError(
            f"{op}: {x_name} must have 2 (B, d) or 3 (B, T, d) dimensions, got {x.dim()}"
        )
    if dy.dim() != x.dim():
        raise ValueError(
            f"{op}: dy must have as many dimensions as {x_name} ({x.dim()}), got {dy.dim()}"
        )
    _check_examples(op, x_name, x, dy, has_sequence=x.dim() == 3)
    if any(s == 0 for s in x.shape):
        raise ValueError(f"{op}: {x_name} must not have an empty dimension, got {list(x.shape)}")
    if any(s == 0 for s in dy.shape):
        raise ValueError(f"{op}: dy must not have an empty dimension, got {list(dy.shape)}")


def check_ids(op: str, ids: torch.Tensor, dy: torch.Tensor) -> None:
    """Token ids (B,) or (B, T), int64 or int32, and dy of shape ids.shape + (d,)."""
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: ids must be int64 or int32 token ids, got {ids.dtype}")
    if ids.dim() not in (1, 2):
        raise ValueError(f"{op}: ids must have 1 (B,) or 2 (B, T) dimensions, got {ids.dim()}")
    if dy.dim() != ids.dim() + 1:
        raise ValueError(
            f"{op}: dy must have {ids.dim() + 1} dimensions (ids' shape + d), got {dy.dim()}"
        )
    _check_examples(op, "ids", ids, dy, has_sequence=ids.dim() == 2)
    if any(s == 0 for s in dy.shape):
        raise ValueError(f"{op}: dy must not have an empty dimension, got {list(dy.shape)}")
    check_float(op, "dy", dy)


def check_scale_metadata(op: str, scale: torch.Tensor, batch: int) -> None:
    """One clip factor per example, as a 1-D float tensor."""
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"{op}: scale must be a torch.Tensor, got {type(scale).__name__}")
    if scale.dim() != 1:
        raise ValueError(
            f"{op}: scale must be 1-D (one clip factor per example), got {scale.dim()} dimensions"
        )
    if scale.shape[0] != batch:
        raise ValueError(
            f"{op}: scale must have one entry per example ({batch}), got {scale.shape[0]}"
        )
    check_float(op, "scale", scale)


def check_scale_values(op: str, scale: torch.Tensor) -> None:
    """Clip factors finite and >= 0: a negative one flips an example, an infinite one voids the
    sensitivity bound."""
    if not bool((torch.isfinite(scale) & (scale >= 0)).all()):
        raise ValueError(f"{op}: scale must be finite and >= 0 in every entry")


def check_noise(op: str, noise_std: float, seed: int, offset: int, numel: int) -> None:
    """noise_std finite >= 0; seed, offset >= 0 with every counter offset + k inside int64."""
    if not (isinstance(noise_std, (int, float)) and math.isfinite(noise_std) and noise_std >= 0):
        raise ValueError(f"{op}: noise_std must be a finite number >= 0, got {noise_std}")
    if seed < 0:
        raise ValueError(f"{op}: seed must be >= 0, got {seed}")
    if not (0 <= offset <= INT64_MAX - numel):
        raise ValueError(
            f"{op}: offset must be >= 0 and offset + numel ({numel}) must fit in int64, "
            f"got {offset}"
        )


def check_eps(op: str, eps: float) -> None:
    """LayerNorm eps: finite and >= 0."""
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps}")


def check_layernorm(op: str, x: torch.Tensor, dy: torch.Tensor, eps: float) -> None:
    """LayerNorm input and output gradient of equal shape, normalised over the last dim."""
    check_activations(op, "x", x, dy)
    check_float(op, "x", x)
    check_float(op, "dy", dy)
    if dy.shape[-1] != x.shape[-1]:
        raise ValueError(
            f"{op}: dy must have the normalised size of x ({x.shape[-1]}), got {dy.shape[-1]}"
        )
    check_eps(op, eps)


# ----------------------------------------------------------------------------------------------
# Metadata checks of each fused DP op: what its fake (meta) and its device implementation both
# check before anything else (the C++ kernels check the same).
# ----------------------------------------------------------------------------------------------


def check_linear(op: str, x: torch.Tensor, dy: torch.Tensor) -> None:
    """Linear input and output gradient: float, matching B and T, one device."""
    check_activations(op, "x", x, dy)
    check_float(op, "x", x)
    check_float(op, "dy", dy)
    check_same_device(op, x=x, dy=dy)


def check_bias(op: str, dy: torch.Tensor) -> None:
    """Output gradient of a layer with a bias: (B, d) or (B, T, d), float."""
    check_activations(op, "dy", dy, dy)
    check_float(op, "dy", dy)


def check_num_embeddings(op: str, num_embeddings: int) -> None:
    """Rows of the embedding table: > 0."""
    if num_embeddings <= 0:
        raise ValueError(f"{op}: num_embeddings must be > 0, got {num_embeddings}")


def check_linear_sum(x, dy, scale, noise_std, seed, offset) -> None:
    """Arguments of ``linear_clipped_noisy_sum`` (metadata only)."""
    op = "linear_clipped_noisy_sum"
    check_linear(op, x, dy)
    check_scale_metadata(op, scale, x.shape[0])
    check_same_device(op, x=x, dy=dy, scale=scale)
    check_noise(op, noise_std, seed, offset, dy.shape[-1] * x.shape[-1])


def check_bias_sum(dy, scale, noise_std, seed, offset) -> None:
    """Arguments of ``bias_clipped_noisy_sum`` (metadata only)."""
    op = "bias_clipped_noisy_sum"
    check_bias(op, dy)
    check_scale_metadata(op, scale, dy.shape[0])
    check_same_device(op, dy=dy, scale=scale)
    check_noise(op, noise_std, seed, offset, dy.shape[-1])


def check_embedding_norms(ids, dy) -> None:
    """Arguments of ``embedding_sq_norms``."""
    check_ids("embedding_sq_norms", ids, dy)
    check_same_device("embedding_sq_norms", ids=ids, dy=dy)


def check_embedding_sum(ids, dy, scale, num_embeddings, noise_std, seed, offset) -> None:
    """Arguments of ``embedding_clipped_noisy_sum`` (metadata only; the id range needs data)."""
    op = "embedding_clipped_noisy_sum"
    check_ids(op, ids, dy)
    check_num_embeddings(op, num_embeddings)
    check_scale_metadata(op, scale, dy.shape[0])
    check_same_device(op, ids=ids, dy=dy, scale=scale)
    check_noise(op, noise_std, seed, offset, num_embeddings * dy.shape[-1])


def check_layernorm_norms(x, dy, eps) -> None:
    """Arguments of ``layernorm_sq_norms``."""
    check_layernorm("layernorm_sq_norms", x, dy, eps)
    check_same_device("layernorm_sq_norms", x=x, dy=dy)


def check_layernorm_sum(x, dy, scale, eps, noise_std, seed, offset) -> None:
    """Arguments of ``layernorm_clipped_noisy_sum`` (metadata only)."""
    op = "layernorm_clipped_noisy_sum"
    check_layernorm(op, x, dy, eps)
    check_scale_metadata(op, scale, x.shape[0])
    check_same_device(op, x=x, dy=dy, scale=scale)
    check_noise(op, noise_std, seed, offset, x.shape[-1])


def check_rmsnorm_norms(x, dy, eps) -> None:
    """Arguments of ``rmsnorm_sq_norms`` (the LayerNorm ones: same shapes and eps)."""
    check_layernorm("rmsnorm_sq_norms", x, dy, eps)
    check_same_device("rmsnorm_sq_norms", x=x, dy=dy)


def check_rmsnorm_sum(x, dy, scale, eps, noise_std, seed, offset) -> None:
    """Arguments of ``rmsnorm_clipped_noisy_sum`` (metadata only)."""
    op = "rmsnorm_clipped_noisy_sum"
    check_layernorm(op, x, dy, eps)
    check_scale_metadata(op, scale, x.shape[0])
    check_same_device(op, x=x, dy=dy, scale=scale)
    check_noise(op, noise_std, seed, offset, x.shape[-1])


def check_add_gaussian_noise(x, noise_std, seed, offset) -> None:
    """Arguments of ``add_gaussian_noise``."""
    check_float("add_gaussian_noise", "x", x)
    check_noise("add_gaussian_noise", noise_std, seed, offset, x.numel())
