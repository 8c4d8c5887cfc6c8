"""Embedded benchmark workloads: shapes of real models, synthetic DP-like gradients.

No downloads: shapes are written here, gradients are generated from fixed seeds.
"""

from __future__ import annotations

import math

import torch

# RoBERTa-base encoder: 12 layers x (Q, K, V, attention output: 768 x 768; intermediate:
# 3072 x 768; output: 768 x 3072), in nn.Linear's (out_features, in_features) layout.
ROBERTA_BASE_LAYERS = 12
ROBERTA_BASE_HIDDEN = 768
ROBERTA_BASE_INTERMEDIATE = 3072


def roberta_base_weight_shapes() -> list[tuple[int, int]]:
    """The 72 encoder weight-gradient shapes of RoBERTa-base, in layer order."""
    h, f = ROBERTA_BASE_HIDDEN, ROBERTA_BASE_INTERMEDIATE
    per_layer = [(h, h)] * 4 + [(f, h), (h, f)]
    return per_layer * ROBERTA_BASE_LAYERS


def dp_like_gradients(
    shapes: list[tuple[int, int]],
    *,
    rank: int = 4,
    strength: tuple[float, float] = (1.5, 5.0),
    sigma: float = 1.0,
    seed: int = 0,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Noisy gradients at DP-like strength over a low-rank signal, and the clean signals.

    Each clean matrix has rank ``rank`` with singular values spread over ``strength`` times the
    bulk edge ``sigma * (sqrt(m) + sqrt(n))``; the noise is i.i.d. N(0, sigma^2), so the noise's
    Frobenius norm (``sigma * sqrt(m n)``) exceeds the signal's, as in DP-SGD.
    """
    gen = torch.Generator().manual_seed(seed)
    noisy, clean = [], []
    for m, n in shapes:
        u = torch.linalg.qr(torch.randn(m, rank, generator=gen))[0]
        v = torch.linalg.qr(torch.randn(n, rank, generator=gen))[0]
        edge = sigma * (math.sqrt(m) + math.sqrt(n))
        values = torch.linspace(strength[0], strength[1], rank) * edge
        signal = (u * values) @ v.T
        clean.append(signal)
        noisy.append(signal + sigma * torch.randn(m, n, generator=gen))
    return noisy, clean
