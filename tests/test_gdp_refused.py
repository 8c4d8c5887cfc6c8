"""Opacus's GDP accountant is refused: its epsilon is not an upper bound.

Red team (round 2): ``accountant="gdp"`` was offered by make_private, the Opacus drop-in,
rmt-glue and rmt-audit without a word. It is a central-limit approximation of the subsampled
Gaussian mechanism and under-reports epsilon, so a run "at epsilon 1" calibrated with it spends
2.48 by the PRV accountant's upper bound.
"""

from __future__ import annotations

import pytest
import torch
from opacus.accountants import GaussianAccountant, PRVAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rmt_kernels.dp import make_private
from rmt_kernels.dp.calibration import calibrate_noise_multiplier, run_epsilon
from rmt_kernels.opacus import DenoisingPrivacyEngine

SIGMA, Q, STEPS, DELTA = 1.0, 0.01, 100, 1e-5


def test_the_premise_gdp_reports_less_than_the_prv_upper_bound():
    gdp, prv = GaussianAccountant(), PRVAccountant()
    for accountant in (gdp, prv):
        accountant.history = [(SIGMA, Q, STEPS)]
    assert gdp.get_epsilon(delta=DELTA) < 0.7 * prv.get_epsilon(delta=DELTA)  # 0.458 vs 0.728


def _loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.zeros(8, 3), torch.zeros(8, dtype=torch.long)), 2)


def test_make_private_refuses_gdp():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"accountant='gdp'.*central-limit"):
        make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            _loader(),
            target_delta=DELTA,
            max_grad_norm=1.0,
            noise_multiplier=1.0,
            accountant="gdp",
        )


def test_the_calibration_and_run_epsilon_refuse_gdp():
    with pytest.raises(ValueError, match="central-limit"):
        calibrate_noise_multiplier(1.0, DELTA, Q, STEPS, "gdp")
    with pytest.raises(ValueError, match="central-limit"):
        run_epsilon(SIGMA, DELTA, Q, STEPS, "gdp")


def test_the_opacus_drop_in_refuses_gdp():
    with pytest.raises(ValueError, match="central-limit"):
        DenoisingPrivacyEngine(accountant="gdp")


@pytest.mark.parametrize("command", ["glue", "audit"])
def test_the_commands_refuse_gdp(command, capsys):
    if command == "glue":
        from rmt_kernels.glue.cli import main

        argv = ["train", "--task", "sst2", "--accountant", "gdp"]
    else:
        from rmt_kernels.audit.cli import main

        argv = ["--accountant", "gdp"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "invalid choice: 'gdp'" in capsys.readouterr().err
