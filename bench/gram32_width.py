"""Could a float32 Gram decide the clip factor? (issue 28 item 3: measured, not built)

Run: ``.venv/bin/python -m bench.gram32_width`` (from the repository root; ~3 minutes, 1 thread).

For each example, the rigorous error bound of a float32 Gram route (csrc/cpu/linear.cpp, the
comment above ``struct Example64``): ``P^ = sum_ts G^x_ts G^dy_ts`` from float32 Grams, off by
at most ``sum_ts (gamma_din |x_t||x_s||G^dy_ts| + gamma_dout |dy_t||dy_s||G^x_ts|
+ gamma_din gamma_dout |x_t||x_s||dy_t||dy_s|)``. Printed per layer: that width relative to the
certified float64 norm ``N`` (:func:`rmt_kernels.linear_sq_norms`), and the fraction of
examples it decides at C set so that 10%, 50%, 90% of them are clipped: "f1" = upper bound
<= C^2 (factor exactly 1), then "factor 1 or width <= tol" for tol 2^-20, 1e-6, 1e-4. Inputs:
random RoBERTa-base shapes (float32 and bf16), a random-init 2-layer RoBERTa-base on random
tokens (real activations), and crafted cancelling pairs (x rows u, -u + 10 w with equal dy rows,
as tests/test_dp_cancellation.py).
Then the time of a float32 Gram (full T x T bmm), of the float32 Gram with the bound in torch,
of today's float64 norms and of the clipped sum, interleaved, medians of 7, with the load average.
"""

from __future__ import annotations

import math
import os
import statistics
import time

import torch

import rmt_kernels

U32 = 2.0**-24
TOLERANCES = (2.0**-20, 1e-6, 1e-4)
SHAPES = [(768, 768), (768, 3072), (3072, 768)]


def gamma(n: int) -> float:
    """gamma_n = n u / (1 - n u) for float32."""
    return n * U32 / (1 - n * U32)


