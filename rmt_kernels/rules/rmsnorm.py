"""RMSNorm: ``torch.nn.RMSNorm`` and the Hugging Face norms whose forward was read and verified;
their layer rule, module checks and the certified release terms of the weight.

Weight: per-example gradient ``sum_t dy_t * xhat_t``, ``xhat = x / sqrt(mean(x^2) + eps)``,
norms by :func:`rmt_kernels.ops.rmsnorm_sq_norms`, clipped sum by
:func:`rmt_kernels.ops.rmsnorm_clipped_noisy_sum`. No bias.

The Hugging Face classes (transformers 5.23), registered by import path (registry.py: nothing
imported, matched by exact class, never a subclass or a namesake). Their forward:

* ``LlamaRMSNorm``, ``Qwen2RMSNorm``, ``Qwen3RMSNorm``, ``MistralRMSNorm``: ``h = x.float();
  h = h * rsqrt(h.pow(2).mean(-1) + variance_epsilon); weight * h.to(x.dtype)``;
* ``GemmaRMSNorm``: ``h = x.float() * rsqrt(mean(x^2) + eps); (h * (1 + weight.float()))``:
  the same weight gradient, ``dy * xhat``.

For a float32 input the layer's gradient is this rule's up to float32 rounding; for a bfloat16 or
float16 input Llama's ``weight * h.to(x.dtype)`` rounds ``xhat`` to the input's precision first,
so autograd's gradient is this rule's up to that rounding (a relative 2^-8 in bfloat16): the
rule clips and releases the exact-``xhat`` gradient, which is what it certifies. Any other
RMSNorm-like class (T5, Gemma 2/3, a user's subclass) has no rule until one is registered for it.
The module check refuses a replaced ``forward`` (own_forward.py: a hub kernel from ``kernels``).
"""

from __future__ import annotations

import torch
from torch import nn

from rmt_kernels.ops import rmsnorm_clipped_noisy_sum, rmsnorm_sq_norms
from rmt_kernels.rules.own_forward import check_own_forward
from rmt_kernels.rules.registry import Sums, has_trainable, import_path, register_layer_rule
from rmt_kernels.rules.release_guard import (
    ReleaseGuard,
    as_sequence,
    compensated_sum,
    remember_sq_norms,
    row_norm_bounds,
)

__all__ = [
    "HF_RMSNORM_EPS",
    "RMSNormRule",
    "RMSNormTerms",
    "check_rmsnorm_module",
    "positions",
    "rmsnorm_eps",
]

# The Hugging Face classes whose forward was read (module docstring), by import path, and the
# attribute holding the eps each adds.
HF_RMSNORM_EPS = {
    "transformers.models.llama.modeling_llama.LlamaRMSNorm": "variance_epsilon",
    "transformers.models.qwen2.modeling_qwen2.Qwen2RMSNorm": "variance_epsilon",
    "transformers.models.qwen3.modeling_qwen3.Qwen3RMSNorm": "variance_epsilon",
    "transformers.models.mistral.modeling_mistral.MistralRMSNorm": "variance_epsilon",
    "transformers.models.gemma.modeling_gemma.GemmaRMSNorm": "eps",
}
# Beyond these, float32's sum of squares of a row can underflow or overflow (spread below).
_FLOAT32_SAFE_MIN = 2.0**-96
_FLOAT32_SAFE_MAX = 2.0**120


def rmsnorm_eps(module: nn.Module) -> float:
    """The eps ``module`` adds to ``mean(x^2)`` for a float32, bfloat16 or float16 input.

    ``torch.nn.RMSNorm(eps=None)`` adds ``torch.finfo(torch.float32).eps`` for all three (torch
    computes half-precision inputs in float32 and takes that type's epsilon; measured, and
    tested against the layer's output in tests/test_decoder_rules.py).
    """
    if isinstance(module, nn.RMSNorm):
        return torch.finfo(torch.float32).eps if module.eps is None else float(module.eps)
    return float(getattr(module, HF_RMSNORM_EPS[import_path(type(module))]))


def check_rmsnorm_module(module: nn.Module) -> None:
    """Refuse what the ops do not follow: normalisation over several dimensions, a weight that
    is not one value per feature, a replaced forward (Hugging Face classes).

    Raises:
        ValueError: as above.
    """
    if isinstance(module, nn.RMSNorm):
        if len(module.normalized_shape) != 1:
            raise ValueError(
                "rmsnorm rule: only normalisation over the last dimension is supported, got "
                f"normalized_shape={tuple(module.normalized_shape)}"
            )
        return
    check_own_forward(module)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        raise ValueError(
            f"rmsnorm rule: {type(module).__name__}.weight must be a 1-D tensor (one value per "
            "feature)"
        )


