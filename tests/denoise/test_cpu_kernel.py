"""rmt::denoise on the CPU (the C++ kernel) against the full-SVD reference."""

import math

import pytest
import torch

import rmt_kernels
from rmt_kernels.reference import denoise_exact
from rmt_kernels.shrinkage import SHRINKERS, bulk_edge
from tests.helpers import planted, rel_err

# Shapes: square, tall, wide, not multiples of any block size, degenerate 1 x n and n x 1.
SHAPES = [(64, 64), (33, 77), (77, 33), (128, 17), (1, 50), (50, 1), (200, 300)]


@pytest.mark.parametrize(("m", "n"), SHAPES)
@pytest.mark.parametrize("shrinker", SHRINKERS)
def test_matches_exact(m, n, shrinker):
    rank = min(3, m, n)
    noisy, _ = planted(m, n, rank)
    out = rmt_kernels.denoise(noisy, 0.1, shrinker=shrinker)
    exact = denoise_exact(noisy, 0.1, shrinker=shrinker)
    assert rel_err(out, exact) < 0.02
    # Values: the estimates' singular values agree component by component.
    torch.testing.assert_close(
        torch.linalg.svdvals(out)[:rank], torch.linalg.svdvals(exact)[:rank], rtol=0.01, atol=0
    )


@pytest.mark.parametrize(("m", "n"), [(96, 160), (160, 96), (300, 200)])
@pytest.mark.parametrize("shrinker", SHRINKERS)
@pytest.mark.parametrize("norm", ["none", "preserve", "debiased"])
def test_quality_within_two_percent_of_exact(m, n, shrinker, norm):
    noisy, clean = planted(m, n, 4, strength=(1.5, 4.0), seed=3)
    err = rel_err(rmt_kernels.denoise(noisy, 0.1, shrinker=shrinker, norm=norm), clean)
    exact_err = rel_err(denoise_exact(noisy, 0.1, shrinker=shrinker, norm=norm), clean)
    assert err <= 1.02 * exact_err
    if norm == "none":
        assert err < 0.5 * rel_err(noisy, clean)  # and denoising helps at all


def test_batched_equals_each_matrix():
    noisy, _ = planted(40, 70, 3, batch=4)
    out = rmt_kernels.denoise(noisy, 0.1)
    assert out.shape == noisy.shape
    for i in range(4):
        assert rel_err(out[i], denoise_exact(noisy[i], 0.1)) < 0.02


@pytest.mark.parametrize(
    "make_view",
    [
        lambda g: g.t(),  # transposed
        lambda g: g[::2, 1::3],  # strided slice
        lambda g: g.t().contiguous().t(),  # column-major
    ],
    ids=["transposed", "strided", "column_major"],
)
def test_non_contiguous_input(make_view):
    noisy, _ = planted(90, 120, 3)
    view = make_view(noisy)
    assert not view.is_contiguous()
    out = rmt_kernels.denoise(view, 0.1)
    assert out.is_contiguous()
    assert rel_err(out, denoise_exact(view.contiguous(), 0.1)) < 0.02


@pytest.mark.parametrize(("m", "n"), [(100, 100), (64, 256), (256, 64)])
def test_pure_noise_comes_back_almost_zero(m, n):
    # The top noise singular value straddles the edge by O(n^-2/3) (Tracy-Widom); the Frobenius
    # shrinker maps such values to ~0, so at most a sliver of the noise survives.
    gen = torch.Generator().manual_seed(7)
    noise = 0.1 * torch.randn(m, n, generator=gen)
    out = rmt_kernels.denoise(noise, 0.1)
    assert out.norm() <= 0.05 * noise.norm()


@pytest.mark.parametrize("rank", [1, 3, 7, 30])
def test_planted_rank_comes_back(rank):
    # rank 30 is above the initial sketch rank (8): the adaptive sketch must grow to keep all.
    noisy, _ = planted(150, 250, rank, strength=(3.0, 6.0), seed=rank)
    out = rmt_kernels.denoise(noisy, 0.1)
    values = torch.linalg.svdvals(out.double())
    assert int((values > 1e-3 * values[0]).sum()) == rank


def test_fixed_rank_keeps_at_most_k():
    noisy, _ = planted(80, 120, 6)
    out = rmt_kernels.denoise(noisy, 0.1, rank=2)
    values = torch.linalg.svdvals(out.double())
    assert int((values > 1e-3 * values[0]).sum()) == 2
    assert rel_err(out, denoise_exact(noisy, 0.1, rank=2)) < 0.02


