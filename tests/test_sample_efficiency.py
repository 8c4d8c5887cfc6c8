"""The sample-efficiency experiment's summary (bench/sample_efficiency.py): targets, steps and
seconds to reach them, the table and the plot, from synthetic logs with known answers."""

from __future__ import annotations

import json

import pytest

from bench.sample_efficiency import first_reaching, load_logs, main, markdown, summarise


def _log(method: str, seed: int, accuracies: list[float], step_seconds: float) -> dict:
    evals = []
    for i, acc in enumerate(accuracies, 1):
        record = {"step": 5 * i, "seconds": 5 * i * step_seconds, "accuracy": acc}
        record["samples_per_s"] = 256 / step_seconds
        if method == "shrink-grad":
            record["denoise"] = {
                "bert.encoder.layer.0.attention.self.query.weight": {"rank": i, "norm_ratio": 0.1},
                "bert.encoder.layer.0.intermediate.dense.weight": {"rank": 2, "norm_ratio": 0.2},
            }
        evals.append(record)
    dp = method != "non-private"
    return {
        "epsilon": 8.0 if dp else None,
        "delta": 1e-5 if dp else None,
        "noise_multiplier": 0.4 if dp else None,
        "config": {
            "seed": seed,
            "model": "/x/model",
            "batch_size": 256,
            "max_length": 64,
            "max_grad_norm": 1.0,
            "lr": 1e-3,
            "eval_every": 5,
            "denoise_options": {"kappa": 1.0} if method == "shrink-grad" else None,
        },
        "derived": {
            "trainable_parameters": 10,
            "train_examples": 100,
            "eval_examples": 10,
            "sample_rate": 0.01,
            "physical_batch_size": 128,
            "steps": 5 * len(accuracies),
            "device": "cpu",
        },
        "versions": {"torch": "x", "transformers": "y", "opacus": "z", "python": "3"},
        "evals": evals,
    }


@pytest.fixture
def logs(tmp_path):
    runs = {
        # Plain DP-SGD ends at 0.80 on average: targets 0.72 and 0.76.
        ("dp", 0): [0.5, 0.6, 0.73, 0.78, 0.82],
        ("dp", 1): [0.5, 0.5, 0.6, 0.77, 0.78],
        ("shrink-grad", 0): [0.6, 0.75, 0.8, 0.81, 0.83],
        ("shrink-grad", 1): [0.5, 0.73, 0.74, 0.79, 0.8],
        ("non-private", 0): [0.8, 0.85, 0.86, 0.87, 0.88],
    }
    for (method, seed), accs in runs.items():
        path = tmp_path / f"{method}-seed{seed}.json"
        path.write_text(json.dumps(_log(method, seed, accs, step_seconds=2.0)))
    return tmp_path


def test_first_reaching_is_the_first_evaluation_at_or_above_the_target():
    log = _log("dp", 0, [0.5, 0.72, 0.7, 0.9], step_seconds=3.0)
    assert first_reaching(log, 0.72) == (10, 30.0)
    assert first_reaching(log, 0.8) == (20, 60.0)
    assert first_reaching(log, 0.95) is None


def test_summary_targets_and_steps(logs):
    summary = summarise(load_logs(logs))
    assert summary["reference"] == pytest.approx(0.80)
    assert summary["targets"][0.90] == pytest.approx(0.72)
    assert summary["targets"][0.95] == pytest.approx(0.76)
    dp, den = summary["methods"]["dp"], summary["methods"]["shrink-grad"]
    assert [h[0] for h in dp[0.90]] == [15, 20] and [h[0] for h in dp[0.95]] == [20, 20]
    assert [h[0] for h in den[0.90]] == [10, 10] and [h[0] for h in den[0.95]] == [15, 20]
    assert den[0.95][1] == (20, 40.0)
    table = markdown(summary, load_logs(logs), "python -m bench.sample_efficiency")
    # Last 4 evaluations: seed 0 (0.75+0.80+0.81+0.83)/4 = 0.7975, seed 1 0.765 -> 0.7812 ± 0.0230.
    assert (
        "| shrink-grad | 0.001 | 2 | 0.8150 ± 0.0212 (0.8000-0.8300) | 0.7812 ± 0.0230 "
        "(0.7650-0.7975) | 10.0 ± 0.0 (10.0-10.0)" in table
    )
    assert "| non-private | 0.001 | 1 | 0.8800 | 0.8650 |" in table


