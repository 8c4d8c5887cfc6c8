"""``rmt-lm train``'s options: the shared ones (``rmt_kernels.training.config.TrainConfig``) and
the language model's own (the model, its tokenizer, what is trained, the E2E data, the loss's
per-sequence reduction and generation), with their checks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from rmt_kernels.training.config import TrainConfig

#: The per-sequence reductions of the loss (rmt_kernels.lm_loss): a sequence's mean over its
#: own reference tokens, or their sum. Either is a function of the example alone.
LOSS_REDUCTIONS = ("sequence_mean", "sequence_sum")
EVAL_SPLITS = ("dev", "test")


@dataclass(kw_only=True)
class LmConfig(TrainConfig):
    """Everything an ``rmt-lm train`` run depends on (the ``config`` of the JSON log). See
    ``rmt-lm train -h``."""

    model: str = "gpt2-tiny"
    tokenizer: str | None = None
    random_init: bool = False
    freeze_norms: bool = False
    lora: bool = False
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = "attention"
    data_dir: str | None = None
    eval_split: str = "dev"
    train_size: int | None = None
    eval_size: int | None = None
    max_length: int = 128
    loss_reduction: str = "sequence_mean"
    max_new_tokens: int = 64
    num_beams: int = 1

    def check_application(self) -> None:
        """The model's, the data's and generation's options (ValueError naming the flag)."""
        from rmt_kernels.lm.model import LORA_TARGETS, NAMED_MODELS

        if not self.model:
            raise ValueError(f"--model: give a named config ({', '.join(NAMED_MODELS)}) or a path")
        for flag, path in (("--model", self.model), ("--tokenizer", self.tokenizer)):
            if path is not None and _looks_local(path) and not Path(path).exists():
                raise ValueError(f"{flag} {path} does not exist")
        if self.random_init and self.model in NAMED_MODELS:
            raise ValueError(
                f"--random-init is for a model path: --model {self.model} is always randomly "
                "initialised"
            )
        if self.lora_r < 1:
            raise ValueError(f"--lora-r must be >= 1, got {self.lora_r}")
        if not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            raise ValueError(f"--lora-alpha must be a finite number > 0, got {self.lora_alpha}")
        if self.lora_targets not in LORA_TARGETS:
            raise ValueError(
                f"--lora-targets must be one of {', '.join(LORA_TARGETS)}, got "
                f"{self.lora_targets!r}"
            )
        if self.eval_split not in EVAL_SPLITS:
            raise ValueError(
                f"--eval-split must be one of {', '.join(EVAL_SPLITS)}, got {self.eval_split!r}"
            )
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(
                f"--loss-reduction must be one of {', '.join(LOSS_REDUCTIONS)}, got "
                f"{self.loss_reduction!r}"
            )
        for flag, value, low in (
            ("--max-length", self.max_length, 2),
            ("--max-new-tokens", self.max_new_tokens, 1),
            ("--num-beams", self.num_beams, 1),
            ("--train-size", self.train_size, 1),
            ("--eval-size", self.eval_size, 1),
        ):
            if value is not None and value < low:
                raise ValueError(f"{flag} must be >= {low}, got {value}")


def _looks_local(path: str) -> bool:
    """Whether ``path`` names a local file or folder (not a hub name such as ``org/model``)."""
    return Path(path).is_absolute() or path.startswith((".", "~"))
