"""One DP fine-tuning step, side by side: non-private AdamW, Opacus hooks, Opacus ghost
clipping, ours, ours + denoise. RoBERTa-base shapes (random init, fewer layers on a CPU), every
parameter trainable, a batch of SST-2 sentences.

``python -m bench.dp_step [--layers 2] [--batch 16] [--length 64] [--steps 5]``

Each method runs in its own process, so peak memory is measured without the others'
leftovers: on a CPU the process's resident high-water mark (every allocator path counts), on a
GPU torch's peak allocated device memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.memory import peak_mib, reset_peak
from bench.report import machine_description

METHODS = [
    "non-private",
    "opacus hooks",
    "opacus ghost",
    "ours",
    "ours + denoise",
    # Mixed precision: the forward under torch.autocast in bfloat16 (float32 master weights;
    # the engine clips the gradient of the bf16 activations, tests/test_autocast.py).
    "non-private + bf16 autocast",
    "ours + bf16 autocast",
]
AUTOCAST_SUFFIX = " + bf16 autocast"
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
# RoBERTa-base's config, so the benchmark needs no files (../shared/models has the same).
ROBERTA_BASE = dict(
    vocab_size=50265,
    hidden_size=768,
    num_attention_heads=12,
    intermediate_size=3072,
    max_position_embeddings=514,
    type_vocab_size=1,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    layer_norm_eps=1e-5,
)


def build_step(method: str, layers: int, batch: int, length: int):
    """The model of ``method`` and a function running one training step of it on a fixed batch
    (bench/dp_step_breakdown.py profiles the same step)."""
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from bench.sst2 import sst2_batch

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = RobertaConfig(**ROBERTA_BASE, num_hidden_layers=layers, num_labels=2)
    model = RobertaForSequenceClassification(config).to(device)
    ids, mask, labels, source = sst2_batch(batch, length)
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    loader = DataLoader(TensorDataset(ids, mask, labels), batch_size=batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    criterion = torch.nn.CrossEntropyLoss()

    if method in ("opacus hooks", "opacus ghost"):
        from opacus import PrivacyEngine

        engine = PrivacyEngine()
        kw = dict(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            poisson_sampling=False,
            noise_multiplier=NOISE_MULTIPLIER,
            max_grad_norm=MAX_GRAD_NORM,
        )
        if method == "opacus ghost":
            model, optimizer, criterion, loader = engine.make_private(
                **kw, criterion=criterion, grad_sample_mode="ghost"
            )
        else:
            model, optimizer, loader = engine.make_private(**kw)
    elif method.startswith("ours"):
        from rmt_kernels.dp import make_private

        model, optimizer, loader = make_private(
            model,
            optimizer,
            loader,
            target_delta=1e-5,
            max_grad_norm=MAX_GRAD_NORM,
            noise_multiplier=NOISE_MULTIPLIER,
            poisson_sampling=False,
            seed=0,
            denoise={} if method == "ours + denoise" else None,
        )

    autocast = torch.autocast(
        device, dtype=torch.bfloat16, enabled=method.endswith(AUTOCAST_SUFFIX)
    )

    def step():
        with autocast:
            logits = model(input_ids=ids, attention_mask=mask).logits
        loss = criterion(logits.float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step, source


def run_method(method: str, layers: int, batch: int, length: int, steps: int) -> dict:
    """Time ``steps`` steps of ``method`` (after 2 warm-up steps) in this process."""
    model, step, source = build_step(method, layers, batch, length)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        step()
    sync()
    reset_peak()  # the peak below is the steps' own
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_mib()
    return {
        "method": method,
        "median_s": statistics.median(times),
        "peak_mib": peak,
        "source": source,
        "params": sum(p.numel() for p in model.parameters()),
    }


def table(results: list[dict], batch: int) -> str:
    base = next(r for r in results if r["method"] == "non-private")
    lines = [
        "| method | median step s | samples/s | time / non-private | peak MiB "
        "| memory / non-private |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "refused" in r or "failed" in r:  # its error, not a number
            what = f"refused: {r['refused']}" if "refused" in r else f"fails: {r['failed']}"
            lines.append(f"| {r['method']} | {what} | | | | |")
            continue
        lines.append(
            f"| {r['method']} | {r['median_s']:.3f} | {batch / r['median_s']:.1f} | "
            f"{r['median_s'] / base['median_s']:.2f}x | "
            f"{r['peak_mib']:.0f} | {r['peak_mib'] / base['peak_mib']:.2f}x |"
        )
    return "\n".join(lines)


def measure_in_subprocesses(module: str, methods: list[str], args: list[str]) -> list[dict]:
    """Run ``python -m module --method M ARGS`` for each method, each in a fresh process (so
    its peak memory is its own), and return the JSON each prints on its last line."""
    results = []
    for method in methods:
        print(f"{module}: {method} ...", flush=True)
        out = subprocess.run(
            [sys.executable, "-m", module, "--method", method, *args],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"{method} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench.dp_step", description=__doc__)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.method:  # child process
        print(json.dumps(run_method(args.method, args.layers, args.batch, args.length, args.steps)))
        return ""
    results = measure_in_subprocesses(
        "bench.dp_step",
        METHODS,
        [
            "--layers",
            str(args.layers),
            "--batch",
            str(args.batch),
            "--length",
            str(args.length),
            "--steps",
            str(args.steps),
        ],
    )
    report = (
        f"### One DP step: RoBERTa-base shapes, {args.layers} encoder layers, "
        f"{results[0]['params'] / 1e6:.1f}M parameters all trainable, B = {args.batch}, "
        f"T = {args.length}, {results[0]['source']}\n\n"
        f"Measured {machine_description()}; median of {args.steps} steps after 2 warm-up steps, "
        "each method in its own process.\n\n" + table(results, args.batch) + "\n"
    )
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    return report


if __name__ == "__main__":
    main()
