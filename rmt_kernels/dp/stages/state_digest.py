"""A digest of everything a post-processing stage can reach, to see whether it changed.

A stage that leaves :meth:`~rmt_kernels.dp.stages.protocol.PostProcessor.state_dict` at its
(empty) default declares that it keeps nothing across steps; a resume then starts it afresh. If
it does keep something (a momentum in a deque, in a plain object or a dataclass, a module's
buffer, a numpy array, a float that decays, a torch.Generator, a closure's variable, the state of
a ``functools.partial`` or of a bound method's object), the resumed run silently differs from an
uninterrupted one (red team 28: all of these diverged, only tensors directly in an attribute or
a shallow list or dict were refused). Rather than guess where state may hide, the chain takes a
digest of all the stage reaches when it is built, and :func:`checkpoint_state
<rmt_kernels.dp.stages.protocol.checkpoint_state>` refuses a stage with the default
``state_dict`` whose digest has changed since.

A plain function given as a stage (wrapped in a ``CallableStage``) counts by its tensors, numpy
arrays and generators alone: the protocol calls it stateless, and a closure that collects floats
for a log (the ``sigma`` of every step) is not state its output depends on, while a momentum it
keeps is a tensor.

The digest is compared within one process only (built and checked by the same run), so an
object it cannot look into is represented by its ``repr`` and type. The model's parameters, an
optimizer and a learning-rate scheduler count by type only: a stage may read them (a weight
decay, the current rate) and a checkpoint restores them itself. Not seen: state kept outside
the stage's reach (a module-level global, a class attribute, a file), and deeper than
:data:`MAX_DEPTH` levels.
"""

from __future__ import annotations

import functools
import hashlib
import random
import sys
import types
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["MAX_DEPTH", "state_digest"]

#: Levels of nesting followed from the stage (a momentum dict inside an object inside the stage
#: is three); beyond that a value counts by its type alone.
MAX_DEPTH = 12

#: What a checkpoint restores by itself, so a stage may read it (a weight decay from the model's
#: parameters, a learning rate from the optimizer or its scheduler): counted by type only.
_RESTORED_ELSEWHERE = (
    torch.nn.Parameter,
    torch.optim.Optimizer,
    torch.optim.lr_scheduler.LRScheduler,
)

#: Attributes the engine sets on a stage (the selection of ``restrict_to``, the statistics
#: switch): not the stage's own state.
ENGINE_SET = frozenset({"keys", "record_stats"})


def state_digest(
    stage: Any, skip: frozenset[str] = frozenset(), *, arrays_only: bool = False
) -> str:
    """SHA-256 of the values reachable from ``stage`` (its attributes, slots, containers,
    tensors' bytes, closures; module docstring).

    Args:
        stage: the object.
        skip: attribute names of ``stage`` itself to leave out (besides :data:`ENGINE_SET`).
        arrays_only: count only tensors, numpy arrays and random generators (a plain
            function's closure often collects floats for a log: not state the step reads).

    Returns:
        The hex digest; equal digests within one process mean nothing reachable changed.
    """
    h = hashlib.sha256()

    def put(data: bytes, array: bool = False) -> None:
        if array or not arrays_only:
            h.update(data)

    _feed(put, stage, 0, set(), skip | ENGINE_SET)
    return h.hexdigest()


def _feed(put, value: Any, depth: int, seen: set[int], skip: frozenset[str]) -> None:
    """Hand ``value`` (and what it holds) to ``put(bytes, array)``."""
    put(type(value).__qualname__.encode())
    if isinstance(value, _RESTORED_ELSEWHERE):
        return  # a stage may read the model's weights or the optimizer: a checkpoint has them
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        put(repr(value).encode())
        return
    if isinstance(value, torch.Tensor):
        put(_tensor_bytes(value), array=True)
        return
    if isinstance(value, np.ndarray):
        head = f"{value.dtype}{value.shape}".encode()
        put(head + np.ascontiguousarray(value).tobytes(), array=True)
        return
    if isinstance(value, torch.Generator):
        put(_tensor_bytes(value.get_state()), array=True)
        return
    if isinstance(value, random.Random):
        put(repr(value.getstate()).encode(), array=True)
        return
    if isinstance(value, np.random.RandomState):
        put(repr(value.get_state()).encode(), array=True)
        return
    if isinstance(value, np.random.Generator):
        put(repr(value.bit_generator.state).encode(), array=True)
        return
    if depth >= MAX_DEPTH or id(value) in seen or isinstance(value, type):
        return  # a class's own attributes, or a cycle: not followed
    seen.add(id(value))
    try:
        children = _children(value, skip if depth == 0 else frozenset())
    except Exception:  # a proxy or an object whose attributes raise: its repr stands for it
        children = None
    if children is None:
        put(_safe_repr(value).encode())
        return
    for child in children:
        _feed(put, child, depth + 1, seen, skip)


def _children(value: Any, skip: frozenset[str]) -> list[Any] | None:
    """What ``value`` holds (names included, so a value moved between attributes counts), or
    None for an object to represent by its ``repr``."""
    if isinstance(value, Mapping):
        return [x for item in value.items() for x in item]
    if isinstance(value, (list, tuple, set, frozenset)) or type(value).__name__ == "deque":
        return list(value)
    if isinstance(value, functools.partial):
        return [value.func, value.args, value.keywords]
    if isinstance(value, types.MethodType):
        return [value.__func__, value.__self__]
    if isinstance(value, types.FunctionType):
        cells = [c.cell_contents for c in value.__closure__ or () if _cell_full(c)]
        return [value.__qualname__, value.__defaults__, value.__kwdefaults__, *cells]
    if isinstance(value, types.SimpleNamespace):
        return [x for item in vars(value).items() for x in item]
    if type(value).__module__.partition(".")[0] in sys.stdlib_module_names:
        # A logger (its level cache fills as it logs), a lock, a file: a service the stage
        # uses, not state it keeps (a stdlib value worth following is handled above).
        return None
    held: list[Any] = []
    for cls in type(value).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if name not in skip and hasattr(value, name):
                held += [name, getattr(value, name)]
    attributes = getattr(value, "__dict__", None)
    if isinstance(attributes, dict):
        held += [x for k, v in attributes.items() if k not in skip for x in (k, v)]
    return held if held or attributes is not None else None


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)
    except Exception:  # a repr that fails: the type (already hashed) alone
        return ""


def _cell_full(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018 (an empty cell raises)
    except ValueError:
        return False
    return True


def _tensor_bytes(t: torch.Tensor) -> bytes:
    """dtype, shape and the bytes of ``t`` (its ``repr`` for a layout without plain bytes)."""
    head = f"{t.dtype}{tuple(t.shape)}".encode()
    try:
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        return head + flat.view(torch.uint8).numpy().tobytes()
    except (RuntimeError, TypeError):  # sparse, meta, nested tensors
        return head + repr(t).encode()
