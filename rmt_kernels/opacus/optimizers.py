"""Opacus DP optimizers whose noisy gradient is denoised before the parameter update.

Opacus's ``DPOptimizer.pre_step`` is a template method: clip_and_accumulate -> add_noise ->
scale_grad -> step_hook (the accountant). We override only ``scale_grad``: call Opacus's, then
shrink every 2-D ``p.grad``. At that point ``p.grad`` is exactly the released DP gradient (clipped
sum + noise, divided by the batch size), so denoising is post-processing and the privacy guarantee
is unchanged; the accountant's hook still runs afterwards, untouched, from Opacus's own
``pre_step``.

Privacy invariant 4 (denoising reads only the noisy gradient and public hyper-parameters) holds by
construction: :meth:`_DenoisingMixin._denoise_grads` reads ``p.grad`` and the optimizer's
hyper-parameters (noise multiplier, clipping norm, expected batch size, number of accumulated
physical batches, loss reduction) and nothing else: not ``grad_sample``, not ``summed_grad``,
not the noise generator.

Written against opacus==1.6.0.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from opacus.optimizers import (
    AdaClipDPOptimizer,
    DistributedDPOptimizer,
    DistributedDPOptimizerFastGradientClipping,
    DPOptimizer,
    DPOptimizerFastGradientClipping,
    DPPerLayerOptimizer,
    FSDPOptimizerFastGradientClipping,
    SimpleDistributedPerLayerOptimizer,
)
from torch.optim import Optimizer

from rmt_kernels import ops
from rmt_kernels._checks import check_denoise_arguments
from rmt_kernels.dp.engine import MIN_DENOISE_DIM

__all__ = [
    "DENOISE_OPTIONS",
    "DenoisingDPOptimizer",
    "DenoisingDPOptimizerFastGradientClipping",
    "DenoisingDPPerLayerOptimizer",
    "DenoisingDistributedDPOptimizer",
    "DenoisingDistributedDPOptimizerFastGradientClipping",
    "DenoisingSimpleDistributedPerLayerOptimizer",
    "denoising_optimizer_class",
    "validate_denoise_options",
]

# The keyword options of rmt_kernels.denoise, read from its signature so the two never drift.
DENOISE_OPTIONS: dict[str, Any] = {
    name: parameter.default
    for name, parameter in inspect.signature(ops.denoise).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
}
# Not an op option: matrices whose smaller side is below it are left alone (see the engine's
# MIN_DENOISE_DIM for why).
DENOISE_OPTIONS["min_dim"] = MIN_DENOISE_DIM


def validate_denoise_options(denoise: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Check the ``denoise`` options when the optimizer is built, not at the first step.

    A typo (``kapa=2``) or a bad value would otherwise surface only after the first forward and
    backward pass of a possibly long job, or, worse, be silently ignored. Values are checked by the
    op's own argument check, so the messages are the op's.

    Args:
        denoise: keyword options of :func:`rmt_kernels.denoise` (``shrinker``, ``kappa``,
            ``rank``, ``oversample``, ``niter``, ``norm``, ``seed``), or None for no denoising.

    Returns:
        A plain dict copy of the options (so later changes to the caller's dict do not leak into
        training), or None.

    Raises:
        TypeError: ``denoise`` is not a mapping, or names an unknown option.
        ValueError: an option has an invalid value.
    """
    if denoise is None:
        return None
    if not isinstance(denoise, Mapping):
        raise TypeError(
            f"denoise must be a dict of rmt_kernels.denoise options or None, got "
            f"{type(denoise).__name__}"
        )
    unknown = sorted(set(denoise) - set(DENOISE_OPTIONS))
    if unknown:
        raise TypeError(
            f"denoise: unknown option(s) {', '.join(map(repr, unknown))}; valid options are "
            f"{', '.join(sorted(DENOISE_OPTIONS))}"
        )
    options = {**DENOISE_OPTIONS, **denoise}
    if not isinstance(options["seed"], int) or isinstance(options["seed"], bool):
        raise TypeError(f"denoise: seed must be an int, got {type(options['seed']).__name__}")
    for name in ("rank", "oversample", "niter", "min_dim"):
        if not isinstance(options[name], int) or isinstance(options[name], bool):
            raise TypeError(f"denoise: {name} must be an int, got {type(options[name]).__name__}")
    if options["min_dim"] < 1:
        raise ValueError(f"denoise: min_dim must be >= 1, got {options['min_dim']}")
    # rank is checked against the real matrices at each step (it is capped per matrix there);
    # here a meta matrix big enough for any rank checks everything else without allocating.
    size = max(options["rank"], 1)
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
    return dict(denoise)


