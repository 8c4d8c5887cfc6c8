"""rmt-lm: E2E's metrics on hand-computed cases, the data (multi-reference grouping, the prompt
and its masked labels), the tokenizers of ../shared, the per-example loss, batched generation,
end-to-end tiny runs (train / evaluate / generate; non-private, private full fine-tuning of
GPT-2 and Llama, private with LoRA or frozen norms, Opacus, checkpoint and resume, torchrun),
and the errors a user can act on (exit code 2 before training).

Everything that reads E2E or a tokenizer uses ../shared beside the repository and skips when it
is absent (a user's clone has none, CI has). The runs are tiny: 2-layer, hidden-64 decoders, 24
training pairs, 3 meaning representations evaluated, 2 steps.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rmt_kernels.lm.cli import main
from rmt_kernels.lm.data import (
    IGNORE_INDEX,
    Tokens,
    encode_pairs,
    group_references,
    load_split,
    select_groups,
)
from rmt_kernels.lm.metrics import bleu, rouge_l

REPOSITORY = Path(__file__).resolve().parents[1]
SHARED = REPOSITORY.parent / "shared"
E2E = SHARED / "data" / "e2e"
GPT2 = SHARED / "models" / "gpt2"
LLAMA = SHARED / "models" / "llama2-tokenizer" / "tokenizer.model"
needs_e2e = pytest.mark.skipif(
    not (E2E / "trainset.csv").exists() or not (GPT2 / "vocab.json").exists(),
    reason=f"no E2E folder at {E2E} or GPT-2 tokenizer at {GPT2} (../shared is beside the "
    "repository on CI only)",
)
needs_llama = pytest.mark.skipif(
    not LLAMA.exists(), reason=f"no Llama-2 tokenizer at {LLAMA} (../shared, CI only)"
)

# ------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------


def test_perfect_generations_score_bleu_100_and_rouge_l_1():
    hyps = ["the cat sat on the mat .", "a dog ran in the park ."]
    refs = [["the cat sat on the mat .", "there is a cat"], ["a dog ran in the park ."]]
    assert bleu(hyps, refs) == pytest.approx(100.0)
    assert rouge_l(hyps, refs) == pytest.approx(1.0)
    # A generation equal to any one of its references scores as perfectly.
    assert bleu(["a b c d"], [["x y z", "a b c d"]]) == pytest.approx(100.0)
    assert rouge_l(["a b c d"], [["x y z", "a b c d"]]) == pytest.approx(1.0)


def test_metrics_against_hand_computed_values():
    # BLEU: every n-gram precision is 1, the brevity penalty exp(1 - 6/4) (reference 6 words,
    # hypothesis 4) ...
    assert bleu(["a b c d"], [["a b c d e f"]]) == pytest.approx(100 * 2.718281828 ** (-0.5))
    # ... and 1 when another reference has the hypothesis's length (the closest one counts).
    assert bleu(["a b c d"], [["a b c d e f", "a b c d"]]) == pytest.approx(100.0)
    # ROUGE-L: LCS 3 of 3 hypothesis and 6 reference tokens: P 1, R 1/2, F 2/3; the best of
    # the references counts, and the mean is over meaning representations.
    assert rouge_l(["the cat sat"], [["the cat sat on the mat"]]) == pytest.approx(2 / 3)
    assert rouge_l(["the cat sat", "x"], [["the cat sat on the mat", "the cat"], ["y"]]) == (
        pytest.approx((0.8 + 0.0) / 2)  # vs "the cat": LCS 2, P 2/3, R 1, F 0.8
    )
    with pytest.raises(ValueError, match="2 hypotheses for 1 reference groups"):
        bleu(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="empty"):
        rouge_l(["a"], [[]])


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------


def test_references_are_grouped_by_meaning_representation():
    mrs = ["m1", "m2", "m1", "m3", "m2"]
    refs = ["a", "b", "c", "d", "e"]
    groups = group_references(mrs, refs)
    assert groups == [("m1", ["a", "c"]), ("m2", ["b", "e"]), ("m3", ["d"])]
    picked = select_groups(groups, 2, seed=0)
    assert len(picked) == 2 and all(g in groups for g in picked)
    with pytest.raises(ValueError, match="--eval-size 4: the split has 3"):
        select_groups(groups, 4, seed=0)


@needs_e2e
def test_e2e_splits_and_dev_grouping():
    dev = load_split(E2E, "dev")
    with open(E2E / "devset.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(dev) == len(rows) == 4672
    groups = group_references(dev["mr"], dev["ref"])
    # E2E's dev set: 547 meaning representations (test: 630), 4672 references between them.
    assert len(groups) == 547 and sum(len(r) for _, r in groups) == 4672
    assert len(group_references(*load_split(E2E, "test")[:].values())) == 630
    first_mr = rows[0]["mr"]
    assert groups[0] == (first_mr, [r["ref"] for r in rows if r["mr"] == first_mr])
    assert len(groups[0][1]) == 6


@needs_e2e
def test_labels_are_the_reference_and_eos_only():
    from rmt_kernels.lm.model import load_tokenizer

    tokens = Tokens(load_tokenizer(GPT2))
    mr, ref = "name[The Eagle], eatType[pub]", "The Eagle is a pub."
    data = encode_pairs([mr, "name[X]"], [ref, "X."], tokens, max_length=64)
    batch = data.batch([0, 1])
    prompt = tokens.prompt(mr)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    n = len(data.input_ids[0])
    assert ids[0, : len(prompt)].tolist() == prompt
    assert (labels[0, : len(prompt)] == IGNORE_INDEX).all()
    target = labels[0, len(prompt) : n].tolist()
    assert target[-1] == tokens.eos and tokens.tokenizer.decode(target[:-1]).strip() == ref
    # The shorter row: padding has no attention and no label.
    m = len(data.input_ids[1])
    assert mask[1, :m].all() and not mask[1, m:].any() and (labels[1, m:] == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="--max-length 5: a prompt is"):
        tokens.example(mr, ref, max_length=5)


@needs_llama
@needs_e2e
def test_llama_tokenizer_encodes_as_sentencepiece_does():
    import sentencepiece

    from rmt_kernels.lm.model import load_tokenizer

    tokenizer = load_tokenizer(LLAMA)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(LLAMA))
    assert len(tokenizer) == sp.get_piece_size() == 32000
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (sp.bos_id(), sp.eos_id())
    rows = load_split(E2E, "train").select(range(300))
    for text in [*rows["mr"], *rows["ref"]]:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text


# ------------------------------------------------------------------------------------------
# The loss and generation of a tiny decoder
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    if not (GPT2 / "vocab.json").exists():
        pytest.skip(f"no GPT-2 tokenizer at {GPT2} (../shared, CI only)")
    from rmt_kernels.lm.model import load_tokenizer

    return load_tokenizer(GPT2)


def _tiny(name: str, tokenizer):
    from rmt_kernels.lm.config import LmConfig
    from rmt_kernels.lm.model import build_model

    torch.manual_seed(0)
    return build_model(LmConfig(model=name), tokenizer).eval()


@pytest.mark.parametrize("reduction", ["sequence_mean", "sequence_sum"])
def test_the_training_loss_is_a_mean_of_per_example_losses(gpt2_tokenizer, reduction):
    # Each example's loss is its own (a function of its row alone), whatever else the batch
    # holds: the batch loss equals the mean of the examples' losses computed one at a time.
    # The model's labels= loss (a mean over the batch's tokens) fails this: the examples differ
    # in length.
    from rmt_kernels.lm.config import LmConfig
    from rmt_kernels.lm.task import LmFineTuning

    tokens = Tokens(gpt2_tokenizer)
    data = encode_pairs(
        ["name[A]", "name[The Long Name], food[French], area[riverside]"],
        ["A is here.", "The Long Name serves French food by the riverside, for families."],
        tokens,
        max_length=64,
    )
    assert len(data.input_ids[0]) != len(data.input_ids[1])
    model = _tiny("gpt2-tiny", gpt2_tokenizer)
    task = LmFineTuning()
    task.cfg = LmConfig(model="gpt2-tiny", loss_reduction=reduction)
    cpu = torch.device("cpu")
    with torch.no_grad():
        both = task.loss(model, data, torch.tensor([0, 1]), cpu)
        alone = [task.loss(model, data, torch.tensor([i]), cpu) for i in (0, 1)]
        batch = data.batch([0, 1])
        coupled = model(**batch).loss  # the batch-coupled loss the task must not use
    assert both.item() == pytest.approx((alone[0].item() + alone[1].item()) / 2, rel=1e-5)
    if reduction == "sequence_mean":
        assert abs(coupled.item() - both.item()) > 1e-3


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_batched_generation_equals_one_prompt_at_a_time(gpt2_tokenizer, name):
    # Left padding and the attention mask: a prompt's greedy continuation does not depend on
    # the prompts batched with it (a model whose positions ignored the padding would differ).
    from rmt_kernels.lm.generation import generate

    model = _tiny(name, gpt2_tokenizer)
    # Non-zero biases and a sharper output make the continuations differ from prompt to prompt.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    tokens = Tokens(gpt2_tokenizer)
    prompts = [tokens.prompt(mr) for mr in ("name[A]", "name[Blue Spice], area[city centre]")]
    cpu = torch.device("cpu")
    batched = generate(model, gpt2_tokenizer, prompts, batch_size=2, max_new_tokens=6, device=cpu)
    single = [
        generate(model, gpt2_tokenizer, [p], batch_size=1, max_new_tokens=6, device=cpu)[0]
        for p in prompts
    ]
    assert batched == single and all(batched)


# ------------------------------------------------------------------------------------------
# End to end on E2E
# ------------------------------------------------------------------------------------------


def run(*argv) -> int:
    """``rmt-lm ARGV`` in this process; the exit code (argparse errors included)."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as exit_:
        return int(exit_.code)


