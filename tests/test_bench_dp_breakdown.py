"""bench/dp_step_breakdown.py files each package op under the group its table names."""

from __future__ import annotations

import pytest

from bench.dp_step_breakdown import group_of


@pytest.mark.parametrize(
    ("op", "group"),
    [
        ("rmt::linear_sq_norms", "certified norms"),
        ("rmt::embedding_sq_norms", "certified norms"),
        ("rmt::layernorm_clipped_noisy_sum", "clipped noisy sums (noise drawn inside)"),
        ("rmt::denoise_warm", "denoising"),
        ("rmt::denoise", "denoising"),
        ("rmt::add_gaussian_noise", "other package ops"),
    ],
)
def test_each_op_lands_in_its_group(op, group):
    assert group_of(op) == group
