"""PrivateTrainer: a transformers.Trainer made private with one change (issue 27 item 6).

Tiny random models on a handful of synthetic examples: the run trains and logs the accountant's
epsilon for the steps taken; the batches the Trainer's loop sees are make_private's Poisson draws
(not the Trainer's shuffled batches); the update equals one make_private step on the same draw
with the same noise seed; incompatible arguments are refused by name; no step beyond the
calibrated ones is taken.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

transformers = pytest.importorskip("transformers")

from rmt_kernels.dp import make_private  # noqa: E402
from rmt_kernels.dp.calibration import run_epsilon  # noqa: E402
from rmt_kernels.hf_trainer import PrivacyArguments, PrivateTrainer  # noqa: E402

# A public seed makes every run here reproducible and says so: expected, not a finding.
pytestmark = pytest.mark.filterwarnings("ignore:PrivateTrainer. PrivacyArguments.seed")

VOCAB, SEQ = 64, 6
SEED = 7  # a public noise seed: reproducible tests (the run is then not private)


class Pairs(Dataset):
    """Random token sequences with binary labels, as dicts (the Trainer's convention)."""

    def __init__(self, n: int = 40) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(SEQ, dtype=torch.long),
            "labels": self.labels[i],
        }


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    return transformers.BertForSequenceClassification(config)


def training_args(tmp_path, **overrides):
    options = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=0.05,
        optim="sgd",
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        max_grad_norm=0.0,
    )
    options.update(overrides)
    return transformers.TrainingArguments(**options)


def privacy(**overrides):
    options = dict(
        noise_multiplier=1.0, max_grad_norm=1.0, batch_size=8, accountant="rdp", seed=SEED
    )
    options.update(overrides)
    return PrivacyArguments(**options)


def trainer(tmp_path, model=None, dataset=None, args=None, trainer_class=PrivateTrainer, **kw):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="PrivateTrainer: PrivacyArguments.seed")
        return trainer_class(
            model=model if model is not None else tiny_bert(),
            args=args if args is not None else training_args(tmp_path),
            train_dataset=dataset if dataset is not None else Pairs(),
            privacy=kw.pop("privacy", None) or privacy(),
            **kw,
        )


def train(t):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*NOT differentially private")
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return t.train()


class RecordingTrainer(PrivateTrainer):
    """Records the number of examples of every draw the Trainer's loop hands training_step."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.draw_sizes = getattr(self, "draw_sizes", [])
        self.draw_sizes.append(0 if len(inputs) == 0 else inputs["input_ids"].shape[0])
        return super().training_step(model, inputs, num_items_in_batch)


def test_trains_and_logs_the_accountants_epsilon(tmp_path):
    model = tiny_bert()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    t = trainer(tmp_path, model=model)
    train(t)
    run = t.private
    assert run.steps == run.planned_steps == 3
    moved = max((before[k] - v).abs().max().item() for k, v in model.named_parameters())
    assert moved > 1e-3
    # Every log of the run carries the accountant's epsilon for the steps taken by then.
    logged = [entry for entry in t.state.log_history if "epsilon" in entry]
    assert [e["step"] for e in logged] == [1, 2, 3, 3]  # three loss logs and the final metrics
    q = 1 / math.ceil(len(Pairs()) / 8)
    for entry in logged:
        expected = run_epsilon(1.0, run.delta, q, entry["step"], "rdp")
        assert entry["epsilon"] == pytest.approx(expected, rel=1e-9)
        assert entry["delta"] == run.delta == pytest.approx(1 / len(Pairs()) ** 1.1)
    assert "grad_norm" not in logged[0]  # the Trainer's pre-step norm means nothing here


def test_target_epsilon_is_spent_over_exactly_the_steps_taken(tmp_path):
    # 1.1 epochs of ceil(40 / 10) = 4 draws: the Trainer takes ceil(1.1 * 4) = 5 steps (not
    # make_private's round(4.4) = 4), and the noise is calibrated for those 5 (the final epsilon
    # is the target, within the search's tolerance of 0.01); a plan one step short would stop
    # the run (or, unchecked, overspend), one step long would miss the target by far more.
    args = training_args(tmp_path, max_steps=-1, num_train_epochs=1.1, logging_steps=100)
    p = privacy(noise_multiplier=None, target_epsilon=3.0, batch_size=10)
    t = trainer(tmp_path, args=args, privacy=p)
    train(t)
    assert t.private.steps == t.private.planned_steps == 5 == t.state.global_step
    final = t.state.log_history[-1]["epsilon"]
    assert 3.0 - 0.011 <= final <= 3.0
    assert final == pytest.approx(t.planned_epsilon(), rel=1e-9)


def test_the_loop_sees_make_privates_poisson_draws(tmp_path):
    dataset = Pairs()
    args = training_args(tmp_path, max_steps=5, logging_steps=100)
    t = trainer(tmp_path, dataset=dataset, args=args, trainer_class=RecordingTrainer)
    train(t)
    # The same draws as make_private's own loader keyed by the same public seed.
    native = make_private_native(tiny_bert(), dataset, lr=0.05)[2]
    drawn = [len(batch["labels"]) for _, batch in zip(range(5), native, strict=False)]
    assert t.draw_sizes == drawn
    # Poisson, not the Trainer's shuffled batches of 8: over 400 draws the sizes vary and their
    # mean is q * n = 8 within 6 standard deviations of a Binomial(40, 1/5) mean (a false failure
    # is rarer than 1e-8; a fixed-size sampler gives a constant size).
    loader = t.get_train_dataloader()
    sizes = []
    for _ in range(80):  # 80 epochs of 5 draws
        sizes.extend(0 if len(b) == 0 else len(b["labels"]) for b in loader)
    assert len(sizes) == 400 and len(set(sizes)) > 3
    sd_of_mean = math.sqrt(40 * 0.2 * 0.8 / len(sizes))
    assert abs(sum(sizes) / len(sizes) - 8.0) < 6 * sd_of_mean


def make_private_native(model, dataset, *, lr, max_grad_norm=1.0):
    """make_private as a user of the native API calls it, keyed like the trainer's run."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loader = DataLoader(dataset, batch_size=8, generator=torch.Generator().manual_seed(SEED))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="make_private: seed=")
        return make_private(
            model,
            optimizer,
            loader,
            target_delta=1 / len(dataset) ** 1.1,
            max_grad_norm=max_grad_norm,
            noise_multiplier=1.0,
            seed=SEED,
            accountant="rdp",
        )


