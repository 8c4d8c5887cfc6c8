"""The canaries of the white-box audit: the audited model, where each canary lives, the training
set that plants them, and their per-step signs.

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
  rounding guard (rmt_kernels/rules/release_guard.py) takes it out of the fused float32 pass and
  sums it apart in float64. The audit so covers that path too.
- Linear bias r: input 0, output weight G e_r.
- Embedding (r, c): id r, output weight G e_c.
- LayerNorm bias k: input e_p - e_q (p, q outside the canary block: the normalised entry k is
  exactly 0, so no weight gradient), output weight G e_k.
- LayerNorm weight k: inputs e_k - e_q and its negation on the 2 tokens, output weights
  +-(G / 2 xhat_k) e_k: the bias gradients cancel, the weight gradient is G at k.

The ordinary examples touch only entries outside the canary blocks (their own rows, columns,
ids and dimensions); they still share every step (clipping, sampling, noise, the optimizer see a
mixed batch).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from torch import nn

from rmt_kernels.audit.whitebox_config import WhiteBoxConfig

__all__ = [
    "AuditNet",
    "CanaryLayout",
    "canary_dataset",
    "canary_layout",
    "canary_signs",
    "paired_canary_signs",
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
# Slot kinds: the parameter each canary's entry is in.
_W, _E, _B = "linear.weight", "embedding.weight", "linear.bias"
_NB, _NW = "norm.bias", "norm.weight"


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
class CanaryLayout:
    """Where each canary lives: its parameter, row and column (column -1 for a 1-D one)."""

    kind: list[str]
    row: np.ndarray
    col: np.ndarray
    guard: np.ndarray  # bool: a release-guard canary
    partner: np.ndarray  # the canary at the same flat index of another parameter, or -1

    def entries(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """(m,) float64: each canary's entry of ``tensors`` (by parameter name, e.g. the
        released gradients of :class:`AuditNet`)."""
        values = torch.zeros(len(self.kind), dtype=torch.float64)
        kinds = np.array(self.kind)
        for kind in (_W, _E, _B, _NB, _NW):
            sel = np.flatnonzero(kinds == kind)
            if sel.size == 0:
                continue
            r = torch.from_numpy(self.row[sel])
            if kind in (_W, _E):
                value = tensors[kind][r, torch.from_numpy(self.col[sel])]
            else:
                value = tensors[kind][r]
            values[torch.from_numpy(sel)] = value.double()
        return values


def canary_layout(cfg: WhiteBoxConfig) -> CanaryLayout:
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
    return CanaryLayout(kind, row, col, guard, partner)


def canary_dataset(cfg: WhiteBoxConfig, included: np.ndarray) -> torch.utils.data.TensorDataset:
    """The training set: the included canaries (module docstring), then the ordinary examples.
    Tensors: x (n, 4, d_in), ids (n,), z (n, 2, d), the loss's output weights of the three
    outputs, and the canary id (-1 for an ordinary example)."""
    s, lay = cfg.side, canary_layout(cfg)
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


def paired_canary_signs(cfg: WhiteBoxConfig) -> torch.Tensor:
    """(steps, m) signs; a pair's second canary takes its partner's (the pair score of
    rmt_kernels.audit.whitebox_scores)."""
    signs = canary_signs(cfg.canaries, cfg.steps, cfg.seed)
    partner = canary_layout(cfg).partner
    second = np.flatnonzero(partner > np.arange(cfg.canaries))
    signs[:, partner[second]] = signs[:, second]
    return torch.from_numpy(signs).float()
