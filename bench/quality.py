"""How close an estimate of a model's gradients is to the clean ones, over all matrices."""

from __future__ import annotations

import torch


def relative_error(estimates: list[torch.Tensor], clean: list[torch.Tensor]) -> float:
    """||estimate - clean|| / ||clean|| over the concatenation of all matrices."""
    num = sum(
        (e.double() - c.double()).square().sum() for e, c in zip(estimates, clean, strict=True)
    )
    den = sum(c.double().square().sum() for c in clean)
    return float((num / den).sqrt())


def cosine(estimates: list[torch.Tensor], clean: list[torch.Tensor]) -> float:
    """Cosine similarity between the concatenated estimates and the concatenated clean matrices."""
    dot = sum((e.double() * c.double()).sum() for e, c in zip(estimates, clean, strict=True))
    ne = sum(e.double().square().sum() for e in estimates).sqrt()
    nc = sum(c.double().square().sum() for c in clean).sqrt()
    return float(dot / (ne * nc).clamp_min(1e-300))
