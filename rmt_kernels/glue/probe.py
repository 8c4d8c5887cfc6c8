"""``rmt-glue probe``: where a fine-tuning gradient's signal stands against DP-SGD's noise.

Singular-value shrinkage at kappa 1 keeps a component of the averaged noisy gradient only if it
shows above the Marchenko-Pastur bulk. For an m x n matrix with i.i.d. noise of per-entry std
``s = z C / B`` (noise multiplier z, clip norm C, batch B), a rank-one component of singular
value theta shows above the bulk edge ``s (sqrt(m) + sqrt(n))`` exactly when theta exceeds the
BBP detection threshold ``s (m n)^(1/4)`` (large-matrix limit); below it the noisy matrix's top
singular value stays in the bulk and tells nothing about it. So the clean gradient's singular
values against ``s (m n)^(1/4)`` say what kappa-1 shrinkage can keep (the population answer:
the count of clean singular values above the threshold; not one noisy draw through the shrinker)
and what it must delete (the energy below).

The probe measures the clean mean clipped gradient (per-example clipping at C as DP-SGD does,
no noise) over a fixed set of training examples, at snapshots of a plain DP-Adam run with the
settings under test, and sets it against the noise of a grid of (batch size, epsilon, steps),
each calibrated by the Opacus accountant.

It reads the training data without noise, so its output is NOT differentially private: run it
on a public proxy task or a held-out split, or count it as hyper-parameter tuning outside the
privacy budget (as DP papers' tuning usually is). Its outputs say so.

:func:`probe_matrices` / :func:`probe_spectra` are the math (matrices in, per-matrix numbers
out); :func:`clean_clipped_gradient` the measurement; :func:`run_probe` the command.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rmt_kernels.dp.postprocess import MIN_DENOISE_DIM, denoise_linear_weights
from rmt_kernels.glue.data import Encoded
from rmt_kernels.glue.model import forward, loss_fn
from rmt_kernels.glue.tasks import Task
from rmt_kernels.shrinkage import bulk_edge

NOT_PRIVATE = (
    "NOT PRIVATE: the probe reads the training examples without noise; its numbers are not "
    "differentially private. Run it on a public proxy task or a held-out split, or count it as "
    "tuning outside the privacy budget."
)


# ------------------------------------------------------------------------------------------
# The math: singular values against the detection threshold
# ------------------------------------------------------------------------------------------


def detection_threshold(m: int, n: int, noise_std: float) -> float:
    """BBP threshold ``s (m n)^(1/4)``: the smallest singular value of a rank-one signal that
    shows above the bulk of an m x n matrix of i.i.d. N(0, s^2) noise (large-matrix limit)."""
    return noise_std * (m * n) ** 0.25


@dataclass(frozen=True)
class Spectrum:
    """One matrix's singular values (float64, descending) and its shape."""

    name: str
    shape: tuple[int, int]
    values: torch.Tensor

    @property
    def energy(self) -> float:
        """Squared Frobenius norm (the sum of the squared singular values)."""
        return float(self.values.square().sum())


def spectra(matrices: Mapping[str, torch.Tensor]) -> list[Spectrum]:
    """The singular values of each matrix, in float64.

    Raises:
        ValueError: a matrix that is not 2-D, is empty, or has non-finite entries (by name).
    """
    out = []
    for name, matrix in matrices.items():
        if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2 or matrix.numel() == 0:
            shape = tuple(matrix.shape) if isinstance(matrix, torch.Tensor) else type(matrix)
            raise ValueError(f"matrices[{name!r}] must be a non-empty 2-D tensor, got {shape}")
        if not bool(torch.isfinite(matrix).all()):
            raise ValueError(f"matrices[{name!r}] has non-finite entries")
        values = torch.linalg.svdvals(matrix.detach().to("cpu", torch.float64))
        out.append(Spectrum(name, (matrix.shape[0], matrix.shape[1]), values))
    return out


def _check_noise_std(noise_std: float) -> float:
    if not (isinstance(noise_std, (int, float)) and math.isfinite(noise_std) and noise_std > 0):
        raise ValueError(f"noise_std must be a finite number > 0, got {noise_std!r}")
    return float(noise_std)


