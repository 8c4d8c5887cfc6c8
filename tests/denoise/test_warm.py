"""rmt::denoise_warm (CPU kernel, wrapper, fake impl): the warm-started form of denoise and the
basis it hands to the next call."""

import pytest
import torch

import rmt_kernels
from rmt_kernels.ops import BASIS_MARGIN
from rmt_kernels.reference import denoise_exact
from tests.helpers import planted, rel_err, rotating

SHAPES = [(60, 90), (90, 60), (64, 64), (33, 200)]


def _orthonormal(basis: torch.Tensor) -> bool:
    eye = torch.eye(basis.shape[-1]).expand(*basis.shape[:-2], -1, -1)
    return torch.allclose(basis.mT @ basis, eye, atol=1e-5)


@pytest.mark.parametrize(("m", "n"), SHAPES)
def test_cold_start_is_denoise(m, n):
    noisy, _ = planted(m, n, 3, strength=(1.3, 3.0))
    expect = rmt_kernels.denoise(noisy, 0.1, seed=4)
    for basis in (None, torch.empty(m, 0)):
        out, new_basis, passes = rmt_kernels.denoise_warm(noisy, 0.1, basis, seed=4)
        assert torch.equal(out, expect)
        assert new_basis.dtype == torch.float32 and new_basis.shape[0] == m
        assert passes.dtype == torch.int64 and passes.dim() == 0 and int(passes) >= 3


@pytest.mark.parametrize(("m", "n"), SHAPES)
def test_new_basis_is_orthonormal_and_spans_the_estimate(m, n):
    noisy, _ = planted(m, n, 3, strength=(1.5, 3.0))
    out, basis, _ = rmt_kernels.denoise_warm(noisy, 0.1)
    kept = int((torch.linalg.svdvals(out.double()) > 1e-4 * out.norm()).sum())
    assert kept == 3
    assert basis.shape == (m, min(kept + BASIS_MARGIN, m, n))
    assert _orthonormal(basis)
    # The estimate's column space is inside the basis: its left singular vectors come first.
    assert rel_err(basis @ (basis.T @ out), out) < 1e-5


@pytest.mark.parametrize(("m", "n"), [(80, 120), (120, 80)])
def test_warm_sequence_matches_exact_and_settles_sooner(m, n):
    basis, cold_passes, warm_passes = None, [], []
    for step, (noisy, clean) in enumerate(rotating(m, n, 3, steps=6)):
        out, basis, passes = rmt_kernels.denoise_warm(noisy, 0.1, basis, seed=step)
        exact = denoise_exact(noisy, 0.1)
        assert rel_err(out, clean) <= 1.02 * rel_err(exact, clean) + 1e-6
        (cold_passes if step == 0 else warm_passes).append(int(passes))
    assert max(warm_passes) < cold_passes[0]


def test_a_basis_that_holds_the_signal_settles_sooner():
    # Strong signal: the basis returned for one noisy copy starts the next one where it ends.
    noisy, clean = planted(100, 150, 3, strength=(4.0, 8.0), seed=1)
    _, basis, cold = rmt_kernels.denoise_warm(noisy, 0.1)
    again = clean + 0.1 * torch.randn(100, 150, generator=torch.Generator().manual_seed(9))
    out, _, passes = rmt_kernels.denoise_warm(again, 0.1, basis)
    assert int(passes) <= 4 < int(cold)  # two passes: grad^T, grad, grad^T, grad
    assert rel_err(out, denoise_exact(again, 0.1)) < 0.01


def test_any_finite_basis_is_accepted():
    noisy, _ = planted(50, 70, 2, strength=(2.0, 4.0))
    exact = denoise_exact(noisy, 0.1)
    column = torch.randn(50, 1)
    for basis in (torch.zeros(50, 3), torch.cat([column, column, 2 * column], 1), torch.eye(50)):
        out, new_basis, _ = rmt_kernels.denoise_warm(noisy, 0.1, basis)
        assert rel_err(out, exact) < 0.02
        assert _orthonormal(new_basis)


def test_batched_basis():
    noisy, _ = planted(40, 70, 3, batch=3, strength=(1.5, 3.0))
    out, basis, _ = rmt_kernels.denoise_warm(noisy, 0.1)
    assert out.shape == noisy.shape and basis.shape[:2] == (3, 40)
    assert _orthonormal(basis)
    out2, _, _ = rmt_kernels.denoise_warm(noisy, 0.1, basis)
    for i in range(3):
        assert rel_err(out2[i], denoise_exact(noisy[i], 0.1)) < 0.02


@pytest.mark.parametrize("options", [{"rank": 2}, {"shrinker": "hard", "norm": "debiased"}])
def test_options_as_in_denoise(options):
    noisy, _ = planted(60, 80, 4, strength=(1.5, 3.0))
    _, basis, _ = rmt_kernels.denoise_warm(noisy, 0.1)
    out, _, _ = rmt_kernels.denoise_warm(noisy, 0.1, basis, **options)
    assert rel_err(out, denoise_exact(noisy, 0.1, **options)) < 0.02


def test_zero_grad_and_determinism():
    out, basis, _ = rmt_kernels.denoise_warm(torch.zeros(30, 40), 0.1)
    assert torch.count_nonzero(out) == 0 and _orthonormal(basis)
    noisy, _ = planted(50, 60, 3, strength=(1.2, 2.0))
    start = torch.randn(50, 4)
    first = rmt_kernels.denoise_warm(noisy, 0.1, start, seed=3)
    second = rmt_kernels.denoise_warm(noisy, 0.1, start, seed=3)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_low_precision_grad():
    noisy, _ = planted(64, 96, 3)
    out, basis, _ = rmt_kernels.denoise_warm(noisy.bfloat16(), 0.1)
    assert out.dtype == torch.bfloat16 and basis.dtype == torch.float32


def test_the_op_and_the_wrapper_agree():
    noisy, _ = planted(40, 50, 2)
    basis = torch.randn(40, 5)
    op = torch.ops.rmt.denoise_warm(noisy, 0.1, basis, kappa=1.1, seed=2)
    wrapper = rmt_kernels.denoise_warm(noisy, 0.1, basis, kappa=1.1, seed=2)
    for a, b in zip(op, wrapper, strict=True):
        assert torch.equal(a, b)


def test_fake_impl_has_a_data_dependent_basis_width():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    with FakeTensorMode(shape_env=ShapeEnv(allow_dynamic_output_shape_ops=True)) as mode:
        grad = mode.from_tensor(torch.empty(3, 40, 70, dtype=torch.bfloat16))
        basis = mode.from_tensor(torch.empty(3, 40, 5))
        out, new_basis, passes = torch.ops.rmt.denoise_warm(grad, 0.1, basis)
    assert out.shape == grad.shape and out.dtype == torch.bfloat16
    assert new_basis.shape[:2] == (3, 40) and isinstance(new_basis.shape[2], torch.SymInt)
    assert new_basis.dtype == torch.float32
    assert passes.shape == () and passes.dtype == torch.int64


def test_meta_tensors_are_checked_then_refused():
    grad = torch.empty(40, 70, device="meta")
    with pytest.raises(ValueError, match="basis must have m = 40 rows"):
        torch.ops.rmt.denoise_warm(grad, 0.1, torch.empty(41, 2, device="meta"))
    with pytest.raises(RuntimeError, match="data-dependent"):
        torch.ops.rmt.denoise_warm(grad, 0.1, torch.empty(40, 2, device="meta"))
