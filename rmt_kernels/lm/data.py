"""E2E data (table-to-text, Novikova et al. 2017): a folder of CSV files -> ``datasets.Dataset``
rows ``(mr, ref)`` -> token sequences "meaning representation + separator + reference + eos",
whose loss counts the reference tokens only.

Dev and test list one row per (mr, reference): several rows share a meaning representation. A
model is evaluated once per unique mr (:func:`group_references`), against all of its references.
The data are read where they are (``--data-dir``, by default ``../shared/data/e2e``); nothing is
copied into the repository.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from rmt_kernels.training.subset import seeded_indices

#: The split files of the E2E release (the test file with its references).
E2E_FILES = {"train": "trainset.csv", "dev": "devset.csv", "test": "testset_w_refs.csv"}
#: Between the meaning representation and the reference, in the prompt a model continues.
SEPARATOR = " ||"
#: Labels that count for nothing in the loss (the prompt, the padding).
IGNORE_INDEX = -100
# ../shared beside the repository (a clone's layout on CI), or beside the working directory.
REPOSITORY = Path(__file__).resolve().parents[2]


def shared_path(*parts: str) -> Path | None:
    """``../shared/<parts>`` beside the working directory or beside the repository, whichever
    exists first; None when neither does."""
    for root in (Path.cwd().parent / "shared", REPOSITORY.parent / "shared"):
        path = root.joinpath(*parts)
        if path.exists():
            return path
    return None


def resolve_data_dir(data_dir: str | None) -> Path:
    """The E2E folder: ``--data-dir``, or ``../shared/data/e2e`` when it exists.

    Raises:
        ValueError: the folder given does not exist, or none was given and there is no default.
    """
    if data_dir is not None:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise ValueError(f"--data-dir {folder}: the E2E data folder does not exist")
        return folder
    folder = shared_path("data", "e2e")
    if folder is None:
        raise ValueError(
            "no E2E folder at ../shared/data/e2e: give --data-dir (a folder with "
            f"{', '.join(E2E_FILES.values())})"
        )
    return folder


def load_split(data_dir: str | Path, split: str):
    """One split of E2E as a ``datasets.Dataset`` with columns ``mr`` and ``ref``, in file order.

    Raises:
        ValueError: an unknown split, a missing file, a file without the ``mr`` and ``ref``
            columns, or a row with an empty field (the message names the file and line).
    """
    import datasets

    if split not in E2E_FILES:
        raise ValueError(f"unknown E2E split {split!r}; expected one of {', '.join(E2E_FILES)}")
    path = Path(data_dir) / E2E_FILES[split]
    if not path.is_file():
        raise ValueError(f"E2E {split} split: {path} does not exist")
    mrs, refs = [], []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("mr", "ref") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: no column(s) {missing}; its columns are {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            mr, ref = (row["mr"] or "").strip(), (row["ref"] or "").strip()
            if not mr or not ref:
                raise ValueError(f"{path}:{line}: an empty mr or ref")
            mrs.append(mr)
            refs.append(ref)
    return datasets.Dataset.from_dict({"mr": mrs, "ref": refs})


def group_references(mrs: list[str], refs: list[str]) -> list[tuple[str, list[str]]]:
    """``(mr, [its references])`` for each unique mr, in order of first appearance (dev and test
    list one row per reference)."""
    groups: dict[str, list[str]] = {}
    for mr, ref in zip(mrs, refs, strict=True):
        groups.setdefault(mr, []).append(ref)
    return list(groups.items())


def select_groups(
    groups: list[tuple[str, list[str]]], size: int | None, seed: int
) -> list[tuple[str, list[str]]]:
    """``size`` of the meaning representations (each with all of its references) drawn by
    ``seed``, in their original order; all of them when ``size`` is None.

    Raises:
        ValueError: ``size`` above the split's number of unique meaning representations.
    """
    if size is None or size == len(groups):
        return groups
    if not 1 <= size <= len(groups):
        raise ValueError(f"--eval-size {size}: the split has {len(groups)} meaning representations")
    return [groups[i] for i in seeded_indices(len(groups), size, seed)]


@dataclass
class Encoded:
    """Token sequences "prompt + reference + eos" and where each prompt ends, kept as lists so
    a batch pads only to its own longest."""

    input_ids: list[list[int]]
    prompt_lengths: list[int]
    pad_token_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def digest(self) -> str:
        """SHA-256 of the sequences as the model is fed them (text, subset, tokenizer, length):
        what a resume's fingerprint names (``rmt_kernels.training.fingerprint``)."""
        digest = hashlib.sha256()
        digest.update(json.dumps([self.input_ids, self.prompt_lengths]).encode())
        digest.update(f"pad:{self.pad_token_id}".encode())
        return digest.hexdigest()

    def by_length(self, indices: torch.Tensor | list[int]) -> list[int]:
        """``indices`` ordered by sequence length (stable): physical batches pad less."""
        return sorted((int(i) for i in indices), key=lambda i: len(self.input_ids[i]))

    def batch(self, indices: torch.Tensor | list[int]) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids`` (first: the DP engine reads the batch size from the first
        tensor argument), ``attention_mask``, and ``labels``: the tokens of the reference and
        the eos, ``IGNORE_INDEX`` on the prompt and the padding."""
        idx = [int(i) for i in indices]
        length = max((len(self.input_ids[i]) for i in idx), default=1)
        ids = torch.full((len(idx), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), length), dtype=torch.long)
        labels = torch.full((len(idx), length), IGNORE_INDEX, dtype=torch.long)
        for row, i in enumerate(idx):
            seq, start = torch.tensor(self.input_ids[i]), self.prompt_lengths[i]
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
            labels[row, start : len(seq)] = seq[start:]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class Tokens:
    """Text to token ids the way training and generation agree on: a prompt is the mr and the
    separator (after the tokenizer's bos, when it has one distinct from eos); a target is the
    reference's tokens as they continue the prompt, then eos.

    Args:
        tokenizer: a Hugging Face tokenizer with an eos token.

    Raises:
        ValueError: the tokenizer has no eos token.
    """

    def __init__(self, tokenizer) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has no eos token")
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        bos = tokenizer.bos_token_id
        self.prefix = [bos] if bos is not None and bos != self.eos else []
        # Padding is masked out (attention and labels): any id does; eos when there is none.
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos

    def ids(self, text: str) -> list[int]:
        """``text``'s token ids, without special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt(self, mr: str) -> list[int]:
        """The prompt a model continues with a reference."""
        return self.prefix + self.ids(mr + SEPARATOR)

    def example(self, mr: str, ref: str, max_length: int) -> tuple[list[int], int]:
        """(prompt + reference + eos truncated to ``max_length`` tokens, the prompt's length).

        The reference is tokenized after the prompt (so its first word is tokenized as it
        follows the separator, as generation sees it), or alone if the tokenizer merges across
        the separator.

        Raises:
            ValueError: the prompt leaves no room for a reference token in ``max_length``.
        """
        prompt = self.prompt(mr)
        joined = self.prefix + self.ids(f"{mr}{SEPARATOR} {ref}")
        target = joined[len(prompt) :] if joined[: len(prompt)] == prompt else self.ids(ref)
        if len(prompt) >= max_length:
            raise ValueError(
                f"--max-length {max_length}: a prompt is {len(prompt)} tokens, leaving no room "
                "for its reference"
            )
        return (prompt + target + [self.eos])[:max_length], len(prompt)


def encode_pairs(mrs: list[str], refs: list[str], tokens: Tokens, max_length: int) -> Encoded:
    """The training (or teacher-forced evaluation) sequences of the pairs ``(mrs, refs)``."""
    input_ids, prompt_lengths = [], []
    for mr, ref in zip(mrs, refs, strict=True):
        ids, start = tokens.example(mr, ref, max_length)
        input_ids.append(ids)
        prompt_lengths.append(start)
    return Encoded(input_ids=input_ids, prompt_lengths=prompt_lengths, pad_token_id=tokens.pad)


@dataclass
class EvalSet:
    """An evaluation split: its unique meaning representations with all their references (for
    generation and its metrics) and every (mr, ref) pair encoded (for ``eval_loss``)."""

    groups: list[tuple[str, list[str]]]
    prompts: list[list[int]]
    pairs: Encoded

    def __len__(self) -> int:
        return len(self.groups)


def eval_set(groups: list[tuple[str, list[str]]], tokens: Tokens, max_length: int) -> EvalSet:
    """The :class:`EvalSet` of ``groups`` (:func:`group_references`, :func:`select_groups`)."""
    mrs = [mr for mr, refs in groups for _ in refs]
    refs = [ref for _, group in groups for ref in group]
    return EvalSet(
        groups=groups,
        prompts=[tokens.prompt(mr) for mr, _ in groups],
        pairs=encode_pairs(mrs, refs, tokens, max_length),
    )
