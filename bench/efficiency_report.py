"""The sample-efficiency experiment's report: targets, steps and seconds to reach them, the table,
the learning-rate tuning table and the plot, all from ``rmt-glue train`` JSON logs.

Targets are fractions (90%, 95%) of plain DP-SGD's final dev accuracy, the mean over its seeds.
A method's "steps to 95%" is its first evaluation at or above the target (so resolved to the
evaluation interval); a run that never gets there is reported as such, never dropped.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from bench.efficiency_methods import METHODS, Method
from rmt_kernels.training.compare import eval_seconds, read_log

FRACTIONS = (0.90, 0.95)
# The baseline every target is a fraction of.
BASELINE = "dp"
# How the tuning sweep ranks learning rates: the mean dev accuracy of the last few evaluations
# (the final one alone is a single noisy point, 872 examples: std ~0.014 at 0.8).
TAIL_EVALS = 4


def first_reaching(log: dict, target: float, metric: str = "accuracy") -> tuple[int, float] | None:
    """(step, training seconds) of the first evaluation at or above ``target``; None if never.
    A private log's seconds are the step times the run's mean time per step (eval_seconds)."""
    seconds = eval_seconds(log)
    for i, record in enumerate(log["evals"]):
        if record[metric] >= target:
            return record["step"], (seconds[i] if seconds is not None else math.nan)
    return None


def samples_per_second(log: dict) -> float:
    """Training throughput of a run: its last evaluation's ``samples_per_s``, or for a private
    run (whose log keeps the exact batch sizes out) the expected examples per second, steps per
    second times the expected batch size (public: sampling rate x training examples)."""
    last = log["evals"][-1]
    if last.get("samples_per_s") is not None:
        return last["samples_per_s"]
    derived = log["derived"]
    # A private log holds only the whole run's steps per second (older ones: each record's).
    steps_per_s = last.get("steps_per_s") or log["steps_per_s"]
    return steps_per_s * derived["sample_rate"] * derived["train_examples"]


def tail_accuracy(log: dict, evals: int = TAIL_EVALS) -> float:
    """Mean dev accuracy over the last ``evals`` evaluations of a run."""
    tail = [r["accuracy"] for r in log["evals"][-evals:]]
    return statistics.mean(tail)


def _spread(values: Sequence[float], fmt: str) -> str:
    """ "mean ± std (min-max)" over seeds, or the value alone for one seed."""
    if len(values) == 1:
        return format(values[0], fmt)
    mean, std = statistics.mean(values), statistics.stdev(values)
    return (
        f"{format(mean, fmt)} ± {format(std, fmt)} "
        f"({format(min(values), fmt)}-{format(max(values), fmt)})"
    )


def load_logs(out: Path, methods: Mapping[str, Method] = METHODS) -> dict[str, list[dict]]:
    """Finished logs in ``out`` (``<method>-seed<n>.json``) by method, in ``methods``'s order
    (the experiment's arms)."""
    logs: dict[str, list[dict]] = {}
    for name in methods:
        paths = sorted(out.glob(f"{name}-seed*.json"))
        if paths:
            logs[name] = [read_log(path) for path in paths]
    if BASELINE not in logs:
        raise SystemExit(f"no plain DP-SGD log ({BASELINE}-seed*.json) in {out}: run it first")
    return logs


def summarise(logs: dict[str, list[dict]]) -> dict:
    """Targets and, per method, final accuracies and steps/seconds to each target."""
    plain_final = [log["evals"][-1]["accuracy"] for log in logs[BASELINE]]
    reference = statistics.mean(plain_final)
    summary: dict = {"reference": reference, "targets": {}, "methods": {}}
    for fraction in FRACTIONS:
        summary["targets"][fraction] = fraction * reference
    for method, runs in logs.items():
        row: dict = {
            "seeds": [log["config"]["seed"] for log in runs],
            "lr": runs[0]["config"]["lr"],
            "final": [log["evals"][-1]["accuracy"] for log in runs],
            "tail": [tail_accuracy(log) for log in runs],
            "samples_per_s": [samples_per_second(log) for log in runs],
        }
        for fraction, target in summary["targets"].items():
            row[fraction] = [first_reaching(log, target) for log in runs]
        summary["methods"][method] = row
    return summary


def _hits_cell(hits: list[tuple[int, float] | None], index: int, fmt: str) -> str:
    reached = [h[index] for h in hits if h is not None]
    missed = len(hits) - len(reached)
    if not reached:
        return f"not reached ({missed}/{len(hits)})"
    cell = _spread(reached, fmt)
    return cell + (f", {missed}/{len(hits)} never" if missed else "")


def setup_text(first: dict) -> str:
    """One paragraph describing the shared set-up of a run (from its log)."""
    derived, cfg, v = first["derived"], first["config"], first["versions"]
    noise = (
        f"epsilon {first['epsilon']:.2f} at delta {first['delta']:.2e} (noise multiplier "
        f"{first['noise_multiplier']:.4f})"
        if first.get("epsilon") is not None
        else "no privacy"
    )
    return (
        f"Model `{Path(cfg['model']).name}` (all-MiniLM-L6-v2, "
        f"{derived['trainable_parameters']:,} parameters, all trained), SST-2 train "
        f"({derived['train_examples']:,} examples), dev ({derived['eval_examples']} examples). "
        f"Logical batch {cfg['batch_size']} (Poisson, q = {derived['sample_rate']:.5f}), physical "
        f"{derived['physical_batch_size']}, {derived['steps']} steps, max length "
        f"{cfg['max_length']}, {cfg.get('pooling', 'cls')} pooling, C = {cfg['max_grad_norm']}, "
        f"{noise}, evaluation every {cfg['eval_every']} steps. Device {derived['device']}; torch "
        f"{v.get('torch')}, transformers {v.get('transformers')}, opacus {v.get('opacus')}, "
        f"Python {v.get('python')}."
    )


def markdown(
    summary: dict,
    logs: dict[str, list[dict]],
    command: str,
    methods: Mapping[str, Method] = METHODS,
    note: str = "",
) -> str:
    """The results table, the targets and the set-up (with ``note``, a paragraph on what the
    logs do not say, such as how the privacy budget is treated), as markdown."""
    lines = [
        f"# Sample efficiency on SST-2 ({time.strftime('%Y-%m-%d')})",
        "",
        f"Command: `{command}`",
        "",
        setup_text(logs[BASELINE][0]),
        "",
        *([note, ""] if note else []),
        f"Targets: 90% and 95% of plain DP-SGD's final dev accuracy (mean over seeds, "
        f"{summary['reference']:.4f}): {summary['targets'][0.90]:.4f} and "
        f"{summary['targets'][0.95]:.4f}. Steps are resolved to the evaluation interval; "
        "seconds are training time (evaluation excluded). Mean ± std (min-max) over seeds. "
        f"'last {TAIL_EVALS}' is the mean accuracy of the last {TAIL_EVALS} evaluations.",
        "",
        "| method | lr | seeds | final dev accuracy | last 4 | steps to 90% | steps to 95% "
        "| seconds to 90% | seconds to 95% | samples/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, row in summary["methods"].items():
        lines.append(
            f"| {method} | {row['lr']:g} | {len(row['seeds'])} | {_spread(row['final'], '.4f')} "
            f"| {_spread(row['tail'], '.4f')} | "
            f"{_hits_cell(row[0.90], 0, '.1f')} | {_hits_cell(row[0.95], 0, '.1f')} | "
            f"{_hits_cell(row[0.90], 1, '.0f')} | {_hits_cell(row[0.95], 1, '.0f')} | "
            f"{_spread(row['samples_per_s'], '.1f')} |"
        )
    lines += ["", "Methods:", ""]
    lines += [f"- `{m}`: {methods[m].description}" for m in summary["methods"]]
    return "\n".join(lines) + "\n"


def tuning_table(
    logs: list[dict], reference: float | None, methods: Mapping[str, Method] = METHODS
) -> str:
    """The sweep as markdown: one row per run (method, lr, options), sorted by method (in
    ``methods``'s order) then lr, with the best learning rate of each method marked (highest
    mean of the last evaluations)."""
    rows: dict[str, list[dict]] = {}
    for log in logs:
        rows.setdefault(log["method"], []).append(log)
    lines = [
        f"| method | lr | options | final | last {TAIL_EVALS} | best (step) | step to 95% of "
        "reference | accuracy every evaluation |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = list(methods)
    for method in sorted(rows, key=lambda m: order.index(m) if m in order else len(order)):
        runs = sorted(rows[method], key=lambda log: log["config"]["lr"])
        best = max(runs, key=tail_accuracy)
        for log in runs:
            accs = [r["accuracy"] for r in log["evals"]]
            peak = max(range(len(accs)), key=accs.__getitem__)
            hit = first_reaching(log, 0.95 * reference) if reference else None
            options = log["config"].get("denoise_options") or {}
            mark = " **best**" if log is best and len(runs) > 1 else ""
            lines.append(
                f"| {method}{mark} | {log['config']['lr']:g} | "
                f"{', '.join(f'{k}={v}' for k, v in options.items() if k != 'min_dim') or '-'} | "
                f"{accs[-1]:.4f} | {tail_accuracy(log):.4f} | {accs[peak]:.4f} "
                f"({log['evals'][peak]['step']}) | {hit[0] if hit else '-'} | "
                f"{' '.join(f'{a:.3f}' for a in accs)} |"
            )
    return "\n".join(lines) + "\n"


def _layer_kind(name: str) -> str:
    """Group a parameter name into the kind of matrix it is (for the per-layer plot)."""
    for key in ("query", "key", "value", "attention.output", "intermediate", "output", "pooler"):
        if key in name:
            return key.replace("attention.output", "attn-out")
    return name


def plot(
    logs: dict[str, list[dict]],
    summary: dict,
    output: Path,
    methods: Mapping[str, Method] = METHODS,
) -> Path:
    """Accuracy vs step and vs seconds (mean and min-max over seeds) for every method (colours
    by place in ``methods``), and the denoisers' kept norm ratio per method over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(19, 5.5))
    cmap = plt.get_cmap("tab10")
    colors = {m: ("tab:gray" if m == "non-private" else cmap(i)) for i, m in enumerate(methods)}
    for method, runs in logs.items():
        steps = [r["step"] for r in runs[0]["evals"]]
        accs = [[r["accuracy"] for r in log["evals"]] for log in runs]
        secs = [eval_seconds(log) or [math.nan] * len(log["evals"]) for log in runs]
        n = min(len(a) for a in accs)
        mean = [statistics.mean(a[i] for a in accs) for i in range(n)]
        low = [min(a[i] for a in accs) for i in range(n)]
        high = [max(a[i] for a in accs) for i in range(n)]
        label = f"{method}, lr {runs[0]['config']['lr']:g} ({len(runs)} seed" + (
            "s)" if len(runs) > 1 else ")"
        )
        lw = 2.5 if method == BASELINE else 1.3
        axes[0].plot(steps[:n], mean, color=colors[method], label=label, lw=lw)
        axes[0].fill_between(steps[:n], low, high, color=colors[method], alpha=0.12)
        for log_secs, acc in zip(secs, accs, strict=True):
            axes[1].plot(log_secs, acc, color=colors[method], alpha=0.6, lw=1)
        # The denoisers' mean kept norm ratio over the logged matrices, first seed.
        points = []
        for record in runs[0]["evals"]:
            ratios = [s["norm_ratio"] for s in record.get("denoise", {}).values()]
            if ratios:
                points.append((record["step"], statistics.mean(ratios)))
        if points:
            axes[2].plot(*zip(*points, strict=True), color=colors[method], label=method)
    for fraction, target in summary["targets"].items():
        for ax in axes[:2]:
            ax.axhline(target, color="k", ls=":", lw=0.8)
            ax.text(ax.get_xlim()[0], target, f" {fraction:.0%} of DP final", va="bottom")
    axes[0].set(xlabel="optimizer step", ylabel="SST-2 dev accuracy", title="vs steps")
    axes[1].set(xlabel="training seconds", ylabel="SST-2 dev accuracy", title="vs seconds")
    axes[2].set(
        xlabel="optimizer step",
        ylabel="||denoised|| / ||input|| (mean over matrices)",
        title="how much the denoisers keep (seed 0)",
    )
    axes[0].legend(loc="lower right", fontsize=8)
    if axes[2].lines:
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


__all__ = [
    "BASELINE",
    "FRACTIONS",
    "first_reaching",
    "load_logs",
    "markdown",
    "plot",
    "summarise",
    "tail_accuracy",
    "tuning_table",
]
