"""The private step: per-example clipping over all parameters, noise once per logical step,
post-processing (denoising), accounting.

The private step is a template of named stages (:class:`PrivateEngine`'s methods):

1. clip and accumulate (:meth:`~PrivateEngine.accumulate_pending`, once per physical batch): hooks
   keep every tracked layer's input and output gradient -> per-example squared norms per
   parameter, summed into one total norm per example -> clip factors -> clipped sums, divided by
   the expected batch size;
2. add noise (:meth:`~PrivateEngine.add_noise`, at ``step()``): Gaussian noise of std
   ``noise_multiplier * max_grad_norm`` on every coordinate of the sum, fused into the last
   physical batch's clipped sums;
3. all-reduce (:meth:`~PrivateEngine.all_reduce`): the sums of every rank added up;
4. post-process (:func:`rmt_kernels.dp.stages.chain.post_process` over
   ``PrivateEngine.post_processors``, the chain of rmt_kernels/dp/stages/chain.py: a
   :class:`~rmt_kernels.dp.stages.denoiser.Denoiser`, temporal filters, a DP-aware Adam, ...):
   reads only the released noisy gradient and public numbers;
5. write gradients (:meth:`~PrivateEngine.write_gradients`): ``param.grad``, for the wrapped
   optimizer;
6. account (:meth:`~PrivateEngine.step_accounted`).

:meth:`~PrivateEngine.privatize` runs 2-5; :class:`rmt_kernels.dp.DPOptimizer` runs it, the
wrapped optimizer and 6. A new post-processor is a stage of the chain (its own file in
rmt_kernels/dp/stages/), not a change here.

Under torch.distributed (rmt_kernels/dp/distributed.py has the reasoning): the clipped sums of
every rank are all-reduced before post-processing, rank 0 alone adds the noise, and the ranks
agree on the seed. With a privacy ledger (rmt_kernels/dp/checkpoint.py) each logical step is
recorded before its data touches the model. Checkpoints go through :meth:`PrivateEngine.state_dict`
and :meth:`PrivateEngine.load_state_dict`.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from rmt_kernels._checks import SEED_LIMIT  # the ops' signed 64-bit noise key: [0, 2^63)
from rmt_kernels.dp import distributed
from rmt_kernels.dp.calibration import spent_epsilon
from rmt_kernels.dp.capture import (
    LayerCapture,
    LayoutError,
    ModelHook,
    TrackedLayer,
    trainable_layers,
)
from rmt_kernels.dp.stages.chain import (
    build_chain,
    first_denoiser,
    post_process,
    set_record_stats,
    spectral_stages,
    stage_input_sigmas,
    take_stats,
)
from rmt_kernels.dp.stages.denoiser import DenoiseFilter, Denoiser, denoise_linear_weights
from rmt_kernels.dp.stages.protocol import PostProcessor
from rmt_kernels.ops import add_gaussian_noise, clip_scales, noise_offset

# Layout verification: an entry of another example's row may move by at most this fraction of its
# local scale (max of its own size and its position's median over rows; see _rows_moved) when
# one example changes. Row-wise ops on equal shapes give bit-equal rows,
# so only a batch-level code switch (e.g. an attention mask dropped when it is all ones) moves
# them, by rounding (~1e-7); an op that mixes examples (BatchNorm statistics, attention over the
# wrong dimension) moves them by ~1/B of the change or more, far above this up to B ~ 1e4.
LAYOUT_TOLERANCE = 1e-5
# The verification's second pass multiplies every perturbation by this: mixing whose effect on
# other rows is a fraction c of the change moves them by c * 2^40 of the first scale, so any
# c above about LAYOUT_TOLERANCE / 2^40 ~ 1e-17 is refused (x + 1e-6 * x.sum(0) passes the
# tolerance at the first scale). 2^40 keeps a float32 model's activations finite: entries of
# ~1e13, their squares (LayerNorm's variance) ~1e26 and attention scores ~1e28 are below 3e38.
LAYOUT_LARGE_SCALE = 2.0**40


def check_seed(seed: int | None, what: str = "seed") -> None:
    """None, or an int in [0, 2^63) (the ops' signed 64-bit noise key)."""
    if seed is None:
        return
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"{what} must be None or an int, got {type(seed).__name__}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(
            f"{what} must be in [0, 2**63) (the noise key is a signed 64-bit integer), got {seed}"
        )


def seed_id_of(seed: int) -> str:
    """The privacy ledger's name of the noise stream of ``seed`` (a hash; never the seed)."""
    return hashlib.sha256(f"rmt-noise-seed:{seed}".encode()).hexdigest()[:16]


def _random_stream_id(process_group) -> str:
    """The ledger's name of a secret noise stream: random (never derived from the secret seed,
    whose hash would let anyone with the ledger test guesses), the same on every rank."""
    return f"{distributed.broadcast_int(secrets.randbits(63), process_group):016x}"


