"""Checkpoints of a training command (``--checkpoint-dir``, ``--checkpoint-every``,
``--resume``): what to do with the folder before anything is built, the optimisation flags a
resume inherits, and the save and restore of a run through ``rmt_kernels.dp``'s checkpoints.

A run killed before its first checkpoint leaves a privacy ledger: its steps touched the data, so
the run starts over with them charged. A resume continues the step counter, accountant, sampler
position and log; its lost steps are replayed for free only on the same data and settings (the
fingerprint, ``rmt_kernels.training.fingerprint``), else charged.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from rmt_kernels.training import stages
from rmt_kernels.training.config import (
    DEFAULT_LR,
    DEFAULT_OPTIMIZER,
    DEFAULT_WEIGHT_DECAY,
    TrainConfig,
)


@dataclass(frozen=True)
class CheckpointPlan:
    """What ``--checkpoint-dir`` holds, decided before anything is built."""

    path: Path  # the checkpoint file
    resumed: dict | None  # ``checkpoint_extra`` of the run to resume, or None for a new run
    restart: bool  # a run killed before its first checkpoint: start over, its steps charged

    def check_steps(self, total_steps: int, cfg: TrainConfig) -> None:
        """Raise ValueError if the resumed run has already run ``total_steps`` steps."""
        if self.resumed is not None and self.resumed["steps"] >= total_steps:
            raise ValueError(
                f"--resume: the run in {cfg.checkpoint_dir} already ran "
                f"{self.resumed['steps']} steps and this one asks for {total_steps}: give more "
                "--steps (or --epochs) to continue it"
            )


def plan_checkpoint(cfg: TrainConfig) -> CheckpointPlan | None:
    """The checkpoint plan of ``--checkpoint-dir`` (None without it).

    Raises:
        ValueError: a checkpoint exists and ``--resume`` is not given.
    """
    if not cfg.checkpoint_dir:
        return None
    from rmt_kernels.dp import checkpoint_extra
    from rmt_kernels.dp.ledger import PrivacyLedger, ledger_path

    path = Path(cfg.checkpoint_dir) / "checkpoint.pt"
    if path.exists():
        if not cfg.resume:
            raise ValueError(
                f"{path} exists: continue that run with --resume, or use another folder"
            )
        return CheckpointPlan(path, checkpoint_extra(path), restart=False)
    lost = len(PrivacyLedger(ledger_path(path)).entries())
    if lost:
        # Its steps touched the data: start over in its place, with them charged.
        warnings.warn(
            f"{cfg.checkpoint_dir} holds {lost} step(s) of a run killed before its first "
            "checkpoint: starting over, with those steps charged",
            stacklevel=2,
        )
        return CheckpointPlan(path, None, restart=True)
    if cfg.resume:
        warnings.warn(f"nothing to resume in {cfg.checkpoint_dir}: starting the run", stacklevel=2)
    return CheckpointPlan(path, None, restart=False)


def resolve_optimisation(cfg: TrainConfig, resumed: dict | None) -> TrainConfig:
    """--optimizer, --lr, --weight-decay: given, else the checkpointed run's, else the default
    (SGD when the post-processing chain ends in a DP-Adam or trajectory direction,
    rmt_kernels/training/stages.py). A resume cannot change the optimizer (its state is the
    checkpoint's) nor the chain's flags (--denoise and its options, --filter, --filter-beta,
    --disk-kappa, --denoise-target, --dp-adam: the stages' states are the checkpoint's) nor
    --lr-schedule; a new --lr or --weight-decay is honoured, and said. A resume with --denoise
    and no --denoise-target (or no --kappa) continues the checkpointed run's target and kappa
    (a checkpoint records both); with nothing to resume it gets a new run's
    (stages.denoise_target, stages.with_default_kappa), so the returned config always names
    both."""
    old = ((resumed or {}).get("extra") or {}).get("config") or {}
    saved_stages = old.get("stages")
    saved_kappa = ((saved_stages or {}).get("denoise_options") or {}).get("kappa")
    if cfg.denoise_target is None:  # --resume --denoise without --denoise-target
        checkpointed = (saved_stages or {}).get("denoise_target")
        cfg = replace(cfg, denoise_target=stages.denoise_target(None, checkpointed))
    if cfg.denoise:  # --kappa left out: the checkpointed run's, else a new run's
        options = stages.with_default_kappa(cfg.denoise_options, cfg.denoise_target, saved_kappa)
        cfg = replace(cfg, denoise_options=options)
    if resumed is not None and saved_stages is not None:
        now = {**stages.flags(cfg), "lr_schedule": cfg.lr_schedule}
        changed = [k for k in now if k in saved_stages and saved_stages[k] != now[k]]
        if changed:
            said = ", ".join(f"{k}={saved_stages[k]!r} (now {now[k]!r})" for k in changed)
            raise ValueError(
                f"--resume: the checkpointed run was trained with {said}; its post-processing "
                "state cannot continue under other flags: resume with the same ones, or start "
                "a new run"
            )
    default_optimizer = "sgd" if stages.uses_sgd(cfg) else DEFAULT_OPTIMIZER
    if cfg.optimizer is not None and old.get("optimizer") not in (None, cfg.optimizer):
        raise ValueError(
            f"--resume: the checkpointed run trains with --optimizer {old['optimizer']}, whose "
            f"state cannot continue as --optimizer {cfg.optimizer}: resume without --optimizer, "
            "or start a new run"
        )
    resolved = {}
    for name, flag, default in (
        ("optimizer", "--optimizer", default_optimizer),
        ("lr", "--lr", DEFAULT_LR),
        ("weight_decay", "--weight-decay", DEFAULT_WEIGHT_DECAY),
    ):
        given = getattr(cfg, name)
        resolved[name] = given if given is not None else old.get(name, default)
        if given is not None and old.get(name) is not None and old[name] != given:
            warnings.warn(
                f"--resume: {flag} {given} replaces the checkpointed run's {old[name]}",
                stacklevel=2,
            )
    return replace(cfg, **resolved)


@dataclass(frozen=True)
class Checkpointer:
    """Saves and restores one run's checkpoint (model, optimizer, accountant, sampler, log)."""

    plan: CheckpointPlan
    settings: dict  # fingerprint.run_settings: public, stored in the checkpoint
    data_fingerprint: str  # fingerprint.data_fingerprint: beside the checkpoint, not in it

    def restore(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: torch.utils.data.DataLoader,
        cfg: TrainConfig,
    ) -> dict | None:
        """Load the resumed run into the (private) model, optimizer and loader and return its
        ``extra`` (step, seconds, samples, evals); for a new run attach the privacy ledger
        (charging a killed run's steps) and return None."""
        from rmt_kernels.dp import attach_ledger, load_checkpoint

        if self.plan.resumed is None:
            attach_ledger(optimizer, self.plan.path, charge_existing=self.plan.restart)
            return None
        old_settings = self.plan.resumed["extra"].get("settings")
        changed = [k for k, v in self.settings.items() if old_settings and old_settings.get(k) != v]
        if changed:
            warnings.warn(
                f"--resume: {', '.join(changed)} differ from the checkpointed run's: the steps "
                "it lost cannot be replayed for free (they are charged, the noise is re-keyed)",
                stacklevel=5,  # the caller of an application's train() (through loop.train)
            )
        # The step counter, accountant (with the ledger's lost steps), the sampler's position
        # (public seeds) come back; the log goes on where the checkpoint left it.
        extra = load_checkpoint(
            self.plan.path, model, optimizer, loader, data_fingerprint=self.data_fingerprint
        )
        # Honour --lr / --weight-decay (the checkpoint's unless given): never silently continue
        # with values other than the log's.
        for group in optimizer.param_groups:
            group["lr"], group["weight_decay"] = cfg.lr, cfg.weight_decay
        return extra

    def save(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: torch.utils.data.DataLoader,
        cfg: TrainConfig,
        state: dict,
        evals: list[dict],
    ) -> None:
        """Write the checkpoint: ``state`` (step, seconds, samples), the log's evaluations, the
        optimisation flags a resume inherits, and the settings a resume compares."""
        from rmt_kernels.dp import save_checkpoint

        optimisation = {
            "optimizer": cfg.optimizer,
            "lr": cfg.lr,
            "weight_decay": cfg.weight_decay,
            # What a resume may not change (resolve_optimisation).
            "stages": {**stages.flags(cfg), "lr_schedule": cfg.lr_schedule},
        }
        try:
            save_checkpoint(
                self.plan.path,
                model,
                optimizer,
                loader,
                {
                    **state,
                    "evals": evals,
                    "config": optimisation,
                    "settings": self.settings,
                },
                data_fingerprint=self.data_fingerprint,
            )
        except OSError as err:
            # A full disk or a vanished folder: the checkpoint and its sidecar are written under
            # temporary names first, so the previous checkpoint is intact (exit 2, no traceback).
            raise ValueError(
                f"--checkpoint-dir {cfg.checkpoint_dir}: cannot write the checkpoint at step "
                f"{state['step']} ({err.strerror or err}); the previous checkpoint is intact: "
                "free space and continue with --resume"
            ) from None
