"""White-box audit of the native engine: Dirac canaries through ``make_private``.

The audited model (:class:`AuditNet`) has every parameter type the engine's rules handle: a
``Linear`` (weight and bias) read on a sequence of 4 tokens, an ``Embedding`` and a
``LayerNorm`` (weight and bias) read on 2 tokens; the per-example loss is linear in the outputs,
``-(sum of output * w_b)``, so each example's gradient does not depend on the weights. Canary i
owns one entry of one parameter (its "slot"): its gradient is ``G s_t`` (``G = canary_norm *
C``, default 100 C) times a unit "Dirac" vector at that entry and exactly zero elsewhere, so
clipping makes it ``C s_t`` in that direction:

- Linear weight (r, c): token 0 has input e_c and output weight G e_r; token 1 input 0 and
  output weight -G e_r, which cancels the bias gradient exactly.
- Release-guard canaries (every 16th Linear weight slot): two more tokens with inputs
  ``2^10 e_j`` (a junk column j) and output weights +-G e_r, whose terms cancel exactly, so the
  gradient is the same Dirac, but its float32 terms are 2049 times its norm: the engine's
  rounding guard (rmt_kernels/rounding.py) takes it out of the fused float32 pass and sums it
  apart in float64. The audit so covers that path too.
- Linear bias r: input 0, output weight G e_r.
- Embedding (r, c): id r, output weight G e_c.
- LayerNorm bias k: input e_p - e_q (p, q outside the canary block: the normalised entry k is
  exactly 0, so no weight gradient), output weight G e_k.
- LayerNorm weight k: inputs e_k - e_q and its negation on the 2 tokens, output weights
  +-(G / 2 xhat_k) e_k: the bias gradients cancel, the weight gradient is G at k.

The ordinary examples touch only entries outside the canary blocks (their own rows, columns,
ids and dimensions); they still share every step (clipping, sampling, noise, the optimizer see a
mixed batch).

Each canary is in the training set with probability 1/2 (the coin flips of
:func:`rmt_kernels.audit.draw_inclusion`). Training goes through the public API only:
``make_private`` (Poisson sampling, fused noise, optional accumulation and denoising) and
``optimizer.step()``; after each step the released gradient ``p.grad`` (what the optimizer
consumes) is read at every canary's entry. A canary's step-t score is the projection of the
release on its direction at step t, in units of ``C / expected batch``: an IN canary adds about
1 per step it is sampled, exactly 0 when OUT, and the noise adds ``noise_multiplier`` of spread.

Scores (every one a fixed function of the released gradients, so each gives a valid bound):

- ``sum``: the sum over steps (the strongest score for a bug spread over the run). Each
  canary's signs ``s_t`` are a seeded, balanced sequence: against independent noise they change
  nothing, but noise repeated across steps cancels from every canary's sum exactly.
- ``step t``: the step-t score alone, for each t. A bug in some steps only (noise missing on
  every other step) is averaged away by the sum (the noisy steps hide it) but not here.
- ``pair``: canaries at the same flat index of two parameters (Linear weight (r, c) and
  Embedding (r, c); Linear bias k and LayerNorm bias k) share their signs, and each one's score
  is the sum over steps of its release minus its partner's. Independent noise makes this
  noisier (variance doubled); noise shared by the parameters (one stream for all: the same
  Philox counters) cancels exactly, leaving the two canaries' contributions.

Each score gives a bound (``audit`` of :mod:`rmt_kernels.audit.strategy`) at its share of
``p_fail`` (:data:`P_FAIL_SHARES`); by the union bound all hold together with probability >=
1 - p_fail, so their maximum is the run's bound.

The sensitivity check. A bound needs many right guesses: one unclipped example (say the first
row of every batch) gives one canary a huge score and one right guess, which proves nothing
about epsilon. So the scores are also checked against the mechanism the accountant assumes: a
canary's step score is its clipped contribution, in [0, 1], plus Gaussian noise of std
``noise_multiplier``; a step score above ``1 + z sigma`` or below ``-z sigma`` (z set by the
check's share of ``p_fail`` over the m T step scores; the same for the sums, in [0, T] with noise
``sigma sqrt(T)``) contradicts it: some example moved the release by more than clipping allows.
The check needs the release's exact law, so it runs only without post-processing
(``denoise=None``: a denoised release is not Gaussian around the clipped sum).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable

import numpy as np
import torch
from scipy import special
from torch import nn

from rmt_kernels.audit.guesses import draw_inclusion
from rmt_kernels.audit.strategy import METHODS, AuditResult, Bonferroni, Fixed, Split, audit

__all__ = [
    "P_FAIL_SHARES",
    "AuditNet",
    "SensitivityCheck",
    "WhiteBoxConfig",
    "WhiteBoxResult",
    "canary_signs",
    "white_box_audit",
]

# Entries of each parameter outside the canary blocks, for the ordinary examples.
EXTRA_COLUMNS = 8
# Tokens of the Linear's input (0: the canary's own term, 1: the bias cancellation, 2-3: the
# release-guard canaries' cancelling junk terms) and of the LayerNorm's.
LINEAR_TOKENS = 4
NORM_TOKENS = 2
# Every GUARD_EVERY-th Linear weight slot is a release-guard canary; its junk terms have size
# 2^10 times the canary's (float32 terms / norm = 2049 > the guard's limit of 256).
GUARD_EVERY = 16
GUARD_SIZE = 2.0**10
# Shares of p_fail: the summed score, all per-step scores together (each step 1 / (8 steps)),
# the pair score, and the sensitivity check (half for the step scores, half for the sums). The
# summed score keeps most of it: it carries the bound against bugs spread over the run (noise
# halved), where a smaller level costs tightness; the others target gross bugs that give
# all-right guesses or scores hundreds of standard deviations out, where a level 16 times
# smaller costs little (the f-DP bound of 2048 right guesses falls by about 3%).
P_FAIL_SHARES = {"sum": 3 / 4, "steps": 1 / 8, "pair": 1 / 16, "sensitivity": 1 / 16}

# Slot kinds: the parameter each canary's entry is in.
_W, _E, _B = "linear.weight", "embedding.weight", "linear.bias"
_NB, _NW = "norm.bias", "norm.weight"


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


@dataclasses.dataclass(frozen=True)
class SensitivityCheck:
    """The scores checked against clipping plus the claimed Gaussian noise (module docstring).

    Attributes:
        step_excess: the largest ``max(score - 1, -score) / sigma`` over canaries and steps.
        step_threshold: z with ``2 m T Phi(-z)`` = half the check's ``p_fail``.
        sum_excess: the largest ``max(sum - T, -sum) / (sigma sqrt(T))`` over canaries.
        sum_threshold: z with ``2 m Phi(-z)`` = the other half.
        canary, step: where the largest step excess is.
        p_fail: the check's share of the audit's p_fail: an honest run flags with at most this
            probability.
    """

    step_excess: float
    step_threshold: float
    sum_excess: float
    sum_threshold: float
    canary: int
    step: int
    p_fail: float

    @property
    def flagged(self) -> bool:
        """Whether a score lies outside what clipping and the claimed noise allow."""
        return self.step_excess > self.step_threshold or self.sum_excess > self.sum_threshold

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "flagged": self.flagged}


@dataclasses.dataclass
class WhiteBoxResult:
    """An audit of one run: the bound, the accountant's epsilon, and the raw material.

    Attributes:
        config: the run.
        audit: the best score's bound (the largest epsilon; ``family`` names the score).
        accountant_epsilon: the accountant's epsilon at ``config.delta``.
        scores: (m,) the summed scores.
        included: (m,) the coin flips.
        family: the score that gave ``audit``: "sum", "step t" or "pair".
        families: every score's bound, by name.
        step_scores: (steps, m) the per-step scores (None for a resume audit).
        sensitivity: the sensitivity check, or None where it does not apply.
    """

    config: WhiteBoxConfig
    audit: AuditResult
    accountant_epsilon: float
    scores: np.ndarray
    included: np.ndarray
    family: str = "sum"
    families: dict[str, AuditResult] = dataclasses.field(default_factory=dict)
    step_scores: np.ndarray | None = None
    sensitivity: SensitivityCheck | None = None

    @property
    def bug(self) -> bool:
        """A bound above the accountant's epsilon, or a score that clipping cannot explain."""
        flagged = self.sensitivity is not None and self.sensitivity.flagged
        return self.audit.epsilon > self.accountant_epsilon or flagged

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
            "confidence": 1 - self.config.p_fail,
            "family": self.family,
            "audit": self.audit.to_dict(),
            "families": {k: v.epsilon for k, v in self.families.items()},
            "sensitivity": None if self.sensitivity is None else self.sensitivity.to_dict(),
            "bug": self.bug,
        }


