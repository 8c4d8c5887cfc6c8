"""``python -m bench`` (what ``make bench`` runs): every benchmark side by side, as tables.

1. denoise: one model step of denoising on RoBERTa-base's 72 weight shapes (pytest-benchmark);
   denoise-edge: the same shapes near the Marchenko-Pastur edge and at rank 4, cold and warm-
   started, and on pure noise, against svd_lowrank and the full SVD, with issue 28's targets
   beside the measured ratios (bench/denoise_edge.py; its tables also in
   bench/results/denoise-edge-<device>.md); early-exit: why "nothing above the edge" is not
   decided early (bench/early_exit.py);
2. fused ops: per-example norms + clipped noisy sums per layer shape, ours vs Opacus
   (bench/fused_ops.py);
3. dp step: one DP fine-tuning step, non-private vs Opacus vs ours (each in its own process);
   dp-breakdown: where ours' time over the non-private step goes (bench/dp_step_breakdown.py);
4. lm step: one DP step of decoder LMs (GPT-2-small shapes, a Llama-style stack), full
   fine-tuning and LoRA r = 8, non-private vs Opacus vs ours (bench/lm_step.py);
5. gpu-static: the static GPU plan (bench/gpu_report.py): every Triton kernel built for sm_80/90/100
   at RoBERTa-base shapes, registers, spills, shared memory, float64 counts and H200 roofline
   times beside the CPU time, in bench/results/gpu-static.md. No GPU is measured.

Each part prints its table once, as it finishes (the long ones print their rows or progress as
they go). Raw results go to bench/out/; all the tables together to bench/results/<cpu|gpu>.md,
committed when the numbers are worth keeping.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import render

HERE = Path(__file__).resolve().parent
PARTS = (
    "denoise",
    "denoise-edge",
    "early-exit",
    "fused-ops",
    "dp-step",
    "dp-breakdown",
    "lm-step",
    "gpu-static",
)


def run_denoise(out_dir: Path) -> str:
    """Run the denoise benchmark (pytest-benchmark); print and return our table of it
    (pytest-benchmark's own table is turned off: it would show the same numbers again)."""
    json_path = out_dir / "denoise.json"
    code = pytest.main(
        [
            str(HERE / "denoise.py"),
            "-q",
            "-p",
            "no:cacheprovider",
            "--benchmark-only",
            "--benchmark-disable-gc",
            "--benchmark-quiet",
            f"--benchmark-json={json_path}",
        ]
    )
    if code != 0:
        raise SystemExit(f"denoise benchmark failed (pytest exit {code})")
    table = render(json_path)
    print("\n" + table, flush=True)
    return table


def run_script(module: str, out_file: Path, *args: str) -> str:
    """Run ``python -m module --out out_file ARGS`` (it prints its own table); the table."""
    subprocess.run(
        [sys.executable, "-m", module, "--out", str(out_file), *args],
        cwd=HERE.parent,
        check=True,
    )
    return out_file.read_text()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", choices=PARTS, action="append", help="run only these parts")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    parser.add_argument("--results", default=None, help="markdown file for the tables")
    args = parser.parse_args(argv)
    parts = args.only or list(PARTS)

    out_dir = HERE / "out"
    out_dir.mkdir(exist_ok=True)
    quick = ["--quick"] if args.quick else []
    sections = []
    if "denoise" in parts:
        sections.append(run_denoise(out_dir))
    if "denoise-edge" in parts:
        import torch

        device = "gpu" if torch.cuda.is_available() else "cpu"
        # A --quick run's numbers are not worth keeping: they stay in bench/out/.
        folder = out_dir if args.quick else HERE / "results"
        edge = folder / f"denoise-edge-{device}.md"
        sections.append(run_script("bench.denoise_edge", edge, *quick))
    if "early-exit" in parts:
        sections.append(run_script("bench.early_exit", out_dir / "early_exit.md", *quick))
    if "fused-ops" in parts:
        sections.append(run_script("bench.fused_ops", out_dir / "fused_ops.md", *quick))
    if "dp-step" in parts:
        steps = ["--steps", "3"] if args.quick else []
        sections.append(run_script("bench.dp_step", out_dir / "dp_step.md", *steps))
    if "dp-breakdown" in parts:
        steps = ["--steps", "2"] if args.quick else []
        sections.append(run_script("bench.dp_step_breakdown", out_dir / "dp_breakdown.md", *steps))
    if "lm-step" in parts:
        steps = ["--steps", "2"] if args.quick else []
        sections.append(run_script("bench.lm_step", out_dir / "lm_step.md", *steps))
    if "gpu-static" in parts:
        static = HERE / "results" / "gpu-static.md"
        run_script("bench.gpu_report", static)  # its table stays in its own file
        sections.append(f"Static GPU plan (no GPU measured): {static.relative_to(HERE.parent)}")
    report = "\n\n".join(sections)
    import torch

    device = "gpu" if torch.cuda.is_available() else "cpu"
    results = Path(args.results) if args.results else HERE / "results" / f"{device}.md"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(report + "\n")
    print(f"tables written to {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
