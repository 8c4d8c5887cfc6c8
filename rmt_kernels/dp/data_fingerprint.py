"""The fingerprint of a run's training data, kept beside its checkpoint: a resume replays the
steps a crash lost for free only on the same data (rmt_kernels/dp/checkpoint.py), since releasing
the same noise on other data would publish the noise-free difference of the two steps.

The library hashes what it can see (a ``TensorDataset``, a ``Subset`` of one); for anything else
the caller names the data, its preprocessing and its training loop with a string. A hash of the
whole training set is as private as the data (it tests guesses of one example given the others),
so it is never written into the checkpoint itself.
"""

from __future__ import annotations

import hashlib
import json

import torch

__all__ = ["data_fingerprint_of", "dataset_fingerprint"]


def dataset_fingerprint(dataset) -> str | None:
    """SHA-256 (hex) of what a dataset holds, or None when it cannot be verified.

    Covered: ``torch.utils.data.TensorDataset`` (every tensor's dtype, shape and bytes) and a
    ``Subset`` of a covered dataset (its indices too). Anything else (a dataset that reads files,
    tokenizes or transforms on the fly) returns None: pass ``data_fingerprint`` to
    ``rmt_kernels.dp.save_checkpoint`` / ``load_checkpoint`` for it.
    """
    from torch.utils.data import Subset, TensorDataset

    digest = hashlib.sha256()
    if isinstance(dataset, Subset):
        inner = dataset_fingerprint(dataset.dataset)
        if inner is None:
            return None
        digest.update(f"subset:{inner}:".encode())
        digest.update(json.dumps([int(i) for i in dataset.indices]).encode())
        return digest.hexdigest()
    if not isinstance(dataset, TensorDataset):
        return None
    digest.update(b"tensors:")
    for t in dataset.tensors:
        t = t.detach().cpu().contiguous()
        digest.update(f"{t.dtype}:{list(t.shape)}:".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def data_fingerprint_of(data_loader, given: str | None) -> dict | None:
    """What names the training data of a checkpointed run: ``{"given": ..., "dataset": ...}``
    (the caller's ``data_fingerprint`` string, :func:`dataset_fingerprint` of the loader's
    dataset), or None when neither exists and nothing can be verified.

    Raises:
        TypeError: ``given`` is neither None nor a non-empty str.
    """
    if given is not None and not (isinstance(given, str) and given):
        raise TypeError(f"data_fingerprint must be a non-empty str or None, got {given!r}")
    dataset = None if data_loader is None else dataset_fingerprint(data_loader.dataset)
    if given is None and dataset is None:
        return None
    return {"given": given, "dataset": dataset}