def canary_signs(canaries: int, steps: int, seed: int) -> np.ndarray:
    """(steps, canaries) of +1/-1: per canary a seeded shuffle of ``steps // 2`` of each sign
    (and one +1 more when ``steps`` is odd)."""
    rng = np.random.default_rng([seed, 1])
    base = np.where(np.arange(steps) < (steps + 1) // 2, 1.0, -1.0)
    return np.stack([rng.permutation(base) for _ in range(canaries)], axis=1)


class AuditNet(nn.Module):
    """The audited model: a Linear on (B, 4, d_in), an Embedding on (B,) ids and a LayerNorm on
    (B, 2, d); returns the three outputs (the loss is linear in them)."""

    def __init__(self, side: int) -> None:
        super().__init__()
        rows = side + EXTRA_COLUMNS
        d_in = rows + 1  # the last column is the release-guard canaries' junk column
        self.linear = nn.Linear(d_in, rows)
        self.embedding = nn.Embedding(rows, d_in)
        self.norm = nn.LayerNorm(rows)
        with torch.no_grad():
            for p in self.parameters():
                p.zero_()

    def forward(self, x: torch.Tensor, ids: torch.Tensor, z: torch.Tensor):
        return self.linear(x), self.embedding(ids), self.norm(z)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where each canary lives: its parameter, row and column (column -1 for a 1-D one)."""

    kind: list[str]
    row: np.ndarray
    col: np.ndarray
    guard: np.ndarray  # bool: a release-guard canary
    partner: np.ndarray  # the canary at the same flat index of another parameter, or -1


def _layout(cfg: WhiteBoxConfig) -> _Layout:
    """Slots in a fixed order: the s x s block pairs (Linear weight (r, c), Embedding (r, c))
    and the 1-D triples (Linear bias k, LayerNorm bias k, LayerNorm weight k), interleaved
    evenly so that any prefix mixes every kind; canary i takes slot i."""
    s = cfg.side
    block = [(kind, r, c) for r in range(s) for c in range(s) for kind in (_W, _E)]
    line = [(kind, k, -1) for k in range(s) for kind in (_B, _NB, _NW)]
    keyed = [((q + 0.5) / len(block), 0, slot) for q, slot in enumerate(block)]
    keyed += [((q + 0.5) / len(line), 1, slot) for q, slot in enumerate(line)]
    slots = [slot for _, _, slot in sorted(keyed, key=lambda k: (k[0], k[1]))][: cfg.canaries]
    kind = [k for k, _, _ in slots]
    row = np.array([r for _, r, _ in slots])
    col = np.array([c for _, _, c in slots])
    guard = np.array(
        [k == _W and (r * s + c) % GUARD_EVERY == GUARD_EVERY // 2 for k, r, c in slots]
    )
    where = {slot: i for i, slot in enumerate(slots)}
    mate = {_W: _E, _E: _W, _B: _NB, _NB: _B}
    partner = np.array([where.get((mate[k], r, c), -1) if k in mate else -1 for k, r, c in slots])
    return _Layout(kind, row, col, guard, partner)


def _dataset(cfg: WhiteBoxConfig, included: np.ndarray):
    """The training set: the included canaries (module docstring), then the ordinary examples.
    Tensors: x (n, 4, d_in), ids (n,), z (n, 2, d), the loss's output weights of the three
    outputs, and the canary id (-1 for an ordinary example)."""
    s, lay = cfg.side, _layout(cfg)
    rows = s + EXTRA_COLUMNS
    d_in = rows + 1
    ids_in = np.flatnonzero(included)
    n = ids_in.size + cfg.examples
    x = torch.zeros(n, LINEAR_TOKENS, d_in, dtype=torch.float64)
    wl = torch.zeros(n, LINEAR_TOKENS, rows, dtype=torch.float64)
    ids = torch.zeros(n, dtype=torch.int64)
    we = torch.zeros(n, d_in, dtype=torch.float64)
    z = torch.zeros(n, NORM_TOKENS, rows, dtype=torch.float64)
    wn = torch.zeros(n, NORM_TOKENS, rows, dtype=torch.float64)
    cid = torch.full((n,), -1, dtype=torch.int64)
    g = cfg.canary_norm * cfg.max_grad_norm
    # Outside the canary block: p, q for the LayerNorm inputs, the guard's junk column.
    p, q, junk = s, s + 1, d_in - 1
    # xhat_k of the LayerNorm weight canaries' input e_k - e_q (mean 0, variance 2 / d).
    xhat = 1.0 / math.sqrt(2.0 / rows + 1e-5)
    for b, i in enumerate(ids_in):
        kind, r, c = lay.kind[i], int(lay.row[i]), int(lay.col[i])
        cid[b] = int(i)
        if kind == _W:
            x[b, 0, c] = 1.0
            wl[b, 0, r], wl[b, 1, r] = g, -g
            if lay.guard[i]:
                x[b, 2, junk] = x[b, 3, junk] = GUARD_SIZE
                wl[b, 2, r], wl[b, 3, r] = g, -g
        elif kind == _B:
            wl[b, 0, r] = g
        elif kind == _E:
            ids[b] = r
            we[b, c] = g
        elif kind == _NB:
            z[b, 0, p], z[b, 0, q] = 1.0, -1.0
            wn[b, 0, r] = g
        else:  # _NW
            z[b, 0, r], z[b, 0, q] = 1.0, -1.0
            z[b, 1] = -z[b, 0]
            wn[b, 0, r], wn[b, 1, r] = g / (2 * xhat), -g / (2 * xhat)
    # Ordinary examples: entries outside the canary blocks only (the extra rows, columns, ids
    # and dimensions), output weights of norm up to 2 C per output (about half are clipped).
    e = cfg.examples
    if e:
        gen = torch.Generator().manual_seed(cfg.seed)
        o = slice(ids_in.size, n)

        def ball(*shape):
            v = torch.randn(*shape, generator=gen, dtype=torch.float64)
            radius = 2 * cfg.max_grad_norm * torch.rand(shape[0], 1, generator=gen)
            return v / v.norm(dim=-1, keepdim=True) * radius.double()

        x[o, 0, s : s + EXTRA_COLUMNS] = ball(e, EXTRA_COLUMNS) / (2 * cfg.max_grad_norm)
        wl[o, 0, s:] = ball(e, EXTRA_COLUMNS)
        ids[o] = s + torch.randint(0, EXTRA_COLUMNS, (e,), generator=gen)
        we[o] = ball(e, d_in)
        z[o] = torch.randn(e, NORM_TOKENS, rows, generator=gen, dtype=torch.float64)
        wn[o, 0, s:] = ball(e, EXTRA_COLUMNS)
    f = torch.float32
    return torch.utils.data.TensorDataset(x.to(f), ids, z.to(f), wl.to(f), we.to(f), wn.to(f), cid)


def _private_run(cfg: WhiteBoxConfig, dataset):
    """A fresh model (weights 0), SGD and loader through ``make_private`` for ``dataset``."""
    from rmt_kernels.dp import make_private

    batch = max(1, round(cfg.sample_rate * len(dataset)))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, generator=torch.Generator().manual_seed(cfg.seed + 1)
    )
    model = AuditNet(cfg.side)
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
            verify_layout=False,
        )


def _unit(cfg: WhiteBoxConfig, loader) -> float:
    """Units of C / expected batch: an IN canary adds ~1 per step it is sampled."""
    return cfg.max_grad_norm / max(1, round(len(loader.dataset) / len(loader)))


def _forward_backward(cfg: WhiteBoxConfig, model, batch, signs: torch.Tensor, step: int) -> None:
    """The physical batches of logical step ``step`` (canary gradients signed by ``signs``)."""
    x, ids, z, wl, we, wn, cid = batch
    is_canary = cid >= 0
    # This step's sign of each canary's gradient.
    factor = torch.ones(cid.shape[0])
    factor[is_canary] = signs[step, cid[is_canary]]
    f3 = factor[:, None, None]
    parts = (x, ids, z, wl * f3, we * factor[:, None], wn * f3)
    for xs, ids_s, zs, wls, wes, wns in zip(
        *(t.tensor_split(cfg.physical_batches) for t in parts), strict=True
    ):
        if xs.shape[0]:
            lin, emb, norm = model(xs, ids_s, zs)
            (-((lin * wls).sum() + (emb * wes).sum() + (norm * wns).sum())).backward()


def _release(cfg: WhiteBoxConfig, model, optimizer) -> torch.Tensor:
    """``optimizer.step()``; the released gradient at each canary's entry (float64)."""
    optimizer.step()
    lay = _layout(cfg)
    grads = {name: p.grad for name, p in model.named_parameters()}
    released = torch.zeros(cfg.canaries, dtype=torch.float64)
    kinds = np.array(lay.kind)
    for kind in (_W, _E, _B, _NB, _NW):
        sel = np.flatnonzero(kinds == kind)
        if sel.size == 0:
            continue
        r = torch.from_numpy(lay.row[sel])
        if kind in (_W, _E):
            value = grads[kind][r, torch.from_numpy(lay.col[sel])]
        else:
            value = grads[kind][r]
        released[torch.from_numpy(sel)] = value.double()
    optimizer.zero_grad()
    return released


def _batches(loader):
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


def _sensitivity(cfg: WhiteBoxConfig, step_scores: torch.Tensor, p_fail: float):
    """The sensitivity check of (steps, m) step scores (module docstring)."""
    steps, m = step_scores.shape
    sigma = cfg.noise_multiplier
    per_step = torch.maximum(step_scores - 1, -step_scores) / sigma
    summed = step_scores.sum(0)
    per_sum = torch.maximum(summed - steps, -summed) / (sigma * math.sqrt(steps))
    # P[|N(0, 1)| > z] = 2 Phi(-z) per score; union bound over the scores of each half.
    z_step = float(-special.ndtri(p_fail / 2 / (2 * m * steps)))
    z_sum = float(-special.ndtri(p_fail / 2 / (2 * m)))
    where = int(per_step.argmax())
    return SensitivityCheck(
        step_excess=float(per_step.max()),
        step_threshold=z_step,
        sum_excess=float(per_sum.max()),
        sum_threshold=z_sum,
        canary=where % m,
        step=where // m,
        p_fail=p_fail,
    )


def _families(cfg: WhiteBoxConfig, step_scores: torch.Tensor, signs: torch.Tensor):
    """The scores of the module docstring: {name: (canary indices, scores, share of p_fail)}."""
    steps = step_scores.shape[0]
    everyone = np.arange(cfg.canaries)
    out = {"sum": (everyone, step_scores.sum(0).numpy(), P_FAIL_SHARES["sum"])}
    if steps > 1:
        for t in range(steps):
            share = P_FAIL_SHARES["steps"] / steps
            out[f"step {t}"] = (everyone, step_scores[t].numpy(), share)
    partner = _layout(cfg).partner
    paired = np.flatnonzero(partner >= 0)
    if paired.size >= 2:
        # Release minus partner's release, signed by the shared signs: the step scores are
        # signs * release, so the partner's step score enters as is.
        j = torch.from_numpy(partner[paired])
        i = torch.from_numpy(paired)
        pair = (step_scores[:, i] - step_scores[:, j]).sum(0)
        out["pair"] = (paired, pair.numpy(), P_FAIL_SHARES["pair"])
    return out


def _bound(
    cfg: WhiteBoxConfig,
    families: dict[str, tuple[np.ndarray, np.ndarray, float]],
    included: np.ndarray,
    accountant_epsilon: float,
    strategy: Bonferroni | Split | Fixed | None,
    step_scores: torch.Tensor | None = None,
    sensitivity_share: float = 0.0,
) -> WhiteBoxResult:
    """The audit of each score family ``{name: (canaries, scores, share of p_fail)}`` (the
    first is reported as ``scores``) and, with ``step_scores`` and a share, the sensitivity
    check. Under torch.distributed every rank must hold the same scores (the released gradient
    is the same on every rank; checked: a RuntimeError otherwise); rank 0 computes the bounds
    and sends them to the others."""
    from rmt_kernels.dp import distributed

    first = next(iter(families.values()))[1]
    rank, world_size = distributed.world()
    if world_size > 1:
        import torch.distributed as dist

        mine = first if step_scores is None else step_scores.numpy()
        every = [None] * world_size
        dist.all_gather_object(every, mine.tobytes())
        if any(b != every[0] for b in every):
            raise RuntimeError(
                "white-box audit: the canary scores differ across ranks (the released "
                "gradient must be the same on every rank)"
            )
    result = None
    if rank == 0:
        results = {
            name: audit(
                scores,
                included[which],
                p_fail=cfg.p_fail * share,
                delta=cfg.delta,
                strategy=strategy,
                method=cfg.resolved_method,
            )
            for name, (which, scores, share) in families.items()
        }
        check = None
        if step_scores is not None and sensitivity_share > 0:
            check = _sensitivity(cfg, step_scores, cfg.p_fail * sensitivity_share)
        result = results, check
    results, check = distributed.broadcast_object(result)
    best = max(results, key=lambda k: results[k].epsilon)
    return WhiteBoxResult(
        config=cfg,
        audit=results[best],
        accountant_epsilon=accountant_epsilon,
        scores=first,
        included=included,
        family=best,
        families=results,
        step_scores=None if step_scores is None else step_scores.numpy(),
        sensitivity=check,
    )


def _signs(cfg: WhiteBoxConfig) -> torch.Tensor:
    """(steps, m) signs; a pair's second canary takes its partner's (module docstring)."""
    signs = canary_signs(cfg.canaries, cfg.steps, cfg.seed)
    partner = _layout(cfg).partner
    second = np.flatnonzero(partner > np.arange(cfg.canaries))
    signs[:, partner[second]] = signs[:, second]
    return torch.from_numpy(signs).float()


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
        (eps, delta)-DP then ``audit.epsilon <= eps`` (the best of the score families, each at
        its share of ``p_fail``), and if the engine is the claimed mechanism (clipping to C,
        Gaussian noise of the claimed std, no post-processing) the sensitivity check does not
        flag; so ``bug`` (a bound above ``accountant_epsilon`` or a flag) is a privacy bug (in
        the engine or in the accountant's inputs).
    """
    included = draw_inclusion(cfg.canaries, np.random.default_rng([cfg.seed, 0]))
    signs = _signs(cfg)
    model, optimizer, loader = _private_run(cfg, _dataset(cfg, included))
    unit = _unit(cfg, loader)
    step_scores = torch.zeros(cfg.steps, cfg.canaries, dtype=torch.float64)
    batches = _batches(loader)
    for step in range(cfg.steps):
        _forward_backward(cfg, model, next(batches), signs, step)
        # The canary's gradient direction is -s_t at its entry.
        step_scores[step] = -signs[step].double() * _release(cfg, model, optimizer) / unit
        if progress is not None:
            progress(1)
    # The sensitivity check needs the release's exact law: no post-processing.
    share = P_FAIL_SHARES["sensitivity"] if cfg.denoise is None else 0.0
    return _bound(
        cfg,
        _families(cfg, step_scores, signs),
        included,
        float(optimizer.get_epsilon(cfg.delta)),
        strategy,
        step_scores=step_scores,
        sensitivity_share=share,
    )
