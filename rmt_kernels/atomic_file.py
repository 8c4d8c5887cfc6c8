"""Write files so that a crash or a full disk leaves each one whole: the old content or the new,
never half of either.

Each file is written to a temporary sibling (same folder, so the rename cannot cross file
systems), flushed and ``fsync``-ed, then renamed over its target with ``os.replace`` and the
folder ``fsync``-ed: without the folder's sync the rename itself may be lost in a power cut, and
without the file's sync the rename may reach the disk before the data does (an empty file under
the new name). The one writer of the checkpoints (rmt_kernels/dp/checkpoint.py), the privacy
ledger's marker (rmt_kernels/dp/ledger.py) and the training log (rmt_kernels/training/outputs.py);
:func:`sync_folder_tree` makes a folder written by another library (``save_pretrained``) durable
before it is renamed into place the same way.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["sync_folder", "sync_folder_tree", "write_atomically"]


def _temporary_sibling(path: Path) -> Path:
    """The temporary name of ``path``'s new content: hidden, in the same folder, per process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def sync_folder(folder: Path) -> None:
    """Make the renames in ``folder`` durable (a folder's entries are data of the folder)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_folder_tree(folder: str | os.PathLike) -> None:
    """``fsync`` every file below ``folder``, every folder below it and ``folder`` itself (then the
    caller renames it into place and syncs its parent): the folder counterpart of a synced
    temporary file, for content written by code that does not sync (``save_pretrained``).

    Raises:
        OSError: a file or folder cannot be opened or synced.
    """
    root = Path(folder)
    for here, _, names in os.walk(root, topdown=False):
        for name in names:
            fd = os.open(Path(here) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        sync_folder(Path(here))


def write_atomically(*files: tuple[str | os.PathLike, bytes]) -> None:
    """Replace each ``(path, data)`` file's content with ``data``, atomically and durably.

    Every file is written and synced under its temporary name before any is renamed, so a write
    that fails (a full disk) leaves all the targets as they were; the renames then happen in the
    order given (a caller that writes a pair puts first the file whose lone presence is
    harmless). Missing parent folders are created. No temporary file is left behind, whatever
    fails.

    Args:
        files: ``(path, data)`` pairs: the target file and its new content.

    Raises:
        TypeError: a pair is not ``(path, bytes)``.
        OSError: a file or folder cannot be written (the targets not yet renamed are intact).
    """
    targets = []
    for item in files:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], bytes)):
            raise TypeError(f"write_atomically: expected (path, bytes) pairs, got {item!r:.80}")
        targets.append((Path(item[0]), item[1]))
    written: list[tuple[Path, Path]] = []
    try:
        for path, data in targets:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = _temporary_sibling(path)
            written.append((tmp, path))
            _write_synced(tmp, data)
        for tmp, path in written:
            os.replace(tmp, path)
            sync_folder(path.parent)
    finally:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
