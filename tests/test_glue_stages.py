"""rmt-glue train's post-processing flags (--filter, --filter-beta, --disk-kappa,
--denoise-target, --dp-adam) and --lr-schedule: they parse, build the chain they say, run on a
tiny model, log the noise level each denoising stage used, resume exactly, and bad
combinations exit 2 with a clear message."""

from __future__ import annotations

import math
import re

import pytest

from rmt_kernels.dp.dp_adam import DPAdam
from rmt_kernels.dp.postprocess import Denoiser
from rmt_kernels.dp.temporal import DiSKExtrapolation, DiSKFilter, EMAFilter, ema_noise_std
from rmt_kernels.dp.trajectory import TrajectoryDenoiser
from rmt_kernels.glue.config import TrainConfig
from rmt_kernels.glue.stages import learning_rate, post_processors
from tests.test_glue_cli import base, run, tiny, train_tiny  # noqa: F401 (fixtures)

pytest.importorskip("transformers")
pytest.importorskip("opacus")

PRIVATE = ["--noise-multiplier", 1, "--accountant", "rdp", "--seed", 3, "--noise-seed", 3]


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(task="sst2", model="m", **kw)


def test_the_flags_build_the_chain_they_say():
    assert post_processors(_cfg()) == []
    chain = post_processors(_cfg(filter="ema", filter_beta=0.8))
    assert [type(s) for s in chain] == [EMAFilter] and chain[0].beta == 0.8
    chain = post_processors(_cfg(denoise=True, denoise_options={"kappa": 0.5}))
    assert [type(s) for s in chain] == [Denoiser]
    # gradient target: shrink, then filter, then Adam (beta1 0 after a filter).
    chain = post_processors(_cfg(denoise=True, filter="ema", dp_adam="bc"))
    assert [type(s) for s in chain] == [Denoiser, EMAFilter, DPAdam]
    assert chain[2].beta1 == 0.0 and chain[2].variance_correction
    chain = post_processors(_cfg(dp_adam="plain"))
    assert [type(s) for s in chain] == [DPAdam]
    assert chain[0].beta1 == 0.9 and not chain[0].variance_correction
    # moment target: EMA, shrink at its level, Adam without a second filter, v from the release.
    chain = post_processors(_cfg(denoise=True, denoise_target="moment", filter_beta=0.95))
    assert [type(s) for s in chain] == [EMAFilter, Denoiser, DPAdam]
    assert chain[0].beta == 0.95 and chain[2].beta1 == 0.0
    assert chain[2].second_moment_from == "released" and not chain[2].variance_correction
    # DiSK: its filter, then its extrapolation last (after a DPAdam for DiSK-Adam).
    chain = post_processors(_cfg(filter="disk", disk_kappa=0.6))
    assert [type(s) for s in chain] == [DiSKFilter, DiSKExtrapolation]
    assert chain[0].kappa == chain[1].kappa == 0.6
    chain = post_processors(
        _cfg(filter="disk", dp_adam="bc", denoise=True, denoise_target="moment")
    )
    assert [type(s) for s in chain] == [DiSKFilter, Denoiser, DPAdam, DiSKExtrapolation]
    chain = post_processors(_cfg(denoise=True, denoise_target="trajectory"))
    assert [type(s) for s in chain] == [TrajectoryDenoiser]


def test_linear_schedule_decays_to_zero_over_the_run():
    cfg = _cfg(lr=0.1, lr_schedule="linear")
    assert [learning_rate(cfg, s, 4) for s in range(4)] == pytest.approx([0.1, 0.075, 0.05, 0.025])
    assert learning_rate(_cfg(lr=0.1), 3, 4) == 0.1


