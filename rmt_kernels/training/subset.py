"""A seeded subset of a data split, in the split's original order (``--train-size``,
``--eval-size``): the same draw for every application on the training core."""

from __future__ import annotations

import torch


def seeded_indices(count: int, size: int, seed: int) -> list[int]:
    """``size`` of the indices ``0 .. count - 1`` drawn by ``seed``, sorted (original order)."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:size].tolist())


def subset(dataset, size: int | None, seed: int, flag: str = "--train-size"):
    """``size`` examples of ``dataset`` (a ``datasets.Dataset``) drawn by ``seed`` (in their
    original order), or all.

    Raises:
        ValueError: ``size`` below 1 or above the split's size (naming ``flag``).
    """
    if size is None:
        return dataset
    if size < 1:
        raise ValueError(f"{flag} must be >= 1, got {size}")
    if size > len(dataset):
        raise ValueError(f"{flag} {size} is above the {len(dataset)} examples of the split")
    if size == len(dataset):
        return dataset
    return dataset.select(seeded_indices(len(dataset), size, seed))
