"""The workloads of bench/denoise_edge.py are what its tables say they are: noisy
singular values at the stated multiples of the bulk edge, sub-threshold components invisible,
signal subspaces turning by about ROTATION radians a step."""

from __future__ import annotations

import math

import pytest
import torch

from bench.denoise_edge import (
    NEAR_EDGE_HIDDEN,
    NEAR_EDGE_OBSERVED,
    ROTATION,
    SIGMA,
    hidden_value,
    make_sequence,
    signal_value,
    workload_values,
)
from bench.workloads import roberta_base_weight_shapes


def _bbp(x: float, beta: float) -> float:
    """Where a clean value x (units of sigma sqrt(max(m, n))) lands in the noisy spectrum."""
    return math.sqrt((1 + x * x) * (beta + x * x)) / x


@pytest.mark.parametrize("shape", [(768, 768), (3072, 768), (768, 3072), (300, 517)])
def test_signal_value_inverts_the_bbp_map(shape):
    m, n = shape
    beta, scale = min(m, n) / max(m, n), SIGMA * math.sqrt(max(m, n))
    for ratio in NEAR_EDGE_OBSERVED:
        x = signal_value(ratio, m, n, SIGMA) / scale
        assert _bbp(x, beta) == pytest.approx(ratio * (1 + math.sqrt(beta)), rel=1e-12)
    for fraction in NEAR_EDGE_HIDDEN:  # below the detection threshold beta^(1/4)
        assert hidden_value(fraction, m, n, SIGMA) / scale < beta**0.25


def test_near_edge_spectra_and_rotation_as_stated():
    for shape in sorted(set(roberta_base_weight_shapes())):
        m, n = shape
        edge = SIGMA * (math.sqrt(m) + math.sqrt(n))
        seq = make_sequence("near edge", [shape], 2, seed=1)
        values = torch.linalg.svdvals(seq.noisy(1)[0].double()) / edge
        visible = len(NEAR_EDGE_OBSERVED)
        # An outlier fluctuates by O(1/sqrt(n)) (about 1% here): 5% is five of those.
        for got, want in zip(values[:visible].tolist(), NEAR_EDGE_OBSERVED, strict=True):
            assert got == pytest.approx(want, rel=0.05), shape
        # Nothing else sticks out: the sub-threshold components stay in the bulk (its top
        # fluctuates by O(n^(-2/3)) of the edge, about 1.2% here).
        assert float(values[visible]) < 1.03, shape
        # The subspaces turn by about ROTATION a step (every principal angle).
        u0, u1 = seq.factors[0][0][0], seq.factors[1][0][0]
        angles = torch.arccos(torch.linalg.svdvals(u0.T @ u1).clamp(max=1.0))
        assert bool(((angles > 0.8 * ROTATION) & (angles < 1.2 * ROTATION)).all()), angles


def test_rank4_is_the_denoise_benchmarks_profile():
    values = workload_values("rank 4", 768, 3072, SIGMA)
    edge = SIGMA * (math.sqrt(768) + math.sqrt(3072))
    assert torch.allclose(values / edge, torch.linspace(1.5, 5.0, 4))


def test_pure_noise_has_no_signal_and_is_scored_against_the_noise():
    from bench.denoise_edge import error_ratio, errors

    shape = (48, 64)
    seq = make_sequence("pure noise", [shape], 2, seed=3)
    (clean,), (noisy,) = seq.clean(1), seq.noisy(1)
    assert float(clean.abs().max()) == 0.0
    # The exact shrinker's answer (zero) has error 0; returning the noise has error 1.
    assert errors([torch.zeros(shape)], [clean], [shape], [noisy])[0] == 0.0
    assert errors([noisy], [clean], [shape], [noisy])[0] == pytest.approx(1.0)
    assert error_ratio(0.0, 0.0) == 1.0 and error_ratio(0.1, 0.0) == math.inf
