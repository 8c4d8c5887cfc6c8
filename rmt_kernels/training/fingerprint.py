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

if TYPE_CHECKING:
    from rmt_kernels.training.config import TrainConfig


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


def run_settings(cfg: TrainConfig, application: dict, physical: int, device: torch.device) -> dict:
    """What the computation of a step depends on besides the data and the privacy settings
    (those the checkpoint checks itself), by flag: the application's own (``application``:
    ``TrainingTask.settings``, e.g. its task, model and tokenization) and the shared ones. A
    resume whose settings differ cannot replay the lost steps for free. Public values only (no
    data, no seed): stored in the checkpoint."""
    return {
        **application,
        "--seed": cfg.seed,
        "--physical-batch-size": physical,
        "--optimizer": cfg.optimizer,
        "--lr": cfg.lr,
        "--weight-decay": cfg.weight_decay,
        "--device": device.type,
        # Plain strings: torch's version is a str subclass torch.load(weights_only) refuses.
        "versions": {k: str(v) for k, v in versions().items() if k in ("torch", "transformers")},
    }


def model_config_digest(model) -> str:
    """SHA-256 of a Hugging Face model's configuration (where it was read from left out): what
    it computes, for :func:`run_settings`."""
    config = json.loads(model.config.to_json_string())
    config.pop("_name_or_path", None)  # where it was read from, not what it computes
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def data_fingerprint(data_digest: str, settings: dict) -> str:
    """Names the data (``data_digest``: ``TrainingTask.digest`` of the training split), its
    preprocessing and the computation for the checkpoint's replay rule; kept out of the
    checkpoint itself (rmt_kernels/dp/checkpoint.py: a hash of the data)."""
    return hashlib.sha256(json.dumps([data_digest, settings], sort_keys=True).encode()).hexdigest()
