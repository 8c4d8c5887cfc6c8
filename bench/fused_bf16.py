"""The Linear clipped sum from bfloat16 activations: bf16 route vs the float32 route.

Run: ``.venv/bin/python -m bench.fused_bf16 [--threads N]`` (from the repository root).

Under torch.autocast(bfloat16), x and dy reach :func:`rmt_kernels.linear_clipped_noisy_sum` as
bf16; with at least ``LINEAR_BF16_MIN_TOKENS`` tokens it runs one bf16 GEMM per example on the
CPU's bf16 units (csrc/cpu/linear_bf16.cpp). The float32 route it replaces (an exact float32
copy of both, one sgemm over the B*T rows) is timed as the same op on float32 copies made inside
the timed call. Also the certified norms (unchanged), so the fused op's ratio is printed too.
RoBERTa-base shapes, B 32, T in {32, 64, 128}; medians of 7 interleaved calls, with the load
average (the machine may be shared: compare the ratios, not the times).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import rmt_kernels
from rmt_kernels import _C

SHAPES = [(768, 768), (768, 3072), (3072, 768)]  # (d_in, d_out)


def medians(methods: dict, repeats: int) -> dict[str, float]:
    """Median ms of each method, called round-robin after one warm-up call each."""
    for fn in methods.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(repeats):
        for k, fn in methods.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(1e3 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def routes(x: torch.Tensor, dy: torch.Tensor, scale: torch.Tensor) -> dict:
    """The bf16 route, the float32 route (copies made in the call) and the norms."""
    return {
        "bf16": lambda: rmt_kernels.linear_clipped_noisy_sum(x, dy, scale, 1.0, 0, 0),
        "float32": lambda: rmt_kernels.linear_clipped_noisy_sum(
            x.float(), dy.float(), scale, 1.0, 0, 0
        ),
        "norms": lambda: rmt_kernels.linear_sq_norms(x, dy),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"# bf16 route available: {_C.linear_bf16_available()}, T >= "
        f"{_C.LINEAR_BF16_MIN_TOKENS}; {args.threads} thread(s); load {os.getloadavg()}",
        flush=True,
    )
    for d_in, d_out in SHAPES:
        for T in (32, 64, 128):
            B = 32
            x = torch.randn(B, T, d_in).bfloat16()
            dy = (1e-3 * torch.randn(B, T, d_out)).bfloat16()
            scale = torch.rand(B)
            ms = medians(routes(x, dy, scale), args.repeats)
            fused = (ms["bf16"] + ms["norms"]) / (ms["float32"] + ms["norms"])
            print(
                f"linear {d_in}x{d_out} B{B} T{T}: sum bf16 {ms['bf16']:.1f} ms, float32 "
                f"{ms['float32']:.1f} ms ({ms['bf16'] / ms['float32']:.2f}x); norms "
                f"{ms['norms']:.1f} ms; fused op {fused:.2f}x | load {os.getloadavg()[0]:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
