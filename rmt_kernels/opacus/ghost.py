"""Certified ghost clipping for the Opacus drop-in (privacy invariant 6, PRIVACY.md).

Opacus's ghost clipping (``grad_sample_mode="ghost"``) computes each example's gradient norm
without the gradient: for ``nn.Linear`` the Gram formula ``sum_{t,s} (x_t . x_s)(dy_t . dy_s)``
in float32, clamped at 0. Cancelling inputs (x = [u, -u + 10 w], |u| = 3e4, equal output
gradients) make it return 0 for a gradient of norm 10 |dy| |w|: the example gets clip factor 1
and moves the released sum by far more than C. Its embedding norms (index_add in float32 over
repeated ids with cancelling dy rows) and the explicit per-example gradients it uses for
``nn.LayerNorm`` (a float32 sum over tokens) fail the same way.

Here the module wrapper's norm sampler calls the layer's registered rule (rmt_kernels/rules/,
the rules the native engine clips with: one implementation of each layer's norm), whose
``sq_norms`` use rmt_kernels' certified ops (``linear_sq_norms``, ``bias_sq_norms``,
``embedding_sq_norms``, ``layernorm_sq_norms``), each an upper bound of the exact squared norm of
the gradient of the layer's inputs and output gradients (their docstrings give the bound and its
proof), and the clip factors come from :func:`rmt_kernels.clip_scales`
(float64 sum of the per-parameter bounds, rounded down; NaN, infinite or negative gives 0).

Where. Opacus looks norm samplers up as ``self.NORM_SAMPLERS[type(module)]``, a class attribute
that ``register_norm_sampler`` fills globally on ``GradSampleHooksFastGradientClipping``. Our
subclasses shadow it with their own read-only table, so plain Opacus (``opacus.PrivacyEngine``)
keeps its behaviour, and a norm sampler someone registers with Opacus never reaches our wrapper.
``get_norm_sample`` and ``get_clipping_coef``, which Opacus's ghost loss calls between its two
backward passes, are overridden for the certified combination.

Mapping Opacus's conventions to the ops. The hooks hand a norm sampler ``(activations,
backprops)`` with the batch dimension first (``batch_first=False`` is permuted by Opacus) and,
for ``loss_reduction="mean"``, the backprops already multiplied by the batch size (the first
backward pass is of the mean loss; the second is of ``sum_b c_b loss_b``), i.e. the output
gradients of each example's own loss, which is what the clip factor ``c_b`` then scales. Every
dimension between the batch and the features is a position of the same example (tokens, image
rows...), so both are flattened to (B, T, d) for the ops.

Refused (NotImplementedError naming the modules): a trainable module whose exact type has no
registered rule with ``flat_positions`` (built in: ``nn.Linear``, ``nn.Embedding``,
``nn.LayerNorm``, ``nn.RMSNorm``, GPT-2's ``Conv1D`` and the Hugging Face RMSNorms of
rmt_kernels/rules/rmsnorm.py; Opacus's fallback computes explicit per-example gradients with an
uncertified float32 norm, while the released gradient comes from a second backward pass: a
cancelling input gets a norm that is not its gradient's), a module option its rule's
``check_module`` refuses (the native engine's ``make_private`` refuses the same:
``nn.Embedding`` with ``scale_grad_by_freq``, whose gradient depends on the other examples,
``max_norm`` or ``sparse``; ``nn.LayerNorm`` over several dimensions), a parameter held by
several modules (tied embeddings: Opacus keeps the last module's norm for it, which ignores the
other use and the cross term; hooks mode sums the two uses' per-example gradients before taking
the norm and is exact there), and ``use_ghost_clipping=False``. Embedding rows at
``padding_idx`` are left out of the bound (autograd gives them no gradient); Opacus counts them,
which after a LayerNorm (whose output gradient at a zero padding row is ~1/sqrt(eps) large)
overstates norms several-fold and over-clips. ``grad_sample_mode="hooks"`` accepts every module
Opacus does and is sound (see :mod:`rmt_kernels.opacus.privacy_engine`).

What the bound does not cover: the float32 computation of the released sum. The second backward
pass recomputes every output gradient with the factor ``c_b`` folded in (not a power of two, so
it is rounded differently from the first pass the norms saw) and sums the B*T rows in float32, so
the released contribution of an example equals ``c_b`` times its certified gradient only up to
rounding of order ``2^-24 c_b sum_t |dy_t| |x_t|`` for this layer (and of order ``2^-24`` times
the size of the cancelling terms anywhere upstream in the backward pass), part of which lands on
the other examples' contributions (absorption). On the issue's input (|u| = 3e4) the example moves
the released sum by C (1 + 3e-5); with embedding or LayerNorm rows [2^30, 40, -2^30] (a
cancellation beyond float32's 2^-24, the only kind that fools Opacus there) the rounding alone
moves it by 0.1-0.6 C. The native engine's fused sums round the same way.
An example with a non-finite loss gets factor 0 but still makes the second pass NaN (0 * inf),
as in Opacus.

Written against opacus==1.6.0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from opacus.grad_sample import (
    GradSampleHooksFastGradientClipping,
    GradSampleModuleFastGradientClipping,
)
from opacus.utils.module_utils import trainable_modules
from torch import nn

from rmt_kernels import ops
from rmt_kernels.rules import get_layer_rule, registered_layer_rules
from rmt_kernels.rules.registry import imported_named_rules, rule_of_type

__all__ = [
    "CERTIFIED_NORM_SAMPLERS",
    "CertifiedGradSampleHooksFastGradientClipping",
    "CertifiedGradSampleModuleFastGradientClipping",
    "certified_norm_sample",
]

# Opacus's norm sampler signature: (module, activations, backprops) -> {param: (B,) norms}.
NormSampler = Callable[
    [nn.Module, list[torch.Tensor], torch.Tensor], dict[nn.Parameter, torch.Tensor]
]


def _sqrt_up(sq: torch.Tensor) -> torch.Tensor:
    """float32 ``r >= sqrt(sq)`` (NaN -> +inf), at most 2 ulps above.

    Opacus stores per-parameter norms, not squares; ``clip_scales`` needs squares again. The
    float64 square of a float32 value is exact (24 + 24 bits < 53, and float32's range squared
    stays normal in float64), so ``r.double() ** 2 >= sq`` is an exact test, and the squares
    recovered in :meth:`_CertifiedGhostMixin.get_clipping_coef` are still upper bounds.
    """
    q = torch.where(torch.isnan(sq), math.inf, sq.double())
    r = q.sqrt().float()
    inf = torch.full_like(r, math.inf)
    for _ in range(2):  # the float64 root rounded to float32 is within one ulp of the true root
        r = torch.where(r.double().square() < q, torch.nextafter(r, inf), r)
    return r


def _positions(t: torch.Tensor, what: str, module: nn.Module) -> torch.Tensor:
    """(B, ..., d) features -> (B, T, d), (B, ...) ids -> (B, T): the middle dimensions are
    positions of the same example (the rule's ``flat_positions`` promise)."""
    if t.is_floating_point():
        if t.dim() < 2:
            raise ValueError(
                f"certified ghost clipping: {type(module).__name__} {what} must be (B, ..., d) "
                f"with the example first, got shape {list(t.shape)}"
            )
        return t.reshape(t.shape[0], -1, t.shape[-1])
    if t.dim() < 1:
        raise ValueError(
            f"certified ghost clipping: {type(module).__name__} {what} must be (B, ...) with the "
            f"example first, got shape {list(t.shape)}"
        )
    return t.reshape(t.shape[0], -1)


def _empty(batch: int, like: torch.Tensor) -> torch.Tensor:
    """Norms of a batch with nothing in it (Poisson sampling may draw an empty batch; an
    example may have no position): zero, which the ops would reject as an empty input."""
    return like.new_zeros(batch, dtype=torch.float32)


def certified_norm_sample(
    module: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-example gradient norms of ``module``'s trainable parameters, certified upper bounds.

    The norm sampler of every module type whose registered layer rule has ``flat_positions``:
    the input and output gradient flattened to (B, T, d) (ids to (B, T)), then the rule's own
    ``sq_norms`` (rmt_kernels/rules/), the same certified bounds the native engine clips with.
    Returns ``{param: (B,) float32 norm bound}`` as Opacus's norm samplers do. Replaces Opacus's
    float32 Gram sums for ``nn.Linear`` (clamped at 0), its float32 ``index_add`` for
    ``nn.Embedding`` (which also counts the padding row autograd gives no gradient) and its
    explicit per-example gradients for ``nn.LayerNorm``.
    """
    rule = get_layer_rule(module)
    x = _positions(activations[0], "input", module)
    dy = _positions(backprops, "output gradient", module)
    if x.shape[:2] != dy.shape[:2]:
        raise ValueError(
            f"certified ghost clipping: {type(module).__name__} input {list(activations[0].shape)} "
            f"and output gradient {list(backprops.shape)} do not have the same examples and "
            "positions"
        )
    if x.numel() == 0 or dy.numel() == 0:
        trainable = [p for p in module.parameters(recurse=False) if p.requires_grad]
        return {p: _sqrt_up(_empty(dy.shape[0], dy)) for p in trainable}
    sq = rule.sq_norms(module, x, dy)
    return {module.get_parameter(name): _sqrt_up(bound) for name, bound in sq.items()}


class _RegisteredNormSamplers(Mapping[type[nn.Module], NormSampler]):
    """Opacus's norm-sampler table read from the layer-rule registry: a module type whose
    registered rule takes flattened positions maps to :func:`certified_norm_sample`. Exact
    types, as Opacus matches them (a subclass may change forward, and with it the gradient);
    read-only, so Opacus's ``register_norm_sampler`` cannot reach it."""

    def __getitem__(self, module_type: type[nn.Module]) -> NormSampler:
        # rule_of_type: registered by type, or by import path (GPT-2's Conv1D, the Hugging
        # Face RMSNorms) resolved to exactly that class.
        rule = rule_of_type(module_type)
        if rule is None or not rule.flat_positions:
            raise KeyError(module_type)
        return certified_norm_sample

    def __iter__(self) -> Iterator[type[nn.Module]]:
        # The classes registered by import path count once their library is imported.
        rules = {**imported_named_rules(), **registered_layer_rules()}
        return iter([t for t, rule in rules.items() if rule.flat_positions])

    def __len__(self) -> int:
        return sum(1 for _ in self)


CERTIFIED_NORM_SAMPLERS: Mapping[type[nn.Module], NormSampler] = _RegisteredNormSamplers()


def check_certifiable(module: nn.Module, *, use_ghost_clipping: bool = True) -> None:
    """Raise NotImplementedError unless every trainable module's norms can be certified.

    Called before Opacus attaches any hook, so a refused model is left untouched.
    """
    if not use_ghost_clipping:
        raise NotImplementedError(
            "certified ghost clipping: use_ghost_clipping=False (fast gradient clipping) bounds "
            "no norm; use grad_sample_mode='hooks' instead"
        )
    uncovered = []
    # A parameter held by several modules (tied embeddings): Opacus's ghost hooks keep one norm
    # per parameter, the last module's (``param._norm_sample = ns``), so the clip would ignore
    # the other use and the cross term between the two (the native engine's tied rule has it).
    holders: dict[int, list[str]] = {}
    for name, m in trainable_modules(module):
        for pname, p in m.named_parameters(recurse=False):
            if p.requires_grad:
                holders.setdefault(id(p), []).append(f"{name or '<root>'}.{pname}")
    for names in holders.values():
        if len(names) > 1:
            uncovered.append(
                f"{' and '.join(names)} (one parameter used by {len(names)} modules: tied "
                "weights, whose norm needs the sum of both uses)"
            )
    for name, m in trainable_modules(module):
        if type(m) not in CERTIFIED_NORM_SAMPLERS:
            uncovered.append(f"{name or '<root>'} ({type(m).__name__})")
            continue
        try:
            # The same module check as the native engine's make_private: one answer for both.
            get_layer_rule(m).check_module(m)
        except ValueError as err:
            uncovered.append(f"{name or '<root>'} ({type(m).__name__}: {err})")
    if uncovered:
        raise NotImplementedError(
            "DenoisingPrivacyEngine, grad_sample_mode='ghost': the per-example gradient norms of "
            f"{', '.join(uncovered)} cannot be certified (privacy invariant 6, PRIVACY.md: a "
            "crafted input could contribute more than max_grad_norm). Certified: exactly "
            f"{', '.join(sorted(t.__name__ for t in CERTIFIED_NORM_SAMPLERS))}, without the "
            "options their rules refuse. Freeze those modules, or use grad_sample_mode='hooks' "
            "(explicit per-example gradients, clipped by their own norms), or the native engine "
            "rmt_kernels.dp.make_private"
        )


class _CertifiedGhostMixin:
    """Certified norm samplers and clip factors for Opacus's ghost-clipping hooks; see the
    module docstring. Must come before the Opacus class in the bases."""

    # Shadows Opacus's global registry for instances of our classes only.
    NORM_SAMPLERS = CERTIFIED_NORM_SAMPLERS

    # Set by Opacus's __init__; declared for type checkers.
    trainable_parameters: list[nn.Parameter]
    max_grad_norm: Any
    _module: nn.Module

    def _certified_sq_norms(self) -> list[torch.Tensor]:
        """Per-parameter squared norm bounds (float64, exact squares of the stored float32
        bounds), after checking that every parameter now trainable was bounded."""
        known = {id(p) for p in self.trainable_parameters}
        named = list(self._module.named_parameters())
        late = [n for n, p in named if p.requires_grad and id(p) not in known]
        if late:
            # Opacus fixes its parameter list when it wraps the model; a parameter unfrozen since
            # would get its gradient from the second backward pass with a clip factor that
            # ignores it (privacy invariant 8, PRIVACY.md).
            raise RuntimeError(
                "certified ghost clipping: parameter(s) "
                f"{', '.join(late)} became trainable after make_private; their norms are not "
                "bounded. Unfreeze before make_private, or call make_private again"
            )
        if not any(p.requires_grad for _, p in named):
            raise RuntimeError("certified ghost clipping: the model has no trainable parameter")
        norms = []
        for p in self.trainable_parameters:
            if not p.requires_grad:
                continue  # frozen since make_private: it gets no gradient
            ns = getattr(p, "_norm_sample", None)
            if ns is None:
                raise RuntimeError(
                    "certified ghost clipping: a trainable parameter has no per-example norm "
                    "(was it used outside the wrapped module's forward?)"
                )
            norms.append(ns)
        device = norms[0].device
        sq = [n.detach().to(device).double().square() for n in norms]
        sizes = {s.shape for s in sq}
        if len(sizes) != 1 or len(next(iter(sizes))) != 1:
            raise ValueError(
                "certified ghost clipping: the layers saw different batch sizes "
                f"({sorted(set(map(tuple, sizes)))}); every layer's first dimension must be the "
                "example (batch_first)"
            )
        return sq

    def get_norm_sample(self) -> torch.Tensor:
        """Per-example gradient norms over all parameters: float32 upper bounds (rounded up)."""
        sq = self._certified_sq_norms()
        total = sq[0]
        for s in sq[1:]:
            total = total + s
        # n float64 additions and this product each round by at most 2^-53 relative: a margin
        # of (n + 2) 2^-52 keeps the total above the exact sum of the bounds.
        norm = _sqrt_up(total * (1.0 + (len(sq) + 2) * 2.0**-52))
        self.per_sample_gradient_norms = norm  # type: ignore[attr-defined]
        return norm

    def get_clipping_coef(self) -> torch.Tensor:
        """Clip factors ``min(1, C / bound)`` from :func:`rmt_kernels.clip_scales`: float32,
        rounded down, 0 for a NaN/infinite/negative bound (Opacus's ``C / (norm + 1e-6)`` on a
        float32 total could round above ``C / norm`` and passes NaN through)."""
        sq = self._certified_sq_norms()
        max_grad_norm = self.max_grad_norm
        if isinstance(max_grad_norm, torch.Tensor):
            max_grad_norm = float(max_grad_norm)
        scale = ops.clip_scales(sq, max_grad_norm)
        self.get_norm_sample()  # keeps Opacus's per_sample_gradient_norms up to date
        return scale


class CertifiedGradSampleModuleFastGradientClipping(
    _CertifiedGhostMixin, GradSampleModuleFastGradientClipping
):
    """Opacus's ghost-clipping module wrapper with certified per-example norms (privacy
    invariant 6, PRIVACY.md).

    Same constructor as :class:`opacus.grad_sample.GradSampleModuleFastGradientClipping`.

    Raises:
        NotImplementedError: a trainable module whose norms cannot be certified (see
            :func:`check_certifiable`), before any hook is attached.
    """

    def __init__(self, m: nn.Module, **kwargs: Any) -> None:
        check_certifiable(m, use_ghost_clipping=kwargs.get("use_ghost_clipping", True))
        super().__init__(m, **kwargs)


class CertifiedGradSampleHooksFastGradientClipping(
    _CertifiedGhostMixin, GradSampleHooksFastGradientClipping
):
    """The hooks-only form (``make_private(..., wrap_model=False)``) of
    :class:`CertifiedGradSampleModuleFastGradientClipping`."""

    def __init__(self, m: nn.Module, **kwargs: Any) -> None:
        check_certifiable(m, use_ghost_clipping=kwargs.get("use_ghost_clipping", True))
        super().__init__(m, **kwargs)
