"""Empirical privacy audit in one training run (Steinke, Nasr and Jagielski, NeurIPS 2023).

Insert canaries, each included with probability 1/2, train once, score the canaries, guess which
were in (abstaining on the unsure), and turn the right guesses into an epsilon lower bound at a
confidence level. A bound above the accountant's epsilon proves a privacy bug.

- :mod:`~rmt_kernels.audit.bound`: the paper's p-value and the epsilon lower bound.
- :mod:`~rmt_kernels.audit.fdp`: the f-DP one-run bound (Mahloujifar, Melis and Chaudhuri,
  ICML 2025): a mu-GDP lower bound, far tighter for Gaussian noise.
- :mod:`~rmt_kernels.audit.guesses`: coin flips, guesses with abstention.
- :mod:`~rmt_kernels.audit.strategy`: choosing the guess counts without voiding the bound.
- :mod:`~rmt_kernels.audit.whitebox`: Dirac canaries through the native engine, in stages:
  its options (:mod:`~rmt_kernels.audit.whitebox_config`), the canaries
  (:mod:`~rmt_kernels.audit.canaries`), the private training run
  (:mod:`~rmt_kernels.audit.canary_run`), the scores and their bounds
  (:mod:`~rmt_kernels.audit.whitebox_scores`).
- :mod:`~rmt_kernels.audit.distributed`: the white-box audit on several gloo processes.
- :mod:`~rmt_kernels.audit.resume`: the white-box audit of a checkpointed, killed and resumed
  run (the whole released sequence, replays included).
- :mod:`~rmt_kernels.audit.blackbox`: mislabelled canaries, scored by the final model's loss.
- :mod:`~rmt_kernels.audit.gaussian`: the Gaussian mechanism's exact epsilon (the yardstick).
- ``rmt-audit`` / ``python -m rmt_kernels.audit``: the command.
"""

from rmt_kernels.audit.bound import epsilon_lower_bound, p_value
from rmt_kernels.audit.fdp import (
    dp_epsilon_lower_bound,
    fdp_rejects,
    gdp_epsilon_lower_bound,
    gdp_mu_lower_bound,
)
from rmt_kernels.audit.gaussian import gaussian_delta, gaussian_epsilon
from rmt_kernels.audit.guesses import count_correct, draw_inclusion, make_guesses
from rmt_kernels.audit.strategy import (
    AuditResult,
    Bonferroni,
    Fixed,
    Split,
    audit,
    default_choices,
)

__all__ = [
    "AuditResult",
    "Bonferroni",
    "Fixed",
    "Split",
    "audit",
    "count_correct",
    "default_choices",
    "dp_epsilon_lower_bound",
    "draw_inclusion",
    "epsilon_lower_bound",
    "fdp_rejects",
    "gaussian_delta",
    "gaussian_epsilon",
    "gdp_epsilon_lower_bound",
    "gdp_mu_lower_bound",
    "make_guesses",
    "p_value",
]
