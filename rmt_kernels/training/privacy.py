"""DP for a training command: the noise multiplier for a target epsilon, the engine that makes a
model private (ours, or Opacus's), and the privacy spent so far.

The noise seed is secret (from the OS, never written) unless ``--noise-seed`` makes it public;
so is the batch sampling, since amplification by sampling assumes nobody knows which examples a
batch holds.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from rmt_kernels.dp.calibration import check_delta, run_noise_multiplier
from rmt_kernels.training.config import TrainConfig
from rmt_kernels.training.stages import post_processors

if TYPE_CHECKING:
    from collections.abc import Callable

# The privacy budget when neither --epsilon nor --noise-multiplier is given: a common choice in
# the DP fine-tuning literature (Li et al. 2022, Yu et al. 2022 report GLUE at epsilon 3 and 8).
DEFAULT_EPSILON = 8.0


def default_delta(examples: int) -> float:
    """``--delta`` when not given: 1 / n^1.1, below 1/n as DP's delta must be."""
    return 1 / examples**1.1


def calibrate(
    epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """The noise multiplier that spends ``--epsilon`` over the run (Opacus's search, bounded in
    time: ``rmt_kernels.dp.calibration``).

    Raises:
        ValueError: ``--epsilon`` is absurd (above ``MAX_TARGET_EPSILON``), no noise multiplier
            reaches it, or the search ran out of time (naming the flags to change).
    """
    from rmt_kernels.dp.calibration import MAX_TARGET_EPSILON

    if epsilon > MAX_TARGET_EPSILON:
        raise ValueError(
            f"--epsilon {epsilon:g} is above {MAX_TARGET_EPSILON:g}, where no (epsilon, delta) "
            "statement bounds anything: give --noise-multiplier for a fixed noise, or --no-dp"
        )
    try:
        return run_noise_multiplier(delta, sample_rate, steps, accountant, target_epsilon=epsilon)
    except ValueError as err:
        raise ValueError(
            f"{err}; raise --epsilon, use fewer steps or a smaller batch, or give "
            "--noise-multiplier"
        ) from None


def sampling_generator(cfg: TrainConfig) -> torch.Generator | None:
    """The loader's generator: ``--seed`` orders the data without DP, and keys the Poisson
    sampling of a run with a public ``--noise-seed``. Otherwise None: the engine draws a
    128-bit sampling key from the OS itself (a torch generator keeps only 32 bits of a seed)."""
    public = not cfg.dp or cfg.noise_seed is not None
    return torch.Generator().manual_seed(cfg.seed) if public else None


@dataclass
class Privacy:
    """The run's privacy: its parameters, and the privacy spent after a number of steps."""

    dp: bool
    delta: float | None  # None without DP
    noise_multiplier: float | None  # None without DP
    # Private: DP with noise, keyed by a secret seed. A public --noise-seed lets anyone with the
    # log regenerate the noise and subtract it, whatever epsilon the accountant reports.
    private: bool
    # Opacus's PrivacyEngine with --engine opacus (it reads per-sample gradients), else None.
    opacus_engine: Any = None
    # The accountant's epsilon at a delta (Opacus's engine's or our optimizer's); None without DP.
    get_epsilon: Callable[[float], float] | None = None
    _spent: dict[int, float] = field(default_factory=dict, init=False, repr=False)

    def epsilon(self, step: int) -> float | None:
        """Privacy spent after ``step`` steps (cached: Opacus's PRV accountant takes ~0.2 s);
        infinite without noise; None without DP."""
        if not self.dp:
            return None
        if step not in self._spent:
            if self.noise_multiplier == 0 and step > 0:
                self._spent[step] = float("inf")  # no noise, no privacy (accountants divide by 0)
            else:
                # Never below 0 (rmt_kernels.dp.calibration.spent_epsilon says why).
                self._spent[step] = max(0.0, float(self.get_epsilon(self.delta)))
        return self._spent[step]


def privatize(
    cfg: TrainConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: torch.utils.data.DataLoader,
    *,
    total_steps: int,
    device: torch.device,
) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.utils.data.DataLoader, Privacy]:
    """(model, optimizer, loader) made private by ``--engine`` (unchanged with ``--no-dp``),
    with the noise multiplier of ``--noise-multiplier`` or calibrated to ``--epsilon``."""
    if not cfg.dp:
        return (
            model,
            optimizer,
            loader,
            Privacy(dp=False, delta=None, noise_multiplier=None, private=False),
        )
    examples = len(loader.dataset)
    delta = cfg.delta if cfg.delta is not None else default_delta(examples)
    # Before any step touches data: a delta that protects nobody, and an accountant that cannot
    # give this run a positive epsilon at its last step, end the run here (exit 2), not later.
    check_delta(delta, examples, "--delta")
    noise_multiplier = cfg.noise_multiplier
    if noise_multiplier is None:
        target = cfg.epsilon if cfg.epsilon is not None else DEFAULT_EPSILON
        noise_multiplier = calibrate(target, delta, 1 / len(loader), total_steps, cfg.accountant)
    else:
        # The check make_private makes of a noise multiplier over a known run.
        run_noise_multiplier(
            delta,
            1 / len(loader),
            total_steps,
            cfg.accountant,
            noise_multiplier=noise_multiplier,
        )
    opacus_engine = None
    if cfg.engine == "native":
        model, optimizer, loader = _native(cfg, model, optimizer, loader, delta, noise_multiplier)
    else:
        opacus_engine, (model, optimizer, loader) = _opacus(
            cfg, model, optimizer, loader, noise_multiplier, device
        )
    if cfg.noise_seed is not None:
        warnings.warn(
            f"--noise-seed {cfg.noise_seed}: the noise is reproducible from the log, so this run "
            "is NOT private (epsilon is what a secret seed would give; for experiments only)",
            stacklevel=5,  # the caller of an application's train() (through loop.train)
        )
    privacy = Privacy(
        dp=True,
        delta=delta,
        noise_multiplier=noise_multiplier,
        private=cfg.noise_seed is None and bool(noise_multiplier),
        opacus_engine=opacus_engine,
        get_epsilon=optimizer.get_epsilon if opacus_engine is None else opacus_engine.get_epsilon,
    )
    return model, optimizer, loader, privacy


