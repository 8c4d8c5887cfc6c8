"""GPT-2's ``transformers.pytorch_utils.Conv1D``: its layer rule and its weight's release terms.

Conv1D is a Linear with the weight stored transposed: ``y = x @ W + b`` with ``W`` of shape
(in, out) = (nx, nf). Example b's weight gradient is ``sum_t x_t dy_t^T``, the transpose of a
Linear's ``sum_t dy_t x_t^T``, so the certified Linear ops serve unchanged:

* norms: :func:`rmt_kernels.ops.linear_sq_norms` (a Frobenius norm does not see the transpose);
* clipped sum: :func:`rmt_kernels.ops.linear_clipped_noisy_sum` with the roles of ``x`` and
  ``dy`` swapped, which computes ``sum_b s_b sum_t x_t^T dy_t`` directly in the parameter's
  (in, out) layout, noise element (i, j) at counter ``offset + i * out + j``: one draw per
  element of the parameter's own range ``[offset, offset + numel)``, as for every parameter;
* bias: rmt_kernels/rules/bias.py.

Registered by import path (rmt_kernels/rules/registry.py), so ``transformers`` is imported by
the user's model, never by rmt_kernels. The module check refuses an instance whose ``forward``
is not the one this rule was written from (rmt_kernels/rules/own_forward.py).
"""

from __future__ import annotations

import torch
from torch import nn

from rmt_kernels.ops import bias_sq_norms, linear_clipped_noisy_sum, linear_sq_norms
from rmt_kernels.rules.bias import release_bias
from rmt_kernels.rules.own_forward import check_own_forward
from rmt_kernels.rules.registry import Sums, has_trainable, register_layer_rule
from rmt_kernels.rules.release_guard import (
    ReleaseGuard,
    as_sequence,
    remember_sq_norms,
    row_norm_bounds,
)

__all__ = ["CONV1D_PATH", "Conv1DRule", "Conv1DTerms"]

# The class this rule follows, by import path: transformers 5.23's forward
# ``torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)``.
CONV1D_PATH = "transformers.pytorch_utils.Conv1D"


class Conv1DTerms:
    """Terms of a Conv1D weight's per-example gradients ``sum_t x_t dy_t^T`` (in, out)."""

    def __init__(self, x: torch.Tensor, dy: torch.Tensor) -> None:
        self.x, self.dy = as_sequence(x), as_sequence(dy)

    def spread(self) -> torch.Tensor:
        """(B,) float64 ``sum_t |x_t| |dy_t|`` (>= the Frobenius norm of ``|x|^T |dy|``)."""
        return (row_norm_bounds(self.x) * row_norm_bounds(self.dy)).sum(1)

    def exact(self, idx: torch.Tensor) -> tuple[None, torch.Tensor]:
        """float64 gradients (n, in, out) of examples ``idx``: one float64 GEMM each."""
        return None, torch.bmm(self.x[idx].double().mT, self.dy[idx].double())


@register_layer_rule(CONV1D_PATH)
class Conv1DRule:
    """GPT-2's Conv1D: weight (in, out) by the Linear ops, bias (:func:`bias_sq_norms`)."""

    flat_positions = True
    check_module = staticmethod(check_own_forward)

    @staticmethod
    def sq_norms(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Sums:
        check_own_forward(module)
        out = {}
        if has_trainable(module, "weight"):
            out["weight"] = linear_sq_norms(x, dy)
        if has_trainable(module, "bias"):
            out["bias"] = bias_sq_norms(dy)
        remember_sq_norms(module, (x, dy), out)
        return out

    @staticmethod
    def clipped_noisy_sums(module: nn.Module, x, dy, scale, noise_std, seed, offsets) -> Sums:
        # Arguments and result: rmt_kernels.rules.LayerRule.
        check_own_forward(module)
        guard = ReleaseGuard(
            "linear_clipped_noisy_sum",
            module,
            (x, dy),
            scale,
            lambda: Conv1DRule.sq_norms(module, x, dy),
        )
        out = {}
        if has_trainable(module, "weight"):
            # (dy, x) in the Linear op's (x, dy) slots: sum_t x_t^T dy_t, (in, out).
            out["weight"] = guard.release(
                "weight",
                Conv1DTerms(x, dy),
                lambda s: linear_clipped_noisy_sum(dy, x, s, noise_std, seed, offsets["weight"]),
            )
        if has_trainable(module, "bias"):
            out["bias"] = release_bias(guard, dy, noise_std, seed, offsets["bias"])
        return out
