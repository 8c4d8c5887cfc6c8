"""The registry of layer rules: which rule turns a module type's (input, output gradient) into
per-example norms and noisy clipped sums.

Rules are matched by exact module type, as Opacus matches its grad samplers: a subclass may
change ``forward`` and with it the gradient, so it needs a rule of its own. A module with
trainable parameters and no rule is an error wherever a rule is looked up, never skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeVar

import torch
from torch import nn

__all__ = [
    "LayerRule",
    "get_layer_rule",
    "has_trainable",
    "register_layer_rule",
    "registered_layer_rules",
]


# What a rule returns: a tensor per parameter name (squared-norm bounds, or clipped sums).
Sums = dict[str, torch.Tensor]


def accept_every_module(module: nn.Module) -> None:
    """The module check of a rule that follows every option of its module type."""


@dataclass(frozen=True)
class LayerRule:
    """The DP book-keeping of one module type.

    Attributes:
        sq_norms: ``sq_norms(module, input, grad_output)`` returns ``{param_name: (B,) certified
            upper bound of each example's squared gradient norm}``.
        clipped_noisy_sums: ``clipped_noisy_sums(module, input, grad_output, scale, noise_std,
            seed, offsets)`` returns ``{param_name: sum_b scale_b g_b + noise}``, with
            ``offsets[param_name]`` the noise counter offset of each parameter. To keep float32
            rounding from amplifying a crafted example, release through
            :class:`rmt_kernels.rules.ReleaseGuard`.
        check_module: raises ValueError for a module option the rule cannot follow (called at
            ``make_private`` and by the Opacus drop-in before any hook; the built-in rules also
            call it themselves).
        flat_positions: True when every dimension of the input between the batch and the
            features is a position of the same example (tokens, image rows), so the rule's
            norms of the input flattened to (B, T, d) (ids to (B, T)) are the layer's. The
            Opacus drop-in's ghost clipping, which sees such inputs, certifies only these rules.

    Every trainable parameter of the module must appear in both results: DP-SGD noises them all.
    """

    sq_norms: Callable[..., dict[str, torch.Tensor]]
    clipped_noisy_sums: Callable[..., dict[str, torch.Tensor]]
    check_module: Callable[[nn.Module], None] = accept_every_module
    flat_positions: bool = False

    @classmethod
    def from_class(cls, rule_class: type) -> LayerRule:
        """The rule of a class with static methods ``sq_norms`` and ``clipped_noisy_sums`` and,
        optionally, a static ``check_module`` and a class attribute ``flat_positions``."""
        missing = [n for n in ("sq_norms", "clipped_noisy_sums") if not hasattr(rule_class, n)]
        if missing:
            raise TypeError(
                f"register_layer_rule: {rule_class.__name__} has no {' or '.join(missing)}"
            )
        return cls(
            rule_class.sq_norms,
            rule_class.clipped_noisy_sums,
            getattr(rule_class, "check_module", accept_every_module),
            bool(getattr(rule_class, "flat_positions", False)),
        )


def has_trainable(module: nn.Module, name: str) -> bool:
    """Whether ``module.<name>`` is a parameter that requires a gradient (None, a buffer or a
    frozen parameter get no private gradient)."""
    p = getattr(module, name, None)
    return isinstance(p, nn.Parameter) and p.requires_grad


_RULES: dict[type[nn.Module], LayerRule] = {}

RuleClass = TypeVar("RuleClass", bound=type)
ModuleTypes = type[nn.Module] | tuple[type[nn.Module], ...]


def _module_types(module_types: ModuleTypes) -> tuple[type[nn.Module], ...]:
    types = module_types if isinstance(module_types, tuple) else (module_types,)
    for t in types:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise TypeError(
                "register_layer_rule: module_types must be an nn.Module subclass or a tuple of "
                f"them, got {t!r}"
            )
    if not types:
        raise TypeError("register_layer_rule: module_types is an empty tuple")
    return types


def register_layer_rule(
    module_types: ModuleTypes, rule: LayerRule | None = None
) -> Callable[[RuleClass], RuleClass] | None:
    """Register (or replace) the rule of one module type or of several (a tuple), matched exactly.

    ``register_layer_rule(MyLayer, LayerRule(sq_norms, clipped_noisy_sums))`` registers a rule;
    ``@register_layer_rule(MyLayer)`` (or ``@register_layer_rule((MyLayer, MyOtherLayer))``) on a
    class turns it into a rule with :meth:`LayerRule.from_class` and returns the class unchanged.

    Raises:
        TypeError: ``module_types`` is not an ``nn.Module`` subclass or a tuple of them, or
            ``rule`` is not a :class:`LayerRule`.
    """
    types = _module_types(module_types)
    if rule is not None:
        if not isinstance(rule, LayerRule):
            raise TypeError(
                f"register_layer_rule: rule must be a LayerRule, got {type(rule).__name__}"
            )
        for t in types:
            _RULES[t] = rule
        return None

    def decorate(rule_class: RuleClass) -> RuleClass:
        built = LayerRule.from_class(rule_class)
        for t in types:
            _RULES[t] = built
        return rule_class

    return decorate


def get_layer_rule(module: nn.Module) -> LayerRule:
    """The rule of ``module``'s exact type; a module without one is an error, never skipped."""
    rule = _RULES.get(type(module))
    if rule is None:
        raise TypeError(
            f"no DP layer rule for {type(module).__name__}; register one with "
            "rmt_kernels.register_layer_rule"
        )
    return rule


def registered_layer_rules() -> Mapping[type[nn.Module], LayerRule]:
    """A read-only live view of every registered rule, by module type."""
    return MappingProxyType(_RULES)
