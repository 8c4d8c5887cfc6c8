"""Red team of issue 27's decoder paths: the holes found, each pinned (PRIVACY.md lists them under
the invariant each guards).

- Qwen3's ``q_norm``/``k_norm`` (a registered RMSNorm) see (B, T, heads, head_dim): every Qwen3
  model was refused at its first step by the op's dimension check. Now a private step equals the
  float64 per-example reference (invariants 1 and 7, PRIVACY.md).
- ``PrivateTrainer`` with a packing collator (``DataCollatorWithFlattening``): the whole Poisson
  draw in one row, clipped as ONE example (1.14 C measured for one example's influence, 2 C
  possible; the layout verification never ran). Refused (invariant 7, PRIVACY.md).
- ``PrivateTrainer`` with ``neftune_noise_alpha``: NEFTune's embedding noise is scaled by the
  batch's padded length, so one long example moves every other example's gradient (1.58 C
  measured). Refused (invariant 7, PRIVACY.md).
- A class-level patch of a Hugging Face layer's ``forward`` made with ``functools.wraps`` passed
  the module check (the rule then described a function the model no longer computes: a Conv1D
  doubled by the patch trained on half its gradient). Refused (invariant 1, PRIVACY.md).
- Gradient checkpointing was refused as "shared weights"; it is now named.
- A private ``PrivateTrainer`` run logged every draw's clean training loss (and, with
  ``include_num_input_tokens_seen``, the draws' exact token counts): statistics of the private
  batches outside the accountant. Not logged / refused (invariant 9, PRIVACY.md: a private
  run's log holds only released or public quantities).
- A model called with ``num_items_in_batch`` (Hugging Face's batch count of targets) whose head's
  ``loss_function`` was replaced by one dividing by it: not a batched input, so the verification
  could not see the coupling (1.68 C measured); and a left-padded ``attention_mask`` (each
  example's positions and the pad position predicting its first token depend on the batch's
  padded length: 3.9 C measured for GPT-2, 2.6 C for Llama). Both refused by name at every
  training forward (invariant 7, PRIVACY.md).
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import rmt_kernels
from rmt_kernels.dp import make_private
from rmt_kernels.dp.capture import LayoutError

transformers = pytest.importorskip("transformers")

from tests.test_hf_trainer import (  # noqa: E402
    Sentences,
    privacy,
    tiny_llama,
    trainer,
    training_args,
)

pytestmark = pytest.mark.filterwarnings("ignore:make_private. seed=:UserWarning")

C = 0.5
VOCAB, PAD = 50, 0


def _private(model: nn.Module, batch: int, **kw):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    loader = DataLoader(TensorDataset(torch.zeros(batch)), batch_size=batch)
    return make_private(
        model,
        opt,
        loader,
        target_delta=1e-5,
        max_grad_norm=C,
        noise_multiplier=0.0,
        poisson_sampling=False,
        loss_reduction="sum",
        seed=1,
        **kw,
    )


def _reference(model: nn.Module, loss_of, n: int) -> dict[str, torch.Tensor]:
    """sum_b min(1, C / ||g_b||) g_b, g_b the float64 gradient of example b's loss alone."""
    model64 = copy.deepcopy(model).double()
    params = {k: p for k, p in model64.named_parameters() if p.requires_grad}
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    for b in range(n):
        grads = torch.autograd.grad(loss_of(model64, slice(b, b + 1)).sum(), list(params.values()))
        norm = float(torch.sqrt(sum(g.square().sum() for g in grads)))
        for k, g in zip(params, grads, strict=True):
            total[k] += min(1.0, C / norm) * g
    return total


def _engine(model: nn.Module, loss_of, n: int) -> dict[str, torch.Tensor]:
    model, opt, _ = _private(copy.deepcopy(model), n)
    loss_of(model, slice(0, n)).sum().backward()
    opt.step()
    # p.grad is the clipped sum divided by the expected batch size (n here).
    return {k: p.grad.double() * n for k, p in model.named_parameters() if p.requires_grad}


def _assert_matches(ours: dict, reference: dict) -> None:
    assert ours.keys() == reference.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], reference[k], rtol=1e-4, atol=1e-6, msg=k)


