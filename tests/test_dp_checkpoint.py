"""Checkpoint and resume of a private run: integrity, mismatch refusal, and the privacy ledger
under a real SIGKILL (tests/dp_workers.py ``train_run``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from rmt_kernels.dp import CheckpointError, attach_ledger, load_checkpoint, save_checkpoint
from rmt_kernels.dp.checkpoint import PrivacyLedger, ledger_path
from tests import dp_workers
from tests.dp_models import tiny_model
from tests.test_dp_distributed import ROOT, TIMEOUT_S, worker_env

pytest.importorskip("transformers")
pytest.importorskip("opacus")

STEPS, EVERY, KILL_AT = 6, 2, 4


def _saved(tmp_path):
    """A checkpoint after one step (ledger attached first, as a run should)."""
    model, opt, loader = dp_workers.private(tiny_model(), noise=1.0)
    path = tmp_path / "ckpt.pt"
    attach_ledger(opt, path)
    dp_workers.backward(model, dp_workers.batch_of(0, None))
    opt.step()
    opt.zero_grad()
    save_checkpoint(path, model, opt, loader, extra={"note": "x"})
    return path, dp_workers.params(model)


def test_round_trip_restores_everything(tmp_path):
    path, saved = _saved(tmp_path)
    model, opt, loader = dp_workers.private(tiny_model(seed=9), noise=1.0, seed=5)
    assert load_checkpoint(path, model, opt, loader) == {"note": "x"}
    assert opt.engine.steps == 1
    assert opt.engine.accountant.history == [(1.0, dp_workers.BATCH / dp_workers.DATASET, 1)]
    assert opt.engine._seed == 1234  # the checkpoint's stream continues, not the new seed
    for n, p in model.named_parameters():
        assert torch.equal(p, saved[n]), n
    assert PrivacyLedger(ledger_path(path)).entries() == [(0, opt.engine.seed_id)]


def test_truncated_and_flipped_files_are_refused(tmp_path):
    path, _ = _saved(tmp_path)
    data = path.read_bytes()
    model, opt, loader = dp_workers.private(tiny_model(), noise=1.0)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path, model, opt, loader)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="corrupt") as err:
        load_checkpoint(path, model, opt, loader)
    assert str(path) in str(err.value)
    path.write_bytes(b"not a checkpoint at all, just some bytes in a file....")
    with pytest.raises(CheckpointError, match="not an rmt_kernels checkpoint"):
        load_checkpoint(path, model, opt, loader)


def test_other_model_and_other_privacy_settings_are_refused(tmp_path):
    path, _ = _saved(tmp_path)
    model, opt, loader = dp_workers.private(tiny_model("bert"), noise=1.0)
    with pytest.raises(CheckpointError, match="another model"):
        load_checkpoint(path, model, opt, loader)
    model, opt, loader = dp_workers.private(tiny_model(), noise=2.0)
    with pytest.raises(CheckpointError, match=r"noise_multiplier = 1\.0 in the checkpoint"):
        load_checkpoint(path, model, opt, loader)


def test_a_checkpoint_of_another_noise_stream_is_refused(tmp_path, monkeypatch):
    # Replaying the lost steps costs nothing only with the same noise; a build whose noise stream
    # differs (rmt_kernels.dp_ops.NOISE_STREAM_VERSION) must not resume the run.
    from rmt_kernels import dp_ops

    path, _ = _saved(tmp_path)
    model, opt, loader = dp_workers.private(tiny_model(), noise=1.0)
    monkeypatch.setattr(dp_ops, "NOISE_STREAM_VERSION", dp_ops.NOISE_STREAM_VERSION + 1)
    with pytest.raises(CheckpointError, match=r"noise_stream = 2 in the checkpoint, 3 in this run"):
        load_checkpoint(path, model, opt, loader)


def test_a_fresh_run_refuses_another_runs_ledger(tmp_path):
    path, _ = _saved(tmp_path)
    model, opt, loader = dp_workers.private(tiny_model(), noise=1.0)
    with pytest.raises(CheckpointError, match="another run"):
        save_checkpoint(path, model, opt, loader)


def test_a_truncated_ledger_is_refused(tmp_path):
    path, _ = _saved(tmp_path)
    ledger_path(path).write_text("")
    model, opt, loader = dp_workers.private(tiny_model(), noise=1.0)
    with pytest.raises(CheckpointError, match="ledger"):
        load_checkpoint(path, model, opt, loader)


def _run(folder, **args) -> subprocess.CompletedProcess:
    spec = {"folder": str(folder), "steps": STEPS, "every": EVERY, **args}
    return subprocess.run(
        [sys.executable, "-m", "tests.dp_workers", "train", json.dumps(spec)],
        cwd=ROOT,
        env=worker_env(),
        capture_output=True,
        timeout=TIMEOUT_S,
    )


def _epsilon(steps: int) -> float:
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(1.0, dp_workers.BATCH / 32, steps)]
    return accountant.get_epsilon(delta=dp_workers.DELTA)


@pytest.mark.parametrize("secure", [False, True])
def test_sigkill_mid_step_then_resume(tmp_path, secure):
    killed = _run(tmp_path, resume=False, kill_at=KILL_AT, secure=secure)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    # The step killed after its forward is in the ledger: its data touched the model.
    steps = [s for s, _ in PrivacyLedger(ledger_path(tmp_path / "ckpt.pt")).entries()]
    assert steps == list(range(KILL_AT + 1))
    resumed = _run(tmp_path, resume=True, secure=secure)
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    report = json.loads(resumed.stdout.decode().splitlines()[-1])
    # Right after loading: the checkpoint holds KILL_AT steps, the ledger KILL_AT + 1.
    assert report["steps_after_load"] == KILL_AT
    assert report["epsilon_after_load"] >= _epsilon(KILL_AT + 1) * (1 - 1e-12)
    assert report["steps"] == STEPS
    if secure:
        # A fresh seed cannot replay: the lost step counts in addition.
        assert report["epsilon"] == pytest.approx(_epsilon(STEPS + 1), rel=1e-12)
        return
    torch.set_num_threads(1)
    fresh_folder = tmp_path / "fresh"
    fresh_folder.mkdir()
    fresh = dp_workers.train_run(fresh_folder, steps=STEPS, every=EVERY, resume=False, kill_at=None)
    assert report["epsilon"] == fresh["epsilon"] == pytest.approx(_epsilon(STEPS), rel=1e-12)
    a = torch.load(tmp_path / "final-resumed.pt", weights_only=True)
    b = torch.load(fresh_folder / "final-fresh.pt", weights_only=True)
    for n in a:
        assert torch.equal(a[n], b[n]), n
