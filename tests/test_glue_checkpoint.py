"""rmt-glue train with --checkpoint-dir / --resume, and under torchrun (2 CPU processes)."""

from __future__ import annotations

import json
import sys

import pytest

from tests.test_dp_distributed import free_port, run_group
from tests.test_glue_cli import run, tiny, train_tiny  # noqa: F401 (tiny is a fixture)

pytest.importorskip("transformers")
pytest.importorskip("opacus")

PRIVATE = ["--noise-multiplier", 1, "--accountant", "rdp", "--seed", 3, "--noise-seed", 3]


def test_resume_continues_to_the_uninterrupted_run(tiny, tmp_path):  # noqa: F811
    whole = train_tiny(tiny, tmp_path / "whole.json", *PRIVATE)
    ckpt = tmp_path / "ckpt"
    # The first 2 of the 3 steps (same data order, same noise), checkpointed, then resumed.
    first = ["--checkpoint-dir", ckpt, "--checkpoint-every", 1]
    part = train_tiny(tiny, tmp_path / "part.json", *PRIVATE, *first, "--steps", 2)
    assert [e["step"] for e in part["evals"]] == [2]
    resumed = train_tiny(tiny, tmp_path / "resumed.json", *PRIVATE, *first, "--resume")
    assert [e["step"] for e in resumed["evals"]] == [2, 3]
    assert resumed["epsilon"] == whole["epsilon"]
    for key in ("eval_loss", "accuracy", "epsilon"):
        assert resumed["evals"][-1][key] == whole["evals"][-1][key], key


def test_checkpoint_dir_of_another_run_needs_resume(tiny, tmp_path, capsys):  # noqa: F811
    ckpt = ["--checkpoint-dir", tmp_path / "ckpt"]
    train_tiny(tiny, tmp_path / "a.json", *PRIVATE, *ckpt)
    code = run(
        "train", "--task", "sst2", "--data-dir", tiny["glue"], "--init", "random",
        "--config", tiny["config"], "--steps", 3, "--quiet", *PRIVATE, *ckpt,
    )  # fmt: skip
    assert code == 2
    assert "--resume" in capsys.readouterr().err
    for bad, message in (
        (["--checkpoint-every", 2], "--checkpoint-every needs --checkpoint-dir"),
        (["--resume"], "--resume needs --checkpoint-dir"),
        ([*ckpt, "--engine", "opacus"], "--engine native"),
    ):
        code = run(
            "train", "--task", "sst2", "--data-dir", tiny["glue"], "--init", "random",
            "--config", tiny["config"], "--quiet", *PRIVATE, *bad,
        )  # fmt: skip
        assert code == 2
        assert message in capsys.readouterr().err


def test_torchrun_two_processes_checkpoint_and_resume(tiny, tmp_path):  # noqa: F811
    out = tmp_path / "dist.json"

    def torchrun(*extra):
        args = [
            "train", "--task", "sst2", "--data-dir", tiny["glue"], "--init", "random",
            "--config", tiny["config"], "--batch-size", 8, "--quiet", "--output", out,
            "--checkpoint-dir", tmp_path / "ckpt", "--eval-every", 2, *PRIVATE, *extra,
        ]  # fmt: skip
        proc = run_group(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
             "--master-port", str(free_port()), "-m", "rmt_kernels.glue", *map(str, args)]
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
        return proc.stdout.decode(), json.loads(out.read_text())

    # 2 of 3 steps with a checkpoint (every rank hands rank 0 its sampler state), then resumed
    # on 2 processes (every rank loads, rank 0 sends the ledger).
    torchrun("--steps", 2)
    stdout, log = torchrun("--steps", 3, "--resume")
    # The global sample rate (8 of 24 examples): the one-process run's epsilon.
    single = train_tiny(tiny, tmp_path / "single.json", *PRIVATE)
    assert log["epsilon"] == pytest.approx(single["epsilon"], rel=1e-12)
    assert [e["step"] for e in log["evals"]] == [2, 3]
    # One final line: only rank 0 reports.
    assert stdout.count("after 3 steps") == 1
