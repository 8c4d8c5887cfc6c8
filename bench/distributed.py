"""DP-SGD steps per second at 1 and 2 (or more) processes, and the all-reduce's share of a step.

``python -m bench.distributed [--world 1 2] [--steps 10] [--batch 16] [--layers 4]``

A small RoBERTa (config in code, random init, every parameter trainable) on random tokens; the
global logical batch is fixed and split evenly over the ranks, with noise and the native engine
(no Poisson sampling, so every step has the same size). Each world size runs in its own process
group: gloo on CPUs (``--threads`` per rank), nccl on GPUs (one GPU per rank), so
the script runs unchanged on several GPUs. The all-reduce share is the engine's time inside the
bucketed all-reduce of the clipped sums over the step time, both on rank 0; it includes waiting
for the slowest rank. Writes bench/results/distributed-<cpu|gpu>.md.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from bench.dp_step import ROBERTA_BASE
from bench.report import machine_description

# Small enough for a 2-core CPU, large enough (~3.6 M parameters) that the all-reduce moves
# real buckets.
SMALL_ROBERTA = {
    **ROBERTA_BASE,
    "vocab_size": 1000,
    "hidden_size": 256,
    "num_attention_heads": 4,
    "intermediate_size": 1024,
    "max_position_embeddings": 130,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
LENGTH = 64
WARMUP = 2
RESULTS = Path(__file__).resolve().parent / "results"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    import torch.distributed as dist
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from rmt_kernels.dp import make_private

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
    )
    torch.manual_seed(0)
    config = RobertaConfig(**SMALL_ROBERTA, num_hidden_layers=args.layers, num_labels=2)
    model = RobertaForSequenceClassification(config).to(device).train()
    local = args.batch // world
    ids = torch.randint(3, SMALL_ROBERTA["vocab_size"], (args.batch * 4, LENGTH))
    labels = torch.randint(0, 2, (args.batch * 4,))
    # The loader only sets the sample rate (batch / dataset); batches are fed below.
    loader = DataLoader(TensorDataset(ids, labels), batch_size=args.batch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, opt, _ = make_private(
        model, opt, loader, target_delta=1e-5, max_grad_norm=1.0, noise_multiplier=1.0, seed=0
    )
    mine = slice(rank * local, (rank + 1) * local)
    batch_ids, batch_labels = ids[mine].to(device), labels[mine].to(device)

    def step() -> None:
        model(input_ids=batch_ids, labels=batch_labels).loss.backward()
        opt.step()
        opt.zero_grad()

    for _ in range(WARMUP):
        step()
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    opt.engine.allreduce_seconds = 0.0
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if rank == 0:
        queue.put(
            {
                "world": world,
                "steps_per_s": args.steps / seconds,
                "allreduce_share": opt.engine.allreduce_seconds / seconds,
                "threads": torch.get_num_threads(),
                "parameters": sum(p.numel() for p in model.parameters()),
            }
        )
    dist.destroy_process_group()


def measure(world: int, args: argparse.Namespace) -> dict:
    """Spawn ``world`` ranks, time ``args.steps`` steps; rank 0's numbers."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(
        _worker, args=(world, _free_port(), args, queue), nprocs=world, start_method="spawn"
    )
    return queue.get()


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16, help="global logical batch")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads per process (default: cores / the largest world, the same in every "
        "row, so that no row oversubscribes the cores)",
    )
    parser.add_argument("--note", default="", help="a line for the report (e.g. machine load)")
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // max(args.world))
    if torch.cuda.is_available() and max(args.world) > torch.cuda.device_count():
        parser.error(f"--world {max(args.world)} needs that many GPUs")
    rows = [measure(w, args) for w in args.world]
    base = rows[0]["steps_per_s"]
    lines = [
        "# DP-SGD across processes (bench/distributed.py)",
        "",
        machine_description(),
        "",
        f"Small RoBERTa ({args.layers} layers, hidden {SMALL_ROBERTA['hidden_size']}, "
        f"{rows[0]['parameters'] / 1e6:.2f} M parameters, all trainable), sequence {LENGTH}, "
        f"global batch {args.batch} split over the ranks, noise multiplier 1, AdamW; "
        f"{args.steps} timed steps after {WARMUP} warm-up steps. "
        f"`python -m bench.distributed --steps {args.steps} --batch {args.batch} "
        f"--layers {args.layers}`.",
        "",
        "| processes | threads / process | steps/s | samples/s | speed-up | all-reduce share |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['world']} | {r['threads']} | {r['steps_per_s']:.2f} | "
            f"{r['steps_per_s'] * args.batch:.1f} | {r['steps_per_s'] / base:.2f}x | "
            f"{100 * r['allreduce_share']:.1f}% |"
        )
    if args.note:
        lines += ["", args.note]
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    name = "distributed-gpu.md" if torch.cuda.is_available() else "distributed-cpu.md"
    (RESULTS / name).write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
