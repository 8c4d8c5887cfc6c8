"""The outputs of ``rmt-glue probe``: the markdown table and the phase diagrams of a report
(``probe.json``'s content), complete or with the snapshots measured so far."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from rmt_kernels.glue.probe_spectra import NoiseSetting


def write_outputs(report: dict[str, Any], out: Path) -> None:
    """Write ``probe.md``, the phase diagrams and ``probe.json`` (with the plots' names) for a
    report, complete or with the snapshots measured so far (``probe.json`` is rewritten after
    each snapshot, so an interrupted probe can still be tabulated and drawn)."""
    from rmt_kernels.training.outputs import write_json

    (out / "probe.md").write_text(markdown(report))
    report["plots"] = [path.name for path in phase_diagrams(report, out)]
    write_json(str(out / "probe.json"), report)


def cell_text(result: Mapping[str, Any]) -> str:
    """'29%, 2/36': the energy share above the threshold and the matrices with any."""
    return f"{100 * result['energy_above']:.0f}%, {result['matrices_above']}/{result['matrices']}"


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
        cells = " | ".join(cell_text(r) for r in snap["settings"])
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
