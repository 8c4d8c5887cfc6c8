"""The command-line flags every training command shares (privacy, post-processing, optimisation,
checkpoints, where the run runs), their cross-flag checks, the ``TrainConfig`` fields they fill,
and the commands' error handling: a user's error exits 2 with one line naming the flag.

An application's CLI (``rmt_kernels/glue/cli.py``, ``rmt_kernels/lm/cli.py``) adds its own flags
around these: :func:`add_privacy_arguments`, :func:`add_post_processing_arguments`,
:func:`add_optimisation_arguments` and :func:`add_run_arguments` (into a "run" group the
application opens, so that its data-size flags come first), then :func:`check_train_arguments`
after parsing and :func:`train_config_fields` to build its ``TrainConfig`` subclass.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from typing import Any

from rmt_kernels.shrinkage import NORM_CORRECTIONS, SHRINKERS
from rmt_kernels.training import stages

# The flags of --denoise's options (argparse dests): they only apply with --denoise.
DENOISE_FLAGS = (
    "kappa",
    "shrinker",
    "norm",
    "rank",
    "niter",
    "min_dim",
    "warm_start",
    "denoise_passthrough",
)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1.

    Raises:
        argparse.ArgumentTypeError: below 1 (argparse exits 2 naming the flag).
    """
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_privacy_arguments(p: argparse.ArgumentParser) -> None:
    """The "privacy" group: DP or not, the engine, the budget, clipping, the noise seed."""
    g = p.add_argument_group("privacy")
    g.add_argument("--no-dp", dest="dp", action="store_false", help="non-private reference")
    g.add_argument("--engine", choices=("native", "opacus"), default="native")
    eps = g.add_mutually_exclusive_group()
    eps.add_argument("--epsilon", type=float, help="target epsilon (default 8)")
    eps.add_argument("--noise-multiplier", type=float, help="sigma, instead of --epsilon")
    g.add_argument("--delta", type=float, help="default 1/n^1.1 (n = training examples)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping norm C")
    g.add_argument("--accountant", choices=("prv", "rdp"), default="prv")
    g.add_argument(
        "--noise-seed",
        type=int,
        help="make the noise (and the batch sampling) reproducible from this seed: the run is "
        "then NOT private (anyone with the log can subtract the noise); for experiments only. "
        "Default: a secret seed from the OS, never logged or checkpointed",
    )
    g.add_argument(
        "--secure-mode",
        action="store_true",
        help="the default now (secret noise seed from the OS); kept for old scripts",
    )


