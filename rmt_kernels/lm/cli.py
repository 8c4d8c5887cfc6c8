"""``rmt-lm``: train a decoder LM on E2E (table-to-text) with DP-SGD or not, evaluate a saved
model (BLEU, ROUGE-L), print its outputs, compare runs' logs.

    rmt-lm train --model gpt2-small --lora --epsilon 8 --batch-size 512 \\
        --physical-batch-size 32 --epochs 3 --output run.json --save model
    rmt-lm evaluate --model model --split test
    rmt-lm generate --model model --mr "name[The Eagle], eatType[pub]"
    rmt-lm generate --model model --first 5 --split dev
    rmt-lm compare dp.json nodp.json --output curves.png
    torchrun --nproc-per-node 2 -m rmt_kernels.lm train ... --checkpoint-dir ckpt [--resume]

E2E is read from --data-dir (default ../shared/data/e2e). Named models (gpt2-tiny, gpt2-small,
llama-tiny, ...) are randomly initialised. Errors a user can act on exit with code 2 and a
one-line message, before training where they can be known then.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from rmt_kernels.lm.config import EVAL_SPLITS, LOSS_REDUCTIONS
from rmt_kernels.lm.model import LORA_TARGETS, NAMED_MODELS
from rmt_kernels.training import arguments
from rmt_kernels.training.arguments import positive_int

PROG = "rmt-lm"
# LmConfig's LoRA defaults; the flags default to None so that one given without --lora is seen.
LORA_DEFAULTS = {"lora_r": 8, "lora_alpha": 16.0, "lora_targets": "attention"}


def _add_model_arguments(p: argparse.ArgumentParser, *, saved: bool) -> None:
    """--model and --tokenizer (a saved model for evaluate/generate)."""
    if saved:
        p.add_argument(
            "--model", required=True, help="a folder saved by 'train --save' (or a hub name)"
        )
    else:
        p.add_argument(
            "--model",
            default="gpt2-tiny",
            help=f"a named config, randomly initialised ({', '.join(NAMED_MODELS)}; default "
            "gpt2-tiny), or a causal LM folder or hub name (its weights)",
        )
    p.add_argument(
        "--tokenizer",
        help="a tokenizer folder, a SentencePiece .model file, or GPT-2's vocab.json + "
        "merges.txt folder (default: the model's own; for named configs ../shared/models/gpt2 "
        "or ../shared/models/llama2-tokenizer)",
    )


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="the E2E folder (default ../shared/data/e2e)")


def _add_generation_arguments(g) -> None:
    g.add_argument(
        "--max-new-tokens", type=positive_int, default=64, help="generated tokens at most"
    )
    g.add_argument(
        "--num-beams", type=positive_int, default=1, help="1: greedy (default); more: beam search"
    )


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a decoder LM on E2E (DP-SGD by default)",
        description="Train a causal LM on E2E (mr -> reference) with DP-SGD (our engine or "
        "Opacus's) or not; evaluate BLEU and ROUGE-L by generation; log to JSON.",
    )
    _add_data_arguments(p)
    g = p.add_argument_group("model")
    _add_model_arguments(g, saved=False)
    g.add_argument(
        "--random-init",
        action="store_true",
        help="with a model path: train its config from random weights",
    )
    g.add_argument(
        "--freeze-norms",
        action="store_true",
        help="do not train the normalisation layers (LayerNorm, RMSNorm)",
    )
    g.add_argument(
        "--lora", action="store_true", help="train PEFT LoRA adapters only (the base frozen)"
    )
    g.add_argument("--lora-r", type=positive_int, help="LoRA rank (default 8)")
    g.add_argument("--lora-alpha", type=float, help="LoRA scale numerator (default 16)")
    g.add_argument(
        "--lora-targets",
        choices=LORA_TARGETS,
        help="the attention projections (default; GPT-2's c_attn, Llama's q_proj and v_proj) "
        "or every linear layer but the output head",
    )
    g.add_argument(
        "--max-length",
        type=positive_int,
        default=128,
        help="tokens of prompt + reference + eos (the reference truncated)",
    )
    g.add_argument(
        "--loss-reduction",
        choices=LOSS_REDUCTIONS,
        default="sequence_mean",
        help="each example's loss: the mean (default) or sum of its reference tokens' "
        "cross-entropy (per example either way: the DP bound holds)",
    )
    _add_generation_arguments(g)
    # The flags every training command shares (rmt_kernels/training/arguments.py).
    arguments.add_privacy_arguments(p)
    arguments.add_post_processing_arguments(p)
    arguments.add_optimisation_arguments(p)
    g = p.add_argument_group("run")
    g.add_argument("--train-size", type=positive_int, help="use a random subset of train")
    g.add_argument(
        "--eval-size",
        type=positive_int,
        help="evaluate on a random subset of the meaning representations (all their references)",
    )
    g.add_argument("--eval-split", choices=EVAL_SPLITS, default="dev")
    arguments.add_run_arguments(g)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="BLEU and ROUGE-L of a saved model on dev or test")
    _add_model_arguments(p, saved=True)
    _add_data_arguments(p)
    p.add_argument("--split", choices=EVAL_SPLITS, default="dev")
    p.add_argument("--eval-size", type=positive_int, help="meaning representations (default all)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--max-length", type=positive_int, default=128)
    _add_generation_arguments(p)
    p.add_argument("--device")
    p.add_argument("--output", help="write the metrics as JSON here")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="print a saved model's outputs")
    _add_model_arguments(p, saved=True)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--mr", nargs="+", help="meaning representations to verbalise")
    what.add_argument(
        "--first", type=positive_int, help="the first N meaning representations of --split"
    )
    _add_data_arguments(p)
    p.add_argument("--split", choices=("train", *EVAL_SPLITS), default="dev")
    p.add_argument("--batch-size", type=positive_int, default=32)
    _add_generation_arguments(p)
    p.add_argument("--device")


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="plot a metric of several runs vs step and vs time")
    p.add_argument("logs", nargs="+", help="JSON logs written by 'train --output'")
    p.add_argument("--output", required=True, help="PNG file to write")
    p.add_argument("--metric", help="default: bleu (or eval_loss, rouge_l)")
    p.add_argument("--labels", nargs="+", help="one legend label per log (default: derived)")


def build_parser() -> argparse.ArgumentParser:
    """``rmt-lm``'s parser: train, evaluate, generate, compare."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_evaluate(sub)
    _add_generate(sub)
    _add_compare(sub)
    return parser


