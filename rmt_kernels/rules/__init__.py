"""Layer rules: how a module type's parameters get per-example norms and noisy clipped sums.

One file per layer type (linear.py, embedding.py, layernorm.py; conv1d.py for GPT-2's Conv1D,
rmsnorm.py for torch's and the Hugging Face RMSNorms; bias.py for the bias Linear, Conv1D and
LayerNorm carry) holds the rule, its module check and its parameters' certified release terms;
registry.py matches rules to module types (or, for an optional library's classes, to import
paths resolved on lookup, so that ``transformers`` is never imported here); release_guard.py
keeps float32 rounding from amplifying a crafted example; tied_embedding.py holds the rule of an
Embedding whose weight is also a Linear head's (not registered: the engine pairs the two modules
itself, rmt_kernels/dp/tied_units.py). Adding a layer type is one new file here (plus its
kernels in rmt_kernels/ops.py), imported below; the native engine (rmt_kernels.dp) and the
Opacus drop-in's ghost clipping (rmt_kernels.opacus.ghost) both look the rule up in the
registry.

A custom layer registers its own rule with :func:`register_layer_rule` and may certify its
release with :class:`ReleaseGuard` (its docstring has a complete example).
"""

# Importing each rule's file registers it (conv1d and rmsnorm: the decoder layers, issue 27).
from rmt_kernels.rules import conv1d, embedding, layernorm, linear, rmsnorm  # noqa: F401
from rmt_kernels.rules.registry import (
    LayerRule,
    get_layer_rule,
    register_layer_rule,
    registered_layer_rules,
    registered_named_layer_rules,
)
from rmt_kernels.rules.release_guard import ReleaseGuard, ReleaseTerms

__all__ = [
    "LayerRule",
    "ReleaseGuard",
    "ReleaseTerms",
    "get_layer_rule",
    "register_layer_rule",
    "registered_layer_rules",
    "registered_named_layer_rules",
]
