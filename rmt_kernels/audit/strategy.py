"""From scores and coin flips to a valid epsilon lower bound: choosing how many to guess.

The best numbers of guesses (``k_plus`` IN, ``k_minus`` OUT) depend on the scores, and trying
several then keeping the best bound would void the guarantee (the maximum of many bounds, each
wrong with probability ``p_fail``, is wrong more often). Two corrections, after jax_privacy's
``auditing.py`` (Bonferroni / Split):

- :class:`Bonferroni`: try a fixed list of ``H`` choices, each at level ``p_fail / H``; by the
  union bound, all ``H`` bounds hold together with probability >= 1 - p_fail, so their maximum
  does. The list is fixed before the scores are seen (the default is about ``3 log2 m`` choices,
  so ``log(1 / p_fail)`` grows by ``log(3 log2 m)``).
- :class:`Split`: a seeded split of the canaries (independent of the coin flips) into a part that
  chooses score thresholds and a part that is audited with them at level ``p_fail``. Given the
  first part's coin flips and scores, the second part is a one-run audit of its own canaries (the
  first part's canaries are then just fixed data), so the theorem applies with ``m`` = its size.
- :class:`Fixed`: one choice made in advance (no correction).

Two bounds (``method``): ``"steinke"``, the (eps, delta) bound of :mod:`rmt_kernels.audit.bound`
(sound for any mechanism), and ``"fdp"``, the f-DP bound of :mod:`rmt_kernels.audit.fdp` for a
Gaussian claim (a bound on mu-GDP, reported with its epsilon at delta; far tighter for Gaussian
noise, and sound when the claimed mechanism is a Gaussian one, e.g. DP-SGD at sample rate 1).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import numpy as np

from rmt_kernels.audit.bound import _check_p_fail, epsilon_lower_bound
from rmt_kernels.audit.fdp import gdp_mu_lower_bound
from rmt_kernels.audit.gaussian import gaussian_epsilon
from rmt_kernels.audit.guesses import _check_scores

__all__ = ["METHODS", "AuditResult", "Bonferroni", "Fixed", "Split", "audit", "default_choices"]

METHODS = ("steinke", "fdp")


def default_choices(num_canaries: int) -> list[tuple[int, int]]:
    """``(k_plus, k_minus)`` pairs tried by default: ``(k, 0)`` (IN guesses only), ``(0, k)``
    (OUT only: a score whose low end is surer than its high end, such as a loss) and ``(k, k)``,
    for k = 1, 2, 4, ... up to ``m // 2``, and ``m // 2`` itself."""
    if num_canaries < 1:
        raise ValueError(f"num_canaries must be >= 1, got {num_canaries}")
    half = num_canaries // 2
    ks = sorted({*(1 << j for j in range(max(half, 1).bit_length()) if 1 << j <= half), half})
    ks = [k for k in ks if k >= 1] or [1]
    pairs = [(k, 0) for k in ks] + [(0, k) for k in ks]
    pairs += [(k, k) for k in ks if 2 * k <= num_canaries]
    return list(dict.fromkeys(pairs))


@dataclasses.dataclass(frozen=True)
class Bonferroni:
    """Try every ``(k_plus, k_minus)`` in ``choices`` (default :func:`default_choices`), each at
    ``p_fail / len(choices)``, and keep the best bound."""

    choices: Sequence[tuple[int, int]] | None = None


@dataclasses.dataclass(frozen=True)
class Split:
    """Choose thresholds on a ``fraction`` of the canaries (a permutation seeded by ``seed``,
    independent of the coin flips), audit the rest with them at ``p_fail``."""

    fraction: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.fraction, (int, float)) and 0 < self.fraction < 1):
            raise ValueError(f"Split: fraction must be in (0, 1), got {self.fraction!r}")


@dataclasses.dataclass(frozen=True)
class Fixed:
    """Guess IN for the ``k_plus`` highest scores and OUT for the ``k_minus`` lowest."""

    k_plus: int
    k_minus: int = 0


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """An epsilon lower bound and what it rests on.

    Attributes:
        epsilon: the lower bound: with probability >= ``1 - p_fail`` the audited run is not
            (eps, ``delta``)-DP for any eps below it.
        p_fail, delta: the confidence (``1 - p_fail``) and the delta of the claim tested.
        canaries: m, the canaries the bound counts (the audited part under :class:`Split`).
        guesses, correct: r and v of the chosen guesses.
        k_plus, k_minus: the chosen numbers of IN and OUT guesses.
        hypotheses: how many choices shared ``p_fail`` (Bonferroni), else 1.
        strategy: "bonferroni", "split" or "fixed".
        method: "steinke" or "fdp" (see the module docstring).
        mu: under "fdp", the mu-GDP lower bound (``epsilon`` is the Gaussian mechanism's
            epsilon at ``delta`` of this mu); None under "steinke".
    """

    epsilon: float
    p_fail: float
    delta: float
    canaries: int
    guesses: int
    correct: int
    k_plus: int
    k_minus: int
    hypotheses: int
    strategy: str
    method: str = "steinke"
    mu: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def _counts(scores: np.ndarray, included: np.ndarray, choices: np.ndarray):
    """``(r, v)`` of every ``(k_plus, k_minus)`` row of ``choices``, from one sort."""
    order = np.argsort(-scores, kind="stable")
    inc_sorted = included[order]
    # right IN guesses among the top k, right OUT guesses among the bottom k
    top_in = np.concatenate(([0], np.cumsum(inc_sorted)))
    bottom_out = np.concatenate(([0], np.cumsum(~inc_sorted[::-1])))
    kp, km = choices[:, 0], choices[:, 1]
    return kp + km, top_in[kp] + bottom_out[km]


