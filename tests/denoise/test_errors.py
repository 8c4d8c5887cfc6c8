"""Bad input to denoise gets a Python exception naming the argument, on every path: the C++ CPU
kernel (torch.ops.rmt.denoise), the fake impl (meta tensors), the Triton path and the reference."""

import math

import pytest
import torch

import rmt_kernels
from rmt_kernels.reference import denoise_exact


def _call_op(grad, sigma, **kw):
    return torch.ops.rmt.denoise(grad, sigma, **kw)


def _call_meta(grad, sigma, **kw):
    return torch.ops.rmt.denoise(grad.to("meta"), sigma, **kw)


def _call_triton(grad, sigma, **kw):
    from rmt_kernels.triton.denoise import denoise_triton

    return denoise_triton(grad, sigma, **kw)


def _call_reference(grad, sigma, **kw):
    kw.pop("oversample", None)
    kw.pop("niter", None)
    kw.pop("seed", None)
    return denoise_exact(grad, sigma, **kw)


PATHS = {
    "op": _call_op,
    "meta": _call_meta,
    "triton": _call_triton,
    "reference": _call_reference,
    "wrapper": rmt_kernels.denoise,
}

GOOD = torch.ones(6, 8)
CASES = [
    # (grad, sigma, options, exception, words the message must contain)
    (torch.ones(5), 0.1, {}, ValueError, "grad must be a matrix"),
    (torch.ones(2, 3, 4, 5), 0.1, {}, ValueError, "grad must be a matrix"),
    (torch.ones(0, 4), 0.1, {}, ValueError, "empty dimension"),
    (torch.ones(3, 0, 4), 0.1, {}, ValueError, "empty dimension"),
    (torch.ones(4, 4, dtype=torch.int64), 0.1, {}, TypeError, "grad must be float32"),
    (torch.ones(4, 4, dtype=torch.bool), 0.1, {}, TypeError, "grad must be float32"),
    (torch.ones(4, 4, dtype=torch.complex64), 0.1, {}, TypeError, "grad must be float32"),
    (torch.ones(4, 4, dtype=torch.float64), 0.1, {}, TypeError, "grad must be float32"),
    (GOOD, 0.0, {}, ValueError, "sigma"),
    (GOOD, -1.0, {}, ValueError, "sigma"),
    (GOOD, math.nan, {}, ValueError, "sigma"),
    (GOOD, math.inf, {}, ValueError, "sigma"),
    (GOOD, 0.1, {"kappa": 0.0}, ValueError, "kappa"),
    (GOOD, 0.1, {"kappa": math.nan}, ValueError, "kappa"),
    (GOOD, 0.1, {"rank": 7}, ValueError, "rank"),
    (GOOD, 0.1, {"rank": 0}, ValueError, "rank"),
    (GOOD, 0.1, {"rank": -2}, ValueError, "rank"),
    (GOOD, 0.1, {"shrinker": "soft"}, ValueError, "shrinker"),
    (GOOD, 0.1, {"norm": "l2"}, ValueError, "norm"),
    (GOOD, 0.1, {"oversample": -1}, ValueError, "oversample"),
    (GOOD, 0.1, {"niter": -2}, ValueError, "niter"),
    (GOOD, 0.1, {"niter": 10**9}, ValueError, "niter"),
]


@pytest.mark.parametrize(
    ("path", "grad", "sigma", "options", "error", "words"),
    [
        (path, *case)
        for path in PATHS
        for case in CASES
        # The reference has no range finder, so no oversample or niter to check.
        if not (path == "reference" and {"oversample", "niter"} & set(case[2]))
    ],
)
def test_bad_input_is_named(path, grad, sigma, options, error, words):
    with pytest.raises(error, match=words):
        PATHS[path](grad, sigma, **options)


