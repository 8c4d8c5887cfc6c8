"""What a post-processing stage is: the hooks the chain calls, each declared here with its
default, and the adapter that makes a plain function a stage.

The private step of both engines is a template (rmt_kernels/dp/engine.py has the native one):
clip and accumulate -> add noise -> all-reduce -> **post-process** -> write gradients -> account.
When the post-processing stage runs, the gradient is already the released mechanism output (the
clipped sum plus its Gaussian noise, averaged, summed over ranks), so anything computed from it
and from public numbers alone is post-processing and leaves the privacy guarantee unchanged.

A stage is a :class:`PostProcessor`: ``__call__(grads, sigma, step)`` gets

- ``grads``: the noisy averaged gradients, keyed by a stable key (the native engine: the
  parameter's qualified name, e.g. ``"encoder.layer.0.attention.self.query.weight"``; the Opacus
  drop-in: the parameter's index in the optimizer's ``params``);
- ``sigma``: the public per-entry noise std of those gradients;
- ``step``: a public step counter (the native engine: the logical step; Opacus: the number of
  steps denoised before this one),

and returns the dict of gradients to pass on (the same tensors where it changes nothing). It must
read nothing else: no clean gradient, no per-example norms, no noise seed (privacy invariant 4,
PRIVACY.md: nothing enforces this for a post-processor you write). Whatever it keeps across
steps goes in ``state_dict()`` (plain Python values and tensors: a checkpoint loads it with
``torch.load(weights_only=True)``) and comes back through ``load_state_dict()``, so that a resumed
run is bit-identical to an uninterrupted one; a stage that keeps tensors in its attributes and
leaves ``state_dict`` at its default is refused when a checkpoint is taken
(:func:`checkpoint_state`), not silently reset at the resume.

Every other hook is declared on :class:`PostProcessor` with a default that suits a stage which
does not use it, so the chain (rmt_kernels/dp/stages/chain.py) and both engines call the hooks
directly and a new stage overrides only what it does differently: a temporal filter its
``output_sigma`` and state, a stage that shrinks matrices ``shrinks_matrices`` and the selection
hooks (``eligible``, ``restrict_to``, ``keys``, ``record_stats``, ``take_stats``). A plain
callable ``(grads, sigma, step) -> grads`` given as a stage is wrapped once, when the chain is
built, in a :class:`CallableStage`: a stage with every default (no state, noise level unchanged).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import torch

from rmt_kernels.dp.stages.state_digest import state_digest

__all__ = [
    "CallableStage",
    "Key",
    "PostProcessor",
    "as_stage",
    "checkpoint_state",
    "remember_initial_state",
]

Key = Hashable


class PostProcessor:
    """One post-processing stage of the released gradient (module docstring).

    Subclasses implement ``__call__`` and override the hooks below that they use; the defaults
    describe a stage that keeps no state, leaves the noise level as it is, outputs a noisy
    gradient (not a step direction) and shrinks no matrix.
    """

    #: The output is a step direction, not a noisy gradient (a DPAdam, a TrajectoryDenoiser):
    #: the stage must be the chain's last, unless the stage after it is ``after_direction``.
    terminal: bool = False

    #: The stage turns a step direction into another (DiSK's extrapolation): it may follow a
    #: ``terminal`` stage.
    after_direction: bool = False

    #: The stage needs the released gradient itself as well as the previous stage's output
    #: (for example an Adam whose second moment is computed from the noisy gradient while its
    #: numerator is denoised): :func:`~rmt_kernels.dp.stages.chain.post_process` then also
    #: passes ``released=`` (the stage-4 input, untouched) and ``released_sigma=`` (its std).
    needs_released: bool = False

    #: The stage shrinks matrices and takes the engine's choice of which (a Denoiser, a
    #: TrajectoryDenoiser): the engine calls :meth:`restrict_to` with the keys its
    #: ``denoise_filter`` selects among those :meth:`eligible`, the Opacus drop-in counts a
    #: step as denoised when :meth:`selected` is not empty, and the statistics come from
    #: :meth:`take_stats` after ``record_stats`` was set.
    shrinks_matrices: bool = False

    #: Set before a step to keep that step's statistics for :meth:`take_stats` (a stage that
    #: shrinks matrices only: they cost an SVD per matrix at the take).
    record_stats: bool = False

    #: The only gradient keys the stage may shrink, or None for any (a stage that shrinks
    #: matrices; set by :meth:`restrict_to`).
    keys: frozenset[Key] | None = None

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

    def output_sigma(self, sigma: float, step: int) -> float:
        """Per-entry noise std of this stage's output, given its input's ``sigma`` at ``step``.

        :func:`~rmt_kernels.dp.stages.chain.post_process` hands it to the next stage as that
        stage's ``sigma``. The default (unchanged) suits a stage that leaves the noise as it is
        or one after which no noise level is meaningful (shrinkage); a linear filter (an EMA of
        the noisy gradients) overrides it with its exact output noise std. A public function of
        public numbers.
        """
        return sigma

    def eligible(self, shape: Sequence[int]) -> bool:
        """Whether the stage can shrink a gradient of this shape at all (default: never)."""
        return False

    def restrict_to(self, keys: Iterable[Key]) -> None:
        """Shrink only these keys from now on (the engine's filter decision). The default
        does nothing: a stage that shrinks no matrix has nothing to restrict."""

    def selected(self, grads: Mapping[Key, torch.Tensor]) -> list[Key]:
        """The keys of ``grads`` the stage would shrink, in ``grads``'s order (default: none)."""
        return []

    def take_stats(self) -> dict[Key, dict[str, Any]]:
        """Per matrix shrunk at the last step run with ``record_stats`` set, its statistics;
        forgets what it returns. The default has none: ``{}``."""
        return {}

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


class CallableStage(PostProcessor):
    """A plain function ``(grads, sigma, step) -> grads`` as a stage: every hook its default
    (no state, the noise level unchanged, not terminal, shrinks no matrix).

    Args:
        function: called as the stage.
    """

    def __init__(self, function: Callable[..., dict[Key, torch.Tensor]]) -> None:
        #: The wrapped function.
        self.function = function

    def __repr__(self) -> str:
        return repr(self.function)

    def __call__(
        self, grads: dict[Key, torch.Tensor], sigma: float, step: int
    ) -> dict[Key, torch.Tensor]:
        """The function's output for these gradients."""
        return self.function(grads, sigma, step)


def _holds_tensor(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is a tensor or a (nested, a few levels) container holding one."""
    if isinstance(value, torch.Tensor):
        return True
    if depth >= 3:
        return False
    if isinstance(value, Mapping):
        return any(_holds_tensor(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(_holds_tensor(v, depth + 1) for v in value)
    return False


# Where remember_initial_state keeps a stage's digest (left out of the digest itself).
_INITIAL_DIGEST = "_rmt_initial_state_digest"


def _declares_no_state(stage: PostProcessor) -> bool:
    return type(stage).state_dict is PostProcessor.state_dict


def _digest(stage: PostProcessor) -> str:
    # A plain function counts by its tensors alone (state_digest.py says why).
    arrays_only = isinstance(stage, CallableStage)
    return state_digest(stage, skip=frozenset({_INITIAL_DIGEST}), arrays_only=arrays_only)


def remember_initial_state(stage: PostProcessor) -> None:
    """Note what ``stage`` reaches now (the chain is being built), so that
    :func:`checkpoint_state` can refuse a stage with the default ``state_dict`` whose state
    changed since (rmt_kernels/dp/stages/state_digest.py). Nothing for a stage that overrides
    ``state_dict``: it says itself what survives."""
    if _declares_no_state(stage):
        object.__setattr__(stage, _INITIAL_DIGEST, _digest(stage))


def checkpoint_state(stage: PostProcessor, position: int) -> dict[str, Any]:
    """``stage.state_dict()`` for a checkpoint, refusing a stage that would be reset silently.

    A subclass that keeps tensors in its attributes (a momentum, a running spectrum) but leaves
    :meth:`PostProcessor.state_dict` at its default (empty) would lose them at every resume,
    and the resumed run would silently differ from an uninterrupted one. Such a stage must say
    what survives: override ``state_dict`` / ``load_state_dict`` (returning ``{}`` explicitly
    if its tensors are constants).

    Args:
        stage: the stage.
        position: its index in the chain (for the message).

    A stage with the default ``state_dict`` whose state changed in any other way since the
    chain was built (:func:`remember_initial_state`: a deque, a plain object, a module's buffer,
    a numpy array, a float, a generator, a closure's variable) is refused the same way.

    Raises:
        TypeError: the stage has the default ``state_dict`` and tensors among its attributes,
            or state that changed since the chain was built.
    """
    if _declares_no_state(stage):
        held = sorted(name for name, v in vars(stage).items() if _holds_tensor(v))
        if held:
            raise TypeError(
                f"post_processors[{position}] ({type(stage).__name__}) keeps tensors in "
                f"{held} but does not override state_dict: a checkpoint would lose them and a "
                "resumed run would differ from an uninterrupted one; override state_dict and "
                "load_state_dict (return {} explicitly if they are constants)"
            )
        initial = getattr(stage, _INITIAL_DIGEST, None)
        if initial is not None and initial != _digest(stage):
            what = (
                repr(stage.function) if isinstance(stage, CallableStage) else type(stage).__name__
            )
            raise TypeError(
                f"post_processors[{position}] ({what[:80]}) changed its state since the chain "
                "was built (in its attributes, a container, an object it holds or a closure) "
                "but does not override state_dict: a checkpoint would lose that state and a "
                "resumed run would differ from an uninterrupted one; make it a "
                "rmt_kernels.dp.PostProcessor that overrides state_dict and load_state_dict "
                "(return {} explicitly if what changes need not survive a resume)"
            )
    return stage.state_dict()


def as_stage(stage: PostProcessor | Callable[..., dict[Key, torch.Tensor]]) -> PostProcessor:
    """``stage`` itself when it is a :class:`PostProcessor`, else a :class:`CallableStage`
    around it (the caller checked that it is callable)."""
    return stage if isinstance(stage, PostProcessor) else CallableStage(stage)
