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


class _Saves:
    """A stand-in for a model or tokenizer: ``save_pretrained`` writes a file (and a sub-folder)
    without syncing anything, as transformers does."""

    def __init__(self, name: str) -> None:
        self.name = name

    def save_pretrained(self, folder) -> None:
        os.makedirs(os.path.join(folder, "sub"), exist_ok=True)
        with open(os.path.join(folder, self.name), "w") as f:
            f.write(self.name)
        with open(os.path.join(folder, "sub", self.name), "w") as f:
            f.write(self.name)


def test_a_saved_model_is_synced_before_and_after_its_rename(tmp_path, monkeypatch):
    from rmt_kernels.training.outputs import save_model

    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.bin").write_text("old")
    synced = _synced(monkeypatch)
    save_model(_Saves("model.bin"), _Saves("tokenizer.json"), target)
    assert sorted(p.name for p in target.rglob("*")) == [
        "model.bin", "model.bin", "sub", "tokenizer.json", "tokenizer.json"
    ]  # fmt: skip
    # Every file and folder was synced under its temporary name (before the rename), then the
    # parent (after it): the old code synced nothing.
    tmp = f"{tmp_path}/.model.tmp-{os.getpid()}"
    for path in ("model.bin", "tokenizer.json", "sub/model.bin", "sub/tokenizer.json", "sub", ""):
        assert os.path.join(tmp, path).rstrip("/") in synced, path
    assert str(tmp_path) == synced[-1]
    assert not list(tmp_path.glob(".model.*"))
