"""The options of one white-box audit run (:func:`rmt_kernels.audit.whitebox.white_box_audit`).

Its own module because every stage of the audit reads it: the canaries (canaries.py), the
training run (canary_run.py) and the scores (whitebox_scores.py).
"""

from __future__ import annotations

import dataclasses
import math

from rmt_kernels.audit.strategy import METHODS

__all__ = ["WhiteBoxConfig"]


@dataclasses.dataclass(frozen=True)
class WhiteBoxConfig:
    """One white-box audit run.

    Attributes:
        canaries: m, the number of Dirac canaries (>= 2).
        examples: ordinary (non-canary) training examples (>= 0).
        steps: logical DP-SGD steps (>= 1).
        sample_rate: Poisson sampling rate in (0, 1]; the loader's batch is
            ``round(sample_rate * dataset size)`` (1 = every example at every step).
        physical_batches: each logical batch is split into this many forward/backward passes
            (gradient accumulation) before ``optimizer.step()``.
        noise_multiplier, max_grad_norm: sigma and C of ``make_private``.
        canary_norm: a canary's gradient norm before clipping, in units of C (> 1: clipped).
        delta: the delta of the audited claim (and of the accountant's epsilon); keep
            ``canaries * delta`` tiny (the bound has a ``2 m delta`` term).
        p_fail: the probability allowed for the bound to be wrong.
        seed: seeds the coin flips, the signs, the data, the sampling and the noise.
        denoise: ``make_private``'s denoise options (None: plain DP-SGD).
        accountant: ``make_private``'s accountant ("prv" or "rdp").
        lr: SGD learning rate (the gradients do not depend on the weights: any value audits the
            same mechanism).
        method: the bound: "fdp" (the f-DP bound on mu-GDP, :mod:`rmt_kernels.audit.fdp`),
            "steinke" (the (eps, delta) bound, :mod:`rmt_kernels.audit.bound`), or "auto":
            "fdp" at sample rate 1, where the accountant's claim is exactly Gaussian (``steps``
            full-batch Gaussian steps compose to mu-GDP, ``mu = sqrt(steps) /
            noise_multiplier``), else "steinke" (a Poisson-subsampled Gaussian is not a
            Gaussian: comparing a mu-GDP bound with its epsilon would not be sound).
    """

    canaries: int = 1024
    examples: int = 256
    steps: int = 4
    sample_rate: float = 1.0
    physical_batches: int = 1
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    canary_norm: float = 100.0
    delta: float = 1e-12
    p_fail: float = 0.05
    seed: int = 0
    denoise: dict | None = None
    accountant: str = "prv"
    lr: float = 0.1
    method: str = "auto"

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")

        def is_int(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        need(is_int(self.canaries) and self.canaries >= 2, "canaries", "an int >= 2")
        need(is_int(self.examples) and self.examples >= 0, "examples", "an int >= 0")
        need(is_int(self.steps) and self.steps >= 1, "steps", "an int >= 1")
        need(is_num(self.sample_rate) and 0 < self.sample_rate <= 1, "sample_rate", "in (0, 1]")
        need(
            is_int(self.physical_batches) and self.physical_batches >= 1,
            "physical_batches",
            "an int >= 1",
        )
        need(
            is_num(self.noise_multiplier) and self.noise_multiplier > 0,
            "noise_multiplier",
            "a finite number > 0",
        )
        need(
            is_num(self.max_grad_norm) and self.max_grad_norm > 0,
            "max_grad_norm",
            "a finite number > 0",
        )
        need(
            is_num(self.canary_norm) and self.canary_norm > 0, "canary_norm", "a finite number > 0"
        )
        need(is_num(self.delta) and 0 < self.delta < 1, "delta", "in (0, 1)")
        need(is_num(self.p_fail) and 0 < self.p_fail < 1, "p_fail", "in (0, 1)")
        need(is_int(self.seed) and self.seed >= 0, "seed", "an int >= 0")
        need(is_num(self.lr), "lr", "a finite number")
        need(self.method in ("auto", *METHODS), "method", f"one of {('auto', *METHODS)}")

    @property
    def resolved_method(self) -> str:
        """The bound used: ``method``, with "auto" resolved (see the attributes)."""
        if self.method != "auto":
            return self.method
        return "fdp" if self.sample_rate == 1 else "steinke"

    @property
    def claimed_mu(self) -> float | None:
        """The accountant's claim as mu-GDP at sample rate 1 (``sqrt(steps) / sigma``), else
        None (not a Gaussian claim)."""
        if self.sample_rate != 1:
            return None
        return math.sqrt(self.steps) / self.noise_multiplier

    @property
    def side(self) -> int:
        """s: the canary blocks of the audited model are s x s (a Linear weight's and an
        Embedding's) and s long (a Linear bias's, a LayerNorm weight's and bias's), the smallest
        s with ``2 s^2 + 3 s >= canaries`` slots."""
        s = 1
        while 2 * s * s + 3 * s < self.canaries:
            s += 1
        return s
