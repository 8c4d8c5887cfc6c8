"""Layer rules: how a module type's parameters get per-example norms and noisy clipped sums.

One rule per layer type, each a class registered with ``@register_layer_rule(nn.Module type)``
(as Opacus registers its grad samplers); a custom layer registers its own the same way, or with
``register_layer_rule(module_type, LayerRule(sq_norms, clipped_noisy_sums))``. The rules call the
fused ops of rmt_kernels/ops.py; examples whose float32 rounding could exceed the clip bound are
summed apart by rmt_kernels/rounding.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from rmt_kernels import rounding
from rmt_kernels.ops import (
    bias_clipped_noisy_sum,
    bias_sq_norms,
    embedding_clipped_noisy_sum,
    embedding_sq_norms,
    layernorm_clipped_noisy_sum,
    layernorm_sq_norms,
    linear_clipped_noisy_sum,
    linear_sq_norms,
)

__all__ = ["LayerRule", "get_layer_rule", "register_layer_rule"]


@dataclass(frozen=True)
class LayerRule:
    """Book-keeping rule of one module type.

    ``sq_norms(module, input, grad_output)`` returns ``{param_name: (B,) squared norms}`` and
    ``clipped_noisy_sums(module, input, grad_output, scale, noise_std, seed, offsets)`` returns
    ``{param_name: noisy clipped sum}`` with ``offsets[param_name]`` the counter offset of each
    parameter. Every trainable parameter of the module must appear in both: DP-SGD noises them all.
    """

    sq_norms: Callable[..., dict[str, torch.Tensor]]
    clipped_noisy_sums: Callable[..., dict[str, torch.Tensor]]


_RULES: dict[type[nn.Module], LayerRule] = {}


def register_layer_rule(module_type: type[nn.Module], rule: LayerRule | None = None):
    """Register (or replace) the rule for ``module_type`` (matched exactly, not by subclass).

    ``register_layer_rule(module_type, LayerRule(sq_norms, clipped_noisy_sums))`` registers a
    rule; ``@register_layer_rule(module_type)`` on a class with those two functions (static
    methods) registers the class's and returns the class unchanged.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(
            f"register_layer_rule: module_type must be an nn.Module subclass, got {module_type!r}"
        )
    if rule is not None:
        _RULES[module_type] = rule
        return None

    def decorate(cls):
        _RULES[module_type] = LayerRule(cls.sq_norms, cls.clipped_noisy_sums)
        return cls

    return decorate


def get_layer_rule(module: nn.Module) -> LayerRule:
    """The rule for ``module``'s type; a module without one is an error, never silently skipped."""
    rule = _RULES.get(type(module))
    if rule is None:
        raise TypeError(
            f"no DP layer rule for {type(module).__name__}; register one with "
            "rmt_kernels.register_layer_rule"
        )
    return rule


def _trainable(module: nn.Module, name: str) -> bool:
    p = getattr(module, name, None)
    return isinstance(p, nn.Parameter) and p.requires_grad


def _embedding_grad_output(module: nn.Embedding, ids, dy):
    # nn.Embedding gives the padding row no gradient: drop the positions that look it up.
    if module.padding_idx is None:
        return dy
    return dy.masked_fill((ids == module.padding_idx).unsqueeze(-1), 0)


def _check_embedding_module(module: nn.Embedding) -> None:
    # max_norm renormalises rows in the forward pass and sparse gradients have no dense sum:
    # refuse rather than compute something nn.Embedding would not.
    if module.max_norm is not None or module.sparse:
        raise ValueError("embedding rule: max_norm and sparse embeddings are not supported")


def _check_layernorm_module(module: nn.LayerNorm) -> None:
    if len(module.normalized_shape) != 1:
        raise ValueError(
            "layernorm rule: only normalisation over the last dimension is supported, got "
            f"normalized_shape={tuple(module.normalized_shape)}"
        )


def _release_bias(guard: rounding.ReleaseGuard, dy, noise_std, seed, offset) -> torch.Tensor:
    """The noisy clipped sum of a bias (Linear and LayerNorm alike) through the rounding guard."""
    return guard.release(
        "bias",
        rounding.BiasTerms(dy),
        lambda s: bias_clipped_noisy_sum(dy, s, noise_std, seed, offset),
    )