TINY_RUN = ["--data-dir", E2E, "--train-size", 24, "--eval-size", 3, "--steps", 2,
            "--batch-size", 4, "--physical-batch-size", 2, "--max-new-tokens", 8,
            "--accountant", "rdp", "--quiet"]  # fmt: skip


def train(tmp: Path, name: str, *extra) -> dict:
    out = tmp / f"{name}.json"
    assert run("train", *TINY_RUN, "--output", out, *extra) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def nodp(tmp_path_factory) -> tuple[Path, dict]:
    """A non-private gpt2-tiny run, saved: (the saved folder, its log)."""
    if not (E2E / "trainset.csv").exists() or not (GPT2 / "vocab.json").exists():
        pytest.skip(f"no E2E folder at {E2E} or GPT-2 tokenizer (../shared, CI only)")
    tmp = tmp_path_factory.mktemp("lm")
    log = train(tmp, "nodp", "--model", "gpt2-tiny", "--no-dp", "--save", tmp / "model")
    return tmp / "model", log


def _check_log(log: dict, private: bool) -> None:
    assert log["task"] == "e2e" and log["main_metric"] == "bleu"
    assert log["derived"]["train_examples"] == 24 and log["derived"]["eval_examples"] == 3
    last = log["evals"][-1]
    assert last["step"] == 2 and 0 <= last["bleu"] <= 100 and 0 <= last["rouge_l"] <= 1
    assert last["eval_loss"] > 0 and len(last["generations"]) == 3
    assert log["private"] is private
    # A private run's records hold no statistic of its training batches (their mean loss).
    assert ("train_loss" in last) is not private


