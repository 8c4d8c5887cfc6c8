"""Canaries' coin flips, and guesses with abstention from their scores.

The auditor flips a fair coin per canary (IN: trained on; OUT: left out), trains, scores every
canary (higher = more likely IN), then guesses IN for the ``k_plus`` highest scores, OUT for the
``k_minus`` lowest, and abstains on the rest. Abstaining is what makes the one-run audit strong:
only the confident extremes are scored against the coin flips.
"""

from __future__ import annotations

import numpy as np

__all__ = ["count_correct", "draw_inclusion", "make_guesses"]


def draw_inclusion(num_canaries: int, seed: int | np.random.Generator | None) -> np.ndarray:
    """Fair coin flips: a bool array, True where canary i is included (IN).

    Args:
        num_canaries: m >= 1.
        seed: an int (reproducible audit), a numpy Generator, or None (OS entropy). The bound's
            guarantee is over these flips: they must not be chosen after seeing the scores.
    """
    if not isinstance(num_canaries, (int, np.integer)) or num_canaries < 1:
        raise ValueError(f"num_canaries must be an int >= 1, got {num_canaries!r}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return rng.integers(0, 2, size=int(num_canaries)).astype(bool)


def _check_scores(scores) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be one-dimensional (one per canary), got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    return s


def make_guesses(scores, k_plus: int, k_minus: int) -> np.ndarray:
    """Guesses in {+1 (IN), -1 (OUT), 0 (abstain)} from scores.

    IN for the ``k_plus`` highest scores, OUT for the ``k_minus`` lowest. Ties are broken by
    canary index, which does not depend on the coin flips, so the guarantee is unaffected.

    Args:
        scores: (m,) finite floats, higher meaning more likely IN.
        k_plus, k_minus: ints >= 0 with ``k_plus + k_minus <= m``.
    """
    s = _check_scores(scores)
    for name, k in (("k_plus", k_plus), ("k_minus", k_minus)):
        if not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"{name} must be an int >= 0, got {k!r}")
    if k_plus + k_minus > s.size:
        raise ValueError(
            f"k_plus + k_minus must be <= the number of canaries ({s.size}), "
            f"got {k_plus} + {k_minus}"
        )
    order = np.argsort(-s, kind="stable")  # highest first; equal scores in index order
    guesses = np.zeros(s.size, dtype=np.int8)
    guesses[order[: int(k_plus)]] = 1
    if k_minus:
        guesses[order[s.size - int(k_minus) :]] = -1
    return guesses


def count_correct(guesses, included) -> tuple[int, int]:
    """``(r, v)``: the number of guesses made and of right ones.

    Args:
        guesses: (m,) in {+1, 0, -1} (:func:`make_guesses`).
        included: (m,) bool coin flips (:func:`draw_inclusion`).
    """
    g = np.asarray(guesses)
    inc = np.asarray(included)
    if g.shape != inc.shape or g.ndim != 1:
        raise ValueError(
            f"guesses and included must be 1-D of one shape, got {g.shape} and {inc.shape}"
        )
    if inc.dtype != bool:
        raise TypeError(f"included must be a bool array, got dtype {inc.dtype}")
    truth = np.where(inc, 1, -1)
    made = g != 0
    return int(made.sum()), int((g[made] == truth[made]).sum())
