"""What a training command writes: checked writable before training, then written atomically (a
temporary sibling renamed into place, so a crash leaves the old file or the new): the JSON log
as strict JSON, the fine-tuned model."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from rmt_kernels.atomic_file import sync_folder, sync_folder_tree, write_atomically

if TYPE_CHECKING:
    from rmt_kernels.training.config import TrainConfig


def _check_writable_folder(folder: Path, flag: str, what: Path) -> None:
    """Create ``folder`` if needed and write a probe file in it (ValueError naming ``flag``)."""
    probe = folder / f".rmt-write-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as err:
        raise ValueError(
            f"{flag} {what}: cannot write in {folder} ({err.strerror or err})"
        ) from None


def check_outputs(cfg: TrainConfig) -> None:
    """Raise ValueError now, before any training, if an output of the run cannot be written."""
    if cfg.output:
        out = Path(cfg.output)
        if out.is_dir():
            raise ValueError(f"--output {out} is a folder; give a file name")
        _check_writable_folder(out.parent, "--output", out)
    if cfg.save:
        save = Path(cfg.save)
        if save.exists() and not save.is_dir():
            raise ValueError(f"--save {save} is a file; give a folder")
        _check_writable_folder(save.parent, "--save", save)
    if cfg.checkpoint_dir:
        folder = Path(cfg.checkpoint_dir)
        _check_writable_folder(folder, "--checkpoint-dir", folder)
        _check_no_collision(cfg, folder)


def _check_no_collision(cfg: TrainConfig, folder: Path) -> None:
    """Raise ValueError if ``--output`` or ``--save`` would overwrite the checkpoint, its privacy
    ledger or its data sidecar (the log's rename would replace the checkpoint, or destroy the
    ledger and with it the record of the privacy spent; ``--save`` renames a whole folder)."""
    from rmt_kernels.dp.checkpoint import data_path
    from rmt_kernels.dp.ledger import ledger_path, marker_path

    checkpoint = folder / "checkpoint.pt"
    ledger = ledger_path(checkpoint)
    kept = [checkpoint, ledger, marker_path(ledger), data_path(checkpoint)]
    kept = [p.resolve() for p in kept] + [folder.resolve()]
    if cfg.output:
        out = Path(cfg.output).resolve()
        if out in kept:
            raise ValueError(
                f"--output {cfg.output} is a file of --checkpoint-dir {cfg.checkpoint_dir} (the "
                "checkpoint, its privacy ledger or data sidecar): give another file"
            )
    if cfg.save:
        save = Path(cfg.save).resolve()
        # save_model replaces the whole folder: it must not hold the checkpoint's files.
        if save in kept or save in folder.resolve().parents:
            raise ValueError(
                f"--save {cfg.save} would replace --checkpoint-dir {cfg.checkpoint_dir} (the "
                "checkpoint and its privacy ledger): give a folder outside it"
            )


def json_safe(value):
    """``value`` with every non-finite float replaced by None (strict JSON has no Infinity/NaN:
    an infinite epsilon, a diverged loss)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: str | Path, value, flag: str = "--output") -> None:
    """Write ``value`` as strict JSON (non-finite floats as null) to ``path``, atomically: a
    synced temporary file in the same folder, then a rename (rmt_kernels/atomic_file.py), so a
    crash leaves the old file or the new.

    Raises:
        ValueError: the file cannot be written (naming ``flag``).
    """
    text = json.dumps(json_safe(value), indent=2, allow_nan=False) + "\n"
    try:
        write_atomically((path, text.encode()))
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot write it ({err.strerror or err})") from None


def save_model(model, tokenizer, folder: Path) -> None:
    """``save_pretrained`` into a sibling temporary folder, then renamed into place, so a crash
    never leaves half a model in ``--save``.

    Raises:
        ValueError: the folder cannot be written (naming ``--save``).
    """
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # Durable before the rename, and the rename durable after it (as write_atomically does
        # for a file): a power cut never leaves an empty or partial model under --save.
        sync_folder_tree(tmp)
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        sync_folder(folder.parent)
    except OSError as err:
        raise ValueError(f"--save {folder}: cannot write it ({err.strerror or err})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