def tiny_qwen3() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=16,
        tie_word_embeddings=True,
        pad_token_id=PAD,
    )
    model = transformers.Qwen3ForCausalLM(config)
    with torch.no_grad():  # norm weights off 1 and larger weights: clipping binds, norms matter
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.5) if "norm" in name else p.mul_(3.0)
    return model


def test_qwen3_head_norms_train_privately_as_the_float64_reference():
    # Before the fix: ValueError "rmsnorm_sq_norms: x must have 2 (B, d) or 3 (B, T, d)
    # dimensions, got 4" at the first step (q_norm sees (B, T, heads, head_dim)).
    model = tiny_qwen3()
    assert any(type(m).__name__ == "Qwen3RMSNorm" for m in model.modules())
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (4, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    labels = ids.masked_fill(mask == 0, -100)

    def loss_of(m, rows):
        logits = m(input_ids=ids[rows], attention_mask=mask[rows]).logits
        return rmt_kernels.per_example_lm_loss(logits, labels[rows], reduction="sequence_sum")

    _assert_matches(_engine(model, loss_of, 4), _reference(model, loss_of, 4))


class _HeadNorm(nn.Module):
    """nn.RMSNorm over the last dim of a (B, T, heads, head_dim) tensor, then a Linear (on
    (B, T * heads, head_dim): the Linear rule takes three dimensions at most)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.norm(x.view(x.shape[0], 3, 2, 4)))
        return self.out(h.reshape(x.shape[0], 6, 4)).sum(1)


def test_rmsnorm_on_a_four_dimensional_input_matches_the_float64_reference():
    torch.manual_seed(0)
    model = _HeadNorm()
    nn.init.normal_(model.norm.weight, std=2.0)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 24, generator=gen) * 3, torch.randint(0, 3, (5,), generator=gen)

    def loss_of(m, rows):
        logits = m(x[rows].to(m.out.weight.dtype))
        return nn.functional.cross_entropy(logits, y[rows], reduction="none")

    _assert_matches(_engine(model, loss_of, 5), _reference(model, loss_of, 5))


class _Unpadded(Sentences):
    def __getitem__(self, i: int) -> dict:
        ids = self.ids[i][: int(self.lengths[i])].tolist()
        return {"input_ids": ids, "labels": ids}


def _train(t) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        t.train()


def test_a_packing_collator_is_refused(tmp_path):
    # Before the fix: two private steps ran, each draw (8-12 examples) one row clipped as ONE
    # example.
    t = trainer(
        tmp_path,
        model=tiny_llama(),
        dataset=_Unpadded(),
        args=training_args(tmp_path, max_steps=1, remove_unused_columns=False),
        data_collator=transformers.DataCollatorWithFlattening(),
    )
    with pytest.raises(ValueError, match=r"made 1 row\(s\) of a draw of \d+ examples"):
        _train(t)
    assert t.private.steps == 0


def test_neftune_is_refused(tmp_path):
    # Before the fix: trained, every example's embedding noise scaled by the batch's padded
    # length.
    with pytest.raises(ValueError, match="neftune_noise_alpha"):
        trainer(
            tmp_path,
            model=tiny_llama(),
            dataset=Sentences(),
            args=training_args(tmp_path, neftune_noise_alpha=5.0),
        )


class _Probe(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.layer(x)).sum(1)


@pytest.mark.parametrize(
    "path",
    [
        "transformers.pytorch_utils.Conv1D",
        "transformers.models.llama.modeling_llama.LlamaRMSNorm",
    ],
)
def test_a_forward_patched_with_functools_wraps_is_refused(path, monkeypatch):
    module_name, _, name = path.rpartition(".")
    cls = getattr(__import__(module_name, fromlist=[name]), name)
    original = cls.forward

    @functools.wraps(original)
    def doubled(self, x):
        return 2.0 * original(self, x)

    layer = cls(8, 8) if name == "Conv1D" else cls(8)
    model = _Probe(layer)
    _private(copy.deepcopy(model), 2)  # the unpatched class is accepted
    monkeypatch.setattr(cls, "forward", doubled)
    with pytest.raises(ValueError, match="forward was replaced"):
        _private(model, 2)


def test_gradient_checkpointing_is_refused_by_name():
    model = tiny_llama()
    model.activation_checkpointing_enable({"use_reentrant": False})
    ids = torch.randint(1, 60, (3, 5), generator=torch.Generator().manual_seed(0))
    model, _, _ = _private(model, 3)
    with pytest.raises(RuntimeError, match="Gradient checkpointing is not supported"):
        rmt_kernels.lm_loss(model(input_ids=ids).logits, ids).backward()


def _token_sum_over_batch_count(logits, labels, vocab_size, num_items_in_batch=None, **kw):
    """Hugging Face's loss_function signature: the sequences' token sums over the batch's count
    of targets (what Hugging Face's own causal-LM loss does with num_items_in_batch)."""
    sums = rmt_kernels.per_example_lm_loss(logits, labels, reduction="sequence_sum")
    return sums.sum() / num_items_in_batch


def test_a_batch_token_count_passed_to_the_model_is_refused():
    # Before the fix: the verification passed (the count is not a batched input, the replaced
    # loss_function is not Hugging Face's) and one example moved the clipped sum by 1.68 C.
    model = tiny_llama()
    model.loss_function = _token_sum_over_batch_count
    ids = torch.randint(1, 60, (3, 5), generator=torch.Generator().manual_seed(0))
    model, _, _ = _private(model, 3)
    count = torch.tensor(ids[:, 1:].numel())
    with pytest.raises(LayoutError, match="num_items_in_batch"):
        model(input_ids=ids, labels=ids, num_items_in_batch=count)
    with torch.no_grad():  # evaluation: nothing is trained, nothing refused
        model(input_ids=ids, labels=ids, num_items_in_batch=count)


def test_a_private_trainer_run_logs_no_statistic_of_its_draws(tmp_path):
    # Before the fix: every log of a private run (secret seed, noise) held the draw's clean mean
    # training loss ('loss', 'train_loss', TrainOutput.training_loss): a statistic of the private
    # batches that no accountant counts.
    private = privacy(seed=None)
    t = trainer(
        tmp_path,
        model=tiny_llama(),
        dataset=Sentences(),
        args=training_args(tmp_path, max_steps=2),
        privacy=private,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        out = t.train()
    assert t.private.steps == 2 and out.training_loss == 0.0
    # total_flos was 6 x the draws' tokens x the parameters: their sizes.
    assert t.state.total_flos == 0 and out.metrics.get("total_flos", 0) == 0
    logged = t.state.log_history
    assert len(logged) == 3 and all("epsilon" in entry for entry in logged)
    assert not any(key in entry for entry in logged for key in ("loss", "train_loss"))
    # A run with a public seed is not private: its loss is logged as before.
    seeded = trainer(
        tmp_path, model=tiny_llama(), dataset=Sentences(), args=training_args(tmp_path, max_steps=1)
    )
    _train(seeded)
    assert "loss" in seeded.state.log_history[0] and seeded.state.total_flos > 0


def test_the_token_count_of_the_draws_is_refused(tmp_path):
    # Before the fix: logged and checkpointed unnoised (20, 57, 90 tokens after steps 1-3).
    with pytest.raises(ValueError, match="include_num_input_tokens_seen"):
        trainer(
            tmp_path,
            model=tiny_llama(),
            dataset=Sentences(),
            args=training_args(tmp_path, include_num_input_tokens_seen="non_padding"),
        )


def test_a_left_padded_training_batch_is_refused():
    # Before the fix: trained; with left padding each example's positions (GPT-2) and the pad
    # position predicting its first token (Llama) depend on the batch's padded length: one long
    # example moved the clipped sum of 12 short ones by 3.9 C (GPT-2) and 2.6 C (Llama).
    model, _, _ = _private(tiny_llama(), 3)
    ids = torch.randint(1, 60, (3, 5), generator=torch.Generator().manual_seed(0))
    right = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    loss = rmt_kernels.lm_loss(model(input_ids=ids, attention_mask=right).logits, ids)
    loss.backward()  # right padding: every example's rows are its own
    with pytest.raises(LayoutError, match="left-padded"):
        model(input_ids=ids, attention_mask=right.flip(1))
    with torch.no_grad():  # generation pads on the left: evaluation is not refused
        model(input_ids=ids, attention_mask=right.flip(1))
