"""Where one DP step's time over the non-private step goes (issue 28: what bounds the 1.05x target).

``python -m bench.dp_step_breakdown [--layers 2] [--batch 16] [--length 64] [--steps 5]``

bench/dp_step.py's step (RoBERTa-base shapes, random init, every parameter trainable), each
method in this one process, steps interleaved round-robin (load spreads over all alike). The
private steps run under ``torch.profiler``; the time of each of the package's ops (``rmt::*``,
the ATen calls inside it included) is summed per step and grouped: certified norms, clipped
noisy sums (the noise is drawn inside them), denoising, other package ops. Beside them, the
noise alone: one draw of as many Gaussian coordinates as the model has parameters
(``rmt::add_gaussian_noise`` on zeros), which no DP-SGD step can avoid.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import rmt_kernels
from bench.dp_step import build_step
from bench.report import machine_description

METHODS = ("non-private", "ours", "ours + denoise")
GROUPS = (
    ("certified norms", "sq_norms"),
    ("clipped noisy sums (noise drawn inside)", "clipped_noisy_sum"),
    ("denoising", "denoise"),
)


def group_of(op: str) -> str:
    """The group of a ``rmt::`` op's name."""
    for group, key in GROUPS:
        if key in op:
            return group
    return "other package ops"


def package_op_ms(step, steps: int) -> dict[str, float]:
    """Mean CPU ms per step of each group of ``rmt::`` ops (the profiler's totals over ``steps``
    steps, divided by ``steps``)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("rmt::"):
            # Inclusive time: the ATen calls inside an op (its GEMMs, its eigensolves) are its
            # cost; package ops do not call each other, so nothing is counted twice.
            totals[group_of(event.key)] += event.cpu_time_total / 1e3 / steps
    return dict(totals)


def noise_alone_ms(numel: int, repeats: int) -> float:
    """Median ms of one draw of ``numel`` Gaussian coordinates into zeros."""
    zeros = torch.zeros(numel)
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        rmt_kernels.ops.add_gaussian_noise(zeros, 1.0, 1, i * numel)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    for name in ("layers", "batch", "length", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    load = os.getloadavg()[0]
    built = {m: build_step(m, args.layers, args.batch, args.length) for m in METHODS}
    for _, step, _ in built.values():  # warm-up: allocations, first-call dispatch
        step()
        step()
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(args.steps):
        for m, (_, step, _) in built.items():
            start = time.perf_counter()
            step()
            times[m].append(time.perf_counter() - start)
    step_ms = {m: 1e3 * statistics.median(t) for m, t in times.items()}
    base = step_ms["non-private"]
    params = sum(p.numel() for p in built["ours"][0].parameters())
    noise = noise_alone_ms(params, args.steps)
    lines = [
        "### One DP step, broken down\n",
        f"Measured {machine_description()}; load average {load:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end. RoBERTa-base shapes, {args.layers} layers "
        f"({params / 1e6:.1f}M parameters, all trainable), B = {args.batch}, T = {args.length}; "
        f"median of {args.steps} interleaved steps; the package's ops' time (the ATen calls "
        "inside them included) from torch.profiler, per step over its own profiled steps.\n",
        "| method | step ms | / non-private | "
        + " | ".join(g for g, _ in GROUPS)
        + " | other package ops |",
        "|---|---:|---:|" + "---:|" * (len(GROUPS) + 1),
        f"| non-private | {base:.1f} | 1.00x |" + " |" * (len(GROUPS) + 1),
    ]
    for m in METHODS[1:]:
        groups = package_op_ms(built[m][1], args.steps)
        cells = [f"{groups.get(g, 0.0):.1f}" for g, _ in GROUPS]
        cells.append(f"{groups.get('other package ops', 0.0):.1f}")
        lines.append(
            f"| {m} | {step_ms[m]:.1f} | {step_ms[m] / base:.2f}x | " + " | ".join(cells) + " |"
        )
    lines.append(
        f"\nThe noise alone ({params / 1e6:.1f}M Gaussian coordinates, the least any DP-SGD step "
        f"draws), into a fresh tensor as the ops write it (its allocation and first-touch page "
        f"faults included): {noise:.1f} ms, {100 * noise / base:.1f}% of the non-private step.\n"
    )
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return text


if __name__ == "__main__":
    main()
