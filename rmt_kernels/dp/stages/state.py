"""Checkpoint state of the post-processing stages (temporal.py, dp_adam.py, trajectory.py): what
each stage keeps across steps (per-gradient tensors, a step counter, its hyper-parameters) as
plain values and tensors, checked when loaded.

A stage's ``state_dict()`` must load with ``torch.load(weights_only=True)`` (dicts keyed by the
gradients' keys, str in the native engine and int in the Opacus drop-in; tensors; numbers) and
its ``load_state_dict()`` must refuse what another stage, other hyper-parameters or a corrupt
file would silently turn into a different run. These helpers say what is wrong, naming the stage.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Hashable, Mapping
from typing import Any

import torch

__all__ = [
    "check_fields",
    "check_hyper_parameters",
    "check_noise_variance",
    "check_step_count",
    "check_tensors",
    "clone_tensors",
    "same_keys",
]


def check_fields(stage: str, state: Any, fields: tuple[str, ...]) -> Mapping[str, Any]:
    """``state`` is a mapping with exactly these fields (what ``stage``'s ``state_dict`` wrote).

    Raises:
        TypeError: ``state`` is not a mapping.
        ValueError: a field is missing, or an unknown one is present.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"{stage}.load_state_dict: expected a dict, got {type(state).__name__}")
    missing = [f for f in fields if f not in state]
    unknown = sorted((str(k) for k in state if k not in fields), key=str)
    if missing or unknown:
        raise ValueError(
            f"{stage}.load_state_dict: not a {stage} state (missing {missing or 'nothing'}, "
            f"unknown {unknown or 'nothing'})"
        )
    return state


def check_hyper_parameters(stage: str, state: Mapping[str, Any], mine: Mapping[str, Any]) -> None:
    """The saved hyper-parameters equal this stage's: a state of another setting would resume a
    different run.

    Raises:
        ValueError: naming the first hyper-parameter that differs.
    """
    for name, value in mine.items():
        saved = state.get(name)
        if isinstance(value, float) and isinstance(saved, numbers.Real):
            same = float(saved) == value or (math.isnan(value) and math.isnan(float(saved)))
        else:
            same = saved == value and type(saved) is type(value)
        if not same:
            raise ValueError(
                f"{stage}.load_state_dict: the state was saved with {name}={saved!r}, this "
                f"stage has {name}={value!r}"
            )


def check_step_count(stage: str, value: Any, name: str = "t") -> int:
    """A step counter: an int >= 0.

    Raises:
        TypeError, ValueError: naming ``stage`` and ``name``.
    """
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{stage}.load_state_dict: {name} must be an int, got {value!r}")
    if value < 0:
        raise ValueError(f"{stage}.load_state_dict: {name} must be >= 0, got {value}")
    return int(value)


def check_noise_variance(stage: str, value: Any) -> float:
    """The tracked variance of a stage's output noise: a finite real >= 0, as a float.

    Raises:
        ValueError: naming ``stage`` (a NaN, infinite or negative value sets the noise level
            that a later Denoiser thresholds at).
    """
    if not (isinstance(value, numbers.Real) and 0 <= value < math.inf):
        raise ValueError(f"{stage}.load_state_dict: bad noise_var {value!r}")
    return float(value)


def check_tensors(stage: str, value: Any, name: str) -> dict[Hashable, torch.Tensor]:
    """A dict of finite float tensors keyed by gradient keys (str or int), cloned.

    Raises:
        TypeError: not a dict of tensors, or a key that is neither str nor int.
        ValueError: a tensor with a non-finite entry or a non-float dtype.
    """
    if not isinstance(value, Mapping):
        raise TypeError(f"{stage}.load_state_dict: {name} must be a dict, got {type(value)}")
    out: dict[Hashable, torch.Tensor] = {}
    for key, tensor in value.items():
        if not isinstance(key, (str, int)) or isinstance(key, bool):
            raise TypeError(f"{stage}.load_state_dict: {name} key {key!r} is not a str or int")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"{stage}.load_state_dict: {name}[{key!r}] must be a tensor, got "
                f"{type(tensor).__name__}"
            )
        if not tensor.is_floating_point():
            raise ValueError(f"{stage}.load_state_dict: {name}[{key!r}] has dtype {tensor.dtype}")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{stage}.load_state_dict: {name}[{key!r}] is not finite")
        out[key] = tensor.detach().clone()
    return out


def clone_tensors(tensors: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
    """A copy that later in-place updates of the stage do not reach (for ``state_dict``)."""
    return {k: v.detach().clone() for k, v in tensors.items()}


def same_keys(stage: str, kept: Mapping[Hashable, Any], grads: Mapping[Hashable, Any]) -> None:
    """The gradients of this step are those the stage has kept state for (after the first step).

    Raises:
        ValueError: the keys or a shape changed (a parameter added, dropped or reshaped: its
            running state would be wrong).
    """
    if not kept:
        return
    if set(kept) != set(grads):
        added = sorted(map(str, set(grads) - set(kept)))
        dropped = sorted(map(str, set(kept) - set(grads)))
        raise ValueError(
            f"{stage}: the gradients changed since the last step (new {added[:3] or 'none'}, "
            f"missing {dropped[:3] or 'none'}); a running filter needs every gradient every step"
        )
    for key, tensor in kept.items():
        if tuple(tensor.shape) != tuple(grads[key].shape):
            raise ValueError(
                f"{stage}: the gradient {key!r} has shape {tuple(grads[key].shape)}, its state "
                f"{tuple(tensor.shape)}"
            )
