"""The decoders ``rmt-lm`` trains: GPT-2 and Llama-style models from a named config (random
init: no pretrained decoder weights are obtainable offline here) or any local/hub path; their
tokenizer (GPT-2's BPE, Llama-2's SentencePiece, or the path's own); and what is trained: all
of it, all but the norms (``--freeze-norms``), or PEFT LoRA adapters on a frozen base
(``--lora``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rmt_kernels.lm.data import shared_path

if TYPE_CHECKING:
    from rmt_kernels.lm.config import LmConfig

# Named configs: (family, sizes). The tiny ones are for tests; the others have the published
# shapes (GPT-2 small/medium: 124M/355M parameters; a Llama-style ~150M stack with
# grouped-query attention).
NAMED_MODELS: dict[str, tuple[str, dict[str, int]]] = {
    "gpt2-tiny": ("gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4}),
    "gpt2-small": ("gpt2", {"n_embd": 768, "n_layer": 12, "n_head": 12}),
    "gpt2-medium": ("gpt2", {"n_embd": 1024, "n_layer": 24, "n_head": 16}),
    "llama-tiny": (
        "llama",
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
    ),
    "llama-small": (
        "llama",
        {
            "hidden_size": 768,
            "intermediate_size": 2048,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "num_key_value_heads": 4,
        },
    ),
}
# The tokenizer a named config's family uses by default, under ../shared/models.
FAMILY_TOKENIZERS = {"gpt2": ("models", "gpt2"), "llama": ("models", "llama2-tokenizer")}
# Positions a named config covers (prompt + reference + generated tokens stay below).
NAMED_POSITIONS = 1024
# --lora-targets attention: the attention projections LoRA adapts, by model type (Hu et al.
# 2021 adapt the query and value projections; GPT-2 fuses q, k and v in c_attn).
ATTENTION_TARGETS = {
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
}
LORA_TARGETS = ("attention", "all-linear")
# Files of a saved model's weights (one of them makes a folder pretrained).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def sentencepiece_tokenizer(model_file: Path):
    """A Llama tokenizer from a SentencePiece ``tokenizer.model`` (Llama-2's).

    transformers 5 builds Llama's tokenizer from a vocabulary and BPE merges; from a
    ``.model`` file it extracts them with protobuf, which is not installed here (and
    ``LlamaTokenizer(vocab_file=...)`` silently gives an empty tokenizer). The vocabulary and
    scores are read with ``sentencepiece`` itself and the merges derived from them as
    transformers' own extractor does (``generate_merges``); the result encodes E2E exactly as
    the SentencePiece model does (tests/test_lm_cli.py).

    Raises:
        ValueError: the file cannot be read as a SentencePiece model.
    """
    import sentencepiece
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    except (OSError, RuntimeError) as err:
        raise ValueError(f"--tokenizer {model_file}: not a SentencePiece model ({err})") from None
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    scores = {piece: sp.get_score(i) for piece, i in vocab.items()}
    return LlamaTokenizer(
        vocab=vocab,
        merges=generate_merges(vocab, scores),
        unk_token=sp.id_to_piece(sp.unk_id()),
        bos_token=sp.id_to_piece(sp.bos_id()),
        eos_token=sp.id_to_piece(sp.eos_id()),
    )


def load_tokenizer(path: str | Path):
    """A tokenizer from ``path``: a SentencePiece ``.model`` file (or a folder holding only
    ``tokenizer.model``), a folder with GPT-2's ``vocab.json`` + ``merges.txt`` and nothing
    else, or a saved tokenizer (folder or hub name; ``AutoTokenizer``). Its padding token is
    set to eos when it has none (padding is masked out).

    Raises:
        ValueError: nothing loadable at ``path``.
    """
    from transformers import AutoTokenizer, GPT2Tokenizer

    path = Path(path)
    saved = path.is_dir() and any(
        (path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")
    )
    try:
        if path.suffix == ".model" and path.is_file():
            tokenizer = sentencepiece_tokenizer(path)
        elif path.is_dir() and not saved and (path / "tokenizer.model").is_file():
            tokenizer = sentencepiece_tokenizer(path / "tokenizer.model")
        elif path.is_dir() and not saved and (path / "vocab.json").is_file():
            tokenizer = GPT2Tokenizer.from_pretrained(path)
        elif path.exists() and not saved:
            raise ValueError(
                f"{path} has no tokenizer (a tokenizer.json, a SentencePiece tokenizer.model, or "
                "GPT-2's vocab.json + merges.txt)"
            )
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
    except OSError as err:
        raise ValueError(f"could not load a tokenizer from {path}: {_first_line(err)}") from None
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _first_line(err: Exception) -> str:
    """An exception's message as one line (the CLI's errors are one line each)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def tokenizer_source(cfg: LmConfig) -> Path | str:
    """Where the run's tokenizer comes from: ``--tokenizer``, a named config's family's under
    ../shared/models, or the model path itself.

    Raises:
        ValueError: a named config without ``--tokenizer`` and no ../shared/models.
    """
    if cfg.tokenizer is not None:
        return cfg.tokenizer
    if cfg.model in NAMED_MODELS:
        family = NAMED_MODELS[cfg.model][0]
        found = shared_path(*FAMILY_TOKENIZERS[family])
        if found is None:
            raise ValueError(
                f"--model {cfg.model}: no {family} tokenizer at ../shared/"
                f"{'/'.join(FAMILY_TOKENIZERS[family])}; give --tokenizer"
            )
        return found
    return cfg.model


