"""``rmt-glue compare``: one PNG with a metric of several runs against optimizer steps and
against training wall-clock time (evaluation time excluded), from their JSON logs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


def read_log(path: str | Path) -> dict:
    """A log written by ``rmt-glue train --output``.

    Raises:
        ValueError: the file is missing, not JSON, or holds no evaluations.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"log {path} does not exist")
    try:
        log = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"log {path} is not JSON: {err}") from err
    if not isinstance(log, dict) or not log.get("evals"):
        raise ValueError(f"log {path} has no evaluations (is it an 'rmt-glue train' log?)")
    return log


def describe(log: dict, path: str | Path) -> str:
    """A legend label: the file's name and the run's privacy set-up."""
    cfg = log.get("config", {})
    if not cfg.get("dp", True):
        setup = "non-private"
    else:
        eps = log.get("epsilon")
        setup = f"DP eps={eps:.2g}" if eps is not None else "DP"
        if cfg.get("engine") == "opacus":
            setup += " opacus"
        if cfg.get("denoise"):
            target = cfg.get("denoise_target")
            setup += f" + denoise ({target})" if target else " + denoise"
    return f"{Path(path).stem} ({setup})"


def eval_seconds(log: dict) -> list[float] | None:
    """The training seconds (evaluation excluded) at each of ``log``'s evaluations: the
    records' own, or for a private log, which holds only the whole run's time (a step's time
    reveals its Poisson batch size), the evaluation's step times the run's mean seconds per step.
    None for a private log whose run has not finished (no total yet)."""
    evals = log["evals"]
    if all("seconds" in record for record in evals):
        return [record["seconds"] for record in evals]
    total, steps = log.get("train_seconds"), log.get("derived", {}).get("steps")
    if total is None or not steps:
        return None
    return [record["step"] * total / steps for record in evals]


def compare(
    logs: Sequence[str | Path],
    output: str | Path,
    *,
    metric: str | None = None,
    labels: Sequence[str] | None = None,
) -> Path:
    """Draw ``metric`` (default: the first log's main metric) vs step and vs seconds
    (:func:`eval_seconds`).

    Raises:
        ValueError: an unreadable log, a metric a log lacks, or a label count that differs
            from the log count.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    runs = [read_log(p) for p in logs]
    if labels is not None and len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} logs")
    metric = metric or runs[0].get("main_metric")
    for path, run in zip(logs, runs, strict=True):
        if metric not in run["evals"][-1]:
            known = sorted(k for k, v in run["evals"][-1].items() if isinstance(v, float))
            raise ValueError(f"log {path} has no metric {metric!r}; it has {known}")
    tasks = sorted({str(run.get("task")) for run in runs})
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for i, (path, run) in enumerate(zip(logs, runs, strict=True)):
        label = labels[i] if labels is not None else describe(run, path)
        evals = run["evals"]
        values = [e[metric] for e in evals]
        style = {"marker": "o", "markersize": 3, "linewidth": 1.5, "label": label}
        by_step.plot([e["step"] for e in evals], values, **style)
        seconds = eval_seconds(run)
        if seconds is not None:  # a private run still going has no time yet
            by_time.plot(seconds, values, **style)
    by_step.set_xlabel("optimizer step")
    by_time.set_xlabel(
        # Two lines: on one, the label is wider than the axes and is cut at the figure's edge.
        "training time (s, evaluation excluded;\nprivate runs: step x mean time per step)"
    )
    by_step.set_ylabel(metric)
    for ax in (by_step, by_time):
        ax.grid(True, alpha=0.3)
    by_step.legend(fontsize=8, loc="best")
    fig.suptitle(f"{', '.join(tasks)}: {metric} on the validation split")
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output
