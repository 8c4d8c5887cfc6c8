"""White-box audit of the native engine: Dirac canaries through ``make_private``.

The audited model is one ``nn.Linear`` (no bias) with a per-example linear loss
``-(W x_b) . w_b``, whose per-example gradient is ``-w_b x_b^T`` whatever the weights. Canary i
owns one weight entry (row ``i // side``, column ``i % side`` of the ``side x side`` canary block):
its input is the one-hot ``e_col`` and its output weight ``G s_t e_row`` with ``G =
canary_norm`` (default 100 C), so its gradient at step t is ``G s_t`` times a unit "Dirac"
matrix: clipping makes it exactly ``C s_t`` in that direction. The ordinary examples' inputs
live in ``extra`` columns of their own, so they never touch a canary's entry (they still share
the step: clipping, sampling, noise and the optimizer see a mixed batch).

Each canary is in the training set with probability 1/2 (the coin flips of
:func:`rmt_kernels.audit.draw_inclusion`). Training goes through the public API only:
``make_private`` (Poisson sampling, fused noise, optional accumulation and denoising) and
``optimizer.step()``; after each step the released gradient ``p.grad`` (what the optimizer
consumes) is read. A canary's score is the sum over steps of the projection of ``p.grad`` on its
direction at that step, in units of ``C / expected batch`` (an IN canary adds about
``sample_rate * steps``; the noise adds ``noise_multiplier * sqrt(steps)`` of spread).

Why the signs ``s_t``: each canary's signs are a seeded, balanced (+1 as often as -1) sequence.
Against independent noise they change nothing (the score is still a sum of ``steps``
independent projections). But noise that repeats across steps (a bug) cancels from the score of
every canary exactly, leaving an OUT canary at 0 and an IN one at its full signal: a repeated
noise stream is caught as surely as a missing one.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from rmt_kernels.audit.guesses import draw_inclusion
from rmt_kernels.audit.strategy import METHODS, AuditResult, Bonferroni, Fixed, Split, audit

__all__ = ["WhiteBoxConfig", "WhiteBoxResult", "canary_signs", "white_box_audit"]

# Columns of the ordinary examples' inputs (disjoint from the canary block).
EXTRA_COLUMNS = 8


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
        accountant: ``make_private``'s accountant ("prv", "rdp", "gdp").
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
        """Side of the square weight block that holds one entry per canary."""
        return math.isqrt(self.canaries - 1) + 1


@dataclasses.dataclass
class WhiteBoxResult:
    """An audit of one run: the bound, the accountant's epsilon, and the raw material."""

    config: WhiteBoxConfig
    audit: AuditResult
    accountant_epsilon: float
    scores: np.ndarray
    included: np.ndarray

    def to_dict(self) -> dict:
        """JSON-ready summary (scores and coin flips left out)."""
        return {
            "mode": "white-box",
            "config": dataclasses.asdict(self.config),
            "accountant_epsilon": self.accountant_epsilon,
            "epsilon_lower_bound": self.audit.epsilon,
            "method": self.audit.method,
            "claimed_mu": self.config.claimed_mu,
            "mu_lower_bound": self.audit.mu,
            "confidence": 1 - self.audit.p_fail,
            "audit": self.audit.to_dict(),
        }