# Clipping norms for the equivalence tests: this BERT's per-example gradient norms are 0.99-1.05
# and this Llama's 3.5-11.2, so a loss off by a factor (a sum for a mean) changes which examples
# are clipped and the update with them (the noise is the same on both sides and cancels).
BERT_CLIP, LLAMA_CLIP = 1.5, 6.0


def test_update_equals_one_make_private_step(tmp_path):
    # The trainer cuts the draw into physical batches of 3; the native step runs it whole.
    dataset = Pairs()
    model = tiny_bert()
    native_model = copy.deepcopy(model)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    args = training_args(tmp_path, max_steps=1, per_device_train_batch_size=3)
    p = privacy(max_grad_norm=BERT_CLIP)
    t = trainer(
        tmp_path, model=model, dataset=dataset, args=args, privacy=p, trainer_class=RecordingTrainer
    )
    train(t)
    assert t.draw_sizes[0] > 3  # cut into at least two physical batches

    native_model, optimizer, loader = make_private_native(
        native_model, dataset, lr=0.05, max_grad_norm=BERT_CLIP
    )
    batch = next(iter(loader))
    native_model(**batch).loss.backward()
    optimizer.step()
    pairs = zip(model.named_parameters(), native_model.named_parameters(), strict=True)
    for (name, p), (_, q) in pairs:
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-5), name
    assert max((before[k] - v).abs().max().item() for k, v in model.named_parameters()) > 1e-3


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"max_grad_norm": float("inf")}, "max_grad_norm"),
        ({"target_epsilon": 2.0}, "exactly one"),
        ({"noise_multiplier": None}, "exactly one"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"noise_multiplier": None, "target_epsilon": 1e3}, "target_epsilon"),
        ({"delta": 1.5}, "delta"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"accountant": "gdp"}, "accountant"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_privacy_arguments_are_refused_by_name(overrides, named):
    with pytest.raises(ValueError, match=named):
        privacy(**overrides)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps"),
        ({"train_sampling_strategy": "group_by_length"}, "train_sampling_strategy"),
        ({"train_sampling_strategy": "sequential"}, "train_sampling_strategy"),
        ({"bf16": True}, "bf16"),
        ({"label_smoothing_factor": 0.1}, "label_smoothing_factor"),
        ({"dataloader_drop_last": True}, "dataloader_drop_last"),
        ({"auto_find_batch_size": True}, "auto_find_batch_size"),
    ],
)
def test_incompatible_training_arguments_are_refused_by_name(tmp_path, overrides, named):
    with pytest.raises(ValueError, match=named):
        trainer(tmp_path, args=training_args(tmp_path, **overrides))


