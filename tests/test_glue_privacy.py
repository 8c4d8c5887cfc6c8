# ruff: noqa: F811 (pytest fixtures imported from tests/test_glue_cli.py)
"""rmt-glue and the privacy guarantee (issue 11): the noise seed is secret unless --noise-seed
(then the log says the run is not private), a resume replays lost steps for free only on the
same data and settings, and the CLI's mistakes are exit 2 with one line, before training."""

from __future__ import annotations

import json

import pytest

from rmt_kernels.glue import fine_tune
from rmt_kernels.training import loop as train_module
from tests.helpers import record_engine_seeds
from tests.test_glue_cli import base, run, tiny, train_tiny  # noqa: F401 (fixtures)

pytest.importorskip("transformers")
pytest.importorskip("opacus")

NOISE = ["--noise-multiplier", 1, "--accountant", "rdp"]


def _strict(path) -> dict:
    """The log, parsed as strict JSON (Infinity and NaN are not JSON)."""

    def refuse(name):
        raise ValueError(f"{path}: {name} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def _tiny_args(tiny, out, *extra) -> list:
    return [
        "train", "--task", "sst2", "--data-dir", tiny["glue"], "--init", "random",
        "--config", tiny["config"], "--steps", 3, "--batch-size", 8, "--quiet",
        "--output", out, *extra,
    ]  # fmt: skip


def _crash_at(monkeypatch, call: int) -> None:
    """Make the ``call``-th training forward (1-based) raise after the model ran: its step is
    in the privacy ledger, as after a SIGKILL there."""
    calls = []
    loss_fn = fine_tune.loss_fn

    def crashing(logits, labels, task):
        import torch

        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == call:
                raise RuntimeError("simulated crash")
        return loss_fn(logits, labels, task)

    monkeypatch.setattr(fine_tune, "loss_fn", crashing)


def test_the_noise_seed_is_secret_by_default(tiny, tmp_path, monkeypatch, capsys):
    from rmt_kernels.dp.checkpoint import data_path
    from rmt_kernels.dp.ledger import ledger_path

    seeds = record_engine_seeds(monkeypatch)
    ckpt = tmp_path / "ckpt"
    args = [*NOISE, "--seed", 987654321, "--checkpoint-dir", ckpt]
    log = train_tiny(tiny, tmp_path / "log.json", *args)
    (seed,) = seeds
    assert log["private"] is True and log["config"]["noise_seed"] is None
    files = [tmp_path / "log.json", ckpt / "checkpoint.pt", ledger_path(ckpt / "checkpoint.pt")]
    files.append(data_path(ckpt / "checkpoint.pt"))
    for path in files:
        data = path.read_bytes()
        for form in (str(seed).encode(), f"{seed:x}".encode(), seed.to_bytes(8, "little")):
            assert form not in data, (path, form)
    # Secret noise: two runs of the same command differ; a --noise-seed run repeats itself.
    again = train_tiny(tiny, tmp_path / "again.json", *NOISE, "--seed", 987654321)
    assert again["evals"][-1]["eval_loss"] != log["evals"][-1]["eval_loss"]
    capsys.readouterr()
    public = [train_tiny(tiny, tmp_path / f"p{i}.json", *NOISE, "--noise-seed", 5) for i in (0, 1)]
    assert public[0]["evals"][-1]["eval_loss"] == public[1]["evals"][-1]["eval_loss"]
    # ... and says it is not private: in the log and in one warning line.
    assert public[0]["private"] is False and public[0]["config"]["noise_seed"] == 5
    err = capsys.readouterr().err
    warning = (
        "rmt-glue train: warning: --noise-seed 5: the noise is reproducible from the log, "
        "so this run is NOT private"
    )
    lines = err.splitlines()  # one line per run, nothing else
    assert len(lines) == 2 and all(line.startswith(warning) for line in lines), err


def test_an_infinite_epsilon_is_strict_json(tiny, tmp_path):
    out = tmp_path / "log.json"
    assert run(*_tiny_args(tiny, out, "--noise-multiplier", 0, "--eval-every", 2)) == 0
    log = _strict(out)
    assert log["epsilon"] is None and log["private"] is False
    assert [e["epsilon"] for e in log["evals"]] == [None, None]


def _epsilon(tiny, tmp_path, steps) -> float:
    """Epsilon of an uninterrupted run of ``steps`` steps on 20 examples (batch 8: sampling rate
    1/3, delta 1/20^1.1), from the accountant the CLI uses."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(1.0, 1 / 3, steps)]
    return accountant.get_epsilon(delta=1 / 20**1.1)


@pytest.mark.parametrize(
    "first, then, charged",
    [
        (["--noise-seed", 3], ["--noise-seed", 3], False),  # the same run: an exact, free replay
        (["--noise-seed", 3], ["--noise-seed", 3, "--max-length", 8], True),
        (["--noise-seed", 3], ["--noise-seed", 3, "--seed", 4], True),  # another subset
        ([], [], True),  # a secret seed is never written: it cannot replay
    ],
)
def test_a_resume_on_other_data_is_charged(
    tiny, tmp_path, monkeypatch, capsys, first, then, charged
):
    ckpt = ["--checkpoint-dir", tmp_path / "ckpt", "--checkpoint-every", 1, "--train-size", 20]
    out = tmp_path / "log.json"
    # Steps 0 and 1 checkpointed, step 2 crashed after its forward (so it is in the ledger).
    _crash_at(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(*_tiny_args(tiny, out, *NOISE, *ckpt, *first))
    monkeypatch.undo()
    capsys.readouterr()
    assert run(*_tiny_args(tiny, out, *NOISE, *ckpt, *then, "--resume")) == 0
    err = capsys.readouterr().err
    resumed = _strict(out)["epsilon"]
    if not charged:
        assert resumed == _epsilon(tiny, tmp_path, 3) and "charged" not in err
        return
    # The crashed step is charged: 4 steps' worth, and one line says so.
    assert resumed == pytest.approx(_epsilon(tiny, tmp_path, 4), rel=1e-12)
    assert resumed > _epsilon(tiny, tmp_path, 3)
    assert "cannot be replayed for free" in err
    if then[2:]:
        assert f"--resume: {then[2]} differ" in err


def test_a_run_killed_before_its_first_checkpoint_restarts(tiny, tmp_path, monkeypatch, capsys):
    ckpt = ["--checkpoint-dir", tmp_path / "ckpt", "--checkpoint-every", 2, "--train-size", 20]
    out = tmp_path / "log.json"
    for again in ([], ["--resume"]):
        _crash_at(monkeypatch, 1)  # step 0 crashes: a ledger line, no checkpoint
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(*_tiny_args(tiny, out, *NOISE, *ckpt))
        monkeypatch.undo()
        capsys.readouterr()
        assert run(*_tiny_args(tiny, out, *NOISE, *ckpt, *again)) == 0
        assert "killed before its first checkpoint" in capsys.readouterr().err
        # Its step is charged on top of the 3 of the new run.
        assert _strict(out)["epsilon"] == pytest.approx(_epsilon(tiny, tmp_path, 4), rel=1e-12)
        for path in (tmp_path / "ckpt").iterdir():
            path.unlink()


def test_resume_errors_and_an_honoured_lr(tiny, tmp_path, capsys):
    from rmt_kernels.dp.checkpoint_file import read_checkpoint_file

    ckpt = ["--checkpoint-dir", tmp_path / "ckpt"]
    out = tmp_path / "log.json"
    assert run(*_tiny_args(tiny, out, *NOISE, *ckpt, "--steps", 2)) == 0
    capsys.readouterr()
    for extra, message in (
        (["--steps", 2], "already ran 2 steps and this one asks for 2: give more --steps"),
        (["--optimizer", "sgd"], "trains with --optimizer adamw, whose state cannot continue"),
    ):
        assert run(*_tiny_args(tiny, out, *NOISE, *ckpt, "--resume", *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and "Traceback" not in err
    assert run(*_tiny_args(tiny, out, *NOISE, *ckpt, "--resume", "--lr", 0.125)) == 0
    assert "--lr 0.125 replaces the checkpointed run's 0.0005" in capsys.readouterr().err
    assert _strict(out)["config"]["lr"] == 0.125
    saved = read_checkpoint_file(tmp_path / "ckpt" / "checkpoint.pt")
    assert saved["optimizer"]["param_groups"][0]["lr"] == 0.125


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--output", "{file}/log.json"], r"--output .*/log.json: cannot write in"),
        (["--save", "{file}/model"], r"--save .*/model: cannot write in"),
        (["--checkpoint-dir", "{file}/ckpt"], r"--checkpoint-dir .*/ckpt: cannot write in"),
        (["--device", "tpu9"], r"--device 'tpu9' is not a device"),
        (["--epsilon", "inf"], r"--epsilon must be a finite number > 0, got inf"),
        (["--no-dp", "--noise-multiplier", 1], r"--noise-multiplier needs DP"),
        (["--train-size", 100], r"--train-size 100 is above the 24 examples"),
        (["--eval-every", -1], r"--eval-every must be >= 0"),
        (["--noise-seed", -1], r"--noise-seed must be in \[0, 2\*\*63\)"),
        (["--noise-seed", 3, "--secure-mode"], r"--noise-seed makes the noise public"),
        (["--noise-multiplier", "inf"], r"--noise-multiplier must be a finite number >= 0"),
    ],
)
def test_cli_mistakes_exit_2_with_one_line_before_training(
    base,
    tmp_path,
    monkeypatch,
    capsys,
    extra,
    message,
):
    import re

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(train_module, "_logical_step", no_training)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    argv = [*base, *(str(x).replace("{file}", str(blocker)) for x in extra)]
    assert run(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(message, err), err
    assert "\n" not in err and "Traceback" not in err


def test_epochs_inf_and_a_missing_gpu_exit_2(tiny, capsys):
    import torch

    argv = _tiny_args(tiny, "unused.json")
    argv.remove("--steps")
    argv.remove(3)
    assert run(*argv, "--epochs", "inf") == 2
    assert "--epochs must be a finite number > 0, got inf" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert run(*argv, "--device", "cuda") == 2
        assert "--device cuda: no CUDA GPU is usable here" in capsys.readouterr().err
