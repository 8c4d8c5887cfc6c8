"""What a private ``rmt-glue`` run writes: only released or public quantities.

The JSON log, the progress bar and the checkpoint of a run marked private hold no statistic of
the training batches (their exact Poisson sizes, their unnoised mean loss): the accountant
counts neither. A run that is explicitly not private (a public ``--noise-seed``, ``--no-dp``)
keeps them.
"""

# ruff: noqa: F811 (the tiny fixture, imported from tests/test_glue_cli.py, named as arguments)
from __future__ import annotations

import contextlib
import json
import signal
import types

import pytest
import torch

from rmt_kernels.dp import checkpoint_extra, make_private
from rmt_kernels.dp.calibration import calibrate_noise_multiplier, run_epsilon
from rmt_kernels.training import loop as train_module
from tests.test_glue_cli import run, tiny, train_tiny  # noqa: F401 (tiny: the module's fixture)

PRIVATE_FIELDS = set(train_module.TRAINING_STATISTICS)


def _eval_keys(log: dict) -> set[str]:
    return {k for record in log["evals"] for k in record}


def test_a_private_log_and_checkpoint_hold_no_training_statistics(tiny, tmp_path):
    out = tmp_path / "log.json"
    ckpt = tmp_path / "ckpt"
    log = train_tiny(
        tiny, out, "--eval-every", 1, "--noise-multiplier", 1, "--checkpoint-dir", ckpt
    )
    assert log["private"] is True
    assert len(log["evals"]) == 3
    # The written log is what train() returned (checked on the file, not only the dict).
    written = json.loads(out.read_text())
    assert not PRIVATE_FIELDS & _eval_keys(written), _eval_keys(written)
    for record in written["evals"]:
        assert 0 <= record["accuracy"] <= 1
    # Throughput stays, for the whole run only (a step's time grows with its batch).
    assert written["steps_per_s"] > 0
    extra = checkpoint_extra(ckpt / "checkpoint.pt")["extra"]
    assert extra["samples"] is None
    assert not PRIVATE_FIELDS & {k for record in extra["evals"] for k in record}


@pytest.mark.parametrize("extra", [["--noise-seed", 3, "--noise-multiplier", 1], ["--no-dp"]])
def test_a_run_that_is_not_private_keeps_them(tiny, tmp_path, extra):
    log = train_tiny(tiny, tmp_path / "log.json", "--eval-every", 1, *extra)
    assert log["private"] is False
    samples = [r["samples"] for r in log["evals"]]
    assert samples == sorted(samples) and len(samples) == 3
    assert all(r["train_loss"] is not None for r in log["evals"] if r["samples"])


class _Bar:
    def __init__(self):
        self.shown: dict = {}

    def set_postfix(self, postfix, refresh=False):
        self.shown = dict(postfix)


@pytest.mark.parametrize("private", [True, False])
def test_the_progress_bar_of_a_private_run_shows_no_loss_nor_batch_sizes(private):
    run = types.SimpleNamespace(
        privacy=types.SimpleNamespace(private=private, epsilon=lambda step: 1.0),
        cfg=types.SimpleNamespace(dp=True),
        total_steps=100,
    )
    progress = train_module.Progress(step=3, seconds=2.0, samples=17)
    bar = _Bar()
    train_module._show(bar, {}, run, progress, 0.6931)
    text = " ".join(f"{k}={v}" for k, v in bar.shown.items())
    if private:
        assert "0.6931" not in text and "8.5" not in text and "steps/s=1.50" in text, text
    else:
        assert "loss=0.6931" in text and "samples/s=8.5" in text, text