def add_post_processing_arguments(p: argparse.ArgumentParser) -> None:
    """The "denoising" and "temporal filter and DP-aware Adam" groups: post-processing of the
    noisy gradient (rmt_kernels/training/stages.py)."""
    g = p.add_argument_group("denoising (post-processing of the noisy gradient)")
    g.add_argument(
        "--denoise",
        action="store_true",
        help="shrink the noisy 2-D weight gradients' singular values (each step's, under AdamW, "
        "by default; --denoise-target)",
    )
    g.add_argument(
        "--kappa",
        type=float,
        help="threshold at kappa x the bulk edge (default: 0.75 for --denoise-target gradient, 1 "
        "for moment and trajectory, the best measured for each; with --resume the checkpointed "
        "run's)",
    )
    g.add_argument("--shrinker", choices=SHRINKERS, help="default frobenius")
    g.add_argument("--norm", choices=NORM_CORRECTIONS, help="norm correction (default none)")
    g.add_argument("--rank", type=int, help="sketch rank (-1: adaptive)")
    g.add_argument(
        "--niter",
        type=int,
        help="-1 (default): Krylov passes until the estimate near the edge settles; "
        "N >= 0: exactly N + 1 passes",
    )
    g.add_argument(
        "--warm-start",
        action=argparse.BooleanOptionalAction,
        help="start each matrix's range finder from its basis of the step before (default on; "
        "the basis is a function of released gradients only)",
    )
    g.add_argument(
        "--min-dim",
        type=int,
        help="leave matrices whose smaller side is below this alone (default 32: heads)",
    )
    g.add_argument(
        "--denoise-passthrough",
        action="store_true",
        default=None,
        help="shrink a matrix only at the steps where its released spectrum shows a component "
        "above the noise (top singular value above the bulk edge plus a Tracy-Widom margin); "
        "pass it through unchanged otherwise (never a zeroed matrix)",
    )
    g.add_argument(
        "--denoise-target",
        choices=stages.DENOISE_TARGETS,
        help="what --denoise shrinks: each step's noisy gradient (the default; the only target "
        "AdamW composes with), the filtered first moment at its exact noise level (then a "
        "DP-Adam with beta1 0 and v from the released gradient, applied by plain SGD), or the "
        "accumulated update W_t - W_0 (SGD, constant lr). With --resume: the checkpointed "
        "run's, unless given",
    )
    g = p.add_argument_group("temporal filter and DP-aware Adam (post-processing)")
    g.add_argument(
        "--filter",
        choices=stages.FILTERS,
        default="none",
        help="average the noisy gradients over steps: ema (bias-corrected, --filter-beta) or "
        "disk (DiSK's simplified Kalman filter, --disk-kappa); default none",
    )
    g.add_argument(
        "--filter-beta",
        type=float,
        help="the EMA's decay for --filter ema and --denoise-target moment (default 0.9)",
    )
    g.add_argument(
        "--disk-kappa",
        type=float,
        help="DiSK's weight of the new gradient, in (0, 1] (default 0.7)",
    )
    g.add_argument(
        "--dp-adam",
        choices=stages.DP_ADAM,
        default="none",
        help="none: --optimizer as given (AdamW by default); plain: Adam's direction as a "
        "post-processing stage, applied by SGD; bc: the same with DP-AdamBC's noise-variance "
        "correction of the second moment",
    )


