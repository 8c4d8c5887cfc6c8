"""The bias parameter (``nn.Linear`` and ``nn.LayerNorm`` alike): its certified release terms.

A bias's per-example gradient is ``sum_t dy_t`` whatever the layer; its norms and clipped sum
are the fused ops :func:`rmt_kernels.ops.bias_sq_norms` and
:func:`rmt_kernels.ops.bias_clipped_noisy_sum`.
"""

from __future__ import annotations

import torch

from rmt_kernels.ops import bias_clipped_noisy_sum
from rmt_kernels.rules.release_guard import (
    ReleaseGuard,
    as_sequence,
    compensated_sum,
    row_norm_bounds,
)

__all__ = ["BiasTerms", "release_bias"]


class BiasTerms:
    """Terms of a bias's per-example gradients ``sum_t dy_t``."""

    def __init__(self, dy: torch.Tensor) -> None:
        self.dy = as_sequence(dy)

    def spread(self) -> torch.Tensor:
        """(B,) float64 ``sum_t |dy_t|``."""
        return row_norm_bounds(self.dy).sum(1)

    def exact(self, idx: torch.Tensor) -> tuple[None, torch.Tensor]:
        """float64 gradients (n, d), compensated sums of the exactly converted rows."""
        return None, compensated_sum(self.dy[idx].double())[:, 0]


def release_bias(
    guard: ReleaseGuard, dy: torch.Tensor, noise_std: float, seed: int, offset: int
) -> torch.Tensor:
    """The noisy clipped sum of a bias through the layer's release guard."""
    return guard.release(
        "bias",
        BiasTerms(dy),
        lambda s: bias_clipped_noisy_sum(dy, s, noise_std, seed, offset),
    )