# ------------------------------------------------------------------------------------------
# delta and calibration: checked before any step touches data, bounded in time
# ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _deadline(seconds: int):
    """Raise TimeoutError after ``seconds`` (a hang fails the test instead of stalling it)."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _argv(tiny, tmp_path, *extra) -> list:
    return [
        "train", "--task", "sst2", "--data-dir", tiny["glue"], "--init", "random",
        "--config", tiny["config"], "--steps", 3, "--batch-size", 8, "--quiet",
        "--output", tmp_path / "log.json", "--checkpoint-dir", tmp_path / "ckpt", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_a_delta_of_1_over_n_or_more_exits_2_before_any_step(tiny, tmp_path, capsys, accountant):
    # Today: epsilon -0.68 (prv), -0.51 (rdp) logged as private; gdp exits 2 after step 0 ran.
    argv = _argv(tiny, tmp_path, "--delta", 0.5, "--noise-multiplier", 1)
    assert run(*argv, "--accountant", accountant) == 2
    err = capsys.readouterr().err
    assert "--delta 0.5 is at least 1/n" in err, err
    # Before any step touched data: no ledger line, no log.
    assert not (tmp_path / "ckpt" / "checkpoint.pt.ledger").exists()
    assert not (tmp_path / "log.json").exists()


def test_the_last_steps_epsilon_is_checked_before_the_run():
    # The accountants' epsilon at a large delta is negative (PRV: -0.32 at delta 0.3, sigma 1,
    # q 0.1, 10 steps): not a bound to log.
    with pytest.raises(ValueError, match="not a valid guarantee"):
        run_epsilon(1.0, 0.3, 0.1, 10, "prv")
    # GDP (whose root finder also failed at small sigma after step 0) is refused outright: it
    # under-reports epsilon (tests/test_gdp_refused.py).
    with pytest.raises(ValueError, match="central-limit approximation"):
        run_epsilon(0.2, 1e-5, 1 / 16, 100, "gdp")
    assert run_epsilon(1.0, 1e-5, 1 / 16, 100, "rdp") > 0


def test_make_private_warns_of_a_delta_of_1_over_n_or_more():
    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.zeros(10, 4)), batch_size=2
    )
    with pytest.warns(UserWarning, match=r"target_delta 0.1 is at least 1/n = 0.1"):
        make_private(
            model, torch.optim.SGD(model.parameters(), lr=0.1), loader, target_delta=0.1,
            max_grad_norm=1.0, noise_multiplier=1.0, verify_layout=False,
        )  # fmt: skip


def test_an_absurd_epsilon_exits_2_at_once(tiny, tmp_path, capsys):
    # Today: over 200 s in Opacus's search (PRV at ever smaller sigma), then training.
    with _deadline(60):
        assert run(*_argv(tiny, tmp_path, "--epsilon", "1e6")) == 2
    assert "--epsilon 1e+06 is above 100" in capsys.readouterr().err
    assert not (tmp_path / "ckpt" / "checkpoint.pt.ledger").exists()


def test_make_private_refuses_an_absurd_target_epsilon_at_once():
    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.zeros(16, 4)), batch_size=1
    )
    with _deadline(60), pytest.raises(ValueError, match="target_epsilon must be at most 100"):
        make_private(
            model, torch.optim.SGD(model.parameters(), lr=0.1), loader, target_delta=1e-5,
            max_grad_norm=1.0, target_epsilon=1e3, epochs=1, accountant="prv",
        )  # fmt: skip


def test_calibration_is_bounded_in_time_and_matches_opacus_when_it_ends():
    from opacus.accountants.utils import get_noise_multiplier

    with pytest.raises(ValueError, match="did not finish within 0 s"):
        calibrate_noise_multiplier(8.0, 1e-5, 1 / 16, 100, "rdp", time_limit=0.0)
    ours = calibrate_noise_multiplier(3.0, 1e-5, 0.05, 200, "rdp")
    theirs = get_noise_multiplier(
        target_epsilon=3.0, target_delta=1e-5, sample_rate=0.05, steps=200, accountant="rdp"
    )
    assert ours == theirs
    # A target the PRV accountant would need minutes for (sigma ~0.15 at q 1/16 over 100
    # steps) is reached without evaluating it there: RDP screens the sigmas far too small.
    with _deadline(120):
        sigma = calibrate_noise_multiplier(90.0, 1e-5, 1 / 16, 100, "prv")
    assert 0 < run_epsilon(sigma, 1e-5, 1 / 16, 100, "prv") <= 90.0
