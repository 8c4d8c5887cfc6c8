"""White-box audit of the native engine: Dirac canaries through ``make_private``.

Each of m canaries owns one entry of one parameter of a small model holding every parameter type
the engine's rules handle; its gradient is a large multiple of a unit vector at that entry, so
clipping makes it exactly ``C`` in that direction (the design: rmt_kernels/audit/canaries.py).
Each canary is in the training set with probability 1/2 (the coin flips of
:func:`rmt_kernels.audit.draw_inclusion`). Training goes through the public API only
(rmt_kernels/audit/canary_run.py); after each step the released gradient is read at every
canary's entry, scored, and each score gives an epsilon lower bound, checked beside the
sensitivity the accountant assumes (rmt_kernels/audit/whitebox_scores.py).

The stages, one module each: the run's options (whitebox_config.py), the canaries
(canaries.py), the private training run (canary_run.py), the scores and their bounds
(whitebox_scores.py); this module runs them in order.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from rmt_kernels.audit.canaries import canary_dataset, paired_canary_signs
from rmt_kernels.audit.canary_run import (
    endless_batches,
    forward_backward,
    private_canary_run,
    release_at_canaries,
    score_unit,
)
from rmt_kernels.audit.guesses import draw_inclusion
from rmt_kernels.audit.strategy import Bonferroni, Fixed, Split
from rmt_kernels.audit.whitebox_config import WhiteBoxConfig
from rmt_kernels.audit.whitebox_scores import (
    P_FAIL_SHARES,
    WhiteBoxResult,
    bound_score_families,
    score_families,
)

__all__ = ["white_box_audit"]


def white_box_audit(
    cfg: WhiteBoxConfig,
    *,
    strategy: Bonferroni | Split | Fixed | None = None,
    progress: Callable[[int], None] | None = None,
) -> WhiteBoxResult:
    """Train once with Dirac canaries through ``make_private``, score them, bound epsilon.

    Under torch.distributed (call it on every rank of an initialized default group, e.g. with
    :func:`rmt_kernels.audit.distributed.white_box_audit_distributed`) every rank holds the
    whole dataset and Poisson-samples its shard (``make_private``'s data loader), the engine
    all-reduces the clipped sums and rank 0 alone adds the noise; the scores come from the
    released ``p.grad``, the same on every rank (checked), and rank 0 computes the bound.

    Args:
        cfg: the run (:class:`WhiteBoxConfig`).
        strategy: how the numbers of guesses are chosen (default :class:`Bonferroni`).
        progress: called with 1 after every logical step (e.g. ``tqdm.update``).

    Returns:
        A :class:`WhiteBoxResult`: with probability >= ``1 - p_fail``, if the engine is
        (eps, delta)-DP then ``audit.epsilon <= eps`` (the best of the score families, each at
        its share of ``p_fail``), and if the engine is the claimed mechanism (clipping to C,
        Gaussian noise of the claimed std, no post-processing) the sensitivity check does not
        flag; so ``bug`` (a bound above ``accountant_epsilon`` or a flag) is a privacy bug (in
        the engine or in the accountant's inputs).
    """
    included = draw_inclusion(cfg.canaries, np.random.default_rng([cfg.seed, 0]))
    signs = paired_canary_signs(cfg)
    model, optimizer, loader = private_canary_run(cfg, canary_dataset(cfg, included))
    unit = score_unit(cfg, loader)
    step_scores = torch.zeros(cfg.steps, cfg.canaries, dtype=torch.float64)
    batches = endless_batches(loader)
    for step in range(cfg.steps):
        forward_backward(cfg, model, next(batches), signs, step)
        # The canary's gradient direction is -s_t at its entry.
        released = release_at_canaries(cfg, model, optimizer)
        step_scores[step] = -signs[step].double() * released / unit
        if progress is not None:
            progress(1)
    # The sensitivity check needs the release's exact law: no post-processing.
    share = P_FAIL_SHARES["sensitivity"] if cfg.denoise is None else 0.0
    return bound_score_families(
        cfg,
        score_families(cfg, step_scores),
        included,
        float(optimizer.get_epsilon(cfg.delta)),
        strategy,
        step_scores=step_scores,
        sensitivity_share=share,
    )
