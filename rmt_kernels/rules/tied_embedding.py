"""Tied input/output embeddings: one Parameter as the weight of an ``nn.Embedding`` (ids (B, T) ->
(B, T, d)) and of an ``nn.Linear`` head (d -> V, no trainable bias), as GPT-2 and many Llama and
Qwen models tie them (``lm_head.weight is embed.weight``).

The tied weight has ONE per-example gradient, the sum of its two uses:
``G_b = E_b + L_b``, with ``E_b`` the embedding's (row v gets ``sum_{t: id_t = v} e_t``, e the
embedding's output gradient; the padding row none) and ``L_b = g_b^T h_b`` the head's (h its
input, g its output gradient). Clipping the two uses as separate parameters would bound
``||E_b||^2 + ||L_b||^2``, which is not ``||G_b||^2``: when they align the example's gradient is
up to sqrt(2) times the clip threshold. So the norm is
``||G_b||^2 = ||E_b||^2 + ||L_b||^2 + 2 <E_b, L_b>`` with the cross term

    <E_b, L_b> = sum_t <e_t, L_b[id_t]> = sum_t sum_s g_b[s, id_t] <e_t, h_s>,

computed without any V x d matrix per example (T x S x d work per example, like the Gram route
of the Linear norms). Certified (privacy invariant 6, PRIVACY.md): the two squares are the
certified ops' bounds (:func:`rmt_kernels.ops.embedding_sq_norms`,
:func:`rmt_kernels.ops.linear_sq_norms`), and the cross term, which is signed (rounding it could
make the bound too small), is computed in float64 with a rigorous error term
(:func:`cross_term_bounds`). The clipped sum ``sum_b s_b (E_b + L_b)`` is the two fused ops'
sums added, with the noise drawn ONCE, by the head's op, from the tied parameter's counter range
(the embedding's op adds none), through a :class:`~rmt_kernels.rules.ReleaseGuard` whose
per-example float64 fallback adds the two parts before projecting, so an example whose two parts
cancel (``E_b = -L_b``, both huge) cannot leave float32 rounding of either part in the sum.

The engine sees the pair as one unit (rmt_kernels/dp/tied_units.py): the two modules keep their
own capture hooks and layout verification, and the rule gets ``x = (ids, h)`` and
``dy = (e, g)``; a part whose module did not run in the batch is None (its gradient is zero).
Any other sharing of a parameter is refused (:func:`check_tied_pair`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rmt_kernels.ops import (
    embedding_clipped_noisy_sum,
    embedding_sq_norms,
    linear_clipped_noisy_sum,
    linear_sq_norms,
)
from rmt_kernels.rules.embedding import EmbeddingTerms, check_embedding_module, without_padding
from rmt_kernels.rules.linear import LinearTerms
from rmt_kernels.rules.registry import LayerRule, Sums
from rmt_kernels.rules.release_guard import (
    ReleaseGuard,
    as_sequence,
    remember_sq_norms,
    row_norm_bounds,
)

__all__ = [
    "TIED_EMBEDDING_RULE",
    "TiedEmbeddingPair",
    "TiedEmbeddingRule",
    "TiedEmbeddingTerms",
    "check_tied_pair",
    "cross_term_bounds",
    "tied_sq_norms",
]

# Unit roundoff of float64.
_U64 = 2.0**-53
# Examples per block of the cross term: its float64 temporaries are (block, T, S).
_BLOCK_ENTRIES = 1 << 22


class TiedEmbeddingPair(nn.Module):
    """The engine's view of a tied pair as one module (never part of the model, never run).

    Args:
        embedding: the ``nn.Embedding`` (ids -> (B, T, d)).
        linear: the ``nn.Linear`` head (d -> V) whose weight is the embedding's.
    """

    def __init__(self, embedding: nn.Embedding, linear: nn.Linear) -> None:
        super().__init__()
        self.embedding = embedding
        self.linear = linear

    def forward(self, *args, **kwargs):  # pragma: no cover - a view, not a layer
        raise RuntimeError("TiedEmbeddingPair is the DP engine's view of a tie; it is not run")


def check_tied_pair(uses: list[tuple[str, nn.Module, str]]) -> None:
    """Refuse every sharing of a trainable parameter but the supported tie.

    Supported: the same Parameter as the ``weight`` of exactly one ``nn.Embedding`` (V, d) and of
    exactly one ``nn.Linear`` head with ``in_features = d``, ``out_features = V`` and no
    trainable bias (exact types, as rules are matched), the Embedding without the options its
    rule refuses.

    Args:
        uses: (qualified module name, module, parameter name in the module) for every module
            holding the parameter as a trainable parameter of its own.

    Raises:
        ValueError: naming the parameter's uses and what is supported.
    """
    names = [f"{m}.{p}" if m else p for m, _, p in uses]
    where = ", ".join(
        f"'{n}' ({type(mod).__name__})" for n, (_, mod, _) in zip(names, uses, strict=True)
    )
    supported = (
        "the only supported sharing is a tied embedding: one nn.Embedding(V, d) whose weight is "
        "the weight of one nn.Linear(d, V) head without a trainable bias. Untie the weights (e.g. "
        "tie_word_embeddings=False) or freeze them"
    )
    if len(uses) != 2:
        raise ValueError(
            f"make_private: one parameter is used by {len(uses)} modules ({where}); {supported}"
        )
    by_type = {type(mod): (name, mod, pname) for name, mod, pname in uses}
    if set(by_type) != {nn.Embedding, nn.Linear} or any(p != "weight" for _, _, p in uses):
        raise ValueError(
            f"make_private: parameter {where} is one tensor (tied weights) that is not an "
            f"nn.Embedding's weight tied to an nn.Linear's weight; {supported}"
        )
    emb = by_type[nn.Embedding][1]
    head = by_type[nn.Linear][1]
    if (head.in_features, head.out_features) != (emb.embedding_dim, emb.num_embeddings):
        raise ValueError(
            f"make_private: tied weights {where}: the head is nn.Linear(in_features="
            f"{head.in_features}, out_features={head.out_features}) but the embedding is "
            f"nn.Embedding({emb.num_embeddings}, {emb.embedding_dim}); {supported}"
        )
    if isinstance(head.bias, nn.Parameter) and head.bias.requires_grad:
        raise ValueError(
            f"make_private: tied weights {where}: the head has a trainable bias; {supported} "
            "(freeze the bias: head.bias.requires_grad_(False))"
        )
    try:
        check_embedding_module(emb)
    except ValueError as err:
        raise ValueError(f"make_private: tied weights {where}: {err}") from err


def cross_term_bounds(
    ids: torch.Tensor, e: torch.Tensor, h: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross term ``<E_b, L_b>`` in float64 and a rigorous bound of its error.

    ``c_b = sum_{t,s} g_b[s, id_t] <e_t, h_s>`` is formed in float64 from the exactly converted
    inputs (floats of 24 bits or fewer: products exact, no underflow or overflow in float64's
    range): the inner products ``A = e h^T`` by one float64 GEMM, then ``sum A * G`` with
    ``G[t, s] = g[s, id_t]``. Every term goes through at most ``d + T S`` roundings (Higham,
    Accuracy and Stability, 3.1), so ``|c_b - c^_b| <= gamma_{d + TS} W_b`` with
    ``W_b = sum_{t,s} |G[t, s]| |e_t| |h_s|``, which is computed from upper bounds of the row
    norms (:func:`row_norm_bounds`); the returned error is ``2 (d + TS + 4) u W^_b``, above
    ``gamma_{d + TS} (1 + gamma_{TS + 2}) W^_b`` (the rounding of W^ itself) for any
    ``(d + TS) u <= 0.01``.

    Args:
        ids: (B, T) or (B,) ids of the embedding; e: (B, T, d) or (B, d) its output gradient,
            padding positions zeroed.
        h: (B, S, d) or (B, d) the head's input; g: (B, S, V) or (B, V) its output gradient.

    Returns:
        (cross, error): float64 (B,) each; a non-finite input gives a non-finite value.
    """
    ids2 = (ids if ids.dim() == 2 else ids.unsqueeze(1)).long()
    e3, h3, g3 = as_sequence(e), as_sequence(h), as_sequence(g)
    B, T = ids2.shape
    S, d = h3.shape[1], h3.shape[2]
    cross = torch.zeros(B, dtype=torch.float64, device=e3.device)
    weight = torch.zeros_like(cross)
    block = max(1, _BLOCK_ENTRIES // max(1, T * S))
    n_e, n_h = row_norm_bounds(e3), row_norm_bounds(h3)
    for start in range(0, B, block):
        rows = slice(start, start + block)
        inner = torch.bmm(e3[rows].double(), h3[rows].double().mT)  # (b, T, S)
        picked = torch.gather(g3[rows], 2, ids2[rows].unsqueeze(1).expand(-1, S, -1))
        picked = picked.double().mT  # (b, T, S): g[s, id_t]
        cross[rows] = (inner * picked).sum((1, 2))
        sizes = n_e[rows].unsqueeze(2) * n_h[rows].unsqueeze(1)
        weight[rows] = (picked.abs() * sizes).sum((1, 2))
    return cross, weight * (2.0 * (d + T * S + 4) * _U64)


def _round_up_float32(q: torch.Tensor) -> torch.Tensor:
    """float32 ``r >= q`` (float64 in), NaN -> +inf."""
    q = torch.where(torch.isnan(q), math.inf, q)
    r = q.float()
    return torch.where(r.double() < q, torch.nextafter(r, torch.full_like(r, math.inf)), r)


def tied_sq_norms(
    ids: torch.Tensor | None,
    e: torch.Tensor | None,
    h: torch.Tensor | None,
    g: torch.Tensor | None,
) -> torch.Tensor:
    """Certified upper bounds (float32 (B,), rounded up) of ``||E_b + L_b||^2``.

    ``N_E + N_L + 2 (c^ + err)`` (the ops' bounds of the two squares and the cross term with its
    error, :func:`cross_term_bounds`), plus ``16 u`` times the sum of the magnitudes for the
    float64 additions, at least 0; and the smaller of that and the triangle inequality's
    ``(sqrt(N_E) + sqrt(N_L))^2`` (with a margin for its rounding), which caps the bound when the
    cross term's error is large. A part that is None (its module did not run) has a zero
    gradient: the other part's bound alone.

    Args:
        ids, e: the embedding's ids and output gradient (padding positions zeroed), or None.
        h, g: the head's input and output gradient, or None.

    Returns:
        float32 (B,); +inf where an input is not finite.
    """
    if ids is None:
        return linear_sq_norms(h, g)
    if h is None:
        return embedding_sq_norms(ids, e)
    n_e = embedding_sq_norms(ids, e).double()
    n_l = linear_sq_norms(h, g).double()
    cross, error = cross_term_bounds(ids, e, h, g)
    magnitude = n_e + n_l + 2.0 * cross.abs() + 2.0 * error
    q = (n_e + n_l + 2.0 * cross + 2.0 * error + 16.0 * _U64 * magnitude).clamp(min=0.0)
    q = torch.where(torch.isnan(q), math.inf, q)
    triangle = (n_e.sqrt() + n_l.sqrt()).square() * (1.0 + 16.0 * _U64)
    return _round_up_float32(torch.minimum(q, triangle))


class TiedEmbeddingTerms:
    """Terms of the tied weight's per-example gradients ``E_b + L_b`` for the release guard."""

    def __init__(
        self,
        ids: torch.Tensor | None,
        e: torch.Tensor | None,
        h: torch.Tensor | None,
        g: torch.Tensor | None,
        shape: torch.Size,
    ) -> None:
        self.embedding = None if ids is None else EmbeddingTerms(ids, e)
        self.linear = None if h is None else LinearTerms(h, g)
        self.shape = shape

    def spread(self) -> torch.Tensor:
        """(B,) float64: the two float32 passes' spreads added (each rounds its own terms)."""
        parts = [t.spread() for t in (self.embedding, self.linear) if t is not None]
        return parts[0] if len(parts) == 1 else parts[0] + parts[1]

    def exact(self, idx: torch.Tensor) -> tuple[None, torch.Tensor]:
        """float64 gradients (n, V, d) of examples ``idx``: the head's ``g^T h`` (one float64 GEMM
        each) plus the embedding's compensated row sums scattered by id."""
        if self.linear is not None:
            dense = self.linear.exact(idx)[1]
        else:
            device = self.embedding.dy.device
            dense = torch.zeros(idx.numel(), *self.shape, dtype=torch.float64, device=device)
        if self.embedding is not None:
            rows, values = self.embedding.exact(idx)
            dense.scatter_add_(1, rows.unsqueeze(-1).expand_as(values), values)
        return None, dense


def _parts(module: TiedEmbeddingPair, x: tuple, dy: tuple):
    """(ids, e with padding zeroed, h, g), a missing part as None."""
    (ids, h), (e, g) = x, dy
    if ids is None and h is None:
        raise ValueError("tied embedding rule: neither the embedding nor the head ran")
    check_embedding_module(module.embedding)
    if ids is not None:
        e = without_padding(module.embedding, ids, e)
    return ids, e, h, g


def _inputs(x: tuple, dy: tuple) -> tuple[torch.Tensor, ...]:
    """The present tensors, in a fixed order: the key of the remembered norm bounds."""
    return tuple(t for t in (*x, *dy) if t is not None)


class TiedEmbeddingRule:
    """The tied pair's rule (not registered: the engine builds the pair, see the module
    docstring): ``x = (ids, h)``, ``dy = (e, g)``, one parameter ``"weight"``."""

    @staticmethod
    def sq_norms(module: TiedEmbeddingPair, x: tuple, dy: tuple) -> Sums:
        out = {"weight": tied_sq_norms(*_parts(module, x, dy))}
        remember_sq_norms(module, _inputs(x, dy), out)
        return out

    @staticmethod
    def clipped_noisy_sums(
        module: TiedEmbeddingPair, x: tuple, dy: tuple, scale, noise_std, seed, offsets
    ) -> Sums:
        # Arguments and result: rmt_kernels.rules.LayerRule.
        ids, e, h, g = _parts(module, x, dy)
        guard = ReleaseGuard(
            "tied_embedding_clipped_noisy_sum",
            module,
            _inputs(x, dy),
            scale,
            lambda: TiedEmbeddingRule.sq_norms(module, x, dy),
        )
        weight = module.embedding.weight
        offset = offsets["weight"]

        def fused(s: torch.Tensor) -> torch.Tensor:
            # The noise enters once: through the head's op when the head ran, else the
            # embedding's; the other op gets noise_std 0 (no draw at all).
            out = None
            if h is not None:
                out = linear_clipped_noisy_sum(h, g, s, noise_std, seed, offset)
            if ids is not None:
                std = noise_std if out is None else 0.0
                part = embedding_clipped_noisy_sum(
                    ids, e, s, module.embedding.num_embeddings, std, seed, offset
                )
                out = part if out is None else out.add_(part)
            return out

        terms = TiedEmbeddingTerms(ids, e, h, g, weight.shape)
        return {"weight": guard.release("weight", terms, fused)}


#: The rule of every tied pair (the engine's unit, rmt_kernels/dp/tied_units.py).
TIED_EMBEDDING_RULE = LayerRule.from_class(TiedEmbeddingRule)
