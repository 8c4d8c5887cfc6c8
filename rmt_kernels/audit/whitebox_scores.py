"""The white-box audit's scores, their bounds and the sensitivity check.

A canary's step-t score is the projection of the release on its direction at step t, in units of
``C / expected batch``: an IN canary adds about 1 per step it is sampled, exactly 0 when OUT, and
the noise adds ``noise_multiplier`` of spread.

Scores (every one a fixed function of the released gradients, so each gives a valid bound):

- ``sum``: the sum over steps (the strongest score for a bug spread over the run). Each
  canary's signs ``s_t`` are a seeded, balanced sequence: against independent noise they change
  nothing, but noise repeated across steps cancels from every canary's sum exactly.
- ``step t``: the step-t score alone, for each t. A bug in some steps only (noise missing on
  every other step) is averaged away by the sum (the noisy steps hide it) but not here.
- ``pair``: canaries at the same flat index of two parameters (Linear weight (r, c) and
  Embedding (r, c); Linear bias k and LayerNorm bias k) share their signs, and each one's score
  is the sum over steps of its release minus its partner's. Independent noise makes this
  noisier (variance doubled); noise shared by the parameters (one stream for all: the same
  Philox counters) cancels exactly, leaving the two canaries' contributions.

Each score gives a bound (``audit`` of :mod:`rmt_kernels.audit.strategy`) at its share of
``p_fail`` (:data:`P_FAIL_SHARES`); by the union bound all hold together with probability >=
1 - p_fail, so their maximum is the run's bound.

The sensitivity check. A bound needs many right guesses: one unclipped example (say the first
row of every batch) gives one canary a huge score and one right guess, which proves nothing
about epsilon. So the scores are also checked against the mechanism the accountant assumes: a
canary's step score is its clipped contribution, in [0, 1], plus Gaussian noise of std
``noise_multiplier``; a step score above ``1 + z sigma`` or below ``-z sigma`` (z set by the
check's share of ``p_fail`` over the m T step scores; the same for the sums, in [0, T] with noise
``sigma sqrt(T)``) contradicts it: some example moved the release by more than clipping allows.
The check needs the release's exact law, so it runs only without post-processing
(``denoise=None``: a denoised release is not Gaussian around the clipped sum).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from scipy import special

from rmt_kernels.audit.canaries import canary_layout
from rmt_kernels.audit.strategy import AuditResult, Bonferroni, Fixed, Split, audit
from rmt_kernels.audit.whitebox_config import WhiteBoxConfig

__all__ = [
    "P_FAIL_SHARES",
    "SensitivityCheck",
    "WhiteBoxResult",
    "bound_score_families",
    "score_families",
    "sensitivity_check",
]

# Shares of p_fail: the summed score, all per-step scores together (each step 1 / (8 steps)),
# the pair score, and the sensitivity check (half for the step scores, half for the sums). The
# summed score keeps most of it: it carries the bound against bugs spread over the run (noise
# halved), where a smaller level costs tightness; the others target gross bugs that give
# all-right guesses or scores hundreds of standard deviations out, where a level 16 times
# smaller costs little (the f-DP bound of 2048 right guesses falls by about 3%).
P_FAIL_SHARES = {"sum": 3 / 4, "steps": 1 / 8, "pair": 1 / 16, "sensitivity": 1 / 16}


@dataclasses.dataclass(frozen=True)
class SensitivityCheck:
    """The scores checked against clipping plus the claimed Gaussian noise (module docstring).

    Attributes:
        step_excess: the largest ``max(score - 1, -score) / sigma`` over canaries and steps.
        step_threshold: z with ``2 m T Phi(-z)`` = half the check's ``p_fail``.
        sum_excess: the largest ``max(sum - T, -sum) / (sigma sqrt(T))`` over canaries.
        sum_threshold: z with ``2 m Phi(-z)`` = the other half.
        canary, step: where the largest step excess is.
        p_fail: the check's share of the audit's p_fail: an honest run flags with at most this
            probability.
    """

    step_excess: float
    step_threshold: float
    sum_excess: float
    sum_threshold: float
    canary: int
    step: int
    p_fail: float

    @property
    def flagged(self) -> bool:
        """Whether a score lies outside what clipping and the claimed noise allow."""
        return self.step_excess > self.step_threshold or self.sum_excess > self.sum_threshold

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "flagged": self.flagged}


@dataclasses.dataclass
class WhiteBoxResult:
    """An audit of one run: the bound, the accountant's epsilon, and the raw material.

    Attributes:
        config: the run.
        audit: the best score's bound (the largest epsilon; ``family`` names the score).
        accountant_epsilon: the accountant's epsilon at ``config.delta``.
        scores: (m,) the summed scores.
        included: (m,) the coin flips.
        family: the score that gave ``audit``: "sum", "step t" or "pair".
        families: every score's bound, by name.
        step_scores: (steps, m) the per-step scores (None for a resume audit).
        sensitivity: the sensitivity check, or None where it does not apply.
    """

    config: WhiteBoxConfig
    audit: AuditResult
    accountant_epsilon: float
    scores: np.ndarray
    included: np.ndarray
    family: str = "sum"
    families: dict[str, AuditResult] = dataclasses.field(default_factory=dict)
    step_scores: np.ndarray | None = None
    sensitivity: SensitivityCheck | None = None

    @property
    def bug(self) -> bool:
        """A bound above the accountant's epsilon, or a score that clipping cannot explain."""
        flagged = self.sensitivity is not None and self.sensitivity.flagged
        return self.audit.epsilon > self.accountant_epsilon or flagged

    def to_dict(self) -> dict:
        """JSON-ready summary (scores and coin flips left out)."""
        return {
            "mode": "white-box",
            "config": dataclasses.asdict(self.config),
            "accountant_epsilon": self.accountant_epsilon,
            "epsilon_lower_bound": self.audit.epsilon,
            "method": self.audit.method,
            "claimed_mu": self.config.claimed_mu,
            "mu_lower_bound": self.audit.mu,
            "confidence": 1 - self.config.p_fail,
            "family": self.family,
            "audit": self.audit.to_dict(),
            "families": {k: v.epsilon for k, v in self.families.items()},
            "sensitivity": None if self.sensitivity is None else self.sensitivity.to_dict(),
            "bug": self.bug,
        }


