"""Layer rules: how a module type's parameters get per-example norms and noisy clipped sums.

One file per layer type (linear.py, embedding.py, layernorm.py; bias.py for the bias both Linear
and LayerNorm carry) holds the rule, its module check and its parameters' certified release
terms; registry.py matches rules to module types; release_guard.py keeps float32 rounding from
amplifying a crafted example. Adding a layer type is one new file here (plus its kernels in
rmt_kernels/ops.py), imported below; the native engine (rmt_kernels.dp) and the Opacus
drop-in's ghost clipping (rmt_kernels.opacus.ghost) both look the rule up in the registry.

A custom layer registers its own rule with :func:`register_layer_rule` and may certify its
release with :class:`ReleaseGuard` (its docstring has a complete example).
"""

from rmt_kernels.rules import embedding, layernorm, linear  # noqa: F401  (register the rules)
from rmt_kernels.rules.registry import (
    LayerRule,
    get_layer_rule,
    register_layer_rule,
    registered_layer_rules,
)
from rmt_kernels.rules.release_guard import ReleaseGuard, ReleaseTerms

__all__ = [
    "LayerRule",
    "ReleaseGuard",
    "ReleaseTerms",
    "get_layer_rule",
    "register_layer_rule",
    "registered_layer_rules",
]
