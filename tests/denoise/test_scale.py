"""denoise and denoise_warm over the whole finite range of grad, sigma and basis (issue 24): the
CPU kernel and the Triton path (interpreted on a CPU machine) against the exact shrinker.

The shrinker is homogeneous, denoise(a G, a sigma) = a denoise(G, sigma), so any finite grad and
sigma > 0 have an answer; before the fix ||grad|| / sigma above ~1e10 gave all-NaN (the float32
shrinker squared y twice), ||grad|| ~ 1e20 a LinAlgError (A A^T Q overflowed float32), a grad of
1e-30 products that underflowed, and a finite basis of 1e38 the error "grad contains NaN or Inf".
The reference (float64 SVD) is exact at all these scales; the tolerance against it is the
adaptive range finder's own accuracy, 0.02 relative as in the other denoise tests (measured here
1e-7 to 3e-4, the same at every scale). Powers of two, which scale grad exactly, are held to
float32 rounding (1e-4).
"""

import math

import pytest
import torch

import rmt_kernels
from rmt_kernels.reference import denoise_exact
from rmt_kernels.shrinkage import SHRINKERS
from tests.helpers import planted, rel_err

TOLERANCE = 0.02
ROUNDING = 1e-4
IMPLS = ["cpu", pytest.param("triton", marks=pytest.mark.triton)]


def _ops(impl: str):
    """(denoise, denoise_warm) of one implementation."""
    if impl == "cpu":
        return rmt_kernels.denoise, rmt_kernels.denoise_warm
    pytest.importorskip("triton")
    from rmt_kernels.triton.denoise import denoise_triton, denoise_warm_triton

    return denoise_triton, denoise_warm_triton


def _check(out: torch.Tensor, expect: torch.Tensor) -> None:
    assert torch.isfinite(out).all()
    assert rel_err(out, expect) < TOLERANCE


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("m", "n", "exponent"),
    # ||grad|| from ~1e-39 (subnormal entries) to ~1e39 (past float32's range as a norm); at
    # 300 x 400 the range finder does not reach the smaller side, and a grad of 1e-25 came back
    # as zero (A A^T Q underflowed).
    [(60, 90, e) for e in (-40, -30, -12, 10, 20, 30, 37)]
    + [(300, 400, e) for e in (-35, -25, 25)],
)
def test_grad_and_sigma_scaled_together(impl, m, n, exponent):
    denoise, warm = _ops(impl)
    noisy, _ = planted(m, n, 3)
    f = 10.0**exponent
    grad, sigma = noisy * f, 0.1 * f
    expect = denoise_exact(grad, sigma)
    _check(denoise(grad, sigma), expect)
    basis = torch.randn(m, 6, generator=torch.Generator().manual_seed(1))
    _check(warm(grad, sigma, basis)[0], expect)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ratio", [1e10, 1e20, 1e40, 1e300])
@pytest.mark.parametrize("shrinker", SHRINKERS)
def test_tiny_sigma_next_to_grad(impl, ratio, shrinker):
    # ||grad|| / sigma from 1e10 (all-NaN before) up to where kappa * sigma underflows to 0.
    denoise, warm = _ops(impl)
    noisy, _ = planted(60, 90, 3)
    sigma = 0.1 / ratio
    expect = denoise_exact(noisy, sigma, shrinker=shrinker)
    _check(denoise(noisy, sigma, shrinker=shrinker), expect)
    _check(warm(noisy, sigma, torch.randn(60, 4), shrinker=shrinker)[0], expect)


@pytest.mark.parametrize("impl", IMPLS)
def test_huge_grad_with_norm_corrections_and_kappa(impl):
    denoise, _ = _ops(impl)
    noisy, _ = planted(48, 70, 3)
    grad, sigma = noisy * 1e25, 0.1 * 1e25
    for options in ({"norm": "preserve"}, {"norm": "debiased"}, {"kappa": 1.5, "rank": 2}):
        _check(denoise(grad, sigma, **options), denoise_exact(grad, sigma, **options))


@pytest.mark.parametrize("impl", IMPLS)
def test_sigma_far_above_grad_gives_zero(impl):
    # kappa * sigma * sqrt(q) overflows to Inf: nothing is above the threshold.
    denoise, _ = _ops(impl)
    noisy, _ = planted(40, 50, 2)
    for sigma, kappa in ((1e300, 10.0), (1e30, 1.0)):
        assert torch.equal(denoise_exact(noisy, sigma, kappa=kappa), torch.zeros(40, 50))
        assert torch.equal(denoise(noisy, sigma, kappa=kappa), torch.zeros(40, 50))


@pytest.mark.parametrize("impl", IMPLS)
def test_homogeneous_in_powers_of_two(impl):
    # denoise(2^k G, 2^k sigma) = 2^k denoise(G, sigma) up to rounding: the rescaled path (grad
    # outside the products' safe range) lands on the same float32 matrix up to a power of two.
    denoise, _ = _ops(impl)
    noisy, _ = planted(64, 80, 4)
    base = denoise(noisy, 0.1)
    for k in (-120, -60, 60, 120):
        f = math.ldexp(1.0, k)
        assert rel_err(denoise(noisy * f, 0.1 * f) / f, base) < ROUNDING


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("exponent", [-44, -38, 30, 38])
def test_basis_of_any_finite_magnitude(impl, exponent):
    # Only the basis's directions count; before, a finite basis of 1e38 was reported as
    # "grad contains NaN or Inf".
    _, warm = _ops(impl)
    noisy, _ = planted(60, 90, 3)
    unit = torch.randn(60, 6, generator=torch.Generator().manual_seed(1))
    basis = (unit * 10.0**exponent).clamp(-3e38, 3e38)
    assert torch.isfinite(basis).all() and (basis != 0).any()
    out, new_basis, _ = warm(noisy, 0.1, basis)
    _check(out, denoise_exact(noisy, 0.1))
    assert torch.allclose(new_basis.mT @ new_basis, torch.eye(new_basis.shape[1]), atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_nan_or_inf_in_grad_is_named_at_any_scale(impl, bad, scale):
    denoise, warm = _ops(impl)
    noisy, _ = planted(60, 90, 3)
    grad = noisy * scale
    grad[7, 11] = bad
    with pytest.raises(ValueError, match="grad contains NaN or Inf"):
        denoise(grad, 0.1 * scale)
    with pytest.raises(ValueError, match="grad contains NaN or Inf"):
        warm(grad, 0.1 * scale, torch.randn(60, 5))