def _named_config(name: str, tokenizer):
    """The transformers config of a named model, its vocabulary the tokenizer's."""
    from transformers import GPT2Config, LlamaConfig

    family, sizes = NAMED_MODELS[name]
    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if family == "gpt2":
        # GPT-2 ties its input and output embeddings, as the released models do.
        return GPT2Config(n_positions=NAMED_POSITIONS, **sizes, **ids)
    # Llama-2 keeps them apart.
    return LlamaConfig(
        max_position_embeddings=NAMED_POSITIONS, tie_word_embeddings=False, **sizes, **ids
    )


def build_model(cfg: LmConfig, tokenizer) -> torch.nn.Module:
    """The causal LM of ``--model`` (random init for a named config or with ``--random-init``;
    the path's weights otherwise), with ``--freeze-norms`` and ``--lora`` applied.

    Raises:
        ValueError: the path has no model (or no weights without ``--random-init``), or the
            tokenizer's vocabulary is larger than the model's.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        if cfg.model in NAMED_MODELS:
            model = AutoModelForCausalLM.from_config(_named_config(cfg.model, tokenizer))
        elif cfg.random_init:
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.model))
        else:
            folder = Path(cfg.model)
            if folder.is_dir() and not any((folder / f).exists() for f in WEIGHT_FILES):
                raise ValueError(
                    f"--model {folder} has no weights ({', '.join(WEIGHT_FILES)}): add "
                    "--random-init to train its config from scratch"
                )
            model = AutoModelForCausalLM.from_pretrained(cfg.model)
    except (OSError, KeyError) as err:
        raise ValueError(
            f"--model {cfg.model}: could not load a causal LM ({_first_line(err)})"
        ) from None
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens, --model {cfg.model} a vocabulary of "
            f"{model.config.vocab_size}: give the model's own tokenizer (--tokenizer)"
        )
    if cfg.freeze_norms:
        for module in model.modules():
            if is_norm(module):
                module.requires_grad_(False)
    if cfg.lora:
        model = add_lora(model, cfg)
    return model


def is_norm(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer (LayerNorm, Llama's and Qwen's RMSNorm, ...),
    matched by class name so that every family's own class counts."""
    return "norm" in type(module).__name__.lower()


def add_lora(model: torch.nn.Module, cfg: LmConfig) -> torch.nn.Module:
    """``model`` with PEFT LoRA adapters (``--lora-r``, ``--lora-alpha``, ``--lora-targets``),
    the base frozen: only the adapters are trained (and privatised).

    Raises:
        ValueError: ``--lora-targets attention`` for a model type whose attention projections
            are not known here.
    """
    from peft import LoraConfig, get_peft_model

    model_type = model.config.model_type
    if cfg.lora_targets == "attention":
        if model_type not in ATTENTION_TARGETS:
            raise ValueError(
                f"--lora-targets attention: the attention projections of {model_type!r} models "
                "are not known here; give --lora-targets all-linear"
            )
        targets: Any = ATTENTION_TARGETS[model_type]
    else:
        targets = "all-linear"
    config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        target_modules=targets,
        lora_dropout=0.0,
        bias="none",
        # GPT-2's Conv1D stores its weight transposed (in x out).
        fan_in_fan_out=model_type == "gpt2",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def trainable_without_rule(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The (name, module) of each module with trainable parameters that the native engine has
    no layer rule for (``make_private`` refuses them), looked up as the engine does."""
    from rmt_kernels.rules.registry import get_layer_rule

    missing = []
    for name, module in model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        try:
            get_layer_rule(module)
        except TypeError:
            missing.append((name, module))
    return missing
