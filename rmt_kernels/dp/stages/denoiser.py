"""The Denoiser: singular-value shrinkage of the released 2-D gradients, a stage of the chain
shared by the native engine and the Opacus drop-in, and the native engine's default choice of
what it shrinks (:func:`denoise_linear_weights`).

Shrinkage is :func:`rmt_kernels.denoise_warm`, warm-started from each matrix's basis of the step
before, or :func:`rmt_kernels.denoise` with ``warm_start=False``; with ``passthrough_below_edge``
only the matrices whose released spectrum shows a component above the noise are shrunk (see
:func:`detection_threshold`). Its options are one
:class:`~rmt_kernels.dp.stages.options.DenoiseOptions`, validated once for both engines.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from operator import attrgetter
from typing import Any

import torch
from torch import nn

from rmt_kernels import ops
from rmt_kernels.dp.stages.options import DenoiseOptions
from rmt_kernels.dp.stages.protocol import Key, PostProcessor

__all__ = [
    "PASSTHROUGH_TW_QUANTILE",
    "DenoiseFilter",
    "Denoiser",
    "denoise_linear_weights",
    "detection_threshold",
    "top_singular_value",
]

DenoiseFilter = Callable[[str, nn.Module, str, nn.Parameter], bool]

# The Tracy-Widom (beta = 1) quantile above which ``passthrough_below_edge`` calls a matrix's top
# singular value a detection. For an m x n matrix of i.i.d. N(0, s^2) entries, (lambda - mu) /
# scale of its top eigenvalue lambda = top singular value^2 / s^2 tends to TW1 with mu =
# (sqrt(m - 1/2) + sqrt(n - 1/2))^2 (Johnstone 2001, with Ma 2012's half-unit centring;
# measured here at 64 x 32 to 1536 x 384: mean -1.2, sd 1.2-1.3, as TW1's -1.21 and 1.27).
# TW1's upper tail is about exp(-(2/3) t^(3/2)) / (4 sqrt(pi) t^(3/4)), 1.4e-7 at t = 7: pure
# noise is shrunk by mistake about once in 7 million matrix-steps (a MiniLM run of 60 steps has
# 2,160). The margin this adds to the bulk edge is 4.0% at 384 x 384 and 2.5% at 384 x 1536: a
# component of the clean gradient is detected once its singular value is a little above the BBP
# transition s (m n)^(1/4), where the noisy top value leaves the bulk.
PASSTHROUGH_TW_QUANTILE = 7.0


def denoise_linear_weights(layer_name: str, module: nn.Module, name: str, p: nn.Parameter) -> bool:
    """The native engine's default choice of what to denoise: the 2-D weights of ``nn.Linear``.

    Embedding gradients are row-sparse (only the rows of tokens in the batch), not low-rank, so
    they are left alone. Whatever the filter, matrices whose smaller side is below the denoise
    option ``min_dim`` (default ``MIN_DENOISE_DIM``) are never denoised.
    """
    return isinstance(module, nn.Linear) and name == "weight" and p.dim() == 2


def detection_threshold(m: int, n: int, sigma: float) -> float:
    """The singular value above which an m x n matrix's released spectrum shows a component
    above the noise: the top singular value of an m x n matrix of i.i.d. N(0, sigma^2) entries
    exceeds it with probability about 1.4e-7 (:data:`PASSTHROUGH_TW_QUANTILE`).

    It is the bulk edge ``sigma (sqrt(m) + sqrt(n))`` (with Johnstone's half-unit centring) plus
    a Tracy-Widom margin: with ``a = sqrt(m - 1/2)``, ``b = sqrt(n - 1/2)``, the squared top
    singular value of pure noise over ``sigma^2`` is about ``(a + b)^2 + (a + b) (1/a +
    1/b)^(1/3) TW1``; the threshold puts TW1 at its quantile :data:`PASSTHROUGH_TW_QUANTILE`. A
    function of the shape and the public ``sigma`` alone.

    Raises:
        ValueError: ``m`` or ``n`` below 1, or ``sigma`` not a finite number > 0.
    """
    if m < 1 or n < 1:
        raise ValueError(f"detection_threshold: m and n must be >= 1, got {m} x {n}")
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"detection_threshold: sigma must be a finite number > 0, got {sigma}")
    a, b = math.sqrt(m - 0.5), math.sqrt(n - 0.5)
    centre, scale = (a + b) ** 2, (a + b) * (1 / a + 1 / b) ** (1 / 3)
    return sigma * math.sqrt(centre + scale * PASSTHROUGH_TW_QUANTILE)


def top_singular_value(grad: torch.Tensor) -> float:
    """The largest singular value of a 2-D ``grad`` (in float32; NaN if it is not finite)."""
    g = grad.detach().float()
    if not bool(torch.isfinite(g).all()):
        return math.nan
    # LAPACK's SVD of a tall matrix is about 3x faster than of its wide transpose on the CPU.
    g = g if g.shape[0] >= g.shape[1] else g.T
    return float(torch.linalg.matrix_norm(g, ord=2))


class Denoiser(PostProcessor):
    """Singular-value shrinkage of the noisy 2-D gradients, warm-started across steps.

    Which gradients: those whose key is in ``keys`` (all when ``keys`` is None: the Opacus
    drop-in), 2-D, with a smaller side of at least ``min_dim``. The native engine makes the
    ``denoise_filter`` decision once, from the modules it tracks, and passes it with
    :meth:`restrict_to`. A fixed ``rank`` is "at most rank components": capped per matrix, so one
    small matrix does not make a rank that suits the big ones an error.

    Warm starts (option ``warm_start``, the default): each matrix goes through
    :func:`rmt_kernels.ops.denoise_warm` with the basis that op returned for the same key at the
    last step that denoised anything (none at a key's first step: a cold start). A gradient's
    subspace moves slowly, so the range finder started there usually settles in one pass. The
    basis is a function of released noisy gradients, the public ``sigma`` and public seeds only,
    so keeping it is post-processing. It is this post-processor's state (:meth:`state_dict`):
    a resumed run starts from the same bases and denoises bit-identically. A step that denoises
    anything keeps the bases of exactly the keys it denoised (a key that is absent at a step
    starts cold when it comes back); a basis is never reused for a matrix of another shape (a
    warning, and a cold start). With ``warm_start=False`` every matrix starts cold, through
    :func:`rmt_kernels.ops.denoise_many` (matrices grouped by their capped rank, so equal shapes
    are still batched on a GPU), and nothing is kept across steps.

    The sketch's test matrix (not privacy noise: it needs no secrecy) is seeded with
    ``seed + step``: a component the sketch misses in one step is not missed in every step, and
    the sequence is reproducible from public numbers.

    Passthrough (option ``passthrough_below_edge``, off by default): at each step, a selected
    matrix is shrunk only if its top singular value exceeds :func:`detection_threshold` (the
    bulk edge plus a Tracy-Widom margin: a component stands above the noise); otherwise it is
    passed on unchanged (the same tensor: bit-identical to not denoising it). Kappa-1 shrinkage
    of a matrix with nothing above the edge returns zero, and a run of zeros starves AdamW's
    second moment v, so that the first component to appear takes a step of about one learning
    rate per entry in one coherent direction (what made per-step shrinkage at kappa 1 collapse
    on SST-2). Passed through, such a matrix is a plain DP-Adam step, v keeps the noise's scale,
    and a matrix that is shrunk is never zeroed (it has a component above the edge). The
    decision reads the released matrix and the public ``sigma`` only: post-processing. A matrix
    with NaN or Inf entries goes to the op, which refuses it as without the option. A matrix
    passed through keeps no warm-start basis (it starts cold when it is next shrunk).

    Set ``record_stats`` before a step to keep, for :meth:`take_stats`, each denoised matrix, its
    noisy norm and (warm starts) the passes the range finder took (cheap; the SVDs wait for the
    call).

    Args:
        options: ``denoise`` options: a dict (validated by
            :func:`~rmt_kernels.dp.stages.options.check_denoise_options`), a
            :class:`~rmt_kernels.dp.stages.options.DenoiseOptions`, or None for the defaults.
        keys: the only keys it may denoise, or None for any.

    Raises:
        TypeError, ValueError: bad options (see
            :func:`~rmt_kernels.dp.stages.options.check_denoise_options`).
    """

    shrinks_matrices = True

    def __init__(
        self,
        options: Mapping[str, Any] | DenoiseOptions | None = None,
        *,
        keys: Iterable[Key] | None = None,
    ):
        #: The options, validated (:meth:`DenoiseOptions.given_options` are those given).
        self.options: DenoiseOptions = (
            options
            if isinstance(options, DenoiseOptions)
            else DenoiseOptions.from_mapping(options or {})
        )
        self.keys = None if keys is None else frozenset(keys)
        self.record_stats = False
        # (key, noisy norm, output, passes, shrunk) of each selected matrix at the recorded step.
        self._recorded: list[tuple[Key, float, torch.Tensor, torch.Tensor | None, bool]] = []
        # Passthrough telemetry (cheap, every step): by key, the top singular value over the
        # detection threshold at the last step, and [steps shrunk, steps seen] since the last
        # take_stats.
        self._top_ratio: dict[Key, float] = {}
        self._counts: dict[Key, list[int]] = {}
        # Warm-start state: by key, the basis denoise_warm returned at the last step that
        # denoised anything, and the shape of the gradient it came from.
        self._bases: dict[Key, torch.Tensor] = {}
        self._shapes: dict[Key, tuple[int, int]] = {}

    def __repr__(self) -> str:
        return f"Denoiser({self.options.given_options()!r})"

    # Read-only views of the options the engines and the trajectory denoiser ask for by name.
    #: Matrices whose smaller side is below this (an int) are left alone.
    min_dim = property(attrgetter("options.min_dim"))
    #: Each matrix's range finder starts from its basis of the step before.
    warm_start = property(attrgetter("options.warm_start"))
    #: Shrink only the matrices whose released spectrum shows a component above the noise.
    passthrough = property(attrgetter("options.passthrough_below_edge"))

    def eligible(self, shape: Sequence[int]) -> bool:
        """Whether a gradient of this shape can be denoised at all: a matrix whose smaller side
        is at least ``min_dim``."""
        return len(shape) == 2 and min(shape) >= self.min_dim

    def restrict_to(self, keys: Iterable[Key]) -> None:
        """Denoise only these keys from now on (the filter decision)."""
        self.keys = frozenset(keys)

    def selected(self, grads: Mapping[Key, torch.Tensor]) -> list[Key]:
        """The keys of ``grads`` this denoiser would denoise, in ``grads``'s order."""
        return [
            k
            for k, g in grads.items()
            if (self.keys is None or k in self.keys) and self.eligible(g.shape)
        ]

    def __call__(
        self, grads: dict[Key, torch.Tensor], sigma: float, step: int
    ) -> dict[Key, torch.Tensor]:
        """Denoise the selected gradients at noise std ``sigma`` (none when ``sigma`` is 0: no
        noise, nothing to denoise, and the bulk edge would be 0, which the op rejects; the
        warm-start bases are then left as they are)."""
        if not sigma > 0:
            return grads
        keys = self.selected(grads)
        if not keys:
            return grads
        shrunk = self._detected(grads, sigma, keys) if self.passthrough else keys
        options = self.options.op_options(step)
        rank = self.options.rank
        out = dict(grads)
        passes: dict[Key, torch.Tensor] = {}
        if self.warm_start:
            bases, shapes = {}, {}
            for k in shrunk:
                g = grads[k]
                # Looked up on the module at call time (tests spy on it there).
                out[k], bases[k], passes[k] = ops.denoise_warm(
                    g, sigma, self._start_basis(k, g), rank=_capped(rank, g), **options
                )
                shapes[k] = (int(g.shape[0]), int(g.shape[1]))
            self._bases, self._shapes = bases, shapes
        else:
            groups: dict[int, list[Key]] = {}
            for k in shrunk:
                groups.setdefault(_capped(rank, grads[k]), []).append(k)
            for group_rank, group in groups.items():
                estimates = ops.denoise_many(
                    [grads[k] for k in group], sigma, rank=group_rank, **options
                )
                for k, estimate in zip(group, estimates, strict=True):
                    out[k] = estimate
        if self.record_stats:
            shrunk_keys = set(shrunk)
            self._recorded = [
                (
                    k,
                    float(torch.linalg.vector_norm(grads[k])),
                    out[k].detach().clone(),
                    passes.get(k),
                    k in shrunk_keys,
                )
                for k in keys
            ]
        return out

    def _detected(
        self, grads: Mapping[Key, torch.Tensor], sigma: float, keys: Sequence[Key]
    ) -> list[Key]:
        """The keys whose released matrix has a singular value above
        :func:`detection_threshold` (or a NaN or Inf entry, for the op to refuse), in order;
        counts the decisions for :meth:`take_stats`."""
        detected = []
        for k in keys:
            g = grads[k]
            top = top_singular_value(g)
            ratio = top / detection_threshold(int(g.shape[0]), int(g.shape[1]), sigma)
            shrink = not ratio <= 1.0  # NaN: not finite, shrunk so that the op refuses it
            if shrink:
                detected.append(k)
            self._top_ratio[k] = ratio
            counts = self._counts.setdefault(k, [0, 0])
            counts[0] += int(shrink)
            counts[1] += 1
        return detected

    def _start_basis(self, key: Key, grad: torch.Tensor) -> torch.Tensor | None:
        """The basis to start ``key``'s range finder from: last step's, on ``grad``'s device,
        or None (a cold start) when there is none or it was for a matrix of another shape."""
        basis = self._bases.get(key)
        if basis is None:
            return None
        if self._shapes[key] != tuple(grad.shape):
            warnings.warn(
                f"Denoiser: the gradient of {key!r} is {tuple(grad.shape)}, its warm-start basis "
                f"was for a {self._shapes[key]} matrix: starting this one cold",
                stacklevel=3,
            )
            return None
        return basis.to(grad.device)

    def take_stats(self) -> dict[Key, dict[str, float]]:
        """Per matrix denoised at the last step run with ``record_stats`` set: the kept rank,
        ||denoised|| / ||noisy|| (post-processing of the noisy gradient only) and, with warm
        starts, ``passes``: the passes over the matrix its range finder took (1 when last
        step's basis settled it at once). With ``passthrough_below_edge`` also
        ``passthrough`` (True: passed on unchanged at that step, rank min(m, n), ratio 1),
        ``top_ratio`` (its top singular value over :func:`detection_threshold`) and
        ``shrunk_steps`` of ``steps``: how many of the steps since the last call shrank it
        (every step's decision, not only the recorded one's). Empty if nothing was recorded;
        forgets what it returns."""
        stats = {}
        for key, noisy_norm, g, passes, shrunk in self._recorded:
            if self.passthrough:
                counts = self._counts.get(key, [0, 0])
                extra = {
                    "passthrough": not shrunk,
                    "top_ratio": self._top_ratio[key],
                    "shrunk_steps": counts[0],
                    "steps": counts[1],
                }
                if not shrunk:
                    stats[key] = {"rank": min(g.shape), "norm_ratio": 1.0, **extra}
                    continue
            else:
                extra = {}
            values = torch.linalg.svdvals(g.float())
            top = float(values.max()) if values.numel() else 0.0
            # The op reconstructs only the kept components; the other values are rounding.
            tol = top * max(g.shape) * torch.finfo(torch.float32).eps
            stats[key] = {
                "rank": int((values > tol).sum()) if top > 0 else 0,
                "norm_ratio": float(torch.linalg.vector_norm(g)) / noisy_norm
                if noisy_norm > 0
                else 0.0,
            }
            if passes is not None:
                stats[key]["passes"] = int(passes)
            stats[key].update(extra)
        self._recorded = []
        self._counts = {}
        return stats

    def state_dict(self) -> dict[str, Any]:
        """The warm-start bases: ``{"bases": {key: (m, k) float32 tensor}, "shapes": {key:
        [m, n]}}`` (the gradient's shape each basis came from), or ``{}`` when there are none
        (``warm_start=False``, or no step denoised yet). Copies: later steps do not change it."""
        if not self._bases:
            return {}
        return {
            "bases": {k: b.detach().clone() for k, b in self._bases.items()},
            "shapes": {k: list(shape) for k, shape in self._shapes.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (``{}``: no bases, every key starts cold).

        Raises:
            TypeError: ``state`` is not a mapping.
            ValueError: naming the key: other entries than ``bases`` and ``shapes``, bases
                given to a denoiser with ``warm_start=False``, a key it does not denoise, a
                shape that is not two sizes it would denoise, a basis that is not a finite
                float32 (m, k) tensor with k <= min(m, n) for its m x n gradient.
        """
        where = "Denoiser.load_state_dict"
        if not isinstance(state, Mapping):
            raise TypeError(f"{where}: state must be a dict, got {type(state).__name__}")
        if not state:
            self._bases, self._shapes = {}, {}
            return
        if set(state) != {"bases", "shapes"}:
            raise ValueError(
                f"{where}: expected the entries 'bases' and 'shapes', got {sorted(state, key=str)}"
            )
        if not self.warm_start:
            raise ValueError(
                f"{where}: the state holds warm-start bases, but this denoiser has "
                "warm_start=False (the saved run had it on)"
            )
        bases, shapes = state["bases"], state["shapes"]
        if not isinstance(bases, Mapping) or not isinstance(shapes, Mapping):
            raise ValueError(f"{where}: 'bases' and 'shapes' must be dicts keyed like the grads")
        if set(bases) != set(shapes):
            odd = sorted(set(bases) ^ set(shapes), key=str)
            raise ValueError(f"{where}: keys {odd} have a basis or a shape but not both")
        loaded_bases, loaded_shapes = {}, {}
        for key, basis in bases.items():
            if self.keys is not None and key not in self.keys:
                raise ValueError(
                    f"{where}: a basis for {key!r}, which this denoiser does not denoise"
                )
            shape = shapes[key]
            if (
                not isinstance(shape, (list, tuple))
                or len(shape) != 2
                or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
                or not self.eligible(shape)
            ):
                raise ValueError(
                    f"{where}: the shape of {key!r} must be [m, n], two sizes of at least "
                    f"min_dim = {self.min_dim}, got {shape!r}"
                )
            m, n = shape
            if (
                not isinstance(basis, torch.Tensor)
                or basis.dtype != torch.float32
                or basis.dim() != 2
                or basis.shape[0] != m
                or basis.shape[1] > min(m, n)
            ):
                what = (
                    f"a {basis.dtype} tensor of shape {tuple(basis.shape)}"
                    if isinstance(basis, torch.Tensor)
                    else type(basis).__name__
                )
                raise ValueError(
                    f"{where}: the basis of {key!r} (a {m} x {n} gradient) must be a float32 "
                    f"({m}, k) tensor with k <= {min(m, n)}, got {what}"
                )
            if not bool(torch.isfinite(basis).all()):
                raise ValueError(f"{where}: the basis of {key!r} has NaN or Inf entries")
            loaded_bases[key] = basis.detach().clone()
            loaded_shapes[key] = (m, n)
        self._bases, self._shapes = loaded_bases, loaded_shapes


def _capped(rank: int, grad: torch.Tensor) -> int:
    """A fixed ``rank`` capped at the matrix's smaller side (-1, adaptive, as it is)."""
    return rank if rank == -1 else min(rank, *grad.shape)
