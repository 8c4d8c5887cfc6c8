"""``rmt-glue probe``: where a fine-tuning gradient's signal stands against DP-SGD's noise.

The probe measures the clean mean clipped gradient (``rmt_kernels.glue.probe_gradient``) over a
fixed set of training examples, at snapshots of a plain DP-Adam run with the settings under
test, and sets each weight matrix's singular values against the detection threshold of the
noise of a grid of (batch size, epsilon, steps), each calibrated by the Opacus accountant
(``rmt_kernels.glue.probe_spectra``, which says why the threshold is ``s (m n)^(1/4)``). Its
outputs: ``probe.json``, and ``probe.md`` and phase diagrams (``rmt_kernels.glue.probe_report``).

It reads the training data without noise, so its output is NOT differentially private: run it
on a public proxy task or a held-out split, or count it as hyper-parameter tuning outside the
privacy budget (as DP papers' tuning usually is). Its outputs say so.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from rmt_kernels.dp.stages.options import MIN_DENOISE_DIM
from rmt_kernels.glue.probe_gradient import clean_clipped_gradient, probed_matrices
from rmt_kernels.glue.probe_report import cell_text, write_outputs
from rmt_kernels.glue.probe_spectra import noise_grid, probe_spectra, spectra

NOT_PRIVATE = (
    "NOT PRIVATE: the probe reads the training examples without noise; its numbers are not "
    "differentially private. Run it on a public proxy task or a held-out split, or count it as "
    "tuning outside the privacy budget."
)


# ------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------


@dataclass
class ProbeConfig:
    """``rmt-glue probe``'s options (see its ``--help``)."""

    task: str
    data_dir: str | None = None
    model: str | None = None
    init: str = "pretrained"
    config: str | None = None
    pooling: str = "cls"
    max_length: int = 128
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    delta: float | None = None
    train_size: int | None = None
    examples: int = 2048
    # The run whose snapshots are probed: plain DP-Adam (AdamW) with these settings.
    snapshots: list[int] = field(default_factory=lambda: [0])
    run_batch_size: int = 512
    run_physical_batch_size: int | None = None
    run_epsilon: float = 8.0
    run_steps: int = 100
    lr: float = 3e-3
    lr_schedule: str = "constant"
    noise_seed: int = 0
    seed: int = 0
    eval_size: int | None = None
    # The grid.
    batch_sizes: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096])
    epsilons: list[float] = field(default_factory=lambda: [3.0, 8.0])
    accounting_steps: list[int] = field(default_factory=lambda: [100])
    min_dim: int = MIN_DENOISE_DIM
    top: int = 3
    device: str | None = None
    output_dir: str = "probe"
    save_gradients: bool = False
    progress: bool = True

    def check(self) -> None:
        """Raise ValueError on options that cannot be probed (before any data is read)."""
        if self.examples < 1:
            raise ValueError(f"--examples must be >= 1, got {self.examples}")
        if not self.snapshots or any(s < 0 for s in self.snapshots):
            raise ValueError(f"--snapshots must be steps >= 0, got {self.snapshots}")
        if max(self.snapshots) > self.run_steps:
            raise ValueError(
                f"--snapshots {max(self.snapshots)} is past the run's --run-steps {self.run_steps}"
            )
        if not self.batch_sizes or not self.epsilons or not self.accounting_steps:
            raise ValueError("the grid needs --batch-sizes, --epsilons and --accounting-steps")
        if self.top < 1:
            raise ValueError(f"--top must be >= 1, got {self.top}")
        if self.min_dim < 1:
            raise ValueError(f"--min-dim must be >= 1, got {self.min_dim}")


def _run_config(cfg: ProbeConfig):
    """The GlueConfig of the probed run: plain DP-Adam (AdamW) with the probe's settings and a
    public noise seed (the probe is not private anyway; the snapshots are reproducible)."""
    from rmt_kernels.glue.config import GlueConfig

    return GlueConfig(
        task=cfg.task,
        data_dir=cfg.data_dir,
        model=cfg.model,
        init=cfg.init,
        config=cfg.config,
        epsilon=cfg.run_epsilon,
        delta=cfg.delta,
        max_grad_norm=cfg.max_grad_norm,
        accountant=cfg.accountant,
        noise_seed=cfg.noise_seed,
        batch_size=cfg.run_batch_size,
        physical_batch_size=cfg.run_physical_batch_size,
        steps=cfg.run_steps,
        lr=cfg.lr,
        lr_schedule=cfg.lr_schedule,
        max_length=cfg.max_length,
        train_size=cfg.train_size,
        eval_size=cfg.eval_size,
        seed=cfg.seed,
        pooling=cfg.pooling,
        device=cfg.device,
        progress=False,
    )


