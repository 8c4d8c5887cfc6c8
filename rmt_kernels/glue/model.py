"""The classifier ``rmt-glue`` fine-tunes: a Hugging Face sequence classifier and its tokenizer,
its loss, and a forward on a padded batch."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.nn import functional

from rmt_kernels.glue.pooling import use_mean_pooling
from rmt_kernels.glue.tasks import Task

if TYPE_CHECKING:
    from rmt_kernels.glue.config import GlueConfig


# Files of which at least one makes a folder a tokenizer (fast, BPE, WordPiece, SentencePiece).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def load_tokenizer(path: str):
    """The tokenizer of a model or config folder (or hub name).

    Raises:
        ValueError: a local folder without tokenizer files.
    """
    from transformers import AutoTokenizer

    folder = Path(path)
    if folder.is_dir() and not any((folder / name).exists() for name in TOKENIZER_FILES):
        raise ValueError(
            f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the "
            "tokenizer beside the model (tokenizer.save_pretrained(folder))"
        )
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not load a tokenizer from {path}: {err}") from err


def build_model(cfg: GlueConfig, task: Task):
    """(model, tokenizer): pretrained weights with a fresh head, or a random init from a config."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    source = cfg.model if cfg.init == "pretrained" else cfg.config
    kwargs = {"num_labels": task.num_labels}
    if task.is_regression:
        kwargs["problem_type"] = "regression"
    if source is not None and not Path(source).exists() and Path(source).is_absolute():
        raise ValueError(f"model folder {source} does not exist")
    tokenizer = load_tokenizer(source)
    try:
        if cfg.init == "pretrained":
            model = AutoModelForSequenceClassification.from_pretrained(source, **kwargs)
        else:
            config = AutoConfig.from_pretrained(source, **kwargs)
            model = AutoModelForSequenceClassification.from_config(config)
    except OSError as err:
        raise ValueError(f"could not load a model from {source}: {err}") from err
    if cfg.pooling == "mean" or getattr(model.config, "rmt_pooling", None) == "mean":
        use_mean_pooling(model)
    if cfg.freeze_embeddings:
        embeddings = getattr(model.base_model, "embeddings", None)
        if embeddings is None:
            raise ValueError(f"--freeze-embeddings: {type(model).__name__} has no embeddings")
        embeddings.requires_grad_(False)
    return model, tokenizer


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, task: Task) -> torch.Tensor:
    """Mean cross-entropy, or mean squared error for the regression task."""
    if task.is_regression:
        return functional.mse_loss(logits.squeeze(-1).float(), labels.float())
    return functional.cross_entropy(logits.float(), labels)


def forward(model, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """The logits of ``batch`` (its labels left out), moved to ``device``."""
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    return model(**inputs).logits


def shared_positions(model) -> bool:
    """Whether the model's position embeddings read one (1, T) row of positions shared by the
    batch (BERT) rather than per-example ones (RoBERTa derives them from each example's padding,
    so its position embedding has a padding_idx). Opacus's per-sample gradients need a (B, T)
    input there."""
    embeddings = getattr(getattr(model, "base_model", None), "embeddings", None)
    positions = getattr(embeddings, "position_embeddings", None)
    return isinstance(positions, torch.nn.Embedding) and positions.padding_idx is None
