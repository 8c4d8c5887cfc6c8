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
