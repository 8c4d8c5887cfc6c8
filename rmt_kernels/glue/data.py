"""GLUE data: a local GLUE folder (or the hub) -> a ``datasets.Dataset`` -> padded token batches.

Every split becomes a ``datasets.Dataset`` with columns ``text_a`` (``text_b`` for sentence pairs)
and ``label`` (class index, or a float score for STS-B), whichever the source.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from rmt_kernels.glue.tasks import Task

SPLITS = ("train", "validation")
# The hub's GLUE (the legacy id "glue" redirects here).
HUB_DATASET = "nyu-mll/glue"
# The hub's ``glue`` names MNLI's matched dev split differently.
HUB_SPLITS = {("mnli", "validation"): "validation_matched"}


def _read_tsv(path: Path, task: Task) -> list[dict[str, str]]:
    """Rows of a GLUE TSV file as dicts keyed by column name.

    QUOTE_NONE because sentences contain unbalanced quotes; ``utf-8-sig`` strips MRPC's BOM,
    which would otherwise glue itself to the first column's name.
    """
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = list(task.columns) if task.columns is not None else next(reader, None)
        if header is None:
            raise ValueError(f"{path} is empty")
        rows = []
        for line, row in enumerate(reader, start=1 if task.columns is not None else 2):
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(
                    f"{path}:{line}: {len(row)} tab-separated fields, expected {len(header)} "
                    f"({', '.join(header)})"
                )
            rows.append(dict(zip(header, row, strict=True)))
    needed = (*task.text_columns, task.label_column)
    missing = [c for c in needed if c not in header]
    if missing:
        raise ValueError(f"{path}: no column(s) {missing}; its columns are {header}")
    return rows


def _label(task: Task, value: str, where: str) -> float | int:
    if task.is_regression:
        return float(value)
    try:
        return task.labels.index(value)
    except ValueError:
        raise ValueError(f"{where}: label {value!r} is not one of {list(task.labels)}") from None


def load_local_split(task: Task, split: str, data_dir: str | Path):
    """One split of ``task`` from a GLUE folder laid out as GLUE ships it.

    Raises:
        ValueError: the folder, the task's folder or the split's file is missing (the message
            names the path), or a row is malformed.
    """
    import datasets

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"GLUE data folder {data_dir} does not exist")
    path = data_dir / task.folder / task.files[split]
    if not path.is_file():
        raise ValueError(f"{task.name}: the {split} split is not available: {path} does not exist")
    rows = _read_tsv(path, task)
    columns = {"text_a": [r[task.text_columns[0]] for r in rows]}
    if len(task.text_columns) == 2:
        columns["text_b"] = [r[task.text_columns[1]] for r in rows]
    columns["label"] = [
        _label(task, r[task.label_column], f"{path}:{i + 1}") for i, r in enumerate(rows)
    ]
    return datasets.Dataset.from_dict(columns)


def load_hub_split(task: Task, split: str):
    """One split of ``task`` from the Hugging Face hub's ``glue`` dataset.

    Raises:
        ValueError: the hub could not be reached or has no such split; the message says to pass
            ``--data-dir``.
    """
    import datasets

    hub_split = HUB_SPLITS.get((task.name, split), split)
    try:
        ds = datasets.load_dataset(HUB_DATASET, task.name, split=hub_split)
    except Exception as err:  # offline, no such dataset, ... : all mean "use a local folder"
        raise ValueError(
            f"could not load GLUE task {task.name!r} ({hub_split}) from the hub's {HUB_DATASET} "
            f"({type(err).__name__}: {str(err)[:200]}); pass --data-dir with a local GLUE folder"
        ) from err
    texts = [c for c in ds.column_names if c not in ("label", "idx")]
    ds = ds.rename_columns(dict(zip(texts, ("text_a", "text_b"), strict=False)))
    return ds.select_columns([c for c in ("text_a", "text_b", "label") if c in ds.column_names])


def load_split(task: Task, split: str, data_dir: str | Path | None):
    """``load_local_split`` when ``data_dir`` is given, else ``load_hub_split``."""
    if data_dir is None:
        return load_hub_split(task, split)
    return load_local_split(task, split, data_dir)


@dataclass
class Encoded:
    """A tokenized split, kept as Python lists so a batch is padded only to its own longest."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: torch.Tensor
    pad_token_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def digest(self) -> str:
        """SHA-256 of the split as the model is fed it (text, subset, tokenizer, length): the
        data a resume's fingerprint names (``rmt_kernels.training.fingerprint``)."""
        digest = hashlib.sha256()
        for rows in (self.input_ids, self.token_type_ids or []):
            digest.update(json.dumps([list(row) for row in rows]).encode())
        digest.update(f"pad:{self.pad_token_id}".encode())
        digest.update(f"{self.labels.dtype}".encode())
        digest.update(self.labels.contiguous().numpy().tobytes())
        return digest.hexdigest()

    def by_length(self, indices: torch.Tensor | list[int]) -> list[int]:
        """``indices`` ordered by sequence length (stable), so that consecutive physical batches
        pad to similar lengths. SST-2's training sentences are 13 tokens on average but up to
        60: random physical batches of 128 pad to ~50 and waste most of the compute."""
        idx = [int(i) for i in indices]
        return sorted(idx, key=lambda i: len(self.input_ids[i]))

    def batch(self, indices: torch.Tensor | list[int]) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids`` (first: the DP engine reads the batch size from the first
        tensor argument), ``attention_mask``, ``token_type_ids`` when the model uses them, and
        ``labels``."""
        idx = [int(i) for i in indices]
        length = max((len(self.input_ids[i]) for i in idx), default=1)
        ids = torch.full((len(idx), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), length), dtype=torch.long)
        types = torch.zeros((len(idx), length), dtype=torch.long)
        for row, i in enumerate(idx):
            seq = self.input_ids[i]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            if self.token_type_ids is not None:
                types[row, : len(seq)] = torch.tensor(self.token_type_ids[i])
        out = {"input_ids": ids, "attention_mask": mask}
        if self.token_type_ids is not None:
            out["token_type_ids"] = types
        out["labels"] = self.labels[idx]
        return out


def encode(dataset, tokenizer, max_length: int, progress: bool = True) -> Encoded:
    """Tokenize a split (``datasets.map``, batched) without padding; truncate to ``max_length``."""
    import datasets

    pairs = "text_b" in dataset.column_names

    def tokenize(batch: dict) -> dict:
        texts = (batch["text_a"], batch["text_b"]) if pairs else (batch["text_a"],)
        return tokenizer(*texts, truncation=True, max_length=max_length)

    shown = datasets.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        encoded = dataset.map(tokenize, batched=True, desc="tokenize")
    finally:
        if shown and not progress:
            datasets.enable_progress_bars()
    labels = encoded["label"]
    dtype = torch.float32 if labels and isinstance(labels[0], float) else torch.long
    pad = tokenizer.pad_token_id
    if pad is None:
        raise ValueError("the tokenizer has no padding token")
    return Encoded(
        input_ids=encoded["input_ids"],
        token_type_ids=encoded["token_type_ids"]
        if "token_type_ids" in encoded.column_names
        else None,
        labels=torch.tensor(labels, dtype=dtype),
        pad_token_id=pad,
    )
