"""The post-processing chain of an engine: ``denoise=`` and ``post_processors=`` made into one
checked list of stages, the stage that runs it (:func:`post_process`), and what both engines ask
of it (which stages denoise, the noise level each stage was given, their statistics). Every
question is a hook of :class:`~rmt_kernels.dp.stages.protocol.PostProcessor`, called directly.

Both engines (``rmt_kernels.dp.make_private`` and the Opacus drop-in) build their chain here:

- ``post_processors=[...]``: the stages, in order (each a
  :class:`~rmt_kernels.dp.stages.protocol.PostProcessor`, or a plain callable ``(grads, sigma,
  step) -> grads``, wrapped once here in a
  :class:`~rmt_kernels.dp.stages.protocol.CallableStage`);
- ``denoise={...}``: shorthand for a :class:`~rmt_kernels.dp.stages.denoiser.Denoiser` with
  those options. With both, the Denoiser comes FIRST: ``denoise=D, post_processors=[A, B]`` is the
  chain ``[Denoiser(D), A, B]`` (shrink the released gradient, then filter: what ``denoise=``
  always did, with stages appended after it). To shrink later in the chain (a filtered moment),
  put the Denoiser in ``post_processors`` and leave ``denoise`` None.

Checks: a stage object appears once (two places would share one running state); a ``terminal``
stage (one whose output is a step direction, not a noisy gradient:
:class:`~rmt_kernels.dp.stages.dp_adam.DPAdam`,
:class:`~rmt_kernels.dp.stages.trajectory.TrajectoryDenoiser`,
:class:`~rmt_kernels.dp.stages.temporal.DiSKExtrapolation`) is the last, except that a stage marked
``after_direction`` (DiSKExtrapolation, which turns a direction into DiSK's) may follow one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from rmt_kernels.dp.stages.denoiser import Denoiser
from rmt_kernels.dp.stages.options import DenoiseOptions
from rmt_kernels.dp.stages.protocol import (
    CallableStage,
    Key,
    PostProcessor,
    as_stage,
    checkpoint_state,
    remember_initial_state,
)

__all__ = [
    "build_chain",
    "checkpoint_states",
    "first_denoiser",
    "post_process",
    "refuse_non_finite_output",
    "set_record_stats",
    "spectral_stages",
    "stage_input_sigmas",
    "take_stats",
]


def build_chain(
    denoise: Mapping[str, Any] | DenoiseOptions | None,
    post_processors: Iterable[PostProcessor | Callable] | None,
) -> list[PostProcessor]:
    """The checked chain of stages (module docstring), plain callables wrapped.

    Raises:
        TypeError: ``post_processors`` is not a sequence of post-processors or callables, or
            holds a callable that defines a hook of the protocol without subclassing
            :class:`PostProcessor` (its state would be silently dropped).
        ValueError: a stage appears twice, or a terminal stage is not last.
        DenoiseOptionError, TypeError, ValueError: bad ``denoise`` options.
    """
    if post_processors is not None and (
        isinstance(post_processors, (str, bytes, Mapping))
        or not isinstance(post_processors, Iterable)
    ):
        raise TypeError(
            "post_processors must be a list of post-processors (rmt_kernels.dp.PostProcessor) "
            f"or None, got {type(post_processors).__name__}"
        )
    chain: list[PostProcessor] = [] if denoise is None else [_option_denoiser(denoise)]
    for i, stage in enumerate(post_processors or ()):
        if not (isinstance(stage, PostProcessor) or callable(stage)):
            raise TypeError(
                f"post_processors[{i}] must be a PostProcessor or a callable (grads, sigma, step) "
                f"-> grads, got {type(stage).__name__}"
            )
        hooks = _protocol_hooks(stage)
        if hooks:
            raise TypeError(
                f"post_processors[{i}] ({type(stage).__name__}) defines {', '.join(hooks)} but "
                "is not a rmt_kernels.dp.PostProcessor: as a plain callable its hooks would be "
                "ignored (its state never checkpointed, a resume silently resetting it); "
                "subclass PostProcessor"
            )
        if any(_unwrapped(stage) is _unwrapped(other) for other in chain):
            raise ValueError(
                f"post_processors[{i}] ({stage!r}) appears twice in the chain: each place needs "
                "its own stage (its own running state)"
            )
        chain.append(as_stage(stage))
    for stage in chain:  # a checkpoint refuses one whose undeclared state changes since
        remember_initial_state(stage)
    for i, stage in enumerate(chain[:-1]):
        after = chain[i + 1]
        if stage.terminal and not after.after_direction:
            raise ValueError(
                f"{stage!r} outputs a step direction, not a noisy gradient: it must be the last "
                f"stage, but {after!r} follows it"
            )
    return chain


#: Marks the Denoiser that ``denoise=`` put first in a chain: the user's ``post_processors[i]``
#: is then the chain's stage i + 1, and messages must name the user's index.
_FROM_DENOISE_OPTION = "_rmt_from_denoise_option"


def _option_denoiser(denoise: Mapping[str, Any] | DenoiseOptions) -> Denoiser:
    denoiser = Denoiser(denoise)
    object.__setattr__(denoiser, _FROM_DENOISE_OPTION, True)
    return denoiser


def checkpoint_states(chain: Sequence[PostProcessor]) -> list[dict[str, Any]]:
    """Every stage's :func:`checkpoint_state`, a refusal naming the stage by its index in the
    user's ``post_processors`` (the Denoiser of ``denoise=`` comes first but is not in it)."""
    offset = int(bool(chain) and getattr(chain[0], _FROM_DENOISE_OPTION, False))
    return [checkpoint_state(stage, i - offset) for i, stage in enumerate(chain)]


