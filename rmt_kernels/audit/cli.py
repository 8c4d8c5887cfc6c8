"""``rmt-audit``: a white-box one-run audit of the native DP-SGD engine.

    rmt-audit --noise-multiplier 1 --steps 16 --canaries 4096 --json audit.json

trains a Dirac-canary model through ``make_private`` (:mod:`rmt_kernels.audit.whitebox`) and
prints the accountant's epsilon, the audit's lower bound and its confidence (the best of the
summed, per-step and cross-parameter pair scores) and the sensitivity check. A bound above the
accountant's epsilon, or a canary score outside what clipping and the claimed noise allow, is a
privacy bug. ``--method`` picks the bound: ``fdp`` (the f-DP one-run
bound on mu-GDP, :mod:`rmt_kernels.audit.fdp`; the default at sample rate 1, where the claim is
Gaussian) or ``steinke`` (the (eps, delta) bound; the default below sample rate 1).
``--processes N`` runs the audit on N gloo processes (:mod:`rmt_kernels.audit.distributed`; no
progress bar then). Bad arguments: exit status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints the usage too)
        sys.stderr.write(f"rmt-audit: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rmt-audit", description=__doc__.split("\n\n")[0])
    p.add_argument("--noise-multiplier", type=float, default=1.0, help="sigma (default 1)")
    p.add_argument("--steps", type=int, default=16, help="logical steps (default 16)")
    p.add_argument("--canaries", type=int, default=4096, help="Dirac canaries (default 4096)")
    p.add_argument("--examples", type=int, default=256, help="ordinary examples (default 256)")
    p.add_argument(
        "--sample-rate",
        type=float,
        default=1.0,
        help="Poisson sampling rate; the logical batch is rate x dataset size (default 1)",
    )
    p.add_argument(
        "--physical-batches",
        type=int,
        default=1,
        help="forward/backward passes per step (gradient accumulation, default 1)",
    )
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="C (default 1)")
    p.add_argument("--delta", type=float, default=1e-6, help="delta (default 1e-6)")
    p.add_argument(
        "--p-fail",
        type=float,
        default=0.05,
        help="probability that the bound is wrong; confidence = 1 - p_fail (default 0.05)",
    )
    p.add_argument("--denoise-kappa", type=float, default=None, help="denoise at this kappa")
    p.add_argument("--accountant", default="prv", choices=("prv", "rdp"))
    p.add_argument(
        "--method",
        default="auto",
        choices=("auto", "steinke", "fdp"),
        help="the bound: fdp (f-DP, Mahloujifar et al.: a mu-GDP bound, tight for Gaussian "
        "noise), steinke (Steinke et al.: (eps, delta), any mechanism); auto (default): fdp "
        "at sample rate 1, where the claim is Gaussian, else steinke",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="torch.distributed processes (gloo, CPU; default 1): the engine all-reduces the "
        "clipped sums and rank 0 adds the noise",
    )
    p.add_argument("--seed", type=int, default=0, help="coin flips, data, sampling, noise")
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rmt_kernels.audit.whitebox import white_box_audit
    from rmt_kernels.audit.whitebox_config import WhiteBoxConfig

    try:
        cfg = WhiteBoxConfig(
            canaries=args.canaries,
            examples=args.examples,
            steps=args.steps,
            sample_rate=args.sample_rate,
            physical_batches=args.physical_batches,
            noise_multiplier=args.noise_multiplier,
            max_grad_norm=args.max_grad_norm,
            delta=args.delta,
            p_fail=args.p_fail,
            seed=args.seed,
            denoise=None if args.denoise_kappa is None else {"kappa": args.denoise_kappa},
            accountant=args.accountant,
            method=args.method,
        )
    except ValueError as e:
        sys.stderr.write(f"rmt-audit: error: {e}\n")
        return 2
    if args.processes < 1:
        sys.stderr.write(f"rmt-audit: error: --processes must be >= 1, got {args.processes}\n")
        return 2
    bar = None
    if not args.no_progress and args.processes == 1:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, desc="audit", unit="step")
        except ImportError:  # tqdm is in the glue extra; the audit runs without it
            bar = None
    with warnings.catch_warnings():
        # Opacus's PRV accountant warns about log(0) at sample rate 1 (harmless).
        warnings.simplefilter("ignore", RuntimeWarning)
        if args.processes > 1:
            from rmt_kernels.audit.distributed import white_box_audit_distributed

            res = white_box_audit_distributed([cfg], world_size=args.processes)[0]
        else:
            res = white_box_audit(cfg, progress=None if bar is None else bar.update)
    if bar is not None:
        bar.close()
    out = {**res.to_dict(), "processes": args.processes}
    a = res.audit
    print(
        f"accountant epsilon:  {res.accountant_epsilon:.4f}  (delta {cfg.delta:g}; "
        f"{args.processes} process{'es' if args.processes > 1 else ''})"
    )
    print(
        f"audit lower bound:   {a.epsilon:.4f}  (confidence {1 - cfg.p_fail:g}, from the "
        f"{res.family} score; {a.correct}/{a.guesses} guesses right of {a.canaries} canaries)"
    )
    if a.mu is not None:
        print(
            f"mu-GDP:              claimed {cfg.claimed_mu:.4f}, lower bound {a.mu:.4f} "
            "(f-DP one-run bound; epsilon above is its Gaussian epsilon at delta)"
        )
    else:
        print("method:              steinke ((eps, delta) one-run bound)")
    check = res.sensitivity
    if check is None:
        print("sensitivity check:   not applicable (denoised release)")
    else:
        print(
            f"sensitivity check:   largest step score {check.step_excess:.2f} sigma out "
            f"(threshold {check.step_threshold:.2f}), largest sum {check.sum_excess:.2f} "
            f"(threshold {check.sum_threshold:.2f})"
        )
    if not res.bug:
        verdict = "consistent"
    elif a.epsilon > res.accountant_epsilon:
        verdict = "BUG: above the accountant"
    else:
        verdict = "BUG: a canary moved the release by more than clipping and the noise allow"
    print(f"verdict:             {verdict}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
