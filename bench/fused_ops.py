"""Per-example norms + clipped noisy sum for RoBERTa-base layer shapes: ours vs Opacus.

Run: ``.venv/bin/python -m bench.fused_ops [--quick] [--out FILE]`` (from the repository root).

For each weight (Linear 768x768, 768x3072, 3072x768; Embedding 50265x768), batch size
B in {8, 32} and sequence length T in {64, 128}, four ways to get the same weight gradient:

* ``gemm``:   the non-private weight gradient (``dy^T x`` over the B*T rows; for the embedding the
              dense ``embedding_dense_backward``), the yardstick of the target "ours <= 1.2x gemm";
* ``ours``:   rmt ``*_sq_norms`` + ``*_clipped_noisy_sum`` (one GEMM, Philox noise in place);
* ``hooks``:  Opacus's default: materialised per-example gradients (its grad sampler), norms,
              ``einsum`` clipped sum, ``torch.normal`` noise (what DPOptimizer does);
* ``ghost``:  Opacus ghost clipping: its norm sampler, then the second backward's weight-gradient
              GEMM on clip-scaled ``dy``, plus ``torch.normal`` noise. (The second backward also
              recomputes input gradients; that cost is left out, favouring ghost.)

Where ours spends its time above the GEMM, also timed: ``norms`` (the ``*_sq_norms`` call alone)
and ``noise``, the cost of drawing the weight's Gaussians: ``add_gaussian_noise`` on a zero
tensor of the weight's shape minus a plain copy of that tensor (the op copies its input first).

Time: fastest of several calls, methods interleaved round-robin (see best_ms); torch's default
number of threads. The load average at the start is printed: the machine may be shared.
Memory: peak resident-set increase during one call (VmHWM reset through /proc/self/clear_refs
after ``malloc_trim``), so it counts every allocation the call touches, on any allocator path.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from collections.abc import Callable

import torch
from opacus.grad_sample.embedding import (
    compute_embedding_grad_sample,
    compute_embedding_norm_sample,
)
from opacus.grad_sample.linear import compute_linear_grad_sample, compute_linear_norm_sample
from torch import nn

import rmt_kernels
from bench.memory import peak_increase_mib

LINEAR_SHAPES = [(768, 768), (768, 3072), (3072, 768)]  # (d_in, d_out)
VOCAB, EMBED_DIM = 50265, 768
BATCHES = [8, 32]
SEQ_LENS = [64, 128]
C, SIGMA = 1.0, 1.0
METHODS = ("gemm", "ours", "hooks", "ghost", "norms", "noise", "copy")


def best_ms(methods: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Fastest of ``repeats`` calls per method (ms), the methods timed round-robin: on a shared
    machine, load from other processes only ever adds time, so the minimum is the estimate least
    disturbed by it, and round-robin spreads what remains over all methods alike."""
    for fn in methods.values():
        fn()  # warm-up: first-call allocations and dispatch
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(repeats):
        for k, fn in methods.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * min(v) for k, v in times.items()}


def _methods(
    dy: torch.Tensor,
    *,
    weight_grad: Callable[[torch.Tensor], torch.Tensor],
    ours: Callable[[], object],
    norms: Callable[[], object],
    grad_sample: Callable[[], torch.Tensor],
    norm_sample: Callable[[], torch.Tensor],
    weight_shape: tuple[int, int],
) -> dict[str, Callable[[], object]]:
    """The ``METHODS`` of one layer, from its pieces: ``weight_grad(dy)`` (the layer's weight
    gradient of an output gradient), our two ops (``ours``, ``norms``) and Opacus's samplers of
    per-example gradients and of their norms."""

    def hooks():
        gs = grad_sample()
        scale = (C / (gs.flatten(1).norm(dim=1) + 1e-6)).clamp(max=1.0)
        summed = torch.einsum("i,i...", scale, gs)
        return summed + torch.normal(0.0, SIGMA * C, summed.shape)

    def ghost():
        scale = (C / (norm_sample() + 1e-6)).clamp(max=1.0)
        summed = weight_grad(dy * scale[:, None, None])
        return summed + torch.normal(0.0, SIGMA * C, summed.shape)

    # Noise drawn onto a copy of zeros of the weight's shape (what the op does), and the copy.
    zeros = torch.zeros(weight_shape)
    noise = lambda: rmt_kernels.add_gaussian_noise(zeros, SIGMA * C, 0, 0)
    copy = lambda: zeros.clone()
    gemm = lambda: weight_grad(dy)
    # In METHODS' order: best_ms times them round-robin in this order.
    return dict(zip(METHODS, (gemm, ours, hooks, ghost, norms, noise, copy), strict=True))