def test_other_refusals(tmp_path):
    with pytest.raises(TypeError, match="privacy must be a PrivacyArguments"):
        PrivateTrainer(model=tiny_bert(), args=training_args(tmp_path), privacy={"x": 1})
    with pytest.raises(ValueError, match="compute_loss_func"):
        trainer(tmp_path, compute_loss_func=lambda outputs, labels, num_items_in_batch: 0)

    class Shuffled(PrivateTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.RandomSampler(self.train_dataset)

    with pytest.raises(ValueError, match="_get_train_sampler"):
        trainer(tmp_path, trainer_class=Shuffled)
    # A delta of 1/n or more protects nobody: refused before any step.
    t = trainer(tmp_path, privacy=privacy(delta=1 / 40))
    with pytest.raises(ValueError, match=r"PrivacyArguments\.delta"):
        train(t)
    with pytest.raises(ValueError, match="resume_from_checkpoint"):
        trainer(tmp_path).train(resume_from_checkpoint=str(tmp_path))
    # A model some engine already hooked (another PrivateTrainer's): refused, not hooked twice;
    # a copy of it is a plain model again.
    private_model = tiny_bert()
    trainer(tmp_path, model=private_model).get_train_dataloader()
    with pytest.raises(ValueError, match="already private"):
        trainer(tmp_path, model=private_model).get_train_dataloader()
    trainer(tmp_path, model=copy.deepcopy(private_model)).get_train_dataloader()


def test_trainer_clipping_is_switched_off_and_said(tmp_path):
    args = training_args(tmp_path, max_grad_norm=1.0)
    with pytest.warns(UserWarning, match="max_grad_norm=1.0 is set to 0"):
        t = trainer(tmp_path, args=args)
    assert t.args.max_grad_norm == 0.0 and args.max_grad_norm == 1.0  # the caller's args kept


def test_token_mean_losses_are_refused(tmp_path):
    # BERT's masked-LM loss is a mean over the batch's tokens: it couples the examples.
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    model = transformers.BertForMaskedLM(config)

    class Tokens(Pairs):
        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    with pytest.raises(ValueError, match=r"BertForMaskedLM.*per_example_loss"):
        trainer(tmp_path, model=model, dataset=Tokens())


def test_no_step_beyond_the_calibrated_ones(tmp_path):
    class KeepGoing(transformers.TrainerCallback):
        """A callback that overrides the Trainer's stop at max_steps (a hostile or buggy one)."""

        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = False

    args = training_args(tmp_path, max_steps=2, logging_steps=100)
    t = trainer(tmp_path, args=args, callbacks=[KeepGoing()])
    with pytest.raises(RuntimeError, match="beyond the 2 steps"):
        train(t)
    assert t.private.steps == 2
    # And a second train() on a spent run is refused up front.
    with pytest.raises(RuntimeError, match="steps the noise was calibrated for are taken"):
        train(t)


class Sentences(Dataset):
    """Token sequences of lengths 2..SEQ, right-padded with 0; labels -100 on the padding (the
    Hugging Face convention), so the examples have different numbers of targets."""

    def __init__(self, n: int = 24) -> None:
        g = torch.Generator().manual_seed(2)
        self.ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
        self.lengths = torch.randint(2, SEQ + 1, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        mask = (torch.arange(SEQ) < self.lengths[i]).long()
        ids = self.ids[i] * mask
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        tie_word_embeddings=False,
    )
    # Every parameter trains, the RMSNorm weights included (rmt_kernels/rules/rmsnorm.py).
    return transformers.LlamaForCausalLM(config)


def test_causal_lm_update_equals_make_private_with_lm_loss(tmp_path):
    # The trainer's step on a causal LM is make_private's step with lm_loss (each sequence's
    # mean over its own targets), not with Hugging Face's mean over the batch's tokens.
    from rmt_kernels.lm_loss import lm_loss

    dataset = Sentences()
    model = tiny_llama()
    native_model = copy.deepcopy(model)
    args = training_args(tmp_path, max_steps=1, per_device_train_batch_size=3)
    p = privacy(max_grad_norm=LLAMA_CLIP)
    t = trainer(
        tmp_path, model=model, dataset=dataset, args=args, privacy=p, trainer_class=RecordingTrainer
    )
    train(t)
    assert t.draw_sizes[0] > 3 and "epsilon" in t.state.log_history[-1]
    # Evaluation (no gradients: no private step) runs on the private model and logs epsilon too.
    metrics = t.evaluate(eval_dataset=Sentences(5))
    assert math.isfinite(metrics["eval_loss"]) and metrics["epsilon"] == t.private.epsilon()
    assert t.private.steps == 1

    native_model, optimizer, loader = make_private_native(
        native_model, dataset, lr=0.05, max_grad_norm=LLAMA_CLIP
    )
    batch = next(iter(loader))
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # unequal lengths
    labels = batch.pop("labels")
    lm_loss(native_model(**batch).logits, labels).backward()
    optimizer.step()
    pairs = zip(model.named_parameters(), native_model.named_parameters(), strict=True)
    for (name, p), (_, q) in pairs:
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-5), name


