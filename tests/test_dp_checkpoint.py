"""Checkpoint and resume of a private run: integrity, mismatch refusal, and the privacy ledger
under a real SIGKILL (tests/dp_workers.py ``train_run``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from rmt_kernels.dp import CheckpointError, attach_ledger, load_checkpoint, save_checkpoint
from rmt_kernels.dp.ledger import PrivacyLedger, ledger_path
from tests import dp_workers
from tests.dp_models import tiny_model
from tests.test_dp_distributed import ROOT, TIMEOUT_S, worker_env
from tests.test_secrets import fixed_os, found  # noqa: F401 (a fixture, and the scan)

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
    assert opt.engine.noise_key.seed == 1234  # the checkpoint's stream continues, not the new seed
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
    # differs (rmt_kernels.ops.NOISE_STREAM_VERSION, from csrc/cpu/philox.h) must not resume.
    from rmt_kernels import ops

    path, _ = _saved(tmp_path)
    model, opt, loader = dp_workers.private(tiny_model(), noise=1.0)
    monkeypatch.setattr(ops, "NOISE_STREAM_VERSION", ops.NOISE_STREAM_VERSION + 1)
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


# ------------------------------------------------------------------------------------------
# A free replay needs the same data (issue 11, item 1; privacy invariant 10, PRIVACY.md)
# ------------------------------------------------------------------------------------------


def _examples(loader, step: int):
    """Examples 8 step .. 8 step + 7 of the loader's dataset (the tests feed batches by hand)."""
    return tuple(
        t[step * dp_workers.BATCH : (step + 1) * dp_workers.BATCH] for t in _tensors(loader)
    )


def _tensors(loader):
    dataset = loader.dataset
    return dataset.tensors if hasattr(dataset, "tensors") else dataset.inner.tensors


