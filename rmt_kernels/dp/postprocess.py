"""Post-processing of the released DP gradient: the last stage of the private step before the
gradients are written, shared by the native engine and the Opacus drop-in.

The private step of both engines is a template (rmt_kernels/dp/engine.py has the native one):
clip and accumulate -> add noise -> all-reduce -> **post-process** -> write gradients -> account.
When the post-processing stage runs, the gradient is already the released mechanism output (the
clipped sum plus its Gaussian noise, averaged, summed over ranks), so anything computed from it
and from public numbers alone is post-processing and leaves the privacy guarantee unchanged.

A post-processor is a :class:`PostProcessor`: ``__call__(grads, sigma, step)`` gets

- ``grads``: the noisy averaged gradients, keyed by a stable key (the native engine: the
  parameter's qualified name, e.g. ``"encoder.layer.0.attention.self.query.weight"``; the Opacus
  drop-in: the parameter's index in the optimizer's ``params``);
- ``sigma``: the public per-entry noise std of those gradients;
- ``step``: a public step counter (the native engine: the logical step; Opacus: the number of
  steps denoised before this one),

and returns the dict of gradients to pass on (the same tensors where it changes nothing). It must
read nothing else: no clean gradient, no per-example norms, no noise seed. Whatever it keeps
across steps goes in ``state_dict()`` (plain Python values and tensors: a checkpoint loads it with
``torch.load(weights_only=True)``) and comes back through ``load_state_dict()``, so that a resumed
run is bit-identical to an uninterrupted one.

A new post-processor (a temporal filter, moment shrinkage, warm-started denoising with a basis
kept across steps) is one new subclass in this module, appended to the engine's
``post_processors`` list; the engines do not change. :func:`post_process` is the stage itself.

The one that exists today is :class:`Denoiser` (singular-value shrinkage of the 2-D gradients,
:func:`rmt_kernels.denoise`). Its options are validated in one place,
:func:`check_denoise_options`, for both engines.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from rmt_kernels import ops
from rmt_kernels._checks import SEED_LIMIT, check_denoise_arguments

__all__ = [
    "DENOISE_OPTIONS",
    "MIN_DENOISE_DIM",
    "DenoiseFilter",
    "DenoiseOptionError",
    "Denoiser",
    "PostProcessor",
    "check_denoise_options",
    "denoise_linear_weights",
    "post_process",
]

Key = Hashable
DenoiseFilter = Callable[[str, nn.Module, str, nn.Parameter], bool]

# Marchenko-Pastur's edge is an asymptotic statement about large m and n. A classifier head
# (2 x 384) has two singular values and no bulk: thresholding it at the "edge" zeroes its whole
# gradient whenever the signal is below the noise (measured on SST-2: the head never learned).
MIN_DENOISE_DIM = 32

# Every option of ``denoise=``: the keyword options of rmt_kernels.denoise (read from its
# signature, so the two never drift) with their defaults, plus ``min_dim`` (not an op option:
# matrices whose smaller side is below it are left alone, see MIN_DENOISE_DIM).
DENOISE_OPTIONS: dict[str, Any] = {
    name: parameter.default
    for name, parameter in inspect.signature(ops.denoise).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
}
DENOISE_OPTIONS["min_dim"] = MIN_DENOISE_DIM
INT_OPTIONS = ("seed", "rank", "oversample", "niter", "min_dim")


class DenoiseOptionError(TypeError, ValueError):
    """An unknown ``denoise`` option.

    Both a TypeError (what Python raises for an unexpected keyword, and what the Opacus drop-in
    raised) and a ValueError (what ``make_private`` raised), so code catching either keeps
    working now that both engines share :func:`check_denoise_options`.
    """


def check_denoise_options(denoise: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Validate ``denoise`` options once, before any data is touched (both engines call this).

    A typo (``kapa=2``) or a bad value would otherwise surface only after the first forward and
    backward pass of a possibly long job, or be silently ignored. Values are checked by the op's
    own argument check, so the messages are the op's; ``rank`` is checked again per matrix at
    each step (where it is capped at the matrix's smaller side, see :class:`Denoiser`).

    Args:
        denoise: keyword options of :func:`rmt_kernels.denoise` (``shrinker``, ``kappa``,
            ``rank``, ``oversample``, ``niter``, ``norm``, ``seed``) plus ``min_dim``, or None
            for no denoising.

    Returns:
        A plain dict copy of the options as given (no defaults filled in, so later changes to
        the caller's dict do not leak into training), or None.

    Raises:
        TypeError: ``denoise`` is not a mapping, or an option has the wrong type.
        DenoiseOptionError: an unknown option (a TypeError and a ValueError).
        ValueError: an option has an invalid value.
    """
    if denoise is None:
        return None
    if not isinstance(denoise, Mapping):
        raise TypeError(
            f"denoise must be a dict of rmt_kernels.denoise options or None, got "
            f"{type(denoise).__name__}"
        )
    unknown = sorted(set(denoise) - set(DENOISE_OPTIONS), key=str)
    if unknown:
        raise DenoiseOptionError(
            f"denoise: unknown option(s) {', '.join(map(repr, unknown))}; valid options are "
            f"{', '.join(sorted(DENOISE_OPTIONS))}"
        )
    options = {**DENOISE_OPTIONS, **denoise}
    for name in INT_OPTIONS:
        value = options[name]
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise TypeError(f"denoise: {name} must be an int, got {type(value).__name__}")
        options[name] = int(value)  # a NumPy integer would overflow silently in seed + step
    if options["min_dim"] < 1:
        raise ValueError(f"denoise: min_dim must be >= 1, got {options['min_dim']}")
    # A meta matrix big enough for any rank checks everything else without allocating.
    size = max(options["rank"], 2)
    check_denoise_arguments(
        torch.empty(size, size, device="meta"),
        1.0,
        options["shrinker"],
        options["kappa"],
        options["rank"],
        options["oversample"],
        options["niter"],
        options["norm"],
        options["seed"],
    )
    return {k: options[k] if k in INT_OPTIONS else v for k, v in denoise.items()}


