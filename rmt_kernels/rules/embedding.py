"""``nn.Embedding``: its layer rule, module check and the certified release terms of its table.

Per-example gradient: row v of the table gets ``sum_{t: ids_t = v} dy_t``; the padding row gets
none, as in ``nn.Embedding``. Norms by :func:`rmt_kernels.ops.embedding_sq_norms` (repeated ids
summed before squaring), clipped sum by :func:`rmt_kernels.ops.embedding_clipped_noisy_sum`.
"""

from __future__ import annotations

import torch
from torch import nn

from rmt_kernels.ops import embedding_clipped_noisy_sum, embedding_sq_norms
from rmt_kernels.rules.registry import Sums, has_trainable, register_layer_rule
from rmt_kernels.rules.release_guard import (
    ReleaseGuard,
    as_sequence,
    compensated_sum,
    remember_sq_norms,
    row_norm_bounds,
)

__all__ = ["EmbeddingRule", "EmbeddingTerms", "check_embedding_module", "without_padding"]


def check_embedding_module(module: nn.Embedding) -> None:
    """Refuse the options whose gradient the rule does not compute.

    Raises:
        ValueError: ``max_norm`` (rows renormalised in the forward pass), ``sparse`` (a sparse
            gradient has no dense sum), ``scale_grad_by_freq`` (each token's gradient divided
            by its count in the whole batch, which couples the examples).
    """
    if module.max_norm is not None or module.sparse:
        raise ValueError("embedding rule: max_norm and sparse embeddings are not supported")
    if module.scale_grad_by_freq:
        raise ValueError(
            "embedding rule: scale_grad_by_freq=True couples the examples of a batch and is not "
            "supported"
        )


def without_padding(module: nn.Embedding, ids: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """``dy`` with the positions that look up ``padding_idx`` zeroed: nn.Embedding gives the
    padding row no gradient."""
    if module.padding_idx is None:
        return dy
    return dy.masked_fill((ids == module.padding_idx).unsqueeze(-1), 0)


class EmbeddingTerms:
    """Terms of an Embedding's per-example gradients: row v gets ``sum_{t: ids_t = v} dy_t``."""

    def __init__(self, ids: torch.Tensor, dy: torch.Tensor) -> None:
        self.ids = ids if ids.dim() == 2 else ids.unsqueeze(1)
        self.dy = as_sequence(dy)

    def spread(self) -> torch.Tensor:
        """(B,) float64 ``sum_t |dy_t|``."""
        return row_norm_bounds(self.dy).sum(1)

    def exact(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Table rows (n, T) and float64 values (n, T, d): row ``rows[i, k]`` of the table gets
        ``values[i, k]`` (compensated sum of the tokens with that id; unused slots are zero)."""
        ids, dy = self.ids[idx], self.dy[idx].double()
        sorted_ids, _ = ids.sort(1)
        # Slot of token t: index of its id among the example's sorted ids (first occurrence).
        slots = torch.searchsorted(sorted_ids, ids)
        values = compensated_sum(dy, slots)
        rows = torch.zeros_like(sorted_ids)
        rows.scatter_(1, slots, ids)
        return rows, values


@register_layer_rule(nn.Embedding)
class EmbeddingRule:
    """``nn.Embedding``: weight (:func:`embedding_sq_norms`); the padding row gets no gradient."""

    flat_positions = True
    check_module = staticmethod(check_embedding_module)

    @staticmethod
    def sq_norms(module: nn.Embedding, ids: torch.Tensor, dy: torch.Tensor) -> Sums:
        check_embedding_module(module)
        if not has_trainable(module, "weight"):
            return {}
        out = {"weight": embedding_sq_norms(ids, without_padding(module, ids, dy))}
        remember_sq_norms(module, (ids, dy), out)
        return out

    @staticmethod
    def clipped_noisy_sums(module: nn.Embedding, ids, dy, scale, noise_std, seed, offsets) -> Sums:
        # Arguments and result: rmt_kernels.rules.LayerRule.
        check_embedding_module(module)
        if not has_trainable(module, "weight"):
            return {}
        guard = ReleaseGuard(
            "embedding_clipped_noisy_sum",
            module,
            (ids, dy),
            scale,
            lambda: EmbeddingRule.sq_norms(module, ids, dy),
        )
        dy = without_padding(module, ids, dy)
        return {
            "weight": guard.release(
                "weight",
                EmbeddingTerms(ids, dy),
                lambda s: embedding_clipped_noisy_sum(
                    ids, dy, s, module.num_embeddings, noise_std, seed, offsets["weight"]
                ),
            )
        }
