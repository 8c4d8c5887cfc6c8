"""GLUE fine-tuning as a ``TrainingTask`` (``rmt_kernels.training.task``): a GLUE task's data, a
Hugging Face sequence classifier, its loss and GLUE's metrics; and ``train``, the ``rmt-glue
train`` run (the shared loop, ``rmt_kernels.training.loop``, over this task)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rmt_kernels.glue.config import GlueConfig
from rmt_kernels.glue.data import Encoded, encode, load_split
from rmt_kernels.glue.evaluation import evaluate
from rmt_kernels.glue.model import build_model, forward, loss_fn, shared_positions
from rmt_kernels.glue.tasks import get_task
from rmt_kernels.training import loop
from rmt_kernels.training.fingerprint import model_config_digest
from rmt_kernels.training.outputs import save_model
from rmt_kernels.training.privacy import unwrap
from rmt_kernels.training.subset import subset


class GlueFineTuning:
    """One ``rmt-glue train`` run's task: ``cfg``'s GLUE task, data and classifier.

    Attributes:
        spec: the GLUE task (files, labels, metrics: ``rmt_kernels.glue.tasks.Task``).
        tokenizer: the model's tokenizer, once :meth:`build` has run (saved with the model).
    """

    def __init__(self, task: str) -> None:
        self.spec = get_task(task)
        self.name = self.spec.name
        self.main_metric = self.spec.main_metric
        self.cfg: GlueConfig | None = None  # the run's options, given to build
        self.tokenizer: Any = None
        # BERT-style position embeddings under Opacus: per-example positions (shared_positions).
        self.expand_positions = False

    def build(
        self, cfg: GlueConfig, device: torch.device
    ) -> tuple[torch.nn.Module, Encoded, Encoded]:
        """(classifier on ``device`` in training mode, tokenized train and validation splits):
        the splits are read (and subset) before the model is built, the model's random init
        drawn from the seeded global generator."""
        self.cfg, spec = cfg, self.spec
        train_ds = subset(load_split(spec, "train", cfg.data_dir), cfg.train_size, cfg.seed)
        eval_ds = subset(
            load_split(spec, "validation", cfg.data_dir), cfg.eval_size, cfg.seed, "--eval-size"
        )
        model, self.tokenizer = build_model(cfg, spec)
        model.to(device).train()
        train_data = encode(train_ds, self.tokenizer, cfg.max_length, cfg.progress)
        eval_data = encode(eval_ds, self.tokenizer, cfg.max_length, cfg.progress)
        return model, train_data, eval_data

    def made_private(self, model: torch.nn.Module, opacus: bool) -> None:
        """Under Opacus, a BERT-style model gets per-example position ids (its per-sample
        gradients need a (B, T) input there)."""
        self.expand_positions = opacus and shared_positions(unwrap(model))

    def order(self, data: Encoded, indices: torch.Tensor) -> list[int]:
        """By length: physical batches of similar lengths pad less."""
        return data.by_length(indices)

    def loss(
        self, model: torch.nn.Module, data: Encoded, indices: torch.Tensor, device: torch.device
    ) -> torch.Tensor:
        """Mean cross-entropy (mean squared error for STS-B) of the examples ``indices``."""
        batch = data.batch(indices)
        if self.expand_positions:
            batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(
                batch["input_ids"]
            )
        logits = forward(model, batch, device)
        return loss_fn(logits, batch["labels"].to(device), self.spec)

    def evaluate(
        self, model: torch.nn.Module, data: Encoded, batch_size: int, device: torch.device
    ) -> dict[str, float]:
        """The GLUE task's metrics and ``eval_loss``."""
        return evaluate(model, data, self.spec, batch_size, device)

    def digest(self, data: Encoded) -> str:
        """SHA-256 of the tokenized split (``Encoded.digest``)."""
        return data.digest()

    def settings(self, model: torch.nn.Module) -> dict[str, Any]:
        """The task, the tokenization and the model, by flag."""
        cfg = self.cfg
        return {
            "--task": cfg.task,
            "--max-length": cfg.max_length,
            "--train-size": cfg.train_size,
            "--pooling": cfg.pooling,
            "--freeze-embeddings": cfg.freeze_embeddings,
            "model config": model_config_digest(model),
        }

    def save(self, model: torch.nn.Module, folder: Path) -> None:
        """``save_pretrained`` of the model and its tokenizer, atomically."""
        save_model(model, self.tokenizer, folder)


def train(cfg: GlueConfig) -> dict:
    """Run one ``rmt-glue train`` fine-tuning; return (and write to ``cfg.output``) the JSON log
    (``rmt_kernels.training.loop.train``)."""
    return loop.train(cfg, GlueFineTuning(cfg.task))
