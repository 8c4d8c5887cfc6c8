"""Decoder LM layers (issue 27): GPT-2's Conv1D and the RMSNorms in whole models, and the
registry's lazy matching by import path.

The layer-level checks of both rules (float64 per-example reference, adversarial layouts,
sensitivity at most C, ghost norms) are the shared harness's CASES in tests/test_rules.py. Here:
``import rmt_kernels`` imports no ``transformers``; a rule registered by import path matches
exactly its class (never a subclass, a namesake or an imitation of its module); one private step
of a tiny GPT-2 and a tiny Llama (``make_private``, untied embeddings) equals the clipped sum of
float64 per-example gradients of a per-example loss, and so does one step of the Opacus
drop-in's ghost mode, which refuses the look-alikes too.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import rmt_kernels
from rmt_kernels.dp import make_private
from rmt_kernels.dp.capture import trainable_layers
from rmt_kernels.opacus import DenoisingPrivacyEngine
from rmt_kernels.opacus.ghost import check_certifiable
from rmt_kernels.rules import LayerRule, get_layer_rule, register_layer_rule, registry
from rmt_kernels.rules.registry import import_path

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore:make_private. seed=:UserWarning")

C = 0.5
VOCAB, PAD = 50, 0


def test_importing_rmt_kernels_imports_no_transformers():
    code = (
        "import sys, rmt_kernels, rmt_kernels.dp, rmt_kernels.opacus;"
        "assert 'transformers' not in sys.modules, 'transformers imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


class Scaled(nn.Module):
    """``y = gain * x``: a layer to register by import path."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * x


def test_a_rule_registered_by_import_path_matches_exactly_its_class():
    rule = LayerRule(lambda *a: {}, lambda *a: {})
    subclass = type("Sub", (Scaled,), {})
    # Same module and qualname as Scaled, another class: an imitation of the path.
    imitation = type("Scaled", (nn.Module,), {"__module__": Scaled.__module__})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(registry, "_NAMED_RULES", dict(registry._NAMED_RULES))
        register_layer_rule(import_path(Scaled), rule)
        assert get_layer_rule(Scaled()) is rule
        for other in (subclass(), imitation()):
            with pytest.raises(TypeError, match="no DP layer rule"):
                get_layer_rule(other)
        # Registering a path imports nothing; the rule waits for its class.
        register_layer_rule("rmt_never_imported_pkg.layers.Norm", rule)
        assert "rmt_never_imported_pkg" not in sys.modules
        with pytest.raises(TypeError, match=r"<module>\.<qualname>"):
            register_layer_rule("Conv1D", rule)
        with pytest.raises(TypeError, match=r"<module>\.<qualname>"):
            register_layer_rule("transformers.pytorch_utils.Conv 1D", rule)


def _hf_norm(name: str):
    module, _, cls = name.rpartition(".")
    return getattr(__import__(module, fromlist=[cls]), cls)


LLAMA_NORM = "transformers.models.llama.modeling_llama.LlamaRMSNorm"


class NamesakeRMSNorm(nn.Module):
    """A user's copy of LlamaRMSNorm, named like it, in another module: no rule."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = 1e-6

    forward = _hf_norm(LLAMA_NORM).forward


NamesakeRMSNorm.__name__ = NamesakeRMSNorm.__qualname__ = "LlamaRMSNorm"

LOOK_ALIKES = {
    "subclass": lambda: type("LlamaRMSNorm", (_hf_norm(LLAMA_NORM),), {})(8),
    "namesake": lambda: NamesakeRMSNorm(8),
    # RMS-like but not verified: stays refused until someone reads it and registers it.
    "t5": lambda: _hf_norm("transformers.models.t5.modeling_t5.T5LayerNorm")(8),
}


@pytest.mark.parametrize("name", sorted(LOOK_ALIKES))
def test_rmsnorm_look_alikes_are_refused_by_both_engines(name):
    layer = LOOK_ALIKES[name]()
    with pytest.raises(TypeError, match="no DP layer rule"):
        trainable_layers(nn.Sequential(layer))
    with pytest.raises(NotImplementedError, match="cannot be certified"):
        check_certifiable(nn.Sequential(layer))


# ---------------------------------------------------------------------------------------------
# Whole models: one private step against float64 per-example gradients
# ---------------------------------------------------------------------------------------------


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    return transformers.GPT2LMHeadModel(config)


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
        tie_word_embeddings=False,
        pad_token_id=PAD,
    )
    return transformers.LlamaForCausalLM(config)


MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def lm_batch(batch: int = 5, length: int = 8):
    """Right-padded token ids and attention mask of varied lengths."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (batch, length), generator=gen)
    lengths = torch.tensor([length, 3, 6, length, 5])[:batch]
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return ids.masked_fill(mask == 0, PAD), mask


