"""The layout verification: dim 0 of every tracked layer is the example, forward and backward.

The layer rules are exact when (a) row b of every tracked layer's input depends on example b
alone, and (b) row b of its output gradient depends on example b alone (its data and the
gradient of its own loss) (privacy invariant 7, PRIVACY.md). The capture
(rmt_kernels/dp/capture.py) checks the shapes at every step; a shape cannot show a
sequence-first layer with T == B or an op that mixes examples, so the engine runs this once per
tracked layer: at the first forward of a batch with two examples or more, and again on the
first later batch that runs a tracked layer not seen yet (one skipped by LayerDrop until
then). :meth:`LayoutVerifier.check` says how.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from rmt_kernels.dp import loss_coupling
from rmt_kernels.dp.capture import LayerCapture, LayoutError, TrackedLayer

# An entry of another example's row may move by at most this fraction of its local scale (max of
# its own size and its position's median over rows; see rows_moved) when one example changes.
# Row-wise ops on equal shapes give bit-equal rows, so only a batch-level code switch (e.g. an
# attention mask dropped when it is all ones) moves them, by rounding (~1e-7); an op that mixes
# examples (BatchNorm statistics, attention over the wrong dimension) moves them by ~1/B of the
# change or more, far above this up to B ~ 1e4.
LAYOUT_TOLERANCE = 1e-5
# The verification's second pass multiplies every perturbation by this: mixing whose effect on
# other rows is a fraction c of the change moves them by c * 2^40 of the first scale, so any
# c above about LAYOUT_TOLERANCE / 2^40 ~ 1e-17 is refused (x + 1e-6 * x.sum(0) passes the
# tolerance at the first scale). 2^40 keeps a float32 model's activations finite: entries of
# ~1e13, their squares (LayerNorm's variance) ~1e26 and attention scores ~1e28 are below 3e38.
LAYOUT_LARGE_SCALE = 2.0**40


class BatchReplay:
    """What re-running a batch from its start needs: the model's arguments (references), the
    CPU and CUDA RNG states and copies of the model's buffers, taken before its forward."""

    def __init__(self, args: tuple, kwargs: dict, cpu_state, cuda_states, buffers) -> None:
        self.args, self.kwargs = args, kwargs
        self.cpu_state, self.cuda_states, self.buffers = cpu_state, cuda_states, buffers

    @classmethod
    def of(cls, model: nn.Module, args: tuple, kwargs: dict) -> BatchReplay:
        """The current state, for a run of ``model(*args, **kwargs)``."""
        devices = cuda_devices(model)
        return cls(
            args,
            dict(kwargs),
            torch.get_rng_state(),
            [torch.cuda.get_rng_state(d) for d in devices],
            [(b, b.detach().clone()) for b in model.buffers()],
        )