class _Opaque(torch.utils.data.Dataset):
    """A dataset the library cannot hash (as one that reads files or tokenizes on the fly)."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        return self.inner[i]


def _private(data_seed=5, opaque=False, noise=1.0):
    # lr 0: the parameters stay at their init, so a step's clean gradient can be recomputed.
    model, opt, loader = dp_workers.private(tiny_model(), noise=noise, lr=0.0, data_seed=data_seed)
    if opaque:
        loader = torch.utils.data.DataLoader(
            _Opaque(loader.dataset), batch_sampler=loader.batch_sampler
        )
    return model, opt, loader


def _crashed_run(path, given=None, **kw):
    """Step 0, a checkpoint, then step 1 (its noisy gradient kept) and a crash."""
    model, opt, loader = _private(**kw)
    attach_ledger(opt, path)
    for step in range(2):
        dp_workers.backward(model, _examples(loader, step))
        opt.step()
        if step == 0:
            opt.zero_grad()
            save_checkpoint(path, model, opt, loader, data_fingerprint=given)
    return dp_workers.grads(model)


def _clean_grads(batch):
    model, opt, _ = dp_workers.private(tiny_model(), noise=0.0, lr=0.0)
    dp_workers.backward(model, batch)
    opt.step()
    return dp_workers.grads(model)


@pytest.mark.parametrize("data_seed", [5, 6])
def test_resume_on_other_data_rekeys_the_noise_and_charges_the_lost_step(tmp_path, data_seed):
    from rmt_kernels.dp import dataset_fingerprint

    path = tmp_path / "ckpt.pt"
    crashed = _crashed_run(path)
    model, opt, loader = _private(data_seed=data_seed)
    # The data's hash would let a guess of the data be checked: never in the checkpoint itself.
    assert dataset_fingerprint(_private()[2].dataset).encode() not in path.read_bytes()
    import warnings

    from rmt_kernels.dp import ResumeWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_checkpoint(path, model, opt, loader)
    other = data_seed != 5
    messages = [str(w.message) for w in caught if issubclass(w.category, ResumeWarning)]
    assert bool(messages) == other, messages
    # Step 0 and the crashed step 1 are charged at load; step 1 again after it on other data.
    assert opt.engine.accountant.history == [(1.0, dp_workers.BATCH / dp_workers.DATASET, 2)]
    batch = _examples(loader, 1)
    dp_workers.backward(model, batch)
    opt.step()
    history = opt.engine.accountant.history
    assert history == [(1.0, dp_workers.BATCH / dp_workers.DATASET, 3 if other else 2)]
    resumed = dp_workers.grads(model)
    if not other:  # the same data: an exact replay, for free
        for n in resumed:
            assert torch.equal(resumed[n], crashed[n]), n
        return
    assert "dataset's tensors differ" in messages[0] and "1 step(s)" in messages[0]
    # The attack of the issue: with the same noise, the difference of the two released steps is
    # the noise-free difference of the clean gradients. Re-keyed, it is off by two independent
    # noises: per coordinate std sigma C / B on each, so the norm is about sqrt(2 P) sigma C / B
    # (P ~ 3e4: a chi variable that far from half its mean has probability far below 1e-6).
    clean_a, clean_b = _clean_grads(_examples(_private()[2], 1)), _clean_grads(batch)
    off = torch.cat(
        [(resumed[n] - crashed[n] - clean_b[n] + clean_a[n]).flatten() for n in resumed]
    )
    expected = (2 * off.numel()) ** 0.5 * 1.0 * dp_workers.C / dp_workers.BATCH
    assert off.norm() > 0.5 * expected


def test_unverifiable_data_is_charged_unless_a_fingerprint_is_given(tmp_path):
    import warnings

    from rmt_kernels.dp import ResumeWarning

    path = tmp_path / "a" / "ckpt.pt"
    _crashed_run(path, opaque=True)
    model, opt, loader = _private(opaque=True)
    with pytest.warns(ResumeWarning, match="cannot be verified"):
        load_checkpoint(path, model, opt, loader)
    assert opt.engine.noise_key.seed != 1234
    # The caller names its data: the same name replays for free, another one is charged.
    path = tmp_path / "b" / "ckpt.pt"
    _crashed_run(path, opaque=True, given="sst2 v1")
    model, opt, loader = _private(opaque=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(path, model, opt, loader, data_fingerprint="sst2 v1")
    assert opt.engine.noise_key.seed == 1234
    model, opt, loader = _private(opaque=True)
    with pytest.warns(ResumeWarning, match="data_fingerprint differ"):
        load_checkpoint(path, model, opt, loader, data_fingerprint="sst2 v2")
    with pytest.raises(TypeError, match="data_fingerprint must be a non-empty str"):
        load_checkpoint(path, model, opt, loader, data_fingerprint=b"x")


def test_a_run_killed_before_its_first_checkpoint_restarts_with_its_steps_charged(tmp_path):
    path = tmp_path / "ckpt.pt"
    model, opt, loader = _private(noise=2.0)
    attach_ledger(opt, path)
    for step in range(2):
        dp_workers.backward(model, _examples(loader, step))
        opt.step()
        opt.zero_grad()
    old_id = opt.engine.seed_id
    # No checkpoint: nothing to load, and a plain restart must not drop the ledger's steps.
    model, opt, loader = _private(noise=1.0)
    with pytest.raises(CheckpointError, match="killed before its first checkpoint"):
        attach_ledger(opt, path)
    attach_ledger(opt, path, charge_existing=True)
    rate = dp_workers.BATCH / dp_workers.DATASET
    # Charged with the noise multiplier they ran with (recorded in the ledger), not this run's.
    assert opt.engine.accountant.history == [(2.0, rate, 2)]
    assert opt.engine.seed_id != old_id and opt.engine.noise_key.seed != 1234
    dp_workers.backward(model, _examples(loader, 0))
    opt.step()
    assert opt.engine.accountant.history == [(2.0, rate, 2), (1.0, rate, 1)]
    assert [s for s, _ in PrivacyLedger(ledger_path(path)).entries()] == [0, 1, 0]
    save_checkpoint(path, model, opt, loader)
    with pytest.raises(CheckpointError, match="exists"):
        attach_ledger(_private()[1], path, charge_existing=True)


def test_a_secret_seed_is_never_written_and_its_lost_steps_are_charged(tmp_path, fixed_os):  # noqa: F811
    # fixed_os: the OS secrets from a seeded generator, so the scan of the 4-byte key words is
    # deterministic (a random 4-byte pattern would occur by chance in a file of n bytes with
    # probability about n / 2^32).
    from rmt_kernels.dp.checkpoint_file import read_checkpoint_file

    path = tmp_path / "ckpt.pt"
    model, opt, loader = dp_workers.private(tiny_model(), noise=1.0, lr=0.0, seed=None)
    seed = opt.engine.noise_key.seed
    attach_ledger(opt, path)
    for step in range(2):
        dp_workers.backward(model, _examples(loader, step))
        opt.step()
        if step == 0:
            opt.zero_grad()
            save_checkpoint(path, model, opt, loader)
    assert read_checkpoint_file(path)["engine"]["seed"] is None
    # Every encoding (decimal, hex, 8-byte LE/BE, the Philox key words); the other artifacts,
    # secure mode and the drop-in: tests/test_secrets.py.
    blobs = {"ckpt": path.read_bytes(), "ledger": ledger_path(path).read_bytes()}
    assert not found(seed, blobs), found(seed, blobs)
    model, opt, loader = dp_workers.private(tiny_model(), noise=1.0, lr=0.0, seed=None)
    from rmt_kernels.dp import ResumeWarning

    with pytest.warns(ResumeWarning, match="secret"):
        load_checkpoint(path, model, opt, loader)
    assert opt.engine.noise_key.seed != seed
    dp_workers.backward(model, _examples(loader, 1))
    opt.step()
    assert opt.engine.accountant.history == [(1.0, dp_workers.BATCH / dp_workers.DATASET, 3)]


# ------------------------------------------------------------------------------------------
# The denoiser's warm-start bases are checkpointed (issue 14, item 2)
# ------------------------------------------------------------------------------------------

# Warm starts (the default). kappa 0.75, not lower: at 0.5 the kept rank reaches the tiny
# model's smaller side (32), where the op computes the exact SVD and a warm start changes nothing.
DENOISE = {"kappa": 0.75}


def _denoised_run(path, steps: int, *, resume_at: int | None = None, keep_bases: bool = True):
    """``steps`` logical steps with the warm-started denoiser (every 2-D weight of the tiny
    model is at least 32 on a side), lr 0.1; with ``resume_at``, checkpoint after that many
    steps, rebuild from another initialisation and seed, load and go on."""

    def build(seed):
        return dp_workers.private(
            tiny_model(seed=seed), noise=1.0, denoise=DENOISE, seed=1234 + seed
        )

    model, opt, loader = build(0)
    attach_ledger(opt, path)
    for step in range(steps):
        dp_workers.backward(model, dp_workers.batch_of(step, None))
        opt.step()
        opt.zero_grad()
        if step + 1 == resume_at:
            save_checkpoint(path, model, opt, loader)
            model, opt, loader = build(9)
            load_checkpoint(path, model, opt, loader)
            if not keep_bases:  # as if the bases had not been checkpointed
                opt.engine.denoiser.load_state_dict({})
    return dp_workers.params(model), opt.engine.denoiser.state_dict()


def test_a_resumed_run_denoises_bit_identically_from_the_checkpointed_bases(tmp_path):
    from rmt_kernels.dp.checkpoint_file import read_checkpoint_file

    straight, bases = _denoised_run(tmp_path / "a" / "ckpt.pt", 4)
    resumed, resumed_bases = _denoised_run(tmp_path / "b" / "ckpt.pt", 4, resume_at=2)
    for n in straight:
        assert torch.equal(straight[n], resumed[n]), n
    assert bases["shapes"] == resumed_bases["shapes"]
    for key, basis in bases["bases"].items():
        assert torch.equal(basis, resumed_bases["bases"][key]), key
    # The checkpoint (read with weights_only=True) holds a basis per denoised matrix.
    (saved,) = read_checkpoint_file(tmp_path / "b" / "ckpt.pt")["engine"]["post_processors"]
    assert set(saved["bases"]) == set(bases["bases"]) and len(saved["bases"]) >= 12
    for key, basis in saved["bases"].items():
        assert basis.dtype == torch.float32 and basis.shape[0] == saved["shapes"][key][0], key
    # Guard: a resume that starts the denoiser cold ends elsewhere (the test can fail).
    forgot, _ = _denoised_run(tmp_path / "c" / "ckpt.pt", 4, resume_at=2, keep_bases=False)
    assert any(not torch.equal(straight[n], forgot[n]) for n in straight)


def test_a_checkpoint_with_a_bad_basis_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    model, opt, loader = dp_workers.private(tiny_model(), noise=1.0, denoise=DENOISE)
    attach_ledger(opt, path)
    dp_workers.backward(model, dp_workers.batch_of(0, None))
    opt.step()
    real = type(opt.engine.denoiser).state_dict

    def truncated(self):  # a basis with a row too few, as from another model's matrix
        state = real(self)
        key = next(iter(state["bases"]))
        state["bases"][key] = state["bases"][key][1:]
        return state

    monkeypatch.setattr(type(opt.engine.denoiser), "state_dict", truncated)
    save_checkpoint(path, model, opt, loader)
    monkeypatch.undo()
    model, opt, loader = dp_workers.private(tiny_model(seed=9), noise=1.0, denoise=DENOISE)
    before = dp_workers.params(model)
    with pytest.raises(CheckpointError, match=r"Denoiser.load_state_dict: the basis of .* must be"):
        load_checkpoint(path, model, opt, loader)
    # Refused before the model was touched, and no basis of it kept.
    assert all(torch.equal(p, before[n]) for n, p in dp_workers.params(model).items())
    assert opt.engine.denoiser.state_dict() == {}
    # ... and before the engine's step counter and accountant were replaced.
    assert opt.engine.steps == 0 and opt.engine.accountant.history == []
    # The engine alone refuses it the same way (the post-processors are loaded first).
    saved = real(opt.engine.denoiser)
    engine_state = {**opt.engine.state_dict(), "steps": 5}
    key = "bad"
    engine_state["post_processors"] = [{"bases": {key: torch.zeros(3, 2)}, "shapes": {key: (4, 4)}}]
    with pytest.raises(ValueError, match=r"Denoiser\.load_state_dict"):
        opt.engine.load_state_dict(engine_state)
    assert opt.engine.steps == 0 and saved == {}