def run_probe(cfg: ProbeConfig) -> dict[str, Any]:
    """Train the probed run to each snapshot, measure the clean gradient there, set it against
    every grid setting's noise; write ``probe.json``, ``probe.md`` and the phase diagrams to
    ``cfg.output_dir`` and return the JSON's content.

    Raises:
        ValueError: bad options (see :meth:`ProbeConfig.check`, ``rmt-glue train``'s checks of
            the run's settings, :func:`noise_grid`), or more ``--examples`` than the data has.
    """
    import warnings

    from rmt_kernels.glue.evaluation import evaluate
    from rmt_kernels.glue.fine_tune import GlueFineTuning
    from rmt_kernels.glue.model import build_model
    from rmt_kernels.training.loop import Progress, _set_up, _timed_step
    from rmt_kernels.training.outputs import write_json
    from rmt_kernels.training.privacy import default_delta, unwrap

    cfg.check()
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--output-dir {out} cannot be created: {err}") from err
    run_cfg = _run_config(cfg)
    with warnings.catch_warnings():
        # The run's public noise seed: the probe says NOT PRIVATE itself, louder.
        warnings.filterwarnings("ignore", message="--noise-seed")
        run = _set_up(run_cfg, GlueFineTuning(run_cfg.task))
    n_train = len(run.train_data)
    if cfg.examples > n_train:
        raise ValueError(f"--examples {cfg.examples} is above the {n_train} training examples")
    delta = cfg.delta if cfg.delta is not None else default_delta(n_train)
    grid = noise_grid(
        cfg.batch_sizes,
        cfg.epsilons,
        cfg.accounting_steps,
        examples=n_train,
        delta=delta,
        max_grad_norm=cfg.max_grad_norm,
        accountant=cfg.accountant,
    )
    # A clean copy of the model (no DP hooks) the run's weights are loaded into at each snapshot.
    probe_model, _ = build_model(run.cfg, run.task.spec)
    probe_model.to(run.device)
    names = probed_matrices(probe_model, cfg.min_dim)
    if not names:
        raise ValueError(
            f"the model has no Linear weight with both sides >= --min-dim {cfg.min_dim}"
        )
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(cfg.seed))
    indices = sorted(order[: cfg.examples].tolist())
    report: dict[str, Any] = {
        "private": False,
        "warning": NOT_PRIVATE,
        "config": asdict(cfg),
        "run": {
            "noise_multiplier": run.privacy.noise_multiplier,
            "delta": run.privacy.delta,
            "train_examples": n_train,
        },
        "threshold": "BBP: s (m n)^(1/4); kept_rank counts the clean singular values above it",
        "matrices": names,
        "grid": [asdict(g) for g in grid],
        "snapshots": [],
    }
    progress = Progress()
    saved = {}
    for snapshot in sorted(set(cfg.snapshots)):
        while progress.step < snapshot:
            for (batch,) in run.loader:
                _timed_step(run, progress, batch)
                if progress.step == snapshot:
                    break
        probe_model.load_state_dict(unwrap(run.model).state_dict())
        spec = run.task.spec  # the GLUE task (its loss and metrics)
        clean = clean_clipped_gradient(
            probe_model, run.train_data, indices, spec, cfg.max_grad_norm, names, run.device
        )
        metrics = evaluate(probe_model, run.eval_data, spec, 128, run.device)
        spec = spectra(clean.matrices)
        record = {
            "step": snapshot,
            "dev": {run.task.main_metric: metrics[run.task.main_metric]},
            "examples": clean.examples,
            "clean_norm": math.sqrt(sum(s.energy for s in spec)),
            "clipped_fraction": clean.clipped_fraction,
            "median_example_norm": clean.median_example_norm,
            "gradient_seconds": clean.seconds,
            "settings": [probe_spectra(spec, g.noise_std, cfg.top) for g in grid],
        }
        report["snapshots"].append(record)
        if cfg.save_gradients:
            saved[snapshot] = {k: v.float() for k, v in clean.matrices.items()}
        if cfg.progress:
            cells = ", ".join(
                f"{g.label}: {cell_text(r)}" for g, r in zip(grid, record["settings"], strict=True)
            )
            print(f"step {snapshot}: clean norm {record['clean_norm']:.4g}; {cells}", flush=True)
        write_json(str(out / "probe.json"), report)
    if saved:
        torch.save(saved, out / "gradients.pt")
    write_outputs(report, out)
    return report


# ------------------------------------------------------------------------------------------
# Command line (``rmt-glue probe``; the subparser is made in cli.py)
# ------------------------------------------------------------------------------------------

PROBE_HELP = (
    "NOT PRIVATE: where the clean gradient's signal stands against DP noise (per weight matrix, "
    "for a grid of batch size x epsilon x steps), at snapshots of a plain DP-Adam run"
)

