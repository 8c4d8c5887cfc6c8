"""The options every training command shares (``TrainConfig``, the ``config`` of the JSON log):
privacy, the post-processing chain, the schedule and optimisation, where and how the run runs;
their checks and defaults, and ``--device``. An application subclasses it with its own options
(``rmt_kernels.glue.config.GlueConfig``: the GLUE task, its data and model).

``--denoise-target`` and ``--kappa`` left out (None) are resolved by
``rmt_kernels.training.stages``: the target is ``gradient`` (``denoise_target``; with
``--denoise`` each step's noisy gradient is shrunk, under AdamW by default) and kappa the best
measured for the target (``with_default_kappa``: 0.75 for the gradient, 1 for the moment and the
trajectory). A new run resolves both when the config is made (``TrainConfig.__post_init__``); a
resume with ``--denoise`` when its checkpoint is read
(``rmt_kernels.training.resume.resolve_optimisation``: the checkpointed run's target and kappa).
The log and the checkpoints always hold the resolved values.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch

from rmt_kernels.training.distributed import distributed_env
from rmt_kernels.training.stages import (
    DEFAULT_DISK_KAPPA,
    DEFAULT_FILTER_BETA,
    DENOISE_TARGETS,
    DP_ADAM,
    FILTERS,
    LR_SCHEDULES,
    denoise_target,
    uses_sgd,
    with_default_kappa,
)

# Defaults of the optimisation flags a resume inherits from its checkpoint when not given.
DEFAULT_LR = 5e-4  # a DP-SGD value; non-private fine-tuning wants ~5e-5
DEFAULT_OPTIMIZER = "adamw"
DEFAULT_WEIGHT_DECAY = 0.0
# Noise keys are signed 64-bit integers in the ops.
NOISE_SEED_LIMIT = 2**63


# kw_only: an application's subclass adds fields without defaults (GlueConfig's task).
@dataclass(kw_only=True)
class TrainConfig:
    """What a run depends on besides its application's data and model (the ``config`` of the
    JSON log, with the subclass's fields). See ``rmt-glue train -h``."""

    dp: bool = True
    engine: str = "native"
    epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float | None = None
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    # The noise seed is secret (from the OS) unless noise_seed is given: then the noise is
    # reproducible and the run is not private.
    noise_seed: int | None = None
    batch_size: int = 64
    physical_batch_size: int | None = None
    epochs: float | None = None
    steps: int | None = None
    # None: the default (DEFAULT_*) for a new run, the checkpointed run's for a resume.
    lr: float | None = None
    optimizer: str | None = None
    weight_decay: float | None = None
    eval_every: int = 0
    seed: int = 0
    denoise: bool = False
    denoise_options: dict = field(default_factory=dict)
    # The post-processing chain (rmt_kernels/training/stages.py) and the learning-rate schedule.
    filter: str = "none"
    filter_beta: float = DEFAULT_FILTER_BETA
    disk_kappa: float = DEFAULT_DISK_KAPPA
    # None: not given; resolved in __post_init__ (a resume with --denoise: from its checkpoint,
    # in resume.resolve_optimisation), so the log and checkpoints hold the resolved name.
    denoise_target: str | None = None
    dp_adam: str = "none"
    lr_schedule: str = "constant"
    device: str | None = None
    output: str | None = None
    save: str | None = None
    progress: bool = True
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False

    def __post_init__(self) -> None:
        # --denoise-target and --kappa not given: the defaults (stages.denoise_target,
        # stages.with_default_kappa). A resume with --denoise continues its checkpointed run's
        # target and kappa, known once the checkpoint is read (resolve_optimisation).
        if self.resume and self.denoise:
            return
        if self.denoise_target is None:
            self.denoise_target = denoise_target(None)
        if self.denoise:
            self.denoise_options = with_default_kappa(self.denoise_options, self.denoise_target)

    def check(self) -> None:
        """Raise ValueError on options that cannot go together (before any data is read).

        The checks run in a fixed order (the first failing one is reported): the schedule, the
        application's options (:meth:`check_application`), the engine, the privacy flags, the
        optimisation flags, then where and how the run runs. A resume's ``--denoise-target``
        not yet resolved is checked as a new run's.
        """
        cfg = self
        if cfg.denoise_target is None:
            cfg = replace(self, denoise_target=denoise_target(None))
        cfg._check_schedule()
        cfg.check_application()
        if cfg.engine not in ("native", "opacus"):
            raise ValueError(f"--engine must be 'native' or 'opacus', got {cfg.engine!r}")
        cfg._check_privacy()
        cfg._check_optimisation()
        cfg._check_stages()
        cfg._check_run()

    def _check_schedule(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give --steps or --epochs, not both")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"--epochs must be > 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        physical = self.physical_batch_size
        if physical is not None and (physical < 1 or self.batch_size % physical):
            raise ValueError(
                f"--physical-batch-size {physical} must divide --batch-size {self.batch_size}"
            )

    def check_application(self) -> None:
        """Raise ValueError on the application's own options (its model, its data); a subclass
        overrides it. Runs after the schedule's checks, before the engine's and privacy's."""

    def _check_privacy(self) -> None:
        if not self.dp and (self.denoise or self.epsilon is not None):
            raise ValueError("--no-dp trains without privacy: --epsilon and --denoise need DP")
        if self.epsilon is not None and self.noise_multiplier is not None:
            raise ValueError("give --epsilon or --noise-multiplier, not both")
        if self.epsilon is not None and not self.epsilon > 0:
            raise ValueError(f"--epsilon must be > 0, got {self.epsilon}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"--delta must be in (0, 1), got {self.delta}")
        if self.noise_seed is not None:
            if not self.dp:
                raise ValueError("--noise-seed keys the DP noise: it does not go with --no-dp")
            if not 0 <= self.noise_seed < NOISE_SEED_LIMIT:
                raise ValueError(f"--noise-seed must be in [0, 2**63), got {self.noise_seed}")
        if not self.dp and self.noise_multiplier is not None:
            raise ValueError("--no-dp trains without noise: --noise-multiplier needs DP")
        if self.epsilon is not None and not math.isfinite(self.epsilon):
            raise ValueError(
                f"--epsilon must be a finite number > 0, got {self.epsilon} (no privacy: "
                "--no-dp; no noise: --noise-multiplier 0)"
            )
        if self.noise_multiplier is not None and not (
            self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)
        ):
            raise ValueError(
                f"--noise-multiplier must be a finite number >= 0, got {self.noise_multiplier}"
            )
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ValueError(
                f"--max-grad-norm must be a finite number > 0, got {self.max_grad_norm}"
            )

    def _check_optimisation(self) -> None:
        if self.epochs is not None and not math.isfinite(self.epochs):
            raise ValueError(f"--epochs must be a finite number > 0, got {self.epochs}")
        if self.lr is not None and not (self.lr >= 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a finite number >= 0, got {self.lr}")
        if self.weight_decay is not None and not (
            self.weight_decay >= 0 and math.isfinite(self.weight_decay)
        ):
            raise ValueError(
                f"--weight-decay must be a finite number >= 0, got {self.weight_decay}"
            )
        if self.optimizer not in (None, "adamw", "sgd"):
            raise ValueError(f"--optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.eval_every < 0:
            raise ValueError(
                f"--eval-every must be >= 0 (0: at the end only), got {self.eval_every}"
            )

    def _check_stages(self) -> None:
        for flag, value, choices in (
            ("--filter", self.filter, FILTERS),
            ("--denoise-target", self.denoise_target, DENOISE_TARGETS),
            ("--dp-adam", self.dp_adam, DP_ADAM),
            ("--lr-schedule", self.lr_schedule, LR_SCHEDULES),
        ):
            if value not in choices:
                raise ValueError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")
        if not (0 <= self.filter_beta < 1):
            raise ValueError(f"--filter-beta must be in [0, 1), got {self.filter_beta}")
        if not (0 < self.disk_kappa <= 1):
            raise ValueError(f"--disk-kappa must be in (0, 1], got {self.disk_kappa}")
        staged = (
            self.filter != "none" or self.dp_adam != "none" or self.denoise_target != "gradient"
        )
        if staged and not self.dp:
            raise ValueError(
                "--filter, --dp-adam and --denoise-target post-process the DP gradient: they "
                "need DP (drop --no-dp)"
            )
        if self.denoise_target != "gradient" and not self.denoise:
            raise ValueError(
                f"--denoise-target {self.denoise_target} shrinks with --denoise's options: give "
                "--denoise"
            )
        if self.denoise_target == "trajectory":
            # W_t = W_0 - lr * D_t, the identity the trajectory denoiser relies on, holds for
            # SGD at one learning rate without weight decay on the released gradients.
            if self.filter != "none" or self.dp_adam != "none":
                raise ValueError(
                    "--denoise-target trajectory shrinks the sum of the released gradients: it "
                    "takes no --filter and no --dp-adam"
                )
            if self.lr_schedule != "constant":
                raise ValueError(
                    "--denoise-target trajectory needs --lr-schedule constant (W_t = W_0 - lr * "
                    "D_t holds at one learning rate)"
                )
            if self.weight_decay:
                raise ValueError(
                    "--denoise-target trajectory needs --weight-decay 0 (W_t = W_0 - lr * D_t)"
                )
        if uses_sgd(self) and self.optimizer not in (None, "sgd"):
            raise ValueError(
                f"--optimizer {self.optimizer}: with --dp-adam {self.dp_adam} / --denoise-target "
                f"{self.denoise_target} the chain ends in an Adam (or trajectory) direction "
                "that plain SGD applies: give --optimizer sgd or leave it out"
            )

    def _check_run(self) -> None:
        parse_device(self.device)
        if (self.checkpoint_dir or self.resume) and not (self.dp and self.engine == "native"):
            raise ValueError("--checkpoint-dir / --resume are for DP with --engine native")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("--resume needs --checkpoint-dir (the run to resume)")
        if self.checkpoint_every < 0:
            raise ValueError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError("--checkpoint-every needs --checkpoint-dir (where to write)")
        if distributed_env() and not (self.dp and self.engine == "native"):
            raise ValueError("torchrun (several processes) is for DP with --engine native")


def parse_device(text: str | None) -> torch.device:
    """The device of ``--device`` (default: cuda when available).

    Raises:
        ValueError: not a device name, not cpu or cuda, or a GPU this machine does not have.
    """
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"--device {text!r} is not a device (expected cpu, cuda or cuda:N)"
        ) from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {text!r}: only cpu and cuda (cuda:N) are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {text}: no CUDA GPU is usable here (this PyTorch build has no CUDA, or "
                "no GPU is visible); use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return device


def denoise_options(cfg: TrainConfig) -> dict | None:
    """The denoise options as the op receives them (unset ones take the op's defaults); None
    without ``--denoise``."""
    if not cfg.denoise:
        return None
    return {k: v for k, v in cfg.denoise_options.items() if v is not None}


def logged_config(cfg: TrainConfig) -> dict:
    """``cfg`` as the JSON log's ``config`` holds it: every field, the denoise options as the op
    receives them (:func:`denoise_options`)."""
    return {**asdict(cfg), "denoise_options": denoise_options(cfg)}