def _protocol_hooks(stage: Any) -> list[str]:
    """The hooks of :class:`PostProcessor` a callable that is not one defines (sorted): the
    chain would wrap it as a plain function and never call them."""
    if isinstance(stage, PostProcessor):
        return []
    declared = (name for name in vars(PostProcessor) if not name.startswith("_"))
    return sorted(name for name in declared if hasattr(stage, name))


def _unwrapped(stage: PostProcessor) -> Any:
    """What the user gave for this stage: the function of a :class:`CallableStage`."""
    return stage.function if isinstance(stage, CallableStage) else stage


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
        if processor.needs_released:
            out = processor(grads, sigma, step, released=released, released_sigma=released_sigma)
        else:
            out = processor(grads, sigma, step)
        sigma = processor.output_sigma(sigma, step)
        grads = out
    return grads


def spectral_stages(chain: Sequence[PostProcessor]) -> list[PostProcessor]:
    """The stages that shrink matrices and take the engine's choice of what to denoise
    (``shrinks_matrices``: a Denoiser, a TrajectoryDenoiser)."""
    return [s for s in chain if s.shrinks_matrices]


def first_denoiser(chain: Sequence[PostProcessor]) -> Denoiser | None:
    """The first :class:`~rmt_kernels.dp.stages.denoiser.Denoiser` of the chain, or None."""
    return next((s for s in chain if isinstance(s, Denoiser)), None)


def stage_input_sigmas(chain: Sequence[PostProcessor], sigma: float, step: int) -> list[float]:
    """The noise std each stage was given at the step just run (what :func:`post_process`
    computed: ``output_sigma`` of the stage before, a pure function of public numbers and the
    stage's state after the call)."""
    sigmas = []
    for stage in chain:
        sigmas.append(sigma)
        sigma = stage.output_sigma(sigma, step)
    return sigmas


def take_stats(
    chain: Sequence[PostProcessor], sigmas: Sequence[float] | None
) -> dict[Key, dict[str, Any]]:
    """Per denoised matrix of the last step recorded: each spectral stage's ``take_stats()``
    (kept rank, norm ratio) plus ``sigma``, the noise level it shrank at (its input's, unless
    the stage reports its own: a TrajectoryDenoiser's sum), and ``stage``, its
    place in the chain. A matrix shrunk by two stages is keyed ``"<key>@<stage>"`` the second
    time."""
    stats: dict[Key, dict[str, Any]] = {}
    for index, stage in enumerate(chain):
        if not stage.shrinks_matrices:
            continue
        for key, values in stage.take_stats().items():
            record = {**values, "stage": index}
            if sigmas is not None:
                # A stage that shrinks at its own level (the trajectory's sum) says it.
                record.setdefault("sigma", float(sigmas[index]))
            stats[key if key not in stats else f"{key}@{index}"] = record
    return stats


def set_record_stats(chain: Sequence[PostProcessor], value: bool) -> None:
    """Set ``record_stats`` on every spectral stage (their statistics cost an SVD per matrix at
    the take, so they are recorded only when asked)."""
    for stage in spectral_stages(chain):
        stage.record_stats = value


def refuse_non_finite_output(
    processors: Sequence[PostProcessor], grads: Mapping[Key, torch.Tensor], keys: Sequence[Key]
) -> None:
    """Refuse a chain's output with a NaN or infinite entry (nothing to check without a chain).

    The native engine's released gradient is finite (privacy invariant 6, PRIVACY.md: a
    non-finite example contributes nothing), so a non-finite entry after the chain is a stage's
    doing, which would silently train the model into NaN. One stacked check: one device sync
    per step, only with a chain.

    Args:
        processors: the chain that made ``grads``.
        grads: its output, by key.
        keys: the keys to check (every privatised parameter's).

    Raises:
        RuntimeError: naming the first keys with a non-finite entry.
    """
    if not processors:
        return
    finite = torch.stack([torch.isfinite(grads[k]).all() for k in keys])
    if not bool(finite.all()):
        bad = [k for k, ok in zip(keys, finite.tolist(), strict=True) if not ok]
        raise RuntimeError(
            f"DP engine: the post-processors returned a non-finite gradient for {bad[:3]} (the "
            "released gradient was finite): a post-processor must return finite gradients"
        )
