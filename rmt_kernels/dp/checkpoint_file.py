"""The file format of a checkpoint and of its data sidecar, and the error that refuses one.

A file is ``MAGIC``, the format version (uint32), the payload's length (uint64) and its SHA-256,
then the payload: a ``torch.save`` of plain values and tensors, read back with
``weights_only=True`` (no code runs at load). A short, flipped, padded or foreign file is refused,
naming it. So is a file of another format version: a version describes the payload's layout
(rmt_kernels/dp/checkpoint.py says what version 2 holds), and the reader knows exactly one, so
no branch of the resume code handles a layout of the past. Older files are not converted: they
resume with the version of rmt_kernels that wrote them.

Versions: 1, read with fallbacks for files written before the privacy ledger was hash-chained
(no ledger SHA-256) and before post-processors kept state; 2, the same payload with every field
required and a chained ledger (a ledger line without its chain field is refused too).
"""

from __future__ import annotations

import hashlib
import io
import struct
from pathlib import Path
from typing import Any

import torch

__all__ = ["FORMAT_VERSION", "MAGIC", "CheckpointError", "read_checkpoint_file", "seal"]

FORMAT_VERSION = 2
MAGIC = b"RMTDPCK\n"
# magic, format version, payload length, payload SHA-256
_HEADER = struct.Struct("<8sIQ32s")


class CheckpointError(ValueError):
    """A checkpoint that must not be loaded: corrupt, truncated, of another format version, of
    another model or run, or whose privacy ledger cannot establish the privacy spent."""


def seal(payload: bytes) -> bytes:
    """``payload`` as a file of this format: the header (this version, the length, the
    SHA-256), then the payload."""
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), hashlib.sha256(payload).digest())
    return header + payload


def read_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """The payload of the file at ``path``, verified against its header and unpickled with
    ``weights_only=True``.

    Raises:
        CheckpointError: the file is missing, truncated or padded, not of this format, of
            another format version (the message names both), or corrupt (SHA-256 mismatch).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    if len(data) < _HEADER.size:
        raise CheckpointError(f"checkpoint {path} is truncated ({len(data)} bytes)")
    magic, version, length, digest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CheckpointError(f"{path} is not an rmt_kernels checkpoint")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version}; this version of rmt_kernels reads "
            f"format version {FORMAT_VERSION} only (an older file is not converted: resume it "
            "with the version that wrote it, or start a new run)"
        )
    payload = data[_HEADER.size :]
    if len(payload) != length:
        raise CheckpointError(
            f"checkpoint {path} is truncated or padded: {len(payload)} payload bytes, the "
            f"header says {length}"
        )
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint {path} is corrupt (SHA-256 mismatch)")
    return torch.load(io.BytesIO(payload), weights_only=True)
