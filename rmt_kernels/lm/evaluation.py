"""Evaluation on E2E: teacher-forced loss on every (mr, ref) pair and generation on each unique
meaning representation scored against all its references, during training (rank 0, every
``--eval-every`` steps and at the end) and for a saved model (``rmt-lm evaluate``); and the
outputs of a saved model (``rmt-lm generate``)."""

from __future__ import annotations

from typing import Any

import torch

from rmt_kernels.lm.data import (
    Tokens,
    eval_set,
    group_references,
    load_split,
    resolve_data_dir,
    select_groups,
)
from rmt_kernels.lm.generation import generate
from rmt_kernels.lm.metrics import score
from rmt_kernels.lm_loss import per_example_lm_loss
from rmt_kernels.training.config import parse_device
from rmt_kernels.training.fingerprint import versions

# Generations a log's evaluation record shows (the first meaning representations').
SHOWN_GENERATIONS = 3


@torch.no_grad()
def eval_loss(model, data, batch_size: int, loss_reduction: str, device) -> float:
    """The mean over ``data``'s sequences (``rmt_kernels.lm.data.Encoded``) of each one's LM
    loss on its reference tokens."""
    was_training = model.training
    model.eval()
    total = 0.0
    order = data.by_length(range(len(data)))
    try:
        for start in range(0, len(order), batch_size):
            batch = data.batch(order[start : start + batch_size])
            logits = model(
                batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits
            losses = per_example_lm_loss(
                logits, batch["labels"].to(device), reduction=loss_reduction
            )
            total += losses.sum().item()
    finally:
        model.train(was_training)
    return total / max(1, len(data))


def evaluate(
    model,
    tokenizer,
    data,
    *,
    batch_size: int,
    max_new_tokens: int,
    num_beams: int,
    loss_reduction: str,
    device,
) -> dict[str, Any]:
    """``bleu``, ``rouge_l`` and ``eval_loss`` of ``model`` on ``data``
    (``rmt_kernels.lm.data.EvalSet``), and its first generations (``generations``)."""
    outputs = generate(
        model,
        tokenizer,
        data.prompts,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        device=device,
    )
    metrics: dict[str, Any] = score(outputs, [refs for _, refs in data.groups])
    metrics["eval_loss"] = eval_loss(model, data.pairs, batch_size, loss_reduction, device)
    metrics["generations"] = [
        {"mr": mr, "output": out}
        for (mr, _), out in zip(data.groups[:SHOWN_GENERATIONS], outputs, strict=False)
    ]
    return metrics


def load_saved(model_dir: str, tokenizer_path: str | None):
    """(model, tokenizer) saved by ``rmt-lm train --save`` (or any causal LM folder or hub
    name with its tokenizer).

    Raises:
        ValueError: a named config (it has no trained weights), or nothing loadable.
    """
    from rmt_kernels.lm.config import LmConfig
    from rmt_kernels.lm.model import build_model, load_tokenizer

    _check_saved(model_dir)
    tokenizer = load_tokenizer(tokenizer_path or model_dir)
    return build_model(LmConfig(model=model_dir), tokenizer), tokenizer


def _check_saved(model_dir: str) -> None:
    """Raise ValueError for a named config (it has no trained weights) or a missing folder."""
    from rmt_kernels.lm.config import LmConfig
    from rmt_kernels.lm.model import NAMED_MODELS

    if model_dir in NAMED_MODELS:
        raise ValueError(
            f"--model {model_dir} is a named config (random weights): give a folder saved by "
            "'rmt-lm train --save DIR'"
        )
    LmConfig(model=model_dir).check_application()


def evaluate_saved(
    model_dir: str,
    data_dir: str | None,
    *,
    split: str = "dev",
    tokenizer: str | None = None,
    eval_size: int | None = None,
    batch_size: int = 32,
    max_length: int = 128,
    max_new_tokens: int = 64,
    num_beams: int = 1,
    loss_reduction: str = "sequence_mean",
    device: str | None = None,
) -> dict[str, Any]:
    """BLEU, ROUGE-L and ``eval_loss`` of a saved model on E2E's ``split`` (``eval_size`` of its
    meaning representations, drawn by seed 0, with all their references)."""
    _check_saved(model_dir)
    groups = select_groups(_split_groups(data_dir, split), eval_size, 0)
    model, tok = load_saved(model_dir, tokenizer)
    dev = parse_device(device)
    model.to(dev)
    metrics = evaluate(
        model,
        tok,
        eval_set(groups, Tokens(tok), max_length),
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        loss_reduction=loss_reduction,
        device=dev,
    )
    return {
        "model": model_dir,
        "split": split,
        "meaning_representations": len(groups),
        "references": sum(len(refs) for _, refs in groups),
        "metrics": metrics,
        "versions": versions(),
    }


def generate_saved(
    model_dir: str,
    mrs: list[str],
    *,
    tokenizer: str | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 64,
    num_beams: int = 1,
    device: str | None = None,
) -> list[str]:
    """A saved model's output for each meaning representation of ``mrs``.

    Raises:
        ValueError: no meaning representation, or an empty one.
    """
    if not mrs or any(not mr.strip() for mr in mrs):
        raise ValueError("--mr: give one or more non-empty meaning representations")
    _check_saved(model_dir)
    model, tok = load_saved(model_dir, tokenizer)
    dev = parse_device(device)
    model.to(dev)
    tokens = Tokens(tok)
    return generate(
        model,
        tok,
        [tokens.prompt(mr.strip()) for mr in mrs],
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        device=dev,
    )


def first_mrs(data_dir: str | None, split: str, count: int) -> list[str]:
    """The first ``count`` unique meaning representations of E2E's ``split``.

    Raises:
        ValueError: ``count`` below 1, or missing data.
    """
    if count < 1:
        raise ValueError(f"--first must be >= 1, got {count}")
    return [mr for mr, _ in _split_groups(data_dir, split)[:count]]


def _split_groups(data_dir: str | None, split: str) -> list[tuple[str, list[str]]]:
    rows = load_split(resolve_data_dir(data_dir), split)
    return group_references(rows["mr"], rows["ref"])