PROBE_DESCRIPTION = (
    "Measure the clean mean clipped gradient (per-example clipping at --max-grad-norm, no "
    "noise) over --examples fixed training examples at --snapshots of a plain DP-Adam (AdamW) "
    "run with the --run-* settings, and set each Linear weight matrix's singular values "
    "against the noise of every (--batch-sizes, --epsilons, --accounting-steps): the BBP "
    "detection threshold s (m n)^(1/4) and the bulk edge s (sqrt(m) + sqrt(n)), s = z C / B "
    "with z from the accountant. Writes probe.json, probe.md and phase-<steps>steps.png to "
    "--output-dir. " + NOT_PRIVATE
)


def add_arguments(p) -> None:
    """The options of ``rmt-glue probe`` on the argparse parser ``p``."""
    from rmt_kernels.glue.tasks import TASKS

    def positive(text: str) -> int:
        import argparse

        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
        return value

    def step(text: str) -> int:
        import argparse

        value = int(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
        return value

    p.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)}")
    p.add_argument("--data-dir", help="a local GLUE folder; omitted: the hub's 'glue' dataset")
    g = p.add_argument_group("model (as rmt-glue train)")
    g.add_argument("--model", help="model folder or hub name")
    g.add_argument("--init", choices=("pretrained", "random"), default="pretrained")
    g.add_argument("--config", help="with --init random: a config folder (with a tokenizer)")
    g.add_argument("--pooling", choices=("cls", "mean"), default="cls")
    g.add_argument("--max-length", type=positive, default=128)
    g = p.add_argument_group("the measurement")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping norm C")
    g.add_argument(
        "--examples", type=positive, default=2048, help="fixed training examples (default 2048)"
    )
    g.add_argument("--train-size", type=positive, help="use a random subset of train")
    g.add_argument(
        "--min-dim",
        type=positive,
        default=MIN_DENOISE_DIM,
        help=f"probe Linear weights with both sides >= this (default {MIN_DENOISE_DIM})",
    )
    g.add_argument("--top", type=positive, default=3, help="top singular values reported")
    g = p.add_argument_group("the probed run (plain DP-Adam with a public noise seed)")
    g.add_argument(
        "--snapshots",
        type=step,
        nargs="+",
        default=[0],
        help="steps of the run at which to measure (default 0)",
    )
    g.add_argument("--run-batch-size", type=positive, default=512)
    g.add_argument("--run-physical-batch-size", type=positive)
    g.add_argument("--run-epsilon", type=float, default=8.0)
    g.add_argument(
        "--run-steps",
        type=positive,
        default=100,
        help="the run's length (its noise and learning-rate schedule)",
    )
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--lr-schedule", choices=("constant", "linear"), default="constant")
    g.add_argument("--noise-seed", type=int, default=0)
    g.add_argument("--seed", type=int, default=0, help="model init, subsets, probe examples")
    g.add_argument("--eval-size", type=positive, help="dev examples scored at each snapshot")
    g = p.add_argument_group("the grid (each setting's noise from the accountant)")
    g.add_argument("--batch-sizes", type=positive, nargs="+", default=[512, 1024, 2048, 4096])
    g.add_argument("--epsilons", type=float, nargs="+", default=[3.0, 8.0])
    g.add_argument("--accounting-steps", type=positive, nargs="+", default=[100])
    g.add_argument("--accountant", choices=("prv", "rdp"), default="prv")
    g.add_argument("--delta", type=float, help="default 1/n^1.1 (n = training examples)")
    g = p.add_argument_group("run")
    g.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    g.add_argument("--threads", type=positive, help="torch CPU threads (default: torch's)")
    g.add_argument("--output-dir", default="probe", help="where the outputs go (default probe)")
    g.add_argument(
        "--save-gradients",
        action="store_true",
        help="also save the clean gradients (gradients.pt, by snapshot)",
    )
    g.add_argument("--quiet", action="store_true")


def probe_command(args) -> dict[str, Any]:
    """``rmt-glue probe`` on parsed arguments: print the warning, run, print where it wrote."""
    if args.threads:
        torch.set_num_threads(args.threads)
    print(NOT_PRIVATE, flush=True)
    # The options are ProbeConfig's fields by name; --quiet is the one negated.
    names = {f.name for f in fields(ProbeConfig)} - {"progress"}
    cfg = ProbeConfig(**{k: getattr(args, k) for k in names}, progress=not args.quiet)
    report = run_probe(cfg)
    print(f"wrote {cfg.output_dir}/probe.json, probe.md, {', '.join(report.get('plots', []))}")
    print(NOT_PRIVATE)
    return report


__all__ = [
    "NOT_PRIVATE",
    "PROBE_DESCRIPTION",
    "PROBE_HELP",
    "ProbeConfig",
    "add_arguments",
    "probe_command",
    "run_probe",
]