@needs_e2e
def test_train_evaluate_generate_without_privacy(nodp, tmp_path, capsys):
    model, log = nodp
    _check_log(log, private=False)
    assert log["epsilon"] is None and log["config"]["dp"] is False
    out = tmp_path / "eval.json"
    assert run("evaluate", "--model", model, "--data-dir", E2E, "--eval-size", 3,
               "--max-new-tokens", 8, "--output", out) == 0  # fmt: skip
    result = json.loads(out.read_text())
    assert result["meaning_representations"] == 3 and result["references"] >= 3
    assert {"bleu", "rouge_l", "eval_loss"} <= set(result["metrics"])
    # The saved model is the trained one: the same evaluation as the run's last one.
    assert result["metrics"]["eval_loss"] == pytest.approx(log["evals"][-1]["eval_loss"], 1e-4)
    capsys.readouterr()
    assert run("generate", "--model", model, "--data-dir", E2E, "--first", 2,
               "--max-new-tokens", 4) == 0  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    dev = load_split(E2E, "dev")
    assert len(lines) == 2 and lines[0].split("\t")[0] == dev[0]["mr"]
    assert run("generate", "--model", model, "--mr", "name[The Eagle], eatType[pub]") == 0
    assert capsys.readouterr().out.startswith("name[The Eagle], eatType[pub]\t")


