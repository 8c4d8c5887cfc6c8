"""Argument checks of the fused DP ops for the Python-side implementations (fake, CUDA/Triton).

Same conditions and messages as csrc/cpu/dp_common.h and the C++ kernels, since ``torch.ops.rmt.*``
can be called without going through Python. ``check_*_metadata`` look only at shapes and dtypes
(they run on fake tensors); ``check_*_values`` read data (one host sync) and run on real tensors.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT64_MAX = 2**63 - 1


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
    if x.shape[0] == 0:
        raise ValueError(f"{op}: empty batch: {x_name} has shape {list(x.shape)}")
    if dy.shape[0] != x.shape[0]:
        raise ValueError(
            f"{op}: dy must have the batch size of {x_name} ({x.shape[0]}), got {dy.shape[0]}"
        )
    if x.dim() == 3 and dy.shape[1] != x.shape[1]:
        raise ValueError(
            f"{op}: dy must have the sequence length of {x_name} ({x.shape[1]}), got {dy.shape[1]}"
        )
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
    if ids.shape[0] == 0:
        raise ValueError(f"{op}: empty batch: ids has shape {list(ids.shape)}")
    if dy.shape[0] != ids.shape[0]:
        raise ValueError(
            f"{op}: dy must have the batch size of ids ({ids.shape[0]}), got {dy.shape[0]}"
        )
    if ids.dim() == 2 and dy.shape[1] != ids.shape[1]:
        raise ValueError(
            f"{op}: dy must have the sequence length of ids ({ids.shape[1]}), got {dy.shape[1]}"
        )
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
