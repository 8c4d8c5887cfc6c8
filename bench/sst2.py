"""SST-2 sentences for the benchmarks: real ones from a GLUE folder when given, otherwise
synthetic token ids with SST-2's length distribution (embedded, so ``make bench`` needs no data)."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

# Quantiles of SST-2 train sentence lengths in RoBERTa tokens (with <s> and </s>), measured on
# the first 20,000 sentences: (cumulative probability, length).
SST2_LENGTH_QUANTILES = [
    (0.0, 4),
    (0.10, 6),
    (0.25, 7),
    (0.50, 11),
    (0.75, 19),
    (0.90, 28),
    (0.95, 34),
    (0.99, 46),
    (1.0, 67),
]
DEFAULT_GLUE_DIRS = [Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"]
DEFAULT_MODEL_DIRS = [Path(__file__).resolve().parents[2] / "shared" / "models" / "roberta-base"]


def find_dir(candidates: list[Path], must_contain: str) -> Path | None:
    """The first folder in ``candidates`` that holds ``must_contain``, or None."""
    return next((d for d in candidates if (d / must_contain).exists()), None)


def read_sst2_sentences(glue_dir: Path, count: int) -> list[str]:
    """The first ``count`` training sentences of SST-2 (QUOTE_NONE: sentences contain quotes)."""
    with open(glue_dir / "SST-2" / "train.tsv", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(rows)
        return [row[0] for _, row in zip(range(count), rows, strict=False)]


def synthetic_lengths(count: int, seed: int = 0) -> torch.Tensor:
    """Sentence lengths drawn from SST-2's distribution (inverse CDF, linear between quantiles)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(count, generator=gen, dtype=torch.float64)
    probs = torch.tensor([p for p, _ in SST2_LENGTH_QUANTILES], dtype=torch.float64)
    lens = torch.tensor([n for _, n in SST2_LENGTH_QUANTILES], dtype=torch.float64)
    i = torch.searchsorted(probs, u).clamp(1, len(probs) - 1)
    frac = (u - probs[i - 1]) / (probs[i] - probs[i - 1])
    return (lens[i - 1] + frac * (lens[i] - lens[i - 1])).round().long()


def sst2_batch(
    batch_size: int,
    max_length: int,
    *,
    vocab_size: int = 50265,
    glue_dir: Path | None = None,
    tokenizer_dir: Path | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(input_ids, attention_mask, labels, source) of one padded batch of SST-2-like sentences.

    Real sentences tokenized with the RoBERTa tokenizer when both folders are available;
    otherwise random tokens with SST-2's lengths. RoBERTa's ids: <s> = 0, <pad> = 1, </s> = 2.
    """
    glue_dir = glue_dir or find_dir(DEFAULT_GLUE_DIRS, "SST-2/train.tsv")
    tokenizer_dir = tokenizer_dir or find_dir(DEFAULT_MODEL_DIRS, "vocab.json")
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (batch_size,), generator=gen)
    if glue_dir is not None and tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        enc = tokenizer(
            read_sst2_sentences(glue_dir, batch_size),
            padding="max_length",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        return enc["input_ids"], enc["attention_mask"], labels, "SST-2 sentences"
    lengths = synthetic_lengths(batch_size, seed).clamp(max=max_length)
    ids = torch.randint(3, vocab_size, (batch_size, max_length), generator=gen)
    mask = (torch.arange(max_length)[None, :] < lengths[:, None]).long()
    ids[:, 0] = 0
    ids[torch.arange(batch_size), lengths - 1] = 2
    ids = ids.masked_fill(mask == 0, 1)
    return ids, mask, labels, "synthetic tokens, SST-2 lengths"