@needs_e2e
def test_private_lora_trains_the_adapters_only(tmp_path):
    # LoRA on c_attn needs no rule for GPT-2's Conv1D or its tied embeddings (the base is frozen).
    # Only the adapters move, and they do (Opacus #820: adapters silently never updated). The
    # saved model has them merged: c_attn differs from the random init, nothing else does.
    from transformers import AutoModelForCausalLM

    from rmt_kernels.lm.config import LmConfig
    from rmt_kernels.lm.model import build_model, load_tokenizer

    log = train(tmp_path, "lora", "--model", "gpt2-tiny", "--lora", "--noise-multiplier", 1,
                "--save", tmp_path / "model")  # fmt: skip
    _check_log(log, private=True)
    assert log["epsilon"] > 0 and log["noise_multiplier"] == 1.0
    # 2 layers x (A: 8 x 64, B: 192 x 8) adapters on c_attn.
    assert log["derived"]["trainable_parameters"] == 2 * (8 * 64 + 192 * 8)
    torch.manual_seed(0)  # the run's --seed: the same random init
    init = build_model(LmConfig(model="gpt2-tiny"), load_tokenizer(GPT2)).state_dict()
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "model").state_dict()
    moved = {k for k in init if not torch.equal(init[k], saved[k])}
    assert moved == {f"transformer.h.{i}.attn.c_attn.weight" for i in range(2)}


@needs_e2e
@needs_llama
def test_private_llama_with_frozen_norms_and_lora_targets(tmp_path):
    log = train(tmp_path, "llama", "--model", "llama-tiny", "--freeze-norms",
                "--noise-multiplier", 1)  # fmt: skip
    _check_log(log, private=True)
    lora = train(tmp_path, "llama-lora", "--model", "llama-tiny", "--lora", "--lora-targets",
                 "all-linear", "--lora-r", 2, "--epsilon", 8)  # fmt: skip
    _check_log(lora, private=True)
    assert 7.5 < lora["epsilon"] <= 8 + 1e-6
    # Rank 2 adapters (A: 2 x in, B: out x 2) on q, o (64 -> 64), k, v (64 -> 32: 2 of 4
    # heads) and the MLP's gate, up (64 -> 128) and down (128 -> 64), in 2 layers.
    per_rank = (64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3
    assert lora["derived"]["trainable_parameters"] == 2 * 2 * per_rank


@needs_e2e
def test_the_shared_flags_opacus_checkpoint_resume(tmp_path):
    # The core's flags reach rmt-lm unchanged: Opacus's engine (LoRA adapters), a checkpointed
    # private run resumed to a longer one (the privacy spent grows).
    lora = ["--model", "gpt2-tiny", "--lora", "--noise-multiplier", 1]
    opacus = train(tmp_path, "opacus", *lora, "--engine", "opacus")
    assert opacus["config"]["engine"] == "opacus" and opacus["epsilon"] > 0
    ckpt = ["--checkpoint-dir", tmp_path / "ckpt", "--checkpoint-every", 1]
    first = train(tmp_path, "first", *lora, *ckpt)
    resumed = train(tmp_path, "resumed", *lora, *ckpt, "--resume", "--steps", 3)
    assert [e["step"] for e in resumed["evals"]] == [2, 3]
    assert resumed["epsilon"] > first["epsilon"] == pytest.approx(opacus["epsilon"])


@needs_e2e
def test_torchrun_two_processes_checkpoint_and_resume(tmp_path):
    # The distributed flags of the shared core reach rmt-lm: 2 CPU processes (gloo) train
    # gpt2-tiny privately (Conv1D, tied embeddings, LayerNorm), checkpoint, and resume on 2
    # processes to a longer run; the privacy spent is the one-process run's (the global rate).
    from tests.test_dp_distributed import free_port, run_group

    out = tmp_path / "dist.json"
    common = [*TINY_RUN, "--model", "gpt2-tiny", "--noise-multiplier", 1, "--output", out,
              "--checkpoint-dir", tmp_path / "ckpt", "--checkpoint-every", 1]  # fmt: skip

    def torchrun(*extra):
        proc = run_group(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
             "--master-port", str(free_port()), "-m", "rmt_kernels.lm", "train",
             *map(str, [*common, *extra])]
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
        return proc.stdout.decode(), json.loads(out.read_text())

    torchrun()
    stdout, log = torchrun("--resume", "--steps", 3)
    assert [e["step"] for e in log["evals"]] == [2, 3]
    single = train(tmp_path, "single", "--model", "gpt2-tiny", "--noise-multiplier", 1,
                   "--steps", 3)  # fmt: skip
    assert log["epsilon"] == pytest.approx(single["epsilon"], rel=1e-12)
    # One final line: only rank 0 reports.
    assert stdout.count("after 3 steps") == 1


@needs_e2e
@needs_llama
@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_private_full_fine_tuning(name, tmp_path):
    # Every parameter trained and privatised, GPT-2's Conv1D and tied embeddings and Llama's
    # RMSNorm included (their layer rules: issue 27 item 1).
    log = train(tmp_path, name, "--model", name, "--noise-multiplier", 1)
    _check_log(log, private=True)
    total = sum(p.numel() for p in _tiny(name, load_tokenizer_for(name)).parameters())
    assert log["derived"]["trainable_parameters"] == total


def load_tokenizer_for(name: str):
    from rmt_kernels.lm.model import load_tokenizer

    return load_tokenizer(GPT2 if name.startswith("gpt2") else LLAMA)


@needs_e2e
def test_compare_plots_the_runs(nodp, tmp_path):
    png = tmp_path / "curves.png"
    log = nodp[0].parent / "nodp.json"
    assert run("compare", log, log, "--labels", "a", "b", "--output", png) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------
# Errors a user can act on: exit code 2 and a message naming the flag, before training
# ------------------------------------------------------------------------------------------


@needs_e2e
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lora-r", 4], "--lora-r only apply with --lora"),
        (["--kappa", 1], "--kappa only apply with --denoise"),
        (["--data-dir", "/nonexistent/e2e"], "--data-dir /nonexistent/e2e: the E2E data folder"),
        (["--max-length", 4, "--no-dp"], "--max-length 4: a prompt is"),
        (["--eval-size", 100000, "--no-dp"], "--eval-size 100000: the split has 547"),
        (["--model", "/nonexistent/model", "--no-dp"], "/nonexistent/model"),
        (["--random-init", "--no-dp"], "--random-init is for a model path"),
        (["--lora", "--lora-alpha", 0], "--lora-alpha must be a finite number > 0"),
        (["--lora", "--lora-alpha", "inf"], "--lora-alpha must be a finite number > 0, got inf"),
        (["--epsilon", 8, "--no-dp"], "--epsilon and --denoise need DP"),
    ],
)  # fmt: skip
def test_user_errors_exit_2_with_a_clear_message(extra, message, tmp_path, capsys):
    import re

    out = tmp_path / "never.json"
    assert run("train", *TINY_RUN, *extra, "--output", out) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not out.exists()  # refused before training