@pytest.mark.parametrize("norm", ["preserve", "debiased"])
def test_norm_correction_hits_its_target(norm):
    noisy, _ = planted(60, 90, 3)
    out = rmt_kernels.denoise(noisy, 0.1, norm=norm)
    sq = noisy.double().square().sum()
    target = sq.sqrt() if norm == "preserve" else (sq - 0.01 * 60 * 90).clamp_min(0).sqrt()
    assert out.double().norm().item() == pytest.approx(target.item(), rel=1e-5)


def test_norm_correction_leaves_a_zero_estimate_zero():
    noise = 0.1 * torch.randn(50, 50)
    out = rmt_kernels.denoise(noise, 0.1, kappa=2.0, norm="preserve")
    assert torch.count_nonzero(out) == 0


def test_kappa_moves_the_threshold():
    noisy, _ = planted(100, 100, 3, strength=(1.5, 3.0))
    edge = bulk_edge(100, 100, 0.1)
    top = torch.linalg.svdvals(noisy.double())[0].item()
    assert top > edge
    out = rmt_kernels.denoise(noisy, 0.1, kappa=1.01 * top / edge)
    assert torch.count_nonzero(out) == 0


def test_zero_and_exactly_low_rank_inputs():
    assert torch.count_nonzero(rmt_kernels.denoise(torch.zeros(30, 40), 0.1)) == 0
    _, clean = planted(50, 70, 2)
    # No noise at all: rank-deficient sketches must still give a finite, exact answer.
    out = rmt_kernels.denoise(clean, 0.1, shrinker="hard")
    assert rel_err(out, clean) < 1e-4


@pytest.mark.parametrize(("m", "n"), [(200, 300), (300, 200)])
def test_wide_dynamic_range_keeps_the_basis_orthonormal(m, n):
    # Singular values from 3e3 down to 2 times the bulk edge: the Krylov blocks are as
    # ill-conditioned as float32 data gets, which the float32 orthonormalisation (CholeskyQR
    # with float32 Gram matrices, Householder where it is not orthonormal) must survive. Every
    # component is kept, so each must be found to the exact shrinker's accuracy.
    gen = torch.Generator().manual_seed(7)
    values = bulk_edge(m, n, 0.1) * torch.logspace(math.log10(3e3), math.log10(2.0), 12)
    u = torch.linalg.qr(torch.randn(m, 12, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, 12, generator=gen, dtype=torch.float64))[0]
    noisy = ((u * values.double()) @ v.T + 0.1 * torch.randn(m, n, generator=gen)).float()
    exact = denoise_exact(noisy, 0.1)
    for basis in (None, torch.randn(m, 5, generator=gen)):
        out, new_basis, _ = rmt_kernels.denoise_warm(noisy, 0.1, basis)
        assert torch.isfinite(out).all()
        assert rel_err(out, exact) < 1e-3
        eye = torch.eye(new_basis.shape[1])
        assert torch.allclose(new_basis.T @ new_basis, eye, atol=1e-5)


def test_same_seed_same_output_and_seed_matters():
    noisy, _ = planted(70, 110, 4, strength=(1.2, 2.0))
    first = rmt_kernels.denoise(noisy, 0.1, seed=5)
    assert torch.equal(first, rmt_kernels.denoise(noisy, 0.1, seed=5))
    assert not torch.equal(first, rmt_kernels.denoise(noisy, 0.1, seed=6))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_round_trip(dtype):
    noisy, _ = planted(64, 96, 3)
    low = noisy.to(dtype)
    out = rmt_kernels.denoise(low, 0.1)
    assert out.dtype == dtype
    # Computed in float32 from the rounded input: only the final rounding differs.
    expect = rmt_kernels.denoise(low.float(), 0.1).to(dtype)
    eps = torch.finfo(dtype).eps
    assert rel_err(out, expect) < 4 * eps


def test_never_writes_to_or_aliases_its_input():
    noisy, _ = planted(30, 40, 2)
    before = noisy.clone()
    out = rmt_kernels.denoise(noisy, 0.1)
    assert torch.equal(noisy, before)
    assert out.data_ptr() != noisy.data_ptr()


# Where the sketch spans the whole column space every niter is exact; otherwise power iterations
# are what make a sketch of a noisy matrix accurate (without them the flat noise bulk swamps it).
@pytest.mark.parametrize(
    ("niter", "m", "n", "tolerance"),
    [(i, 12, 30, 1e-4) for i in (0, 1, 3)]
    + [(i, 30, 12, 1e-4) for i in (0, 1, 3)]
    + [(1, *(80, 120), 0.05), (3, *(80, 120), 0.02)],
)
def test_every_niter_matches_exact(niter, m, n, tolerance):
    noisy, _ = planted(m, n, 3, strength=(3.0, 6.0))
    out = rmt_kernels.denoise(noisy, 0.1, niter=niter)
    assert rel_err(out, denoise_exact(noisy, 0.1)) < tolerance
