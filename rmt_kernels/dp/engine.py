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

Beside the step: the one-time check that dim 0 of every tracked layer is the example
(rmt_kernels/dp/layout_verification.py, run from the model's forward hooks here) and the noise
key's seed and stream id (rmt_kernels/dp/noise_key.py).

Under torch.distributed (rmt_kernels/dp/distributed.py has the reasoning): the clipped sums of
every rank are all-reduced before post-processing, rank 0 alone adds the noise, and the ranks
agree on the seed. With a privacy ledger (rmt_kernels/dp/ledger.py) each logical step is
recorded before its data touches the model. Checkpoints go through :meth:`PrivateEngine.state_dict`
and :meth:`PrivateEngine.load_state_dict`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from operator import attrgetter
from typing import Any

import torch
from torch import nn

from rmt_kernels.dp import distributed
from rmt_kernels.dp.calibration import spent_epsilon
from rmt_kernels.dp.capture import LayerCapture, ModelHook, TrackedLayer, trainable_layers
from rmt_kernels.dp.drawn_batches import DrawnBatches, check_rows
from rmt_kernels.dp.layout_verification import LayoutVerifier
from rmt_kernels.dp.noise_key import NoiseKey
from rmt_kernels.dp.param_guards import check_not_replaced, check_updates, refuse_direct_use
from rmt_kernels.dp.stages.chain import (
    build_chain,
    checkpoint_states,
    first_denoiser,
    post_process,
    refuse_non_finite_output,
    set_record_stats,
    spectral_stages,
    stage_input_sigmas,
    take_stats,
)
from rmt_kernels.dp.stages.denoiser import DenoiseFilter, Denoiser, denoise_linear_weights
from rmt_kernels.dp.stages.protocol import PostProcessor
from rmt_kernels.dp.tied_units import RuleUnits
from rmt_kernels.ops import add_gaussian_noise, clip_scales, noise_offset


class PrivateEngine:
    """Book-keeping DP-SGD for a model: clipping, noise, denoising, accounting.

    Usually built by :func:`rmt_kernels.dp.make_private` (see it for the arguments), which
    passes them on unchecked: they are checked here, a ValueError or TypeError naming the bad one.
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
        if not (isinstance(max_grad_norm, (int, float)) and 0 < max_grad_norm < math.inf):
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm}")
        if not (isinstance(noise_multiplier, (int, float)) and 0 <= noise_multiplier < math.inf):
            raise ValueError(
                f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}"
            )
        if expected_batch_size < 1:
            raise ValueError(f"expected_batch_size must be >= 1, got {expected_batch_size}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if not isinstance(verify_layout, bool):
            raise TypeError(f"verify_layout must be a bool, got {type(verify_layout).__name__}")
        self.model = model
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.expected_batch_size = int(expected_batch_size)
        self.sample_rate = float(sample_rate)
        self.accountant = accountant
        self.loss_reduction = loss_reduction
        self.process_group = process_group
        self.rank, self.world_size = distributed.world(process_group)
        # The noise key is (seed, step, parameter index). By default the seed comes from the OS
        # (privacy invariant 9, PRIVACY.md): anyone who knows it can regenerate the noise and
        # subtract it.
        # In secure mode it is also never stored anywhere a log or checkpoint could show it.
        self.noise_key = NoiseKey(seed, secure_mode=secure_mode, process_group=process_group)
        self.steps = 0
        # Privacy ledger (rank 0 only) and the (step, seed id) pairs it holds that the
        # accountant has already counted (steps of a crashed run, counted at load).
        self.ledger = None
        self.counted: set[tuple[int, str]] = set()
        self._recorded_step = -1
        # Seconds spent in the all-reduce of the clipped sums (the benchmark's share).
        self.allreduce_seconds = 0.0

        self.layers: list[TrackedLayer] = trainable_layers(model)
        # The rule calls: one per layer, a tied embedding's two modules as one unit with one
        # parameter (rmt_kernels/dp/tied_units.py), so each parameter is listed, noised and
        # written once.
        self.units = RuleUnits(self.layers)
        self.params: list[tuple[TrackedLayer, str, nn.Parameter]] = [
            (layer, name, p) for layer in self.units.units for name, p in layer.params.items()
        ]
        # The key of each parameter's gradient in the private step (the post-processors see
        # these): its qualified name in the model, stable across processes and resumes.
        self.param_names: list[str] = [
            f"{layer.name}.{name}" if layer.name else name for layer, name, _ in self.params
        ]
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
        # The one-time check that dim 0 of every tracked layer is the example.
        self.layout = LayoutVerifier(self.layers, self.capture, verify_layout)
        # Calls of the model in progress (a model may call itself inside its forward).
        self._forward_depth = 0
        # Prepended: it must run before the capture's pre-hook when the model is itself a
        # tracked layer (nn.Linear as a logistic regression), or restoring the parameters'
        # requires_grad would undo what that pre-hook switched off for the forward.
        self._hooks = [
            model.register_forward_pre_hook(
                _EngineHook(self._before_forward), with_kwargs=True, prepend=True
            ),
            model.register_forward_hook(_EngineHook(self._after_forward), always_call=True),
        ]
        # A tracked parameter's own module turns its requires_grad off while it runs, so autograd
        # reaches the parameter only through some other use: refuse that gradient (it would be
        # lost, or trained on unclipped) the moment backward computes it.
        for full, (_, _, p) in zip(self.param_names, self.params, strict=True):
            self._hooks.append(p.register_hook(refuse_direct_use(full)))
        # The logical step's clipped sums so far, by parameter name, and the rows clipped into
        # them (compared with the examples the private loader drew: drawn_batches.py).
        self._sums: dict[str, torch.Tensor] = {}
        self._step_rows = 0
        #: The private Poisson loader's record of the batches it drew (set by make_private), or
        #: None: then the rows of a step are not compared with the loader's examples.
        self.drawn_batches: DrawnBatches | None = None
        self._record_denoise_stats = False

    def __repr__(self) -> str:  # never show the seed
        return (
            f"PrivateEngine(noise_multiplier={self.noise_multiplier}, max_grad_norm="
            f"{self.max_grad_norm}, expected_batch_size={self.expected_batch_size}, "
            f"params={len(self.params)}, steps={self.steps})"
        )

    # Read-only views of the noise key (it owns the seed; these only describe it).
    #: The privacy ledger's name of the current noise stream (never the seed); a str.
    seed_id = property(attrgetter("noise_key.stream_id"))
    #: Whether the noise seed came from the OS (a caller's ``seed``: not private).
    noise_seed_is_secret = property(attrgetter("noise_key.secret"))
    #: Whether the run is in secure mode (its seed is never derived from an old one).
    secure_mode = property(attrgetter("noise_key.secure_mode"))

    # ---------------------------------------------------------------------------------------
    # Physical batches
    # ---------------------------------------------------------------------------------------

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """The model's forward pre-hook."""
        if torch.is_grad_enabled() and not self.layout.running:  # a training forward
            self._start_batch(module, args, kwargs)
        # Counted once the pre-hook succeeded (the end hook then runs, even if forward raises).
        self._forward_depth += 1

    def _after_forward(self, module: nn.Module, args: tuple, output) -> None:
        """The model's forward hook (also when the forward raised)."""
        self._forward_depth = max(0, self._forward_depth - 1)
        # Only the outermost call ends the training forward: a nested call of the model inside
        # its own forward (say on an empty slice under no_grad) must not clear the flag that
        # refuses a tracked layer run with gradients off (red team D1: it let reentrant
        # checkpointing through again, 3.3 C off the per-example reference).
        if not self.layout.running and self._forward_depth == 0:
            self.capture.in_training_forward = False
            if torch.is_grad_enabled():  # not an evaluation forward
                self.layout.after_forward(module)

    def _start_batch(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """A training forward starts: a new physical batch (or, nested, the same one)."""
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
        self.layout.before_forward(module, args, kwargs)
        self.capture.in_training_forward = True
        # Autograd need not compute parameter gradients: each tracked layer switches its own
        # parameters' requires_grad off while it runs (rmt_kernels/dp/capture.py) and the rules
        # build the private gradients from each layer's input and output gradient (which saves a
        # weight-gradient GEMM per layer and the dense embedding gradient).

    def check_updates(self, param_groups) -> None:
        """Refuse a step that would update a parameter the engine did not privatise (privacy
        invariant 8, PRIVACY.md; :func:`rmt_kernels.dp.param_guards.check_updates`), or after a
        privatised one was replaced in the model by a new tensor (it would never be updated:
        :func:`rmt_kernels.dp.param_guards.check_not_replaced`). Called by
        :meth:`DPOptimizer.step` before the wrapped optimizer steps.

        Raises:
            RuntimeError: naming the parameter.
        """
        check_not_replaced(
            self.model, dict(zip(self.param_names, (p for _, _, p in self.params), strict=True))
        )
        check_updates(self.model, self._param_index, param_groups)

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
        captured = self.capture.take()
        rows = captured[0][2].shape[0] if captured else 0
        self._step_rows += rows
        # The output gradients of per-example losses: a mean-reduced loss scaled them by 1/B.
        factor = rows if self.loss_reduction == "mean" else 1
        captured = [(layer, x, dy * factor if factor != 1 else dy) for layer, x, dy in captured]
        captured = self.units.merge(captured)
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
                layer.module, x, dy, scale, noise_std, self.noise_key.seed, offsets
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
        # Before anything is released: the rows clipped are the examples the loader drew.
        rows, self._step_rows = self._step_rows, 0
        check_rows(rows, self.drawn_batches)
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
                self._sums[key] = add_gaussian_noise(
                    self._sums[key], noise_std, self.noise_key.seed, offset
                )
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
            RuntimeError: a post-processor dropped a gradient or made one non-finite, or a
                gradient's shape is not its parameter's (a rule or post-processor transposed or
                reshaped it: the same entries in another order, a scrambled gradient).
        """
        missing = [k for k in self.param_names if k not in grads]
        if missing:
            raise RuntimeError(
                f"DP engine: the post-processors returned no gradient for {missing[:3]} (a "
                "post-processor must return every gradient it was given)"
            )
        for key, (layer, _, p) in zip(self.param_names, self.params, strict=True):
            if grads[key].shape != p.shape:  # all checked before any p.grad is written
                raise RuntimeError(
                    f"DP engine: the private gradient of parameter '{key}' has shape "
                    f"{list(grads[key].shape)}, but the parameter has shape {list(p.shape)}: the "
                    f"rule of '{layer.name}' ({type(layer.rule).__name__}) or a post-processor "
                    "returned it transposed or reshaped (a sum must have its parameter's shape)"
                )
        refuse_non_finite_output(self.post_processors, grads, self.param_names)
        for key, (_, _, p) in zip(self.param_names, self.params, strict=True):
            p.grad = grads[key].to(p.dtype)

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
            "seed": self.noise_key.saved_seed(),
            "seed_id": self.seed_id,
            "accountant": self.accountant.state_dict(),
            "post_processors": checkpoint_states(self.post_processors),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (call on every rank).

        The step counter, the accountant and each post-processor's state are restored. The
        noise seed is adopted when ``state`` holds one (a public seed), with its stream id; with
        a secret seed (``seed`` None) the engine draws a new secret seed and stream id (no
        noise key of the saved run, nor of this engine's own earlier steps, is reused). The
        current step will be recorded in the ledger again at its first use.

        Raises:
            ValueError: ``post_processors`` does not match this engine's (another count).
        """
        processors = state["post_processors"]
        if len(processors) != len(self.post_processors):
            raise ValueError(
                f"PrivateEngine.load_state_dict: {len(processors)} post-processor states for "
                f"{len(self.post_processors)} post-processors "
                f"({', '.join(type(p).__name__ for p in self.post_processors) or 'none'})"
            )
        # Post-processors first: they validate their state (e.g. the warm-start bases' shapes)
        # and raise before anything is replaced, so a refused state leaves the step counter and
        # the accountant as they were.
        for processor, processor_state in zip(self.post_processors, processors, strict=True):
            processor.load_state_dict(processor_state)
        self.accountant.load_state_dict(state["accountant"])
        self.steps = int(state["steps"])
        # A public seed is adopted with its stream id; a secret one was never saved, and a new
        # secret seed is drawn (rmt_kernels/dp/noise_key.py: NoiseKey.restore says why).
        self.noise_key.restore(state.get("seed"))
        self._recorded_step = -1

    def rekey_noise(self, salt: int) -> None:
        """Move to a new noise stream derived from the current one and ``salt`` (e.g. the
        privacy ledger's length), for a resume that cannot replay the lost steps exactly (see
        :meth:`rmt_kernels.dp.noise_key.NoiseKey.rekey`).

        Raises:
            RuntimeError: in secure mode.
        """
        self.noise_key.rekey(salt)
        self._recorded_step = -1

    def set_ledger(self, ledger, counted: Iterable[tuple[int, str]] | None = None) -> None:
        """Record the following steps in ``ledger`` (a
        :class:`~rmt_kernels.dp.ledger.PrivacyLedger`, or None for none).

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
        self._step_rows = 0

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
    """A forward hook of the model calling one of the engine's (a ModelHook: a pickle of the
    model holds none of the engine)."""

    def __init__(self, hook: Callable[..., None]) -> None:
        self.hook = hook

    def __call__(self, *args) -> None:
        self.hook(*args)