class _DenoisingMixin:
    """Adds denoising of the 2-D gradients to an Opacus ``DPOptimizer`` subclass.

    Must come before the Opacus class in the bases so its ``__init__`` and ``scale_grad`` wrap
    Opacus's.
    """

    # Set in __init__; declared for type checkers.
    denoise_options: dict[str, Any] | None
    denoise_steps: int

    def __init__(
        self, optimizer: Optimizer, *, denoise: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> None:
        # Validated before Opacus touches the parameters, so a bad option fails cleanly.
        self.denoise_options = validate_denoise_options(denoise)
        # Steps denoised so far: varies the sketch's test matrix (see _denoise_grads).
        self.denoise_steps = 0
        super().__init__(optimizer, **kwargs)  # type: ignore[call-arg]

    def _noise_std(self) -> float:
        """Std of the noise ``add_noise`` just put on each entry of the clipped sum."""
        return self.noise_multiplier * self.max_grad_norm  # type: ignore[attr-defined]

    def _reduction_divisor(self) -> float:
        """What Opacus divides the noisy sum by before the update (1 for loss_reduction="sum").

        Mirrors Opacus's ``scale_grad``: ``expected_batch_size * accumulated_iterations`` for
        "mean". With BatchMemoryManager (skipped virtual steps) ``accumulated_iterations`` is 1 and
        ``expected_batch_size`` is already the logical batch size; with plain accumulation (several
        backward passes before one step) it counts the physical batches. Either way it is the
        divisor that was applied to the noise, which is all that matters for sigma.
        """
        if self.loss_reduction == "mean":  # type: ignore[attr-defined]
            return self.expected_batch_size * self.accumulated_iterations  # type: ignore[attr-defined]
        return 1.0

    def denoise_sigma(self) -> float:
        """Per-entry noise std of the final ``p.grad``: public hyper-parameters only."""
        return self._noise_std() / self._reduction_divisor()

    def scale_grad(self) -> None:
        """Opacus's scaling, then denoising of the now final noisy gradient.

        Overriding here rather than ``add_noise`` or ``pre_step``: after ``scale_grad`` the noise
        std of ``p.grad`` is known exactly, and ``pre_step`` still calls the accountant's hook
        afterwards, so accounting is untouched and we do not fork Opacus's loop.
        """
        super().scale_grad()  # type: ignore[misc]
        if self.denoise_options is not None:
            self._denoise_grads()

    def _denoise_grads(self) -> None:
        """Replace each 2-D ``p.grad`` by its shrinkage estimate.

        Reads only ``p.grad`` and public hyper-parameters (privacy invariant 4). 1-D (biases,
        norms) and >2-D (convolution kernels) gradients are left exactly as Opacus made them: the
        Marchenko-Pastur model is for matrices, and a reshaped kernel has no reason to be low-rank.
        Every 2-D gradient whose smaller side is at least ``min_dim`` (default 32) is denoised,
        embedding tables included (the native engine leaves embeddings alone by default); tiny
        heads are left alone, as in the native engine.
        """
        sigma = self.denoise_sigma()
        if not sigma > 0:
            # noise_multiplier == 0 (or max_grad_norm == 0): there is no noise, so nothing to
            # denoise, and the bulk edge sigma * (sqrt(m) + sqrt(n)) would be 0, which the op
            # rightly rejects. The gradient is left as Opacus made it.
            return
        options = dict(self.denoise_options or {})
        min_dim = int(options.pop("min_dim", MIN_DENOISE_DIM))
        params = [
            p
            for p in self.params  # type: ignore[attr-defined]
            if p.grad is not None and p.grad.dim() == 2 and min(p.shape) >= min_dim
        ]
        if not params:
            return
        # The seed only drives the range finder's Gaussian test matrix, not privacy noise, so it
        # needs no secrecy (unlike the noise generator in secure mode). It changes every step so a
        # component the sketch happens to miss in one step is not missed in every step; the
        # sequence is reproducible from the base seed.
        base = int(options.get("seed", DENOISE_OPTIONS["seed"]))
        options["seed"] = (base + self.denoise_steps) % 2**63  # stays an int64 seed
        self.denoise_steps += 1
        rank = int(options.pop("rank", DENOISE_OPTIONS["rank"]))
        # A fixed rank is "at most rank components": capped per matrix, so one small matrix (a
        # 2 x 64 classifier head) does not make a rank that suits the big ones an error. Matrices
        # are grouped by their capped rank so denoise_many still batches equal shapes.
        groups: dict[int, list[torch.nn.Parameter]] = {}
        for p in params:
            groups.setdefault(rank if rank == -1 else min(rank, *p.grad.shape), []).append(p)
        for group_rank, group in groups.items():
            estimates = ops.denoise_many([p.grad for p in group], sigma, rank=group_rank, **options)
            for p, estimate in zip(group, estimates, strict=True):
                p.grad = estimate


class _DistributedDenoisingMixin(_DenoisingMixin):
    """Denoising for Opacus's distributed optimizers.

    There, ``pre_step`` leaves each rank with its own clipped sum (noise only on rank 0) and
    ``step`` all-reduces afterwards (``reduce_gradients``: sum over ranks, then / world_size for
    "mean"). Only the all-reduced gradient is the released DP gradient with a known noise std, so
    denoising moves from ``scale_grad`` to after ``reduce_gradients``. Every rank then denoises
    the same matrix with the same seed, so the replicas stay equal as long as the op is bitwise
    deterministic on the device (it is on the CPU, tested with two ranks); denoising on rank 0
    and broadcasting would not need that, at the cost of one more collective per step.
    """

    def scale_grad(self) -> None:
        # Skip _DenoisingMixin.scale_grad: before the all-reduce each rank holds a partial sum.
        super(_DenoisingMixin, self).scale_grad()  # type: ignore[misc]

    def reduce_gradients(self) -> None:
        super().reduce_gradients()  # type: ignore[misc]
        if self.denoise_options is not None:
            self._denoise_grads()

    def _reduction_divisor(self) -> float:
        # expected_batch_size is per rank (make_private divides it by world_size), and the
        # all-reduce of a "mean" gradient divides once more by world_size.
        divisor = super()._reduction_divisor()
        if self.loss_reduction == "mean":  # type: ignore[attr-defined]
            divisor *= self.world_size  # type: ignore[attr-defined]
        return divisor


class _GhostNoiseStd:
    """Noise std of Opacus's ghost-clipping ``add_noise``."""

    def _noise_std(self) -> float:
        # Opacus's ghost add_noise uses the adjusted multiplier that adaptive clipping sets (the
        # accountant keeps the original one); mirror it so sigma is the noise actually added.
        multiplier = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)  # type: ignore[attr-defined]
        return multiplier * self.max_grad_norm  # type: ignore[attr-defined]


