"""The fine-tuning loop: a GLUE task, a Hugging Face encoder, DP-SGD (ours or Opacus's) or not,
periodic evaluation, and a JSON log.

One logical step = one batch drawn by the (Poisson) data loader, split into physical batches of
at most ``physical_batch_size`` examples; each is forwarded and backpropagated, then one
``optimizer.step()`` (Opacus's ``signal_skip_step`` protocol for the physical batches before the
last, which both engines speak).

``train`` reads top to bottom: ``_set_up`` builds a ``Run`` (data, model, optimizer, private
engine, checkpointer, the log's first form); each loop turn is ``_timed_step`` (one logical
step), then ``_evaluate`` and the checkpoint when due; ``_finish`` leaves torchrun's group and
saves the model. The pieces live beside this file: options (config), data, model, privacy,
evaluation, checkpoints (resume), their fingerprint, outputs, distributed.
"""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from rmt_kernels.glue.config import TrainConfig, logged_config, parse_device
from rmt_kernels.glue.data import Encoded, ExampleIndices, encode, load_split, subset
from rmt_kernels.glue.distributed import init_distributed, leave_distributed
from rmt_kernels.glue.evaluation import EVAL_BATCH_FACTOR, evaluate
from rmt_kernels.glue.fingerprint import data_fingerprint, run_settings, versions
from rmt_kernels.glue.model import (
    build_model,
    forward,
    loss_fn,
    shared_positions,
    unwrap,
)
from rmt_kernels.glue.outputs import check_outputs, json_safe, save_model, write_json
from rmt_kernels.glue.privacy import Privacy, privatize, sampling_generator
from rmt_kernels.glue.resume import Checkpointer, plan_checkpoint, resolve_optimisation
from rmt_kernels.glue.stages import disk_iterate_offset, learning_rate
from rmt_kernels.glue.tasks import Task, get_task


@dataclass
class Run:
    """One fine-tuning, set up (by ``_set_up``): what every step, evaluation and checkpoint
    reads. The model, optimizer and loader are the private ones under DP."""

    cfg: TrainConfig  # the optimisation flags resolved (a resume's inherited ones)
    task: Task
    rank: int  # under torchrun; rank 0 alone evaluates, logs, saves and checkpoints
    device: torch.device
    model: torch.nn.Module
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    loader: torch.utils.data.DataLoader
    train_data: Encoded
    eval_data: Encoded
    physical: int  # the physical batch size
    steps_per_epoch: int
    total_steps: int
    privacy: Privacy
    checkpointer: Checkpointer | None
    # BERT-style position embeddings under Opacus: per-example positions (see shared_positions).
    expand_positions: bool
    log: dict = field(default_factory=dict)

    @property
    def native_engine(self):
        """Our engine (it records denoise statistics), or None (Opacus, or no DP)."""
        if self.privacy.opacus_engine is not None:
            return None
        return getattr(self.optimizer, "engine", None)


@dataclass
class Progress:
    """Where the loop stands; a resume restores ``step``, ``seconds`` and ``samples``.

    ``samples`` and ``losses`` are statistics of the training batches themselves (exact Poisson
    batch sizes, unnoised mean losses): a private run keeps them out of its log, progress bar and
    checkpoint (``_released``), since the accountant counts neither."""

    step: int = 0
    seconds: float = 0.0  # in the timed steps (evaluation and checkpoints left out)
    samples: int = 0
    losses: list[float] = field(default_factory=list)  # training losses since the last eval


def train(cfg: TrainConfig) -> dict:
    """Run one fine-tuning; return (and write to ``cfg.output``) the JSON log.

    Under torchrun (``WORLD_SIZE`` > 1) every process runs this: the process group is joined,
    each rank Poisson-samples its shard of the data, and rank 0 alone evaluates, logs, saves and
    writes checkpoints (other ranks return a log without evaluations).
    """
    run = _set_up(cfg)
    progress = _restore(run)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=run.total_steps,
        initial=progress.step,
        desc=f"{run.task.name}",
        disable=not run.cfg.progress,
        unit="step",
    )
    postfix: dict[str, str] = {}
    while progress.step < run.total_steps:
        for (indices,) in run.loader:
            batch_loss = _timed_step(run, progress, indices)
            bar.update(1)
            _show(bar, postfix, run, progress, batch_loss)
            # Rank 0 alone evaluates and logs (the other ranks' models are identical).
            if run.rank == 0 and _due(progress.step, run.total_steps, run.cfg.eval_every):
                _evaluate(run, progress, bar)
            if run.checkpointer is not None and _due(
                progress.step, run.total_steps, run.cfg.checkpoint_every
            ):
                _checkpoint(run, progress)
            if progress.step == run.total_steps:
                break
    bar.close()
    # The whole run's training time: in a private log the only timing (TRAINING_STATISTICS).
    run.log["train_seconds"] = progress.seconds
    run.log["steps_per_s"] = progress.step / progress.seconds if progress.seconds else None
    if run.rank == 0 and run.cfg.output:
        write_json(run.cfg.output, run.log)
    _finish(run)
    return run.log


