"""rmt-glue train's post-processing flags (--filter, --filter-beta, --disk-kappa,
--denoise-target, --dp-adam) and --lr-schedule: they parse, build the chain they say, run on a
tiny model, log the noise level each denoising stage used, resume exactly, and bad
combinations exit 2 with a clear message."""

from __future__ import annotations

import math
import re
from dataclasses import asdict

import pytest

from rmt_kernels.dp.stages.denoiser import Denoiser
from rmt_kernels.dp.stages.dp_adam import DPAdam
from rmt_kernels.dp.stages.temporal import DiSKExtrapolation, DiSKFilter, EMAFilter, ema_noise_std
from rmt_kernels.dp.stages.trajectory import TrajectoryDenoiser
from rmt_kernels.glue.cli import _train_config, build_parser
from rmt_kernels.glue.config import GlueConfig
from rmt_kernels.training import stages
from rmt_kernels.training.resume import resolve_optimisation
from rmt_kernels.training.stages import learning_rate, post_processors
from tests.test_glue_cli import base, run, tiny, train_tiny  # noqa: F401 (fixtures)

pytest.importorskip("transformers")
pytest.importorskip("opacus")

PRIVATE = ["--noise-multiplier", 1, "--accountant", "rdp", "--seed", 3, "--noise-seed", 3]


def _cfg(**kw) -> GlueConfig:
    return GlueConfig(task="sst2", model="m", **kw)


def test_the_flags_build_the_chain_they_say():
    assert post_processors(_cfg()) == []
    chain = post_processors(_cfg(filter="ema", filter_beta=0.8))
    assert [type(s) for s in chain] == [EMAFilter] and chain[0].beta == 0.8
    chain = post_processors(
        _cfg(denoise=True, denoise_target="gradient", denoise_options={"kappa": 0.5})
    )
    assert [type(s) for s in chain] == [Denoiser]
    # gradient target: shrink, then filter, then Adam (beta1 0 after a filter).
    chain = post_processors(
        _cfg(denoise=True, denoise_target="gradient", filter="ema", dp_adam="bc")
    )
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


def _cli_cfg(*flags) -> GlueConfig:
    """The GlueConfig ``rmt-glue train`` makes of these flags (nothing read, nothing run)."""
    argv = ["train", "--task", "sst2", "--model", "m", *map(str, flags)]
    return _train_config(build_parser().parse_args(argv))


@pytest.mark.parametrize(
    "flags, target, chain",
    [
        # --denoise alone shrinks each step's gradient (under AdamW, or SGD when asked for).
        (["--denoise"], "gradient", [Denoiser]),
        (["--denoise", "--optimizer", "sgd"], "gradient", [Denoiser]),
        (["--denoise", "--optimizer", "adamw"], "gradient", [Denoiser]),
        # The first moment when asked for: EMA, shrink at its level, DP-Adam, SGD.
        (["--denoise", "--denoise-target", "moment"], "moment", [EMAFilter, Denoiser, DPAdam]),
        # Without --denoise the target is unused: gradient.
        ([], "gradient", []),
        (["--optimizer", "sgd"], "gradient", []),
        (["--filter", "ema"], "gradient", [EMAFilter]),
    ],
)
def test_a_denoise_target_left_out_is_resolved_when_the_config_is_made(flags, target, chain):
    cfg = _cli_cfg(*flags)
    assert cfg.denoise_target == target and asdict(cfg)["denoise_target"] == target
    cfg.check()
    built = post_processors(cfg)
    assert [type(s) for s in built] == chain
    if target == "moment":
        assert built[0].beta == 0.9 and built[2].beta1 == 0.0
        assert built[2].second_moment_from == "released" and not built[2].variance_correction
    given = flags[flags.index("--optimizer") + 1] if "--optimizer" in flags else None
    default = "sgd" if target == "moment" else "adamw"
    assert resolve_optimisation(cfg, None).optimizer == (given or default)
    if "--denoise-target" not in flags:  # The same for a GlueConfig made in Python.
        made = GlueConfig(task="sst2", model="m", denoise=cfg.denoise, optimizer=given)
        assert made.denoise_target == target


@pytest.mark.parametrize(
    "flags, kappa",
    [
        # Left out: the best measured for the target (stages.DEFAULT_KAPPA, tuning.md).
        (["--denoise"], 0.75),
        (["--denoise", "--denoise-target", "gradient"], 0.75),
        (["--denoise", "--denoise-target", "moment"], 1.0),
        (["--denoise", "--denoise-target", "trajectory", "--lr-schedule", "constant"], 1.0),
        # Given: as given, on every target.
        (["--denoise", "--kappa", 1], 1.0),
        (["--denoise", "--denoise-target", "moment", "--kappa", 0.5], 0.5),
    ],
)
def test_a_kappa_left_out_is_the_targets_default_and_reaches_the_denoiser(flags, kappa):
    cfg = _cli_cfg(*flags)
    assert cfg.denoise_options["kappa"] == kappa  # so the log and the checkpoint hold it
    cfg.check()
    denoiser = next(
        s for s in post_processors(cfg) if isinstance(s, (Denoiser, TrajectoryDenoiser))
    )
    assert denoiser.options.kappa == kappa
    assert resolve_optimisation(cfg, None).denoise_options["kappa"] == kappa
    # The same for a GlueConfig made in Python; nothing is filled in without --denoise.
    made = GlueConfig(task="sst2", model="m", denoise=True, denoise_target=cfg.denoise_target)
    if "--kappa" not in flags:
        assert made.denoise_options == {"kappa": kappa}
    assert "kappa" not in GlueConfig(task="sst2", model="m").denoise_options


