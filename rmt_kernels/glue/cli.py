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

from rmt_kernels.glue.tasks import TASKS
from rmt_kernels.training import arguments
from rmt_kernels.training.arguments import positive_int


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
    g.add_argument("--max-length", type=positive_int, default=128, help="tokens (truncation)")
    # The flags every training command shares (rmt_kernels/training/arguments.py).
    arguments.add_privacy_arguments(p)
    arguments.add_post_processing_arguments(p)
    arguments.add_optimisation_arguments(p)
    g = p.add_argument_group("run")
    g.add_argument("--train-size", type=positive_int, help="use a random subset of train")
    g.add_argument("--eval-size", type=positive_int, help="use a random subset of validation")
    arguments.add_run_arguments(g)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a saved model on a task's validation split")
    p.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)}")
    p.add_argument("--data-dir", help="a local GLUE folder; omitted: the hub")
    p.add_argument("--model", required=True, help="folder saved by 'train --save' (or hub name)")
    p.add_argument("--max-length", type=positive_int, default=128)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--eval-size", type=positive_int)
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
        ValueError: ``--secure-mode`` with ``--no-dp``, ``--engine opacus`` or ``--noise-seed``
            (``rmt_kernels.training.arguments.train_config_fields``).
    """
    from rmt_kernels.glue.config import GlueConfig

    return GlueConfig(
        **arguments.train_config_fields(args),
        task=args.task,
        data_dir=args.data_dir,
        model=args.model,
        init=args.init,
        config=args.config,
        max_length=args.max_length,
        train_size=args.train_size,
        eval_size=args.eval_size,
        freeze_embeddings=args.freeze_embeddings,
        pooling=args.pooling,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``rmt-glue``; returns the exit code (2 for a user's error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        arguments.check_train_arguments(parser, args)
    return arguments.run_command("rmt-glue", args.command, lambda: _run(args))


def _run(args: argparse.Namespace) -> None:
    """Run the command (a user's error raises ValueError: exit code 2 in ``main``)."""
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


def _train(args: argparse.Namespace) -> None:
    """``rmt-glue train``: train, then say the final main metric and the privacy spent."""
    from rmt_kernels.glue.fine_tune import train

    log = train(_train_config(args))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 reports
        return
    print(arguments.training_summary(log))


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
