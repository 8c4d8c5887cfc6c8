"""The registry of layer rules: which rule turns a module type's (input, output gradient) into
per-example norms and noisy clipped sums.

Rules are matched by exact module type, as Opacus matches its grad samplers: a subclass may
change ``forward`` and with it the gradient, so it needs a rule of its own. A module with
trainable parameters and no rule is an error wherever a rule is looked up, never skipped.

A class of an optional library (``transformers``) is registered by its import path, a string
``"<module>.<qualname>"`` such as ``"transformers.pytorch_utils.Conv1D"``, so that registering
it imports nothing. On lookup, a module's type matches such a rule only if its own
``__module__`` and ``__qualname__`` spell that path AND the path, resolved in the already
imported module (``sys.modules``, never importing), is that very class: a subclass, a class of
the same name elsewhere, or one whose ``__module__`` was set to imitate the path gets no rule.
A rule registered by type takes precedence over one registered by path.
"""

from __future__ import annotations

import sys
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
    "import_path",
    "imported_named_rules",
    "register_layer_rule",
    "registered_layer_rules",
    "registered_named_layer_rules",
    "rule_of_type",
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
# Rules of classes named by import path ("<module>.<qualname>"), resolved on lookup.
_NAMED_RULES: dict[str, LayerRule] = {}

RuleClass = TypeVar("RuleClass", bound=type)
ModuleType = type[nn.Module] | str
ModuleTypes = ModuleType | tuple[ModuleType, ...]


def import_path(module_type: type) -> str:
    """``"<module>.<qualname>"`` of a class, the key of a rule registered by import path."""
    return f"{module_type.__module__}.{module_type.__qualname__}"


def _is_import_path(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and all(part.isidentifier() for part in parts)


def _module_types(module_types: ModuleTypes) -> tuple[ModuleType, ...]:
    types = module_types if isinstance(module_types, tuple) else (module_types,)
    for t in types:
        if isinstance(t, str):
            if not _is_import_path(t):
                raise TypeError(
                    "register_layer_rule: a class named by import path must read "
                    f"'<module>.<qualname>' (e.g. 'transformers.pytorch_utils.Conv1D'), got {t!r}"
                )
        elif not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise TypeError(
                "register_layer_rule: module_types must be an nn.Module subclass, an import path "
                f"'<module>.<qualname>', or a tuple of them, got {t!r}"
            )
    if not types:
        raise TypeError("register_layer_rule: module_types is an empty tuple")
    return types


def _store(types: tuple[ModuleType, ...], rule: LayerRule) -> None:
    for t in types:
        if isinstance(t, str):
            _NAMED_RULES[t] = rule
        else:
            _RULES[t] = rule


def _resolve_imported(module_type: type) -> type | None:
    """The class that ``module_type``'s import path names in the modules imported so far
    (None if its module is not imported or the path leads nowhere); nothing is imported."""
    target: object = sys.modules.get(module_type.__module__)
    for part in module_type.__qualname__.split("."):
        if target is None or part == "<locals>":
            return None
        target = getattr(target, part, None)
    return target if isinstance(target, type) else None


def rule_of_type(module_type: type) -> LayerRule | None:
    """The rule of exactly ``module_type`` (registered by type, else by import path), or None.

    A rule registered by import path matches only the class that path names in the imported
    module, compared by identity: never a subclass, a namesake or an imitation (module
    docstring).
    """
    rule = _RULES.get(module_type)
    if rule is not None or not _NAMED_RULES:
        return rule
    named = _NAMED_RULES.get(import_path(module_type))
    if named is not None and _resolve_imported(module_type) is module_type:
        return named
    return None


def register_layer_rule(
    module_types: ModuleTypes, rule: LayerRule | None = None
) -> Callable[[RuleClass], RuleClass] | None:
    """Register (or replace) the rule of one module type or of several (a tuple), matched exactly.

    ``register_layer_rule(MyLayer, LayerRule(sq_norms, clipped_noisy_sums))`` registers a rule;
    ``@register_layer_rule(MyLayer)`` (or ``@register_layer_rule((MyLayer, MyOtherLayer))``) on a
    class turns it into a rule with :meth:`LayerRule.from_class` and returns the class unchanged.
    A module type may also be given by import path, ``"<module>.<qualname>"`` (e.g.
    ``"transformers.pytorch_utils.Conv1D"``): nothing is imported, and on lookup the rule
    matches exactly the class that path names once its module is imported (module docstring).

    Args:
        module_types: an ``nn.Module`` subclass, an import path, or a tuple of them.
        rule: the rule; None to use the call as a class decorator.

    Returns:
        None, or the decorator when ``rule`` is None.

    Raises:
        TypeError: ``module_types`` is not an ``nn.Module`` subclass, an import path or a tuple
            of them, or ``rule`` is not a :class:`LayerRule`.
    """
    types = _module_types(module_types)
    if rule is not None:
        if not isinstance(rule, LayerRule):
            raise TypeError(
                f"register_layer_rule: rule must be a LayerRule, got {type(rule).__name__}"
            )
        _store(types, rule)
        return None

    def decorate(rule_class: RuleClass) -> RuleClass:
        _store(types, LayerRule.from_class(rule_class))
        return rule_class

    return decorate


def imported_named_rules() -> dict[type[nn.Module], LayerRule]:
    """The rules registered by import path whose class is imported now, by class (a rule whose
    library is not imported names no class yet; nothing is imported here)."""
    out = {}
    for path, rule in _NAMED_RULES.items():
        module_name, _, qualname = path.rpartition(".")
        # A nested qualname ("Outer.Inner") splits further up: try each split point.
        while module_name:
            resolved: object = sys.modules.get(module_name)
            for part in qualname.split("."):
                resolved = getattr(resolved, part, None)
            if isinstance(resolved, type) and rule_of_type(resolved) is rule:
                out[resolved] = rule
                break
            module_name, _, head = module_name.rpartition(".")
            qualname = f"{head}.{qualname}"
    return out


def get_layer_rule(module: nn.Module) -> LayerRule:
    """The rule of ``module``'s exact type; a module without one is an error, never skipped."""
    rule = rule_of_type(type(module))
    if rule is None:
        raise TypeError(
            f"no DP layer rule for {type(module).__name__}; register one with "
            "rmt_kernels.register_layer_rule"
        )
    return rule


def registered_layer_rules() -> Mapping[type[nn.Module], LayerRule]:
    """A read-only live view of every rule registered by module type."""
    return MappingProxyType(_RULES)


def registered_named_layer_rules() -> Mapping[str, LayerRule]:
    """A read-only live view of every rule registered by import path ("<module>.<qualname>")."""
    return MappingProxyType(_NAMED_RULES)
