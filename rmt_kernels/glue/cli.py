"""``rmt-glue``: fine-tune on a GLUE task with DP-SGD (optionally denoised), evaluate a saved
model, compare runs' logs.

    rmt-glue train --task sst2 --data-dir ../shared/data/glue --model MODEL_DIR \\
        --epsilon 8 --batch-size 256 --physical-batch-size 64 --epochs 1 --output run.json
    rmt-glue evaluate --task sst2 --data-dir ../shared/data/glue --model SAVED_DIR
    rmt-glue compare dp.json dp-denoise.json --output curves.png
    rmt-glue probe --task sst2 ... --snapshots 0 10 --output-dir probe   # NOT private
    torchrun --nproc-per-node 2 -m rmt_kernels.glue train ... --checkpoint-dir ckpt [--resume]

Errors a user can act on (missing data, unknown task, unreachable epsilon, unwritable outputs,
...) exit with code 2 and a one-line message, before training where they can be known then.
Warnings (a run that is not private, lost steps charged at a resume) are one line each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from rmt_kernels.glue.tasks import TASKS
from rmt_kernels.shrinkage import NORM_CORRECTIONS, SHRINKERS
from rmt_kernels.training import stages


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune on a GLUE task (DP-SGD by default)",
        description="Fine-tune a sequence classifier on a GLUE task with DP-SGD (our engine or "
        "Opacus's), optionally denoising the noisy gradients; log evaluations to JSON.",
    )
    p.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)}")
    p.add_argument(
        "--data-dir",
        help="a local GLUE folder (SST-2/train.tsv, ...); omitted: the hub's 'glue' dataset",
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", help="model folder or hub name (its tokenizer comes with it)")
    g.add_argument("--init", choices=("pretrained", "random"), default="pretrained")
    g.add_argument("--config", help="with --init random: a config folder (with a tokenizer)")
    g.add_argument("--freeze-embeddings", action="store_true", help="train the rest only")
    g.add_argument(
        "--pooling",
        choices=("cls", "mean"),
        default="cls",
        help="what the head reads: the first token (Hugging Face's default) or the mean of the "
        "tokens (what sentence encoders such as MiniLM were trained for; BERT-style models)",
    )
    g.add_argument("--max-length", type=_positive_int, default=128, help="tokens (truncation)")
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
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=_positive_int, default=64, help="logical batch")
    g.add_argument(
        "--physical-batch-size",
        type=_positive_int,
        help="examples per forward/backward; must divide --batch-size (default: all of it)",
    )
    g.add_argument("--epochs", type=float, help="run length in epochs (default 1)")
    g.add_argument("--steps", type=_positive_int, help="run length in optimizer steps")
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
    g = p.add_argument_group("run")
    g.add_argument("--train-size", type=_positive_int, help="use a random subset of train")
    g.add_argument("--eval-size", type=_positive_int, help="use a random subset of validation")
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


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a saved model on a task's validation split")
    p.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)}")
    p.add_argument("--data-dir", help="a local GLUE folder; omitted: the hub")
    p.add_argument("--model", required=True, help="folder saved by 'train --save' (or hub name)")
    p.add_argument("--max-length", type=_positive_int, default=128)
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--eval-size", type=_positive_int)
    p.add_argument("--device")
    p.add_argument("--output", help="write the metrics as JSON here")


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="plot a metric of several runs vs step and vs time")
    p.add_argument("logs", nargs="+", help="JSON logs written by 'train --output'")
    p.add_argument("--output", required=True, help="PNG file to write")
    p.add_argument("--metric", help="default: the task's main metric")
    p.add_argument("--labels", nargs="+", help="one legend label per log (default: derived)")


def _add_probe(sub) -> None:
    from rmt_kernels.glue.probe import PROBE_DESCRIPTION, PROBE_HELP, add_arguments

    add_arguments(sub.add_parser("probe", help=PROBE_HELP, description=PROBE_DESCRIPTION))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rmt-glue", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_evaluate(sub)
    _add_compare(sub)
    _add_probe(sub)
    return parser


def _train_config(args: argparse.Namespace):
    """The ``GlueConfig`` of ``rmt-glue train``'s arguments.

    Raises:
        ValueError: ``--secure-mode`` (the default, a flag kept for old scripts; not an option
            of the config) with ``--no-dp``, ``--engine opacus`` or ``--noise-seed``.
    """
    from rmt_kernels.glue.config import GlueConfig

    if args.secure_mode and (not args.dp or args.engine != "native"):
        raise ValueError("--secure-mode is for DP with --engine native")
    if args.secure_mode and args.dp and args.noise_seed is not None:
        raise ValueError(
            "--noise-seed makes the noise public, --secure-mode keeps it secret: give one"
        )
    return GlueConfig(
        task=args.task,
        data_dir=args.data_dir,
        model=args.model,
        init=args.init,
        config=args.config,
        dp=args.dp,
        engine=args.engine,
        epsilon=args.epsilon,
        noise_multiplier=args.noise_multiplier,
        delta=args.delta,
        max_grad_norm=args.max_grad_norm,
        accountant=args.accountant,
        noise_seed=args.noise_seed,
        batch_size=args.batch_size,
        physical_batch_size=args.physical_batch_size,
        epochs=args.epochs,
        steps=args.steps,
        lr=args.lr,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        max_length=args.max_length,
        train_size=args.train_size,
        eval_size=args.eval_size,
        eval_every=args.eval_every,
        seed=args.seed,
        denoise=args.denoise,
        denoise_options={
            "kappa": args.kappa,
            "shrinker": args.shrinker,
            "norm": args.norm,
            "rank": args.rank,
            "niter": args.niter,
            "min_dim": args.min_dim,
            "warm_start": args.warm_start,
            "passthrough_below_edge": args.denoise_passthrough,
        },
        filter=args.filter,
        filter_beta=stages.DEFAULT_FILTER_BETA if args.filter_beta is None else args.filter_beta,
        disk_kappa=stages.DEFAULT_DISK_KAPPA if args.disk_kappa is None else args.disk_kappa,
        denoise_target=args.denoise_target,
        dp_adam=args.dp_adam,
        lr_schedule=args.lr_schedule,
        freeze_embeddings=args.freeze_embeddings,
        pooling=args.pooling,
        device=args.device,
        output=args.output,
        save=args.save,
        progress=not args.quiet,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``rmt-glue``; returns the exit code (2 for a user's error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    denoise_flags = (
        "kappa",
        "shrinker",
        "norm",
        "rank",
        "niter",
        "min_dim",
        "warm_start",
        "denoise_passthrough",
    )
    if args.command == "train" and not args.denoise:
        given = [f"--{k.replace('_', '-')}" for k in denoise_flags if getattr(args, k) is not None]
        if given:
            parser.error(f"{', '.join(given)} only apply with --denoise")
    if args.command == "train":
        target = stages.denoise_target(args.denoise_target)
        if args.filter_beta is not None and not (args.filter == "ema" or target == "moment"):
            parser.error("--filter-beta only applies with --filter ema or --denoise-target moment")
        if args.disk_kappa is not None and args.filter != "disk":
            parser.error("--disk-kappa only applies with --filter disk")
    if args.command == "train" and args.steps is not None and args.epochs is not None:
        parser.error("give --steps or --epochs, not both")
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning(args.command)
        return _run(args)


def _one_line_warning(command: str):
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"rmt-glue {command}: warning: {message}", file=sys.stderr)

    return show


def _run(args: argparse.Namespace) -> int:
    """Run the command; exit code 2 with a one-line message for a user's error."""
    try:
        if args.command == "train":
            _train(args)
        elif args.command == "evaluate":
            _evaluate(args)
        elif args.command == "probe":
            from rmt_kernels.glue.probe import probe_command

            probe_command(args)
        else:
            from rmt_kernels.training.compare import compare

            compare(args.logs, args.output, metric=args.metric, labels=args.labels)
            print(f"wrote {args.output}")
    except ValueError as err:
        print(f"rmt-glue {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


def _train(args: argparse.Namespace) -> None:
    """``rmt-glue train``: train, then say the final main metric and the privacy spent."""
    from rmt_kernels.glue.fine_tune import train

    log = train(_train_config(args))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 reports
        return
    final = log["evals"][-1]
    privacy = ""
    if args.dp:
        eps = log["epsilon"]
        privacy = (
            f", epsilon {eps:.3g} at delta {log['delta']:.3g}"
            if eps is not None
            else ", epsilon infinite (no noise)"
        )
        if log["config"]["noise_seed"] is not None:
            privacy += " (NOT private: public --noise-seed)"
    print(
        f"{log['task']}: {log['main_metric']} {final[log['main_metric']]:.4f} after "
        f"{final['step']} steps{privacy}"
    )


def _evaluate(args: argparse.Namespace) -> None:
    """``rmt-glue evaluate``: a saved model's metrics, printed (and written to --output)."""
    from rmt_kernels.glue.evaluation import evaluate_saved

    result = evaluate_saved(
        args.task,
        args.model,
        args.data_dir,
        max_length=args.max_length,
        batch_size=args.batch_size,
        eval_size=args.eval_size,
        device=args.device,
    )
    text = json.dumps(result, indent=2)
    if args.output:
        from rmt_kernels.training.outputs import write_json

        write_json(args.output, result, "--output")
    print(text)
