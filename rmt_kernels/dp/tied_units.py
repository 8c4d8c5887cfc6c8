"""The engine's rule units: one per tracked layer, except a tied embedding, whose two modules make
one unit with one parameter (rmt_kernels/rules/tied_embedding.py has the rule and its proof).

Why a unit: the tied weight's per-example gradient is the SUM of its two uses, so its norm (cross
term included) and its clipped sum must come from one rule call that sees both modules' inputs
and output gradients; and the parameter must appear once in the engine's parameter list, so that
it owns one noise counter range (``noise_offset(step, index, count)``), gets its noise once and
one ``p.grad``. The two modules stay separate tracked layers for the capture (each keeps its own
input and output gradient, with the shape, version and fingerprint checks) and for the layout
verification (each is verified to see one example per row).
"""

from __future__ import annotations

import torch

from rmt_kernels.dp.capture import TrackedLayer
from rmt_kernels.rules.tied_embedding import TIED_EMBEDDING_RULE, TiedEmbeddingPair

__all__ = ["RuleUnits"]

Captured = list[tuple[TrackedLayer, object, object]]


class RuleUnits:
    """The rule calls of one engine, built from its tracked layers.

    ``trainable_layers`` (rmt_kernels/dp/capture.py) has already refused every sharing of a
    parameter but the supported tie (``check_tied_pair``): a parameter held by two tracked
    layers is the weight of one ``nn.Embedding`` and of one ``nn.Linear`` head.

    Args:
        layers: the engine's tracked layers (the capture's), in model order.
    """

    def __init__(self, layers: list[TrackedLayer]) -> None:
        holders: dict[int, list[TrackedLayer]] = {}
        for layer in layers:
            for p in layer.params.values():
                holders.setdefault(id(p), []).append(layer)
        #: The units, in model order (a tie where its first module is).
        self.units: list[TrackedLayer] = []
        # id(tracked layer of a tie) -> (its unit, 0 for the embedding or 1 for the head).
        self._part: dict[int, tuple[TrackedLayer, int]] = {}
        for layer in layers:
            if id(layer) in self._part:
                continue
            # By identity: TrackedLayer is a dataclass, whose == would compare its fields.
            tie = next(
                (h for h in holders.values() if len(h) > 1 and any(t is layer for t in h)), None
            )
            if tie is None:
                self.units.append(layer)
                continue
            embedding, head = sorted(tie, key=lambda t: isinstance(t.module, torch.nn.Linear))
            unit = TrackedLayer(
                name=layer.name,  # the first holder: the parameter's name in named_parameters()
                module=TiedEmbeddingPair(embedding.module, head.module),
                rule=TIED_EMBEDDING_RULE,
                params={"weight": embedding.params["weight"]},
            )
            self._part[id(embedding)] = (unit, 0)
            self._part[id(head)] = (unit, 1)
            self.units.append(unit)

    def merge(self, captured: Captured) -> Captured:
        """The capture's ``(layer, input, output gradient)`` list with each tie's two entries
        replaced by one ``(unit, (ids, h), (e, g))`` (a module that did not run gives None
        parts), where the first of them was."""
        out: Captured = []
        ties: dict[int, tuple[list, list]] = {}
        for layer, x, dy in captured:
            part = self._part.get(id(layer))
            if part is None:
                out.append((layer, x, dy))
                continue
            unit, slot = part
            if id(unit) not in ties:
                ties[id(unit)] = ([None, None], [None, None])
                out.append((unit, *ties[id(unit)]))
            inputs, grads = ties[id(unit)]
            inputs[slot], grads[slot] = x, dy
        return [
            (layer, tuple(x), tuple(dy)) if id(layer) in ties else (layer, x, dy)
            for layer, x, dy in out
        ]