def test_peft_lora_adapters_train_and_the_base_stays(tmp_path):
    # Opacus #820's class of bug: adapters wrapped but never updated. Here the Trainer moves the
    # model, then make_private wraps it; every adapter must move and nothing frozen may.
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:  # LoRA starts B at 0: give it a value so A's gradient is not 0
            torch.nn.init.normal_(p, std=0.1)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    args = training_args(tmp_path, max_steps=2, logging_steps=100)
    t = trainer(tmp_path, model=model, dataset=Sentences(), args=args)
    train(t)
    assert t.private.steps == 2 and t.state.log_history[-1]["epsilon"] > 0
    trained = {k for k, v in model.named_parameters() if v.requires_grad}
    assert trained and all("lora_" in k for k in trained)
    for name, p in model.named_parameters():
        moved = (before[name] - p).abs().max().item()
        assert (moved > 1e-4) if name in trained else (moved == 0), name


def test_an_empty_draw_is_a_noise_only_step(tmp_path):
    # batch_size 1 of 10 examples: q = 1/10, a draw is empty with probability 0.9^10 = 0.35;
    # with this seed the FIRST draw is (sizes 0, 2, 2): Opacus's collate cannot shape a dict
    # batch before it saw one. The Trainer's loop must still step (noise alone, counted by the
    # accountant), never skip. Through a worker process, too.
    args = training_args(tmp_path, max_steps=3, logging_steps=100, dataloader_num_workers=1)
    p = privacy(batch_size=1)
    t = trainer(tmp_path, args=args, privacy=p, dataset=Pairs(10), trainer_class=RecordingTrainer)
    before = {k: v.detach().clone() for k, v in t.model.named_parameters()}
    train(t)
    assert t.draw_sizes == [0, 2, 2] and t.private.steps == t.state.global_step == 3
    assert all((before[k] != v).any() for k, v in t.model.named_parameters())


def test_a_per_example_loss_is_its_mean_and_is_checked(tmp_path):
    # per_example_loss replaces the model's loss: the step equals make_private's with the mean of
    # the same per-example losses; a loss that is not one value per example is refused by name.
    from torch.nn import functional

    def cross_entropy(outputs, inputs):
        return functional.cross_entropy(outputs.logits, inputs["labels"], reduction="none")

    dataset, model = Pairs(), tiny_bert()
    native_model = copy.deepcopy(model)
    args = training_args(tmp_path, max_steps=1, per_device_train_batch_size=3)
    p = privacy(per_example_loss=cross_entropy, max_grad_norm=BERT_CLIP)
    t = trainer(tmp_path, model=model, dataset=dataset, args=args, privacy=p)
    train(t)
    native_model, optimizer, loader = make_private_native(
        native_model, dataset, lr=0.05, max_grad_norm=BERT_CLIP
    )
    batch = next(iter(loader))
    labels = batch.pop("labels")
    cross_entropy(native_model(**batch), {"labels": labels}).mean().backward()
    optimizer.step()
    pairs = zip(model.named_parameters(), native_model.named_parameters(), strict=True)
    for (name, p), (_, q) in pairs:
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-5), name

    def batch_mean(outputs, inputs):
        return cross_entropy(outputs, inputs).mean()

    t = trainer(tmp_path, args=args, privacy=privacy(per_example_loss=batch_mean))
    with pytest.raises(ValueError, match="per_example_loss must return a tensor of shape"):
        train(t)
