"""Argument checks shared by the Python-side implementations of the ops (fake, Triton, reference).

The C++ CPU kernel checks the same conditions with the same messages (csrc/cpu/denoise.cpp), since
``torch.ops.rmt.denoise`` can be called without going through Python wrappers.
"""

from __future__ import annotations

import math
import numbers

import torch

from rmt_kernels.shrinkage import NORM_CORRECTIONS, SHRINKERS

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# More power iterations than this buy nothing in fp32; the cap keeps a typo from hanging a step.
MAX_POWER_ITERATIONS = 100
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
    if not 0 <= niter <= MAX_POWER_ITERATIONS:
        raise ValueError(
            f"denoise: niter must be between 0 and {MAX_POWER_ITERATIONS}, got {niter}"
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
