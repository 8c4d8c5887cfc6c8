"""The Triton kernels of denoise, run on the CPU under TRITON_INTERPRET=1 (on a GPU machine they
run compiled on CUDA), against the reference on small, awkward shapes."""

import pytest
import torch

import rmt_kernels
from rmt_kernels.linalg import cholesky_qr2, gram_svd
from rmt_kernels.reference import denoise_exact
from rmt_kernels.shrinkage import SHRINKERS, norm_correction_factor, shrink_singular_values
from tests.helpers import planted, rel_err

pytestmark = pytest.mark.triton
triton = pytest.importorskip("triton")

from rmt_kernels.triton.denoise import denoise_triton, denoise_warm_triton  # noqa: E402
from rmt_kernels.triton.reconstruct import shrink_reconstruct  # noqa: E402
from rmt_kernels.triton.sketch import gaussian_sketch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    ("b", "p", "q", "width"), [(1, 5, 7, 3), (2, 70, 45, 16), (1, 33, 100, 20)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gaussian_sketch_is_a_product_with_one_gaussian_matrix(b, p, q, width, dtype):
    a = torch.randn(b, p, q, device=DEVICE).to(dtype)
    # Sketching the identity returns the test matrix itself.
    omega = gaussian_sketch(torch.eye(q, device=DEVICE)[None], width, seed=11)[0]
    got = gaussian_sketch(a, width, seed=11)
    torch.testing.assert_close(got, a.float() @ omega, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, gaussian_sketch(a, width, seed=11))
    assert not torch.equal(got, gaussian_sketch(a, width, seed=12))


def test_gaussian_test_matrix_is_standard_normal():
    # 64 x 64 = 4096 draws: the mean's std is 1/64 and the variance's std is sqrt(2/4096); the
    # bounds are 6 standard deviations (a false failure is rarer than 1e-8).
    omega = gaussian_sketch(torch.eye(64, device=DEVICE)[None], 64, seed=3)[0].double()
    assert abs(omega.mean().item()) < 6 / 64
    assert abs(omega.var().item() - 1) < 6 * (2 / 4096) ** 0.5


def test_gaussian_sketch_reads_strided_input():
    a = torch.randn(50, 40, device=DEVICE).t()[None]  # (1, 40, 50), column-major
    torch.testing.assert_close(
        gaussian_sketch(a, 16, seed=0), gaussian_sketch(a.contiguous(), 16, seed=0)
    )


@pytest.mark.parametrize("shrinker", SHRINKERS)
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_shrink_reconstruct_matches_torch(shrinker, norm, transposed):
    b, p, q, k = 2, 37, 53, 10
    gen = torch.Generator().manual_seed(5)
    left = torch.linalg.qr(torch.randn(b, p, k, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(b, q, k, generator=gen))[0]
    sigma = 0.05
    s = torch.linspace(3.0, 0.2, k).expand(b, k) * sigma * (p**0.5 + q**0.5)
    s = s.contiguous()
    target = torch.tensor([1.5, 0.7]) if norm else None
    out = torch.empty(b, q, p) if transposed else torch.empty(b, p, q)
    view = out.transpose(1, 2) if transposed else out
    shrink_reconstruct(
        left.to(DEVICE),
        (v * s[:, None, :]).to(DEVICE),
        s.to(DEVICE),
        view.to(DEVICE) if DEVICE != "cpu" else view,
        noise_scale=sigma * q**0.5,
        beta=p / q,
        shrinker=shrinker,
        keep=7,
        target=target.to(DEVICE) if target is not None else None,
    )
    eta = shrink_singular_values(s, p, q, sigma, shrinker)
    eta[:, 7:] = 0
    if norm:
        eta = eta * norm_correction_factor(eta, target)[:, None]
    expect = (left * eta[:, None, :]) @ v.mT
    torch.testing.assert_close(view.cpu(), expect, rtol=1e-4, atol=1e-5)


def test_cholesky_qr2_is_orthonormal_even_when_rank_deficient():
    y = torch.randn(3, 80, 12)
    basis = cholesky_qr2(y)
    torch.testing.assert_close(basis.mT @ basis, torch.eye(12).expand(3, 12, 12), atol=1e-5, rtol=0)
    low = torch.randn(80, 3) @ torch.randn(3, 12)  # rank 3, up to float32 rounding
    basis = cholesky_qr2(low)
    assert torch.isfinite(basis).all()
    # It spans the columns of `low` and is a true orthonormal basis (rounding directions
    # included), never a skewed one that would bias the core SVD.
    torch.testing.assert_close(basis @ (basis.mT @ low), low, atol=1e-4, rtol=0)
    torch.testing.assert_close(basis.mT @ basis, torch.eye(12), atol=1e-4, rtol=0)
    assert torch.count_nonzero(cholesky_qr2(torch.zeros(20, 4))) == 0


def test_gram_svd_matches_svd():
    bt = torch.randn(2, 60, 9)
    s, u = gram_svd(bt)
    torch.testing.assert_close(s, torch.linalg.svdvals(bt), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((bt @ u).norm(dim=1), s, rtol=1e-5, atol=1e-6)


SHAPES = [(30, 30), (33, 47), (47, 33), (1, 40), (40, 1), (70, 19)]


@pytest.mark.parametrize(("m", "n"), SHAPES)
@pytest.mark.parametrize("shrinker", SHRINKERS)
def test_denoise_triton_matches_exact(m, n, shrinker):
    noisy, _ = planted(m, n, min(2, m, n))
    out = denoise_triton(noisy.to(DEVICE), 0.1, shrinker=shrinker)
    assert out.shape == noisy.shape and out.is_contiguous()
    assert rel_err(out.cpu(), denoise_exact(noisy, 0.1, shrinker=shrinker)) < 0.02


@pytest.mark.parametrize("norm", ["preserve", "debiased"])
def test_denoise_triton_norm_correction_batched(norm):
    noisy, _clean = planted(40, 56, 3, batch=3)
    out = denoise_triton(noisy.to(DEVICE), 0.1, norm=norm).cpu()
    assert rel_err(out, denoise_exact(noisy, 0.1, norm=norm)) < 0.02


def test_denoise_triton_adaptive_rank_grows_and_fixed_rank_limits():
    noisy, _ = planted(60, 80, 12, seed=2)  # 12 > initial rank 8
    out = denoise_triton(noisy.to(DEVICE), 0.1).cpu().double()
    values = torch.linalg.svdvals(out)
    assert int((values > 1e-3 * values[0]).sum()) == 12
    out = denoise_triton(noisy.to(DEVICE), 0.1, rank=3).cpu().double()
    values = torch.linalg.svdvals(out)
    assert int((values > 1e-3 * values[0]).sum()) == 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_denoise_triton_low_precision_and_strided(dtype):
    noisy, _ = planted(48, 36, 2)
    view = noisy.to(dtype).t()  # (36, 48), non-contiguous, low precision
    out = denoise_triton(view.to(DEVICE), 0.1)
    assert out.dtype == dtype and out.shape == view.shape
    expect = denoise_exact(view.float(), 0.1)
    assert rel_err(out.cpu(), expect) < 0.02


def test_denoise_triton_pure_noise_and_zero_take_the_fast_path():
    noise = 0.1 * torch.randn(50, 64)
    assert denoise_triton(noise.to(DEVICE), 0.1).norm() <= 0.05 * noise.norm()
    assert torch.count_nonzero(denoise_triton(torch.zeros(20, 30, device=DEVICE), 0.1)) == 0


def test_denoise_triton_is_deterministic_by_seed():
    noisy, _ = planted(40, 50, 3, strength=(1.2, 2.0))
    first = denoise_triton(noisy.to(DEVICE), 0.1, seed=9)
    assert torch.equal(first, denoise_triton(noisy.to(DEVICE), 0.1, seed=9))


def test_denoise_triton_agrees_with_the_cpu_kernel():
    import rmt_kernels

    noisy, _ = planted(64, 90, 4)
    assert (
        rel_err(denoise_triton(noisy.to(DEVICE), 0.1).cpu(), rmt_kernels.denoise(noisy, 0.1)) < 0.02
    )


# Where the sketch spans the whole column space every niter is exact; otherwise power iterations
# are what make a sketch of a noisy matrix accurate (without them the flat noise bulk swamps it).
@pytest.mark.parametrize(
    ("niter", "m", "n", "tolerance"),
    [(i, 12, 30, 1e-4) for i in (0, 1, 3)]
    + [(i, 30, 12, 1e-4) for i in (0, 1, 3)]
    + [(1, *(50, 70), 0.05), (3, *(50, 70), 0.02)],
)
def test_denoise_triton_every_niter_matches_exact(niter, m, n, tolerance):
    noisy, _ = planted(m, n, 3, strength=(3.0, 6.0))
    out = denoise_triton(noisy.to(DEVICE), 0.1, niter=niter).cpu()
    assert rel_err(out, denoise_exact(noisy, 0.1)) < tolerance


def _orthonormal(basis: torch.Tensor) -> bool:
    eye = torch.eye(basis.shape[-1], device=basis.device).expand(*basis.shape[:-2], -1, -1)
    return torch.allclose(basis.mT @ basis, eye, atol=1e-5)


@pytest.mark.parametrize(("m", "n"), [(40, 56), (56, 40), (33, 47)])
def test_denoise_warm_triton_cold_then_warm(m, n):
    noisy, clean = planted(m, n, 3, strength=(1.5, 3.0))
    empty = torch.empty(m, 0, device=DEVICE)
    out, basis, passes = denoise_warm_triton(noisy.to(DEVICE), 0.1, empty)
    assert torch.equal(out, denoise_triton(noisy.to(DEVICE), 0.1))
    assert basis.dtype == torch.float32 and basis.shape[0] == m and _orthonormal(basis)
    assert passes.dtype == torch.int64 and passes.dim() == 0 and int(passes) >= 5
    again = clean + 0.1 * torch.randn(m, n, generator=torch.Generator().manual_seed(3))
    out, new_basis, warm_passes = denoise_warm_triton(again.to(DEVICE), 0.1, basis)
    assert rel_err(out.cpu(), denoise_exact(again, 0.1)) < 0.02
    assert _orthonormal(new_basis) and int(warm_passes) < int(passes)
    # The CPU kernel takes the same steps (other random numbers).
    _, _, cpu_passes = rmt_kernels.denoise_warm(again, 0.1, basis.cpu())
    assert abs(int(cpu_passes) - int(warm_passes)) <= 2


def test_denoise_warm_triton_batched_and_options():
    noisy, _ = planted(30, 50, 2, batch=2, strength=(1.5, 3.0))
    basis = torch.randn(2, 30, 4, device=DEVICE)
    for options in ({}, {"rank": 1, "norm": "debiased"}, {"niter": 1}):
        out, new_basis, _ = denoise_warm_triton(noisy.to(DEVICE), 0.1, basis, **options)
        exact_options = {k: v for k, v in options.items() if k != "niter"}
        assert rel_err(out.cpu(), denoise_exact(noisy, 0.1, **exact_options)) < 0.02
        assert new_basis.shape[:2] == (2, 30) and _orthonormal(new_basis)


def test_denoise_warm_triton_reads_options_positionally_as_the_dispatcher_may_pass_them():
    # rmt::denoise_warm's options are positional in its schema (shrinker, kappa, rank, ...).
    noisy, _ = planted(30, 50, 2)
    basis = torch.randn(30, 4, device=DEVICE)
    named = denoise_warm_triton(noisy.to(DEVICE), 0.1, basis, shrinker="hard", rank=1, seed=5)
    positional = denoise_warm_triton(noisy.to(DEVICE), 0.1, basis, "hard", 1.0, 1, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(named, positional, strict=True))
    with pytest.raises(ValueError, match="rank"):
        denoise_warm_triton(noisy.to(DEVICE), 0.1, basis, "hard", 1.0, 31)


def test_denoise_triton_fixed_niter_costs_what_it_did():
    noisy, _ = planted(40, 60, 2)
    for niter in (0, 2):
        _, _, passes = denoise_warm_triton(noisy.to(DEVICE), 0.1, torch.empty(40, 0), niter=niter)
        assert int(passes) == 2 * niter + 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bench/gpu/run.sh runs it)")
def test_the_op_dispatches_to_triton_on_cuda():
    noisy, _ = planted(96, 64, 3)
    out = torch.ops.rmt.denoise(noisy.cuda(), 0.1)
    assert out.is_cuda
    assert rel_err(out.cpu(), denoise_exact(noisy, 0.1)) < 0.02
    basis = torch.randn(96, 4, device="cuda")
    out, new_basis, passes = torch.ops.rmt.denoise_warm(noisy.cuda(), 0.1, basis)
    assert out.is_cuda and new_basis.is_cuda and passes.is_cuda
    assert rel_err(out.cpu(), denoise_exact(noisy, 0.1)) < 0.02
