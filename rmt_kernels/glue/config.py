"""``rmt-glue train``'s options: the shared ones (``rmt_kernels.training.config.TrainConfig``)
and GLUE's own (the task, its data, the model and how it reads a sentence), with their checks."""

from __future__ import annotations

from dataclasses import dataclass

from rmt_kernels.glue.tasks import get_task
from rmt_kernels.training.config import TrainConfig


@dataclass(kw_only=True)
class GlueConfig(TrainConfig):
    """Everything an ``rmt-glue train`` run depends on (the ``config`` of the JSON log). See
    ``rmt-glue train -h``."""

    task: str
    data_dir: str | None = None
    model: str | None = None
    init: str = "pretrained"
    config: str | None = None
    max_length: int = 128
    train_size: int | None = None
    eval_size: int | None = None
    freeze_embeddings: bool = False
    pooling: str = "cls"

    def check(self) -> None:
        """Raise ValueError on options that cannot go together (before any data is read): an
        unknown ``--task`` first, then :meth:`TrainConfig.check`."""
        get_task(self.task)
        super().check()

    def check_application(self) -> None:
        """The model's options: ``--init``, ``--config``/``--model``, ``--pooling``."""
        if self.init not in ("pretrained", "random"):
            raise ValueError(f"--init must be 'pretrained' or 'random', got {self.init!r}")
        if self.init == "random" and (self.config is None or self.model is not None):
            raise ValueError("--init random builds the model from --config DIR (and not --model)")
        if self.init == "pretrained" and self.model is None:
            raise ValueError("give --model (a folder or a hub name), or --init random --config DIR")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"--pooling must be 'cls' or 'mean', got {self.pooling!r}")