class DenoisingDPOptimizer(_DenoisingMixin, DPOptimizer):
    """Opacus's :class:`~opacus.optimizers.DPOptimizer` (flat clipping) that denoises the noisy
    2-D gradients by singular-value shrinkage before the wrapped optimizer's step.

    With ``denoise=None`` it is Opacus's DPOptimizer, bit for bit. The accountant's step hook,
    skipped virtual steps (BatchMemoryManager), gradient accumulation and secure mode work as in
    Opacus: only ``scale_grad`` is extended.

    Args:
        optimizer: the wrapped torch optimizer.
        denoise: keyword options of :func:`rmt_kernels.denoise` (``shrinker``, ``kappa``,
            ``rank``, ``oversample``, ``niter``, ``norm``, ``seed``), or None for plain Opacus.
            ``seed`` is the base seed of the sketch's test matrix; step ``t`` uses ``seed + t``.
            ``rank`` (if not -1) is capped at ``min(m, n)`` per matrix.
        **kwargs: DPOptimizer's arguments (noise_multiplier, max_grad_norm, expected_batch_size,
            loss_reduction, generator, secure_mode).
    """


class DenoisingDPPerLayerOptimizer(_DenoisingMixin, DPPerLayerOptimizer):
    """Opacus's per-layer-clipping optimizer with denoising; see :class:`DenoisingDPOptimizer`.

    Per-layer clipping still adds noise of std ``noise_multiplier * ||max_grad_norms||_2`` to every
    parameter (Opacus stores that total norm as ``max_grad_norm``), so sigma is computed the same
    way as for flat clipping.
    """


