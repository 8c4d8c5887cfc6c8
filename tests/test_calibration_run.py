"""``make_private`` accounts for the run ``rmt-glue train`` would run: the same step count
(``run_steps``: the nearest whole number of ``epochs x batches``, not Opacus's truncated float
quotient) and the same check of a given noise multiplier over it (``run_noise_multiplier``).
Each test fails on the code before: ``int(epochs / sample_rate)`` calibrated 1 epoch of 93
batches for 92 steps, and a noise multiplier was never checked against the run's length."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rmt_kernels.dp import make_private
from rmt_kernels.dp.calibration import run_epsilon, run_noise_multiplier, run_steps

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha:UserWarning")

DELTA = 1e-5


def _private(loader: DataLoader, **kwargs):
    model = nn.Linear(4, 2)
    return make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        loader,
        target_delta=DELTA,
        max_grad_norm=1.0,
        accountant="rdp",
        **kwargs,
    )


def _loader(batches: int) -> DataLoader:
    data = TensorDataset(torch.randn(batches, 4), torch.randint(0, 2, (batches,)))
    return DataLoader(data, batch_size=1)


def test_run_steps_is_the_nearest_whole_number_not_a_truncated_quotient():
    # The premise: the float quotient Opacus truncates falls below the whole number.
    assert int(1 / (1 / 93)) == 92 and int(3 / (1 / 75)) == 224
    assert run_steps(1, 93) == 93 and run_steps(3, 75) == 225
    assert run_steps(0.5, 4) == 2 and run_steps(0.01, 10) == 1  # at least one step


def test_make_private_calibrates_for_every_step_of_the_epochs_it_is_given():
    # 1 epoch of 93 Poisson batches is 93 steps: the calibrated noise must spend at most the
    # target over all of them (calibrated for 92 it spends about 8.04).
    _, optimizer, _ = _private(_loader(93), target_epsilon=8.0, epochs=1)
    sigma = optimizer.engine.noise_multiplier
    assert run_epsilon(sigma, DELTA, 1 / 93, 93, "rdp") <= 8.0 * (1 + 1e-6)


def test_make_private_checks_a_given_noise_multiplier_over_the_run():
    # 1e7 steps at q 0.1: the PRV accountant could not account them (its grid alone would take
    # minutes and gigabytes); refused before any step, as rmt-glue train refuses it.
    with pytest.raises(ValueError, match="prv accountant cannot account 10000000 steps"):
        model = nn.Linear(4, 2)
        make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            DataLoader(TensorDataset(torch.randn(100, 4)), batch_size=10),
            target_delta=DELTA,
            max_grad_norm=1.0,
            noise_multiplier=1.0,
            epochs=1e6,
            accountant="prv",
        )
    # Without epochs the run's length is unknown: nothing to check, as before.
    _private(_loader(10), noise_multiplier=1.0)


def test_run_noise_multiplier_takes_exactly_one_of_target_and_noise():
    for kwargs in ({}, {"target_epsilon": 1.0, "noise_multiplier": 1.0}):
        with pytest.raises(ValueError, match="exactly one of target_epsilon and noise_multiplier"):
            run_noise_multiplier(DELTA, 0.1, 10, "rdp", **kwargs)