@needs_e2e
def test_python_dash_m_entry_point_says_one_line():
    # An unreachable hub model: exit 2 with one line from the CLI, no traceback.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "rmt_kernels.lm", "train", "--model", "no-such-org/no-such-model",
         "--no-dp", "--tokenizer", "no-such-org/no-such-model"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("rmt-lm train: error: could not load a tokenizer from no-such-org")


@needs_e2e
def test_a_layer_without_a_rule_is_refused_before_training(tmp_path, capsys):
    # A model path (--random-init from its config, GPT-2's tokenizer): OPT's learned position
    # embedding subclasses nn.Embedding, so it has no rule (rules match exact types). DP is
    # refused before training, naming the layer and --lora; LoRA's attention targets of an
    # unknown model type name --lora-targets all-linear.
    from transformers import OPTConfig

    config = OPTConfig(vocab_size=50272, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                       num_attention_heads=4, word_embed_proj_dim=32)  # fmt: skip
    config.save_pretrained(tmp_path / "opt")
    argv = ["train", *TINY_RUN, "--model", tmp_path / "opt", "--random-init", "--tokenizer", GPT2,
            "--noise-multiplier", 1, "--output", tmp_path / "never.json"]  # fmt: skip
    assert run(*argv) == 2
    err = capsys.readouterr().err
    assert "none for model.decoder.embed_positions (OPTLearnedPositionalEmbedding)" in err
    assert "--lora (adapters on a frozen base)" in err
    assert run(*argv, "--lora") == 2
    assert "give --lora-targets all-linear" in capsys.readouterr().err
    assert not (tmp_path / "never.json").exists()


def test_evaluate_refuses_a_named_config(capsys):
    assert run("evaluate", "--model", "gpt2-tiny") == 2
    assert "is a named config (random weights)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# The data stay where they are
# ------------------------------------------------------------------------------------------


def test_e2e_data_are_not_in_the_repository():
    # rmt-lm reads E2E from ../shared (or --data-dir) and never copies it: no E2E file is
    # tracked (or lying untracked) in the repository.
    names = {"trainset.csv", "devset.csv", "testset_w_refs.csv", "testset.csv"}
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=REPOSITORY, capture_output=True, text=True, check=True,
        ).stdout.splitlines()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        listed = [str(p.relative_to(REPOSITORY)) for p in REPOSITORY.rglob("*.csv")]
    assert not [p for p in listed if Path(p).name in names]
    for path in listed:
        if path.endswith(".csv") and (REPOSITORY / path).is_file():
            with open(REPOSITORY / path, encoding="utf-8", errors="replace") as f:
                assert not f.readline().strip().strip('"').startswith("mr"), path