def linear_methods(B: int, T: int, d_in: int, d_out: int) -> dict[str, Callable[[], object]]:
    """The ``METHODS`` for a ``d_in`` x ``d_out`` Linear on a (B, T, d_in) input."""
    x, dy = torch.randn(B, T, d_in), torch.randn(B, T, d_out)
    layer = nn.Linear(d_in, d_out, bias=False)

    def ours():
        scale = rmt_kernels.clip_scales(rmt_kernels.linear_sq_norms(x, dy), C)
        return rmt_kernels.linear_clipped_noisy_sum(x, dy, scale, SIGMA * C, 0, 0)

    return _methods(
        dy,
        weight_grad=lambda d: d.reshape(-1, d_out).T @ x.reshape(-1, d_in),
        ours=ours,
        norms=lambda: rmt_kernels.linear_sq_norms(x, dy),
        grad_sample=lambda: compute_linear_grad_sample(layer, [x], dy)[layer.weight],
        norm_sample=lambda: compute_linear_norm_sample(layer, [x], dy)[layer.weight],
        weight_shape=(d_out, d_in),
    )


def embedding_methods(B: int, T: int) -> dict[str, Callable[[], object]]:
    """The ``METHODS`` for RoBERTa-base's word embedding on (B, T) token ids."""
    ids, dy = torch.randint(0, VOCAB, (B, T)), torch.randn(B, T, EMBED_DIM)
    layer = nn.Embedding(VOCAB, EMBED_DIM)

    def ours():
        scale = rmt_kernels.clip_scales(rmt_kernels.embedding_sq_norms(ids, dy), C)
        return rmt_kernels.embedding_clipped_noisy_sum(ids, dy, scale, VOCAB, SIGMA * C, 0, 0)

    return _methods(
        dy,
        weight_grad=lambda d: torch.ops.aten.embedding_dense_backward(d, ids, VOCAB, -1, False),
        ours=ours,
        norms=lambda: rmt_kernels.embedding_sq_norms(ids, dy),
        grad_sample=lambda: compute_embedding_grad_sample(layer, [ids], dy)[layer.weight],
        norm_sample=lambda: compute_embedding_norm_sample(layer, [ids], dy)[layer.weight],
        weight_shape=(VOCAB, EMBED_DIM),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, B = 8 only")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
    repeats = 3 if args.quick else 7
    batches = [8] if args.quick else BATCHES
    cases = [(f"linear {d_in}x{d_out}", (d_in, d_out)) for d_in, d_out in LINEAR_SHAPES]
    cases.append((f"embedding {VOCAB}x{EMBED_DIM}", None))

    lines = [
        f"# rmt fused DP ops vs Opacus 1.6.0, {datetime.date.today()}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
        f"# load average at start {os.getloadavg()[0]:.2f}; "
        "time: best-of-repeats ms (ratio to gemm); mem: peak RSS increase MiB; "
        "per-ex: size of B per-example gradients MiB; ours = norms + clipped sum with noise; "
        "noise: drawing the weight's Gaussians alone",
        f"{'layer':<24}{'B':>4}{'T':>5} | {'gemm ms':>8} | {'ours ms':>15} | {'norms':>6} "
        f"{'noise':>6} | {'hooks ms':>15} | {'ghost ms':>15} | {'mem ours':>8} {'hooks':>7} "
        f"{'ghost':>7} | {'per-ex':>7}",
    ]
    print("\n".join(lines), flush=True)
    for name, dims in cases:
        for B in batches:
            for T in SEQ_LENS:
                if dims is None:
                    methods = embedding_methods(B, T)
                    per_example = B * VOCAB * EMBED_DIM * 4 / 2**20
                else:
                    methods = linear_methods(B, T, *dims)
                    per_example = B * dims[0] * dims[1] * 4 / 2**20
                ms = best_ms(methods, repeats)
                mem = {k: peak_increase_mib(methods[k]) for k in ("ours", "hooks", "ghost")}
                noise = ms["noise"] - ms["copy"]

                def cell(k, ms=ms):
                    return f"{ms[k]:8.1f} ({ms[k] / ms['gemm']:4.2f}x)"

                line = (
                    f"{name:<24}{B:>4}{T:>5} | {ms['gemm']:8.1f} | {cell('ours')} | "
                    f"{ms['norms']:6.2f} {noise:6.2f} | "
                    f"{cell('hooks')} | {cell('ghost')} | {mem['ours']:8.0f} {mem['hooks']:7.0f} "
                    f"{mem['ghost']:7.0f} | {per_example:7.0f}"
                )
                print(line, flush=True)
                lines.append(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
