"""ReleaseGuard: no example can amplify the float32 rounding of the released clipped sum
(privacy invariant 6, PRIVACY.md).

The problem. Each layer rule releases ``sum_b scale_b g_b`` (+ noise) from one float32 pass over
the B*T token rows, ``g_b = sum_t dy_bt x_bt^T`` (Linear weight; bias, Embedding and LayerNorm
alike). The certified norm bound makes ``||scale_b g_b|| <= C'`` exact (``C'`` the clip
threshold, divided by the expected batch size in the engine), but the float32 pass rounds example
b's terms, not its sum: its error is about ``u32 * scale_b * S_b`` with
``S_b = sum_t |dy_bt| |x_bt|`` (u32 = 2^-24), and an example whose tokens cancel (rows
``[2^30 w, a, -2^30 w]``, or ``x = [u, -u + v]`` with ``|u| >> |v|``) has ``S_b >> ||g_b||``.
The certified bound caps ``scale_b S_b / C'`` near ``1 / sqrt(T u64)`` (~2^25), so such an
example moved the released sum by ``C'`` plus up to ~0.6 ``C'`` of pure rounding, at the
adversary's choice.

The guard. Per parameter p and example b, the *spread* ``S^p_b`` is an upper bound of what the
float32 pass rounds for that example (Linear weight ``sum_t |x_t||dy_t|``; bias and Embedding
``sum_t |dy_t|``; LayerNorm weight ``sum_t (|dy_t * (x_t - mean_t)| + |dy_t| rms(x_t)) / sqrt(var_t
+ eps)``, which also covers the float32 error of ``xhat`` itself; each layer type's file in
rmt_kernels/rules/ holds its parameters' :class:`ReleaseTerms`). The reference is the example's
certified norm bound over the LAYER's trainable parameters, ``ref_b = sqrt(sum_{p in layer}
N^p_b)`` (the bounds the rule's ``sq_norms`` returned for the same tensors: remembered here,
recomputed if the rule is called on its own). An example with ``scale_b > 0`` and ``S^p_b > R
ref_b`` (:data:`AMPLIFICATION_LIMIT`) is *flagged* for p: the float32 op gets clip factor 0 for it
(the ops drop zero-scaled rows exactly), and its contribution is computed alone in float64 from its
own rows, scaled by ``scale_b``, projected onto the ball of radius ``scale_b sqrt(N^p_b)`` (a no-op
up to rounding, since ``||g^p_b||^2 <= N^p_b``; it makes the bound hold whatever the float64
error), summed over the flagged examples in float64 and added to the float32 result after one cast.

Why it holds. (1) Flagging depends on example b's own rows and clip factor only, so the
mechanism stays per-example: adding example b* changes nothing about the others' path.
(2) Flagged: its released vector over all parameters has norm
``<= scale_b sqrt(sum_p N^p_b) = scale_b sqrt(q_b) <= C'`` (the clip factor's guarantee,
:func:`rmt_kernels.ops.clip_scales`), plus one float32 cast of the flagged sum and one float32
addition (``u32`` relative to the released entries). Accuracy: Embedding, bias and LayerNorm sum
the T float64 terms with compensated (TwoSum) summation, error ``<= u64 |sum| + gamma_T^2 sum
|terms|`` (Ogita, Rump, Oishi 2005), exact for the crafted cases; the Linear weight uses one
float64 GEMM per flagged example, error ``<= gamma_T S_b`` (Frobenius), which the certified
bound's own error term (``>= 2 sqrt((T + 1) u64) S_b``) turns into ``<= sqrt(T u64) / 2 C'``
(6e-8 C' at T = 128). (3) Not flagged: ``scale_b S^p_b <= R scale_b ref_b <= R C'`` for every
parameter; over all parameters (disjoint coordinates, in quadrature) the float32 rounding of
example b's own terms is ``<= sqrt(2) gamma R C'``: no input amplifies it beyond what an ordinary
example with ``S / ||g|| = R`` has.

What remains uncovered, as in every floating-point DP library (Opacus, TF Privacy): the ordinary
float32 rounding of the sum of the non-flagged terms, ``<= gamma_K sum_{b not flagged}
scale_b S_b`` entrywise-summed (K = B*T; in practice ~u32 sqrt(K) times that), which adding or
removing an example can change through the summation order of the others' terms too; the
released sum is the exact clipped sum only up to it. With and without one example, the released
sums differ by ``C'`` plus that rounding, never by an amount the example controls beyond
``gamma R C'``. Also the rounding of the clip factor's division by the expected batch size in the
engine (``u32`` relative) and of adding the noise. Timing: a flagged example costs extra float64
work (one per-example GEMM or a T-step compensated sum); the time of a step is not protected.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from rmt_kernels._checks import check_same_device, check_scale_metadata, check_scale_values

__all__ = [
    "AMPLIFICATION_LIMIT",
    "ReleaseGuard",
    "ReleaseTerms",
    "as_sequence",
    "compensated_sum",
    "remember_sq_norms",
    "row_norm_bounds",
]

# R: an example whose float32 terms exceed R times its certified gradient norm (spread over the
# layer's norm bound) is computed on its own in float64. Ordinary examples have spread / norm
# about sqrt(T) (tokens' terms add like a random walk). Measured maxima: random data at T 512,
# Linear and Embedding 23, LayerNorm 42 (40 with two +20 sigma outlier dims); tiny BERT and
# RoBERTa (hidden 128, T 128, padded, at init and after 30 Adam steps) 9.5 over every layer; no
# example flagged in any. 2^8 leaves a 6x margin at T 512 while bounding the unflagged rounding
# by ~gamma * 256 C'. (LayerNorm rows with |mean| ~ 30 sigma reach 770 at T 128 and are set
# apart: their float32 xhat is off by ~u32 30 relative per entry.)
AMPLIFICATION_LIMIT = 2.0**8
# Remembered norm bounds per module: a module called several times in one forward has one entry
# per call; beyond this many live entries the oldest is dropped (then recomputed if needed).
_MAX_ENTRIES = 16

_remembered: weakref.WeakKeyDictionary[nn.Module, list[tuple]] = weakref.WeakKeyDictionary()


def _versions(tensors: tuple[torch.Tensor, ...]) -> tuple[int, ...] | None:
    try:
        return tuple(t._version for t in tensors)
    except RuntimeError:  # inference tensors have no version counter: never remembered
        return None


def remember_sq_norms(
    module: nn.Module, inputs: tuple[torch.Tensor, ...], norms: dict[str, torch.Tensor]
) -> None:
    """Record the certified squared-norm bounds a rule's ``sq_norms`` returned for ``inputs``.

    The engine calls ``sq_norms`` and then ``clipped_noisy_sums`` on the same tensor objects;
    :class:`ReleaseGuard` reuses the bounds instead of recomputing them. Entries are keyed by the
    identity and version counter of every input tensor (weak references: nothing is kept alive),
    so a tensor changed in place or a new tensor never matches.
    """
    versions = _versions(inputs)
    if versions is None:
        return
    entries = [e for e in _remembered.get(module, []) if all(r() is not None for r in e[0])]
    entries.append((tuple(weakref.ref(t) for t in inputs), versions, dict(norms)))
    _remembered[module] = entries[-_MAX_ENTRIES:]


def _recall(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor] | None:
    versions = _versions(inputs)
    if versions is None:
        return None
    for refs, vers, norms in reversed(_remembered.get(module, [])):
        if vers == versions and all(r() is t for r, t in zip(refs, inputs, strict=True)):
            return norms
    return None


def as_sequence(t: torch.Tensor) -> torch.Tensor:
    """A (B, d) input as (B, 1, d) (ids (B,) as (B, 1)); a sequence (B, T, d) unchanged."""
    return t if t.dim() == 3 else t.unsqueeze(1)


def row_norm_bounds(a: torch.Tensor) -> torch.Tensor:
    """Upper bounds (float64) of the Euclidean norms over the last dim, from ONE float32 pass.

    A float64 norm costs a float64 copy of the activations (4-5x a float32 pass at d 3072). The
    float32 sum of d squares is off by at most ``gamma_d`` relative (any order) plus, for
    squares below float32's normal range, ``2^-150`` each: so ``sqrt((n^2 + d 2^-149)(1 +
    (d + 4) 2^-24))`` bounds the true norm even when crafted tiny entries (|x| < 2^-75) square
    to 0, which would otherwise hide a spread. Overflow gives inf (flagged).
    """
    d = a.shape[-1]
    n = _float32_row_norms(a).double()
    return ((n * n + d * 2.0**-149) * (1.0 + (d + 4) * 2.0**-24)).sqrt()


# A bf16 / fp16 batch on the CPU is converted to float32 this many bytes at a time: a float32
# copy of the whole batch costs more in freshly faulted pages than the norm itself (issue 28
# item 4: bf16 32 x 128 x 3072, 1 thread, load 5.7: 67 ms whole, 13.6 ms in 1 MiB chunks, the
# same float32 values and norms bit for bit).
_NORM_CHUNK_BYTES = 1 << 20


def _float32_row_norms(a: torch.Tensor) -> torch.Tensor:
    """``vector_norm(a, dim=-1, dtype=float32)``, a large bf16 / fp16 CPU batch in chunks."""
    d = a.shape[-1]
    small = a.numel() <= _NORM_CHUNK_BYTES  # its float32 copy is at most 4 chunks
    if a.dtype == torch.float32 or a.device.type != "cpu" or small:
        return torch.linalg.vector_norm(a, dim=-1, dtype=torch.float32)
    rows = a.detach().reshape(-1, d)  # a bound: no gradient through it
    step = max(1, _NORM_CHUNK_BYTES // (4 * d))
    buf = torch.empty(min(step, rows.shape[0]), d, dtype=torch.float32)
    out = torch.full((rows.shape[0],), float("nan"))  # a row left out would be flagged (NaN)
    for r0 in range(0, rows.shape[0], step):
        chunk = buf[: min(step, rows.shape[0] - r0)].copy_(rows[r0 : r0 + step])  # exact
        out[r0 : r0 + chunk.shape[0]] = torch.linalg.vector_norm(chunk, dim=-1)
    return out.view(a.shape[:-1])


def compensated_sum(terms: torch.Tensor, slots: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_t terms[:, t]`` (float64, (n, T, d)) per slot, by cascaded TwoSum (Sum2).

    ``slots`` (n, T) assigns token t of example i to output row ``slots[i, t]`` (Embedding:
    equal ids share a row); None sums all tokens into one row. Returns (n, T or 1, d). Error of
    each output entry ``<= u |sum| + gamma_{T-1}^2 sum |terms|`` (Ogita, Rump, Oishi 2005,
    Algorithm 4.4), for any magnitudes within float64's range.
    """
    n, T, d = terms.shape
    rows = torch.arange(n, device=terms.device)
    width = 1 if slots is None else T
    s = terms.new_zeros(n, width, d)
    c = terms.new_zeros(n, width, d)
    for t in range(T):
        j = torch.zeros(n, dtype=torch.long, device=terms.device) if slots is None else slots[:, t]
        a, b = s[rows, j], terms[:, t]
        total = a + b
        bb = total - a
        err = (a - (total - bb)) + (b - bb)  # TwoSum: a + b == total + err exactly
        s[rows, j] = total
        c[rows, j] += err
    return s + c


