"""``nn.Linear``: its layer rule and the certified release terms of its weight.

Weight: per-example gradient ``sum_t dy_t x_t^T``, norms by :func:`rmt_kernels.ops.linear_sq_norms`
(Gram or per-example route, certified), clipped sum by one GEMM
(:func:`rmt_kernels.ops.linear_clipped_noisy_sum`); bias: rmt_kernels/rules/bias.py. Every
option of ``nn.Linear`` is followed: no module check.
"""

from __future__ import annotations

import torch
from torch import nn

from rmt_kernels.ops import bias_sq_norms, linear_clipped_noisy_sum, linear_sq_norms
from rmt_kernels.rules.bias import release_bias
from rmt_kernels.rules.registry import Sums, has_trainable, register_layer_rule
from rmt_kernels.rules.release_guard import (
    ReleaseGuard,
    as_sequence,
    remember_sq_norms,
    row_norm_bounds,
)

__all__ = ["LinearRule", "LinearTerms"]


class LinearTerms:
    """Terms of a Linear weight's per-example gradients ``sum_t dy_t x_t^T``."""

    def __init__(self, x: torch.Tensor, dy: torch.Tensor) -> None:
        self.x, self.dy = as_sequence(x), as_sequence(dy)

    def spread(self) -> torch.Tensor:
        """(B,) float64 ``sum_t |x_t| |dy_t|`` (>= the Frobenius norm of ``|dy|^T |x|``)."""
        return (row_norm_bounds(self.x) * row_norm_bounds(self.dy)).sum(1)

    def exact(self, idx: torch.Tensor) -> tuple[None, torch.Tensor]:
        """float64 gradients (n, d_out, d_in) of examples ``idx``: one float64 GEMM each
        (products exact, sums off by at most gamma_T times the spread)."""
        return None, torch.bmm(self.dy[idx].double().mT, self.x[idx].double())


@register_layer_rule(nn.Linear)
class LinearRule:
    """``nn.Linear``: weight (:func:`linear_sq_norms`) and bias (:func:`bias_sq_norms`)."""

    flat_positions = True

    @staticmethod
    def sq_norms(module: nn.Linear, x: torch.Tensor, dy: torch.Tensor) -> Sums:
        out = {}
        if has_trainable(module, "weight"):
            out["weight"] = linear_sq_norms(x, dy)
        if has_trainable(module, "bias"):
            out["bias"] = bias_sq_norms(dy)
        remember_sq_norms(module, (x, dy), out)
        return out

    @staticmethod
    def clipped_noisy_sums(module: nn.Linear, x, dy, scale, noise_std, seed, offsets) -> Sums:
        # Arguments and result: rmt_kernels.rules.LayerRule.
        # Examples whose float32 rounding could exceed R C are summed apart (release_guard.py).
        guard = ReleaseGuard(
            "linear_clipped_noisy_sum",
            module,
            (x, dy),
            scale,
            lambda: LinearRule.sq_norms(module, x, dy),
        )
        out = {}
        if has_trainable(module, "weight"):
            out["weight"] = guard.release(
                "weight",
                LinearTerms(x, dy),
                lambda s: linear_clipped_noisy_sum(x, dy, s, noise_std, seed, offsets["weight"]),
            )
        if has_trainable(module, "bias"):
            out["bias"] = release_bias(guard, dy, noise_std, seed, offsets["bias"])
        return out
