"""The one atomic writer (rmt_kernels/atomic_file.py): whole files or none, synced, no temporary
file left; used by the checkpoints, the ledger's marker and rmt-glue's log."""

from __future__ import annotations

import errno
import os

import pytest

from rmt_kernels.atomic_file import write_atomically


def _synced(monkeypatch, fail_on: str | None = None) -> list[str]:
    """Record what each ``os.fsync`` syncs (a file's or a folder's path); with ``fail_on``, the
    sync of a file whose name contains it fails as a full disk would."""
    real, synced = os.fsync, []

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if fail_on is not None and fail_on in os.path.basename(name):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        synced.append(name)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def test_files_are_replaced_synced_and_their_folder_synced(tmp_path, monkeypatch):
    first, second = tmp_path / "a" / "one.bin", tmp_path / "two.bin"
    second.write_bytes(b"old")
    synced = _synced(monkeypatch)
    write_atomically((first, b"1"), (second, b"22"))
    assert (first.read_bytes(), second.read_bytes()) == (b"1", b"22")
    # Each file's data under its temporary name, then each rename through its folder.
    assert [os.path.basename(s) for s in synced] == [
        f".one.bin.tmp-{os.getpid()}",
        f".two.bin.tmp-{os.getpid()}",
        "a",
        tmp_path.name,
    ]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "one.bin", "two.bin"]


def test_a_failed_write_leaves_every_target_as_it_was(tmp_path, monkeypatch):
    first, second = tmp_path / "one.bin", tmp_path / "two.bin"
    first.write_bytes(b"old 1")
    second.write_bytes(b"old 2")
    _synced(monkeypatch, fail_on=".two.bin.tmp-")
    with pytest.raises(OSError, match="No space left"):
        write_atomically((first, b"new 1"), (second, b"new 2"))
    # The first file was written in full too, but nothing is renamed until both are on disk.
    assert (first.read_bytes(), second.read_bytes()) == (b"old 1", b"old 2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.bin", "two.bin"]


def test_not_a_path_and_bytes_pair_is_refused(tmp_path):
    with pytest.raises(TypeError, match=r"expected \(path, bytes\) pairs"):
        write_atomically((tmp_path / "x", "text"))
    with pytest.raises(TypeError, match=r"expected \(path, bytes\) pairs"):
        write_atomically(tmp_path / "x")
    assert not list(tmp_path.iterdir())


def test_the_glue_log_is_written_through_it_and_synced(tmp_path, monkeypatch):
    from rmt_kernels.training.outputs import write_json

    synced = _synced(monkeypatch)
    write_json(tmp_path / "log.json", {"epsilon": float("inf")})
    assert (tmp_path / "log.json").read_text() == '{\n  "epsilon": null\n}\n'
    assert f".log.json.tmp-{os.getpid()}" in [os.path.basename(s) for s in synced]