class DenoisingDPOptimizerFastGradientClipping(
    _GhostNoiseStd, _DenoisingMixin, DPOptimizerFastGradientClipping
):
    """Opacus's ghost-clipping optimizer (``grad_sample_mode="ghost"``) with denoising; see
    :class:`DenoisingDPOptimizer`.

    Ghost clipping never materialises per-example gradients, but its ``pre_step`` has the same
    add_noise -> scale_grad -> step_hook tail, so the same override applies.
    """


class DenoisingDistributedDPOptimizer(_DistributedDenoisingMixin, DistributedDPOptimizer):
    """Opacus's DistributedDPOptimizer (flat clipping, DPDDP/DDP) with denoising after the
    all-reduce; see :class:`DenoisingDPOptimizer` and :class:`_DistributedDenoisingMixin`."""


class DenoisingSimpleDistributedPerLayerOptimizer(
    _DistributedDenoisingMixin, SimpleDistributedPerLayerOptimizer
):
    """Opacus's distributed per-layer-clipping optimizer with denoising after the all-reduce."""


class DenoisingDistributedDPOptimizerFastGradientClipping(
    _GhostNoiseStd, _DistributedDenoisingMixin, DistributedDPOptimizerFastGradientClipping
):
    """Opacus's distributed ghost-clipping optimizer with denoising after the all-reduce."""


# Opacus optimizer class -> denoising twin. Checked by exact type: a subclass of one of these may
# change how noise is added, and then our sigma would be wrong.
_DENOISING_TWINS: dict[type[DPOptimizer], type[DPOptimizer]] = {
    DPOptimizer: DenoisingDPOptimizer,
    DPPerLayerOptimizer: DenoisingDPPerLayerOptimizer,
    DPOptimizerFastGradientClipping: DenoisingDPOptimizerFastGradientClipping,
    DistributedDPOptimizer: DenoisingDistributedDPOptimizer,
    SimpleDistributedPerLayerOptimizer: DenoisingSimpleDistributedPerLayerOptimizer,
    DistributedDPOptimizerFastGradientClipping: (
        DenoisingDistributedDPOptimizerFastGradientClipping
    ),
}

# Why each Opacus flavour we know of has no twin yet, for the error message.
_UNSUPPORTED: dict[type[DPOptimizer], str] = {
    FSDPOptimizerFastGradientClipping: (
        "FSDP shards each 2-D gradient across ranks, and the singular values of a shard are not "
        "those of the matrix"
    ),
    AdaClipDPOptimizer: (
        "adaptive clipping adds noise with an adjusted multiplier and a moving clipping bound"
    ),
}


def denoising_optimizer_class(opacus_class: type[DPOptimizer]) -> type[DPOptimizer]:
    """The denoising twin of an Opacus DP optimizer class.

    Raises:
        NotImplementedError: naming the flavour (FSDP ghost clipping, adaptive clipping, or any
            class we do not know, such as a user subclass) and why it is not supported.
    """
    if opacus_class in _DENOISING_TWINS.values():
        return opacus_class
    twin = _DENOISING_TWINS.get(opacus_class)
    if twin is None:
        reason = _UNSUPPORTED.get(opacus_class, "its noise placement is unknown to rmt_kernels")
        raise NotImplementedError(
            f"rmt_kernels.opacus: denoising is not supported with {opacus_class.__name__}: "
            f"{reason}. Supported: {', '.join(c.__name__ for c in _DENOISING_TWINS)}; "
            "or pass denoise=None."
        )
    return twin