class LayoutVerifier:
    """The engine's verification state: the tracked layers that passed, the batch kept for a
    re-run, and whether the verification's own forwards are running.

    Args:
        layers: the engine's tracked layers.
        capture: their capture (its recording mode runs the verification's forwards).
        enabled: False trusts the model's layout (``make_private(verify_layout=False)``).
    """

    def __init__(self, layers: list[TrackedLayer], capture: LayerCapture, enabled: bool) -> None:
        self.layers = layers
        self.capture = capture
        self.enabled = enabled
        #: The tracked layers the verification has seen run and passed.
        self.verified_layers: set[str] = set()
        #: While some tracked layer is unverified: what re-running the current batch needs, kept
        #: from the engine's pre-hook to the model's forward hook.
        self.pending: BatchReplay | None = None
        #: True while :meth:`check` runs its own forwards (with gradients enabled): they are not
        #: physical batches.
        self.running = False

    @property
    def complete(self) -> bool:
        """Whether the verification has passed for every tracked layer."""
        return len(self.verified_layers) == len(self.layers)

    def before_forward(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        """At the start of a training forward (``capture.batch_size`` set): verify the batch
        before it runs if nothing is verified yet, and keep what a re-run needs while a layer is
        unverified."""
        self.pending = None
        loss_coupling.refuse_coupling_arguments(kwargs)  # every training forward: not behaviour
        batch = self.capture.batch_size
        if not self.enabled or self.complete or batch is None or batch < 2:
            return
        if not self.verified_layers:
            # The first verification runs before the training forward (its graphs and the
            # training graph are never alive together) with the RNG state the training forward
            # is about to use, so it takes the same random branches.
            self.verified_layers |= self.check(model, args, kwargs)
        if not self.complete:
            # A layer this batch may run for the first time (LayerDrop) is verified after the
            # training forward shows it ran, on this batch from this RNG state.
            self.pending = BatchReplay.of(model, args, kwargs)

    def after_forward(self, model: nn.Module) -> None:
        """At the end of a training forward: verify the layout on this batch if it ran a tracked
        layer that no verification has seen (one skipped by LayerDrop at the earlier batches).

        Runs before backward can hand the layer's output gradient to the rules, so nothing of an
        unverified layer reaches the clipped sums. The re-run starts from the RNG state and
        buffers this batch started from (the same random branches); the current RNG state and
        buffers are restored after it, so training goes on as if it had not run.

        Raises:
            LayoutError: the verification fails, or its re-run of the batch did not run a
                tracked layer the training forward ran (a branch on something other than
                torch's random generators, which the verification cannot reproduce).
        """
        replay, self.pending = self.pending, None
        if replay is None:
            return
        ran = {layer.name for layer in self.layers if layer.activation is not None}
        new = ran - self.verified_layers
        if not new:
            return
        seen = self.check(model, replay.args, replay.kwargs, replay)
        self.verified_layers |= seen
        if new - seen:
            raise LayoutError(
                f"DP engine: cannot verify the layout of layer(s) {sorted(new - seen)}: they ran "
                "in this training forward but not when the verification ran the same batch again "
                "from the same torch RNG state and buffers (a branch on Python's random module, "
                "the clock or other state the engine cannot restore). Drive random layer "
                "skipping by torch's generators, or pass verify_layout=False and take "
                "responsibility for the layout"
            )

    def check(
        self, model: nn.Module, args: tuple, kwargs: dict, replay: BatchReplay | None = None
    ) -> set[str]:
        """Verify that dim 0 of every tracked layer that runs is the example, forward and
        backward; return the names of the layers it saw run.

        Runs the model again on the same batch, with gradients enabled (code keyed on the grad
        mode takes its training branch; nothing is kept and no ``.grad`` is written), once
        unchanged and then once per row set S of :func:`layout_row_sets`: 2 * ceil(log2 B) sets
        such that every ordered pair of rows (i, j) has a set holding i and not j. Each time, the
        rows S of every batched input get random values (noise of twice the tensor's largest
        entry for floats; for integers another id within the range of the batch's non-negative
        entries, a negative entry such as the ignore index -100 of labels staying as it is:
        :func:`rmt_kernels.dp.loss_coupling.perturb_ids`; another example's rows otherwise) and
        rows S of every tracked layer's output get a random perturbation, and:

        - forward: no row outside S of any tracked layer's input or output, nor of any model
          output whose dim 0 is the batch, may move (beyond ``LAYOUT_TOLERANCE`` of the
          entry's local scale, see :func:`rows_moved`);
        - backward, with one fixed random cotangent c on the model's outputs (the graph is kept
          connected through every layer, so each tracked layer's output gradient is the one
          training would see): from c restricted to S, every tracked layer's output gradient is
          exactly zero outside S (mixing in backward: a custom autograd Function, a tensor hook
          summing or centring over dim 0); from c restricted to the other rows, it is zero on S
          and equal outside S to the unchanged batch's gradient from all of c (within the
          tolerance). That refuses gradients scaled by other rows' gradients (``g / g.norm()``)
          or by other examples' data (a batch statistic, a tensor saved for backward that was
          overwritten).

        Then each set again with every perturbation ``LAYOUT_LARGE_SCALE`` times larger (forward
        rows, and the backward from the other rows' cotangent): mixing too weak to pass the
        tolerance at the first scale (``x + 1e-6 * x.sum(0)``) moves other rows by that factor.

        A loss the model returns (a 0-dim output in the graph: Hugging Face's ``.loss``) must
        give, in every run, every tracked layer's output the unchanged batch's gradient outside
        S; with an ignore index in an integer input, each set runs once more with rows S all
        ignored; Hugging Face's default token-level loss is refused outright. What that sees and
        misses: rmt_kernels/dp/loss_coupling.py.

        What remains assumed (stated in :func:`rmt_kernels.dp.make_private` and README.md): the
        loss, where the model does not return it, is a sum or mean over examples of a function of
        the model output's row b;
        data-dependent or stateful behaviour that this batch and these perturbations do not
        trigger is not seen, nor mixing whose effect on other rows stays below
        ``LAYOUT_TOLERANCE / LAYOUT_LARGE_SCALE`` of the change (in-place changes of a tracked
        layer's input after it ran are refused at every step by the capture).

        Every run starts from the RNG state and buffers of ``replay`` (those of the batch's
        start, when it re-runs a batch whose training forward has run) or else the current ones,
        which are restored at the end either way.

        Raises:
            LayoutError: a row of another example moved, the model's outputs have no tensor whose
                dim 0 is the batch (nothing to check (b) against), or the layers ran in another
                order.
        """
        return _BatchCheck(self, model, args, kwargs, replay).verify()


# A tracked layer's input or output as it runs, to the verification: (layer name, "input" or
# "output", the tensor) (the capture's recording mode).
Record = Callable[[str, str, torch.Tensor], None]


class _BatchCheck:
    """One verification of one batch (:meth:`LayoutVerifier.check`): the unchanged run's values,
    then one run per row set and scale compared against them."""

    def __init__(
        self,
        verifier: LayoutVerifier,
        model: nn.Module,
        args: tuple,
        kwargs: dict,
        replay: BatchReplay | None,
    ) -> None:
        self.verifier, self.capture = verifier, verifier.capture
        self.model, self.args, self.kwargs = model, args, kwargs
        self.batch = self.capture.batch_size
        self.inputs = [t for t in (*args, *kwargs.values()) if self.batched(t)]
        self.devices = cuda_devices(model)
        if replay is None:
            replay = BatchReplay.of(model, args, kwargs)
            # The buffers to leave behind: the current ones (those the replay copied).
            self.now = replay.buffers
        else:
            self.now = [(b, b.detach().clone()) for b, _ in replay.buffers]
        self.replay = replay
        self.generator = torch.Generator().manual_seed(0)  # the perturbation is public
        self.partners: dict[int, int | None] = {}
        # The unchanged run: each tracked layer's input and output, in call order.
        self.base: list[tuple[str, str, torch.Tensor]] = []
        # The floor (see floor_of) of each base tensor, computed once.
        self.floors: dict[int, torch.Tensor] = {}
        # Set by verify from the unchanged run.
        self.base_out: list[torch.Tensor] = []
        self.cotangents: list[torch.Tensor | None] = []
        self.base_grads: list[torch.Tensor | None] = []
        self.names: list[str] = []
        # The loss the model returns (loss_coupling.loss_outputs) in the last run, and each
        # tracked layer's output gradient from it in the unchanged run (None: no loss).
        self.losses: list[torch.Tensor] = []
        self.base_loss_grads: list[torch.Tensor | None] | None = None
        # Whether the run in progress sets rows S of inputs holding an ignore index to it.
        self.ignore = False
        # The row set of the run in progress and how many base entries it has matched.
        self.rows: list[int] = []
        self.outside = torch.zeros(0, dtype=torch.bool)
        self.compared = 0

    def batched(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == self.batch

    def verify(self) -> set[str]:
        """Run every check; the names of the tracked layers that ran."""
        try:
            with loss_coupling.hugging_face_token_losses(self.model) as heads:
                base_out, base_leaves = self.run(None, 1.0, self.keep)
            if self.losses:
                loss_coupling.refuse_hugging_face_token_loss(heads)
            if not base_out:
                raise LayoutError(
                    "DP engine: cannot verify the layout: no tensor in the model's output has "
                    f"the batch size {self.batch} as dim 0 (needed to check that each example's "
                    "rows reach only its own loss). Return per-example outputs (e.g. logits) "
                    "from the model, or pass verify_layout=False to make_private and take "
                    "responsibility for it"
                )
            # One random cotangent per floating model output in the graph, the same every run.
            self.cotangents = [
                torch.randn(t.shape, generator=self.generator).to(t.device, t.dtype)
                if t.requires_grad and t.is_floating_point()
                else None
                for t in base_out
            ]
            if self.losses:
                self.base_loss_grads = loss_coupling.loss_gradients(self.losses, base_leaves)
            self.base_grads = self.output_grads(base_out, base_leaves, None)
            self.names = [name for name, _, _ in base_leaves]
            # Only the base run's values are needed from here on: free its graph.
            self.base_out = [t.detach() for t in base_out]
            del base_out, base_leaves
            self.losses = []
            for scale in (1.0, LAYOUT_LARGE_SCALE):
                for rows in layout_row_sets(self.batch):
                    self.check_rows(rows, scale)
            if any(loss_coupling.ignore_sentinel(t) is not None for t in self.inputs):
                # Every target of examples S ignored: their count of targets changes.
                for rows in layout_row_sets(self.batch):
                    self.check_rows(rows, 1.0, ignore=True)
        finally:
            self.restore_buffers(self.now)
        return {name for name, _, _ in self.base}

    def restore_buffers(self, saved_buffers: list | None = None) -> None:
        """The model's buffers as the replay saved them (or as ``saved_buffers``). Before each
        run and at the end, not right after a run: a backward through the run's graph may read a
        buffer it saved (BatchNorm's running statistics)."""
        with torch.no_grad():
            for b, saved in self.replay.buffers if saved_buffers is None else saved_buffers:
                b.copy_(saved)

    def partner(self, k: int) -> int | None:
        """Another example whose inputs differ from example k's (None if all are equal)."""
        if k not in self.partners:
            others = ((k + d) % self.batch for d in range(1, self.batch))
            self.partners[k] = next((j for j in others if _differs(self.inputs, k, j)), None)
        return self.partners[k]

    def perturb(self, t: torch.Tensor, rows: list[int], scale: float) -> torch.Tensor:
        """``t`` with rows S given fresh values: random noise large enough to move any batch
        statistic such as a max, a random id within the range of the batch's non-negative ids
        for integers, an ignore index (a negative entry) kept (copying a partner alone cannot
        show an op that only an outlier triggers), else a partner's. In an ``ignore`` run, rows
        S of an integer input holding an ignore index are that index throughout."""
        t, index = t.clone(), torch.tensor(rows, device=t.device)
        shape = (len(rows), *t.shape[1:])
        if t.is_floating_point() and bool(t.isfinite().all()):
            size = (2.0 * float(t.abs().max()) + 1.0) * scale
            noise = torch.randn(shape, generator=self.generator, dtype=torch.float32)
            t[index] = t[index] + (noise * size).to(t.device, t.dtype)
            return t
        if t.dtype != torch.bool and not t.is_complex() and not t.is_floating_point():
            sentinel = loss_coupling.ignore_sentinel(t) if self.ignore else None
            if sentinel is not None:
                t[index] = sentinel
                return t
            if loss_coupling.perturb_ids(t, index, shape, self.generator):
                return t
        source = t.clone()
        for k in rows:
            j = self.partner(k)
            if j is not None:
                t[k] = source[j]
        return t

    def run(
        self, rows: list[int] | None, scale: float, record: Record
    ) -> tuple[list[torch.Tensor], list]:
        """One forward of the batch with rows ``rows`` changed (None: unchanged): the model's
        batched outputs and the capture's leaves (layer name, leaf, output-gradient slot).

        ``record`` receives each tracked layer's input and output as the layer runs: the
        unchanged run keeps copies, the others compare at once and keep nothing (one run's graph
        and gradients alive at a time besides the base's values).
        """

        def replace(t):
            return self.perturb(t, rows, scale) if rows is not None and self.batched(t) else t

        args = tuple(replace(t) for t in self.args)
        kwargs = {n: replace(t) for n, t in self.kwargs.items()}
        capture = self.capture
        capture.recording = record
        capture.perturb_rows = None if rows is None else row_mask(self.batch, rows)
        capture.perturb_scale = scale
        capture.perturb_generator = self.generator
        capture.leaves = []
        self.verifier.running = True
        self.restore_buffers()
        self.losses = []
        try:
            # Gradients enabled: the verified forward takes the same grad-mode branches as
            # training (code keyed on torch.is_grad_enabled() or requires_grad). The capture
            # keeps nothing in recording mode, the tracked layers' parameters do not require
            # grad while they run, and the backward is torch.autograd.grad on the recorded
            # leaves only (output_grads), so no .grad is written.
            with torch.random.fork_rng(devices=self.devices), torch.enable_grad():
                torch.set_rng_state(self.replay.cpu_state)
                for d, state in zip(self.devices, self.replay.cuda_states, strict=True):
                    torch.cuda.set_rng_state(state, d)
                out = self.model(*args, **kwargs)
        finally:
            self.verifier.running = False
            capture.recording = capture.perturb_rows = None
            capture.perturb_scale = 1.0
        leaves, capture.leaves = capture.leaves, []
        tensors = _tensors(out)
        self.losses = loss_coupling.loss_outputs(tensors)
        return [t for t in tensors if self.batched(t)], leaves

    def keep(self, name: str, what: str, t: torch.Tensor) -> None:
        """The unchanged run's record: a copy of every tracked layer's input and output."""
        self.base.append((name, what, t.clone()))

    def output_grads(
        self, out: list[torch.Tensor], leaves: list, rows: torch.Tensor | None
    ) -> list[torch.Tensor | None]:
        """Every tracked layer's output gradient (None where unused) from the fixed cotangent on
        the model's outputs, restricted to ``rows`` (a bool mask; None: all rows)."""
        roots = [(t, c) for t, c in zip(out, self.cotangents, strict=True) if c is not None]
        if not roots or not leaves:
            return [None] * len(leaves)
        cots = [c if rows is None else c * _rows_of(rows, c) for _, c in roots]
        for _, _, slot in leaves:
            slot[0] = None
        # The leaves only anchor the backward; each layer's output gradient is what the hook on
        # its output received (capture._record), as keep_grad does in training.
        torch.autograd.grad(
            [t for t, _ in roots],
            [leaf for _, leaf, _ in leaves],
            cots,
            allow_unused=True,
            retain_graph=bool(self.losses),  # the loss's backward follows (check_rows)
        )
        return [slot[0] for _, _, slot in leaves]

    def moved(self, before: torch.Tensor, after: torch.Tensor, rows: torch.Tensor) -> bool:
        """:func:`rows_moved` with the floor of each base tensor computed once."""
        if before.is_floating_point() and id(before) not in self.floors:
            self.floors[id(before)] = floor_of(before)
        return rows_moved(before, after, rows, self.floors.get(id(before)))

    def compare(self, name: str, what: str, t: torch.Tensor) -> None:
        """The changed run's record: the next tracked layer call must be the unchanged run's
        next one, with no row outside the set moved."""
        i = self.compared
        base = self.base
        if i >= len(base) or base[i][:2] != (name, what) or base[i][2].shape != t.shape:
            raise _reordered()
        if self.moved(base[i][2], t, self.outside):
            raise _forward_error(f"layer '{name}'", f"its {what}", self.rows)
        self.compared = i + 1

    def check_rows(self, rows: list[int], scale: float, ignore: bool = False) -> None:
        """One run with rows S changed (:meth:`LayoutVerifier.check`; ``ignore``: targets of S
        ignored): forward, then backward."""
        inside = row_mask(self.batch, rows)
        self.rows, self.outside, self.compared, self.ignore = rows, ~inside, 0, ignore
        out, leaves = self.run(rows, scale, self.compare)
        if self.compared != len(self.base) or [n for n, _, _ in leaves] != self.names:
            raise _reordered()
        for i, (t0, t1) in enumerate(zip(self.base_out, out, strict=True)):
            if self.moved(t0, t1, ~inside):
                what = f"output tensor {i} of the model (shape {list(t0.shape)})"
                raise _forward_error(what, "it", rows)
        # The cotangent on the other rows only: their output gradients must be those of the
        # unchanged batch under the whole cotangent (no dependence on examples S's data nor on
        # the other rows' cotangent), and rows S must get none (no gradient carried from another
        # row into S; a pair (i, j) has a set with j in S and i outside). At the second scale
        # rows S may hold inf or NaN (legitimately, within S), which a zero cotangent can turn
        # into NaN there: only rows outside S are read then.
        grads = self.output_grads(out, leaves, ~inside)
        for name, g, g0 in zip(self.names, grads, self.base_grads, strict=True):
            if g is None or g0 is None:
                continue
            if scale == 1.0 and _mass_in(g, inside):
                raise _backward_error(name, rows, "reached")
            if self.moved(g0, g, ~inside):
                raise _backward_error(name, rows, "moved")
        if self.base_loss_grads is None:
            return
        # The model's loss, its backward known row-wise: its gradient on the other rows must not
        # depend on examples S (their data; in an ignore run, their count of targets).
        if not self.losses:
            raise _reordered()
        loss_grads = loss_coupling.loss_gradients(self.losses, leaves)
        self.losses = []
        for g, g0 in zip(loss_grads, self.base_loss_grads, strict=True):
            if g is not None and g0 is not None and self.moved(g0, g, ~inside):
                raise loss_coupling.coupled_loss_error(_few(rows), ignore)


def cuda_devices(model: nn.Module) -> list[int]:
    """The CUDA devices holding the model's parameters (whose RNG states a re-run restores)."""
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def layout_row_sets(batch: int) -> list[list[int]]:
    """The row sets the layout verification perturbs: for each bit b of a row index (b <
    ceil(log2 batch)), the rows whose bit b is 1, then those whose bit b is 0.

    Rows i != j differ in some bit b, so one of these sets holds i and not j: every ordered pair
    of rows is tested, whatever positions a model mixes (a random sample of rows would catch two
    fixed interior rows of 30 in 1 run of 16)."""
    sets = []
    for bit in range(max(1, (batch - 1).bit_length())):
        ones = [i for i in range(batch) if i >> bit & 1]
        sets += [ones, [i for i in range(batch) if not i >> bit & 1]]
    return [rows for rows in sets if 0 < len(rows) < batch]


def row_mask(batch: int, rows: list[int]) -> torch.Tensor:
    """A bool mask (batch,) that is True on ``rows``."""
    mask = torch.zeros(batch, dtype=torch.bool)
    mask[rows] = True
    return mask


def floor_of(before: torch.Tensor) -> torch.Tensor:
    """The median over rows of each position's size in ``before`` (finite sizes; a (B,) tensor
    has one position), float64: the smallest local scale :func:`rows_moved` gives an entry."""
    size = before.detach().reshape(before.shape[0], -1).double().abs()
    size = size.nan_to_num(posinf=0.0, neginf=0.0)
    return size.median(0).values if size.shape[0] > 1 else size[0]


def rows_moved(
    before: torch.Tensor,
    after: torch.Tensor,
    rows: torch.Tensor,
    floor: torch.Tensor | None = None,
) -> bool:
    """Whether a row in ``rows`` (a bool mask of dim 0) changed by more than LAYOUT_TOLERANCE of
    its entry's local scale (NaN where ``before`` had none is a change).

    The scale of entry (b, j) is max(|before[b, j]|, the median over rows of |before[:, j]|),
    j running over the positions within a row: rounding moves an entry in proportion to the
    values of its own position, and a scale taken from the whole tensor would let a model inflate
    every entry's tolerance with one huge junk column or row (a constant 1e30 column beside the
    logits let a bounded forward vote over the batch pass and move the sum by 18 C). A huge
    column inflates only itself, a huge row only itself and no median; only huge values planted
    in most rows of the very position that mixes inflate it. ``floor``: :func:`floor_of`
    ``before``, when the caller has it."""
    # (B, everything else): one column per position within a row (a (B,) tensor: one column).
    before = before.detach().reshape(before.shape[0], -1)
    after = after.detach().reshape(after.shape[0], -1)
    rows = rows.to(before.device)
    changed = after != before
    if before.is_floating_point():
        changed &= ~(after.isnan() & before.isnan())
    changed = changed.any(1) & rows
    if not bool(changed.any()):  # bit-equal: the usual case, without a float64 copy
        return False
    if not before.is_floating_point():
        return True
    if floor is None:
        floor = floor_of(before)
    b, a = before[changed].double(), after[changed].double()
    same = (a == b) | (a.isnan() & b.isnan())
    scale = torch.maximum(b.abs().nan_to_num(posinf=0.0, neginf=0.0), floor.to(b.device))
    diff = (a - b).abs().masked_fill(same, 0.0)
    return not bool((diff <= LAYOUT_TOLERANCE * scale).all())


def _tensors(out) -> list[torch.Tensor]:
    """Every tensor in a model output (tensor, tuple, list, dict, Hugging Face ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []


def _differs(tensors: list[torch.Tensor], k: int, j: int) -> bool:
    return any(not torch.equal(t[k], t[j]) for t in tensors)


def _rows_of(mask: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``mask`` (B,) on ``t``'s device, shaped to broadcast over ``t``'s other dimensions."""
    return mask.to(t.device).view(-1, *([1] * (t.dim() - 1)))


def _mass_in(grad: torch.Tensor, rows: torch.Tensor) -> bool:
    """Whether an entry of ``grad`` in ``rows`` (a bool mask of dim 0) is non-zero (NaN is)."""
    return bool(((grad != 0).reshape(grad.shape[0], -1).any(1) & rows.to(grad.device)).any())


def _few(rows: list[int]) -> str:
    """Row indices for a message (the first 8 of many)."""
    if len(rows) <= 8:
        return str(rows)
    return f"[{', '.join(map(str, rows[:8]))}, ...] ({len(rows)} rows)"


def _reordered() -> LayoutError:
    return LayoutError(
        "DP engine: cannot verify the layout: the tracked layers ran in another "
        "order or with other shapes when some examples changed"
    )


def _forward_error(what: str, part: str, rows: list[int]) -> LayoutError:
    return LayoutError(
        f"DP engine: {what} is not one example per row of dim 0: changing examples "
        f"{_few(rows)} (or their rows in the tracked layers) changed other rows of {part}. The "
        "model mixes the examples of a batch (a flattened (B*T, d) or sequence-first (T, B, ...) "
        "layout, attention or pooling over dim 0, BatchNorm in training mode, a batch statistic, "
        "a loss over pairs of examples); per-example clipping would not bound one example's "
        "influence"
    )


def _backward_error(name: str, rows: list[int], how: str) -> LayoutError:
    what = {
        "reached": "a gradient on the other examples' outputs alone reached rows {rows} of its "
        "output gradient",
        "moved": "with a gradient on the other examples' outputs alone, after changing examples "
        "{rows}, their rows of its output gradient were not those of the unchanged batch with a "
        "gradient on every output",
    }[how].format(rows=_few(rows))
    return LayoutError(
        f"DP engine: layer '{name}' is not one example per row of dim 0 in backward: {what}. "
        "Something mixes the examples in backward (a custom autograd.Function, a tensor hook "
        "summing, centring or normalising over dim 0, a gradient scaled by a batch statistic, a "
        "tensor saved for backward overwritten through .data); per-example clipping would not "
        "bound one example's influence"
    )