def _due(step: int, total_steps: int, every: int) -> bool:
    """Whether an evaluation (a checkpoint) is due after ``step``: every ``every`` steps (0:
    never) and after the last."""
    return step == total_steps or bool(every and step % every == 0)


def _set_up(cfg: TrainConfig) -> Run:
    """Check the options and outputs, then build the run: data, model, optimizer and loader,
    made private, the checkpointer and the log's first form. Every user error raises
    ValueError here, before any training."""
    cfg.check()
    task = get_task(cfg.task)
    torch.manual_seed(cfg.seed)
    rank, device = init_distributed(parse_device(cfg.device))
    if rank != 0:  # one log, one progress bar, one saved model: rank 0's
        cfg = replace(cfg, output=None, save=None, progress=False)
    check_outputs(cfg)
    plan = plan_checkpoint(cfg)
    cfg = resolve_optimisation(cfg, plan.resumed if plan else None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    model, tokenizer, train_data, eval_data = _model_and_data(cfg, task, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(cfg, params)
    loader = torch.utils.data.DataLoader(
        ExampleIndices(len(train_data)),
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=sampling_generator(cfg),
    )
    steps_per_epoch = len(loader)
    total_steps = cfg.steps or max(1, round((cfg.epochs or 1.0) * steps_per_epoch))
    if plan is not None:
        plan.check_steps(total_steps, cfg)
    model, optimizer, loader, privacy = privatize(
        cfg, model, optimizer, loader, total_steps=total_steps, device=device
    )
    physical = cfg.physical_batch_size or cfg.batch_size
    checkpointer = None
    if plan is not None:
        settings = run_settings(cfg, model, physical, device)
        checkpointer = Checkpointer(plan, settings, data_fingerprint(train_data, settings))
    run = Run(
        cfg=cfg,
        task=task,
        rank=rank,
        device=device,
        model=model,
        tokenizer=tokenizer,
        optimizer=optimizer,
        loader=loader,
        train_data=train_data,
        eval_data=eval_data,
        physical=physical,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        privacy=privacy,
        checkpointer=checkpointer,
        expand_positions=privacy.opacus_engine is not None and shared_positions(unwrap(model)),
    )
    run.log = _new_log(run, trainable_parameters=sum(p.numel() for p in params))
    return run


def _model_and_data(
    cfg: TrainConfig, task: Task, device: torch.device
) -> tuple[torch.nn.Module, Any, Encoded, Encoded]:
    """(model on ``device`` in training mode, tokenizer, tokenized train and eval splits)."""
    train_ds = subset(load_split(task, "train", cfg.data_dir), cfg.train_size, cfg.seed)
    eval_ds = subset(
        load_split(task, "validation", cfg.data_dir), cfg.eval_size, cfg.seed, "--eval-size"
    )
    model, tokenizer = build_model(cfg, task)
    model.to(device).train()
    train_data = encode(train_ds, tokenizer, cfg.max_length, cfg.progress)
    eval_data = encode(eval_ds, tokenizer, cfg.max_length, cfg.progress)
    return model, tokenizer, train_data, eval_data


def _optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The ``--optimizer`` (``--lr``, ``--weight-decay``) over the trainable parameters."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"--optimizer must be 'adamw' or 'sgd', got {cfg.optimizer!r}")


def _new_log(run: Run, trainable_parameters: int) -> dict:
    """The JSON log before the first evaluation."""
    cfg = run.cfg
    return {
        "task": run.task.name,
        "main_metric": run.task.main_metric,
        # null: no finite guarantee (--no-dp, or no noise); strict JSON has no Infinity.
        "epsilon": None,
        "private": run.privacy.private,
        "delta": run.privacy.delta,
        "noise_multiplier": run.privacy.noise_multiplier,
        "config": logged_config(cfg),
        "derived": {
            "train_examples": len(run.train_data),
            "eval_examples": len(run.eval_data),
            "steps": run.total_steps,
            "steps_per_epoch": run.steps_per_epoch,
            "sample_rate": 1 / run.steps_per_epoch,
            "physical_batch_size": run.physical,
            "trainable_parameters": trainable_parameters,
            "device": str(run.device),
        },
        "versions": versions(),
        "evals": [],
        "peak_memory_mib": None,
    }


def _restore(run: Run) -> Progress:
    """Where the loop starts: a resumed run's step, time, samples and evaluations (the
    checkpoint's), else the beginning."""
    if run.checkpointer is None:
        return Progress()
    extra = run.checkpointer.restore(run.model, run.optimizer, run.loader, run.cfg)
    if extra is None:
        return Progress()
    if run.rank == 0:  # the one log
        # A checkpoint of a private run written before its log was cleaned may still carry the
        # training statistics: they stay out of this run's log.
        run.log["evals"] = [_released(run, record) for record in extra["evals"]]
    # A private run's checkpoint has no sample count (None): the resumed count starts at 0 and
    # is never shown.
    return Progress(step=extra["step"], seconds=extra["seconds"], samples=extra["samples"] or 0)


# What an evaluation record says about the training batches themselves: their exact sizes and
# mean (unnoised) loss. Cross entropy has unbounded sensitivity and the batch sizes are the
# Poisson sampling's outcome, which amplification by sampling assumes secret; the accountant
# counts neither, so a private run never writes them. Nor the training time at each evaluation:
# a step's time grows with its batch (with --eval-every 1 the step times correlated 0.27 with
# the hidden batch sizes on a tiny BERT), so a private log holds only the whole run's training
# time (``train_seconds``, ``steps_per_s``, written after the last step).
TRAINING_STATISTICS = ("samples", "samples_per_s", "train_loss", "seconds", "steps_per_s")


def _released(run: Run, record: dict) -> dict:
    """``record`` as the log may hold it: without ``TRAINING_STATISTICS`` in a private run
    (a run without DP, without noise or with a public ``--noise-seed`` keeps them)."""
    if not run.privacy.private:
        return record
    return {k: v for k, v in record.items() if k not in TRAINING_STATISTICS}


def _timed_step(run: Run, progress: Progress, indices: torch.Tensor) -> float | None:
    """One logical step on the examples ``indices``, timed and counted in ``progress``; its
    mean loss (None for an empty Poisson batch)."""
    engine = run.native_engine
    if engine is not None:
        # Per-layer kept rank and shrunk-to-noisy norm ratio, on evaluation steps only (the
        # SVDs run with the evaluation, outside the timed step).
        engine.record_denoise_stats = _due(progress.step + 1, run.total_steps, run.cfg.eval_every)
    # --lr-schedule: a function of the step alone (a resume continues it exactly).
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(run.cfg, progress.step, run.total_steps)
    start = time.perf_counter()
    batch_loss = _logical_step(run, indices)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    progress.seconds += time.perf_counter() - start
    progress.samples += len(indices)
    progress.step += 1
    if batch_loss is not None:
        progress.losses.append(batch_loss)
    return batch_loss


def _logical_step(run: Run, indices: torch.Tensor) -> float | None:
    """Forward/backward each physical batch of ``indices``, then one optimizer step; the mean
    loss (None for an empty Poisson batch)."""
    data, optimizer, dp = run.train_data, run.optimizer, run.cfg.dp
    # Physical batches of similar lengths pad less. The logical batch, hence the clipped sum and
    # everything private about the step, does not depend on how it is cut into physical ones.
    order = torch.tensor(data.by_length(indices), dtype=torch.long)
    chunks = list(order.split(run.physical)) if len(indices) else []
    total = 0.0
    if not chunks and run.privacy.opacus_engine is not None:
        # An empty Poisson batch must still be a (noise-only) step: skipping it would reveal
        # that it was empty. Opacus reads per-sample gradients, which only a backward makes, and
        # an encoder cannot run on zero examples: hand it zero per-sample gradients.
        for p in optimizer.params:
            p.grad_sample = p.new_zeros((0, *p.shape))
    for j, chunk in enumerate(chunks):
        batch = data.batch(chunk)
        if run.expand_positions:
            batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(
                batch["input_ids"]
            )
        logits = forward(run.model, batch, run.device)
        loss = loss_fn(logits, batch["labels"].to(run.device), run.task)
        if len(chunk):
            total += loss.item() * len(chunk)
        if not dp:
            # Mean over the logical batch: weight each physical batch by its share.
            (loss * (len(chunk) / len(indices))).backward()
        else:
            # The DP engines take each physical batch's mean loss (loss_reduction="mean") and
            # divide the clipped sum by the expected logical batch size themselves.
            loss.backward()
        if dp and j < len(chunks) - 1:
            optimizer.signal_skip_step(True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / len(indices) if len(indices) else None


def _show(bar, postfix: dict[str, str], run: Run, progress: Progress, loss: float | None) -> None:
    """The progress bar's loss and throughput (a private run: steps/s, which says nothing about
    the batches) and (about 20 times a run) epsilon."""
    if run.privacy.private:
        postfix["steps/s"] = f"{progress.step / progress.seconds:.2f}" if progress.seconds else "-"
    else:
        postfix["loss"] = f"{loss:.4f}" if loss is not None else "-"
        postfix["samples/s"] = f"{progress.samples / progress.seconds:.1f}"
    # Epsilon about 20 times a run: each accountant call costs a fraction of a second.
    step, total_steps = progress.step, run.total_steps
    if run.cfg.dp and (step % max(1, total_steps // 20) == 0 or step == total_steps):
        postfix["eps"] = f"{run.privacy.epsilon(step):.3g}"
    bar.set_postfix(postfix, refresh=False)


def _evaluate(run: Run, progress: Progress, bar) -> None:
    """Evaluate, append the record to the log (with the denoise statistics of the step just
    taken), say it on the bar and write the log."""
    step = progress.step
    epsilon = run.privacy.epsilon(step)
    record = {
        "step": step,
        "epoch": step / run.steps_per_epoch,
        "seconds": progress.seconds,
        "steps_per_s": step / progress.seconds if progress.seconds else None,
        "samples": progress.samples,
        "samples_per_s": progress.samples / progress.seconds if progress.seconds else None,
        # null when infinite (no noise): the returned log says what the written one says.
        "epsilon": json_safe(epsilon),
        "train_loss": sum(progress.losses) / len(progress.losses) if progress.losses else None,
    }
    record = _released(run, record)
    progress.losses = []
    eval_batch = run.physical * EVAL_BATCH_FACTOR
    with _at_disk_iterate(run, step):
        record.update(evaluate(run.model, run.eval_data, run.task, eval_batch, run.device))
    engine = run.native_engine
    if engine is not None:
        stats = engine.take_denoise_stats()
        if stats:
            record["denoise"] = stats
    run.log["evals"].append(record)
    run.log["epsilon"] = record["epsilon"]
    run.log["peak_memory_mib"] = peak_memory_mib(run.device)
    bar.write(
        f"step {step}: {run.task.main_metric} {record[run.task.main_metric]:.4f}"
        + (f", epsilon {epsilon:.3g}" if run.cfg.dp else "")
    )
    if run.cfg.output:
        write_json(run.cfg.output, run.log)


def _checkpoint(run: Run, progress: Progress) -> None:
    """Save the run where it stands (the log's evaluations with it; a private run's checkpoint
    holds no sample count, like its log)."""
    samples = None if run.privacy.private else progress.samples
    state = {"step": progress.step, "seconds": progress.seconds, "samples": samples}
    run.checkpointer.save(run.model, run.optimizer, run.loader, run.cfg, state, run.log["evals"])


def _finish(run: Run) -> None:
    """Leave torchrun's process group; save the model (``--save``, rank 0; with ``--filter
    disk`` at DiSK's iterate)."""
    leave_distributed()
    if run.cfg.save:
        with _at_disk_iterate(run, run.total_steps):
            save_model(unwrap(run.model), run.tokenizer, Path(run.cfg.save))


def _private_params(run: Run) -> dict:
    """The privatised parameters by the key the post-processors use (the native engine's
    parameter names; the Opacus drop-in's indices)."""
    engine = run.native_engine
    if engine is not None:
        return dict(zip(engine.param_names, (p for _, _, p in engine.params), strict=True))
    return dict(enumerate(getattr(run.optimizer, "params", [])))


@contextmanager
def _at_disk_iterate(run: Run, step: int):
    """With ``--filter disk`` the parameters hold DiSK's extrapolated point z_t: move them to
    its iterate x_t = z_t + lr * offset (the learning rate of step ``step``, the last one run)
    for the block, then put z_t back exactly (rmt_kernels/glue/stages.py)."""
    holder = run.native_engine or run.optimizer
    offset = disk_iterate_offset(holder) if run.cfg.dp and step > 0 else None
    if not offset:
        yield
        return
    lr = learning_rate(run.cfg, step - 1, run.total_steps)
    params = _private_params(run)
    moved = [(params[k], d) for k, d in offset.items()]
    saved = [p.detach().clone() for p, _ in moved]
    with torch.no_grad():
        for p, d in moved:
            p.add_(d.to(p.device, p.dtype), alpha=lr)
    try:
        yield
    finally:
        with torch.no_grad():
            for (p, _), s in zip(moved, saved, strict=True):
                p.copy_(s)


def peak_memory_mib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's resident high-water mark on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


__all__ = ["train"]