def float32_gram_bound(x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P^, width) per example (float64): the float32 Gram estimate and its rigorous error bound."""
    d_in, d_out = x.shape[2], dy.shape[2]
    x32, dy32 = x.float(), dy.float()
    gx = torch.bmm(x32, x32.mT).double()
    gdy = torch.bmm(dy32, dy32.mT).double()
    nx, ndy = x.double().norm(dim=2), dy.double().norm(dim=2)
    estimate = (gx * gdy).sum((1, 2))
    spread = (nx * ndy).sum(1)
    width = (
        gamma(d_in) * torch.einsum("bt,bts,bs->b", nx, gdy.abs(), nx)
        + gamma(d_out) * torch.einsum("bt,bts,bs->b", ndy, gx.abs(), ndy)
        + gamma(d_in) * gamma(d_out) * spread * spread
    )
    return estimate, width


def decided(name: str, x: torch.Tensor, dy: torch.Tensor) -> str:
    """One line: width / N and the fractions of examples decided (module docstring)."""
    norms = rmt_kernels.linear_sq_norms(x, dy).double()
    estimate, width = float32_gram_bound(x, dy)
    upper, relative = estimate + width, width / norms
    cells = [
        f"{name:<36} B{x.shape[0]:>3} T{x.shape[1]:>4} width/N median {relative.median():.2e} "
        f"max {relative.max():.2e}"
    ]
    for clipped in (0.1, 0.5, 0.9):
        c2 = torch.quantile(norms, 1 - clipped).item()
        factor_one = upper <= c2
        parts = [f"C@{clipped:.0%} clipped: f1 {factor_one.double().mean():.2f}"]
        for tol in TOLERANCES:
            parts.append(f"{tol:.1e}: {(factor_one | (relative <= tol)).double().mean():.2f}")
        cells.append(" ".join(parts))
    return " | ".join(cells)


def cancelling(B: int, T: int, d_in: int, d_out: int, gen: torch.Generator):
    """Every example's tokens in pairs u, -u + 10 w (|u| ~ 3e4) with equal dy rows."""
    x = torch.randn(B, T, d_in, generator=gen)
    dy = torch.randn(B, T, d_out, generator=gen)
    u = 3e4 * torch.randn(B, T // 2, d_in, generator=gen) / math.sqrt(d_in)
    w = torch.randn(B, T // 2, d_in, generator=gen) / math.sqrt(d_in)
    x[:, 0::2], x[:, 1::2] = u, -u + 10 * w
    dy[:, 1::2] = dy[:, 0::2]
    return x, dy


def roberta_activations(B: int = 8, T: int = 128) -> dict[str, dict[str, torch.Tensor]]:
    """Inputs and output gradients of every Linear of a random-init 2-layer RoBERTa-base."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=1000, num_hidden_layers=2, max_position_embeddings=T + 2, num_labels=2
    )
    model = RobertaForSequenceClassification(config)
    seen: dict[str, dict[str, torch.Tensor]] = {}

    def keep(name):
        def hook(module, inputs, output):
            seen[name] = {"x": inputs[0].detach()}
            output.register_hook(lambda g: seen[name].__setitem__("dy", g.detach()))

        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(keep(name))
    logits = model(torch.randint(3, 1000, (B, T))).logits
    torch.nn.functional.cross_entropy(logits, torch.randint(0, 2, (B,)), reduction="sum").backward()
    return seen


def timings(B: int, T: int, d_in: int, d_out: int, repeats: int = 7) -> str:
    """Medians (ms) of the float32 Gram, with its bound, the float64 norms and the clipped sum."""
    x, dy, scale = torch.randn(B, T, d_in), torch.randn(B, T, d_out), torch.rand(B)
    methods = {
        "f32 Gram": lambda: (torch.bmm(x, x.mT), torch.bmm(dy, dy.mT)),
        "f32 Gram+bound": lambda: float32_gram_bound(x, dy),
        "f64 norms": lambda: rmt_kernels.linear_sq_norms(x, dy),
        "clipped sum": lambda: rmt_kernels.linear_clipped_noisy_sum(x, dy, scale, 1.0, 0, 0),
    }
    times: dict[str, list[float]] = {k: [] for k in methods}
    for fn in methods.values():
        fn()
    for _ in range(repeats):
        for k, fn in methods.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(1e3 * (time.perf_counter() - t0))
    ms = {k: statistics.median(v) for k, v in times.items()}
    fused = ms["f64 norms"] + ms["clipped sum"]
    ceiling = (ms["f64 norms"] - ms["f32 Gram"]) / fused
    return (
        f"{d_in}x{d_out} B{B} T{T}: "
        + " ".join(f"{k} {v:.1f}" for k, v in ms.items())
        + f" | fused {fused:.1f}, hybrid's ceiling (all decided, bound free) {ceiling:.0%}"
        + f" | load {os.getloadavg()[0]:.2f}"
    )


def main() -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    print(f"# load average {os.getloadavg()}, 1 thread", flush=True)
    for d_in, d_out in SHAPES:
        for T in (64, 128):
            x = torch.randn(32, T, d_in, generator=gen)
            dy = torch.randn(32, T, d_out, generator=gen)
            print(decided(f"random {d_in}x{d_out}", x, dy), flush=True)
            print(decided(f"random bf16 {d_in}x{d_out}", x.bfloat16(), dy.bfloat16()), flush=True)
    for name, seen in roberta_activations().items():
        if ("layer.1." in name or "classifier" in name) and seen["x"].dim() == 3:
            short = name.replace("roberta.encoder.", "")
            print(decided(f"roberta {short}", seen["x"], seen["dy"]), flush=True)
    for d_in, d_out in SHAPES[:2]:
        x, dy = cancelling(32, 128, d_in, d_out, gen)
        print(decided(f"crafted cancelling {d_in}x{d_out}", x, dy), flush=True)
    for d_in, d_out in SHAPES:
        for T in (64, 128):
            print(timings(32, T, d_in, d_out), flush=True)


if __name__ == "__main__":
    main()
