"""White-box one-run audit of the native engine at several noise multipliers.

``python -m bench.audit [--canaries 4096] [--steps 16] [--sigmas 0.5 1 2 4]``

For each noise multiplier: one training run with Dirac canaries through ``make_private``
(:mod:`rmt_kernels.audit.whitebox`), the accountant's epsilon (PRV) beside the audit's lower
bounds at 95% confidence from the same scores: the Steinke et al. (eps, delta) bound and, at
sample rate 1, the f-DP bound on mu-GDP (:mod:`rmt_kernels.audit.fdp`). Then the planted bug
"noise halved" (the engine's noise std halved behind the accountant's back). The same runs on
2 gloo processes (:mod:`rmt_kernels.audit.distributed`), with the planted bug "rank 1 adds the
noise at std / 2"; and a checkpointed, killed and resumed run (:mod:`rmt_kernels.audit.resume`)
on the same data, on other data, and on other data with the same noise (planted bug).
Writes bench/results/audit.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import time
import warnings
from pathlib import Path

from rmt_kernels.audit import audit, gaussian_epsilon
from rmt_kernels.audit.distributed import white_box_audit_distributed
from rmt_kernels.audit.resume import white_box_resume_audit
from rmt_kernels.audit.whitebox import white_box_audit
from rmt_kernels.audit.whitebox_config import WhiteBoxConfig

OUT = Path(__file__).parent / "results" / "audit.md"


@contextlib.contextmanager
def rank1_half_noise(rank: int):
    """Planted bug on several processes: rank 1 (not rank 0) adds the noise, at std / 2.
    Module-level so the spawned processes can unpickle it."""
    from rmt_kernels.dp.engine import PrivateEngine

    warnings.simplefilter("ignore", RuntimeWarning)  # the PRV accountant's log(0), as above
    real_add, real_sigma = PrivateEngine.add_noise, PrivateEngine.sigma

    def add_noise(self):
        own = self.rank
        self.rank = 0 if own == 1 else 1  # the engine adds noise where self.rank == 0
        PrivateEngine.sigma = lambda s: real_sigma(s) / 2
        try:
            return real_add(self)
        finally:
            PrivateEngine.sigma = real_sigma
            self.rank = own

    PrivateEngine.add_noise = add_noise
    try:
        yield
    finally:
        PrivateEngine.add_noise = real_add


@contextlib.contextmanager
def _planted(bug: str | None):
    """One process's planted bugs: "halve" (noise std halved) or "replay" (a resume on other
    data that keeps the noise key: no re-key, the data fingerprint check forced to match)."""
    import rmt_kernels.dp.checkpoint as checkpoint_module
    from rmt_kernels.dp.engine import PrivateEngine

    saved = (PrivateEngine.sigma, PrivateEngine.rekey_noise, checkpoint_module._replay_blockers)
    real = saved[0]
    if bug == "halve":
        PrivateEngine.sigma = lambda self: real(self) / 2
    elif bug == "replay":
        PrivateEngine.rekey_noise = lambda self, salt: None
        checkpoint_module._replay_blockers = lambda *args: []
    try:
        yield
    finally:
        PrivateEngine.sigma, PrivateEngine.rekey_noise, checkpoint_module._replay_blockers = saved


def _fdp(cfg: WhiteBoxConfig, res):
    """The f-DP bound from the run's scores when the claim is Gaussian (sample rate 1 and no
    charged extra steps), else None."""
    if cfg.sample_rate != 1:
        return None
    return audit(res.scores, res.included, p_fail=cfg.p_fail, delta=cfg.delta, method="fdp")


def _run(cfg: WhiteBoxConfig, halve: bool = False):
    """One white-box run (Steinke bound), plus the f-DP bound from the same scores when the
    claim is Gaussian (sample rate 1). ``halve``: the planted bug, noise std halved."""
    t = time.perf_counter()
    with _planted("halve" if halve else None), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = white_box_audit(dataclasses.replace(cfg, method="steinke"))
    return res, _fdp(cfg, res), time.perf_counter() - t


def _row(label, cfg, res, fdp, seconds, processes=1):
    mu = cfg.sample_rate * cfg.steps / (cfg.noise_multiplier * math.sqrt(cfg.steps))
    exact = gaussian_epsilon(mu, cfg.delta) if cfg.sample_rate == 1 else float("nan")
    na = "n/a"
    return (
        f"| {label} | {processes} | {cfg.canaries} | {cfg.steps} | {cfg.noise_multiplier:.3g} | "
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
    # The same runs on 2 gloo processes, in one process group (the bug "noise halved" becomes
    # "rank 1 adds the noise at std / 2").
    runs2 = [(label.replace("noise halved", "rank 1 adds noise / 2"), c, h) for label, c, h in runs]
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        results = white_box_audit_distributed(
            [dataclasses.replace(c, method="steinke") for _, c, _ in runs2],
            plants=[rank1_half_noise if h else None for _, _, h in runs2],
        )
    seconds = (time.perf_counter() - t) / len(runs2)
    for (label, cfg, _), res in zip(runs2, results, strict=True):
        rows.append(_row(label, cfg, res, _fdp(cfg, res), seconds, processes=2))
        print(rows[-1], flush=True)
    # Checkpoint after steps / 4, killed in step steps / 2, resumed (one process).
    resume_cfg = config(args.canaries, args.steps, 4.0)
    points = {"checkpoint_after": args.steps // 4, "kill_after": args.steps // 2}
    for label, other, bug in (
        ("resume, same data", False, None),
        ("resume, other data (charged)", True, None),
        ("resume, other data, same noise", True, "replay"),
    ):
        t = time.perf_counter()
        with _planted(bug), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = white_box_resume_audit(
                dataclasses.replace(resume_cfg, method="steinke"), other_data=other, **points
            )
        rows.append(_row(label, resume_cfg, res, _fdp(resume_cfg, res), time.perf_counter() - t))
        print(rows[-1], flush=True)
    total = time.perf_counter() - start
    lines = [
        "# White-box one-run audit of the native engine",
        "",
        f"Command: `python -m bench.audit --canaries {args.canaries} --steps {args.steps} "
        f"--sigmas {' '.join(f'{s:g}' for s in args.sigmas)}` ({total:.0f} s on this 2-core "
        "CPU).",
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
        "halved (a planted bug; the accountant is not told). `processes` 2: the same run on "
        "2 gloo processes (each holds the whole dataset and Poisson-samples its shard; the "
        "engine all-reduces the clipped sums, rank 0 alone adds the noise; the scores, read from "
        "the released gradient, are checked equal on both ranks); `rank 1 adds noise / 2`: the "
        "planted bug of the wrong rank adding a halved share; its `s` is the launch's time over "
        "its runs. `resume`: checkpoint after steps / 4, killed after the backward of step "
        "steps / 2, resumed in fresh objects (one process); the score adds to the first "
        "releases 1e4 x the difference of the twice-released steps' two releases "
        "(rmt_kernels/audit/resume.py). `other data`: the resumed run's data has the canaries "
        "removed, so the engine re-keys the noise and charges the lost steps again (its "
        "accountant eps counts them; `mu` and `exact eps` are those of the uninterrupted run); "
        "`same noise`: the planted bug, no re-key and the data check forced to match.",
        "",
        "| run | processes | canaries | steps | sigma | sample rate | physical batches | mu "
        "| accountant eps | exact eps | Steinke eps | f-DP eps | f-DP mu | s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "Reading: on the engine as shipped every bound is below the accountant's epsilon (no bug "
        "found). The f-DP bound is much tighter for Gaussian noise (it uses the whole Gaussian "
        "trade-off curve, not one (eps, delta) point) and reaches about 0.6 of the true mu at "
        "95% confidence, so noise halved (true mu twice the claim) is caught by the f-DP bound "
        "and not by the Steinke one. At 1e-7 confidence the f-DP bound reaches about 0.4 of "
        "the true mu (even with 262144 canaries), so halving is not separable there; the tests "
        "catch it at 95%. On 2 processes at sample rate 1 every row equals its one-process row "
        "(rank 0's noise key is the one-process key and the full batch is the same), which is "
        "the engine's claim that the all-reduced sum is the one-process mechanism; with Poisson "
        "sampling each rank samples its own shard, so the scores differ (at rate 0.25 they "
        "differ by up to 9 units, yet give the same guess and right-guess counts, so the same "
        "bound). A resume on the same data replays "
        "exactly (the scores are the uninterrupted run's); the same noise replayed on other "
        "data publishes the canaries' noise-free contribution and is caught by both bounds.",
        "",
    ]
    OUT.write_text("\n".join(lines))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
