"""White-box audit on 2 processes (rmt_kernels.audit.distributed): gloo on the CPU, the native
engine all-reducing the clipped sums with rank 0 alone adding the noise.

One 2-process launch runs three jobs (spawning the processes costs more than a job):

- the engine as shipped at the set-up of tests/test_audit_whitebox.py (BASE: m = 4096, 4
  full-batch steps at sigma 8, mu 0.25, accountant epsilon 1.68 at delta 1e-12, p_fail 1e-7):
  its bound stays below the accountant's. Rank 0's noise key is the one-process key, so the
  released gradients, scores and bound are those of the one-process run (epsilon 0.125);
- planted bug "no rank adds the noise" (rank 0 believes another rank adds it): scores
  noise-free, every guess right, bound 6.92 > 2.5 x 1.68 (the margin of test_audit_whitebox.py);
- planted bug "rank 1 adds the noise, at std / 2" (the wrong rank with a per-rank share), at
  the HALVED set-up of test_audit_whitebox.py (m = 32768, 2 steps at sigma sqrt 2, claim mu 1,
  epsilon 4.90 at delta 1e-6, 95% confidence): rank 1 draws the same key, so the released
  gradient is exactly the one-process "noise halved" run's, f-DP mu 1.181 > 1 (epsilon 5.91).

False failures: as in tests/test_audit_whitebox.py (the honest bound is wrong with probability
<= 1e-7; the seeds are fixed, so every run is the same). Before this module the audit could
not run on several processes at all (no launcher, and the planted bugs need rank-aware
patches in the spawned processes).
"""

import contextlib

import numpy as np
import pytest

from rmt_kernels.audit import gaussian_epsilon
from rmt_kernels.audit.distributed import white_box_audit_distributed
from rmt_kernels.audit.whitebox_config import WhiteBoxConfig

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")

BASE = WhiteBoxConfig(
    canaries=4096, examples=256, steps=4, noise_multiplier=8.0, p_fail=1e-7, delta=1e-12, seed=0
)
HALVED = WhiteBoxConfig(
    canaries=32768,
    examples=256,
    steps=2,
    noise_multiplier=2**0.5,
    p_fail=0.05,
    delta=1e-6,
    seed=0,
)


@contextlib.contextmanager
def _noise_on(rank_adding: int | None, scale: float):
    """PrivateEngine.add_noise with the noise added by ``rank_adding`` (None: by no rank) at
    ``scale`` times its std. Module-level, so the spawned processes can unpickle it."""
    from rmt_kernels.dp.engine import PrivateEngine

    real_add, real_sigma = PrivateEngine.add_noise, PrivateEngine.sigma

    def add_noise(self):
        rank = self.rank
        # The engine adds noise where self.rank == 0: pretend to be rank 0 on rank_adding only.
        self.rank = 0 if rank == rank_adding else 1
        PrivateEngine.sigma = lambda s: real_sigma(s) * scale
        try:
            return real_add(self)
        finally:
            PrivateEngine.sigma = real_sigma
            self.rank = rank

    PrivateEngine.add_noise = add_noise
    try:
        yield
    finally:
        PrivateEngine.add_noise = real_add


def no_rank_adds_noise(rank: int):
    return _noise_on(None, 1.0)


def rank1_adds_half_noise(rank: int):
    return _noise_on(1, 0.5)


@pytest.fixture(scope="module")
def results():
    return white_box_audit_distributed(
        [BASE, BASE, HALVED], plants=[None, no_rank_adds_noise, rank1_adds_half_noise]
    )


def test_two_process_engine_bound_below_accountant(results):
    honest = results[0]
    exact = gaussian_epsilon(BASE.claimed_mu, BASE.delta)  # 1.669
    assert exact <= honest.accountant_epsilon <= exact + 0.02
    assert honest.audit.epsilon < honest.accountant_epsilon
    # The noise entered once: OUT scores have the claimed std sigma sqrt(steps) = 16 (6 sigma
    # of its estimate from 2048 draws: 0.8), not sqrt(2) x 16 (noise on both ranks) nor 0.
    out = honest.scores[~honest.included]
    assert abs(out.std() - 16.0) < 0.8


def test_two_process_no_noise_caught(results):
    bug = results[1]
    # OUT scores are 0 up to the float32 rounding of the other examples' exactly cancelling
    # terms (measured 1.6e-17 on the LayerNorm weight), far below the IN canaries' 4.
    assert np.all(np.abs(bug.scores[~bug.included]) < 1e-6)
    assert bug.audit.correct == bug.audit.guesses >= 2048
    assert bug.audit.epsilon > 2.5 * bug.accountant_epsilon


def test_two_process_rank1_half_noise_caught(results):
    bug = results[2]
    exact = gaussian_epsilon(HALVED.claimed_mu, HALVED.delta)  # 4.887
    assert exact <= bug.accountant_epsilon <= exact + 0.02
    assert bug.audit.method == "fdp" and bug.audit.mu > 1.0
    assert bug.audit.epsilon > bug.accountant_epsilon


def test_distributed_rejects_bad_arguments():
    with pytest.raises(ValueError, match="world_size"):
        white_box_audit_distributed([BASE], world_size=1)
    with pytest.raises(ValueError, match="configs"):
        white_box_audit_distributed([])
    with pytest.raises(ValueError, match="plants"):
        white_box_audit_distributed([BASE], plants=[None, None])
