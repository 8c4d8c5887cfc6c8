"""``PrivateTrainer``: a ``transformers.Trainer`` whose training is DP-SGD through
:func:`rmt_kernels.dp.make_private`, so that an existing Trainer script becomes private with one
change::

    trainer = PrivateTrainer(  # was: Trainer(
        model=model, args=training_args, train_dataset=train, data_collator=collator,
        privacy=PrivacyArguments(target_epsilon=8.0, max_grad_norm=1.0, batch_size=256),
    )

How the Trainer's loop is kept private:

- data: ``get_train_dataloader`` hands ``make_private`` a loader of ``batch_size`` over the
  training set (columns and collator as the Trainer prepares them) and iterates the Poisson
  loader it returns: one item is one Poisson draw (it may be empty), the Trainer's sampler is
  never built, and the accelerator does not re-wrap it;
- the step: ``training_step`` cuts a draw into physical batches of at most
  ``per_device_train_batch_size`` examples, each a forward and a backward of a per-example loss
  (the engine clips every example), and the Trainer's ``optimizer.step()`` is the private step
  (noise once per draw, accounting); gradient accumulation is refused, since it would put
  several draws in one step;
- the optimizer: the one the Trainer builds (``optim``, ``learning_rate``, ``weight_decay``) or
  the one passed in ``optimizers``, wrapped by ``make_private`` before the accelerator sees it;
- the budget: the noise is calibrated (or checked) for exactly the steps the Trainer will take:
  ``max_steps`` when set, else ``ceil(num_train_epochs * batches per epoch)`` of the Poisson
  loader (the Trainer's own formula with gradient accumulation 1); a step beyond them is refused
  before its data touches the model;
- the loss: a mean over examples of a per-example loss (what the sensitivity bound needs):
  a sequence classifier's own ``labels=`` loss, :func:`rmt_kernels.lm_loss.lm_loss` for a causal
  LM (never Hugging Face's mean over the batch's tokens), or ``PrivacyArguments.per_example_loss``;
  other heads are refused at construction;
- the report: every ``log`` (training and evaluation) carries ``epsilon`` (the accountant's, for
  the steps taken) and ``delta``, so they reach ``state.log_history`` and every callback's
  ``on_log``. A private run (secret seed, noise) releases nothing else of the training draws:
  its logs hold no training loss (``loss``, ``train_loss``; ``TrainOutput.training_loss`` is 0)
  and its FLOP count (``total_flos``, the draws' sizes) is 0: statistics of the private batches
  that no accountant counts, as ``rmt-glue`` and ``rmt-lm`` never log them (red team 27: the
  Trainer logged every draw's clean mean loss).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset
from transformers import Trainer

from rmt_kernels.dp.calibration import check_delta, run_epsilon, run_noise_multiplier
from rmt_kernels.dp.distributed import poisson_batches_per_epoch
from rmt_kernels.hf_trainer_args import (
    PrivacyArguments,
    check_training_arguments,
    switch_off_trainer_clipping,
)
from rmt_kernels.lm_loss import lm_loss

__all__ = ["PRIVATE_BATCH_STATISTICS", "PrivacyArguments", "PrivateRun", "PrivateTrainer"]

#: What the Trainer logs of the training draws themselves: never logged by a private run.
PRIVATE_BATCH_STATISTICS = ("loss", "train_loss")


class PrivateRun:
    """What ``make_private`` made of a PrivateTrainer's run, and the run's plan.

    Attributes:
        optimizer: the :class:`rmt_kernels.dp.DPOptimizer` (``optimizer.engine`` is the engine).
        loader: the Poisson loader the Trainer iterates.
        delta: the run's delta.
        noise_multiplier: sigma.
        sample_rate: the Poisson sampling rate.
        planned_steps: the steps the noise was calibrated (or checked) for; no more are taken.
    """

    def __init__(
        self,
        optimizer,
        loader: DataLoader,
        *,
        delta: float,
        noise_multiplier: float,
        sample_rate: float,
        planned_steps: int,
    ) -> None:
        self.optimizer = optimizer
        self.loader = loader
        self.delta = delta
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.planned_steps = planned_steps
        self._epsilons: dict[int, float] = {}

    @property
    def steps(self) -> int:
        """Private steps taken (the accountant's count)."""
        return self.optimizer.engine.steps

    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta`` (cached per step: the PRV accountant is slow)."""
        steps = self.steps
        if steps not in self._epsilons:
            self._epsilons[steps] = float(self.optimizer.get_epsilon(self.delta))
        return self._epsilons[steps]


class _PoissonCollate:
    """The Trainer's collator on a non-empty draw; ``{}`` for an empty one (then
    ``training_step`` runs no forward and the step is noise alone). Picklable for workers.

    The collated batch must have one row per drawn example: the DP engine clips each row of dim
    0 as one example. A packing collator (``DataCollatorWithFlattening``: the draw's examples
    concatenated into one row) would have the whole draw clipped as one example, so one
    example's influence on the clipped sum could reach 2 C (red team 27 measured 1.14 C on
    random pairs) and the layout verification, which needs two rows, would never run.
    """

    def __init__(self, collate) -> None:
        self.collate = collate

    def __call__(self, examples: list) -> Any:
        if not examples:
            return {}
        batch = self.collate(examples)
        rows = batch_size_of(batch)
        if rows != len(examples):
            raise ValueError(
                f"PrivateTrainer: the data collator made {rows} row(s) of a draw of "
                f"{len(examples)} examples; the DP engine clips each row as one example, so "
                "each example must be one row (a packing collator such as "
                "DataCollatorWithFlattening puts several in one row, and one example's "
                "influence is then not bounded by max_grad_norm). Use a padding collator "
                "(DataCollatorWithPadding, DataCollatorForLanguageModeling)"
            )
        return batch


def batch_size_of(inputs: Any) -> int:
    """The number of examples of a collated batch: the leading size of its first tensor with a
    dimension (0 for ``{}``, the empty draw).

    Raises:
        ValueError: the batch is not a mapping, or holds no batched tensor.
    """
    if not isinstance(inputs, dict) and not hasattr(inputs, "keys"):
        raise ValueError(
            f"PrivateTrainer: the data collator returned a {type(inputs).__name__}; a mapping "
            "of tensors (the Trainer's convention) is needed"
        )
    if len(inputs) == 0:
        return 0
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("PrivateTrainer: the collated batch holds no tensor with a batch dimension")


def physical_batches(inputs: dict, size: int) -> list[dict]:
    """``inputs`` cut along dim 0 into batches of at most ``size`` examples (in order); a value
    that is not batched (no leading dimension of the batch's size) is shared by every piece."""
    total = batch_size_of(inputs)
    pieces = []
    for start in range(0, total, size):
        piece = {}
        for key, value in inputs.items():
            tensor = isinstance(value, torch.Tensor) and value.dim() > 0
            if (tensor or isinstance(value, list)) and len(value) == total:
                piece[key] = value[start : start + size]
            else:
                piece[key] = value
        pieces.append(piece)
    return pieces


def is_private(model: torch.nn.Module) -> bool:
    """Whether a DP engine's hooks are live on ``model`` or one of its modules (a copy or a
    pickle of a private model holds inert ones: not private)."""
    from rmt_kernels.dp.capture import ModelHook

    return any(
        isinstance(hook, ModelHook)
        for module in model.modules()
        for hooks in (module._forward_pre_hooks, module._forward_hooks)
        for hook in hooks.values()
    )


class PrivateTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with DP-SGD (module docstring: how).

    Args:
        *args, **kwargs: the Trainer's.
        privacy: the privacy options (:class:`PrivacyArguments`).

    Raises:
        TypeError: ``privacy`` is not a PrivacyArguments.
        ValueError: a TrainingArguments setting or a Trainer argument that would change the
            private step (named, with what to do), or an iterable training set.
    """

    def __init__(self, *args: Any, privacy: PrivacyArguments, **kwargs: Any) -> None:
        if not isinstance(privacy, PrivacyArguments):
            raise TypeError(
                f"PrivateTrainer: privacy must be a PrivacyArguments, got {type(privacy).__name__}"
            )
        if kwargs.get("model_init") is not None:
            raise ValueError(
                "PrivateTrainer: model_init is not supported (the model is made private once); "
                "pass model="
            )
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "PrivateTrainer: compute_loss_func is not supported (the Trainer passes it the "
                "batch's token count, which couples the examples); give "
                "PrivacyArguments.per_example_loss instead"
            )
        super().__init__(*args, **kwargs)
        self.privacy = privacy
        check_training_arguments(self.args)
        self.args = switch_off_trainer_clipping(self.args)
        if isinstance(self.train_dataset, IterableDataset):
            raise ValueError(
                "PrivateTrainer: train_dataset is an IterableDataset; Poisson sampling needs a "
                "map-style dataset (one with __len__ and __getitem__)"
            )
        if type(self)._get_train_sampler is not Trainer._get_train_sampler:
            raise ValueError(
                f"PrivateTrainer: {type(self).__name__} overrides _get_train_sampler; the private "
                "batches are Poisson draws and a custom sampler cannot be kept"
            )
        if privacy.per_example_loss is None:
            kind = self._loss_kind(self.model)
            if kind not in ("sequence_classification", "causal_lm"):
                raise ValueError(
                    f"PrivateTrainer: {kind}: its Hugging Face loss is not known to be a mean "
                    "over examples (token-level heads average over the batch's tokens, which "
                    "couples the examples; the DP sensitivity bound needs a mean over examples); "
                    "give PrivacyArguments.per_example_loss"
                )
        #: The private run, once training built it (None before).
        self.private: PrivateRun | None = None

    # --- data, optimizer, budget -----------------------------------------------------------

    def get_train_dataloader(self) -> DataLoader:
        """The Poisson loader of ``make_private``, built (with the private optimizer) at the first
        call; later calls return the same loader.

        Raises:
            ValueError: no training set, a delta of 1/n or more, or a noise the accountant
                cannot account over the planned steps.
        """
        if self.private is not None:
            return self.private.loader
        if self.train_dataset is None:
            raise ValueError("PrivateTrainer: training requires a train_dataset")
        self.private = self._make_private()
        return self.private.loader

    def _training_data(self):
        """The training set and collator as the Trainer's own ``_get_dataloader`` prepares
        them (unused columns removed)."""
        dataset, collate = self.train_dataset, self.data_collator
        try:
            import datasets
        except ImportError:
            datasets = None
        if datasets is not None and isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collate = self._get_collator_with_removed_columns(collate, description="training")
        return dataset, collate

    def _make_private(self) -> PrivateRun:
        from rmt_kernels.dp import make_private

        privacy, args = self.privacy, self.args
        if is_private(self.model):
            raise ValueError(
                "PrivateTrainer: the model is already private (make_private ran on it, e.g. in "
                "another PrivateTrainer): a second engine's hooks would clip and noise it again "
                "with their own accountant; train a copy (copy.deepcopy(model) drops the hooks)"
            )
        dataset, collate = self._training_data()
        examples = len(dataset)
        logical = privacy.batch_size or args.per_device_train_batch_size
        # The loader whose shape make_private reads: its rate is 1 / len(loader); a public
        # privacy seed also keys the Poisson draws through its generator.
        generator = None if privacy.seed is None else torch.Generator().manual_seed(privacy.seed)
        plain = DataLoader(
            dataset,
            batch_size=logical,
            collate_fn=collate,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory,
            generator=generator,
        )
        sample_rate = 1 / len(plain)
        # PoissonSampler's batches per epoch (92 for a loader of 93); checked against the loader
        # make_private returns below.
        steps_per_epoch = poisson_batches_per_epoch(sample_rate)
        planned_steps = (
            args.max_steps
            if args.max_steps > 0
            else max(1, math.ceil(args.num_train_epochs * steps_per_epoch))
        )
        delta = privacy.delta if privacy.delta is not None else 1 / examples**1.1
        check_delta(delta, examples, "PrivacyArguments.delta")
        # rmt-glue's calibration (rmt_kernels.training.privacy.calibrate): the noise for the
        # target over exactly the steps the Trainer takes, or the given noise checked to be
        # accountable over them, before any step touches data.
        noise_multiplier = run_noise_multiplier(
            delta,
            sample_rate,
            planned_steps,
            privacy.accountant,
            target_epsilon=privacy.target_epsilon,
            noise_multiplier=privacy.noise_multiplier,
        )
        # The optimizer the Trainer builds from its arguments (or the one it was given).
        optimizer = self.optimizer if self.optimizer is not None else super().create_optimizer()
        with warnings.catch_warnings():
            if privacy.seed is not None:  # said once below, in the trainer's words
                warnings.filterwarnings("ignore", message="make_private: seed=")
            _, dp_optimizer, poisson = make_private(
                self.model,
                optimizer,
                plain,
                target_delta=delta,
                max_grad_norm=privacy.max_grad_norm,
                noise_multiplier=noise_multiplier,
                denoise=privacy.denoise,
                post_processors=privacy.post_processors,
                poisson_sampling=True,
                seed=privacy.seed,
                secure_mode=privacy.seed is None,
                accountant=privacy.accountant,
                loss_reduction="mean",
            )
        if privacy.seed is not None:
            warnings.warn(
                f"PrivateTrainer: PrivacyArguments.seed={privacy.seed} makes the noise and the "
                "batches reproducible: this run is NOT differentially private (experiments only)",
                stacklevel=4,
            )
        if len(poisson) != steps_per_epoch:
            raise RuntimeError(
                f"PrivateTrainer: the Poisson loader has {len(poisson)} batches per epoch, the "
                f"plan {steps_per_epoch}: the calibration would not match the run"
            )
        self.optimizer = dp_optimizer
        loader = DataLoader(
            poisson.dataset,
            batch_sampler=poisson.batch_sampler,  # make_private's Poisson sampler, its key
            collate_fn=_PoissonCollate(collate),
            num_workers=poisson.num_workers,
            pin_memory=poisson.pin_memory,
            generator=poisson.generator,
        )
        return PrivateRun(
            dp_optimizer,
            loader,
            delta=delta,
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            planned_steps=planned_steps,
        )

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """The private optimizer built with the training loader.

        Raises:
            RuntimeError: the training loader did not come from :meth:`get_train_dataloader`
                (a subclass replaced it), so nothing was made private.
        """
        if self.private is None:
            raise RuntimeError(
                "PrivateTrainer: the optimizer is requested before the private training loader "
                "was built (does a subclass override get_train_dataloader?); nothing is private"
            )
        return self.optimizer

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None):
        """The Trainer's ``train``, once, within the planned steps.

        Raises:
            ValueError: ``resume_from_checkpoint`` or ``trial`` given (the accountant's state is
                not in a Trainer checkpoint; hyper-parameter search re-creates the model).
            RuntimeError: the planned steps are all taken (the budget is spent).
        """
        if resume_from_checkpoint not in (None, False):
            raise ValueError(
                "PrivateTrainer: resume_from_checkpoint is not supported (a Trainer checkpoint "
                "does not hold the accountant's state); start a new run"
            )
        if trial is not None:
            raise ValueError("PrivateTrainer: hyper-parameter search (trial) is not supported")
        if self.private is not None and self.private.steps >= self.private.planned_steps:
            raise RuntimeError(
                f"PrivateTrainer: the {self.private.planned_steps} steps the noise was "
                f"calibrated for are taken (epsilon {self.private.epsilon():.4g} at delta "
                f"{self.private.delta:.3g}); a further step would spend more than planned"
            )
        return super().train(ignore_keys_for_eval=ignore_keys_for_eval)

    # --- the step --------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """Forward and backward of one Poisson draw, cut into physical batches; the Trainer's
        ``optimizer.step()`` that follows is the private step.

        Returns:
            The draw's mean loss over its examples (0 for an empty draw), detached.

        Raises:
            RuntimeError: the draw would be a step beyond the planned ones.
        """
        run = self.private
        if run is None or run.loader is None:
            raise RuntimeError("PrivateTrainer: training_step before the private run was built")
        if run.steps >= run.planned_steps:
            raise RuntimeError(
                f"PrivateTrainer: step {run.steps + 1} is beyond the {run.planned_steps} steps "
                "the noise was calibrated for; refused before its data touches the model"
            )
        model.train()
        examples = batch_size_of(inputs)
        total = torch.zeros((), device=self.args.device)
        if examples == 0:  # an empty draw: no forward; step() adds the noise alone
            return total
        inputs = self._prepare_inputs(inputs)
        for piece in physical_batches(inputs, self.args.per_device_train_batch_size):
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, piece)
            # A mean over the piece's examples: the engine (loss_reduction "mean") scales each
            # example's output gradient back by the piece's size before clipping.
            loss.backward()
            total = total + loss.detach() * batch_size_of(piece)
        if self._private_run():  # the clean loss of a private draw is never released
            return torch.zeros_like(total)
        return total / examples

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """A mean over the batch's examples of a per-example loss (``num_items_in_batch``, a
        token count across the batch, is never passed: it couples the examples).

        Sequence classifiers use their own ``labels=`` loss (a mean over examples); causal LMs
        :func:`rmt_kernels.lm_loss.lm_loss` of their logits and ``labels`` (each sequence's
        loss reduced on its own by ``PrivacyArguments.lm_reduction``; the labels are not passed
        to the model, whose own loss is a mean over the batch's tokens); other models need
        ``PrivacyArguments.per_example_loss``.

        Raises:
            ValueError: a model whose Hugging Face loss is not a mean over examples and no
                per-example loss given, or a per-example loss of the wrong shape.
        """
        per_example = self.privacy.per_example_loss
        if per_example is not None:
            features = {k: v for k, v in inputs.items() if k not in self.label_names}
            outputs = model(**features)
            losses = per_example(outputs, inputs)
            expected = (batch_size_of(inputs),)
            if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != expected:
                raise ValueError(
                    "PrivacyArguments.per_example_loss must return a tensor of shape "
                    f"{expected} (one loss per example), got "
                    f"{getattr(losses, 'shape', type(losses).__name__)}"
                )
            loss = losses.mean()
            return (loss, outputs) if return_outputs else loss
        if self._loss_kind(model) == "causal_lm":
            # Hugging Face's labels= loss is a mean over the batch's tokens (it couples the
            # examples); lm_loss reduces each sequence on its own, then means over examples.
            if "labels" not in inputs:
                raise ValueError("PrivateTrainer: a causal LM batch needs 'labels'")
            features = {k: v for k, v in inputs.items() if k not in self.label_names}
            outputs = model(**features)
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
            loss = lm_loss(logits, inputs["labels"], reduction=self.privacy.lm_reduction)
            return (loss, outputs) if return_outputs else loss
        # A sequence classifier (checked at construction): its own loss, a mean over examples.
        outputs = model(**inputs)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        if loss is None:
            raise ValueError(
                "PrivateTrainer: the model returned no loss (no 'labels' in the batch?)"
            )
        return (loss, outputs) if return_outputs else loss

    def _loss_kind(self, model) -> str:
        """'sequence_classification' for the heads whose ``labels=`` loss is a mean over
        examples, 'causal_lm' for those trained with :func:`rmt_kernels.lm_loss.lm_loss`;
        otherwise a description of the model."""
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        )

        inner = self.accelerator.unwrap_model(model)
        base = getattr(getattr(inner, "base_model", None), "model", None)
        name = base._get_name() if base is not None and hasattr(base, "_get_name") else None
        name = name or getattr(inner, "_get_name", lambda: type(inner).__name__)()
        if name in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values():
            return "sequence_classification"
        if name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
            return "causal_lm"
        return f"model {name}"

    def _get_grad_norm(self, model, grad_norm=None):
        # The Trainer measures p.grad before optimizer.step(), where the DP engine has not
        # written the private gradient yet: nothing meaningful to log (and a clean gradient's
        # norm would not be private).
        return None

    # --- the report ------------------------------------------------------------------------

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """The Trainer's FLOP count of a batch (6 x its tokens x the parameters), 0 in a private
        run: summed into ``state.total_flos`` (the train metrics, ``trainer_state.json``) it is
        the sum of the draws' sizes, a statistic of the private batches (module docstring)."""
        return 0 if self._private_run() else super().floating_point_ops(inputs)

    def _private_run(self) -> bool:
        """Whether the run is private: a secret seed (not ``PrivacyArguments.seed``) and noise."""
        run = self.private
        return run is not None and self.privacy.seed is None and run.noise_multiplier > 0

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's ``log`` with ``epsilon`` and ``delta`` added once training started, and
        without the training loss in a private run (module docstring)."""
        if self._private_run():
            for key in PRIVATE_BATCH_STATISTICS:
                logs.pop(key, None)
        if self.private is not None:
            logs["epsilon"] = self.private.epsilon()
            logs["delta"] = self.private.delta
        super().log(logs, start_time)

    def planned_epsilon(self) -> float:
        """The epsilon of the whole planned run (what the calibration targeted).

        Raises:
            RuntimeError: before training built the private run.
        """
        if self.private is None:
            raise RuntimeError("PrivateTrainer: the private run is built by train()")
        run = self.private
        return run_epsilon(
            run.noise_multiplier,
            run.delta,
            run.sample_rate,
            run.planned_steps,
            self.privacy.accountant,
        )