def sensitivity_check(
    cfg: WhiteBoxConfig, step_scores: torch.Tensor, p_fail: float
) -> SensitivityCheck:
    """The sensitivity check of (steps, m) step scores (module docstring)."""
    steps, m = step_scores.shape
    sigma = cfg.noise_multiplier
    per_step = torch.maximum(step_scores - 1, -step_scores) / sigma
    summed = step_scores.sum(0)
    per_sum = torch.maximum(summed - steps, -summed) / (sigma * math.sqrt(steps))
    # P[|N(0, 1)| > z] = 2 Phi(-z) per score; union bound over the scores of each half.
    z_step = float(-special.ndtri(p_fail / 2 / (2 * m * steps)))
    z_sum = float(-special.ndtri(p_fail / 2 / (2 * m)))
    where = int(per_step.argmax())
    return SensitivityCheck(
        step_excess=float(per_step.max()),
        step_threshold=z_step,
        sum_excess=float(per_sum.max()),
        sum_threshold=z_sum,
        canary=where % m,
        step=where // m,
        p_fail=p_fail,
    )


def score_families(
    cfg: WhiteBoxConfig, step_scores: torch.Tensor
) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """The scores of the module docstring: {name: (canary indices, scores, share of p_fail)}."""
    steps = step_scores.shape[0]
    everyone = np.arange(cfg.canaries)
    out = {"sum": (everyone, step_scores.sum(0).numpy(), P_FAIL_SHARES["sum"])}
    if steps > 1:
        for t in range(steps):
            share = P_FAIL_SHARES["steps"] / steps
            out[f"step {t}"] = (everyone, step_scores[t].numpy(), share)
    partner = canary_layout(cfg).partner
    paired = np.flatnonzero(partner >= 0)
    if paired.size >= 2:
        # Release minus partner's release, signed by the shared signs: the step scores are
        # signs * release, so the partner's step score enters as is.
        j = torch.from_numpy(partner[paired])
        i = torch.from_numpy(paired)
        pair = (step_scores[:, i] - step_scores[:, j]).sum(0)
        out["pair"] = (paired, pair.numpy(), P_FAIL_SHARES["pair"])
    return out


def bound_score_families(
    cfg: WhiteBoxConfig,
    families: dict[str, tuple[np.ndarray, np.ndarray, float]],
    included: np.ndarray,
    accountant_epsilon: float,
    strategy: Bonferroni | Split | Fixed | None,
    step_scores: torch.Tensor | None = None,
    sensitivity_share: float = 0.0,
) -> WhiteBoxResult:
    """The audit of each score family ``{name: (canaries, scores, share of p_fail)}`` (the
    first is reported as ``scores``) and, with ``step_scores`` and a share, the sensitivity
    check. Under torch.distributed every rank must hold the same scores (the released gradient
    is the same on every rank; checked: a RuntimeError otherwise); rank 0 computes the bounds
    and sends them to the others."""
    from rmt_kernels.dp import distributed

    first = next(iter(families.values()))[1]
    rank, world_size = distributed.world()
    if world_size > 1:
        import torch.distributed as dist

        mine = first if step_scores is None else step_scores.numpy()
        every = [None] * world_size
        dist.all_gather_object(every, mine.tobytes())
        if any(b != every[0] for b in every):
            raise RuntimeError(
                "white-box audit: the canary scores differ across ranks (the released "
                "gradient must be the same on every rank)"
            )
    result = None
    if rank == 0:
        results = {
            name: audit(
                scores,
                included[which],
                p_fail=cfg.p_fail * share,
                delta=cfg.delta,
                strategy=strategy,
                method=cfg.resolved_method,
            )
            for name, (which, scores, share) in families.items()
        }
        check = None
        if step_scores is not None and sensitivity_share > 0:
            check = sensitivity_check(cfg, step_scores, cfg.p_fail * sensitivity_share)
        result = results, check
    results, check = distributed.broadcast_object(result)
    best = max(results, key=lambda k: results[k].epsilon)
    return WhiteBoxResult(
        config=cfg,
        audit=results[best],
        accountant_epsilon=accountant_epsilon,
        scores=first,
        included=included,
        family=best,
        families=results,
        step_scores=None if step_scores is None else step_scores.numpy(),
        sensitivity=check,
    )