class ReleaseTerms(Protocol):
    """One parameter's per-example gradient terms, as :meth:`ReleaseGuard.release` reads them."""

    def spread(self) -> torch.Tensor:
        """(B,) float64 upper bound of what the float32 pass rounds for each example (e.g.
        ``sum_t |x_t| |dy_t|`` for a Linear weight; :func:`row_norm_bounds` bounds row norms
        from one float32 pass). NaN or inf flags the example."""
        ...

    def exact(self, idx: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """float64 gradients of examples ``idx``: ``(None, (n, *param.shape))``, or for a table
        updated by rows (Embedding) ``(rows (n, k), values (n, k, d))``, row ``rows[i, j]`` of
        the parameter getting ``values[i, j]``. Summed over tokens accurately
        (:func:`compensated_sum`): the flagged examples are the ones whose tokens cancel."""
        ...


class ReleaseGuard:
    """One layer rule call's release of each parameter's clipped sum (module docstring).

    A rule's ``clipped_noisy_sums`` builds one guard per call and releases each parameter
    through it: the guard hands the fused float32 op the clip factors with the examples whose
    rounding could be amplified set to 0, and adds those examples' float64 contributions,
    projected onto their certified radius. A user's own rule certifies its release the same way,
    given :class:`ReleaseTerms` for each parameter:

    Example (a layer ``y = x + shift``, whose per-example gradient is ``sum_t dy_t``):
        >>> class ShiftTerms:
        ...     def __init__(self, dy):
        ...         self.dy = as_sequence(dy)
        ...     def spread(self):
        ...         return row_norm_bounds(self.dy).sum(1)
        ...     def exact(self, idx):
        ...         return None, compensated_sum(self.dy[idx].double())[:, 0]
        >>> def sq_norms(module, x, dy):
        ...     norms = {"shift": rmt_kernels.bias_sq_norms(dy)}
        ...     remember_sq_norms(module, (x, dy), norms)
        ...     return norms
        >>> def clipped_noisy_sums(module, x, dy, scale, noise_std, seed, offsets):
        ...     bounds = lambda: sq_norms(module, x, dy)  # when none were remembered
        ...     guard = ReleaseGuard("shift", module, (x, dy), scale, bounds)
        ...     def fused(s):  # the float32 sum with clip factors s, noise included
        ...         offset = offsets["shift"]
        ...         return rmt_kernels.bias_clipped_noisy_sum(dy, s, noise_std, seed, offset)
        ...     return {"shift": guard.release("shift", ShiftTerms(dy), fused)}
        >>> rmt_kernels.register_layer_rule(Shift, LayerRule(sq_norms, clipped_noisy_sums))

    ``sq_norms`` is the rule's certified bound; recording it with :func:`remember_sq_norms` lets
    the guard reuse it instead of recomputing it. ``fused`` must give an example with clip
    factor 0 no contribution at all (the fused ops drop zero-scaled rows exactly). The test
    harness tests/test_rules.py registers this very rule and checks it like the built-in ones.

    Args:
        op: name for error messages (the rule's clipped-sum op).
        module: the layer (key of the remembered norm bounds).
        inputs: the rule's input tensors, as passed to its ``sq_norms`` (e.g. ``(x, dy)``).
        scale: (B,) clip factors, finite and >= 0.
        sq_norms: recomputes ``{param: (B,) certified squared-norm bound}`` when none was
            remembered for these inputs.

    Raises:
        ValueError / TypeError naming ``scale``: wrong shape, dtype, device or values.
    """

    def __init__(
        self,
        op: str,
        module: nn.Module,
        inputs: tuple[torch.Tensor, ...],
        scale: torch.Tensor,
        sq_norms: Callable[[], dict[str, torch.Tensor]],
    ) -> None:
        check_scale_metadata(op, scale, inputs[-1].shape[0])
        check_same_device(op, dy=inputs[-1], scale=scale)
        check_scale_values(op, scale)
        norms = _recall(module, inputs)
        if norms is None:
            norms = sq_norms()
        self.norms = {name: n.detach().double() for name, n in norms.items()}
        layer = sum(self.norms.values(), torch.zeros_like(scale, dtype=torch.float64))
        self.reference = layer.sqrt()
        self.scale = scale

    def flagged(self, name: str, terms: ReleaseTerms) -> torch.Tensor:
        """(B,) bool: examples whose float32 rounding in parameter ``name`` would exceed R times
        their clipped norm bound (a NaN spread is flagged too)."""
        spread = terms.spread()
        ok = spread <= AMPLIFICATION_LIMIT * self.reference
        return (self.scale > 0) & ~ok

    def release(
        self, name: str, terms: ReleaseTerms, fused: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """``fused(scale)`` (the float32 op, noise included) with the flagged examples' factors
        set to 0, plus their float64 contributions, projected and cast once."""
        flag = self.flagged(name, terms)
        idx = flag.nonzero().flatten()
        if idx.numel() == 0:
            return fused(self.scale)
        out = fused(torch.where(flag, 0.0, self.scale).to(self.scale.dtype))
        # A certified bound of 0 means a zero gradient: nothing to add (and no float64 GEMM for
        # an example with all-zero output gradients, flagged only by the underflow margin).
        idx = idx[self.norms[name][idx] > 0]
        if idx.numel() == 0:
            return out
        rows, grads = terms.exact(idx)
        s = self.scale[idx].double()
        radius = s * self.norms[name][idx].sqrt()
        values = grads * s.view(-1, *([1] * (grads.dim() - 1)))
        norm = torch.linalg.vector_norm(values.flatten(1), dim=1)
        # Projection onto the certified radius: a no-op up to rounding for exact arithmetic, a
        # guarantee whatever the float64 error; a non-finite value contributes nothing.
        factor = torch.where(norm > radius, radius / norm, 1.0)
        factor = torch.where(torch.isfinite(norm), factor, 0.0)
        values = values * factor.view_as(s).view(-1, *([1] * (grads.dim() - 1)))
        if rows is None:
            out += values.sum(0).to(out.dtype)
        else:
            table_rows, where = rows.flatten().unique(return_inverse=True)
            total = values.new_zeros(table_rows.numel(), values.shape[-1])
            total.index_add_(0, where, values.reshape(-1, values.shape[-1]))
            out[table_rows] += total.to(out.dtype)
        return out
