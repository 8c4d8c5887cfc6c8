"""White-box audit of a checkpointed, killed and resumed run (rmt_kernels.audit.resume).

Set-up of tests/test_audit_whitebox.py (BASE: m = 4096, 4 full-batch steps at sigma 8, mu 0.25,
accountant epsilon 1.68 at delta 1e-12, p_fail 1e-7), checkpoint after step 1 (0-based: step
0 is in it), killed after the backward of step 3: steps 1 and 2 are released twice (killed run,
then the resumed run) and the ledger holds steps 0-3.

- Same data (the honest free replay): the replays equal the first releases bit for bit, the
  accountant counts 4 steps (1.68) and the bound is the one-run bound (measured 0.125).
- Other data (the canaries removed), honest engine: the data fingerprint differs, so the noise
  is re-keyed and steps 1-3 are charged again (7 steps: 2.24); the difference term sees the
  canaries under two independent noises (measured bound 0.0).
- Other data with the planted bug (no re-key, the fingerprint check "matches"): the same noise
  on other data, so first release - replay is the canaries' noise-free contribution: every
  guess right, 2048 of them give 6.92 > 2.5 x 1.68 (the accountant, told the replay was free,
  says 1.68).

False failures: the honest bounds are wrong with probability <= 1e-7 each (the one-run theorem:
the score is a fixed function of the released outputs); seeds fixed, so every run is the same.
"""

import math

import numpy as np
import pytest

import rmt_kernels.dp.checkpoint as checkpoint_module
from rmt_kernels.audit import gaussian_epsilon
from rmt_kernels.audit.resume import white_box_resume_audit
from rmt_kernels.audit.whitebox import white_box_audit
from rmt_kernels.audit.whitebox_config import WhiteBoxConfig
from rmt_kernels.dp.engine import PrivateEngine

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")

BASE = WhiteBoxConfig(
    canaries=4096, examples=256, steps=4, noise_multiplier=8.0, p_fail=1e-7, delta=1e-12, seed=0
)
POINTS = {"checkpoint_after": 1, "kill_after": 3}


def assert_accountant_counts(epsilon: float, steps: int) -> None:
    """The PRV accountant's epsilon is the exact one of ``steps`` full-batch Gaussian steps of
    sigma 8 (mu = sqrt(steps) / 8; 1.669 for 4 steps, 2.235 for 7), within its error budget."""
    exact = gaussian_epsilon(math.sqrt(steps) / BASE.noise_multiplier, BASE.delta)
    assert exact <= epsilon <= exact + 0.02


def test_resume_on_same_data_replays_exactly_and_bound_below_accountant(tmp_path):
    res = white_box_resume_audit(BASE, folder=tmp_path, **POINTS)
    assert_accountant_counts(res.accountant_epsilon, 4)
    assert res.audit.epsilon < res.accountant_epsilon
    # A free replay is exact: the scores are those of the uninterrupted run.
    assert np.array_equal(res.scores, white_box_audit(BASE).scores)


def test_resume_on_other_data_is_charged_and_bound_below_accountant():
    res = white_box_resume_audit(BASE, other_data=True, **POINTS)
    # Steps 1, 2, 3 charged twice: 7 steps of sigma 8.
    assert_accountant_counts(res.accountant_epsilon, 7)
    assert res.audit.epsilon < res.accountant_epsilon


def test_same_noise_replayed_on_other_data_caught(monkeypatch):
    monkeypatch.setattr(checkpoint_module, "_replay_blockers", lambda *args: [])
    monkeypatch.setattr(PrivateEngine, "rekey_noise", lambda self, salt: None)
    res = white_box_resume_audit(BASE, other_data=True, **POINTS)
    assert_accountant_counts(res.accountant_epsilon, 4)
    assert res.audit.correct == res.audit.guesses >= 2048
    assert res.audit.epsilon > 2.5 * res.accountant_epsilon


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"checkpoint_after": 0, "kill_after": 2}, "checkpoint_after"),
        ({"checkpoint_after": 4, "kill_after": 3}, "checkpoint_after"),
        ({"checkpoint_after": 2, "kill_after": 1}, "kill_after"),
        ({"checkpoint_after": 1, "kill_after": 4}, "kill_after"),
    ],
)
def test_resume_audit_rejects_bad_points(kwargs, match):
    with pytest.raises(ValueError, match=match):
        white_box_resume_audit(BASE, **kwargs)
