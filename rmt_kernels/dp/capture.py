"""Hooks that keep, for every tracked layer, its input and its output gradient.

One forward and one backward per physical batch: a forward hook stores the layer's input and
puts a tensor hook on its output, which stores the output gradient when backward reaches it.
Nothing per-example is materialised here; the layer rules turn (input, output gradient) into
per-example norms and clipped sums afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from rmt_kernels.dp_ops import LayerRule, get_layer_rule


@dataclass
class TrackedLayer:
    """A module that owns trainable parameters, its rule, and what the last batch left."""

    name: str
    module: nn.Module
    rule: LayerRule
    params: dict[str, nn.Parameter]
    activation: torch.Tensor | None = None
    grad_output: torch.Tensor | None = None
    calls: int = field(default=0)


def trainable_layers(model: nn.Module) -> list[TrackedLayer]:
    """Every module owning a trainable parameter, with its rule.

    Raises:
        TypeError: a trainable parameter sits in a module no rule covers (freeze it, or register
            a rule with :func:`rmt_kernels.register_layer_rule`). DP-SGD must noise every
            trainable parameter, so none may be skipped silently.
    """
    layers = []
    for name, module in model.named_modules():
        params = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
        if not params:
            continue
        try:
            rule = get_layer_rule(module)
        except TypeError as err:
            raise TypeError(
                f"make_private: module '{name}' ({type(module).__name__}) has trainable "
                f"parameters {sorted(params)} but no DP layer rule; freeze them "
                "(requires_grad_(False)) or register a rule with "
                "rmt_kernels.register_layer_rule"
            ) from err
        layers.append(TrackedLayer(name, module, rule, params))
    return layers


class LayerCapture:
    """Installs the hooks on ``layers`` and hands back what each physical batch left."""

    def __init__(self, layers: list[TrackedLayer]) -> None:
        self.layers = layers
        # Batch size of the forward pass in progress (set by the engine from the model's input).
        self.batch_size: int | None = None
        self._handles = [
            layer.module.register_forward_hook(self._forward_hook(layer)) for layer in layers
        ]

    def _forward_hook(self, layer: TrackedLayer):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not torch.is_grad_enabled():
                return None  # evaluation: nothing to keep
            layer.calls += 1
            if layer.calls > 1:
                raise RuntimeError(
                    f"DP engine: module '{layer.name}' ran twice in one forward pass (shared "
                    "weights); its per-example gradient would be the sum over uses, which the "
                    "layer rules do not compute yet"
                )
            x = inputs[0]
            batch = self.batch_size
            if batch is not None and batch > 1 and x.shape[0] == 1:
                # An input shared by the whole batch (BERT's position ids): backward of the
                # broadcast would sum the examples' gradients, so hand each example its own copy.
                x = x.expand(batch, *x.shape[1:])
                output = output.expand(batch, *output.shape[1:])
            layer.activation = x.detach()

            def keep_grad(grad: torch.Tensor) -> None:
                layer.grad_output = grad.detach()

            if not output.requires_grad:
                # The engine turns parameter gradients off during forward (autograd would
                # compute the non-private sum for nothing), so a layer fed by data alone (the
                # embeddings) has an output outside the graph: make it the graph's leaf.
                output.requires_grad_()
            output.register_hook(keep_grad)
            return output

        return hook

    def pending(self) -> bool:
        """Whether a physical batch has run forward (and backward) since the last take."""
        return any(layer.activation is not None for layer in self.layers)

    def take(self) -> list[tuple[TrackedLayer, torch.Tensor, torch.Tensor]]:
        """(layer, input, output gradient) of the last batch, and forget them.

        Raises:
            RuntimeError: a layer ran forward but backward never reached it (call
                ``loss.backward()`` before ``step()``; a layer that does not influence the loss
                must be frozen).
        """
        out = []
        for layer in self.layers:
            if layer.activation is None:
                raise RuntimeError(f"DP engine: layer '{layer.name}' did not run forward")
            if layer.grad_output is None:
                raise RuntimeError(
                    f"DP engine: no output gradient for layer '{layer.name}': call "
                    "loss.backward() before optimizer.step(), and freeze layers that do not "
                    "influence the loss"
                )
            out.append((layer, layer.activation, layer.grad_output))
        self.clear()
        return out

    def clear(self) -> None:
        for layer in self.layers:
            layer.activation = None
            layer.grad_output = None
            layer.calls = 0

    def remove(self) -> None:
        """Detach every hook (the model is then an ordinary model again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