def _native(cfg: TrainConfig, model, optimizer, loader, delta: float, noise_multiplier: float):
    """``rmt_kernels.dp.make_private`` (``--engine native``)."""
    from rmt_kernels.dp import make_private

    with warnings.catch_warnings():
        # The CLI says it itself, in its own words, in privatize (and in the log).
        warnings.filterwarnings("ignore", message="make_private: seed=")
        return make_private(
            model,
            optimizer,
            loader,
            target_delta=delta,
            max_grad_norm=cfg.max_grad_norm,
            noise_multiplier=noise_multiplier,
            # --denoise and the other post-processing flags, as one chain of stages.
            post_processors=post_processors(cfg),
            # The noise key: secret (from the OS, never written) unless --noise-seed.
            seed=cfg.noise_seed,
            secure_mode=cfg.noise_seed is None,
            accountant=cfg.accountant,
        )


def _opacus(
    cfg: TrainConfig, model, optimizer, loader, noise_multiplier: float, device: torch.device
):
    """(engine, (model, optimizer, loader)) of Opacus's PrivacyEngine, or of our drop-in
    ``DenoisingPrivacyEngine`` with ``--denoise`` or another post-processing flag (``--engine
    opacus``)."""
    from opacus import PrivacyEngine

    from rmt_kernels.opacus import DenoisingPrivacyEngine

    chain = post_processors(cfg)
    # A secret run needs the drop-in: its noise is Philox keyed by 63 bits from the OS and its
    # batches come from a 128-bit key (Opacus's torch generators keep 32 bits of a seed).
    secret_or_chain = chain or cfg.noise_seed is None
    engine_class = DenoisingPrivacyEngine if secret_or_chain else PrivacyEngine
    engine = engine_class(accountant=cfg.accountant)
    # --denoise and the other post-processing flags, as one chain of stages.
    extra = {"post_processors": chain} if chain else {}
    if cfg.noise_seed is not None:
        # Public and reproducible (--noise-seed): Opacus's noise from a generator seeded with it.
        extra["noise_generator"] = torch.Generator(device).manual_seed(cfg.noise_seed)
    with warnings.catch_warnings():
        # The CLI says it itself, in its own words, in privatize (and in the log).
        warnings.filterwarnings("ignore", message="DenoisingPrivacyEngine: noise_generator given")
        private = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=cfg.max_grad_norm,
            poisson_sampling=True,
            **extra,
        )
    return engine, private


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside Opacus's GradSampleModule (or the model itself)."""
    return getattr(model, "_module", model)