def probe_spectra(spectra_: Sequence[Spectrum], noise_std: float, top: int = 3) -> dict[str, Any]:
    """Each matrix's signal against per-entry noise std ``noise_std``, and the totals.

    Per matrix: ``threshold`` (BBP, :func:`detection_threshold`), ``bulk_edge``, the ``top``
    largest singular values over each (``top_to_threshold``, ``top_to_edge``), ``kept_rank``
    (how many singular values exceed the threshold: the rank kappa-1 shrinkage keeps in the
    large-matrix limit) and ``energy_above`` (their share of the matrix's squared norm; 0 for a
    zero matrix). Totals: ``energy_above`` over all matrices (energy above / total energy),
    ``matrices_above`` (matrices with a kept rank of at least 1), ``matrices``, ``norm`` (the
    Frobenius norm over all), ``median_top_to_threshold``.

    Raises:
        ValueError: ``noise_std`` not finite and positive, ``top`` below 1, no matrices.
    """
    s = _check_noise_std(noise_std)
    if not (isinstance(top, int) and top >= 1):
        raise ValueError(f"top must be an int >= 1, got {top!r}")
    if not spectra_:
        raise ValueError("no matrices to probe")
    rows = []
    total = above_total = 0.0
    for spec in spectra_:
        m, n = spec.shape
        threshold = detection_threshold(m, n, s)
        edge = bulk_edge(m, n, s)
        values = spec.values
        above = values > threshold
        energy = spec.energy
        energy_above = float(values[above].square().sum())
        total += energy
        above_total += energy_above
        head = values[:top].tolist()
        rows.append(
            {
                "name": spec.name,
                "shape": [m, n],
                "norm": math.sqrt(energy),
                "threshold": threshold,
                "bulk_edge": edge,
                "top_to_threshold": [v / threshold for v in head],
                "top_to_edge": [v / edge for v in head],
                "kept_rank": int(above.sum()),
                "energy_above": energy_above / energy if energy > 0 else 0.0,
            }
        )
    return {
        "noise_std": s,
        "energy_above": above_total / total if total > 0 else 0.0,
        "matrices_above": sum(r["kept_rank"] > 0 for r in rows),
        "matrices": len(rows),
        "norm": math.sqrt(total),
        "median_top_to_threshold": statistics.median(r["top_to_threshold"][0] for r in rows),
        "per_matrix": rows,
    }


def probe_matrices(
    matrices: Mapping[str, torch.Tensor], noise_std: float, top: int = 3
) -> dict[str, Any]:
    """:func:`probe_spectra` of the matrices' singular values (see there)."""
    return probe_spectra(spectra(matrices), noise_std, top)


# ------------------------------------------------------------------------------------------
# The noise of a (batch size, epsilon, steps) setting
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoiseSetting:
    """A DP-SGD setting and the per-entry noise std of its averaged gradient."""

    batch_size: int
    epsilon: float
    steps: int
    sample_rate: float
    delta: float
    noise_multiplier: float
    noise_std: float  # noise_multiplier * C / batch_size

    @property
    def label(self) -> str:
        return f"B {self.batch_size}, eps {self.epsilon:g}, {self.steps} steps"


def noise_grid(
    batch_sizes: Iterable[int],
    epsilons: Iterable[float],
    steps: Iterable[int],
    *,
    examples: int,
    delta: float,
    max_grad_norm: float,
    accountant: str = "prv",
) -> list[NoiseSetting]:
    """Every (batch size, epsilon, steps) of the grid with its noise multiplier, calibrated by
    the accountant at sample rate ``batch_size / examples``, and ``s = z C / B``.

    Raises:
        ValueError: a batch size outside [1, examples], an epsilon not finite and positive,
            steps below 1, or an epsilon no noise multiplier reaches.
    """
    from rmt_kernels.glue.privacy import calibrate

    settings = []
    for steps_ in steps:
        if steps_ < 1:
            raise ValueError(f"--accounting-steps must be >= 1, got {steps_}")
        for epsilon in epsilons:
            if not (math.isfinite(epsilon) and epsilon > 0):
                raise ValueError(f"--epsilons must be finite and > 0, got {epsilon}")
            for batch in batch_sizes:
                if not 1 <= batch <= examples:
                    raise ValueError(
                        f"--batch-sizes: {batch} is outside [1, {examples}] (the training "
                        "examples the sampling rate is taken over)"
                    )
                rate = batch / examples
                z = calibrate(epsilon, delta, rate, steps_, accountant)
                settings.append(
                    NoiseSetting(batch, epsilon, steps_, rate, delta, z, z * max_grad_norm / batch)
                )
    return settings