@pytest.mark.parametrize("path", ["op", "triton", "reference", "wrapper"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("shape", [(6, 8), (8, 6), (2, 6, 8)])
def test_nan_or_inf_in_grad_is_refused(path, bad, shape):
    grad = torch.randn(shape)
    grad.view(-1)[5] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        PATHS[path](grad, 0.1)


# ----------------------------------------------------------------------------------------------
# denoise_warm: the same argument errors, and those of its basis
# ----------------------------------------------------------------------------------------------


def _basis_for(grad):
    if not isinstance(grad, torch.Tensor) or grad.dim() not in (2, 3):
        return torch.zeros(6, 2)
    return torch.zeros(*grad.shape[:-1], 1)


def _warm_op(grad, sigma, basis=None, **kw):
    basis = _basis_for(grad) if basis is None else basis
    return torch.ops.rmt.denoise_warm(grad, sigma, basis, **kw)


def _warm_meta(grad, sigma, basis=None, **kw):
    basis = _basis_for(grad) if basis is None else basis
    return torch.ops.rmt.denoise_warm(grad.to("meta"), sigma, basis.to("meta"), **kw)


def _warm_triton(grad, sigma, basis=None, **kw):
    from rmt_kernels.triton.denoise import denoise_warm_triton

    basis = _basis_for(grad) if basis is None else basis
    return denoise_warm_triton(grad, sigma, basis, **kw)


def _warm_wrapper(grad, sigma, basis=None, **kw):
    return rmt_kernels.denoise_warm(grad, sigma, basis, **kw)


WARM_PATHS = {
    "op": _warm_op,
    "meta": _warm_meta,
    "triton": _warm_triton,
    "wrapper": _warm_wrapper,
}


@pytest.mark.parametrize(
    ("path", "grad", "sigma", "options", "error", "words"),
    [(path, *case) for path in WARM_PATHS for case in CASES],
)
def test_warm_bad_input_is_named(path, grad, sigma, options, error, words):
    with pytest.raises(error, match=words):
        WARM_PATHS[path](grad, sigma, **options)


BAD_BASES = [
    # (grad, basis, exception, words)
    (GOOD, torch.zeros(5, 2), ValueError, "basis must have m = 6 rows"),
    (GOOD, torch.zeros(6, 2, dtype=torch.float64), TypeError, "basis must be float32"),
    (GOOD, torch.zeros(6, 2, dtype=torch.bfloat16), TypeError, "basis must be float32"),
    (GOOD, torch.zeros(1, 6, 2), ValueError, "basis must have 2 dimensions"),
    (GOOD, torch.zeros(6), ValueError, "basis must have 2 dimensions"),
    (GOOD, torch.zeros(6, 7), ValueError, r"at most min\(m, n\) = 6 columns"),
    (torch.ones(2, 6, 8), torch.zeros(3, 6, 2), ValueError, "one block per matrix"),
    (torch.ones(2, 6, 8), torch.zeros(6, 2), ValueError, "basis must have 3 dimensions"),
]


@pytest.mark.parametrize("path", list(WARM_PATHS))
@pytest.mark.parametrize(("grad", "basis", "error", "words"), BAD_BASES)
def test_bad_basis_is_named(path, grad, basis, error, words):
    with pytest.raises(error, match=words):
        WARM_PATHS[path](grad, 0.1, basis)


@pytest.mark.parametrize("path", ["op", "wrapper"])
def test_basis_on_another_device_is_named(path):
    with pytest.raises(ValueError, match="basis must be on grad's device"):
        WARM_PATHS[path](GOOD, 0.1, torch.zeros(6, 2, device="meta"))


@pytest.mark.parametrize("path", ["op", "triton", "wrapper"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_in_basis_is_refused(path, bad):
    basis = torch.zeros(6, 2)
    basis[3, 1] = bad
    with pytest.raises(ValueError, match="basis contains NaN or Inf"):
        WARM_PATHS[path](torch.randn(6, 8), 0.1, basis)


@pytest.mark.parametrize("path", ["op", "triton", "wrapper"])
@pytest.mark.parametrize("shape", [(6, 8), (8, 6), (2, 6, 8)])
def test_nan_in_grad_is_refused_on_a_warm_start(path, shape):
    grad = torch.randn(shape)
    grad.view(-1)[5] = math.nan
    basis = torch.randn(*shape[:-1], 2)
    with pytest.raises(ValueError, match="NaN or Inf"):
        WARM_PATHS[path](grad, 0.1, basis)


@pytest.mark.parametrize("path", ["op", "triton", "wrapper"])
def test_awkward_but_valid_bases_work(path):
    grad = torch.randn(6, 8)
    for basis in (
        torch.randn(3, 6).t(),  # non-contiguous
        torch.zeros(6, 6),  # min(m, n) zero columns
        torch.full((6, 3), 1e30),  # huge but finite
        torch.empty(6, 0),
    ):
        out, new_basis, passes = WARM_PATHS[path](grad, 0.1, basis)
        assert out.shape == grad.shape and torch.isfinite(out).all()
        assert torch.isfinite(new_basis).all() and int(passes) >= 1
