"""Opacus DP optimizers whose noisy gradient is denoised before the parameter update.

Opacus's ``DPOptimizer.pre_step`` is a template method: clip_and_accumulate -> add_noise ->
scale_grad -> step_hook (the accountant). We override ``scale_grad``: call Opacus's, then run the
post-processing stage the native engine runs (:func:`rmt_kernels.dp.stages.chain.post_process`
with the same :class:`~rmt_kernels.dp.stages.denoiser.Denoiser`; the options checked by the same
:func:`~rmt_kernels.dp.stages.options.check_denoise_options`); ``add_noise`` is overridden too,
only to draw the package's Philox noise (:meth:`_DenoisingMixin.add_noise`). At that point
``p.grad`` is exactly the released DP gradient (clipped sum + noise, divided by the batch size),
so denoising is post-processing and the privacy guarantee is unchanged; the accountant's hook
still runs afterwards, untouched, from Opacus's own ``pre_step``.

What denoising keeps across steps (the sketch seeds' step counter and the post-processors'
state: the Denoiser's warm-start bases) rides in the optimizer's ``state_dict()`` under
``"rmt_denoise"``, so Opacus's own ``PrivacyEngine.save_checkpoint``/``load_checkpoint`` resume
denoising exactly.

Denoising reads only the noisy gradient and public hyper-parameters, by construction:
:meth:`_DenoisingMixin._denoise_grads` hands the post-processors ``p.grad`` and the optimizer's
hyper-parameters (noise multiplier, clipping norm, expected batch size, number of accumulated
physical batches, loss reduction) and nothing else: not ``grad_sample``, not ``summed_grad``, not
the noise generator.

Written against opacus==1.6.0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch.optim import Optimizer

from rmt_kernels.dp.stages.chain import (
    build_chain,
    checkpoint_states,
    first_denoiser,
    post_process,
    spectral_stages,
)
from rmt_kernels.dp.stages.denoiser import Denoiser
from rmt_kernels.dp.stages.options import DenoiseOptions, check_denoise_options
from rmt_kernels.dp.stages.protocol import PostProcessor
from rmt_kernels.ops import OFFSET_STRIDE, add_gaussian_noise, noise_offset

__all__ = [
    "DenoisingDPOptimizer",
    "DenoisingDPOptimizerFastGradientClipping",
    "DenoisingDPPerLayerOptimizer",
    "DenoisingDistributedDPOptimizer",
    "DenoisingDistributedDPOptimizerFastGradientClipping",
    "DenoisingSimpleDistributedPerLayerOptimizer",
    "denoising_optimizer_class",
]

# Bits of the OS-drawn Philox noise key: all the ops' signed 64-bit key can hold.
NOISE_SEED_BITS = 63

# The optimizer state_dict entry that holds the denoising state (DenoisingDPOptimizer.state_dict).
_STATE_KEY = "rmt_denoise"


class _DenoisingMixin:
    """Adds denoising of the 2-D gradients to an Opacus ``DPOptimizer`` subclass.

    Must come before the Opacus class in the bases so its ``__init__`` and ``scale_grad`` wrap
    Opacus's.
    """

    # Set in __init__; declared for type checkers.
    denoise_options: DenoiseOptions | None
    denoise_steps: int
    denoiser: Denoiser | None
    post_processors: list[PostProcessor]

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        denoise: Mapping[str, Any] | DenoiseOptions | None = None,
        post_processors: Sequence[PostProcessor | Callable] | None = None,
        noise_seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        # Validated before Opacus touches the parameters, so a bad option fails cleanly.
        if noise_seed is not None and not (
            isinstance(noise_seed, int) and 0 <= noise_seed < 2**NOISE_SEED_BITS
        ):
            raise ValueError(
                f"noise_seed must be None or an int in [0, 2**{NOISE_SEED_BITS}) (the Philox "
                f"noise key is a signed 64-bit integer), got {noise_seed!r}"
            )
        # The Philox noise key (add_noise); None: Opacus's noise from ``generator``. Kept out of
        # state_dict() and of pickles (torch's Optimizer pickles only its param groups/state).
        self._noise_seed = noise_seed
        # Releases noised so far: the step part of each noise counter, never reused under a key.
        self._noise_step = 0
        self.denoise_options = check_denoise_options(denoise)
        # The chain, as the native engine builds it (rmt_kernels/dp/stages/chain.py: ``denoise``
        # is a Denoiser at its front). Every 2-D gradient is a Denoiser's candidate (keys=None):
        # Opacus knows no modules here.
        self.post_processors = build_chain(self.denoise_options, post_processors)
        self.denoiser = first_denoiser(self.post_processors)
        # Steps denoised so far: the post-processors' step counter (the sketch's seed). The
        # temporal stages count their own steps (every released step), so this counter keeps
        # the meaning it always had.
        self.denoise_steps = 0
        super().__init__(optimizer, **kwargs)  # type: ignore[call-arg]
        if noise_seed is not None:
            for i, p in enumerate(self.params):  # type: ignore[attr-defined]
                if p.numel() > OFFSET_STRIDE:
                    raise ValueError(
                        f"parameter {i} has {p.numel()} elements: the Philox noise gives each "
                        f"parameter {OFFSET_STRIDE} counters, so its noise would overlap the next "
                        "parameter's; split it"
                    )

    def add_noise(self) -> None:
        """Opacus's ``add_noise`` with the noise of the package's Philox stream when the
        optimizer has a ``noise_seed``: ``p.grad = summed_grad + N(0, std^2)`` drawn at counter
        ``noise_offset(release, parameter index, parameter count)``, so every (release,
        parameter) pair has its own 2^32 counters under the key and no noise is ever reused.
        Without a seed, or on a rank that Opacus does not let noise, Opacus's own method runs.
        """
        if self._noise_seed is None or not self._adds_noise():
            super().add_noise()  # type: ignore[misc]
            return
        std = self._noise_std()
        params = self.params  # type: ignore[attr-defined]
        for i, p in enumerate(params):
            _check_processed_flag(p.summed_grad)
            noise = torch.zeros(p.summed_grad.shape, dtype=torch.float32, device=p.device)
            if std > 0:
                offset = noise_offset(self._noise_step, i, len(params))
                noise = add_gaussian_noise(noise, std, self._noise_seed, offset)
            p.grad = (p.summed_grad + noise.to(p.summed_grad.dtype)).view_as(p)
            _mark_as_processed(p.summed_grad)
        self._noise_step += 1

    def _adds_noise(self) -> bool:
        """Whether this optimizer adds the noise (every rank but rank 0 of a distributed run
        adds none in Opacus)."""
        return True

    def state_dict(self) -> dict[str, Any]:
        """Opacus's (the wrapped optimizer's state dict) plus, when denoising,
        ``"rmt_denoise"``: ``{"steps": denoise_steps, "post_processors": [each one's
        state_dict()]}``. Plain values and tensors (``torch.load(weights_only=True)`` loads it);
        torch optimizers ignore the extra entry."""
        state = super().state_dict()  # type: ignore[misc]
        if self.post_processors:
            state = {
                **state,
                _STATE_KEY: {
                    "steps": self.denoise_steps,
                    "post_processors": checkpoint_states(self.post_processors),
                },
            }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned. A state without ``"rmt_denoise"`` (a
        plain torch or Opacus optimizer's) leaves the denoising state as it is.

        Raises:
            ValueError: ``"rmt_denoise"`` given to an optimizer that does not denoise, or with
                another number of post-processor states, or a bad step counter; or a
                post-processor refused its state (its message).
        """
        extra = state_dict.get(_STATE_KEY)
        if extra is not None:
            where = f"{type(self).__name__}.load_state_dict"
            if not isinstance(extra, Mapping):
                raise ValueError(
                    f"{where}: {_STATE_KEY!r} must be a dict, got {type(extra).__name__}"
                )
            processors = extra.get("post_processors")
            steps = extra.get("steps")
            if not self.post_processors:
                raise ValueError(
                    f"{where}: the state holds denoising state; this optimizer has no "
                    "post-processors (denoise=None)"
                )
            if not isinstance(processors, (list, tuple)) or len(processors) != len(
                self.post_processors
            ):
                count = len(processors) if isinstance(processors, (list, tuple)) else processors
                raise ValueError(
                    f"{where}: {count} post-processor states for "
                    f"{len(self.post_processors)} post-processors"
                )
            if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
                raise ValueError(f"{where}: 'steps' must be an int >= 0, got {steps!r}")
            # The post-processors first: they check their state before anything is replaced.
            for processor, processor_state in zip(self.post_processors, processors, strict=True):
                processor.load_state_dict(processor_state)
            self.denoise_steps = steps
            state_dict = {k: v for k, v in state_dict.items() if k != _STATE_KEY}
        super().load_state_dict(state_dict)  # type: ignore[misc]

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
        if self.post_processors:
            self._denoise_grads()

    def _denoise_grads(self) -> None:
        """The post-processing stage (:func:`rmt_kernels.dp.stages.chain.post_process`) on
        ``p.grad``, keyed by the parameter's index in ``params``.

        Reads only ``p.grad`` and public hyper-parameters (post-processing). The
        :class:`~rmt_kernels.dp.stages.denoiser.Denoiser` shrinks every 2-D gradient whose smaller
        side is at least ``min_dim`` (default 32): embedding tables included (the native engine
        leaves embeddings alone by default), tiny heads left alone as in the native engine; 1-D
        (biases, norms) and >2-D (convolution kernels) gradients are left exactly as Opacus made
        them (the Marchenko-Pastur model is for matrices, and a reshaped kernel has no reason to
        be low-rank). A fixed ``rank`` is capped per matrix. With no noise (``sigma`` 0) nothing
        is denoised.
        """
        sigma = self.denoise_sigma()
        params = self.params  # type: ignore[attr-defined]
        grads = {i: p.grad for i, p in enumerate(params) if p.grad is not None}
        step = self.denoise_steps
        # Opacus leaves the clean clipped sum (summed_grad) and the per-example gradients
        # (grad_sample) on the parameters until zero_grad; its accountant hook still reads
        # grad_sample after this. A stage that reaches the parameters (the model in its closure)
        # would find them, so they are held aside while the chain runs (privacy invariant 4,
        # PRIVACY.md; tests/test_postprocess_adversarial.py) and put back after.
        held = [
            (p, name, getattr(p, name))
            for p in params
            for name in ("grad_sample", "summed_grad")
            if getattr(p, name, None) is not None
        ]
        for p, name, _ in held:
            setattr(p, name, None)
        try:
            # The step counter advances only on steps that denoise something (its meaning since
            # the first release: the sketch seed of the t-th denoised step is seed + t),
            # whichever stage of the chain does (a Denoiser, a TrajectoryDenoiser).
            spectral = spectral_stages(self.post_processors)
            if sigma > 0 and any(s.selected(grads) for s in spectral):
                self.denoise_steps += 1
            out = post_process(self.post_processors, grads, sigma, step)
        finally:
            for p, name, value in held:
                setattr(p, name, value)
        for i, g in out.items():
            if g is not grads[i]:
                params[i].grad = g


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

    def _adds_noise(self) -> bool:
        return self.rank == 0  # type: ignore[attr-defined]

    def scale_grad(self) -> None:
        # Skip _DenoisingMixin.scale_grad: before the all-reduce each rank holds a partial sum.
        super(_DenoisingMixin, self).scale_grad()  # type: ignore[misc]

    def reduce_gradients(self) -> None:
        super().reduce_gradients()  # type: ignore[misc]
        if self.post_processors:
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

    With ``denoise=None`` and ``noise_seed=None`` it is Opacus's DPOptimizer, bit for bit; with a
    ``noise_seed`` only ``add_noise`` differs (the package's Philox noise keyed by the seed,
    :meth:`_DenoisingMixin.add_noise`). The accountant's step hook,
    skipped virtual steps (BatchMemoryManager), gradient accumulation and secure mode work as in
    Opacus: only ``scale_grad`` is extended.

    Args:
        optimizer: the wrapped torch optimizer.
        denoise: keyword options of :func:`rmt_kernels.denoise` (``shrinker``, ``kappa``,
            ``rank``, ``oversample``, ``niter``, ``norm``, ``seed``), or None for plain Opacus.
            ``seed`` is the base seed of the sketch's test matrix; step ``t`` uses ``seed + t``.
            ``rank`` (if not -1) is capped at ``min(m, n)`` per matrix.
        noise_seed: a secret Philox noise key in [0, 2^63) (DenoisingPrivacyEngine draws one
            from the OS), or None for Opacus's noise from ``generator``. Never in
            ``state_dict()`` nor in a pickle.
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