def derived_seed(seed: int, salt: int) -> int:
    """A fresh, reproducible seed in [0, 2^63) derived from ``seed`` and ``salt`` (re-keying the
    noise on a resume that cannot replay: see :meth:`PrivateEngine.rekey_noise`)."""
    digest = hashlib.sha256(f"rmt-rekey:{seed}:{salt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # all 63 bits the noise key takes


class PrivateEngine:
    """Book-keeping DP-SGD for a model: clipping, noise, denoising, accounting.

    Usually built by :func:`rmt_kernels.dp.make_private`; see it for the arguments.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        sample_rate: float,
        accountant,
        denoise: dict | None = None,
        denoise_filter: DenoiseFilter = denoise_linear_weights,
        post_processors: Sequence[PostProcessor] | None = None,
        loss_reduction: str = "mean",
        seed: int | None = None,
        secure_mode: bool = False,
        process_group=None,
        verify_layout: bool = True,
    ) -> None:
        if not (max_grad_norm > 0 and max_grad_norm < float("inf")):
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm}")
        if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
            raise ValueError(
                f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}"
            )
        check_seed(seed)
        if secure_mode and seed is not None:
            raise ValueError(
                "seed and secure_mode=True contradict each other: secure mode draws the noise "
                "seed from the OS; pass seed=None"
            )
        if expected_batch_size < 1:
            raise ValueError(f"expected_batch_size must be >= 1, got {expected_batch_size}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.model = model
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.expected_batch_size = int(expected_batch_size)
        self.sample_rate = float(sample_rate)
        self.accountant = accountant
        self.loss_reduction = loss_reduction
        self.secure_mode = secure_mode
        # The noise key is (seed, step, parameter index). By default the seed comes from the OS
        # (privacy invariant 9, PRIVACY.md): anyone who knows it can regenerate the noise and
        # subtract it.
        # In secure mode it is also never stored anywhere a log or checkpoint could show it.
        self.noise_seed_is_secret = seed is None
        if seed is None:
            # All 63 bits the ops' signed 64-bit Philox key can hold (the noise stream uses every
            # key bit: 2^63 candidates to search, unlike a torch generator's 2^32).
            seed = secrets.randbits(63)
        self.process_group = process_group
        self.rank, self.world_size = distributed.world(process_group)
        # Every rank must draw the same noise (only rank 0 adds it, but a resumed or replayed
        # run must agree) and denoise alike: rank 0's seed wins.
        self._seed = distributed.broadcast_int(int(seed), process_group)
        # Names the noise stream in the privacy ledger: derived from a public seed (a rerun with
        # the same seed is recognised as a replay), random for a secret one (which is never a
        # replay). A hash of a secret 62-bit seed written to the ledger would let anyone with
        # the ledger test guesses of the seed offline, and the seed gives away all the noise.
        if secure_mode or self.noise_seed_is_secret:
            self.seed_id = _random_stream_id(process_group)
        else:
            self.seed_id = seed_id_of(self._seed)
        self.steps = 0
        # Privacy ledger (rank 0 only) and the (step, seed id) pairs it holds that the
        # accountant has already counted (steps of a crashed run, counted at load).
        self.ledger = None
        self.counted: set[tuple[int, str]] = set()
        self._recorded_step = -1
        # Seconds spent in the all-reduce of the clipped sums (the benchmark's share).
        self.allreduce_seconds = 0.0

        self.layers: list[TrackedLayer] = trainable_layers(model)
        self.params: list[tuple[TrackedLayer, str, nn.Parameter]] = [
            (layer, name, p) for layer in self.layers for name, p in layer.params.items()
        ]
        # The key of each parameter's gradient in the private step (the post-processors see
        # these): its qualified name in the model, stable across processes and resumes.
        self.param_names: list[str] = [
            f"{layer.name}.{name}" if layer.name else name for layer, name, _ in self.params
        ]
        self.verify_layout = bool(verify_layout)
        # The tracked layers the layout verification has seen run and passed. It runs at the
        # first forward of a batch with two examples or more, and again on the first later
        # batch that runs a tracked layer it has not seen (one skipped by LayerDrop then).
        self._verified_layers: set[str] = set()
        # While some tracked layer is unverified: what re-running the current batch needs
        # (_Replay), kept from the engine's pre-hook to the model's forward hook.
        self._replay: _Replay | None = None
        # True while check_layout runs its own forwards (with gradients enabled): they are not
        # physical batches.
        self._verifying = False
        self._param_index = {id(p): i for i, (_, _, p) in enumerate(self.params)}
        # Stage 4 of the step: post-processors of the released gradient, in order
        # (rmt_kernels/dp/stages/chain.py: ``denoise=`` is a Denoiser at the front of the chain).
        self.post_processors: list[PostProcessor] = build_chain(denoise, post_processors)
        # The filter decision, made once from the modules (only the engine knows them), for
        # every stage that shrinks matrices; a stage restricted by its caller keeps only the
        # keys both choose.
        for stage in spectral_stages(self.post_processors):
            chosen = {
                key
                for key, (layer, name, p) in zip(self.param_names, self.params, strict=True)
                if stage.eligible(p.shape) and denoise_filter(layer.name, layer.module, name, p)
            }
            given = stage.keys
            stage.restrict_to(
                k for k in self.param_names if k in chosen and (given is None or k in given)
            )
        #: The first Denoiser of the chain (``denoise=``'s when given), or None.
        self.denoiser: Denoiser | None = first_denoiser(self.post_processors)
        # The noise std each stage was given at the last step recorded (for the statistics).
        self._stage_sigmas: list[float] | None = None
        self.capture = LayerCapture(self.layers)
        # Calls of the model in progress (a model may call itself inside its forward).
        self._forward_depth = 0
        # Prepended: it must run before the capture's pre-hook when the model is itself a
        # tracked layer (nn.Linear as a logistic regression), or restoring the parameters'
        # requires_grad would undo what that pre-hook switched off for the forward.
        self._hooks = [
            model.register_forward_pre_hook(_EngineHook(self), with_kwargs=True, prepend=True),
            model.register_forward_hook(_EngineEndHook(self), always_call=True),
        ]
        # A tracked parameter's own module turns its requires_grad off while it runs, so autograd
        # reaches the parameter only through some other use: refuse that gradient (it would be
        # lost, or trained on unclipped) the moment backward computes it.
        for full, (_, _, p) in zip(self.param_names, self.params, strict=True):
            self._hooks.append(p.register_hook(_refuse_direct_use(full)))
        # The logical step's clipped sums so far, by parameter name.
        self._sums: dict[str, torch.Tensor] = {}
        self.skip_next_step = False
        self._record_denoise_stats = False

    def __repr__(self) -> str:  # never show the seed
        return (
            f"PrivateEngine(noise_multiplier={self.noise_multiplier}, max_grad_norm="
            f"{self.max_grad_norm}, expected_batch_size={self.expected_batch_size}, "
            f"params={len(self.params)}, steps={self.steps})"
        )

    # ---------------------------------------------------------------------------------------
    # Physical batches
    # ---------------------------------------------------------------------------------------

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not torch.is_grad_enabled() or self._verifying:
            return  # evaluation, or the layout verification's own forwards (check_layout)
        # A forward that raised inside a tracked layer left its parameters switched off.
        for layer in self.layers:
            self.capture.restore_requires_grad(layer)
        # The batch size is the leading dimension of the model's first tensor input.
        first = next(
            (t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.dim()),
            None,
        )
        batch = None if first is None else first.shape[0]
        if batch == 0:
            raise ValueError(
                "DP engine: empty batch (a Poisson batch can be empty): skip forward and "
                "backward and call optimizer.step() alone, which adds the noise and counts the "
                "step"
            )
        self.record_step()
        # A new physical batch while the previous one is still held: fold it into the sums
        # (no noise yet) so that several batches make one logical step.
        self.accumulate_pending()
        self.capture.batch_size = batch
        self._replay = None
        if self.verify_layout and not self.layout_verified and batch is not None and batch > 1:
            if not self._verified_layers:
                # The first verification runs before the training forward (its graphs and the
                # training graph are never alive together) with the RNG state the training
                # forward is about to use, so it takes the same random branches.
                self._verified_layers |= self.check_layout(module, args, kwargs)
            if not self.layout_verified:
                # A layer this batch may run for the first time (LayerDrop) is verified after
                # the training forward shows it ran, on this batch from this RNG state.
                self._replay = _Replay.of(module, args, kwargs)
        self.capture.in_training_forward = True
        # Autograd need not compute parameter gradients: each tracked layer switches its own
        # parameters' requires_grad off while it runs (rmt_kernels/dp/capture.py) and the rules
        # build the private gradients from each layer's input and output gradient (which saves a
        # weight-gradient GEMM per layer and the dense embedding gradient).

    @property
    def layout_verified(self) -> bool:
        """Whether the layout verification has passed for every tracked layer."""
        return len(self._verified_layers) == len(self.layers)

    def _after_forward(self, model: nn.Module) -> None:
        """The model's forward hook: verify the layout on this batch if it ran a tracked layer
        that no verification has seen (one skipped by LayerDrop at the earlier batches).

        Runs before backward can hand the layer's output gradient to the rules, so nothing of
        an unverified layer reaches the clipped sums. The re-run starts from the RNG state and
        buffers this batch started from (the same random branches); the current RNG state and
        buffers are restored after it, so training goes on as if it had not run.

        Raises:
            LayoutError: the verification fails, or its re-run of the batch did not run a
                tracked layer the training forward ran (a branch on something other than
                torch's random generators, which the verification cannot reproduce).
        """
        replay, self._replay = self._replay, None
        if replay is None:
            return
        ran = {layer.name for layer in self.layers if layer.activation is not None}
        new = ran - self._verified_layers
        if not new:
            return
        seen = self.check_layout(model, replay.args, replay.kwargs, replay)
        self._verified_layers |= seen
        if new - seen:
            raise LayoutError(
                f"DP engine: cannot verify the layout of layer(s) {sorted(new - seen)}: they ran "
                "in this training forward but not when the verification ran the same batch again "
                "from the same torch RNG state and buffers (a branch on Python's random module, "
                "the clock or other state the engine cannot restore). Drive random layer "
                "skipping by torch's generators, or pass verify_layout=False and take "
                "responsibility for the layout"
            )

    # ---------------------------------------------------------------------------------------
    # Checks: the layout each rule sees, and what the optimizer is about to update
    # ---------------------------------------------------------------------------------------

    def check_layout(
        self, model: nn.Module, args: tuple, kwargs: dict, replay: _Replay | None = None
    ) -> set[str]:
        """Verify that dim 0 of every tracked layer that runs is the example, forward and
        backward; return the names of the layers it saw run.

        The rules are exact when (a) row b of every tracked layer's input depends on example b
        alone, and (b) row b of its output gradient depends on example b alone (its data and
        the gradient of its own loss). A shape check cannot see a sequence-first layer with
        T == B or an op that mixes examples, so this runs the model again on the same batch,
        with gradients enabled (code keyed on the grad mode takes its training branch; nothing
        is kept and no ``.grad`` is written), once unchanged and then once per row set S of
        :func:`layout_row_sets`: 2 * ceil(log2 B) sets such that every ordered pair of rows
        (i, j) has a set holding i and not j. Each time, the rows S of every batched input get
        random values (noise of twice the tensor's largest entry for floats, another id within
        the batch's range for integers, another example's rows otherwise) and rows S of every
        tracked layer's output get a random perturbation, and:

        - forward: no row outside S of any tracked layer's input or output, nor of any model
          output whose dim 0 is the batch, may move (beyond ``LAYOUT_TOLERANCE`` of the
          entry's local scale, see :func:`_rows_moved`);
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

        What remains assumed (stated in :func:`make_private` and README.md): the loss is a sum
        or mean over examples of a function of the model output's row b; data-dependent or
        stateful behaviour that this batch and these perturbations do not trigger is not seen,
        nor mixing whose effect on other rows stays below ``LAYOUT_TOLERANCE /
        LAYOUT_LARGE_SCALE`` of the change (in-place changes of a tracked layer's input after it
        ran are refused at every step by the capture).

        Every run starts from the RNG state and buffers of ``replay`` (those of the batch's
        start, when it re-runs a batch whose training forward has run) or else the current ones,
        which are restored at the end either way.

        Raises:
            LayoutError: a row of another example moved, the model's outputs have no tensor whose
                dim 0 is the batch (nothing to check (b) against), or the layers ran in another
                order.
        """
        batch = self.capture.batch_size

        def batched(t) -> bool:
            return isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch

        inputs = [t for t in (*args, *kwargs.values()) if batched(t)]
        devices = _cuda_devices(model)
        if replay is None:
            replay = _Replay.of(model, args, kwargs)
            now = replay.buffers
        else:
            now = [(b, b.detach().clone()) for b, _ in replay.buffers]
        cpu_state, cuda_states, buffers = replay.cpu_state, replay.cuda_states, replay.buffers
        generator = torch.Generator().manual_seed(0)  # the perturbation is public
        partners: dict[int, int | None] = {}

        def restore_buffers(saved_buffers=buffers) -> None:
            # Before each run and at the end, not right after a run: a backward through the
            # run's graph may read a buffer it saved (BatchNorm's running statistics).
            with torch.no_grad():
                for b, saved in saved_buffers:
                    b.copy_(saved)

        def partner(k: int) -> int | None:
            # Another example whose inputs differ from example k's (None if all are equal).
            if k not in partners:
                others = ((k + d) % batch for d in range(1, batch))
                partners[k] = next((j for j in others if _differs(inputs, k, j)), None)
            return partners[k]

        def perturb(t: torch.Tensor, rows: list[int], scale: float) -> torch.Tensor:
            # Rows S get fresh values (random noise large enough to move any batch statistic
            # such as a max; a random id within the batch's range for integer ids): copying a
            # partner alone cannot show an op that only an outlier triggers.
            t, index = t.clone(), torch.tensor(rows, device=t.device)
            shape = (len(rows), *t.shape[1:])
            if t.is_floating_point() and bool(t.isfinite().all()):
                size = (2.0 * float(t.abs().max()) + 1.0) * scale
                noise = torch.randn(shape, generator=generator, dtype=torch.float32)
                t[index] = t[index] + (noise * size).to(t.device, t.dtype)
                return t
            if t.dtype != torch.bool and not t.is_complex() and not t.is_floating_point():
                lo, hi = int(t.min()), int(t.max())
                if hi > lo:
                    # A random non-zero shift (mod the range): every id differs from the old one.
                    shift = torch.randint(1, hi - lo + 1, shape, generator=generator)
                    t[index] = (t[index] - lo + shift.to(t.device, t.dtype)) % (hi - lo + 1) + lo
                    return t
            source = t.clone()
            for k in rows:
                j = partner(k)
                if j is not None:
                    t[k] = source[j]
            return t

        def run(rows: list[int] | None, scale: float, record):
            # ``record(name, what, tensor)`` receives each tracked layer's input and output as
            # the layer runs: the unchanged run keeps copies, the others compare at once and
            # keep nothing (one run's graph and gradients alive at a time besides the base's
            # values).
            def replace(t):
                return perturb(t, rows, scale) if rows is not None and batched(t) else t

            a = tuple(replace(t) for t in args)
            kw = {n: replace(t) for n, t in kwargs.items()}
            self.capture.recording = record
            self.capture.perturb_rows = None if rows is None else _row_mask(batch, rows)
            self.capture.perturb_scale = scale
            self.capture.perturb_generator = generator
            self.capture.leaves = []
            self._verifying = True
            restore_buffers()
            try:
                # Gradients enabled: the verified forward takes the same grad-mode branches as
                # training (code keyed on torch.is_grad_enabled() or requires_grad). The capture
                # keeps nothing in recording mode, the tracked layers' parameters do not require
                # grad while they run, and the backward below is torch.autograd.grad on the
                # recorded leaves only, so no .grad is written.
                with torch.random.fork_rng(devices=devices), torch.enable_grad():
                    torch.set_rng_state(cpu_state)
                    for d, state in zip(devices, cuda_states, strict=True):
                        torch.cuda.set_rng_state(state, d)
                    out = model(*a, **kw)
            finally:
                self._verifying = False
                self.capture.recording = self.capture.perturb_rows = None
                self.capture.perturb_scale = 1.0
            leaves, self.capture.leaves = self.capture.leaves, []
            return [t for t in _tensors(out) if batched(t)], leaves

        def output_grads(out: list[torch.Tensor], leaves: list, rows: torch.Tensor | None):
            # Every tracked layer's output gradient (None where unused) from the fixed cotangent
            # on the model's outputs, restricted to ``rows`` (a bool mask; None: all rows).
            roots = [(t, c) for t, c in zip(out, cotangents, strict=True) if c is not None]
            if not roots or not leaves:
                return [None] * len(leaves)
            cots = [c if rows is None else c * _rows_of(rows, c) for _, c in roots]
            for _, _, slot in leaves:
                slot[0] = None
            # The leaves only anchor the backward; each layer's output gradient is what the
            # hook on its output received (capture._record), as keep_grad does in training.
            torch.autograd.grad(
                [t for t, _ in roots],
                [leaf for _, leaf, _ in leaves],
                cots,
                allow_unused=True,
            )
            return [slot[0] for _, _, slot in leaves]

        def moved(before: torch.Tensor, after: torch.Tensor, rows: torch.Tensor) -> bool:
            # _rows_moved with the floor of each base tensor computed once (a median over rows).
            if before.is_floating_point() and id(before) not in floors:
                floors[id(before)] = _floor(before)
            return _rows_moved(before, after, rows, floors.get(id(before)))

        def reordered() -> LayoutError:
            return LayoutError(
                "DP engine: cannot verify the layout: the tracked layers ran in another "
                "order or with other shapes when some examples changed"
            )

        def check_rows(rows: list[int], scale: float) -> None:
            # One run with rows S changed (module docstring): forward, then backward.
            inside = _row_mask(batch, rows)
            seen = [0]

            def compare(name: str, what: str, t1: torch.Tensor) -> None:
                i = seen[0]
                if i >= len(base) or base[i][:2] != (name, what) or base[i][2].shape != t1.shape:
                    raise reordered()
                if moved(base[i][2], t1, ~inside):
                    raise _forward_error(f"layer '{name}'", f"its {what}", rows)
                seen[0] = i + 1

            out, leaves = run(rows, scale, compare)
            if seen[0] != len(base) or [n for n, _, _ in leaves] != names:
                raise reordered()
            for i, (t0, t1) in enumerate(zip(base_out, out, strict=True)):
                if moved(t0, t1, ~inside):
                    what = f"output tensor {i} of the model (shape {list(t0.shape)})"
                    raise _forward_error(what, "it", rows)
            # The cotangent on the other rows only: their output gradients must be those of
            # the unchanged batch under the whole cotangent (no dependence on examples S's data
            # nor on the other rows' cotangent), and rows S must get none (no gradient carried
            # from another row into S; a pair (i, j) has a set with j in S and i outside). At
            # the second scale rows S may hold inf or NaN (legitimately, within S), which a zero
            # cotangent can turn into NaN there: only rows outside S are read then.
            grads = output_grads(out, leaves, ~inside)
            for name, g, g0 in zip(names, grads, base_grads, strict=True):
                if g is None or g0 is None:
                    continue
                if scale == 1.0 and _mass_in(g, inside):
                    raise _backward_error(name, rows, "reached")
                if moved(g0, g, ~inside):
                    raise _backward_error(name, rows, "moved")

        base: list[tuple[str, str, torch.Tensor]] = []
        floors: dict[int, torch.Tensor] = {}
        try:
            base_out, base_leaves = run(
                None, 1.0, lambda name, what, t: base.append((name, what, t.clone()))
            )
            if not base_out:
                raise LayoutError(
                    "DP engine: cannot verify the layout: no tensor in the model's output has "
                    f"the batch size {batch} as dim 0 (needed to check that each example's rows "
                    "reach only its own loss). Return per-example outputs (e.g. logits) from the "
                    "model, or pass verify_layout=False to make_private and take responsibility "
                    "for it"
                )
            # One random cotangent per floating model output in the graph, the same every run.
            cotangents = [
                torch.randn(t.shape, generator=generator).to(t.device, t.dtype)
                if t.requires_grad and t.is_floating_point()
                else None
                for t in base_out
            ]
            base_grads = output_grads(base_out, base_leaves, None)
            names = [name for name, _, _ in base_leaves]
            # Only the base run's values are needed from here on: free its graph.
            base_out = [t.detach() for t in base_out]
            del base_leaves
            for scale in (1.0, LAYOUT_LARGE_SCALE):
                for rows in layout_row_sets(batch):
                    check_rows(rows, scale)
        finally:
            restore_buffers(now)
        return {name for name, _, _ in base}

    def check_updates(self, param_groups) -> None:
        """Refuse a step that would update a parameter the engine did not privatise.

        Called by :meth:`DPOptimizer.step` before the wrapped optimizer steps (privacy
        invariant 8, PRIVACY.md). Refuses: a model parameter unfrozen after make_private
        (requires_grad, not tracked), a tracked parameter frozen since (its rule would drop it), an
        untracked tensor holding a gradient, and any parameter of the optimizer's groups that the
        engine does not track but that requires grad or has a gradient (a group added through
        ``original_optimizer.add_param_group`` or ``param_groups.append``).

        Raises:
            RuntimeError: naming the parameter.
        """
        tracked = self._param_index
        names = {}
        for name, p in self.model.named_parameters():
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

    def _grad_outputs(self, captured):
        """Output gradients of per-example losses: a mean-reduced loss scaled them by 1/B."""
        batch = captured[0][2].shape[0]
        factor = batch if self.loss_reduction == "mean" else 1
        return [(layer, x, dy * factor if factor != 1 else dy) for layer, x, dy in captured]

    def per_parameter_sq_norms(self, captured) -> list[torch.Tensor]:
        """Certified upper bounds (B,) of each example's squared gradient norm, one tensor per
        trainable parameter (what :func:`clip_scales` sums in float64)."""
        parts = []
        for layer, x, dy in captured:
            norms = layer.rule.sq_norms(layer.module, x, dy)
            missing = set(layer.params) - set(norms)
            if missing:
                raise RuntimeError(
                    f"DP engine: the rule of '{layer.name}' gave no norm for {sorted(missing)}"
                )
            parts.extend(norms[name] for name in layer.params)
        return parts

    def per_example_sq_norms(self, captured) -> torch.Tensor:
        """Squared norms (B,) of each example's gradient over ALL trainable parameters (float64
        sum of the per-parameter bounds)."""
        parts = self.per_parameter_sq_norms(captured)
        total = parts[0].double()
        for part in parts[1:]:
            total = total + part.double()
        return total

    def accumulate_pending(self) -> None:
        """Stage 1: fold the physical batch held since its backward into the logical step's
        clipped sums, without noise (the noise enters once per logical step, at
        :meth:`add_noise`). Nothing happens when no batch is held.

        Called at the next forward and by ``DPOptimizer.step`` after ``signal_skip_step``.
        """
        if self.capture.pending():
            self._accumulate(noise_std=0.0)

    def step_in_progress(self) -> bool:
        """Whether a logical step has data not yet released (a held batch or partial sums):
        a checkpoint must not be written then."""
        return self.capture.pending() or bool(self._sums)

    def _accumulate(self, noise_std: float) -> set[str]:
        """Fold the held physical batch into the clipped sums, adding noise if asked; the keys
        of the parameters folded in (those of the layers that ran)."""
        captured = self._grad_outputs(self.capture.take())
        # Dividing by the expected batch size is folded into the clip factors and the noise std
        # (noise_std arrives already divided), so the sums come out averaged with no extra pass.
        # The per-parameter bounds are summed in float64 inside clip_scales: a float32 total
        # could round below the certified bound (privacy invariant 6, PRIVACY.md).
        scale = clip_scales(self.per_parameter_sq_norms(captured), self.max_grad_norm)
        scale = scale / self.expected_batch_size
        folded: set[str] = set()
        for layer, x, dy in captured:
            index = {name: self._param_index[id(p)] for name, p in layer.params.items()}
            offsets = {
                name: noise_offset(self.steps, i, len(self.params)) for name, i in index.items()
            }
            sums = layer.rule.clipped_noisy_sums(
                layer.module, x, dy, scale, noise_std, self._seed, offsets
            )
            for name in layer.params:
                if name not in sums:
                    raise RuntimeError(
                        f"DP engine: the rule of '{layer.name}' gave no sum for '{name}'"
                    )
                key = self.param_names[index[name]]
                self._sums[key] = (
                    sums[name] if key not in self._sums else self._sums[key] + sums[name]
                )
                folded.add(key)
        return folded

    # ---------------------------------------------------------------------------------------
    # Logical step
    # ---------------------------------------------------------------------------------------

    def sigma(self) -> float:
        """Per-entry noise std of the averaged gradient: the denoiser's ``sigma``."""
        return self.noise_multiplier * self.max_grad_norm / self.expected_batch_size

    def record_step(self) -> None:
        """Append this logical step to the privacy ledger (once), before its data is used.

        Called at the first forward of a step and at ``privatize`` (an empty batch has no
        forward). Only rank 0 writes; the others' data cannot be released without rank 0.
        """
        if self._recorded_step == self.steps:
            return
        self._recorded_step = self.steps
        if self.ledger is not None and (self.steps, self.seed_id) not in self.counted:
            self.ledger.append(self.steps, self.seed_id)

    def privatize(self) -> None:
        """Stages 2-5 of the step: turn the held batches into noisy, averaged, post-processed
        gradients in ``p.grad`` (module docstring).

        Noise of std ``noise_multiplier * max_grad_norm`` on the sum (``sigma()`` on the
        average) enters every coordinate exactly once: fused into the last physical batch's
        sums, or added on its own when that batch was already folded in (or was empty). Across
        ranks, rank 0 alone adds it and the sums are all-reduced before post-processing.
        """
        self.record_step()
        grads = self.add_noise()
        grads = self.all_reduce(grads)
        grads = self.post_process(grads)
        self.write_gradients(grads)

    def add_noise(self) -> dict[str, torch.Tensor]:
        """Stage 2: the logical step's noisy averaged sums, by parameter name (and forget them).

        The held physical batch is clipped and accumulated with the noise fused in; a sum
        already folded in (several physical batches), or missing (an empty logical batch: zeros),
        gets the noise on its own. Only rank 0 adds noise. Same noise key either way:
        (seed, step, parameter index).
        """
        noise_std = self.sigma() if self.rank == 0 else 0.0
        noised: set[str] = set()
        if self.capture.pending():
            # Only the parameters of the layers that ran in this last batch: one skipped there
            # (LayerDrop) may hold a sum of earlier batches that has no noise yet.
            noised = self._accumulate(noise_std=noise_std)
        for i, (key, (_, _, p)) in enumerate(zip(self.param_names, self.params, strict=True)):
            if key not in self._sums:  # an empty logical batch: noise alone
                self._sums[key] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            if key not in noised and noise_std > 0:
                offset = noise_offset(self.steps, i, len(self.params))
                self._sums[key] = add_gaussian_noise(self._sums[key], noise_std, self._seed, offset)
        grads, self._sums = self._sums, {}
        return grads

    def all_reduce(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Stage 3: the sums of every rank added up (``grads`` itself on one process)."""
        if self.world_size == 1:
            return grads
        start = time.perf_counter()
        summed = distributed.all_reduce_sums(
            [grads[k] for k in self.param_names], self.process_group
        )
        grads = dict(zip(self.param_names, summed, strict=True))
        self.allreduce_seconds += time.perf_counter() - start
        return grads

    def post_process(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Stage 4: ``post_processors`` in order, on the released noisy gradient with the
        public ``sigma()`` and step counter only (post-processing: privacy invariant 4,
        PRIVACY.md)."""
        out = post_process(self.post_processors, grads, self.sigma(), self.steps)
        if self._record_denoise_stats:
            self._stage_sigmas = stage_input_sigmas(self.post_processors, self.sigma(), self.steps)
        return out

    def write_gradients(self, grads: dict[str, torch.Tensor]) -> None:
        """Stage 5: ``p.grad`` of every privatised parameter, in its dtype.

        Raises:
            RuntimeError: a post-processor dropped a parameter's gradient.
        """
        missing = [k for k in self.param_names if k not in grads]
        if missing:
            raise RuntimeError(
                f"DP engine: the post-processors returned no gradient for {missing[:3]} (a "
                "post-processor must return every gradient it was given)"
            )
        for key, (_, _, p) in zip(self.param_names, self.params, strict=True):
            p.grad = grads[key].to(p.dtype).view_as(p)

    @property
    def denoise_options(self) -> dict[str, Any] | None:
        """The denoise options given (``min_dim`` left out), or None without denoising."""
        if self.denoiser is None:
            return None
        return {k: v for k, v in self.denoiser.options.given_options().items() if k != "min_dim"}

    @property
    def record_denoise_stats(self) -> bool:
        """Set before a step to keep what :meth:`take_denoise_stats` reports (it costs an SVD
        per denoised matrix at the take)."""
        return self._record_denoise_stats

    @record_denoise_stats.setter
    def record_denoise_stats(self, value: bool) -> None:
        self._record_denoise_stats = bool(value)
        set_record_stats(self.post_processors, self._record_denoise_stats)

    def take_denoise_stats(self) -> dict[str, dict[str, float]]:
        """Per denoised parameter of the last step run with ``record_denoise_stats`` set, for
        every stage of the chain that shrinks matrices: the kept rank, ||denoised|| / ||input||
        (post-processing of the noisy gradient only), ``sigma`` (the noise level the stage
        shrank at: the released gradient's for a Denoiser first in the chain, a filtered
        moment's after a temporal filter) and ``stage`` (its index in ``post_processors``).
        Empty if nothing was recorded; forgets what it returns."""
        stats = take_stats(self.post_processors, self._stage_sigmas)
        self._stage_sigmas = None
        return stats

    def step_accounted(self) -> None:
        """Count one logical step with the accountant (unless a crashed run's ledger entry for
        this very (step, seed) was counted at resume: the deterministic replay releases the same
        output again, which costs nothing)."""
        if (self.steps, self.seed_id) not in self.counted:
            self.accountant.step(
                noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate
            )
        self.steps += 1

    # ---------------------------------------------------------------------------------------
    # State: checkpoints, the privacy ledger, the noise key
    # ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs of the engine (what rmt_kernels/dp/checkpoint.py saves).

        ``steps`` (the logical step counter, part of the noise key), ``seed`` (the noise seed
        only when the caller gave it, i.e. public: a secret one is never written, privacy
        invariant 9 in PRIVACY.md; else None), ``seed_id`` (the ledger's name of the noise stream),
        ``accountant`` (its state) and ``post_processors`` (each one's ``state_dict()``, in
        order). Plain values and tensors: loadable with ``torch.load(weights_only=True)``.

        Raises:
            RuntimeError: a logical step is in progress (its partial sums are not state).
        """
        if self.step_in_progress():
            raise RuntimeError(
                "PrivateEngine.state_dict: a logical step is in progress; call it after step()"
            )
        return {
            "steps": self.steps,
            "seed": None if self.noise_seed_is_secret else self._seed,
            "seed_id": self.seed_id,
            "accountant": self.accountant.state_dict(),
            "post_processors": [p.state_dict() for p in self.post_processors],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (call on every rank).

        The step counter, the accountant and each post-processor's state are restored. The
        noise seed is adopted when ``state`` holds one (a public seed), with its stream id; with
        a secret seed (``seed`` None) the engine draws a new secret seed and stream id (no
        noise key of the saved run, nor of this engine's own earlier steps, is reused). A
        ``state`` without ``post_processors`` (a checkpoint written before post-processors kept
        state, when the only one, the denoiser, kept none) leaves them as they are. The current
        step will be recorded in the ledger again at its first use.

        Raises:
            ValueError: ``post_processors`` does not match this engine's (another count).
        """
        processors = state.get("post_processors")
        if processors is not None and len(processors) != len(self.post_processors):
            raise ValueError(
                f"PrivateEngine.load_state_dict: {len(processors)} post-processor states for "
                f"{len(self.post_processors)} post-processors "
                f"({', '.join(type(p).__name__ for p in self.post_processors) or 'none'})"
            )
        # Post-processors first: they validate their state (e.g. the warm-start bases' shapes)
        # and raise before anything is replaced, so a refused state leaves the step counter and
        # the accountant as they were.
        for processor, processor_state in zip(self.post_processors, processors or (), strict=False):
            processor.load_state_dict(processor_state)
        self.accountant.load_state_dict(state["accountant"])
        self.steps = int(state["steps"])
        if state.get("seed") is not None:
            self._seed = int(state["seed"])
            self.seed_id = seed_id_of(self._seed)
        else:
            # A secret seed is never saved, so no replay is possible. The engine's own seed is
            # fresh only if it never released a step: an engine rolled back in the same process
            # (load_checkpoint on the running optimizer) would redraw its old (seed, step) noise
            # on other batches, and a difference of two releases would be the noise-free
            # difference of two clipped sums. So draw a new secret seed and stream id here,
            # always (the ledger then matches none of the old pairs: every step is charged).
            self._seed = distributed.broadcast_int(secrets.randbits(63), self.process_group)
            self.seed_id = _random_stream_id(self.process_group)
        self._recorded_step = -1

    def rekey_noise(self, salt: int) -> None:
        """Move to a new noise stream: a seed derived from the current one and ``salt`` (e.g.
        the privacy ledger's length), and its stream id.

        For a resume that cannot replay the lost steps exactly (other data, unknown sampling
        position) or a restart after a crash before the first checkpoint: with a new seed no
        (seed, step, parameter) noise key of the crashed run is reused on other data. Not in
        secure mode, whose seed is drawn fresh from the OS by every run already (and whose
        stream id must stay random).

        Raises:
            RuntimeError: in secure mode.
        """
        if self.secure_mode:
            raise RuntimeError(
                "PrivateEngine.rekey_noise: a secure-mode run's seed is fresh from the OS already"
            )
        self._seed = derived_seed(self._seed, salt)
        if self.noise_seed_is_secret:
            # From the old random id, never from the secret seed; the same on every rank.
            self.seed_id = hashlib.sha256(f"rmt-rekey:{self.seed_id}:{salt}".encode()).hexdigest()
            self.seed_id = self.seed_id[:16]
        else:
            self.seed_id = seed_id_of(self._seed)
        self._recorded_step = -1

    def set_ledger(self, ledger, counted: Iterable[tuple[int, str]] | None = None) -> None:
        """Record the following steps in ``ledger`` (a
        :class:`~rmt_kernels.dp.checkpoint.PrivacyLedger`, or None for none).

        Args:
            ledger: where :meth:`record_step` appends (rank 0 only; None on the others).
            counted: (step, seed id) pairs the accountant already counted (a crashed run's
                steps, counted at resume): replaying one costs nothing. None keeps the set.
        """
        self.ledger = ledger
        if counted is not None:
            self.counted = set(counted)
        # The current step is recorded again in the new ledger at its next use.
        self._recorded_step = -1

    def zero_grad(self) -> None:
        """Forget held batches and partial sums (the start of a new logical step).

        A forward whose backward has not run yet is kept: ``zero_grad()`` between forward and
        backward is a common loop, and dropping that batch would silently lose its data.
        """
        if self.capture.backward_seen():
            self.capture.clear()
        self._sums = {}

    def get_epsilon(self, delta: float) -> float:
        """Privacy spent so far, at ``delta``, from the accountant (infinite after a step
        without noise: the accountants' analyses divide by the noise multiplier)."""
        if self.steps == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return float("inf")
        return spent_epsilon(self.accountant, delta)

    def detach(self) -> None:
        """Remove every hook from the model."""
        self.capture.remove()
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


class _EngineHook(ModelHook):
    """The model's forward pre-hook (a ModelHook: a pickle of the model holds none of the
    engine)."""

    def __init__(self, engine: PrivateEngine) -> None:
        self.engine = engine

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.engine._before_forward(module, args, kwargs)
        # Counted once the pre-hook succeeded (the end hook then runs, even if forward raises).
        self.engine._forward_depth += 1


class _EngineEndHook(ModelHook):
    """The model's forward hook (also when the forward raised): the training forward ended."""

    def __init__(self, engine: PrivateEngine) -> None:
        self.engine = engine

    def __call__(self, module: nn.Module, args: tuple, output) -> None:
        engine = self.engine
        engine._forward_depth = max(0, engine._forward_depth - 1)
        # Only the outermost call ends the training forward: a nested call of the model inside
        # its own forward (say on an empty slice under no_grad) must not clear the flag that
        # refuses a tracked layer run with gradients off (red team D1: it let reentrant
        # checkpointing through again, 3.3 C off the per-example reference).
        if not engine._verifying and engine._forward_depth == 0:
            engine.capture.in_training_forward = False
            if torch.is_grad_enabled():  # not an evaluation forward
                engine._after_forward(module)


class _Replay:
    """What re-running a batch from its start needs: the model's arguments (references), the
    CPU and CUDA RNG states and copies of the model's buffers, taken before its forward."""

    def __init__(self, args: tuple, kwargs: dict, cpu_state, cuda_states, buffers) -> None:
        self.args, self.kwargs = args, kwargs
        self.cpu_state, self.cuda_states, self.buffers = cpu_state, cuda_states, buffers

    @classmethod
    def of(cls, model: nn.Module, args: tuple, kwargs: dict) -> _Replay:
        """The current state, for a run of ``model(*args, **kwargs)``."""
        devices = _cuda_devices(model)
        return cls(
            args,
            dict(kwargs),
            torch.get_rng_state(),
            [torch.cuda.get_rng_state(d) for d in devices],
            [(b, b.detach().clone()) for b in model.buffers()],
        )


def _cuda_devices(model: nn.Module) -> list[int]:
    """The CUDA devices holding the model's parameters (whose RNG states a re-run restores)."""
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def _refuse_direct_use(name: str):
    def hook(grad: torch.Tensor) -> None:
        raise RuntimeError(
            f"DP engine: parameter '{name}' got a gradient through autograd, so it was used "
            "outside its own module's forward (a direct use such as F.linear(h, emb.weight) in "
            "another module, or a loss term on the weights). The layer rules see only the use "
            "inside the module, so that gradient would be lost or trained on unclipped: use the "
            "parameter only through its module (untie or copy it), or freeze it"
        )

    return hook


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


def _row_mask(batch: int, rows: list[int]) -> torch.Tensor:
    mask = torch.zeros(batch, dtype=torch.bool)
    mask[rows] = True
    return mask


def _rows_of(mask: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``mask`` (B,) on ``t``'s device, shaped to broadcast over ``t``'s other dimensions."""
    return mask.to(t.device).view(-1, *([1] * (t.dim() - 1)))


def _few(rows: list[int]) -> str:
    """Row indices for a message (the first 8 of many)."""
    if len(rows) <= 8:
        return str(rows)
    return f"[{', '.join(map(str, rows[:8]))}, ...] ({len(rows)} rows)"


def _mass_in(grad: torch.Tensor, rows: torch.Tensor) -> bool:
    """Whether an entry of ``grad`` in ``rows`` (a bool mask of dim 0) is non-zero (NaN is)."""
    return bool(((grad != 0).reshape(grad.shape[0], -1).any(1) & rows.to(grad.device)).any())


def _floor(before: torch.Tensor) -> torch.Tensor:
    """The median over rows of each position's size in ``before`` (finite sizes; a (B,) tensor
    has one position), float64: the smallest local scale :func:`_rows_moved` gives an entry."""
    size = before.detach().reshape(before.shape[0], -1).double().abs()
    size = size.nan_to_num(posinf=0.0, neginf=0.0)
    return size.median(0).values if size.shape[0] > 1 else size[0]


def _rows_moved(
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
    in most rows of the very position that mixes inflate it. ``floor``: :func:`_floor` of
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
        floor = _floor(before)
    b, a = before[changed].double(), after[changed].double()
    same = (a == b) | (a.isnan() & b.isnan())
    scale = torch.maximum(b.abs().nan_to_num(posinf=0.0, neginf=0.0), floor.to(b.device))
    diff = (a - b).abs().masked_fill(same, 0.0)
    return not bool((diff <= LAYOUT_TOLERANCE * scale).all())
