"""The private step: per-example clipping over all parameters, noise once per logical step,
optional denoising, accounting.

Data flow of one logical step (DESIGN.md): for each physical batch, hooks keep every tracked
layer's input and output gradient -> per-example squared norms per parameter, summed into one
total norm per example -> clip factors -> clipped sums. At ``step()``: Gaussian noise of std
``noise_multiplier * max_grad_norm`` on every coordinate (fused into the last batch's sums) ->
divide by the expected batch size -> denoise the selected 2-D weights -> ``param.grad`` -> the
wrapped optimizer -> the accountant.

Under torch.distributed (rmt_kernels/dp/distributed.py has the reasoning): the clipped sums of
every rank are all-reduced before denoising, rank 0 alone adds the noise, and the ranks agree on
the seed. With a privacy ledger (rmt_kernels/dp/checkpoint.py) each logical step is recorded
before its data touches the model.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable

import torch
from torch import nn

from rmt_kernels.dp import distributed
from rmt_kernels.dp.capture import LayerCapture, TrackedLayer, trainable_layers
from rmt_kernels.dp_ops import add_gaussian_noise, clip_scales, noise_offset
from rmt_kernels.ops import denoise_many

DenoiseFilter = Callable[[str, nn.Module, str, nn.Parameter], bool]


# Marchenko-Pastur's edge is an asymptotic statement about large m and n. A classifier head
# (2 x 384) has two singular values and no bulk: thresholding it at the "edge" zeroes its whole
# gradient whenever the signal is below the noise (measured on SST-2: the head never learned).
MIN_DENOISE_DIM = 32


def denoise_linear_weights(layer_name: str, module: nn.Module, name: str, p: nn.Parameter) -> bool:
    """Default choice of what to denoise: the 2-D weights of ``nn.Linear`` layers.

    Embedding gradients are row-sparse (only the rows of tokens in the batch), not low-rank, so
    they are left alone. Whatever the filter, matrices whose smaller side is below the denoise
    option ``min_dim`` (default ``MIN_DENOISE_DIM``) are never denoised.
    """
    return isinstance(module, nn.Linear) and name == "weight" and p.dim() == 2


def seed_id_of(seed: int) -> str:
    """The privacy ledger's name of the noise stream of ``seed`` (a hash; never the seed)."""
    return hashlib.sha256(f"rmt-noise-seed:{seed}".encode()).hexdigest()[:16]


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
        loss_reduction: str = "mean",
        seed: int | None = None,
        secure_mode: bool = False,
        process_group=None,
    ) -> None:
        if not (max_grad_norm > 0 and max_grad_norm < float("inf")):
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm}")
        if not noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
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
        self.denoise_options = dict(denoise) if denoise is not None else None
        min_dim = MIN_DENOISE_DIM
        if self.denoise_options is not None:
            min_dim = self.denoise_options.pop("min_dim", MIN_DENOISE_DIM)
        self.loss_reduction = loss_reduction
        self.secure_mode = secure_mode
        # The noise key is (seed, step, parameter index). In secure mode the seed comes from the
        # OS and is never stored anywhere a log or checkpoint could show it.
        if secure_mode or seed is None:
            seed = secrets.randbits(62)
        self.process_group = process_group
        self.rank, self.world_size = distributed.world(process_group)
        # Every rank must draw the same noise (only rank 0 adds it, but a resumed or replayed
        # run must agree) and denoise alike: rank 0's seed wins.
        self._seed = distributed.broadcast_int(int(seed), process_group)
        # Names the noise stream in the privacy ledger without revealing the seed: derived from
        # it outside secure mode (a rerun with the same seed is recognised as a replay), random
        # in secure mode (where a fresh seed is never a replay).
        if secure_mode:
            self.seed_id = f"{distributed.broadcast_int(secrets.randbits(63), process_group):016x}"
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
        self._param_index = {id(p): i for i, (_, _, p) in enumerate(self.params)}
        self._denoised = {
            id(p)
            for layer, name, p in self.params
            if denoise is not None
            and p.dim() == 2
            and min(p.shape) >= min_dim
            and denoise_filter(layer.name, layer.module, name, p)
        }
        self.capture = LayerCapture(self.layers)
        self._hooks = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward),
        ]
        self._sums: dict[int, torch.Tensor] = {}
        self.skip_next_step = False
        # Set ``record_denoise_stats`` before a step to keep what take_denoise_stats() reports.
        self.record_denoise_stats = False
        self._recorded: list[tuple[str, float, torch.Tensor]] = []

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
        if not torch.is_grad_enabled():
            return
        self.record_step()
        # A new physical batch while the previous one is still held: fold it into the sums
        # (no noise yet) so that several batches make one logical step.
        if self.capture.pending():
            self._accumulate(noise_std=0.0)
        # The batch size is the leading dimension of the model's first tensor input.
        first = next(
            (t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.dim()),
            None,
        )
        self.capture.batch_size = None if first is None else first.shape[0]
        # Autograd need not compute parameter gradients: the layer rules build the private
        # ones from each layer's input and output gradient, so the graph is built without them
        # (which saves a weight-gradient GEMM per layer and the dense embedding gradient).
        for _, _, p in self.params:
            p.requires_grad_(False)

    def _after_forward(self, module: nn.Module, args: tuple, output) -> None:
        for _, _, p in self.params:
            p.requires_grad_(True)

    def _grad_outputs(self, captured):
        """Output gradients of per-example losses: a mean-reduced loss scaled them by 1/B."""
        batch = captured[0][1].shape[0]
        factor = batch if self.loss_reduction == "mean" else 1
        return [(layer, x, dy * factor if factor != 1 else dy) for layer, x, dy in captured]

    def per_example_sq_norms(self, captured) -> torch.Tensor:
        """Squared norms (B,) of each example's gradient over ALL trainable parameters."""
        total = None
        for layer, x, dy in captured:
            norms = layer.rule.sq_norms(layer.module, x, dy)
            missing = set(layer.params) - set(norms)
            if missing:
                raise RuntimeError(
                    f"DP engine: the rule of '{layer.name}' gave no norm for {sorted(missing)}"
                )
            for name in layer.params:
                total = norms[name].float() if total is None else total + norms[name].float()
        return total

    def _accumulate(self, noise_std: float) -> None:
        """Fold the held physical batch into the clipped sums, adding noise if asked."""
        captured = self._grad_outputs(self.capture.take())
        # Dividing by the expected batch size is folded into the clip factors and the noise std
        # (noise_std arrives already divided), so the sums come out averaged with no extra pass.
        scale = clip_scales(self.per_example_sq_norms(captured), self.max_grad_norm)
        scale = scale / self.expected_batch_size
        for layer, x, dy in captured:
            offsets = {
                name: noise_offset(self.steps, self._param_index[id(p)], len(self.params))
                for name, p in layer.params.items()
            }
            sums = layer.rule.clipped_noisy_sums(
                layer.module, x, dy, scale, noise_std, self._seed, offsets
            )
            for name, p in layer.params.items():
                if name not in sums:
                    raise RuntimeError(
                        f"DP engine: the rule of '{layer.name}' gave no sum for '{name}'"
                    )
                key = id(p)
                self._sums[key] = (
                    sums[name] if key not in self._sums else self._sums[key] + sums[name]
                )

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
        """Turn the held batches into noisy, averaged (and denoised) gradients in ``p.grad``.

        Noise of std ``noise_multiplier * max_grad_norm`` on the sum (``sigma()`` on the
        average) enters every coordinate exactly once: fused into the last physical batch's
        sums, or added on its own when that batch was already folded in (or was empty). Across
        ranks, rank 0 alone adds it and the sums are all-reduced before denoising.
        """
        self.record_step()
        # Std of the noise on the averaged gradient: noise_multiplier * max_grad_norm on the sum.
        noise_std = self.sigma() if self.rank == 0 else 0.0
        noised = set()
        if self.capture.pending():
            self._accumulate(noise_std=noise_std)
            noised = set(self._sums)
        for i, (_, _, p) in enumerate(self.params):
            key = id(p)
            if key not in self._sums:  # an empty logical batch: noise alone
                self._sums[key] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            if key not in noised and noise_std > 0:
                offset = noise_offset(self.steps, i, len(self.params))
                self._sums[key] = add_gaussian_noise(self._sums[key], noise_std, self._seed, offset)
        grads, self._sums = self._sums, {}
        if self.world_size > 1:
            start = time.perf_counter()
            keys = [id(p) for _, _, p in self.params]
            summed = distributed.all_reduce_sums([grads[k] for k in keys], self.process_group)
            grads = dict(zip(keys, summed, strict=True))
            self.allreduce_seconds += time.perf_counter() - start
        # Denoising reads only the noisy averaged gradient and the public sigma (post-processing).
        if self._denoised and self.noise_multiplier > 0:
            keys = [k for k in grads if k in self._denoised]
            options = dict(self.denoise_options)
            # The sketch's test matrix only; a fresh one each step, derived from public counters.
            options["seed"] = options.get("seed", 0) + self.steps
            denoised = denoise_many([grads[k] for k in keys], self.sigma(), **options)
            if self.record_denoise_stats:
                self._record_denoise_stats(keys, grads, denoised)
            for k, g in zip(keys, denoised, strict=True):
                grads[k] = g
        for _, _, p in self.params:
            p.grad = grads[id(p)].to(p.dtype).view_as(p)

    def _record_denoise_stats(self, keys, noisy, denoised) -> None:
        """Keep each denoised matrix and its noisy norm (cheap); the SVDs wait for the call to
        :meth:`take_denoise_stats`, outside the step."""
        names = {
            id(p): f"{layer.name}.{name}" if layer.name else name for layer, name, p in self.params
        }
        self._recorded = [
            (names[k], float(torch.linalg.vector_norm(noisy[k])), g.detach().clone())
            for k, g in zip(keys, denoised, strict=True)
        ]

    def take_denoise_stats(self) -> dict[str, dict[str, float]]:
        """Per denoised parameter of the last step run with ``record_denoise_stats`` set: the
        kept rank and ||denoised|| / ||noisy|| (post-processing of the noisy gradient only).
        Empty if nothing was recorded; forgets what it returns."""
        stats = {}
        for name, noisy_norm, g in self._recorded:
            values = torch.linalg.svdvals(g.float())
            top = float(values.max()) if values.numel() else 0.0
            # The op reconstructs only the kept components; the other values are rounding.
            tol = top * max(g.shape) * torch.finfo(torch.float32).eps
            stats[name] = {
                "rank": int((values > tol).sum()) if top > 0 else 0,
                "norm_ratio": float(torch.linalg.vector_norm(g)) / noisy_norm
                if noisy_norm > 0
                else 0.0,
            }
        self._recorded = []
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

    def zero_grad(self) -> None:
        """Forget held batches and partial sums (the start of a new logical step)."""
        self.capture.clear()
        self._sums = {}

    def get_epsilon(self, delta: float) -> float:
        """Privacy spent so far, at ``delta``, from the accountant (infinite after a step
        without noise: the accountants' analyses divide by the noise multiplier)."""
        if self.steps == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return float("inf")
        return float(self.accountant.get_epsilon(delta=delta))

    def detach(self) -> None:
        """Remove every hook from the model."""
        self.capture.remove()
        for handle in self._hooks:
            handle.remove()