def _checkpoint(cfg: GlueConfig, optimizer: str) -> dict:
    """checkpoint_extra of a run of ``cfg``."""
    config = {"optimizer": optimizer, "lr": 5e-4, "weight_decay": 0.0}
    config["stages"] = {**stages.flags(cfg), "lr_schedule": cfg.lr_schedule}
    return {"steps": 1, "extra": {"config": config}}


def test_a_resume_without_the_target_continues_the_checkpointed_one():
    resume = ["--denoise", "--checkpoint-dir", "ckpt", "--resume"]
    cfg = _cli_cfg(*resume)
    assert cfg.denoise_target is None  # known once the checkpoint is read
    cfg.check()  # checked as a new run's
    gradient_run = _cli_cfg("--denoise", "--denoise-target", "gradient")
    gradient = _checkpoint(gradient_run, "adamw")
    resumed = resolve_optimisation(cfg, gradient)
    assert (resumed.denoise_target, resumed.optimizer) == ("gradient", "adamw")
    moment = _checkpoint(_cli_cfg("--denoise", "--denoise-target", "moment"), "sgd")
    resumed = resolve_optimisation(cfg, moment)
    assert (resumed.denoise_target, resumed.optimizer) == ("moment", "sgd")
    # Nothing to resume: a new run's target.
    assert resolve_optimisation(cfg, None).denoise_target == "gradient"
    # A config dict that names gradient (a log's, a checkpoint's) stays gradient.
    old = GlueConfig(**{**asdict(gradient_run), "checkpoint_dir": "ckpt", "resume": True})
    assert old.denoise_target == "gradient"
    assert resolve_optimisation(old, gradient).denoise_target == "gradient"
    # A target given must still be the checkpointed one.
    with pytest.raises(ValueError, match=r"denoise_target='gradient' \(now 'moment'\)"):
        resolve_optimisation(_cli_cfg(*resume, "--denoise-target", "moment"), gradient)


def test_a_resume_without_kappa_continues_the_checkpointed_one():
    """A run's kappa never changes under it: a resume that leaves --kappa out gets the
    checkpoint's, not the target's default (0.75 for the gradient)."""
    resume = ["--denoise", "--checkpoint-dir", "ckpt", "--resume"]
    cfg = _cli_cfg(*resume)
    assert cfg.denoise_options.get("kappa") is None  # known once the checkpoint is read
    for trained in (0.75, 1.0, 0.5):
        run = _cli_cfg("--denoise", "--kappa", trained)
        resumed = resolve_optimisation(cfg, _checkpoint(run, "adamw"))
        assert resumed.denoise_options["kappa"] == trained
    at_one = _checkpoint(_cli_cfg("--denoise", "--kappa", 1), "adamw")
    # The checkpoint's kappa given explicitly is accepted.
    explicit = resolve_optimisation(_cli_cfg(*resume, "--kappa", 1), at_one)
    assert explicit.denoise_options["kappa"] == 1.0
    moment = _checkpoint(_cli_cfg("--denoise", "--denoise-target", "moment"), "sgd")
    assert resolve_optimisation(cfg, moment).denoise_options["kappa"] == 1.0
    # Nothing to resume: a new run's default.
    assert resolve_optimisation(cfg, None).denoise_options["kappa"] == 0.75
    # Another kappa given is refused.
    with pytest.raises(ValueError, match=r"'kappa': 1.0.*\(now \{.*'kappa': 0.75"):
        resolve_optimisation(_cli_cfg(*resume, "--kappa", 0.75), at_one)


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


@pytest.mark.parametrize(
    "flags, resume_flags, target, kappa",
    [
        # A run of the moment (--filter-beta is its EMA's decay), resumed with the same flags.
        (
            ["--denoise", "--denoise-target", "moment", "--filter-beta", 0.8],
            ["--denoise", "--denoise-target", "moment", "--filter-beta", 0.8],
            "moment",
            1.0,
        ),
        # A run of --denoise alone, resumed with --denoise alone.
        (["--denoise"], ["--denoise"], "gradient", 0.75),
        # A checkpoint of gradient shrinkage at kappa 1, resumed with --denoise alone: still 1.
        (["--denoise", "--kappa", 1], ["--denoise"], "gradient", 1.0),
    ],
)
def test_the_log_and_checkpoint_hold_the_resolved_target_and_kappa(
    tiny,  # noqa: F811
    tmp_path,
    flags,
    resume_flags,
    target,
    kappa,
):
    from rmt_kernels.dp import checkpoint_extra

    whole = train_tiny(tiny, tmp_path / "whole.json", *PRIVATE, *flags)
    ckpt = ["--checkpoint-dir", tmp_path / "ckpt", "--checkpoint-every", 1]
    part = train_tiny(tiny, tmp_path / "part.json", *PRIVATE, *flags, *ckpt, "--steps", 2)
    saved = checkpoint_extra(tmp_path / "ckpt" / "checkpoint.pt")["extra"]["config"]
    resumed = train_tiny(
        tiny, tmp_path / "resumed.json", *PRIVATE, *resume_flags, *ckpt, "--resume"
    )
    optimizer = "sgd" if target == "moment" else "adamw"
    for log in (whole, part, resumed):
        assert log["config"]["denoise_target"] == target
        assert log["config"]["optimizer"] == optimizer
        assert log["config"]["denoise_options"]["kappa"] == kappa
    assert saved["stages"]["denoise_target"] == target and saved["optimizer"] == optimizer
    assert saved["stages"]["denoise_options"]["kappa"] == kappa
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
        (["--denoise", "--filter-beta", "0.5"], "--filter-beta only applies with --filter ema"),
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
