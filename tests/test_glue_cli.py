"""rmt-glue: task metrics, GLUE loading, end-to-end tiny runs (DP, non-private, denoised,
Opacus), compare's PNG, and the errors a user can act on (exit code 2, a clear message).

The end-to-end runs use a tiny GLUE folder and a tiny BERT (word-piece vocabulary) written into
tmp_path, so they run on any clone; the tests of the real GLUE files and the RoBERTa tokenizer
use ../shared beside the repository and skip when it is absent (a user's clone has none, CI has).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from rmt_kernels.glue import TASKS, get_task
from rmt_kernels.glue.cli import main
from rmt_kernels.glue.data import load_local_split
from rmt_kernels.glue.tasks import accuracy, f1, matthews_correlation, pearson, spearman
from tests.helpers import assert_gaussian_noise

SHARED = Path(__file__).resolve().parents[2] / "shared"
GLUE = SHARED / "data" / "glue"
ROBERTA = SHARED / "models" / "roberta-base"
needs_glue = pytest.mark.skipif(
    not (GLUE / "SST-2" / "train.tsv").exists(),
    reason=f"no GLUE folder at {GLUE} (../shared is beside the repository on CI only)",
)

# Rows of the GLUE files in ../shared (data/README.md): (train, dev); None = file absent.
GLUE_ROWS = {
    "sst2": (67349, 872),
    "cola": (8551, 1043),
    "rte": (2490, 277),
    "wnli": (635, 71),
    "mrpc": (3668, 408),
    "stsb": (5749, 1500),
    "qnli": (None, 5463),
    "mnli": (None, None),
    "qqp": (None, None),
}

WORDS = ["good", "great", "fun", "bad", "dull", "awful", "movie", "plot", "it", "'s", '"', "."]


# ------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------


def test_metrics_on_known_values():
    assert accuracy([1, 0, 1, 1], [1, 0, 0, 1]) == 0.75
    # tp=2, fp=1, fn=1: F1 = 4 / (4 + 2)
    assert f1([1, 1, 1, 0, 0], [1, 1, 0, 1, 0]) == pytest.approx(2 / 3)
    assert f1([0, 0], [0, 0]) == 0.0
    # tp=2, tn=1, fp=1, fn=1: (2 - 1) / sqrt(3 * 3 * 2 * 2)
    assert matthews_correlation([1, 1, 1, 0, 0], [1, 1, 0, 1, 0]) == pytest.approx(1 / 6)
    assert matthews_correlation([1, 1, 1], [1, 0, 1]) == 0.0  # constant prediction
    assert matthews_correlation([0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # Spearman is Pearson of ranks, ties averaged: ranks x = 1 2 3 4, y = 1 2.5 2.5 4.
    assert spearman([1, 2, 3, 4], [1, 5, 5, 100]) == pytest.approx(
        pearson([1, 2, 3, 4], [1, 2.5, 2.5, 4])
    )
    scipy_stats = pytest.importorskip("scipy.stats")
    x, y = [0.3, 1.2, 2.2, 2.0, 4.5, 3.3], [1.0, 0.5, 2.5, 2.5, 5.0, 2.5]
    assert pearson(x, y) == pytest.approx(scipy_stats.pearsonr(x, y)[0])
    assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y)[0])


def test_task_specs():
    assert get_task("SST-2") is TASKS["sst2"]
    assert TASKS["cola"].main_metric == "matthews_correlation"
    assert TASKS["mrpc"].score([1, 0], [1, 1]) == {"f1": pytest.approx(2 / 3), "accuracy": 0.5}
    assert TASKS["stsb"].is_regression and TASKS["stsb"].num_labels == 1
    assert set(TASKS["stsb"].metrics) == {"pearson", "spearman"}
    assert TASKS["mnli"].num_labels == 3
    with pytest.raises(ValueError, match="unknown task 'sst3'; known tasks: sst2"):
        get_task("sst3")


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------


@needs_glue
@pytest.mark.parametrize("name", list(GLUE_ROWS))
def test_loads_each_task_of_the_shared_glue_folder(name):
    task = TASKS[name]
    for split, rows in zip(("train", "validation"), GLUE_ROWS[name], strict=True):
        if rows is None:
            with pytest.raises(ValueError, match=rf"{split} split is not available: .*\.tsv"):
                load_local_split(task, split, GLUE)
            continue
        ds = load_local_split(task, split, GLUE)
        assert len(ds) == rows
        texts = ["text_a", "text_b"][: len(task.text_columns)]
        assert ds.column_names == [*texts, "label"]
        assert all(isinstance(t, str) and t for t in ds["text_a"][:50])
        labels = ds["label"]
        if task.is_regression:
            assert min(labels) >= 0.0 and max(labels) <= 5.0
        else:
            assert set(labels) == set(range(task.num_labels))


@needs_glue
def test_glue_quirks_quotes_bom_and_headerless_cola():
    # A sentence with an unbalanced quote stays one field (QUOTE_NONE): MRPC dev's first pair
    # opens a quote it never closes, which a quote-aware reader runs into the following rows.
    mrpc_dev = load_local_split(TASKS["mrpc"], "validation", GLUE)
    assert len(mrpc_dev) == 408
    quoted = '"The foodservice pie business does not fit our long-term growth strategy.'
    assert mrpc_dev[0]["text_b"] == quoted
    assert mrpc_dev[1]["text_a"].startswith("Magnarelli said Racicot hated")
    # ... MRPC's BOM does not hide its 'Quality' label column, CoLA's first row is data.
    mrpc = load_local_split(TASKS["mrpc"], "train", GLUE)
    assert mrpc[0]["label"] == 1 and mrpc[0]["text_a"].startswith("Amrozi accused")
    cola = load_local_split(TASKS["cola"], "train", GLUE)
    assert cola[0]["text_a"].startswith("Our friends won't buy this analysis")


def test_hub_failure_says_to_pass_data_dir(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    from rmt_kernels.glue.data import load_split

    with pytest.raises(ValueError, match="pass --data-dir with a local GLUE folder"):
        load_split(TASKS["rte"], "train", None)


def test_hub_columns_become_text_a_text_b_label(monkeypatch):
    import datasets

    calls = []

    def fake_hub(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict(
            {"premise": ["a"], "hypothesis": ["b"], "label": [2], "idx": [0]}
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    from rmt_kernels.glue.data import load_split

    ds = load_split(TASKS["mnli"], "validation", None)
    assert calls == [("nyu-mll/glue", "mnli", "validation_matched")]
    assert ds.column_names == ["text_a", "text_b", "label"] and ds[0]["text_b"] == "b"


# ------------------------------------------------------------------------------------------
# End to end, on a tiny GLUE folder and a tiny BERT
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A 24/16-row SST-2 folder (with a quote, as GLUE has) and a 2-layer, hidden-32 BERT config
    folder with a word-piece tokenizer."""
    from transformers import BertConfig, BertTokenizer

    root = tmp_path_factory.mktemp("tiny")
    gen = torch.Generator().manual_seed(0)
    sst2 = root / "glue" / "SST-2"
    sst2.mkdir(parents=True)
    for split, rows in (("train", 24), ("dev", 16)):
        lines = ["sentence\tlabel"]
        for i in range(rows):
            label = i % 2
            words = ["good", "great", "fun"] if label else ["bad", "dull", "awful"]
            picks = torch.randint(0, 3, (3,), generator=gen).tolist()
            lines.append(f"it 's \" {' '.join(words[k] for k in picks)} movie .\t{label}")
        (sst2 / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    stsb = root / "glue" / "STS-B"
    stsb.mkdir()
    header = (
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    )
    for split, rows in (("train", 16), ("dev", 8)):
        lines = [header]
        for i in range(rows):
            a, b = WORDS[i % 6], WORDS[(i * 5) % 6]
            score = 5.0 if a == b else float(i % 5)
            lines.append(
                f"{i}\tmain\tx\t2012\t{i:04d}\tnone\tnone\t{a} movie .\t{b} plot .\t{score:.3f}"
            )
        (stsb / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    model = root / "tiny-bert"
    model.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (model / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(model / "vocab.txt")).save_pretrained(model)
    BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    ).save_pretrained(model)
    return {"glue": root / "glue", "config": model, "root": root}


def run(*argv) -> int:
    """``rmt-glue ARGV`` in this process; the exit code (argparse errors included)."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as exit_:
        return int(exit_.code)


def train_tiny(tiny, out: Path, *extra) -> dict:
    code = run(
        "train", "--task", "sst2", "--data-dir", tiny["glue"], "--init", "random",
        "--config", tiny["config"], "--steps", 3, "--batch-size", 8, "--eval-every", 2,
        "--quiet", "--output", out, *extra,
    )  # fmt: skip
    assert code == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize(
    "mode, extra",
    [
        # rdp: Opacus's PRV accountant takes seconds per calibration on a 2-core machine.
        (
            "dp",
            [
                "--epsilon",
                8,
                "--accountant",
                "rdp",
                "--physical-batch-size",
                4,
                "--pooling",
                "mean",
            ],
        ),
        ("no-dp", ["--no-dp", "--physical-batch-size", 4]),
        # --denoise alone shrinks each step's gradient at kappa 0.75 (under AdamW, the
        # optimizer's default); the first moment when asked for (SGD underneath).
        ("denoise", ["--denoise", "--noise-multiplier", 1, "--secure-mode"]),
        (
            "denoise-moment",
            [
                "--denoise",
                "--denoise-target",
                "moment",
                "--kappa",
                0.5,
                "--norm",
                "preserve",
                "--noise-multiplier",
                1,
            ],
        ),
        ("opacus", ["--engine", "opacus", "--physical-batch-size", 2, "--noise-multiplier", 1]),
    ],
)
def test_end_to_end_tiny_run_writes_the_log(tiny, tmp_path, mode, extra):
    log = train_tiny(tiny, tmp_path / "log.json", *extra)
    assert log["task"] == "sst2" and log["main_metric"] == "accuracy"
    assert set(log["versions"]) >= {"torch", "transformers", "opacus", "rmt_kernels", "python"}
    assert log["versions"]["torch"] == torch.__version__
    assert log["config"]["steps"] == 3 and log["derived"]["train_examples"] == 24
    assert [e["step"] for e in log["evals"]] == [2, 3]
    for e in log["evals"]:
        # A private run's records have no samples_per_s nor time (tests/test_glue_private_log.py,
        # tests/test_redteam_r2.py): its log has the whole run's time only.
        timed = {"seconds", "steps_per_s"} if not log["private"] else set()
        assert {"step", "accuracy", "eval_loss"} | timed <= set(e)
        assert all(e[k] > 0 for k in timed) and 0 <= e["accuracy"] <= 1
    assert log["train_seconds"] > 0 and log["steps_per_s"] > 0
    assert log["peak_memory_mib"] > 0
    if mode == "no-dp":
        assert log["epsilon"] is None and log["delta"] is None
        assert log["evals"][-1]["samples"] == 24  # 3 steps of 8
    else:
        assert log["delta"] == pytest.approx(1 / 24**1.1)
        assert log["evals"][0]["epsilon"] < log["evals"][1]["epsilon"] == log["epsilon"]
        if mode == "dp":  # calibrated to spend (about) epsilon 8 by the last of the 3 steps
            assert 7.9 < log["epsilon"] <= 8.0 + 1e-6 and log["noise_multiplier"] > 0
        else:
            assert log["noise_multiplier"] == 1.0
    assert log["config"]["denoise"] == mode.startswith("denoise")
    assert log["config"]["pooling"] == ("mean" if mode == "dp" else "cls")
    # The target as resolved: never None in the log.
    target = {"denoise-moment": "moment"}.get(mode, "gradient")
    assert log["config"]["denoise_target"] == target
    assert log["config"]["optimizer"] == ("sgd" if target == "moment" else "adamw")
    if mode.startswith("denoise"):  # kappa as resolved: given, or the target's default
        assert log["config"]["denoise_options"]["kappa"] == {"denoise": 0.75}.get(mode, 0.5)
    if mode.startswith("denoise"):
        # Per-layer kept rank and denoised-to-noisy norm ratio at every evaluation: the
        # encoder's Linear weights (32 x 32, 64 x 32), not the 2 x 32 head (min_dim 32).
        for e in log["evals"]:
            stats = e["denoise"]
            assert len(stats) == 2 * 6 + 1  # 6 per layer + the pooler
            assert not any("classifier" in name for name in stats)
            for s in stats.values():
                assert 0 <= s["rank"] <= 32 and 0 <= s["norm_ratio"] <= 1.5
                # The moment's Denoiser comes after its EMA filter, the gradient's first.
                assert s["stage"] == (1 if target == "moment" else 0)
    else:
        assert all("denoise" not in e for e in log["evals"])


def test_length_sorted_batches_change_nothing_but_padding(tiny):
    from transformers import BertTokenizer

    from rmt_kernels.glue.data import encode, load_split
    from rmt_kernels.glue.evaluation import evaluate

    task = get_task("sst2")
    tokenizer = BertTokenizer.from_pretrained(tiny["config"])
    data = encode(load_split(task, "validation", str(tiny["glue"])), tokenizer, 64, False)
    # Make lengths differ so that sorting reorders.
    data.input_ids = [list(ids) for ids in data.input_ids]
    data.input_ids[3] = data.input_ids[3][:4] + data.input_ids[3][-1:]
    if data.token_type_ids is not None:
        data.token_type_ids = [list(t) for t in data.token_type_ids]
        data.token_type_ids[3] = data.token_type_ids[3][:5]
    order = data.by_length(range(len(data)))
    lengths = [len(data.input_ids[i]) for i in order]
    assert lengths == sorted(lengths) and sorted(order) == list(range(len(data)))
    assert order[0] == 3

    class ByWords(torch.nn.Module):
        """Class 1 iff the sum of the token ids is odd: predictions that vary by example and
        ignore padding."""

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            odd = ((input_ids * attention_mask).sum(1) % 2).float()
            return types.SimpleNamespace(logits=torch.stack([1 - odd, odd], dim=1))

    model = ByWords()
    seen = []

    def capture(predictions, labels):
        seen.append(list(predictions))
        return accuracy(predictions, labels)

    got = evaluate(
        model,
        data,
        dataclasses.replace(task, metrics={"accuracy": capture}),
        batch_size=5,
        device=torch.device("cpu"),
    )
    # One example at a time, in the data's order: no padding at all.
    with torch.no_grad():
        inputs = [{k: v for k, v in data.batch([i]).items() if k != "labels"} for i in range(16)]
        preds = [int(model(**x).logits.argmax()) for x in inputs]
    assert seen == [preds]  # each prediction back in its example's place
    assert len(set(preds)) == 2  # (a model predicting one class would not show a mix-up)
    assert got["accuracy"] == pytest.approx(accuracy(preds, data.labels.tolist()))


def test_regression_task_and_frozen_embeddings(tiny, tmp_path):
    out = tmp_path / "stsb.json"
    code = run("train", "--task", "stsb", "--data-dir", tiny["glue"], "--init", "random",
               "--config", tiny["config"], "--steps", 2, "--batch-size", 4, "--quiet",
               "--noise-multiplier", 1, "--freeze-embeddings", "--output", out)  # fmt: skip
    assert code == 0
    log = json.loads(out.read_text())
    assert log["main_metric"] == "pearson" and {"pearson", "spearman"} <= set(log["evals"][-1])
    full = train_tiny(tiny, tmp_path / "full.json", "--noise-multiplier", 1)
    # The embeddings (vocabulary, positions, token types, their LayerNorm) are not trained.
    assert log["derived"]["trainable_parameters"] < full["derived"]["trainable_parameters"] - 1000


def test_secure_mode_is_for_the_native_engine(base, capsys):
    assert run(*base, "--engine", "opacus", "--secure-mode") == 2
    assert "--secure-mode is for DP with --engine native" in capsys.readouterr().err


def test_empty_poisson_batches_are_noise_only_steps(tiny, tmp_path, monkeypatch):
    # Expected batch 1 of 24: about a third of Poisson batches are empty; both engines step,
    # and the gradient such a step releases is the noise alone, N(0, (sigma C / 1)^2) in every
    # coordinate (sigma 1, C 1), pooled over the empty steps (tests.helpers.assert_gaussian_noise
    # derives the bound: a std off by 5% fails, a correct one fails below 1e-6).
    from torch.optim.optimizer import register_optimizer_step_post_hook

    import rmt_kernels.glue.train as train_module

    step_of, released = train_module._logical_step, []

    def spy(run, indices):
        def read(optimizer, args, kwargs):  # after the wrapped optimizer's update: p.grad
            if not len(indices) and len(released) == seen:  # once per logical step
                grads = [p.grad.flatten() for p in run.model.parameters() if p.requires_grad]
                released.append(torch.cat(grads))

        seen = len(released)
        hook = register_optimizer_step_post_hook(read)
        try:
            return step_of(run, indices)
        finally:
            hook.remove()

    monkeypatch.setattr(train_module, "_logical_step", spy)
    for engine in ("native", "opacus"):
        released.clear()
        # A public --noise-seed (and --seed for the batches): a fixed draw, as a test needs.
        args = ["--engine", engine, "--batch-size", 1, "--steps", 8, "--noise-multiplier", 1.0]
        log = train_tiny(tiny, tmp_path / f"{engine}.json", *args, "--noise-seed", 3)
        assert log["evals"][-1]["step"] == 8 and log["epsilon"] > 0
        # The seed's batches include >= 2 empty ones (~20,000 coordinates each).
        assert len(released) >= 2, engine
        assert_gaussian_noise(torch.cat(released), 1.0)


def test_save_then_evaluate(tiny, tmp_path):
    saved = tmp_path / "saved"
    train_tiny(tiny, tmp_path / "log.json", "--no-dp", "--save", saved)
    out = tmp_path / "eval.json"
    code = run(
        "evaluate", "--task", "sst2", "--data-dir", tiny["glue"], "--model", saved, "--output", out
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["examples"] == 16 and 0 <= result["metrics"]["accuracy"] <= 1


def test_compare_draws_one_png(tiny, tmp_path):
    logs = [
        train_tiny(tiny, tmp_path / f"{m}.json", *x) and tmp_path / f"{m}.json"
        for m, x in (("dp", ["--noise-multiplier", 1]), ("nodp", ["--no-dp"]))
    ]
    png = tmp_path / "curves.png"
    assert run("compare", *logs, "--output", png) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert run("compare", *logs, "--output", png, "--metric", "f1") == 2


@needs_glue
@pytest.mark.skipif(not (ROBERTA / "vocab.json").exists(), reason=f"no tokenizer at {ROBERTA}")
def test_end_to_end_on_real_sst2_with_a_tiny_roberta(tmp_path):
    config = json.loads((ROBERTA / "config.json").read_text())
    config.update(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64)
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((ROBERTA / name).read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = tmp_path / "log.json"
    code = run(
        "train",
        "--task",
        "sst2",
        "--data-dir",
        GLUE,
        "--init",
        "random",
        "--config",
        tmp_path,
        "--steps",
        3,
        "--batch-size",
        8,
        "--train-size",
        64,
        "--eval-size",
        32,
        "--denoise",
        "--noise-multiplier",
        1,
        "--quiet",
        "--output",
        out,
    )
    assert code == 0
    log = json.loads(out.read_text())
    assert log["derived"]["train_examples"] == 64 and log["evals"][-1]["step"] == 3


# ------------------------------------------------------------------------------------------
# Errors a user can act on: exit code 2 and a message naming the problem
# ------------------------------------------------------------------------------------------


@pytest.fixture
def base(tiny) -> list:
    return [
        "train",
        "--task",
        "sst2",
        "--data-dir",
        tiny["glue"],
        "--init",
        "random",
        "--config",
        tiny["config"],
        "--steps",
        2,
        "--batch-size",
        8,
        "--quiet",
    ]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--task": "sst3"}, "unknown task 'sst3'"),
        ({"--data-dir": "/nonexistent/glue"}, "GLUE data folder /nonexistent/glue does not exist"),
        ({"--task": "qnli"}, r"qnli: the train split is not available: .*QNLI/train.tsv"),
        ({"--epsilon": "1e-7", "--accountant": "rdp"}, "no noise multiplier reaches epsilon=1e-07"),
        ({"--physical-batch-size": "3"}, "--physical-batch-size 3 must divide --batch-size 8"),
        ({"--epochs": "1"}, "give --steps or --epochs, not both"),
        ({"--kappa": "2"}, "--kappa only apply with --denoise"),
    ],
)
def test_user_errors_exit_2_with_a_clear_message(base, change, message, capsys):
    argv = list(base)
    for flag, value in change.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    assert run(*argv) == 2
    import re

    assert re.search(message, capsys.readouterr().err)


def test_model_folder_without_tokenizer(tiny, tmp_path, capsys):
    (tmp_path / "config.json").write_text((tiny["config"] / "config.json").read_text())
    code = run(
        "train",
        "--task",
        "sst2",
        "--data-dir",
        tiny["glue"],
        "--init",
        "random",
        "--config",
        tmp_path,
        "--steps",
        1,
        "--quiet",
    )
    assert code == 2
    assert f"{tmp_path} has no tokenizer" in capsys.readouterr().err


def test_opacus_engine_denoise_needs_the_drop_in(base, capsys):
    code = run(*base, "--engine", "opacus", "--denoise")
    try:
        import rmt_kernels.opacus  # noqa: F401
    except ImportError:
        assert code == 2
        assert "needs rmt_kernels.opacus.DenoisingPrivacyEngine" in capsys.readouterr().err
    else:
        assert code == 0


def test_python_dash_m_entry_point(tiny):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "rmt_kernels.glue", "train", "--task", "nope", "--data-dir",
         str(tiny["glue"]), "--model", str(tiny["config"])],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert "unknown task 'nope'" in out.stderr
    # One usage line from the CLI's own parser: no traceback, no warnings before it.
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rmt-glue train: error: unknown task"), lines


def test_warm_start_flag_needs_denoise(base, capsys):
    assert run(*base, "--no-warm-start") == 2
    assert "--warm-start only apply with --denoise" in capsys.readouterr().err


@pytest.mark.parametrize("warm", [True, False])
def test_warm_start_flag_reaches_the_denoiser(base, tmp_path, warm):
    """--warm-start (the default) logs how many passes each matrix took; --no-warm-start runs
    the cold path, which records none."""
    out = tmp_path / "log.json"
    flag = "--warm-start" if warm else "--no-warm-start"
    assert run(*base, "--denoise", flag, "--eval-every", "1", "--output", out) == 0
    log = json.loads(out.read_text())
    assert log["config"]["denoise_options"]["warm_start"] is warm
    stats = log["evals"][-1]["denoise"]
    assert stats and all(("passes" in s) is warm for s in stats.values())
    if warm:
        assert all(s["passes"] >= 1 for s in stats.values())
