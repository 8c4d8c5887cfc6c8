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


def rotating(m: int, n: int, rank: int, steps: int, *, angle: float = 0.05, seed: int = 0):
    """A step sequence: a rank-``rank`` signal (values 1.3-4 times the bulk edge) whose singular
    subspaces rotate by about ``angle`` radians a step, plus fresh N(0, 0.1^2) noise each step."""
    gen = torch.Generator().manual_seed(seed)
    sigma = 0.1
    edge = sigma * (math.sqrt(m) + math.sqrt(n))
    u = torch.linalg.qr(torch.randn(m, rank, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, rank, generator=gen, dtype=torch.float64))[0]
    values = torch.linspace(4.0, 1.3, rank, dtype=torch.float64) * edge
    for _ in range(steps):
        clean = (u * values) @ v.T
        noise = sigma * torch.randn(m, n, generator=gen, dtype=torch.float64)
        yield (clean + noise).float(), clean.float()
        # A random direction of norm ~angle per column: each singular vector turns by ~angle.
        du = torch.randn(m, rank, generator=gen, dtype=torch.float64) / math.sqrt(m)
        dv = torch.randn(n, rank, generator=gen, dtype=torch.float64) / math.sqrt(n)
        u = torch.linalg.qr(u + angle * du)[0]
        v = torch.linalg.qr(v + angle * dv)[0]


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


def assert_gaussian_noise(
    noise: torch.Tensor, std: float, *, rel: float = 0.05, p_false: float = 1e-6
) -> None:
    """Assert that ``noise`` (any shape, pooled) holds i.i.d. N(0, std^2) draws.

    Two checks share the false-failure budget ``p_false``: the mean, as
    sum / (std sqrt(n)) ~ N(0, 1) within its two-sided p_false / 2 quantile; and the scale, as
    sum(x^2) / std^2 ~ chi-square(n) (the mean is known to be 0, so no degree of freedom is
    lost) within its two-sided p_false / 2 interval. The scale check must also have the power
    to catch a standard deviation off by ``rel`` either way: refused (an error in the test
    itself) unless n is so large that a draw of std * (1 +- rel) lands inside the interval
    with probability below ``p_false`` as well (about 20,000 coordinates for 5% at 1e-6).
    """
    from scipy.stats import chi2, norm

    x = noise.detach().double().flatten()
    n = x.numel()
    lo, hi = chi2.ppf(p_false / 4, n), chi2.isf(p_false / 4, n)
    miss = max(chi2.cdf(hi / (1 + rel) ** 2, n), chi2.sf(lo / (1 - rel) ** 2, n))
    assert miss < p_false, (
        f"{n} coordinates cannot tell a {rel:.0%} std error at {p_false}: a draw at that "
        f"error passes with probability {miss:.2g}; pool more"
    )
    z = (x.sum() / (std * math.sqrt(n))).item()
    assert abs(z) < norm.isf(p_false / 4), f"mean of the noise {z:.2f} standard errors from 0"
    ratio = (x.square().sum() / std**2).item()
    assert lo < ratio < hi, (
        f"noise std / expected std ({std:.4g}) = {math.sqrt(ratio / n):.4f} over {n} "
        f"coordinates: outside [{math.sqrt(lo / n):.4f}, {math.sqrt(hi / n):.4f}]"
    )


def record_engine_seeds(monkeypatch) -> list[int]:
    """A list that every PrivateEngine built from now on (in this test) appends its noise seed
    to, for tests that scan artifacts for the seed."""
    from rmt_kernels.dp import engine as engine_module

    seeds: list[int] = []
    init = engine_module.PrivateEngine.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        seeds.append(self.noise_key.seed)

    monkeypatch.setattr(engine_module.PrivateEngine, "__init__", spy)
    return seeds