@pytest.mark.parametrize(
    "extra",
    [
        ["--filter", "ema", "--filter-beta", 0.8, "--optimizer", "sgd"],
        ["--dp-adam", "plain", "--lr-schedule", "linear"],
        ["--dp-adam", "bc", "--filter", "ema"],
        ["--denoise", "--denoise-target", "moment", "--dp-adam", "bc", "--kappa", 0.5],
        ["--filter", "disk", "--disk-kappa", 0.6],
        ["--filter", "disk", "--dp-adam", "bc", "--save", "SAVE"],
        ["--denoise", "--denoise-target", "trajectory", "--kappa", 0.5],
        # The Opacus drop-in runs the same chains.
        ["--engine", "opacus", "--filter", "ema", "--dp-adam", "bc"],
        ["--engine", "opacus", "--filter", "disk", "--dp-adam", "plain"],
        ["--engine", "opacus", "--denoise", "--denoise-target", "moment"],
    ],
)
def test_tiny_runs_with_each_flag(tiny, tmp_path, extra):  # noqa: F811
    extra = [tmp_path / "saved" if a == "SAVE" else a for a in extra]
    log = train_tiny(tiny, tmp_path / "log.json", *PRIVATE, *extra)
    cfg = log["config"]
    assert [e["step"] for e in log["evals"]] == [2, 3]
    assert all(0 <= e["accuracy"] <= 1 for e in log["evals"])
    if "--dp-adam" in extra or "moment" in extra or "disk" in extra or "trajectory" in extra:
        assert cfg["optimizer"] == "sgd"
    if "opacus" in extra:
        assert all("denoise" not in e for e in log["evals"])
    if "trajectory" in extra:  # the sum's level: sigma * sqrt(t)
        for e in log["evals"]:
            for s in e["denoise"].values():
                assert s["sigma"] == pytest.approx(1.0 / 8 * math.sqrt(e["step"]))
    if "moment" in extra and "opacus" not in extra:  # (the native engine logs the stats)
        # The moment's noise level at each evaluation step, for every denoised matrix.
        sigma = 1.0 * 1.0 / 8  # noise multiplier * C / batch
        for e in log["evals"]:
            stats = e["denoise"]
            assert len(stats) == 2 * 6 + 1
            for s in stats.values():
                assert s["stage"] == 1
                assert s["sigma"] == pytest.approx(ema_noise_std(sigma, 0.9, e["step"]))


@pytest.mark.parametrize(
    "flags",
    [
        # (A constant lr: the 2-step first part of a linear schedule would decay over 2 steps.)
        ["--denoise", "--denoise-target", "moment", "--dp-adam", "bc", "--kappa", 0.5],
        ["--filter", "disk", "--dp-adam", "plain"],  # evaluated at DiSK's iterate, resumed at z
    ],
)
def test_a_resume_continues_the_stages_exactly(tiny, tmp_path, flags):  # noqa: F811
    whole = train_tiny(tiny, tmp_path / "whole.json", *PRIVATE, *flags)
    ckpt = ["--checkpoint-dir", tmp_path / "ckpt", "--checkpoint-every", 1]
    train_tiny(tiny, tmp_path / "part.json", *PRIVATE, *flags, *ckpt, "--steps", 2)
    resumed = train_tiny(tiny, tmp_path / "resumed.json", *PRIVATE, *flags, *ckpt, "--resume")
    for key in ("eval_loss", "accuracy"):
        assert resumed["evals"][-1][key] == whole["evals"][-1][key], key


def test_a_resume_cannot_change_the_stages(tiny, tmp_path, capsys):  # noqa: F811
    ckpt = ["--checkpoint-dir", tmp_path / "ckpt"]
    train_tiny(tiny, tmp_path / "a.json", *PRIVATE, *ckpt, "--filter", "ema", "--steps", 2)
    code = run(
        "train", "--task", "sst2", "--data-dir", tiny["glue"], "--init", "random",
        "--config", tiny["config"], "--steps", 3, "--batch-size", 8, "--quiet", *PRIVATE,
        *ckpt, "--resume", "--filter", "none",
    )  # fmt: skip
    assert code == 2
    assert "filter='ema' (now 'none')" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--filter", "kalman"], "invalid choice: 'kalman'"),
        (["--dp-adam", "yes"], "invalid choice: 'yes'"),
        (["--lr-schedule", "cosine"], "invalid choice: 'cosine'"),
        (["--denoise-target", "moment"], "--denoise-target moment shrinks with --denoise"),
        (["--filter-beta", "0.5"], "--filter-beta only applies with --filter ema"),
        (["--disk-kappa", "0.5", "--filter", "ema"], "--disk-kappa only applies with --filter"),
        (["--filter", "ema", "--filter-beta", "1"], r"--filter-beta must be in \[0, 1\)"),
        (["--dp-adam", "bc", "--optimizer", "adamw"], "--optimizer adamw: with --dp-adam bc"),
        (["--filter", "ema", "--no-dp"], "need DP"),
        (
            ["--denoise", "--denoise-target", "trajectory", "--lr-schedule", "linear"],
            "needs --lr-schedule constant",
        ),
    ],
)
def test_bad_flags_exit_2_with_a_clear_message(base, extra, message, capsys):  # noqa: F811
    assert run(*base, *extra) == 2
    assert re.search(message, capsys.readouterr().err)
