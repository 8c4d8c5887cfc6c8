"""The math of ``rmt-glue probe``: a matrix's singular values against the detection threshold of
DP-SGD's noise, and the noise of a grid of (batch size, epsilon, steps) settings.

Singular-value shrinkage at kappa 1 keeps a component of the averaged noisy gradient only if it
shows above the Marchenko-Pastur bulk. For an m x n matrix with i.i.d. noise of per-entry std
``s = z C / B`` (noise multiplier z, clip norm C, batch B), a rank-one component of singular
value theta shows above the bulk edge ``s (sqrt(m) + sqrt(n))`` exactly when theta exceeds the
BBP detection threshold ``s (m n)^(1/4)`` (large-matrix limit); below it the noisy matrix's top
singular value stays in the bulk and tells nothing about it. So the clean gradient's singular
values against ``s (m n)^(1/4)`` say what kappa-1 shrinkage can keep (the population answer:
the count of clean singular values above the threshold; not one noisy draw through the shrinker)
and what it must delete (the energy below).

:func:`probe_matrices` / :func:`probe_spectra`: matrices in, per-matrix numbers out;
:func:`noise_grid`: each setting's noise, calibrated by the accountant.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rmt_kernels.shrinkage import bulk_edge

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
    from rmt_kernels.training.privacy import calibrate

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
