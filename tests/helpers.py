"""Shared builders for the tests: low-rank signals buried in Marchenko-Pastur noise."""

from __future__ import annotations

import math

import torch


def planted(
    m: int,
    n: int,
    rank: int,
    *,
    sigma: float = 0.1,
    strength: tuple[float, float] = (3.0, 6.0),
    batch: int | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (noisy, clean): a rank-``rank`` matrix whose singular values lie between
    ``strength`` times the bulk edge, plus i.i.d. N(0, sigma^2) noise. float32."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch,) if batch is not None else ()
    edge = sigma * (math.sqrt(m) + math.sqrt(n))
    u = torch.linalg.qr(torch.randn(*shape, m, rank, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(*shape, n, rank, generator=gen, dtype=torch.float64))[0]
    values = torch.linspace(strength[0], strength[1], rank, dtype=torch.float64) * edge
    clean = (u * values) @ v.mT
    noise = sigma * torch.randn(*shape, m, n, generator=gen, dtype=torch.float64)
    return (clean + noise).float(), clean.float()


def with_singular_values(values: torch.Tensor, m: int, n: int, seed: int = 0) -> torch.Tensor:
    """An m x n float32 matrix with exactly the given singular values (len <= min(m, n))."""
    gen = torch.Generator().manual_seed(seed)
    k = values.numel()
    u = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0]
    return ((u * values.double()) @ v.T).float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||_F / ||b||_F in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