@register_layer_rule(nn.Linear)
class LinearRule:
    """``nn.Linear``: weight (:func:`linear_sq_norms`) and bias (:func:`bias_sq_norms`)."""

    @staticmethod
    def sq_norms(module: nn.Linear, x, dy):
        out = {}
        if _trainable(module, "weight"):
            out["weight"] = linear_sq_norms(x, dy)
        if _trainable(module, "bias"):
            out["bias"] = bias_sq_norms(dy)
        rounding.remember_sq_norms(module, (x, dy), out)
        return out

    @staticmethod
    def clipped_noisy_sums(module: nn.Linear, x, dy, scale, noise_std, seed, offsets):
        # Examples whose float32 rounding could exceed R C are summed apart
        # (rmt_kernels/rounding.py).
        op = "linear_clipped_noisy_sum"
        guard = rounding.ReleaseGuard(
            op, module, (x, dy), scale, lambda: LinearRule.sq_norms(module, x, dy)
        )
        out = {}
        if _trainable(module, "weight"):
            out["weight"] = guard.release(
                "weight",
                rounding.LinearTerms(x, dy),
                lambda s: linear_clipped_noisy_sum(x, dy, s, noise_std, seed, offsets["weight"]),
            )
        if _trainable(module, "bias"):
            out["bias"] = _release_bias(guard, dy, noise_std, seed, offsets["bias"])
        return out


@register_layer_rule(nn.Embedding)
class EmbeddingRule:
    """``nn.Embedding``: weight (:func:`embedding_sq_norms`); the padding row gets no gradient."""

    @staticmethod
    def sq_norms(module: nn.Embedding, ids, dy):
        _check_embedding_module(module)
        if not _trainable(module, "weight"):
            return {}
        out = {"weight": embedding_sq_norms(ids, _embedding_grad_output(module, ids, dy))}
        rounding.remember_sq_norms(module, (ids, dy), out)
        return out

    @staticmethod
    def clipped_noisy_sums(module: nn.Embedding, ids, dy, scale, noise_std, seed, offsets):
        _check_embedding_module(module)
        if not _trainable(module, "weight"):
            return {}
        op = "embedding_clipped_noisy_sum"
        guard = rounding.ReleaseGuard(
            op, module, (ids, dy), scale, lambda: EmbeddingRule.sq_norms(module, ids, dy)
        )
        dy = _embedding_grad_output(module, ids, dy)
        return {
            "weight": guard.release(
                "weight",
                rounding.EmbeddingTerms(ids, dy),
                lambda s: embedding_clipped_noisy_sum(
                    ids, dy, s, module.num_embeddings, noise_std, seed, offsets["weight"]
                ),
            )
        }


@register_layer_rule(nn.LayerNorm)
class LayerNormRule:
    """``nn.LayerNorm``: weight (:func:`layernorm_sq_norms`) and bias (:func:`bias_sq_norms`)."""

    @staticmethod
    def sq_norms(module: nn.LayerNorm, x, dy):
        _check_layernorm_module(module)
        out = {}
        if _trainable(module, "weight"):
            out["weight"] = layernorm_sq_norms(x, dy, module.eps)
        if _trainable(module, "bias"):
            out["bias"] = bias_sq_norms(dy)
        rounding.remember_sq_norms(module, (x, dy), out)
        return out

    @staticmethod
    def clipped_noisy_sums(module: nn.LayerNorm, x, dy, scale, noise_std, seed, offsets):
        _check_layernorm_module(module)
        op = "layernorm_clipped_noisy_sum"
        guard = rounding.ReleaseGuard(
            op, module, (x, dy), scale, lambda: LayerNormRule.sq_norms(module, x, dy)
        )
        out = {}
        if _trainable(module, "weight"):
            out["weight"] = guard.release(
                "weight",
                rounding.LayerNormTerms(x, dy, module.eps),
                lambda s: layernorm_clipped_noisy_sum(
                    x, dy, s, module.eps, noise_std, seed, offsets["weight"]
                ),
            )
        if _trainable(module, "bias"):
            out["bias"] = _release_bias(guard, dy, noise_std, seed, offsets["bias"])
        return out
