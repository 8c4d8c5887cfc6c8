"""What may be trained: exactly the parameters the engine privatises, each only through its own
module (privacy invariant 8, PRIVACY.md).

The layer rules build each parameter's private gradient from its module's input and output
gradient, so a gradient that reaches a parameter any other way, or a parameter the engine does not
track, would be trained on a raw gradient: unclipped and unnoised. Both are refused here, naming
the parameter: the first at backward (:func:`refuse_direct_use`), the second at every step
(:func:`check_updates`).
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Mapping

import torch
from torch import nn


def refuse_direct_use(name: str) -> Callable[[torch.Tensor], None]:
    """A tensor hook for tracked parameter ``name`` that refuses any gradient autograd computes
    for it.

    A tracked parameter's own module turns its requires_grad off while it runs, so autograd
    reaches the parameter only through some other use (a tied weight, a loss term on it): that
    gradient would be lost, or trained on unclipped.
    """

    def hook(grad: torch.Tensor) -> None:
        raise RuntimeError(
            f"DP engine: parameter '{name}' got a gradient through autograd, so it was used "
            "outside its own module's forward (a direct use such as F.linear(h, emb.weight) in "
            "another module, or a loss term on the weights). The layer rules see only the use "
            "inside the module, so that gradient would be lost or trained on unclipped: use the "
            "parameter only through its module (untie or copy it), or freeze it"
        )

    return hook


def check_not_replaced(model: nn.Module, tracked: Mapping[str, nn.Parameter]) -> None:
    """Refuse a step after a tracked parameter was replaced in the model by a new tensor.

    The engine, its hooks' bookkeeping and the optimizer all hold the parameter objects that
    were in the model at make_private. A module whose parameters are replaced since (lazy or
    meta-device materialisation, ``load_state_dict(assign=True)``, a ``.to()`` under
    ``torch.__future__.set_overwrite_module_params_on_conversion(True)``, a re-created adapter)
    trains the new tensors while the step updates the old ones: the pattern of Opacus #820,
    where DP-LoRA adapters silently never moved.

    Args:
        model: the private model.
        tracked: each privatised parameter by its qualified name in ``model``.

    Raises:
        RuntimeError: naming the first parameter replaced or gone.
    """
    current = dict(model.named_parameters())
    for name, p in tracked.items():
        if current.get(name) is not p:
            raise RuntimeError(
                f"DP engine: parameter '{name}' is no longer the tensor make_private tracked: it "
                "was replaced after make_private (lazy or meta-device materialisation, "
                "load_state_dict(assign=True), a .to() that makes new parameters, a re-created "
                "adapter) or moved under another name (get_peft_model moves each adapted "
                "layer's weight to base_layer), so the optimizer would update a tensor the model "
                "no longer uses. Finish building (adapters included), loading and moving the "
                "model before make_private"
            )


def check_updates(model: nn.Module, tracked: Container[int], param_groups: Iterable[dict]) -> None:
    """Refuse a step that would update a parameter the engine did not privatise.

    Called through :meth:`~rmt_kernels.dp.engine.PrivateEngine.check_updates` by
    :meth:`~rmt_kernels.dp.DPOptimizer.step` before the wrapped optimizer steps. Refuses: a model
    parameter unfrozen after make_private (requires_grad, not tracked), a tracked parameter frozen
    since (its rule would drop it), an untracked tensor holding a gradient, and any parameter of
    the optimizer's groups that the engine does not track but that requires grad or has a
    gradient (a group added through ``original_optimizer.add_param_group`` or
    ``param_groups.append``).

    Args:
        model: the private model.
        tracked: the ``id()`` of every parameter the engine privatises.
        param_groups: the wrapped optimizer's parameter groups.

    Raises:
        RuntimeError: naming the parameter.
    """
    names = {}
    for name, p in model.named_parameters():
        names[id(p)] = name
        if id(p) in tracked:
            if not p.requires_grad:
                raise RuntimeError(
                    f"DP engine: parameter '{name}' was frozen after make_private; freezing "
                    "or unfreezing changes what is privatised: call make_private again"
                )
        elif p.requires_grad or p.grad is not None:
            raise RuntimeError(
                f"DP engine: parameter '{name}' was not trainable at make_private but now "
                "requires grad or holds a gradient (unfrozen later?); it would be trained on "
                "its raw gradient, unclipped and unnoised. Call make_private again after "
                "unfreezing, or freeze it and set its .grad to None"
            )
    for i, group in enumerate(param_groups):
        for p in group["params"]:
            if id(p) not in tracked and (p.requires_grad or p.grad is not None):
                name = names.get(id(p), f"a tensor of shape {list(p.shape)} not in the model")
                raise RuntimeError(
                    f"DP engine: parameter group {i} of the optimizer holds {name!r}, which "
                    "the engine did not privatise (added after make_private?); it would be "
                    "trained on its raw gradient. Build the optimizer over every trainable "
                    "parameter before make_private"
                )