def _check_choices(choices, m: int) -> np.ndarray:
    c = np.asarray(list(choices), dtype=np.int64).reshape(-1, 2)
    if c.shape[0] == 0:
        raise ValueError("choices must hold at least one (k_plus, k_minus) pair")
    if np.any(c < 0) or np.any(c.sum(axis=1) > m) or np.any(c.sum(axis=1) == 0):
        raise ValueError(
            f"choices: each (k_plus, k_minus) needs k >= 0 and 1 <= k_plus + k_minus <= {m}, "
            f"got {c.tolist()}"
        )
    return c


def _bounds(method: str, m: int, r, v, p_fail: float, delta: float):
    """``(eps, mu)`` of each ``(r, v)``: mu is None under "steinke"."""
    if method == "steinke":
        return epsilon_lower_bound(m, r, v, p_fail=p_fail, delta=delta), None
    mu = np.atleast_1d(gdp_mu_lower_bound(m, r, v, p_fail=p_fail))
    return mu, mu  # ranked by mu (epsilon at delta is increasing in mu)


def _to_eps(method: str, bound: float, delta: float) -> tuple[float, float | None]:
    if method == "steinke":
        return bound, None
    return (gaussian_epsilon(bound, delta) if bound > 0 else 0.0), bound


def _best(scores, included, choices, p_fail, delta, method="steinke"):
    r, v = _counts(scores, included, choices)
    bounds, _ = _bounds(method, scores.size, r, v, p_fail, delta)
    i = int(np.argmax(bounds))
    eps, mu = _to_eps(method, float(bounds[i]), delta)
    return eps, int(r[i]), int(v[i]), int(choices[i, 0]), int(choices[i, 1]), mu


def audit(
    scores,
    included,
    *,
    p_fail: float = 0.05,
    delta: float = 0.0,
    strategy: Bonferroni | Split | Fixed | None = None,
    method: str = "steinke",
) -> AuditResult:
    """The one-run epsilon lower bound from canary scores and their coin flips.

    Args:
        scores: (m,) finite floats, higher meaning "more likely IN", computed without looking at
            the coin flips.
        included: (m,) bool coin flips (:func:`rmt_kernels.audit.draw_inclusion`).
        p_fail: the probability allowed for the bound to be wrong, in (0, 1).
        delta: the delta of the (eps, delta) claim tested, in [0, 1); keep ``m * delta`` small
            (the p-value has a ``2 m delta`` term).
        strategy: :class:`Bonferroni` (default), :class:`Split` or :class:`Fixed`.
        method: "steinke" (the (eps, delta) bound, any mechanism) or "fdp" (the f-DP bound on
            mu-GDP, for a Gaussian claim; needs ``delta > 0`` for its epsilon).

    Returns:
        An :class:`AuditResult`.
    """
    s = _check_scores(scores)
    inc = np.asarray(included)
    if inc.dtype != bool or inc.shape != s.shape:
        raise ValueError(
            f"included must be a bool array of the scores' shape {s.shape}, "
            f"got {inc.dtype} {inc.shape}"
        )
    _check_p_fail(p_fail)
    if not (isinstance(delta, (int, float)) and 0 <= delta < 1):
        raise ValueError(f"delta must be a number in [0, 1), got {delta!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "fdp" and delta <= 0:
        raise ValueError(
            f"delta must be > 0 with method 'fdp' (mu-GDP has no epsilon at 0), got {delta}"
        )
    strategy = Bonferroni() if strategy is None else strategy
    m = s.size
    if isinstance(strategy, Fixed):
        choices = _check_choices([(strategy.k_plus, strategy.k_minus)], m)
        eps, r, v, kp, km, mu = _best(s, inc, choices, p_fail, delta, method)
        return AuditResult(eps, p_fail, delta, m, r, v, kp, km, 1, "fixed", method, mu)
    if isinstance(strategy, Bonferroni):
        raw = default_choices(m) if strategy.choices is None else strategy.choices
        choices = _check_choices(raw, m)
        h = choices.shape[0]
        eps, r, v, kp, km, mu = _best(s, inc, choices, p_fail / h, delta, method)
        return AuditResult(eps, p_fail, delta, m, r, v, kp, km, h, "bonferroni", method, mu)
    if isinstance(strategy, Split):
        perm = np.random.default_rng(strategy.seed).permutation(m)
        n_a = round(strategy.fraction * m)
        if n_a < 2 or m - n_a < 1:
            raise ValueError(f"Split: {m} canaries are too few to split at {strategy.fraction}")
        a, b = perm[:n_a], perm[n_a:]
        _, _, _, kp, km, _ = _best(
            s[a], inc[a], _check_choices(default_choices(n_a), n_a), p_fail, delta, method
        )
        # Carry the chosen counts over as score thresholds, which apply to any part.
        ranked = np.sort(s[a])[::-1]
        guess_in = s[b] >= ranked[kp - 1] if kp else np.zeros(b.size, bool)
        guess_out = (s[b] <= ranked[n_a - km]) & ~guess_in if km else np.zeros(b.size, bool)
        truth = inc[b]
        r = int(guess_in.sum() + guess_out.sum())
        v = int((guess_in & truth).sum() + (guess_out & ~truth).sum())
        bound, _ = _bounds(method, b.size, np.int64(r), np.int64(v), p_fail, delta)
        eps, mu = _to_eps(method, float(np.ravel(bound)[0]), delta)
        return AuditResult(
            eps,
            p_fail,
            delta,
            int(b.size),
            r,
            v,
            int(guess_in.sum()),
            int(guess_out.sum()),
            1,
            "split",
            method,
            mu,
        )
    raise TypeError(f"strategy must be Bonferroni, Split or Fixed, got {strategy!r}")