# ------------------------------------------------------------------------------------------
# The clean mean clipped gradient
# ------------------------------------------------------------------------------------------


def probed_matrices(model: nn.Module, min_dim: int = MIN_DENOISE_DIM) -> list[str]:
    """The parameter names the probe measures: what the native engine denoises by default (the
    trainable 2-D weights of ``nn.Linear`` with a smaller side of at least ``min_dim``)."""
    names = []
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if (
                p.requires_grad
                and denoise_linear_weights(module_name, module, name, p)
                and min(p.shape) >= min_dim
            ):
                names.append(f"{module_name}.{name}" if module_name else name)
    return names


@dataclass
class CleanGradient:
    """The mean over examples of the per-example gradients clipped to C, for some matrices."""

    matrices: dict[str, torch.Tensor]  # float64, by parameter name
    examples: int
    clipped_fraction: float  # examples whose gradient norm exceeded C
    median_example_norm: float  # of the unclipped per-example gradients (all parameters)
    seconds: float = 0.0


def _sparse_embeddings(model: nn.Module) -> list[tuple[nn.Embedding, bool]]:
    """Make every embedding's gradient sparse (the rows of the example's tokens only): a dense
    30522 x 384 gradient per example costs more than the rest of the backward. The values are
    the same; the caller restores the flags."""
    changed = []
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.weight.requires_grad:
            changed.append((module, module.sparse))
            module.sparse = True
    return changed


