"""Epsilon is never reported below 0.

The PRV accountant solves delta(eps) = delta on the hockey-stick curve extended to negative eps;
at a large delta and few steps its upper bound is negative (-0.22 for one step at sigma 2,
q 1, delta 0.3). A negative epsilon means (0, delta)-DP (delta(eps) is non-increasing), so every
report must say 0, never a negative number (issue 24: "epsilon never negative").
"""

from __future__ import annotations

import pytest
import torch
from opacus.accountants import PRVAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rmt_kernels.dp import make_private
from rmt_kernels.dp.calibration import spent_epsilon
from rmt_kernels.opacus import DenoisingPrivacyEngine

SIGMA, DELTA = 2.0, 0.3


def _negative_prv() -> PRVAccountant:
    accountant = PRVAccountant()
    accountant.step(noise_multiplier=SIGMA, sample_rate=1.0)
    return accountant


def test_the_prv_accountant_really_goes_negative_here():
    # The premise: without the clamp this set-up reports a negative epsilon.
    assert _negative_prv().get_epsilon(delta=DELTA) < -0.1


def test_spent_epsilon_is_zero_where_prv_is_negative():
    assert spent_epsilon(_negative_prv(), DELTA) == 0.0
    # A positive value is passed through unchanged.
    accountant = PRVAccountant()
    for _ in range(10):
        accountant.step(noise_multiplier=1.0, sample_rate=0.5)
    assert spent_epsilon(accountant, 1e-5) == accountant.get_epsilon(delta=1e-5) > 0


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(4, 3, generator=g), torch.randint(0, 2, (4,), generator=g))


def _one_step(model, optimizer, loader) -> None:
    for x, y in loader:
        if len(x):
            nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        break


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_native_engine_reports_zero_not_negative():
    model = nn.Sequential(nn.Linear(3, 2))
    loader = DataLoader(_data(), batch_size=4)  # sample rate 1
    model, optimizer, loader = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        loader,
        target_delta=DELTA,
        max_grad_norm=1.0,
        noise_multiplier=SIGMA,
    )
    _one_step(model, optimizer, loader)
    assert optimizer.engine.steps == 1
    assert optimizer.get_epsilon(DELTA) == 0.0


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_opacus_drop_in_reports_zero_not_negative():
    model = nn.Sequential(nn.Linear(3, 2))
    engine = DenoisingPrivacyEngine(accountant="prv")
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_data(), batch_size=4),
        noise_multiplier=SIGMA,
        max_grad_norm=1.0,
    )
    _one_step(model, optimizer, loader)
    assert len(engine.accountant) == 1
    assert engine.get_epsilon(DELTA) == 0.0
