"""The shrinker formulas exist once per language: Python (rmt_kernels/shrinkage.py, used by the
reference), Triton (``_shrink`` in rmt_kernels/triton/reconstruct.py) and C++ (``shrink`` in
csrc/cpu/denoise.cpp). All three must give the same shrunk values on one grid of singular values,
shrinkers, kappas and aspect ratios."""

import pytest
import torch

import rmt_kernels
from rmt_kernels.shrinkage import SHRINKERS, bulk_edge, shrink_singular_values
from tests.helpers import with_singular_values

# Multiples of the threshold kappa * edge: below it (zero), and above it away from its immediate
# neighbourhood, where the square-root shrinkers have an unbounded slope and float32 singular
# values of the CPU route could not be compared at a tight tolerance.
GRID = torch.tensor([0.3, 0.6, 0.9, 1.1, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
SIGMA = 0.2
SHAPES = [(12, 40), (40, 12), (16, 16)]


def _grid(m: int, n: int, kappa: float) -> torch.Tensor:
    return GRID * kappa * bulk_edge(m, n, SIGMA)


def _cpp(values: torch.Tensor, m: int, n: int, shrinker: str, kappa: float) -> torch.Tensor:
    # min(m, n) <= initial rank + oversample: the sketch spans the whole range, so the output's
    # singular values are exactly the C++ shrinker's values of the input's.
    grad = with_singular_values(values, m, n)
    out = rmt_kernels.denoise(grad, SIGMA, shrinker=shrinker, kappa=kappa, oversample=16)
    return torch.linalg.svdvals(out.double())[: values.numel()]


def _triton(values: torch.Tensor, m: int, n: int, shrinker: str, kappa: float) -> torch.Tensor:
    # left = the first k unit vectors, right = unit vectors times s: the reconstruction is
    # diag(shrunk values) in its top-left corner.
    from rmt_kernels.triton.reconstruct import shrink_reconstruct

    device = "cuda" if torch.cuda.is_available() else "cpu"
    p, q, k = min(m, n), max(m, n), values.numel()
    s = values.float().unsqueeze(0).to(device)
    left = torch.eye(p, k, device=device).unsqueeze(0)
    right = torch.eye(q, k, device=device).unsqueeze(0) * s[:, None, :]
    out = torch.empty(1, p, q, device=device)
    shrink_reconstruct(
        left,
        right,
        s,
        out,
        noise_scale=kappa * SIGMA * q**0.5,
        beta=p / q,
        shrinker=shrinker,
        keep=k,
        target=None,
    )
    return out[0].diagonal()[:k].double().cpu()


@pytest.mark.parametrize("shrinker", SHRINKERS)
@pytest.mark.parametrize("kappa", [0.7, 1.0, 1.5])
@pytest.mark.parametrize(("m", "n"), SHAPES)
def test_python_cpp_and_triton_shrinkers_agree(shrinker, kappa, m, n):
    pytest.importorskip("triton")
    values = _grid(m, n, kappa)
    python = shrink_singular_values(values, m, n, SIGMA, shrinker, kappa)
    atol = 1e-5 * bulk_edge(m, n, SIGMA)
    # Sorted descending, as singular values come out of the C++ route.
    expect = python.sort(descending=True).values
    torch.testing.assert_close(_cpp(values, m, n, shrinker, kappa), expect, rtol=1e-4, atol=atol)
    torch.testing.assert_close(_triton(values, m, n, shrinker, kappa), python, rtol=1e-5, atol=atol)
    assert (python[GRID < 1] == 0).all() and (python[GRID > 1] > 0).all()