def sequence_nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) next-token cross-entropy summed over each sequence's own real tokens: example b's
    loss depends on row b only (a token mean over the batch would couple the examples)."""
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].mT, ids[:, 1:], reduction="none")
    return (nll * mask[:, 1:].to(nll.dtype)).sum(1)


def reference_clipped_sum(model: nn.Module, ids, mask) -> dict[str, torch.Tensor]:
    """sum_b min(1, C / ||g_b||) g_b with g_b the float64 gradient of example b's loss alone."""
    model64 = copy.deepcopy(model).double()
    params = {n: p for n, p in model64.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for b in range(ids.shape[0]):
        logits = model64(input_ids=ids[b : b + 1], attention_mask=mask[b : b + 1]).logits
        grads = torch.autograd.grad(
            sequence_nll(logits, ids[b : b + 1], mask[b : b + 1]).sum(), list(params.values())
        )
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        factor = min(1.0, C / norm.item())
        for n, g in zip(params, grads, strict=True):
            total[n] += factor * g
    return total


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_one_private_step_equals_float64_per_example_clipping(kind):
    ids, mask = lm_batch()
    expected = reference_clipped_sum(MODELS[kind](), ids, mask)
    model = MODELS[kind]()
    names = {type(m).__name__ for m in model.modules()}
    assert ("Conv1D" in names) if kind == "gpt2" else ("LlamaRMSNorm" in names)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(ids, mask), batch_size=len(ids))
    model, opt, _ = make_private(
        model,
        opt,
        loader,
        target_delta=1e-5,
        max_grad_norm=C,
        noise_multiplier=0.0,
        poisson_sampling=False,
        seed=1234,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    logits = model(input_ids=ids, attention_mask=mask).logits
    # The package's per-example LM loss (padding targets ignored) is the reference's definition.
    labels = ids.masked_fill(mask == 0, -100)
    rmt_kernels.lm_loss(logits, labels, reduction="sequence_sum").backward()
    opt.step()
    for n, p in model.named_parameters():
        grad = expected[n] / len(ids)
        assert p.grad.shape == p.shape, n
        torch.testing.assert_close(p.grad.double(), grad, rtol=1e-4, atol=1e-6, msg=n)
        torch.testing.assert_close(
            p.detach().double(), before[n].double() - 0.1 * grad, rtol=1e-4, atol=1e-6
        )


class SequenceNLL:
    """Opacus criterion: target (B, 2, T) stacks ids and mask; :func:`sequence_nll` per example
    (Opacus's ghost clipping sets ``reduction = "none"`` for its first backward pass)."""

    reduction = "mean"

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_example = sequence_nll(logits, target[:, 0], target[:, 1])
        if self.reduction == "none":
            return per_example
        return per_example.sum() if self.reduction == "sum" else per_example.mean()


class LogitsOf(nn.Module):
    """``model(ids, mask).logits`` with per-example position ids: Opacus's hooks need every
    layer input batch-first, and GPT-2's default (1, T) position ids are a broadcast."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        return self.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_opacus_ghost_mode_trains_the_decoders_with_the_same_rules(kind):
    # The drop-in's ghost clipping reads the same registry: Conv1D and LlamaRMSNorm are
    # certified (the look-alikes are refused, above), and its released sum is the clipped sum.
    ids, mask = lm_batch()
    expected = reference_clipped_sum(MODELS[kind](), ids, mask)
    model = MODELS[kind]()
    module = LogitsOf(model)
    target = torch.stack([ids, mask], 1)
    wrapped, opt, criterion, _ = DenoisingPrivacyEngine(accountant="rdp").make_private(
        module=module,
        optimizer=torch.optim.SGD(module.parameters(), lr=0.0),
        criterion=SequenceNLL(),
        data_loader=DataLoader(TensorDataset(ids, target), batch_size=len(ids)),
        noise_multiplier=0.0,
        max_grad_norm=C,
        grad_sample_mode="ghost",
        poisson_sampling=False,
        loss_reduction="mean",
    )
    opt.zero_grad()
    criterion(wrapped(ids, mask), target).backward()
    opt.step()
    for n, p in model.named_parameters():
        grad = expected[n] / len(ids)
        torch.testing.assert_close(p.grad.double(), grad, rtol=1e-4, atol=1e-6, msg=n)
