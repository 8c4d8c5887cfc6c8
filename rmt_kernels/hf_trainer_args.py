"""The privacy options of :class:`rmt_kernels.hf_trainer.PrivateTrainer`, and the checks that a
``transformers.TrainingArguments`` leaves the private step as ``make_private`` defines it.

Kept apart from the trainer so that the options can be built and checked without importing
``transformers`` (the Trainer subclass needs it at import).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rmt_kernels.dp.calibration import MAX_TARGET_EPSILON, check_accountant
from rmt_kernels.lm_loss import LM_LOSS_REDUCTIONS

# The TrainingArguments sampling strategy Poisson sampling replaces (the Trainer's default);
# any other names an order or grouping the Poisson draws would silently drop.
REPLACED_SAMPLING_STRATEGY = "random"


@dataclass(frozen=True)
class PrivacyArguments:
    """What makes a Trainer run differentially private (DP-SGD through ``make_private``).

    Args:
        max_grad_norm: C, the per-example clipping norm over all trainable parameters
            (``make_private``'s; not ``TrainingArguments.max_grad_norm``, which would clip the
            noisy sum and is switched off).
        target_epsilon: calibrate the noise to spend this epsilon over the whole run (the
            Trainer's ``max_steps``, or ``num_train_epochs`` times the Poisson loader's batches
            per epoch, rounded up as the Trainer rounds); at most 100. Or give
            ``noise_multiplier``.
        noise_multiplier: sigma (noise std = sigma * C on the clipped sum); the accountant must
            account the run's steps with it (a positive epsilon, checked before training).
        delta: the delta of the (epsilon, delta) guarantee; default 1 / n^1.1 for n training
            examples; it must be below 1 / n.
        batch_size: the logical batch: the expected number of examples of a Poisson draw (the
            sampling rate is 1 / ceil(n / batch_size), as ``make_private`` derives it from a
            loader of this batch size). Default: ``per_device_train_batch_size``. The draw is cut
            into physical batches of at most ``per_device_train_batch_size`` examples, all in
            one optimizer step.
        accountant: "prv" (default) or "rdp".
        denoise: ``make_private``'s ``denoise`` options (post-processing), or None.
        post_processors: ``make_private``'s ``post_processors`` chain, or None.
        seed: None (default: a secret noise seed from the OS). An int makes the noise and the
            Poisson batches reproducible and the run NOT private (experiments and tests only).
        lm_reduction: a causal LM's per-sequence reduction of its token losses
            (:func:`rmt_kernels.lm_loss.lm_loss`): ``"sequence_mean"`` (default: each sequence's
            mean over its own targets) or ``"sequence_sum"``; the batch loss is their mean over
            the examples, never Hugging Face's mean over the batch's tokens.
        per_example_loss: for a model that is neither a sequence classifier nor a causal LM:
            ``(outputs, inputs) -> (B,)`` losses, entry b a function of example b alone (the
            labels are removed from the model's forward and left in ``inputs``); the training
            loss is their mean over the physical batch.

    Raises:
        ValueError: an option out of range, naming it.
        TypeError: an option of the wrong type, naming it.
    """

    max_grad_norm: float
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float | None = None
    batch_size: int | None = None
    accountant: str = "prv"
    denoise: dict | None = None
    post_processors: Sequence[Any] | None = None
    seed: int | None = None
    lm_reduction: str = "sequence_mean"
    per_example_loss: Callable[[Any, dict], Any] | None = None

    def __post_init__(self) -> None:
        if not _number(self.max_grad_norm) or not 0 < self.max_grad_norm < math.inf:
            raise ValueError(
                f"PrivacyArguments.max_grad_norm must be a finite number > 0, got "
                f"{self.max_grad_norm!r}"
            )
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError(
                "PrivacyArguments: give exactly one of target_epsilon and noise_multiplier"
            )
        if self.target_epsilon is not None and not (
            _number(self.target_epsilon) and 0 < self.target_epsilon <= MAX_TARGET_EPSILON
        ):
            raise ValueError(
                f"PrivacyArguments.target_epsilon must be in (0, {MAX_TARGET_EPSILON:g}], got "
                f"{self.target_epsilon!r} (for a fixed noise give noise_multiplier)"
            )
        if self.noise_multiplier is not None and not (
            _number(self.noise_multiplier) and 0 <= self.noise_multiplier < math.inf
        ):
            raise ValueError(
                "PrivacyArguments.noise_multiplier must be a finite number >= 0, got "
                f"{self.noise_multiplier!r}"
            )
        if self.delta is not None and not (_number(self.delta) and 0 < self.delta < 1):
            raise ValueError(f"PrivacyArguments.delta must be in (0, 1), got {self.delta!r}")
        if self.batch_size is not None and not (
            isinstance(self.batch_size, int)
            and not isinstance(self.batch_size, bool)
            and self.batch_size >= 1
        ):
            raise ValueError(
                f"PrivacyArguments.batch_size must be an int >= 1, got {self.batch_size!r}"
            )
        check_accountant(self.accountant, "PrivacyArguments.accountant")
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0
        ):
            raise ValueError(f"PrivacyArguments.seed must be an int >= 0, got {self.seed!r}")
        if self.lm_reduction not in LM_LOSS_REDUCTIONS:
            raise ValueError(
                f"PrivacyArguments.lm_reduction must be one of {LM_LOSS_REDUCTIONS}, got "
                f"{self.lm_reduction!r}"
            )
        if self.per_example_loss is not None and not callable(self.per_example_loss):
            raise TypeError(
                "PrivacyArguments.per_example_loss must be callable (outputs, inputs) -> (B,) "
                f"losses, got {type(self.per_example_loss).__name__}"
            )


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_training_arguments(args: Any) -> None:
    """Refuse TrainingArguments under which the Trainer's loop would change the private step.

    A logical batch is one Poisson draw (``make_private``'s sampler), cut into physical batches
    inside one ``training_step``: the Trainer's own sampler, gradient accumulation and mixed
    precision would each replace or rescale that step without the accountant knowing.

    Args:
        args: the trainer's ``TrainingArguments``.

    Raises:
        ValueError: naming the first incompatible argument and what to do instead.
    """
    if args.gradient_accumulation_steps != 1:
        raise ValueError(
            f"TrainingArguments.gradient_accumulation_steps={args.gradient_accumulation_steps}: "
            "PrivateTrainer takes one optimizer step per Poisson draw; set the logical batch with "
            "PrivacyArguments.batch_size (it is cut into physical batches of "
            "per_device_train_batch_size examples) and leave gradient_accumulation_steps at 1"
        )
    if args.train_sampling_strategy != REPLACED_SAMPLING_STRATEGY:
        raise ValueError(
            f"TrainingArguments.train_sampling_strategy={args.train_sampling_strategy!r}: the "
            "private batches are Poisson draws (what the accountant assumes); an ordered or "
            "length-grouped sampler cannot be kept. Leave it at 'random' (replaced by Poisson "
            "sampling)"
        )
    if args.fp16 or args.bf16:
        raise ValueError(
            f"TrainingArguments.{'fp16' if args.fp16 else 'bf16'}=True: mixed precision is not "
            "certified for the DP engine's per-example norms yet; train in float32"
        )
    if args.n_gpu > 1 or args.world_size > 1:
        raise ValueError(
            f"PrivateTrainer runs on one device (n_gpu={args.n_gpu}, world_size="
            f"{args.world_size}): the Trainer would wrap the model in DataParallel or "
            "DistributedDataParallel, whose gradient reduction the DP engine replaces; for "
            "several processes use rmt_kernels.dp.make_private under torchrun"
        )
    if getattr(args, "neftune_noise_alpha", None):
        raise ValueError(
            f"TrainingArguments.neftune_noise_alpha={args.neftune_noise_alpha!r} is not "
            "supported by PrivateTrainer: NEFTune scales every example's embedding noise by "
            "alpha / sqrt(L d), L the batch's padded length, so one long example changes every "
            "other example's gradient and clipping per example no longer bounds its influence by "
            "max_grad_norm (red team 27 measured 1.58 C). Leave it at None"
        )
    tokens_seen = getattr(args, "include_num_input_tokens_seen", "no")
    if tokens_seen not in ("no", False):
        raise ValueError(
            f"TrainingArguments.include_num_input_tokens_seen={tokens_seen!r} is not supported by "
            "PrivateTrainer: the Trainer would log and checkpoint the token count of the private "
            "draws, unnoised (one example's presence changes it by its length). Leave it at 'no'"
        )
    refused = {
        "deepspeed": args.deepspeed,
        "fsdp": args.fsdp,
        "torch_compile": args.torch_compile,
        "auto_find_batch_size": args.auto_find_batch_size,
        "activation_checkpointing": getattr(args, "activation_checkpointing", False),
        "label_smoothing_factor": args.label_smoothing_factor,
        "dataloader_drop_last": args.dataloader_drop_last,
    }
    for name, value in refused.items():
        if value:
            raise ValueError(
                f"TrainingArguments.{name}={value!r} is not supported by PrivateTrainer (the "
                "private step is one Poisson draw, clipped per example by the DP engine, in "
                "float32 on one device); leave it at its default"
            )


def switch_off_trainer_clipping(args: Any) -> Any:
    """``args`` with ``max_grad_norm`` 0 (a copy when it was not), and a warning saying so.

    The Trainer clips ``p.grad`` just before ``optimizer.step()``, where the DP engine has not
    built the private gradient yet (it writes ``p.grad`` inside ``step()``): the clip would do
    nothing while the script says it clips, and its logged ``grad_norm`` would be 0. It is off;
    the per-example clip is ``PrivacyArguments.max_grad_norm``.
    """
    import copy

    if not args.max_grad_norm:
        return args
    warnings.warn(
        f"PrivateTrainer: TrainingArguments.max_grad_norm={args.max_grad_norm} is set to 0 "
        "(the Trainer's clip of the batch gradient runs before the DP engine builds it, so it "
        "would clip nothing); the per-example clipping norm is PrivacyArguments.max_grad_norm",
        stacklevel=3,
    )
    args = copy.copy(args)
    args.max_grad_norm = 0.0
    return args