def denoise_linear_weights(layer_name: str, module: nn.Module, name: str, p: nn.Parameter) -> bool:
    """The native engine's default choice of what to denoise: the 2-D weights of ``nn.Linear``.

    Embedding gradients are row-sparse (only the rows of tokens in the batch), not low-rank, so
    they are left alone. Whatever the filter, matrices whose smaller side is below the denoise
    option ``min_dim`` (default ``MIN_DENOISE_DIM``) are never denoised.
    """
    return isinstance(module, nn.Linear) and name == "weight" and p.dim() == 2


class PostProcessor:
    """One post-processing step of the released gradient (module docstring).

    Subclasses implement ``__call__``; one that keeps anything across steps also overrides
    ``state_dict``/``load_state_dict`` (the defaults say: no state).
    """

    def __call__(
        self, grads: dict[Key, torch.Tensor], sigma: float, step: int
    ) -> dict[Key, torch.Tensor]:
        """Return the post-processed gradients (a new dict; unchanged tensors may be shared).

        Args:
            grads: the noisy averaged gradients, by key (module docstring).
            sigma: their per-entry noise std (public).
            step: the public step counter (module docstring).
        """
        raise NotImplementedError

    #: Set by a stage that needs the released gradient itself as well as the previous stage's
    #: output (for example an Adam whose second moment is computed from the noisy gradient
    #: while its numerator is denoised): :func:`post_process` then also passes
    #: ``released=`` (the stage-4 input, untouched) and ``released_sigma=`` (its noise std).
    needs_released: bool = False

    def output_sigma(self, sigma: float, step: int) -> float:
        """Per-entry noise std of this stage's output, given its input's ``sigma`` at ``step``.

        :func:`post_process` hands it to the next stage as that stage's ``sigma``. The default
        (unchanged) suits a stage that leaves the noise as it is or one after which no noise
        level is meaningful (shrinkage); a linear filter (an EMA of the noisy gradients)
        overrides it with its exact output noise std. A public function of public numbers.
        """
        return sigma

    def state_dict(self) -> dict[str, Any]:
        """What must survive a checkpoint (plain values and tensors); empty by default."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned.

        Raises:
            ValueError: ``state`` is not empty (this post-processor keeps no state).
        """
        if state:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: it keeps no state, got keys "
                f"{sorted(state)}"
            )