def positions(t: torch.Tensor) -> torch.Tensor:
    """A (B, ..., d) input or output gradient as (B, T, d); (B, d) and (B, T, d) unchanged.

    RMSNorm normalises each vector along the last dimension on its own, so every dimension
    between the example and the features is a position of the example (``flat_positions``), and
    example b's weight gradient is the sum over all of them. Qwen3's ``q_norm`` and ``k_norm``
    see (B, T, heads, head_dim): the ops take at most three dimensions (red team 27: every
    Qwen3 model was refused at its first step).
    """
    return t if t.dim() <= 3 else t.reshape(t.shape[0], -1, t.shape[-1])


class RMSNormTerms:
    """Terms of an RMSNorm weight's per-example gradients ``sum_t dy_t * xhat_t``."""

    def __init__(self, x: torch.Tensor, dy: torch.Tensor, eps: float) -> None:
        self.x, self.dy, self.eps = as_sequence(x), as_sequence(dy), float(eps)

    def spread(self) -> torch.Tensor:
        """(B,) ``sum_t |dy_t * x_t| / sqrt(mean(x_t^2) + eps)``, i.e. ``sum_t |dy_t * xhat_t|``.

        The normaliser sums non-negative squares: the float32 ``xhat`` is off by a relative
        ~(d + 8) u32 per entry, no cancellation, so ``|dy_t * xhat_t|`` covers both the terms
        and ``xhat``'s own error. Upper bound from float32 passes: ``|dy * x|`` from one
        elementwise product (as LayerNormTerms.spread), the normaliser from below,
        ``sum x^2 >= n^2 (1 - (d + 6) 2^-24) - d 2^-149`` with ``n`` the float32 norm. A row
        whose float32 sum of squares may underflow against eps (``mean(x^2) + eps < 2^-96``)
        or overflow (``|x|^2 > 2^120``), where the float32 ``xhat`` can be wrong entirely,
        gives inf (flagged: computed in float64).
        """
        d = self.x.shape[-1]
        prod = self.dy.float() * self.x.float()  # rounded (u32) and, below 2^-149, flushed
        n_dx = (row_norm_bounds(prod) + d**0.5 * 2.0**-149) * (1.0 + 2.0**-23)
        n = torch.linalg.vector_norm(self.x, dim=-1, dtype=torch.float32).double()
        sum_sq_lo = (n.square() * (1.0 - (d + 6) * 2.0**-24) - d * 2.0**-149).clamp(min=0.0)
        D2_lo = (sum_sq_lo / d + self.eps) * (1.0 - 2.0**-50)
        n_up = row_norm_bounds(self.x)
        safe = (D2_lo >= _FLOAT32_SAFE_MIN) & (n_up.square() <= _FLOAT32_SAFE_MAX)
        per_token = torch.where(safe, n_dx / D2_lo.clamp(min=_FLOAT32_SAFE_MIN).sqrt(), torch.inf)
        return per_token.sum(1)

    def exact(self, idx: torch.Tensor) -> tuple[None, torch.Tensor]:
        """float64 gradients (n, d) with ``xhat`` in float64 (0 where mean(x^2) + eps = 0, where
        the layer's own output is not finite), compensated over tokens."""
        x64 = self.x[idx].double()
        D = (x64.square().mean(2, keepdim=True) + self.eps).sqrt()
        xhat = torch.where(D > 0, x64 / D, 0.0)
        return None, compensated_sum(self.dy[idx].double() * xhat)[:, 0]


@register_layer_rule((nn.RMSNorm, *HF_RMSNORM_EPS))
class RMSNormRule:
    """RMSNorm weight (:func:`rmsnorm_sq_norms`); ``nn.RMSNorm(elementwise_affine=False)`` and
    a frozen weight have nothing to release."""

    flat_positions = True
    check_module = staticmethod(check_rmsnorm_module)

    @staticmethod
    def sq_norms(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Sums:
        check_rmsnorm_module(module)
        if not has_trainable(module, "weight"):
            return {}
        out = {"weight": rmsnorm_sq_norms(positions(x), positions(dy), rmsnorm_eps(module))}
        remember_sq_norms(module, (x, dy), out)  # keyed by the tensors the engine passes
        return out

    @staticmethod
    def clipped_noisy_sums(module: nn.Module, x, dy, scale, noise_std, seed, offsets) -> Sums:
        # Arguments and result: rmt_kernels.rules.LayerRule.
        check_rmsnorm_module(module)
        if not has_trainable(module, "weight"):
            return {}
        eps = rmsnorm_eps(module)
        guard = ReleaseGuard(
            "rmsnorm_clipped_noisy_sum",
            module,
            (x, dy),
            scale,
            lambda: RMSNormRule.sq_norms(module, x, dy),
        )
        x, dy = positions(x), positions(dy)
        return {
            "weight": guard.release(
                "weight",
                RMSNormTerms(x, dy, eps),
                lambda s: rmsnorm_clipped_noisy_sum(
                    x, dy, s, eps, noise_std, seed, offsets["weight"]
                ),
            )
        }
