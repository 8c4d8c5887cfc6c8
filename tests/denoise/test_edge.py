"""denoise with its DEFAULTS near the Marchenko-Pastur edge: within 2% of the exact full-SVD
shrinker's error on spectra that cross the edge, at the weight shapes of RoBERTa-base and MiniLM.

Signals are planted by where their noisy singular values land: a clean value x (in units of
sigma * sqrt(max(m, n))) above beta^(1/4) shows in the noisy matrix at y = sqrt((1 + x^2)(beta +
x^2)) / x (Benaych-Georges & Nadakuditi 2012), which is inverted below. The components that
decide the error are those landing 10-30% above the edge: they converge slowest in any range
finder and are exactly the ones the shrinker keeps or zeroes.
"""

from __future__ import annotations

import math

import pytest
import torch

import rmt_kernels
from rmt_kernels.reference import denoise_exact

SIGMA = 0.05
# Within 2% of the exact shrinker's error, as the README states.
TOLERANCE = 1.02


def _clean_value(factor: float, m: int, n: int) -> float:
    """Clean singular value whose noisy counterpart sits at ``factor`` times the bulk edge."""
    p, q = min(m, n), max(m, n)
    beta = p / q
    y = factor * (1 + math.sqrt(beta))
    t = y * y - 1 - beta
    return math.sqrt((t + math.sqrt(t * t - 4 * beta)) / 2) * SIGMA * math.sqrt(q)


def _spectrum(name: str, m: int, n: int) -> list[float]:
    """Clean singular values of each test spectrum (positions: multiples of the bulk edge)."""
    q = max(m, n)
    bbp = (min(m, n) / q) ** 0.25 * SIGMA * math.sqrt(q)  # where a signal starts to show
    if name == "edge":  # a few well above, several 10-30% above the edge
        return [_clean_value(f, m, n) for f in (3.0, 2.0, 1.3, 1.25, 1.2, 1.15, 1.1)]
    if name == "decay":  # geometric decay through the edge, half of it below
        return [3.0 * bbp * 0.8**i for i in range(16)]
    if name == "ties":  # four equal values near the edge
        return [_clean_value(2.5, m, n)] + [_clean_value(1.2, m, n)] * 4
    if name == "rank1":
        return [_clean_value(1.15, m, n)]
    if name == "rank64":  # 3x down to 1.1x the edge: the adaptive sketch must grow to 64+
        return [_clean_value(3.0 - 1.9 * i / 63, m, n) for i in range(64)]
    if name == "strong":
        edge = SIGMA * (math.sqrt(m) + math.sqrt(n))
        return [edge * f for f in (1.5, 2.7, 3.8, 5.0)]
    if name == "noise":
        return []
    raise ValueError(name)


def _planted(name: str, m: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    values = torch.tensor(_spectrum(name, m, n), dtype=torch.float64)
    noise = SIGMA * torch.randn(m, n, generator=gen, dtype=torch.float64)
    if values.numel() == 0:
        return noise.float(), torch.zeros(m, n)
    u = torch.linalg.qr(torch.randn(m, values.numel(), generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, values.numel(), generator=gen, dtype=torch.float64))[0]
    clean = (u * values) @ v.T
    return (clean + noise).float(), clean.float()


def _error(estimate: torch.Tensor, clean: torch.Tensor) -> float:
    return (estimate.double() - clean.double()).norm().item()


def _check(name: str, m: int, n: int, seed: int = 0, **options) -> None:
    noisy, clean = _planted(name, m, n, seed)
    exact = _error(denoise_exact(noisy, SIGMA, **options), clean)
    ours = _error(rmt_kernels.denoise(noisy, SIGMA, **options), clean)
    # Pure noise: the exact shrinker keeps the few noise values just above the edge; the range
    # finder's values never exceed the true ones, so it keeps at most those.
    assert ours <= TOLERANCE * exact + 1e-6 * noisy.norm().item(), (name, m, n, ours / exact)


# Every weight shape of RoBERTa-base (768, 3072) and MiniLM (384, 1536), and an odd one.
@pytest.mark.parametrize(
    ("m", "n"),
    [(768, 768), (3072, 768), (768, 3072), (384, 384), (1536, 384), (384, 1536), (300, 517)],
)
def test_edge_spectrum_at_model_shapes(m, n):
    _check("edge", m, n)


@pytest.mark.parametrize("name", ["decay", "ties", "rank1", "strong", "noise"])
@pytest.mark.parametrize(("m", "n"), [(384, 384), (1536, 384), (517, 300)])
def test_spectra_tall_and_wide(name, m, n):
    _check(name, m, n)


@pytest.mark.parametrize("name", ["decay", "ties", "noise"])
def test_spectra_at_roberta_width(name):
    _check(name, 768, 768, seed=1)


@pytest.mark.parametrize(("m", "n"), [(384, 1536), (517, 300)])
def test_rank_64_near_the_edge(m, n):
    _check("rank64", m, n)


@pytest.mark.parametrize(
    "options",
    [{"shrinker": "operator"}, {"shrinker": "hard"}, {"kappa": 0.8}, {"norm": "debiased"}],
)
def test_other_options_near_the_edge(options):
    _check("edge", 300, 517, seed=2, **options)


def test_a_fixed_niter_costs_what_it_did():
    # niter = k: a sketch, then k + 1 passes, the last without its product with grad.
    noisy, _ = _planted("edge", 300, 517)
    for niter in (0, 2):
        _, _, passes = rmt_kernels.denoise_warm(noisy, SIGMA, niter=niter)
        assert int(passes) == 2 * niter + 2
