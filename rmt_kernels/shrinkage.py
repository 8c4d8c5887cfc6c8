"""Marchenko-Pastur singular-value shrinkage: the math as small pure functions.

An m x n matrix of i.i.d. N(0, s^2) entries has singular values filling a bulk whose upper edge is
``s * (sqrt(m) + sqrt(n))``. With p = min(m, n), q = max(m, n), beta = p / q and the normalised
value ``y = singular_value / (s * sqrt(q))``, the bulk edge sits at ``y = 1 + sqrt(beta)`` and the
Gavish-Donoho shrinkers (Gavish & Donoho, "Optimal Shrinkage of Singular Values", 2017) are

- frobenius: ``sqrt((y^2 - beta - 1)^2 - 4 beta) / y``  (optimal for Frobenius loss)
- operator:  ``x(y) = sqrt(((y^2 - beta - 1) + sqrt((y^2 - beta - 1)^2 - 4 beta)) / 2)``, the
  debiased signal value (optimal for operator-norm loss)
- nuclear:   ``max(0, x^4 - sqrt(beta) x y - beta) / (x^2 y)``
- hard:      ``y`` (keep every value above the threshold unchanged)

each applied only above the threshold ``kappa * (1 + sqrt(beta))`` and zero at or below it (the
formulas turn positive again below ``1 - sqrt(beta)``). ``kappa`` scales the assumed noise level,
so the shrinkers are evaluated at ``kappa * s`` and stay continuous at the threshold. Above
``y = SHRINK_IDENTITY_ABOVE`` (1e8) every shrinker equals ``y`` to within a relative ``3 / y^2``,
below double rounding, and returns the value itself: the formulas, which square ``y`` twice, are
only evaluated up to there, so they stay finite however small the noise is next to the signal.

The formulas exist once per language: here (the reference, the Triton path's host code and the
tests), ``_shrink`` in ``rmt_kernels/triton/reconstruct.py`` and ``shrink`` in
``csrc/cpu/denoise.cpp``; tests/denoise/test_shrinkers_agree.py checks that the three agree on a
grid.
"""

from __future__ import annotations

import math

import torch

from rmt_kernels import _C

SHRINKERS = ("frobenius", "operator", "nuclear", "hard")
NORM_CORRECTIONS = ("none", "preserve", "debiased")
# Normalised value above which every shrinker is the identity (csrc/constants.h).
SHRINK_IDENTITY_ABOVE: float = _C.SHRINK_IDENTITY_ABOVE


def bulk_edge(m: int, n: int, sigma: float) -> float:
    """Upper edge ``sigma * (sqrt(m) + sqrt(n))`` of the singular values of m x n pure noise."""
    return sigma * (math.sqrt(m) + math.sqrt(n))


def shrink_singular_values(
    s: torch.Tensor,
    m: int,
    n: int,
    sigma: float,
    shrinker: str = "frobenius",
    kappa: float = 1.0,
) -> torch.Tensor:
    """Shrink the singular values ``s`` of a noisy m x n matrix with per-entry noise std ``sigma``.

    Returns a tensor like ``s``: the shrunk values, exactly zero at or below ``kappa`` times the
    bulk edge.
    """
    if shrinker not in SHRINKERS:
        raise ValueError(f"shrinker must be one of {SHRINKERS}, got {shrinker!r}")
    p, q = min(m, n), max(m, n)
    beta = p / q
    noise_scale = kappa * sigma * math.sqrt(q)
    y_in = s / noise_scale
    y = y_in.clamp_max(SHRINK_IDENTITY_ABOVE)
    t = y * y - (beta + 1.0)
    root = (t * t - 4.0 * beta).clamp_min(0.0).sqrt()
    if shrinker == "frobenius":
        shrunk = root / y
    elif shrinker == "hard":
        shrunk = y
    else:
        x = ((t + root) * 0.5).clamp_min(0.0).sqrt()
        if shrinker == "operator":
            shrunk = x
        else:
            shrunk = (x**4 - math.sqrt(beta) * x * y - beta).clamp_min(0.0) / (x * x * y)
    value = torch.where(y_in > SHRINK_IDENTITY_ABOVE, s, shrunk * noise_scale)
    above = s > kappa * bulk_edge(p, q, sigma)
    return torch.where(above, value, torch.zeros_like(value))


def target_norm(
    grad_sq_norm: torch.Tensor, m: int, n: int, sigma: float, norm: str
) -> torch.Tensor:
    """Frobenius norm the estimate is rescaled to, from the noisy matrix's squared norm.

    ``preserve`` keeps the noisy norm; ``debiased`` removes the noise's expected share,
    ``sqrt(max(||G||_F^2 - sigma^2 m n, 0))`` (the norm correction of arXiv 2510.01137).
    """
    if norm == "preserve":
        return grad_sq_norm.sqrt()
    if norm == "debiased":
        return (grad_sq_norm - sigma * sigma * m * n).clamp_min(0.0).sqrt()
    raise ValueError(f"norm must be 'preserve' or 'debiased' here, got {norm!r}")


def norm_correction_factor(shrunk: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-matrix factor that rescales shrunk values (..., k) to the target norms (...,).

    ``||U diag(eta) V^T||_F = ||eta||_2``, so no reconstruction is needed. An estimate of zero
    stays zero: there is no direction to give the target norm to.
    """
    estimate = shrunk.double().square().sum(-1).sqrt()
    factor = torch.where(estimate > 0, target.double() / estimate.clamp_min(1e-300), 0.0)
    return factor.to(shrunk.dtype)