def post_process(
    processors: Sequence[PostProcessor],
    grads: dict[Key, torch.Tensor],
    sigma: float,
    step: int,
) -> dict[Key, torch.Tensor]:
    """The post-processing stage of the private step: each processor in turn, each fed the
    previous one's output and its noise std (:meth:`PostProcessor.output_sigma`); a processor
    with ``needs_released`` also gets the stage's input (both engines call this)."""
    released, released_sigma = grads, sigma
    for processor in processors:
        # Plain callables (grads, sigma, step) -> grads are accepted as stages too.
        if getattr(processor, "needs_released", False):
            out = processor(grads, sigma, step, released=released, released_sigma=released_sigma)
        else:
            out = processor(grads, sigma, step)
        output_sigma = getattr(processor, "output_sigma", None)
        sigma = sigma if output_sigma is None else output_sigma(sigma, step)
        grads = out
    return grads


class Denoiser(PostProcessor):
    """Singular-value shrinkage of the noisy 2-D gradients (:func:`rmt_kernels.ops.denoise_many`).

    Which gradients: those whose key is in ``keys`` (all when ``keys`` is None: the Opacus
    drop-in), 2-D, with a smaller side of at least ``min_dim``. The native engine makes the
    ``denoise_filter`` decision once, from the modules it tracks, and passes it with
    :meth:`restrict_to`. A fixed ``rank`` is "at most rank components": capped per matrix, so one
    small matrix does not make a rank that suits the big ones an error; matrices are grouped by
    their capped rank so :func:`~rmt_kernels.ops.denoise_many` still batches equal shapes.

    The sketch's test matrix (not privacy noise: it needs no secrecy) is seeded with
    ``seed + step``: a component the sketch misses in one step is not missed in every step, and
    the sequence is reproducible from public numbers. Nothing is kept across steps
    (``state_dict()`` is empty).

    Set ``record_stats`` before a step to keep, for :meth:`take_stats`, each denoised matrix and
    its noisy norm (cheap; the SVDs wait for the call).

    Args:
        options: ``denoise`` options (validated by :func:`check_denoise_options`).
        keys: the only keys it may denoise, or None for any.

    Raises:
        TypeError, ValueError: bad options (see :func:`check_denoise_options`).
    """

    def __init__(
        self, options: Mapping[str, Any] | None = None, *, keys: Iterable[Key] | None = None
    ):
        #: The options as given (``min_dim`` included), validated.
        self.options: dict[str, Any] = check_denoise_options(options or {}) or {}
        self.min_dim: int = int(self.options.get("min_dim", MIN_DENOISE_DIM))
        self.keys: frozenset[Key] | None = None if keys is None else frozenset(keys)
        self.record_stats = False
        self._recorded: list[tuple[Key, float, torch.Tensor]] = []

    def __repr__(self) -> str:
        return f"Denoiser({self.options!r})"

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
        noise, nothing to denoise, and the bulk edge would be 0, which the op rejects)."""
        if not sigma > 0:
            return grads
        keys = self.selected(grads)
        if not keys:
            return grads
        options = {k: v for k, v in self.options.items() if k not in ("min_dim", "rank")}
        options["seed"] = (options.get("seed", DENOISE_OPTIONS["seed"]) + step) % SEED_LIMIT
        rank = int(self.options.get("rank", DENOISE_OPTIONS["rank"]))
        groups: dict[int, list[Key]] = {}
        for k in keys:
            groups.setdefault(rank if rank == -1 else min(rank, *grads[k].shape), []).append(k)
        out = dict(grads)
        for group_rank, group in groups.items():
            # Looked up on the module at call time (tests spy on it there).
            estimates = ops.denoise_many(
                [grads[k] for k in group], sigma, rank=group_rank, **options
            )
            for k, estimate in zip(group, estimates, strict=True):
                out[k] = estimate
        if self.record_stats:
            self._recorded = [
                (k, float(torch.linalg.vector_norm(grads[k])), out[k].detach().clone())
                for k in keys
            ]
        return out

    def take_stats(self) -> dict[Key, dict[str, float]]:
        """Per matrix denoised at the last step run with ``record_stats`` set: the kept rank
        and ||denoised|| / ||noisy|| (post-processing of the noisy gradient only). Empty if
        nothing was recorded; forgets what it returns."""
        stats = {}
        for key, noisy_norm, g in self._recorded:
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
        self._recorded = []
        return stats