def add_optimisation_arguments(p: argparse.ArgumentParser) -> None:
    """The "optimisation" group: batch sizes, run length, optimizer, schedule, seed."""
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=positive_int, default=64, help="logical batch")
    g.add_argument(
        "--physical-batch-size",
        type=positive_int,
        help="examples per forward/backward; must divide --batch-size (default: all of it)",
    )
    g.add_argument("--epochs", type=float, help="run length in epochs (default 1)")
    g.add_argument("--steps", type=positive_int, help="run length in optimizer steps")
    g.add_argument(
        "--lr",
        type=float,
        help="default 5e-4 (a DP-SGD value; non-private fine-tuning wants ~5e-5); with --resume "
        "the checkpointed run's, unless given",
    )
    g.add_argument(
        "--optimizer",
        choices=("adamw", "sgd"),
        help="default adamw (sgd when the chain ends in an Adam or trajectory direction: "
        "--dp-adam plain|bc, --filter disk, --denoise-target moment|trajectory); with --resume "
        "the checkpointed run's (it cannot change)",
    )
    g.add_argument(
        "--weight-decay", type=float, help="default 0; with --resume the checkpointed run's"
    )
    g.add_argument(
        "--lr-schedule",
        choices=stages.LR_SCHEDULES,
        default="constant",
        help="constant (default) or linear: decay to 0 over the run (Li et al. 2021)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="model init and training subset (and, with --noise-seed or --no-dp, the data "
        "order); never the noise",
    )


def add_run_arguments(g: argparse._ArgumentGroup) -> None:
    """Into the application's "run" group: evaluation cadence, device, outputs, progress bar,
    checkpoints and resume (torchrun needs no flag: its environment says it)."""
    g.add_argument("--eval-every", type=int, default=0, help="steps (0: at the end only)")
    g.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    g.add_argument("--output", help="write the JSON log here")
    g.add_argument("--save", help="save the fine-tuned model and tokenizer to this folder")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument(
        "--checkpoint-dir",
        help="checkpoint the private run here (with its privacy ledger); native engine",
    )
    g.add_argument(
        "--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: at the end)"
    )
    g.add_argument("--resume", action="store_true", help="continue the run of --checkpoint-dir")


def check_train_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The shared flags' combinations argparse cannot check: exits 2 (``parser.error``) on a
    denoise option without ``--denoise``, a filter option without its filter, or both
    ``--steps`` and ``--epochs``."""
    if not args.denoise:
        given = [f"--{k.replace('_', '-')}" for k in DENOISE_FLAGS if getattr(args, k) is not None]
        if given:
            parser.error(f"{', '.join(given)} only apply with --denoise")
    target = stages.denoise_target(args.denoise_target)
    if args.filter_beta is not None and not (args.filter == "ema" or target == "moment"):
        parser.error("--filter-beta only applies with --filter ema or --denoise-target moment")
    if args.disk_kappa is not None and args.filter != "disk":
        parser.error("--disk-kappa only applies with --filter disk")
    if args.steps is not None and args.epochs is not None:
        parser.error("give --steps or --epochs, not both")


def train_config_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The ``TrainConfig`` fields of the shared flags (an application adds its own and builds
    its subclass with them).

    Raises:
        ValueError: ``--secure-mode`` (the default, a flag kept for old scripts; not an option
            of the config) with ``--no-dp``, ``--engine opacus`` or ``--noise-seed``.
    """
    if args.secure_mode and (not args.dp or args.engine != "native"):
        raise ValueError("--secure-mode is for DP with --engine native")
    if args.secure_mode and args.dp and args.noise_seed is not None:
        raise ValueError(
            "--noise-seed makes the noise public, --secure-mode keeps it secret: give one"
        )
    return {
        "dp": args.dp,
        "engine": args.engine,
        "epsilon": args.epsilon,
        "noise_multiplier": args.noise_multiplier,
        "delta": args.delta,
        "max_grad_norm": args.max_grad_norm,
        "accountant": args.accountant,
        "noise_seed": args.noise_seed,
        "batch_size": args.batch_size,
        "physical_batch_size": args.physical_batch_size,
        "epochs": args.epochs,
        "steps": args.steps,
        "lr": args.lr,
        "optimizer": args.optimizer,
        "weight_decay": args.weight_decay,
        "eval_every": args.eval_every,
        "seed": args.seed,
        "denoise": args.denoise,
        "denoise_options": {
            "kappa": args.kappa,
            "shrinker": args.shrinker,
            "norm": args.norm,
            "rank": args.rank,
            "niter": args.niter,
            "min_dim": args.min_dim,
            "warm_start": args.warm_start,
            "passthrough_below_edge": args.denoise_passthrough,
        },
        "filter": args.filter,
        "filter_beta": stages.DEFAULT_FILTER_BETA if args.filter_beta is None else args.filter_beta,
        "disk_kappa": stages.DEFAULT_DISK_KAPPA if args.disk_kappa is None else args.disk_kappa,
        "denoise_target": args.denoise_target,
        "dp_adam": args.dp_adam,
        "lr_schedule": args.lr_schedule,
        "device": args.device,
        "output": args.output,
        "save": args.save,
        "progress": not args.quiet,
        "checkpoint_dir": args.checkpoint_dir,
        "checkpoint_every": args.checkpoint_every,
        "resume": args.resume,
    }


def run_command(prog: str, command: str, action: Callable[[], None]) -> int:
    """Run ``action`` (one command of ``prog``); its warnings one line each on stderr, and a
    user's error (ValueError) one line and exit code 2.

    Returns:
        0, or 2 after a ValueError.
    """

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"{prog} {command}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        try:
            action()
        except ValueError as err:
            print(f"{prog} {command}: error: {err}", file=sys.stderr)
            return 2
    return 0


def training_summary(log: dict) -> str:
    """The line a ``train`` command ends with: the final main metric and the privacy spent."""
    final = log["evals"][-1]
    privacy = ""
    if log["config"]["dp"]:
        eps = log["epsilon"]
        privacy = (
            f", epsilon {eps:.3g} at delta {log['delta']:.3g}"
            if eps is not None
            else ", epsilon infinite (no noise)"
        )
        if log["config"]["noise_seed"] is not None:
            privacy += " (NOT private: public --noise-seed)"
    return (
        f"{log['task']}: {log['main_metric']} {final[log['main_metric']]:.4f} after "
        f"{final['step']} steps{privacy}"
    )
