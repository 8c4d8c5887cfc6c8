"""Hooks that keep, for every tracked layer, its input and its output gradient.

One forward and one backward per physical batch: a forward hook stores the layer's input and
puts a tensor hook on its output, which stores the output gradient when backward reaches it.
Nothing per-example is materialised here; the layer rules turn (input, output gradient) into
per-example norms and clipped sums afterwards.

The rules read dim 0 of what they see as the example (privacy invariant 7, PRIVACY.md). This
module checks what can be checked cheaply at every step: every tracked layer's input, output and
output gradient have leading dimension equal to the batch size (a Linear fed
``x.reshape(B*T, d)`` or a sequence-first ``(T, B, d)`` with T != B is an error naming the
layer). What a shape cannot show (sequence-first with T == B, an op that mixes examples) the
engine's layout verification checks
(:meth:`rmt_kernels.dp.layout_verification.LayoutVerifier.check`), using the recording mode of
:class:`LayerCapture`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from rmt_kernels._checks import FLOAT_DTYPES
from rmt_kernels.ops import OFFSET_STRIDE
from rmt_kernels.rules import LayerRule, get_layer_rule
from rmt_kernels.rules.tied_embedding import check_tied_pair


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
    # The capture generation of the forward that produced ``activation`` (see keep_grad).
    generation: int = field(default=-1)
    # The version counter of the input when it was kept: an in-place change of the input after
    # the layer ran (``h.copy_(...)`` under no_grad) would make the rules clip a tensor the layer
    # never saw, one that may mix the examples; refused in keep_grad and take.
    version: int = field(default=-1)
    # A write through ``.data`` (or any alias with its own version counter) escapes the version
    # check: the kept input's per-row fingerprint and its storage (address, size) at the forward,
    # compared at the take (see LayerCapture.fingerprint).
    fingerprint: torch.Tensor | None = None
    storage: tuple[int, int] | None = None
    # requires_grad of each own parameter before the module's forward turned it off; None when
    # the module is not inside a forward.
    saved_requires_grad: dict[str, bool] | None = None


def _check_module_options(name: str, module: nn.Module, rule: LayerRule) -> None:
    # Module options a rule cannot follow (its check_module, beside the rule in
    # rmt_kernels/rules/), refused at make_private rather than at the first step.
    try:
        rule.check_module(module)
    except ValueError as err:
        raise ValueError(f"make_private: module '{name}' ({type(module).__name__}): {err}") from err


def trainable_layers(model: nn.Module) -> list[TrackedLayer]:
    """Every module owning a trainable parameter, with its rule.

    Raises:
        TypeError: a trainable parameter sits in a module no rule covers (freeze it, or register
            a rule with :func:`rmt_kernels.register_layer_rule`), or has a dtype the fused ops do
            not take (float64). DP-SGD must noise every trainable parameter, so none may be
            skipped silently.
        ValueError: a module option its rule cannot follow (``Embedding(max_norm=...)``,
            ``sparse=True``, ``scale_grad_by_freq=True``; LayerNorm over several dimensions), or
            one parameter shared by several modules other than a tied embedding (one
            nn.Embedding's weight as one nn.Linear head's, rmt_kernels/rules/tied_embedding.py:
            its rule clips the sum of the two uses; any other sharing would be clipped as if the
            uses were separate parameters, which does not bound the example's gradient).
    """
    layers = []
    owner: dict[int, str] = {}
    # Every (module name, module, parameter name) holding each parameter: a shared one is
    # checked against the supported tie once all its holders are known.
    uses: dict[int, list[tuple[str, nn.Module, str]]] = {}
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
        _check_module_options(name, module, rule)
        for pname, p in params.items():
            full = f"{name}.{pname}" if name else pname
            uses.setdefault(id(p), []).append((name, module, pname))
            if id(p) in owner:
                continue  # checked at its first holder; the tie itself below
            owner[id(p)] = full
            if p.numel() >= OFFSET_STRIDE:
                # Each (step, parameter) owns 2^32 counters of the noise stream
                # (rmt_kernels.ops.noise_offset): a larger parameter would draw the next
                # parameter's (or step's) noise, correlating the two.
                raise ValueError(
                    f"make_private: parameter '{full}' has {p.numel()} elements; the noise "
                    f"stream gives each parameter fewer than 2**32 = {OFFSET_STRIDE}: split it "
                    "into several parameters (modules) or freeze it"
                )
            if p.dtype not in FLOAT_DTYPES:
                raise TypeError(
                    f"make_private: parameter '{full}' is {p.dtype}; the DP ops take float32, "
                    "bfloat16 or float16 parameters (convert the model, e.g. model.float())"
                )
        layers.append(TrackedLayer(name, module, rule, params))
    for holders in uses.values():
        if len(holders) > 1:
            check_tied_pair(holders)
    return layers


class LayoutError(RuntimeError):
    """A tracked layer does not see one example per row of dim 0 (privacy invariant 7,
    PRIVACY.md)."""


class _Inert:
    """What an engine hook becomes in a pickle or a copy of the private model: a no-op."""

    def __call__(self, *args, **kwargs) -> None:
        return None


class ModelHook:
    """Base of every hook the engine installs on the user's modules.

    ``torch.save(model)`` (or ``copy.deepcopy``) of a private model stores each such hook as an
    inert no-op instead of the hook and everything it reaches (the engine, whose noise seed is
    secret, and its held activations): the file holds the plain model, which loads and runs as
    an ordinary one.
    """

    def __reduce__(self):
        return (_Inert, ())


class _LayerPreHook(ModelHook):
    def __init__(self, capture: LayerCapture, layer: TrackedLayer) -> None:
        self.capture, self.layer = capture, layer

    def __call__(self, module: nn.Module, inputs: tuple) -> None:
        self.capture.before_layer(self.layer)


class _LayerForwardHook(ModelHook):
    def __init__(self, capture: LayerCapture, layer: TrackedLayer) -> None:
        self.capture, self.layer = capture, layer

    def __call__(self, module: nn.Module, inputs: tuple, output) -> torch.Tensor | None:
        return self.capture.after_layer(self.layer, inputs, output)


# Integer dtype of each float width: a fingerprint reads a float's bits, not its value.
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class LayerCapture:
    """Installs the hooks on ``layers`` and hands back what each physical batch left.

    Also turns each layer's own parameters' ``requires_grad`` off while the layer runs (and back
    on after): autograd then builds no weight gradient for the layer's own use (the rules build
    the private one), while any other use of the parameter (a direct ``F.linear(h, emb.weight)``
    elsewhere, a regulariser on the weights) still reaches autograd, where the engine's parameter
    hook refuses it. That costs two Python hooks per tracked module per forward.

    A kept input changed after its layer ran is refused at the take: in place through the tensor
    itself (its version counter), or through an alias with a counter of its own (``h.data``) or
    by swapping its storage (the fingerprint and the storage's address and size, see
    :meth:`fingerprint`).
    """

    def __init__(self, layers: list[TrackedLayer]) -> None:
        self.layers = layers
        # Batch size of the forward pass in progress (set by the engine from the model's input;
        # None outside a forward of the model, where a tracked layer may not run).
        self.batch_size: int | None = None
        # True from the engine's pre-hook of a forward of the model with gradients enabled to
        # the model's forward hook: a tracked layer run without gradients then is an error.
        self.in_training_forward = False
        # Bumped whenever held batches are taken or cleared: an output gradient from the graph
        # of an older forward must not be paired with a newer forward's input.
        self.generation = 0
        # Recording mode (the engine's layout verification): a callable receiving
        # (layer name, "input" / "output", tensor) per call (the tensor as the layer saw or
        # returned it, not a copy: valid only during the call), the rows (a bool mask of dim 0)
        # whose outputs get a random perturbation (None: none) and its scale.
        self.recording: Callable[[str, str, torch.Tensor], None] | None = None
        self.perturb_rows: torch.Tensor | None = None
        self.perturb_scale: float = 1.0
        self.perturb_generator: torch.Generator | None = None
        # Recording mode: (layer name, a zero leaf added to its (floating) output, a slot that
        # receives the output gradient of each backward), see _record.
        self.leaves: list[tuple[str, torch.Tensor, list]] = []
        # The fingerprint's weights, by device (drawn from the OS, grown on demand).
        self._weights: dict[torch.device, torch.Tensor] = {}
        self._handles = []
        for layer in layers:
            self._handles.append(layer.module.register_forward_pre_hook(_LayerPreHook(self, layer)))
            self._handles.append(layer.module.register_forward_hook(_LayerForwardHook(self, layer)))

    def before_layer(self, layer: TrackedLayer) -> None:
        """The layer's forward pre-hook: switch its own parameters' requires_grad off."""
        if not torch.is_grad_enabled() or layer.saved_requires_grad is not None:
            return
        layer.saved_requires_grad = {n: p.requires_grad for n, p in layer.params.items()}
        for p in layer.params.values():
            p.requires_grad_(False)

    def restore_requires_grad(self, layer: TrackedLayer) -> None:
        """Give the layer's parameters back the requires_grad they had before its forward."""
        saved, layer.saved_requires_grad = layer.saved_requires_grad, None
        if saved is not None:
            for n, p in layer.params.items():
                p.requires_grad_(saved[n])

    def _leading(self, layer: TrackedLayer, what: str, t: torch.Tensor, batch: int) -> None:
        if t.dim() == 0 or t.shape[0] != batch:
            raise LayoutError(
                f"DP engine: layer '{layer.name}' ({type(layer.module).__name__}) got an {what} "
                f"of shape {list(t.shape)} whose leading dimension is not the batch size "
                f"{batch} (dim 0 of the model's first tensor input). The rules clip per row of "
                "dim 0, so each row must be one example: feed the layer (B, ..., d) tensors, "
                "not a flattened (B*T, d) or a sequence-first (T, B, d) one"
            )

    def after_layer(self, layer: TrackedLayer, inputs: tuple, output) -> torch.Tensor | None:
        """The layer's forward hook: restore its parameters' requires_grad, check the layout's
        shapes, keep the input and hook the output for its gradient (or record, while the
        engine verifies the layout)."""
        self.restore_requires_grad(layer)
        recording = self.recording
        if not torch.is_grad_enabled():
            if recording is not None or self.in_training_forward:
                # Reentrant gradient checkpointing (checkpoint(..., use_reentrant=True)) runs
                # its segment under no_grad and again in backward: the capture would see the
                # layer skipped here (a zero gradient) and the layout verification no
                # gradient at all.
                raise LayoutError(
                    f"DP engine: layer '{layer.name}' ran with gradients disabled inside a "
                    "training forward of the private model (reentrant gradient checkpointing, "
                    "torch.utils.checkpoint(..., use_reentrant=True), or torch.no_grad() inside "
                    "the model): its per-example gradients would be lost. Gradient "
                    "checkpointing is not supported; freeze the layer if it must run without "
                    "gradients"
                )
            return None  # evaluation: nothing to keep
        batch = self.batch_size
        if batch is None:
            raise LayoutError(
                f"DP engine: layer '{layer.name}' ran outside a forward of the private model "
                "(or the model got no tensor input whose dim 0 is the batch); call the model "
                "itself with the batch as its first tensor argument"
            )
        if not inputs or not isinstance(inputs[0], torch.Tensor):
            raise LayoutError(
                f"DP engine: layer '{layer.name}' was called without a tensor as its first "
                "positional argument; the rules need it"
            )
        if not isinstance(output, torch.Tensor):
            raise LayoutError(
                f"DP engine: layer '{layer.name}' returned {type(output).__name__}, not a "
                "tensor; the rules need its output gradient"
            )
        x = inputs[0]
        if batch > 1 and x.dim() > 0 and x.shape[0] == 1 and output.dim() > 0:
            # An input shared by the whole batch (BERT's position ids): backward of the
            # broadcast would sum the examples' gradients, so hand each example its own
            # copy. Exact when row b of the copy reaches only example b's loss, which the
            # layout verification checks (it perturbs rows of the copy).
            x = x.expand(batch, *x.shape[1:])
            output = output.expand(batch, *output.shape[1:])
        self._leading(layer, "input", x, batch)
        self._leading(layer, "output", output, batch)
        if recording is not None:
            return self._record(layer, x, output, recording)
        layer.calls += 1
        if layer.calls > 1 and not self.in_training_forward:
            # After the model's forward returned: non-reentrant gradient checkpointing re-runs
            # its segments in backward (red team 27: it was refused as "shared weights").
            raise RuntimeError(
                f"DP engine: module '{layer.name}' ran again after the model's forward returned "
                "(gradient checkpointing, e.g. model.gradient_checkpointing_enable() or "
                "torch.utils.checkpoint, re-runs layers in backward; or the module was called "
                "outside the model). Gradient checkpointing is not supported: disable it"
            )
        if layer.calls > 1:
            raise RuntimeError(
                f"DP engine: module '{layer.name}' ran twice in one forward pass (shared "
                "weights); its per-example gradient would be the sum over uses, which the "
                "layer rules do not compute yet"
            )
        layer.activation = x.detach()  # shares x's version counter
        layer.version = x._version
        layer.fingerprint = self.fingerprint(layer.activation)
        layer.storage = _storage(layer.activation)
        layer.generation = generation = self.generation

        def keep_grad(grad: torch.Tensor) -> None:
            if layer.generation != generation or layer.activation is None:
                raise RuntimeError(
                    f"DP engine: backward reached layer '{layer.name}' through the graph of "
                    "a batch that was already used (folded into the sums by a later forward, "
                    "or taken by step()); run backward before the next forward or step()"
                )
            self._check_version(layer)
            self._leading(layer, "output gradient", grad, batch)
            # Several backward passes over one forward (retain_graph): for a fixed input
            # the per-example gradient is linear in the output gradient, so the sum of the
            # output gradients gives exactly the gradient of the summed losses.
            # Where the output is a graph leaf (a layer fed by data alone) autograd hands the
            # same buffer on to the leaf's .grad and accumulates later backward passes into it
            # in place: keep a copy there.
            grad = grad.detach().clone() if leaf else grad.detach()
            layer.grad_output = grad if layer.grad_output is None else layer.grad_output + grad

        if not output.requires_grad:
            # The layer's own parameters do not require grad while it runs (the class
            # docstring), so a layer fed by data alone (the embeddings) has an output outside
            # the graph: make it the graph's leaf.
            output.requires_grad_()
        leaf = output.is_leaf
        output = _fresh(output)
        output.register_hook(keep_grad)
        return output

    def fingerprint(self, t: torch.Tensor) -> torch.Tensor:
        """Per-row fingerprint of ``t``'s bits: (B,) int64, row b's ``sum_i w_i * bits_i`` modulo
        2^64 over its entries in order, with weights w uniform on 64 bits from the OS.

        Why: a write through an alias with its own version counter (``h.data.copy_(...)``)
        after the layer ran would make the rules clip a tensor the layer never saw. Exact
        integer arithmetic on the bit patterns: a write that changes any entry, chosen without
        knowledge of w, leaves a row's fingerprint unchanged with probability at most
        2^(v - 64), where 2^v is the largest power of 2 dividing the change of some changed
        entry's bits (v <= 31 for float32 and v <= 15 for 16-bit inputs: at most 2^-33). Per row
        and weighted by position, so a permutation of rows or entries is seen too. Cost: two
        passes over each tracked layer's input per physical batch (here and at the take) with
        int64 temporaries of its size, and one weight per entry of the widest row (8 bytes
        each, per device). Measured on one CPU thread: 12 ms for a 4096 x 768 float32 input
        (a 768 x 768 GEMM on it: 100 ms), +5-19% (mean 11%, 4 runs) of a private step of a
        4-layer RoBERTa (d = 256, B = 32, T = 64).
        """
        rows = t.detach().reshape(t.shape[0], -1)
        if rows.is_complex():
            rows = torch.view_as_real(rows).reshape(t.shape[0], -1)
        if rows.is_floating_point():
            rows = rows.view(_BITS[rows.element_size()])
        n = rows.shape[1]
        weights = self._weights.get(rows.device, torch.zeros(0, dtype=torch.int64))
        if weights.numel() < n:
            # Grown by appending: a held fingerprint must be recomputed with the same weights.
            more = max(n, 2 * weights.numel()) - weights.numel()
            drawn = torch.frombuffer(bytearray(secrets.token_bytes(8 * more)), dtype=torch.int64)
            weights = torch.cat([weights.to(rows.device), drawn.to(rows.device)])
            self._weights[rows.device] = weights
        # int64 products and sums wrap modulo 2^64 (two's complement). On the CPU a
        # matrix-vector product (3x faster than the elementwise form); CUDA has no int64 GEMV.
        bits = rows.to(torch.int64)
        if bits.device.type == "cpu":
            return bits @ weights[:n]
        return (bits * weights[:n]).sum(1)

    def _check_version(self, layer: TrackedLayer) -> None:
        if layer.activation is not None and layer.activation._version != layer.version:
            raise RuntimeError(
                f"DP engine: the input of layer '{layer.name}' was modified in place after the "
                "layer ran (an in-place op such as copy_, add_ or a slice assignment on the "
                "tensor the layer received); the rules would clip a tensor the layer never saw, "
                "which need not be one example per row. Use an out-of-place op"
            )

    def _check_unchanged(self, layer: TrackedLayer) -> None:
        self._check_version(layer)
        a = layer.activation
        if _storage(a) != layer.storage or not torch.equal(self.fingerprint(a), layer.fingerprint):
            raise RuntimeError(
                f"DP engine: the input of layer '{layer.name}' was modified after the layer ran "
                "(a write through .data or another alias of the tensor the layer received, or "
                "its storage resized); the rules would clip a tensor the layer never saw, which "
                "need not be one example per row. Do not write to a layer's input after it ran"
            )

    def _record(self, layer, x, output, recording) -> torch.Tensor:
        recording(layer.name, "input", x.detach())
        if output.is_floating_point():
            # A leaf ADDED to the output (not a detached copy): the graph stays connected, so
            # one backward from the model's outputs reaches every tracked layer through all
            # the layers and ops after it, whatever they do to gradients, and the gradient of
            # the leaf is exactly this layer's output gradient in training. Its value is zero
            # except on the perturbed rows, where it moves the output.
            leaf = torch.zeros(output.shape, dtype=output.dtype, device=output.device)
            rows = self.perturb_rows
            if rows is not None:
                rows = rows.to(output.device)
                noise = torch.randn(
                    (int(rows.sum()), *output.shape[1:]),
                    generator=self.perturb_generator,
                    dtype=torch.float32,
                )
                size = (float(output.detach().abs().max()) + 1.0) * self.perturb_scale
                leaf[rows] = (noise * size).to(output.device, output.dtype)
            leaf.requires_grad_()
            output = output + leaf
            # The output gradient is read by a hook on the returned tensor, registered before
            # any later forward hook can hook it: the same point as keep_grad in training.
            slot: list[torch.Tensor | None] = [None]
            output.register_hook(_keeper(slot))
            self.leaves.append((layer.name, leaf, slot))
        recording(layer.name, "output", output.detach())
        return output

    def pending(self) -> bool:
        """Whether a physical batch has run forward (and backward) since the last take."""
        return any(layer.activation is not None for layer in self.layers)

    def take(self) -> list[tuple[TrackedLayer, torch.Tensor, torch.Tensor]]:
        """(layer, input, output gradient) of the last batch for every layer that ran forward,
        and forget them.

        A tracked layer that did not run in this batch (skipped by stochastic depth or
        LayerDrop, or unused) is left out: every example's gradient of its parameters is zero,
        which is what it contributes to the clipped sums (the engine still adds the noise to
        every one of its coordinates).

        Raises:
            RuntimeError: a layer ran forward but backward never reached it (call
                ``loss.backward()`` before ``step()``; a layer that does not influence the loss
                must be frozen), or its input was modified after it ran.
        """
        out = []
        for layer in self.layers:
            if layer.activation is None:
                continue
            self._check_unchanged(layer)
            if layer.grad_output is None:
                raise RuntimeError(
                    f"DP engine: no output gradient for layer '{layer.name}': call "
                    "loss.backward() before optimizer.step(), and freeze layers that do not "
                    "influence the loss"
                )
            out.append((layer, layer.activation, layer.grad_output))
        self.clear()
        return out

    def backward_seen(self) -> bool:
        """Whether backward has reached a layer of the held batch."""
        return any(layer.grad_output is not None for layer in self.layers)

    def clear(self) -> None:
        """Forget the held batch; gradients still to come from its graph become errors, and a
        tracked layer run before the model's next forward has no batch size (an error)."""
        self.generation += 1
        self.batch_size = None
        for layer in self.layers:
            layer.activation = None
            layer.grad_output = None
            layer.fingerprint = None
            layer.storage = None
            layer.calls = 0

    def remove(self) -> None:
        """Detach every hook (the model is then an ordinary model again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for layer in self.layers:
            self.restore_requires_grad(layer)


def _fresh(output: torch.Tensor) -> torch.Tensor:
    """A new autograd node for the layer's output, which the capture hands on and hooks.

    Why: torch runs a tensor's hooks in registration order, so a hook the user put on the
    layer's own output tensor (a forward hook registered before make_private, or with
    ``prepend=True``) would run before keep_grad and change the gradient the rules clip, while
    the layout verification reads it at ``output + leaf``, before that hook: the two would
    disagree. On a fresh node, keep_grad reads the gradient arriving from downstream before any
    hook can change it (ours is that node's first hook), in training and verification alike;
    a user's hook on either tensor then changes only what flows upstream, where the upstream
    layers' checks see it.
    """
    return output.view_as(output)


def _keeper(slot: list):
    def keep(grad: torch.Tensor) -> None:
        slot[0] = grad.detach()

    return keep


def _storage(t: torch.Tensor) -> tuple[int, int]:
    """The address and size of ``t``'s storage (its identity while ``t`` holds it alive)."""
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()
