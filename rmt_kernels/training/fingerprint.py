"""What a result depends on: the versions of the libraries (in every log), and, for a resume,
the run's settings and a fingerprint of its data and computation.

A resume replays the steps its checkpoint lost for free only when it would compute the same
steps: the same tokenized data and the same settings (``rmt_kernels/dp/checkpoint.py``).
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from typing import TYPE_CHECKING

import torch

from rmt_kernels.glue.data import Encoded
from rmt_kernels.glue.model import unwrap

if TYPE_CHECKING:
    from rmt_kernels.glue.config import TrainConfig


def versions() -> dict[str, str | None]:
    """Versions of what a result depends on."""

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "opacus": version("opacus"),
        "datasets": version("datasets"),
        "rmt_kernels": version("rmt-kernels"),
    }


def encoded_digest(data: Encoded) -> str:
    """SHA-256 of a tokenized split: what the model is fed (text, subset, tokenizer, length)."""
    digest = hashlib.sha256()
    for rows in (data.input_ids, data.token_type_ids or []):
        digest.update(json.dumps([list(row) for row in rows]).encode())
    digest.update(f"pad:{data.pad_token_id}".encode())
    digest.update(f"{data.labels.dtype}".encode())
    digest.update(data.labels.contiguous().numpy().tobytes())
    return digest.hexdigest()


def run_settings(cfg: TrainConfig, model, physical: int, device: torch.device) -> dict:
    """What the computation of a step depends on besides the data and the privacy settings
    (those the checkpoint checks itself), by flag: a resume whose settings differ cannot replay
    the lost steps for free. Public values only (no data, no seed): stored in the checkpoint."""
    config = json.loads(unwrap(model).config.to_json_string())
    config.pop("_name_or_path", None)  # where it was read from, not what it computes
    return {
        "--task": cfg.task,
        "--max-length": cfg.max_length,
        "--train-size": cfg.train_size,
        "--seed": cfg.seed,
        "--pooling": cfg.pooling,
        "--freeze-embeddings": cfg.freeze_embeddings,
        "--physical-batch-size": physical,
        "--optimizer": cfg.optimizer,
        "--lr": cfg.lr,
        "--weight-decay": cfg.weight_decay,
        "--device": device.type,
        "model config": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
        # Plain strings: torch's version is a str subclass torch.load(weights_only) refuses.
        "versions": {k: str(v) for k, v in versions().items() if k in ("torch", "transformers")},
    }


def data_fingerprint(train_data: Encoded, settings: dict) -> str:
    """Names the data, its preprocessing and the computation for the checkpoint's replay rule;
    kept out of the checkpoint itself (rmt_kernels/dp/checkpoint.py: a hash of the data)."""
    return hashlib.sha256(
        json.dumps([encoded_digest(train_data), settings], sort_keys=True).encode()
    ).hexdigest()
