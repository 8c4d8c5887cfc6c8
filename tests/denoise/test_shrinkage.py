"""The shrinkage math (rmt_kernels.shrinkage) and the C++ kernel's copy of it."""

import math

import pytest
import torch

import rmt_kernels
from rmt_kernels.shrinkage import SHRINKERS, bulk_edge, shrink_singular_values
from tests.helpers import with_singular_values


def test_bulk_edge_matches_largest_noise_singular_value():
    # For 400 x 1600 Gaussian noise the top singular value sits within a few percent of the edge
    # (Tracy-Widom fluctuations are O(n^{-2/3}) relative).
    gen = torch.Generator().manual_seed(1)
    noise = 0.3 * torch.randn(400, 1600, generator=gen, dtype=torch.float64)
    top = torch.linalg.svdvals(noise)[0].item()
    assert top == pytest.approx(bulk_edge(400, 1600, 0.3), rel=0.02)


@pytest.mark.parametrize("shrinker", SHRINKERS)
def test_zero_at_and_below_the_edge(shrinker):
    m, n, sigma = 30, 90, 0.5
    edge = bulk_edge(m, n, sigma)
    s = torch.tensor([0.0, 0.1, 0.5, 0.99, 1.0], dtype=torch.float64) * edge
    assert torch.all(shrink_singular_values(s, m, n, sigma, shrinker) == 0)


def test_known_values():
    # beta = 1/4, y = 3: frobenius sqrt((9 - 1.25)^2 - 1) / 3, operator x(3), hard y.
    m, n, sigma = 25, 100, 1.0
    scale = sigma * math.sqrt(n)
    s = torch.tensor([3.0 * scale], dtype=torch.float64)
    beta, y = 0.25, 3.0
    t = y * y - beta - 1
    root = math.sqrt(t * t - 4 * beta)
    x = math.sqrt((t + root) / 2)
    expect = {
        "frobenius": root / y,
        "operator": x,
        "nuclear": max(0.0, x**4 - math.sqrt(beta) * x * y - beta) / (x * x * y),
        "hard": y,
    }
    for shrinker, value in expect.items():
        got = shrink_singular_values(s, m, n, sigma, shrinker).item()
        assert got == pytest.approx(value * scale, rel=1e-12), shrinker


def test_shrinkers_are_continuous_at_the_threshold_for_any_kappa():
    # The operator shrinker is not: it jumps to beta^(1/4) at the edge by design.
    m, n, sigma = 40, 50, 1.0
    for kappa in (0.5, 1.0, 2.0):
        threshold = kappa * bulk_edge(m, n, sigma)
        just_above = torch.tensor([threshold * (1 + 1e-9)], dtype=torch.float64)
        for shrinker in ("frobenius", "nuclear"):
            value = shrink_singular_values(just_above, m, n, sigma, shrinker, kappa).item()
            assert value < 1e-3 * threshold, (shrinker, kappa)


def test_frobenius_shrinker_never_exceeds_the_observed_value():
    m, n, sigma = 50, 200, 1.0
    s = torch.linspace(0, 20, 500, dtype=torch.float64) * bulk_edge(m, n, sigma)
    for shrinker in ("frobenius", "operator", "nuclear"):
        assert torch.all(shrink_singular_values(s, m, n, sigma, shrinker) <= s)


@pytest.mark.parametrize("shrinker", SHRINKERS)
@pytest.mark.parametrize("kappa", [0.7, 1.0, 1.5])
@pytest.mark.parametrize(("m", "n"), [(12, 30), (30, 12), (16, 16)])
def test_cpu_kernel_applies_the_same_shrinkage(shrinker, kappa, m, n):
    # With min(m, n) <= initial rank + oversample the sketch spans the whole range, so the
    # output's singular values are exactly the shrunk input values.
    sigma = 0.2
    edge = bulk_edge(m, n, sigma)
    values = torch.tensor([4.0, 2.5, 1.6, 1.2, 0.9, 0.5], dtype=torch.float64) * edge
    grad = with_singular_values(values, m, n)
    out = rmt_kernels.denoise(grad, sigma, shrinker=shrinker, kappa=kappa)
    got = torch.linalg.svdvals(out.double())[: values.numel()]
    expect = shrink_singular_values(values, m, n, sigma, shrinker, kappa)
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5 * edge)