def clean_clipped_gradient(
    model: nn.Module,
    data: Encoded,
    indices: Sequence[int],
    task: Task,
    max_grad_norm: float,
    names: Sequence[str],
    device: torch.device | str = "cpu",
) -> CleanGradient:
    """``(1/N) sum_i min(1, C / ||g_i||) g_i`` over the examples ``indices`` of ``data``, for
    the parameters ``names``, in float64: DP-SGD's clipped mean with no noise and the batch
    being the whole set. ``||g_i||`` runs over all trainable parameters, as DP-SGD's clipping
    does. One example per forward and backward (exact: no padding, no per-sample machinery), in
    evaluation mode (no dropout: the gradient of the model, not of one dropout draw).

    Raises:
        ValueError: ``max_grad_norm`` not finite and positive, no examples, an index outside the
            data, a name that is not a trainable parameter, or a non-finite gradient.
    """
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm}")
    if not len(indices):
        raise ValueError("no examples to measure the gradient on")
    bad = [i for i in indices if not 0 <= int(i) < len(data)]
    if bad:
        raise ValueError(f"example index {bad[0]} is outside the {len(data)} examples")
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params or not params[n].requires_grad]
    if missing:
        raise ValueError(f"not trainable parameters of the model: {missing}")
    trainable = [p for p in params.values() if p.requires_grad]
    sums = {n: torch.zeros(params[n].shape, dtype=torch.float64) for n in names}
    was_training = model.training
    model.eval()
    flags = _sparse_embeddings(model)
    start = time.perf_counter()
    norms = []
    try:
        for i in indices:
            model.zero_grad(set_to_none=True)
            batch = data.batch([int(i)])
            loss = loss_fn(forward(model, batch, device), batch["labels"].to(device), task)
            loss.backward()
            sq = 0.0
            for p in trainable:
                if p.grad is not None:
                    g = p.grad.coalesce().values() if p.grad.is_sparse else p.grad
                    sq += float(torch.linalg.vector_norm(g, dtype=torch.float64)) ** 2
            norm = math.sqrt(sq)
            if not math.isfinite(norm):
                raise ValueError(f"example {int(i)}: its gradient is not finite")
            norms.append(norm)
            factor = min(1.0, max_grad_norm / norm) if norm > 0 else 1.0
            for n in names:
                grad = params[n].grad
                if grad is not None:
                    sums[n].add_(grad.to("cpu", torch.float64), alpha=factor)
    finally:
        model.zero_grad(set_to_none=True)
        for module, sparse in flags:
            module.sparse = sparse
        model.train(was_training)
    count = len(norms)
    return CleanGradient(
        matrices={n: s / count for n, s in sums.items()},
        examples=count,
        clipped_fraction=sum(v > max_grad_norm for v in norms) / count,
        median_example_norm=statistics.median(norms),
        seconds=time.perf_counter() - start,
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
    """The TrainConfig of the probed run: plain DP-Adam (AdamW) with the probe's settings and a
    public noise seed (the probe is not private anyway; the snapshots are reproducible)."""
    from rmt_kernels.glue.config import TrainConfig

    return TrainConfig(
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
    from rmt_kernels.glue.model import build_model, unwrap
    from rmt_kernels.glue.outputs import write_json
    from rmt_kernels.glue.privacy import default_delta
    from rmt_kernels.glue.train import Progress, _set_up, _timed_step

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
        run = _set_up(run_cfg)
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
    probe_model, _ = build_model(run.cfg, run.task)
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
        clean = clean_clipped_gradient(
            probe_model, run.train_data, indices, run.task, cfg.max_grad_norm, names, run.device
        )
        metrics = evaluate(probe_model, run.eval_data, run.task, 128, run.device)
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
                f"{g.label}: {_cell(r)}" for g, r in zip(grid, record["settings"], strict=True)
            )
            print(f"step {snapshot}: clean norm {record['clean_norm']:.4g}; {cells}", flush=True)
        write_json(str(out / "probe.json"), report)
    if saved:
        torch.save(saved, out / "gradients.pt")
    write_outputs(report, out)
    return report


def write_outputs(report: dict[str, Any], out: Path) -> None:
    """Write ``probe.md``, the phase diagrams and ``probe.json`` (with the plots' names) for a
    report, complete or with the snapshots measured so far (``probe.json`` is rewritten after
    each snapshot, so an interrupted probe can still be tabulated and drawn)."""
    from rmt_kernels.glue.outputs import write_json

    (out / "probe.md").write_text(markdown(report))
    report["plots"] = [path.name for path in phase_diagrams(report, out)]
    write_json(str(out / "probe.json"), report)


def _cell(result: Mapping[str, Any]) -> str:
    """'29%, 2/36': the energy share above the threshold and the matrices with any."""
    return (
        f"{100 * result['energy_above']:.0f}%, {result['matrices_above']}/{result['matrices']}"
    )


def markdown(report: Mapping[str, Any]) -> str:
    """The report as markdown: the warning, the table (snapshots x grid settings), the per-snapshot
    clean-gradient numbers."""
    grid = [NoiseSetting(**g) for g in report["grid"]]
    cfg = report["config"]
    lines = [
        f"**{report['warning']}**",
        "",
        f"Share of the clean mean clipped gradient's energy (C = {cfg['max_grad_norm']:g}, "
        f"{cfg['examples']} fixed training examples) in singular values above the detection "
        f"threshold s (m n)^(1/4), s = z C / B, and how many of the {len(report['matrices'])} "
        "matrices have any; snapshots of plain DP-Adam "
        f"(B {cfg['run_batch_size']}, eps {cfg['run_epsilon']:g} over {cfg['run_steps']} steps, "
        f"lr {cfg['lr']:g} {cfg['lr_schedule']}).",
        "",
        "| step | dev " + "".join(f"| {g.label} " for g in grid) + "|",
        "|---|---|" + "---|" * len(grid),
    ]
    for snap in report["snapshots"]:
        dev = next(iter(snap["dev"].values()))
        cells = " | ".join(_cell(r) for r in snap["settings"])
        lines.append(f"| {snap['step']} | {dev:.3f} | {cells} |")
    lines += [
        "",
        "| setting | z | s |",
        "|---|---|---|",
        *(f"| {g.label} | {g.noise_multiplier:.4f} | {g.noise_std:.3e} |" for g in grid),
        "",
        "| step | clean norm | clipped examples | median example norm | median top / threshold |",
        "|---|---|---|---|---|",
    ]
    for snap in report["snapshots"]:
        medians = ", ".join(f"{r['median_top_to_threshold']:.2f}" for r in snap["settings"])
        lines.append(
            f"| {snap['step']} | {snap['clean_norm']:.4f} | {100 * snap['clipped_fraction']:.0f}% "
            f"| {snap['median_example_norm']:.3g} | {medians} |"
        )
    return "\n".join(lines) + "\n"


def phase_diagrams(report: Mapping[str, Any], out: Path) -> list[Path]:
    """One PNG per accounting-steps value: a panel per snapshot, batch size x epsilon, colour the
    energy share above the threshold, annotated with the matrices that have any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [NoiseSetting(**g) for g in report["grid"]]
    batches = sorted({g.batch_size for g in grid})
    epsilons = sorted({g.epsilon for g in grid})
    snaps = report["snapshots"]
    paths = []
    for steps in sorted({g.steps for g in grid}):
        size = (1.6 + 0.9 * len(batches) * len(snaps), 2.2 + 0.6 * len(epsilons))
        fig, axes = plt.subplots(1, len(snaps), figsize=size, squeeze=False, layout="constrained")
        for ax, snap in zip(axes[0], snaps, strict=True):
            share = torch.full((len(epsilons), len(batches)), float("nan"))
            for g, r in zip(grid, snap["settings"], strict=True):
                if g.steps != steps:
                    continue
                i, j = epsilons.index(g.epsilon), batches.index(g.batch_size)
                share[i, j] = r["energy_above"]
                text = f"{100 * r['energy_above']:.0f}%\n{r['matrices_above']}/{r['matrices']}"
                color = "k" if r["energy_above"] > 0.6 else "w"  # legible on viridis
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color=color)
            image = ax.imshow(
                share.numpy(), vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto"
            )
            ax.set_xticks(range(len(batches)), [str(b) for b in batches])
            ax.set_yticks(range(len(epsilons)), [f"{e:g}" for e in epsilons])
            ax.set_xlabel("batch size")
            ax.set_title(f"step {snap['step']}", fontsize=9)
        axes[0][0].set_ylabel("epsilon")
        fig.colorbar(image, ax=axes[0].tolist(), label="energy above threshold")
        fig.suptitle(
            f"clean gradient vs detection threshold ({steps} steps) - NOT PRIVATE", fontsize=9
        )
        path = out / f"phase-{steps}steps.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths



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
    g.add_argument("--min-dim", type=positive, default=MIN_DENOISE_DIM,
                   help=f"probe Linear weights with both sides >= this (default {MIN_DENOISE_DIM})")
    g.add_argument("--top", type=positive, default=3, help="top singular values reported")
    g = p.add_argument_group("the probed run (plain DP-Adam with a public noise seed)")
    g.add_argument("--snapshots", type=step, nargs="+", default=[0],
                   help="steps of the run at which to measure (default 0)")
    g.add_argument("--run-batch-size", type=positive, default=512)
    g.add_argument("--run-physical-batch-size", type=positive)
    g.add_argument("--run-epsilon", type=float, default=8.0)
    g.add_argument("--run-steps", type=positive, default=100,
                   help="the run's length (its noise and learning-rate schedule)")
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
    g.add_argument("--save-gradients", action="store_true",
                   help="also save the clean gradients (gradients.pt, by snapshot)")
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
    "CleanGradient",
    "NoiseSetting",
    "ProbeConfig",
    "Spectrum",
    "add_arguments",
    "clean_clipped_gradient",
    "detection_threshold",
    "markdown",
    "noise_grid",
    "phase_diagrams",
    "probe_command",
    "probe_matrices",
    "probe_spectra",
    "probed_matrices",
    "run_probe",
    "spectra",
    "write_outputs",
]
