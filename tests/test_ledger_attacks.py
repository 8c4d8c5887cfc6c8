"""The privacy ledger and the checkpoint's files against a hostile or unlucky operator: two
processes on one ledger, outputs pointed at the checkpoint's files, a full disk."""

# ruff: noqa: F811 (the tiny fixture, imported from tests/test_glue_cli.py, named as arguments)
from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rmt_kernels.dp import CheckpointError, attach_ledger, checkpoint_extra, load_checkpoint
from rmt_kernels.dp.checkpoint import _read, data_path, ledger_path
from rmt_kernels.glue.config import TrainConfig
from rmt_kernels.glue.outputs import check_outputs
from tests import dp_workers
from tests.dp_models import tiny_model
from tests.test_dp_distributed import ROOT, worker_env
from tests.test_glue_cli import run, tiny  # noqa: F401


def _hold_lock(path):
    """A second process holding the ledger lock of ``path`` (as a still-running old job)."""
    code = textwrap.dedent(
        f"""
        import sys, time
        from rmt_kernels.dp.checkpoint import lock_ledger
        lock_ledger({str(path)!r})
        print("held", flush=True)
        time.sleep(120)
        """
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=worker_env(), stdout=subprocess.PIPE
    )
    assert holder.stdout.readline().strip() == b"held"
    return holder


def test_a_second_process_on_one_ledger_is_refused(tmp_path):
    # Today both resumes run and share the ledger: 15 steps used data, 11 charged.
    path = tmp_path / "ckpt.pt"
    holder = _hold_lock(path)
    try:
        _, opt, _ = dp_workers.private(tiny_model(), noise=1.0, lr=0.0)
        with pytest.raises(CheckpointError, match=f"in use by another process \\(pid {holder.pid}"):
            attach_ledger(opt, path)
        assert opt.engine.ledger is None
    finally:
        holder.kill()
        holder.wait()
    # Once the other process is gone (killed: the lock goes with it), the run may start.
    attach_ledger(opt, path)
    assert opt.engine.ledger is not None


def test_a_second_resume_of_one_checkpoint_is_refused(tmp_path):
    from rmt_kernels.dp import checkpoint as module
    from rmt_kernels.dp import save_checkpoint

    path = tmp_path / "ckpt.pt"
    model, opt, loader = dp_workers.private(tiny_model(), noise=1.0, lr=0.0)
    save_checkpoint(path, model, opt, loader)
    # The run that wrote it is gone (its process ended: its lock with it) ...
    module._HELD_LOCKS.pop(Path(f"{ledger_path(path)}.lock").resolve()).close()
    # ... and a first resume runs in another process: this second resume is refused before
    # it reads the ledger.
    other = _hold_lock(path)
    try:
        model2, opt2, loader2 = dp_workers.private(tiny_model(), noise=1.0, lr=0.0)
        with pytest.raises(CheckpointError, match="in use by another process"):
            load_checkpoint(path, model2, opt2, loader2)
    finally:
        other.kill()
        other.wait()


def _cfg(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(task="sst2", model="m", checkpoint_dir=str(tmp_path / "ckpt"), **kw)


@pytest.mark.parametrize("name", ["checkpoint.pt", "checkpoint.pt.ledger", "checkpoint.pt.data"])
def test_output_onto_a_checkpoint_file_is_refused(tmp_path, name):
    # Today --output ckpt/checkpoint.pt.ledger replaces the ledger with the JSON log.
    with pytest.raises(ValueError, match=r"--output .* is a file of --checkpoint-dir"):
        check_outputs(_cfg(tmp_path, output=str(tmp_path / "ckpt" / ".." / "ckpt" / name)))


@pytest.mark.parametrize("save", ["ckpt", "."])
def test_save_onto_the_checkpoint_folder_is_refused(tmp_path, save):
    with pytest.raises(ValueError, match=r"--save .* would replace --checkpoint-dir"):
        check_outputs(_cfg(tmp_path, save=str(tmp_path / save)))
    check_outputs(_cfg(tmp_path, save=str(tmp_path / "model"), output=str(tmp_path / "a.json")))


def test_a_full_disk_at_a_checkpoint_exits_2_with_the_previous_checkpoint_intact(
    tiny, tmp_path, monkeypatch, capsys
):
    ckpt = tmp_path / "ckpt"
    real_fsync = os.fsync
    written = []

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if ".checkpoint.pt.tmp-" in name:
            written.append(name)
            if len(written) == 2:  # the second checkpoint: the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    code = run(
        "train", "--task", "sst2", "--data-dir", tiny["glue"], "--init", "random",
        "--config", tiny["config"], "--steps", 3, "--batch-size", 8, "--quiet",
        "--noise-multiplier", 1, "--checkpoint-dir", ckpt, "--checkpoint-every", 1,
    )  # fmt: skip
    assert code == 2
    assert "No space left on device" in capsys.readouterr().err
    path = ckpt / "checkpoint.pt"
    # The first checkpoint, and the data sidecar that belongs to it; no temporary file left.
    assert checkpoint_extra(path)["steps"] == 1
    assert _read(data_path(path))["data_id"] == _read(path)["data_id"]
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(
        [path.name, data_path(path).name, ledger_path(path).name, f"{ledger_path(path).name}.lock"]
    )
    # The step whose checkpoint failed is in the ledger: a resume charges it.
    assert len(ledger_path(path).read_text().splitlines()) == 2
