"""``nn.LayerNorm``: its layer rule, module check and the certified release terms of its weight.

Weight: per-example gradient ``sum_t dy_t * xhat_t``, norms by
:func:`rmt_kernels.ops.layernorm_sq_norms`, clipped sum by
:func:`rmt_kernels.ops.layernorm_clipped_noisy_sum`; bias: rmt_kernels/rules/bias.py.
"""

from __future__ import annotations

import torch
from torch import nn

from rmt_kernels.ops import bias_sq_norms, layernorm_clipped_noisy_sum, layernorm_sq_norms
from rmt_kernels.rules.bias import release_bias
from rmt_kernels.rules.registry import Sums, has_trainable, register_layer_rule
from rmt_kernels.rules.release_guard import (
    ReleaseGuard,
    as_sequence,
    compensated_sum,
    remember_sq_norms,
    row_norm_bounds,
)

__all__ = ["LayerNormRule", "LayerNormTerms", "check_layernorm_module"]


def check_layernorm_module(module: nn.LayerNorm) -> None:
    """Refuse a normalisation over several dimensions: the ops normalise the last one, and a
    (B, ..., d1, d2) input would be read as positions of d2 features.

    Raises:
        ValueError: ``len(normalized_shape) != 1``.
    """
    if len(module.normalized_shape) != 1:
        raise ValueError(
            "layernorm rule: only normalisation over the last dimension is supported, got "
            f"normalized_shape={tuple(module.normalized_shape)}"
        )


class LayerNormTerms:
    """Terms of a LayerNorm weight's per-example gradients ``sum_t dy_t * xhat_t``."""

    def __init__(self, x: torch.Tensor, dy: torch.Tensor, eps: float) -> None:
        self.x, self.dy, self.eps = as_sequence(x), as_sequence(dy), float(eps)

    def spread(self) -> torch.Tensor:
        """(B,) float64 ``sum_t (|dy_t * (x_t - mean_t)| + |dy_t| rms(x_t)) / sqrt(var_t + eps)``.

        The first part covers the terms ``|dy_t * xhat_t|``, the second the float32 error of
        ``xhat_t`` itself (entry i off by ~u32 (|x_ti - mean_t| + rms(x_t)) / sigma_t: the
        mean's own error is ~u32 rms), so a nearly constant row (|mean| >> sigma) counts as the
        amplifier it is. Upper bounds from float32 passes (one elementwise product ``dy * x``):
        ``|dy * (x - mean)| <= |dy * x| + |mean| |dy|``, ``var >= rms^2 (1 - g) - mean_up^2``
        with the float32 sums' error bounds; a row whose variance bound is 0 (eps = 0) gives inf
        (flagged).
        """
        d = self.x.shape[-1]
        g = (d + 4) * 2.0**-24  # relative error of a float32 sum of d terms (gamma_d) and more
        n_x = row_norm_bounds(self.x)
        n_dy = row_norm_bounds(self.dy)
        prod = self.dy.float() * self.x.float()  # rounded (u32) and, below 2^-149, flushed
        n_dx = (row_norm_bounds(prod) + d**0.5 * 2.0**-149) * (1.0 + 2.0**-23)
        total = self.x.sum(-1, dtype=torch.float32).double().abs()
        mean_up = (total + g * d**0.5 * n_x) / d
        rms_up = n_x / d**0.5
        ms_lo = rms_up.square() * (1.0 - 3.0 * g)  # n_x's margin is <= g relative (squared)
        var_lo = (ms_lo - mean_up.square()).clamp(min=0.0)
        D_lo = (var_lo + self.eps).sqrt() * (1.0 - 2.0**-50)
        per_token = (n_dx + mean_up * n_dy + n_dy * rms_up) / D_lo  # D_lo = 0: inf or NaN
        return per_token.sum(1)

    def exact(self, idx: torch.Tensor) -> tuple[None, torch.Tensor]:
        """float64 gradients (n, d) with ``xhat`` in float64 (0 where var + eps = 0, where the
        layer's own output is not finite), compensated over tokens."""
        x64 = self.x[idx].double()
        mean = x64.mean(2, keepdim=True)
        D = ((x64 - mean).square().mean(2, keepdim=True) + self.eps).sqrt()
        xhat = torch.where(D > 0, (x64 - mean) / D, 0.0)
        return None, compensated_sum(self.dy[idx].double() * xhat)[:, 0]


@register_layer_rule(nn.LayerNorm)
class LayerNormRule:
    """``nn.LayerNorm``: weight (:func:`layernorm_sq_norms`) and bias (:func:`bias_sq_norms`)."""

    flat_positions = True
    check_module = staticmethod(check_layernorm_module)

    @staticmethod
    def sq_norms(module: nn.LayerNorm, x: torch.Tensor, dy: torch.Tensor) -> Sums:
        check_layernorm_module(module)
        out = {}
        if has_trainable(module, "weight"):
            out["weight"] = layernorm_sq_norms(x, dy, module.eps)
        if has_trainable(module, "bias"):
            out["bias"] = bias_sq_norms(dy)
        remember_sq_norms(module, (x, dy), out)
        return out

    @staticmethod
    def clipped_noisy_sums(module: nn.LayerNorm, x, dy, scale, noise_std, seed, offsets) -> Sums:
        # Arguments and result: rmt_kernels.rules.LayerRule.
        check_layernorm_module(module)
        guard = ReleaseGuard(
            "layernorm_clipped_noisy_sum",
            module,
            (x, dy),
            scale,
            lambda: LayerNormRule.sq_norms(module, x, dy),
        )
        out = {}
        if has_trainable(module, "weight"):
            out["weight"] = guard.release(
                "weight",
                LayerNormTerms(x, dy, module.eps),
                lambda s: layernorm_clipped_noisy_sum(
                    x, dy, s, module.eps, noise_std, seed, offsets["weight"]
                ),
            )
        if has_trainable(module, "bias"):
            out["bias"] = release_bias(guard, dy, noise_std, seed, offsets["bias"])
        return out
