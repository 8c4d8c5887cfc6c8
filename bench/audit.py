"""White-box one-run audit of the native engine at several noise multipliers.

``python -m bench.audit [--canaries 4096] [--steps 16] [--sigmas 0.5 1 2 4]``

For each noise multiplier: one training run with Dirac canaries through ``make_private``
(:mod:`rmt_kernels.audit.whitebox`, one process), the accountant's epsilon (PRV) beside the
audit's lower bounds at 95% confidence from the same scores: the Steinke et al. (eps, delta)
bound and, at sample rate 1, the f-DP bound on mu-GDP (:mod:`rmt_kernels.audit.fdp`). Then the
planted bug "noise halved" (the engine's noise std halved behind the accountant's back).
Writes bench/results/audit.md. Two processes: not run (see the notes in the table file).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
import warnings
from pathlib import Path

from rmt_kernels.audit import audit, gaussian_epsilon
from rmt_kernels.audit.whitebox import WhiteBoxConfig, white_box_audit

OUT = Path(__file__).parent / "results" / "audit.md"


def _run(cfg: WhiteBoxConfig, halve: bool = False):
    """One white-box run (Steinke bound), plus the f-DP bound from the same scores when the
    claim is Gaussian (sample rate 1). ``halve``: the planted bug, noise std halved."""
    from rmt_kernels.dp.engine import PrivateEngine

    real = PrivateEngine.sigma
    if halve:
        PrivateEngine.sigma = lambda self: real(self) / 2
    try:
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = white_box_audit(dataclasses.replace(cfg, method="steinke"))
    finally:
        PrivateEngine.sigma = real
    fdp = None
    if cfg.sample_rate == 1:
        fdp = audit(res.scores, res.included, p_fail=cfg.p_fail, delta=cfg.delta, method="fdp")
    return res, fdp, time.perf_counter() - t


def _row(label, cfg, res, fdp, seconds):
    mu = cfg.sample_rate * cfg.steps / (cfg.noise_multiplier * math.sqrt(cfg.steps))
    exact = gaussian_epsilon(mu, cfg.delta) if cfg.sample_rate == 1 else float("nan")
    na = "n/a"
    return (
        f"| {label} | {cfg.canaries} | {cfg.steps} | {cfg.noise_multiplier:.3g} | "
        f"{cfg.sample_rate:g} | {cfg.physical_batches} | {mu:.2f} | "
        f"{res.accountant_epsilon:.3f} | {na if math.isnan(exact) else f'{exact:.3f}'} | "
        f"{res.audit.epsilon:.3f} | {na if fdp is None else f'{fdp.epsilon:.3f}'} | "
        f"{na if fdp is None else f'{fdp.mu:.3f}'} | {seconds:.1f} |"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--canaries", type=int, default=4096)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0, 8.0])
    p.add_argument("--delta", type=float, default=1e-6)
    p.add_argument("--p-fail", type=float, default=0.05)
    args = p.parse_args(argv)

    def config(m, steps, sigma, rate=1.0, physical=1):
        return WhiteBoxConfig(
            canaries=m,
            examples=256,
            steps=steps,
            sample_rate=rate,
            physical_batches=physical,
            noise_multiplier=sigma,
            delta=args.delta,
            p_fail=args.p_fail,
            seed=0,
        )

    runs = [("honest", config(args.canaries, args.steps, s), False) for s in args.sigmas]
    runs.append(("honest", config(args.canaries, args.steps, 1.0, 0.25, 2), False))
    # The planted bug of tests/test_audit_whitebox.py::test_noise_halved_caught, at its setting
    # and at the first table's sigma = 4 setting.
    halved_cfg = config(32768, 2, math.sqrt(2))
    runs += [("honest", halved_cfg, False), ("noise halved", halved_cfg, True)]
    runs.append(("noise halved", config(args.canaries, args.steps, 4.0), True))
    rows = []
    start = time.perf_counter()
    for label, cfg, halve in runs:
        res, fdp, seconds = _run(cfg, halve)
        rows.append(_row(label, cfg, res, fdp, seconds))
        print(rows[-1], flush=True)
    total = time.perf_counter() - start
    lines = [
        "# White-box one-run audit of the native engine",
        "",
        f"Command: `python -m bench.audit --canaries {args.canaries} --steps {args.steps} "
        f"--sigmas {' '.join(f'{s:g}' for s in args.sigmas)}` ({total:.0f} s on this 2-core "
        "CPU, one process).",
        "",
        "Dirac canaries (each IN with probability 1/2) + 256 ordinary examples, C = 1, "
        f"delta = {args.delta:g}, confidence {1 - args.p_fail:g} (Bonferroni over the default "
        "guess counts). Accountant: Opacus PRV. `mu`: the canary score's mean over its standard "
        "deviation (rate x steps / (sigma x sqrt(steps))), the claim's mu-GDP at sample rate 1; "
        "`exact eps`: the Gaussian mechanism's exact epsilon at that mu. `Steinke eps`: the "
        "(eps, delta) one-run bound (Steinke, Nasr, Jagielski 2023; any mechanism). `f-DP eps` "
        "and `f-DP mu`: the f-DP one-run bound (Mahloujifar, Melis, Chaudhuri 2025) on mu-GDP "
        "from the same scores, and its Gaussian epsilon at delta; only at sample rate 1, where "
        "the claim is Gaussian (n/a below it: a subsampled Gaussian is not one). A bound above "
        "the accountant's epsilon is a bug. `noise halved`: the engine with its noise std "
        "halved (a planted bug; the accountant is not told).",
        "",
        "| run | canaries | steps | sigma | sample rate | physical batches | mu | accountant eps "
        "| exact eps | Steinke eps | f-DP eps | f-DP mu | s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "Reading: on the engine as shipped every bound is below the accountant's epsilon (no bug "
        "found). The f-DP bound is much tighter for Gaussian noise (it uses the whole Gaussian "
        "trade-off curve, not one (eps, delta) point) and reaches about 0.6 of the true mu at "
        "95% confidence, so noise halved (true mu twice the claim) is caught by the f-DP bound "
        "and not by the Steinke one. At 1e-7 confidence the f-DP bound reaches about 0.4 of "
        "the true mu (even with 262144 canaries), so halving is not separable there; the tests "
        "catch it at 95%. Two processes (torch.distributed): not run in this table.",
        "",
    ]
    OUT.write_text("\n".join(lines))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
