"""White-box audit of a checkpointed, killed and resumed run: the whole released sequence.

The run (the canaries, data and model of :mod:`rmt_kernels.audit.canaries`) starts a privacy
ledger (``attach_ledger``), saves a checkpoint after ``checkpoint_after`` steps, releases steps
up to ``kill_after - 1``, runs the forward and backward of step ``kill_after`` (its data touches
the model: the ledger records it) and is killed there (its objects are dropped). A fresh model,
optimizer and loader through ``make_private`` with the same settings then ``load_checkpoint``
and finish the run: the steps ``checkpoint_after .. kill_after - 1`` are released twice, once
by the killed run and once by the resumed one.

Scores. A canary's score is the sum, over all steps, of the first release's projection on its
direction (as in one run), plus ``REPLAY_WEIGHT`` times the sum, over the twice-released steps,
of the projection of the difference (first release - replay). Any fixed function of the released
outputs is a valid score, so the bound stays sound; the difference term is what sees a resume
that replays the same noise on other data: the difference of the two releases is then
noise-free (the canary's own contribution), and the weight puts it above the first term's noise.
An honest resume replays on the same data (free: the two releases are identical, difference 0,
the accountant counts each step once) or, on other data, re-keys the noise and charges the lost
steps (the difference is then the canaries' contribution plus two independent noises).

``other_data``: the resumed run trains on other data of the same size, the canaries' gradients
removed (their output weights zeroed), as a resume on another training subset would.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

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
from rmt_kernels.audit.whitebox_scores import WhiteBoxResult, bound_score_families

__all__ = ["REPLAY_WEIGHT", "white_box_resume_audit"]

# Weight of the replay-difference term of the score: a noise-free difference (1 per lost step
# in the score's units) must stand far above the first term's noise (sigma sqrt(steps) units).
REPLAY_WEIGHT = 1e4


def white_box_resume_audit(
    cfg: WhiteBoxConfig,
    *,
    checkpoint_after: int,
    kill_after: int,
    other_data: bool = False,
    folder: str | Path | None = None,
    strategy: Bonferroni | Split | Fixed | None = None,
) -> WhiteBoxResult:
    """Audit a run checkpointed after ``checkpoint_after`` steps, killed in step ``kill_after``
    and resumed from the checkpoint (module docstring); one process.

    Args:
        cfg: the run (:class:`~rmt_kernels.audit.whitebox_config.WhiteBoxConfig`).
        checkpoint_after: steps before the checkpoint, in ``[1, cfg.steps)``.
        kill_after: the step killed after its backward, in ``[checkpoint_after, cfg.steps)``.
        other_data: resume on other data (the canaries removed) instead of the same data.
        folder: where the checkpoint and its ledger go (default: a temporary folder); must not
            hold a ledger already.
        strategy: how the numbers of guesses are chosen (default Bonferroni).

    Returns:
        A :class:`~rmt_kernels.audit.whitebox_scores.WhiteBoxResult` whose ``accountant_epsilon`` is
        the resumed run's (it counts every step the ledger recorded, charged or replayed).

    Raises:
        ValueError: ``checkpoint_after`` or ``kill_after`` out of range.
    """
    from rmt_kernels.dp import attach_ledger, load_checkpoint, save_checkpoint

    if not (isinstance(checkpoint_after, int) and 1 <= checkpoint_after < cfg.steps):
        raise ValueError(
            f"checkpoint_after must be an int in [1, steps = {cfg.steps}), got {checkpoint_after!r}"
        )
    if not (isinstance(kill_after, int) and checkpoint_after <= kill_after < cfg.steps):
        raise ValueError(
            f"kill_after must be an int in [checkpoint_after = {checkpoint_after}, steps = "
            f"{cfg.steps}), got {kill_after!r}"
        )
    included = draw_inclusion(cfg.canaries, np.random.default_rng([cfg.seed, 0]))
    signs = paired_canary_signs(cfg)
    dataset = canary_dataset(cfg, included)
    with tempfile.TemporaryDirectory(prefix="rmt-audit-resume-") as tmp:
        path = Path(folder if folder is not None else tmp) / "ckpt.pt"
        # The killed run.
        model, optimizer, loader = private_canary_run(cfg, dataset)
        attach_ledger(optimizer, path)
        unit = score_unit(cfg, loader)
        first: dict[int, torch.Tensor] = {}
        batches = endless_batches(loader)
        for step in range(kill_after + 1):
            if step == checkpoint_after:
                save_checkpoint(path, model, optimizer, loader)
            forward_backward(cfg, model, next(batches), signs, step)
            if step < kill_after:
                first[step] = release_at_canaries(cfg, model, optimizer)
        del model, optimizer, loader, batches  # killed
        # The resumed run, in fresh objects.
        resumed_data = dataset
        if other_data:
            x, ids, z, wl, we, wn, cid = dataset.tensors
            wl, we, wn = wl.clone(), we.clone(), wn.clone()
            for w in (wl, we, wn):
                w[cid >= 0] = 0.0
            resumed_data = torch.utils.data.TensorDataset(x, ids, z, wl, we, wn, cid)
        model, optimizer, loader = private_canary_run(cfg, resumed_data)
        load_checkpoint(path, model, optimizer, loader)
        replay: dict[int, torch.Tensor] = {}
        batches = endless_batches(loader)
        for step in range(optimizer.engine.steps, cfg.steps):
            forward_backward(cfg, model, next(batches), signs, step)
            released = release_at_canaries(cfg, model, optimizer)
            if step in first:
                replay[step] = released
            else:
                first[step] = released
        epsilon = float(optimizer.get_epsilon(cfg.delta))
    scores = torch.zeros(cfg.canaries, dtype=torch.float64)
    for step in range(cfg.steps):
        # The canary's gradient direction is -s_t at its entry.
        scores -= signs[step].double() * first[step] / unit
        if step in replay:
            scores -= REPLAY_WEIGHT * signs[step].double() * (first[step] - replay[step]) / unit
    # One score (at the whole p_fail): the per-step scores and the sensitivity check of
    # white_box_audit are not computed across a resume.
    families = {"sum": (np.arange(cfg.canaries), scores.numpy(), 1.0)}
    return bound_score_families(cfg, families, included, epsilon, strategy)