def canary_signs(canaries: int, steps: int, seed: int) -> np.ndarray:
    """(steps, canaries) of +1/-1: per canary a seeded shuffle of ``steps // 2`` of each sign
    (and one +1 more when ``steps`` is odd)."""
    rng = np.random.default_rng([seed, 1])
    base = np.where(np.arange(steps) < (steps + 1) // 2, 1.0, -1.0)
    return np.stack([rng.permutation(base) for _ in range(canaries)], axis=1)


def _dataset(cfg: WhiteBoxConfig, included: np.ndarray):
    side, m = cfg.side, cfg.canaries
    d_in = side + EXTRA_COLUMNS
    ids = np.flatnonzero(included)
    g = torch.Generator().manual_seed(cfg.seed)
    n = ids.size + cfg.examples
    x = torch.zeros(n, d_in)
    w = torch.zeros(n, side)
    cid = torch.full((n,), -1, dtype=torch.int64)
    canary = torch.from_numpy(ids)
    x[torch.arange(ids.size), canary % side] = 1.0
    w[torch.arange(ids.size), canary // side] = cfg.canary_norm * cfg.max_grad_norm
    cid[: ids.size] = canary
    # Ordinary examples: unit inputs in the extra columns, output weights of norm up to 2 C
    # (about half of them clipped).
    e = cfg.examples
    if e:
        xe = torch.randn(e, EXTRA_COLUMNS, generator=g)
        x[ids.size :, side:] = xe / xe.norm(dim=1, keepdim=True)
        we = torch.randn(e, side, generator=g)
        radius = 2 * cfg.max_grad_norm * torch.rand(e, 1, generator=g)
        w[ids.size :] = we / we.norm(dim=1, keepdim=True) * radius
    assert m <= side * side
    return torch.utils.data.TensorDataset(x, w, cid)


def _private_run(cfg: WhiteBoxConfig, dataset):
    """A fresh model (weights 0), SGD and loader through ``make_private`` for ``dataset``."""
    from rmt_kernels.dp import make_private

    batch = max(1, round(cfg.sample_rate * len(dataset)))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, generator=torch.Generator().manual_seed(cfg.seed + 1)
    )
    # A container around the layer: the engine's model-level hooks and the layer's own hooks
    # then run in their usual order.
    model = nn.Sequential(nn.Linear(cfg.side + EXTRA_COLUMNS, cfg.side, bias=False))
    with torch.no_grad():
        model[0].weight.zero_()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    with warnings.catch_warnings():
        # A public noise seed makes the run reproducible; the scores never use it, so the
        # audit is of the same mechanism as a run with a secret seed.
        warnings.filterwarnings("ignore", message="make_private: seed=", category=UserWarning)
        return make_private(
            model,
            optimizer,
            loader,
            target_delta=cfg.delta,
            max_grad_norm=cfg.max_grad_norm,
            noise_multiplier=cfg.noise_multiplier,
            denoise=cfg.denoise,
            seed=cfg.seed,
            accountant=cfg.accountant,
            loss_reduction="sum",
        )


def _unit(cfg: WhiteBoxConfig, loader) -> float:
    """Units of C / expected batch: an IN canary adds ~1 per step it is sampled."""
    return cfg.max_grad_norm / max(1, round(len(loader.dataset) / len(loader)))


def _forward_backward(cfg: WhiteBoxConfig, model, batch, signs: torch.Tensor, step: int) -> None:
    """The physical batches of logical step ``step`` (canary gradients signed by ``signs``)."""
    x, w, cid = batch
    is_canary = cid >= 0
    # This step's sign of each canary's gradient.
    factor = torch.ones(cid.shape[0])
    factor[is_canary] = signs[step, cid[is_canary]]
    w = w * factor[:, None]
    for xs, ws in zip(
        x.tensor_split(cfg.physical_batches), w.tensor_split(cfg.physical_batches), strict=True
    ):
        if xs.shape[0]:
            (-(model(xs) * ws).sum()).backward()


def _release(cfg: WhiteBoxConfig, model, optimizer) -> torch.Tensor:
    """``optimizer.step()``; the released gradient at each canary's entry (float64)."""
    optimizer.step()
    rows = torch.arange(cfg.canaries) // cfg.side
    cols = torch.arange(cfg.canaries) % cfg.side
    released = model[0].weight.grad[rows, cols].double()
    optimizer.zero_grad()
    return released


def _batches(loader):
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


def _bound(
    cfg: WhiteBoxConfig,
    scores: torch.Tensor,
    included: np.ndarray,
    accountant_epsilon: float,
    strategy: Bonferroni | Split | Fixed | None,
) -> WhiteBoxResult:
    """The audit of ``scores``. Under torch.distributed every rank must hold the same scores
    (the released gradient is the same on every rank; checked: a RuntimeError otherwise); rank
    0 computes the bound and sends it to the others."""
    from rmt_kernels.dp import distributed

    rank, world_size = distributed.world()
    if world_size > 1:
        import torch.distributed as dist

        every = [None] * world_size
        dist.all_gather_object(every, scores.numpy().tobytes())
        if any(b != every[0] for b in every):
            raise RuntimeError(
                "white-box audit: the canary scores differ across ranks (the released "
                "gradient must be the same on every rank)"
            )
    result = None
    if rank == 0:
        result = audit(
            scores.numpy(),
            included,
            p_fail=cfg.p_fail,
            delta=cfg.delta,
            strategy=strategy,
            method=cfg.resolved_method,
        )
    result = distributed.broadcast_object(result)
    return WhiteBoxResult(
        config=cfg,
        audit=result,
        accountant_epsilon=accountant_epsilon,
        scores=scores.numpy(),
        included=included,
    )


def white_box_audit(
    cfg: WhiteBoxConfig,
    *,
    strategy: Bonferroni | Split | Fixed | None = None,
    progress: Callable[[int], None] | None = None,
) -> WhiteBoxResult:
    """Train once with Dirac canaries through ``make_private``, score them, bound epsilon.

    Under torch.distributed (call it on every rank of an initialized default group, e.g. with
    :func:`rmt_kernels.audit.distributed.white_box_audit_distributed`) every rank holds the
    whole dataset and Poisson-samples its shard (``make_private``'s data loader), the engine
    all-reduces the clipped sums and rank 0 alone adds the noise; the scores come from the
    released ``p.grad``, the same on every rank (checked), and rank 0 computes the bound.

    Args:
        cfg: the run (:class:`WhiteBoxConfig`).
        strategy: how the numbers of guesses are chosen (default :class:`Bonferroni`).
        progress: called with 1 after every logical step (e.g. ``tqdm.update``).

    Returns:
        A :class:`WhiteBoxResult`: with probability >= ``1 - p_fail``, if the engine is
        (eps, delta)-DP then ``audit.epsilon <= eps``; so a bound above ``accountant_epsilon``
        is a privacy bug (in the engine or in the accountant's inputs).
    """
    included = draw_inclusion(cfg.canaries, np.random.default_rng([cfg.seed, 0]))
    signs = torch.from_numpy(canary_signs(cfg.canaries, cfg.steps, cfg.seed)).float()
    model, optimizer, loader = _private_run(cfg, _dataset(cfg, included))
    unit = _unit(cfg, loader)
    scores = torch.zeros(cfg.canaries, dtype=torch.float64)
    batches = _batches(loader)
    for step in range(cfg.steps):
        _forward_backward(cfg, model, next(batches), signs, step)
        # The canary's gradient direction is -s_t at its entry.
        scores -= signs[step].double() * _release(cfg, model, optimizer) / unit
        if progress is not None:
            progress(1)
    return _bound(cfg, scores, included, float(optimizer.get_epsilon(cfg.delta)), strategy)