def test_never_reaching_is_reported_not_hidden(logs):
    path = logs / "shrink-grad-seed1.json"
    path.write_text(json.dumps(_log("shrink-grad", 1, [0.5, 0.5, 0.5, 0.5, 0.5], 2.0)))
    summary = summarise(load_logs(logs))
    table = markdown(summary, load_logs(logs), "cmd")
    assert "10.0, 1/2 never" in table


def test_summary_only_writes_table_and_png(logs, capsys):
    assert main(["--summary-only", "--out", str(logs)]) == 0
    assert (logs / "summary.md").read_text().startswith("# Sample efficiency on SST-2")
    png = (logs / "sst2-minilm.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "steps to 90%" in capsys.readouterr().out


def test_no_plain_dp_log_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no plain DP-SGD log"):
        main(["--summary-only", "--out", str(tmp_path)])


def test_sweep_table_marks_each_methods_best_lr(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    for name, lr, accs in [
        ("dp", 1e-3, [0.5, 0.7, 0.75, 0.76, 0.77]),
        ("dp", 3e-3, [0.6, 0.78, 0.8, 0.81, 0.8]),
        ("shrink-grad", 3e-3, [0.5, 0.5, 0.6, 0.7, 0.7]),
    ]:
        log = _log(name, 0, accs, step_seconds=1.0)
        log["config"]["lr"] = lr
        (sweep / f"{name}-lr{lr:g}-seed0.json").write_text(json.dumps(log))
    assert main(["--summary-only", "--sweep", "1", "--out", str(tmp_path)]) == 0
    text = (sweep / "sweep.md").read_text()
    # Reference 0.80 (best plain final): 95% = 0.76, reached at step 10 by lr 3e-3, 20 by 1e-3.
    assert "| dp **best** | 0.003 |" in text and "| dp | 0.001 |" in text
    assert "(0.8000)" in text
    row = next(line for line in text.splitlines() if line.startswith("| dp | 0.001"))
    assert row.split("|")[7].strip() == "20"
    assert "| shrink-grad | 0.003 |" in text  # a single lr is not marked


def test_unknown_method_is_a_clear_error():
    with pytest.raises(SystemExit):
        main(["--summary-only", "--lr", "nope=1e-3"])


def test_every_method_is_a_valid_training_config(tmp_path):
    """Each arm's overrides pass GlueConfig's checks (a misspelt field or option would
    otherwise fail hours into `make experiment`); the tuned kappa reaches the config."""
    from bench.efficiency_methods import METHODS
    from bench.sample_efficiency import parse_args, run_configs

    runs = run_configs(parse_args(["--model", "/x/model", "--out", str(tmp_path)]))
    private = [m for m in METHODS.values() if m.private]
    assert len(runs) == 3 * len(private) + (len(METHODS) - len(private))
    configs = {(name, seed): cfg for name, seed, cfg in runs}
    for method in METHODS.values():
        cfg = configs[method.name, 0]
        assert cfg.lr == method.lr and cfg.dp == method.private
        for key, value in method.overrides.items():
            assert getattr(cfg, key) == value, (method.name, key)
    tuned = configs["shrink-grad-kappa0.75", 1]
    assert tuned.denoise_options["kappa"] == 0.75 and tuned.denoise_target == "gradient"
    assert tuned.noise_seed == 1


def test_reuse_recognises_a_finished_run_by_its_resolved_config(tmp_path):
    """--reuse keeps a finished log: its config is the one training resolved (optimizer,
    weight decay and kappa filled in), so the comparison resolves too; another lr, another
    kappa, or an unfinished log, is trained again."""
    from dataclasses import replace

    from bench.sample_efficiency import _same_run, parse_args, run_configs
    from rmt_kernels.training.config import logged_config
    from rmt_kernels.training.resume import resolve_optimisation

    args = parse_args(["--model", "/x/model", "--out", str(tmp_path)])
    for name, _, cfg in run_configs(args):
        written = logged_config(resolve_optimisation(cfg, None))  # as train() writes it
        assert written["optimizer"] is not None and written["weight_decay"] is not None, name
        log = {"config": written, "derived": {"steps": 100}, "evals": [{"step": 100}]}
        assert _same_run(log, cfg), name
        assert not _same_run(log, replace(cfg, lr=cfg.lr * 2)), name
        assert not _same_run({**log, "evals": [{"step": 50}]}, cfg), name
        if cfg.denoise:
            other = {**cfg.denoise_options, "kappa": cfg.denoise_options["kappa"] / 2}
            assert not _same_run(log, replace(cfg, denoise_options=other)), name
