"""E2E fine-tuning as a ``TrainingTask`` (``rmt_kernels.training.task``): E2E's pairs, a causal
LM, the per-example LM loss (``rmt_kernels.lm_loss``) and E2E's generation metrics; and
``train``, the ``rmt-lm train`` run (the shared loop, ``rmt_kernels.training.loop``, over this
task)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rmt_kernels.lm.config import LmConfig
from rmt_kernels.lm.data import (
    Encoded,
    EvalSet,
    Tokens,
    encode_pairs,
    eval_set,
    group_references,
    load_split,
    resolve_data_dir,
    select_groups,
)
from rmt_kernels.lm.evaluation import evaluate
from rmt_kernels.lm.model import (
    build_model,
    is_norm,
    load_tokenizer,
    tokenizer_source,
    trainable_without_rule,
)
from rmt_kernels.lm_loss import lm_loss
from rmt_kernels.training import loop
from rmt_kernels.training.fingerprint import model_config_digest
from rmt_kernels.training.outputs import save_model
from rmt_kernels.training.privacy import unwrap
from rmt_kernels.training.subset import subset


class LmFineTuning:
    """One ``rmt-lm train`` run's task: ``cfg``'s model trained on E2E, evaluated by generation.

    Attributes:
        tokenizer: the model's tokenizer, once :meth:`build` has run (saved with the model).
    """

    name = "e2e"
    main_metric = "bleu"

    def __init__(self) -> None:
        self.cfg: LmConfig | None = None  # the run's options, given to build
        self.tokenizer: Any = None
        # GPT-2's trained position embedding under Opacus: per-example position ids.
        self.expand_positions = False

    def build(
        self, cfg: LmConfig, device: torch.device
    ) -> tuple[torch.nn.Module, Encoded, EvalSet]:
        """(model on ``device`` in training mode, encoded training pairs, evaluation set): the
        data are read (and subset) before the model is built, the model's random init drawn
        from the seeded global generator.

        Raises:
            ValueError: missing data or tokenizer, a model that cannot be loaded, or (DP with
                the native engine) a trainable layer the engine has no rule for, naming the
                flags that leave it out.
        """
        self.cfg = cfg
        data_dir = resolve_data_dir(cfg.data_dir)
        train_rows = subset(load_split(data_dir, "train"), cfg.train_size, cfg.seed)
        eval_rows = load_split(data_dir, cfg.eval_split)
        groups = select_groups(
            group_references(eval_rows["mr"], eval_rows["ref"]), cfg.eval_size, cfg.seed
        )
        self.tokenizer = load_tokenizer(tokenizer_source(cfg))
        tokens = Tokens(self.tokenizer)
        model = build_model(cfg, self.tokenizer)
        if cfg.dp and cfg.engine == "native":
            _check_rules(model, cfg)
        model.to(device).train()
        train_data = encode_pairs(train_rows["mr"], train_rows["ref"], tokens, cfg.max_length)
        return model, train_data, eval_set(groups, tokens, cfg.max_length)

    def made_private(self, model: torch.nn.Module, opacus: bool) -> None:
        """Under Opacus, a trained GPT-2 position embedding (``wpe``) gets per-example position
        ids (its per-sample gradients need a (B, T) input)."""
        wpe = getattr(getattr(unwrap(model), "transformer", None), "wpe", None)
        self.expand_positions = (
            opacus and wpe is not None and any(p.requires_grad for p in wpe.parameters())
        )

    def order(self, data: Encoded, indices: torch.Tensor) -> list[int]:
        """By length: physical batches of similar lengths pad less."""
        return data.by_length(indices)

    def loss(
        self, model: torch.nn.Module, data: Encoded, indices: torch.Tensor, device: torch.device
    ) -> torch.Tensor:
        """The mean over the examples ``indices`` of each one's own LM loss on its reference
        tokens (``--loss-reduction``: their mean or sum), never the batch-coupled token mean
        of the model's ``labels=`` loss."""
        batch = data.batch(indices)
        ids = batch["input_ids"].to(device)
        kwargs = {"attention_mask": batch["attention_mask"].to(device)}
        if self.expand_positions:
            kwargs["position_ids"] = torch.arange(ids.shape[1], device=device).expand_as(ids)
        logits = model(ids, **kwargs).logits
        return lm_loss(logits, batch["labels"].to(device), reduction=self.cfg.loss_reduction)

    def evaluate(
        self, model: torch.nn.Module, data: EvalSet, batch_size: int, device: torch.device
    ) -> dict[str, Any]:
        """BLEU, ROUGE-L (generation on each unique meaning representation), ``eval_loss``
        (teacher-forced, every pair) and the first generations."""
        cfg = self.cfg
        return evaluate(
            unwrap(model),
            self.tokenizer,
            data,
            batch_size=batch_size,
            max_new_tokens=cfg.max_new_tokens,
            num_beams=cfg.num_beams,
            loss_reduction=cfg.loss_reduction,
            device=device,
        )

    def digest(self, data: Encoded) -> str:
        """SHA-256 of the encoded training pairs (``Encoded.digest``)."""
        return data.digest()

    def settings(self, model: torch.nn.Module) -> dict[str, Any]:
        """The data, the tokenization, the loss and the model (what is trained), by flag."""
        cfg = self.cfg
        return {
            "--model": cfg.model,
            "--tokenizer": str(tokenizer_source(cfg)),
            "--train-size": cfg.train_size,
            "--max-length": cfg.max_length,
            "--loss-reduction": cfg.loss_reduction,
            "--freeze-norms": cfg.freeze_norms,
            "--lora": [cfg.lora, cfg.lora_r, cfg.lora_alpha, cfg.lora_targets],
            "model config": model_config_digest(model),
        }

    def save(self, model: torch.nn.Module, folder: Path) -> None:
        """The model (LoRA adapters merged into the base weights: a plain causal LM that
        ``AutoModelForCausalLM`` loads) and its tokenizer, atomically. Merging is in place: the
        run's last act."""
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        save_model(model, self.tokenizer, folder)


def _check_rules(model: torch.nn.Module, cfg: LmConfig) -> None:
    """Raise ValueError, before the engine's own refusal, naming the layers the native engine
    cannot privatise and the flags that leave them out of training."""
    missing = trainable_without_rule(model)
    if not missing:
        return
    hint = "--freeze-norms (train the rest), " if all(is_norm(m) for _, m in missing) else ""
    named = ", ".join(f"{name} ({type(module).__name__})" for name, module in missing[:3])
    raise ValueError(
        f"--model {cfg.model}: DP needs a layer rule for every trained layer, and there is none "
        f"for {named}{' ...' if len(missing) > 3 else ''}: train with {hint}--lora (adapters "
        "on a frozen base), or --no-dp"
    )


def train(cfg: LmConfig) -> dict:
    """Run one ``rmt-lm train``; return (and write to ``cfg.output``) the JSON log
    (``rmt_kernels.training.loop.train``)."""
    return loop.train(cfg, LmFineTuning())