def _train_config(args: argparse.Namespace):
    """The ``LmConfig`` of ``rmt-lm train``'s arguments.

    Raises:
        ValueError: ``--secure-mode`` with ``--no-dp``, ``--engine opacus`` or ``--noise-seed``.
    """
    from rmt_kernels.lm.config import LmConfig

    lora = {k: getattr(args, k) if getattr(args, k) is not None else v
            for k, v in LORA_DEFAULTS.items()}  # fmt: skip
    return LmConfig(
        **arguments.train_config_fields(args),
        **lora,
        model=args.model,
        tokenizer=args.tokenizer,
        random_init=args.random_init,
        freeze_norms=args.freeze_norms,
        lora=args.lora,
        data_dir=args.data_dir,
        eval_split=args.eval_split,
        train_size=args.train_size,
        eval_size=args.eval_size,
        max_length=args.max_length,
        loss_reduction=args.loss_reduction,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``rmt-lm``; returns the exit code (2 for a user's error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        arguments.check_train_arguments(parser, args)
        given = [f"--{k.replace('_', '-')}" for k in LORA_DEFAULTS if getattr(args, k) is not None]
        if given and not args.lora:
            parser.error(f"{', '.join(given)} only apply with --lora")
    return arguments.run_command(PROG, args.command, lambda: _run(args))


def _run(args: argparse.Namespace) -> None:
    """Run the command (a user's error raises ValueError: exit code 2 in ``main``)."""
    if args.command == "train":
        _train(args)
    elif args.command == "evaluate":
        _evaluate(args)
    elif args.command == "generate":
        _generate(args)
    else:
        from rmt_kernels.training.compare import compare

        compare(args.logs, args.output, metric=args.metric, labels=args.labels)
        print(f"wrote {args.output}")


def _train(args: argparse.Namespace) -> None:
    """``rmt-lm train``: train, then say the final BLEU and the privacy spent."""
    from rmt_kernels.lm.task import train

    log = train(_train_config(args))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 reports
        return
    print(arguments.training_summary(log))


def _evaluate(args: argparse.Namespace) -> None:
    """``rmt-lm evaluate``: a saved model's metrics, printed (and written to --output)."""
    from rmt_kernels.lm.evaluation import evaluate_saved

    if args.output and (Path(args.output).is_dir() or not Path(args.output).parent.is_dir()):
        raise ValueError(f"--output {args.output}: give a file in an existing folder")
    result = evaluate_saved(
        args.model,
        args.data_dir,
        split=args.split,
        tokenizer=args.tokenizer,
        eval_size=args.eval_size,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        device=args.device,
    )
    if args.output:
        from rmt_kernels.training.outputs import write_json

        write_json(args.output, result, "--output")
    print(json.dumps(result, indent=2))


def _generate(args: argparse.Namespace) -> None:
    """``rmt-lm generate``: one line per meaning representation: the mr, a tab, the output."""
    from rmt_kernels.lm.evaluation import first_mrs, generate_saved

    mrs = args.mr if args.mr is not None else first_mrs(args.data_dir, args.split, args.first)
    outputs = generate_saved(
        args.model,
        mrs,
        tokenizer=args.tokenizer,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        device=args.device,
    )
    for mr, out in zip(mrs, outputs, strict=True):
        print(f"{mr}\t{out}")
