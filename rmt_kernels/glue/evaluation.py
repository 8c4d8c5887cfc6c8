"""Evaluation: a model's task metrics and mean loss on a split, during training (rank 0, every
``--eval-every`` steps and at the end) and for a saved model (``rmt-glue evaluate``)."""

from __future__ import annotations

import torch

from rmt_kernels.glue.config import GlueConfig
from rmt_kernels.glue.data import Encoded, encode, load_split
from rmt_kernels.glue.model import build_model, forward, loss_fn
from rmt_kernels.glue.tasks import Task, get_task
from rmt_kernels.training.config import parse_device
from rmt_kernels.training.fingerprint import versions
from rmt_kernels.training.subset import subset


@torch.no_grad()
def evaluate(model, data: Encoded, task: Task, batch_size: int, device) -> dict[str, float]:
    """The task's metrics and the mean loss on ``data``."""
    was_training = model.training
    model.eval()
    predictions: list[float | int] = [0] * len(data)
    total_loss = 0.0
    # Batches of similar lengths pad less; predictions go back to their examples' places.
    order = data.by_length(range(len(data)))
    for start in range(0, len(data), batch_size):
        chunk = order[start : start + batch_size]
        batch = data.batch(chunk)
        logits = forward(model, batch, device)
        labels = batch["labels"].to(device)
        total_loss += loss_fn(logits, labels, task).item() * len(labels)
        if task.is_regression:
            values = logits.squeeze(-1).float().cpu().tolist()
        else:
            values = logits.argmax(-1).cpu().tolist()
        for i, value in zip(chunk, values, strict=True):
            predictions[i] = value
    model.train(was_training)
    metrics = task.score(predictions, data.labels.tolist())
    metrics["eval_loss"] = total_loss / max(1, len(data))
    return metrics


def evaluate_saved(
    task_name: str,
    model_dir: str,
    data_dir: str | None,
    *,
    max_length: int = 128,
    batch_size: int = 64,
    eval_size: int | None = None,
    device: str | None = None,
) -> dict:
    """Metrics of a saved model (``train --save DIR``) on the task's validation split."""
    task = get_task(task_name)
    cfg = GlueConfig(task=task.name, model=model_dir)
    model, tokenizer = build_model(cfg, task)
    dev = parse_device(device)
    model.to(dev)
    data = encode(
        subset(load_split(task, "validation", data_dir), eval_size, 0, "--eval-size"),
        tokenizer,
        max_length,
    )
    metrics = evaluate(model, data, task, batch_size, dev)
    return {
        "task": task.name,
        "model": model_dir,
        "examples": len(data),
        "metrics": metrics,
        "versions": versions(),
    }
