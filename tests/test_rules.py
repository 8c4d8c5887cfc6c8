"""Every registered layer rule against the float64 per-example reference (rmt_kernels/rules/).

For each case, a layer and an input factory, on every layout (batch-first sequences and single
rows, an input broadcast over the batch as the capture hands BERT's position ids on, cancelling
inputs and output gradients, huge magnitudes): the rule's norms are certified upper bounds of the
float64 per-example gradients' (and tight on ordinary inputs), cover every trainable parameter,
and clip every example to C; its clipped sum has the parameter's shape and equals the float64
clipped sum; the Opacus drop-in's ghost norms, read from the same registry, bound them too.

A new rule joins with one line in CASES (a third element names a float64 stand-in for a layer
whose forward computes in float32 whatever its dtype: GemmaRMSNorm). ``Shift``, the ReleaseGuard
docstring's example of a user's rule, is registered here and checked like the built-in ones.
Both engines must refuse the same module options (REFUSED).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import rmt_kernels
from rmt_kernels.dp.capture import trainable_layers
from rmt_kernels.opacus import (
    CERTIFIED_NORM_SAMPLERS,
    CertifiedGradSampleModuleFastGradientClipping,
)
from rmt_kernels.opacus.ghost import check_certifiable
from rmt_kernels.reference import clipped_sum, per_example_grads, per_example_sq_norms
from rmt_kernels.rules import (
    LayerRule,
    ReleaseGuard,
    get_layer_rule,
    register_layer_rule,
    registered_layer_rules,
    registry,
)
from rmt_kernels.rules.registry import import_path, registered_named_layer_rules
from rmt_kernels.rules.release_guard import (
    as_sequence,
    compensated_sum,
    remember_sq_norms,
    row_norm_bounds,
)

C = 1.0
B, T = 5, 3
CRAFTED = B - 1  # the adversarial example is the last: the others' terms come first
HUGE = 1e15  # a certified bound near 1e31: finite in float32
OVERFLOW = 1e25  # a squared norm near 1e50: the float32 bound is inf, the clip factor 0
ORDINARY = ["sequence", "rows", "broadcast"]
ADVERSARIAL = ["cancelling-input", "cancelling-grad", "huge"]


class Shift(nn.Module):
    """``y = x + shift``: the layer of the ReleaseGuard docstring's example rule."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.linspace(-0.5, 0.5, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shift


class ShiftTerms:
    def __init__(self, dy):
        self.dy = as_sequence(dy)

    def spread(self):
        return row_norm_bounds(self.dy).sum(1)

    def exact(self, idx):
        return None, compensated_sum(self.dy[idx].double())[:, 0]


def shift_sq_norms(module, x, dy):
    norms = {"shift": rmt_kernels.bias_sq_norms(dy)}
    remember_sq_norms(module, (x, dy), norms)
    return norms


def shift_clipped_noisy_sums(module, x, dy, scale, noise_std, seed, offsets):
    guard = ReleaseGuard("shift", module, (x, dy), scale, lambda: shift_sq_norms(module, x, dy))

    def fused(s):
        return rmt_kernels.bias_clipped_noisy_sum(dy, s, noise_std, seed, offsets["shift"])

    return {"shift": guard.release("shift", ShiftTerms(dy), fused)}


@pytest.fixture(autouse=True, scope="module")
def _shift_rule():
    rule = LayerRule(shift_sq_norms, shift_clipped_noisy_sums, flat_positions=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(registry._RULES, Shift, rule)
        yield


def features(d_in: int, d_out: int):
    """Input factory of a layer on (B, ..., d_in) features with (B, ..., d_out) outputs."""

    def make(layout: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(B, T, d_in, generator=gen) * 2 + 0.5
        dy = torch.randn(B, T, d_out, generator=gen)
        if layout == "rows":
            return x[:, 0], dy[:, 0]
        if layout == "broadcast":  # one example's input shared by all (stride 0 on dim 0)
            return x[:1].expand(B, T, d_in), dy
        u = torch.randn(d_in, generator=gen) * 2.0**30
        v = torch.randn(d_out, generator=gen) * 2.0**30
        if layout == "cancelling-input":  # rows u, small, -u; equal output gradients
            x[CRAFTED] = torch.stack([u, x[CRAFTED, 1], -u])
            dy[CRAFTED] = dy[CRAFTED, 0]
        elif layout == "cancelling-grad":  # output gradients v, small, -v; equal inputs
            dy[CRAFTED] = torch.stack([v, dy[CRAFTED, 1], -v])
            x[CRAFTED] = x[CRAFTED, 0]
        elif layout == "huge":
            dy[CRAFTED] *= HUGE
            dy[CRAFTED - 1] *= OVERFLOW
        return x, dy

    return make


def token_ids(vocab: int, d: int):
    """Input factory of a layer on (B, ...) ids with (B, ..., d) outputs (ids 1 and 7 repeat)."""

    def make(layout: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(0, vocab, (B, T), generator=gen)
        ids[:, 0] = 1  # the padding index of the Embedding case
        ids[0, 1] = 7  # a row the crafted example also updates
        dy = torch.randn(B, T, d, generator=gen)
        if layout == "rows":
            return ids[:, 1], dy[:, 1]
        if layout == "broadcast":
            return ids[:1].expand(B, T), dy
        v = torch.randn(d, generator=gen) * 2.0**30
        w = torch.randn(d, generator=gen) * 2.0**30
        if layout == "cancelling-input":  # one id, rows v, w, -fl(v + w)
            ids[CRAFTED] = 7
            dy[CRAFTED] = torch.stack([v, w, -(v + w)])
        elif layout == "cancelling-grad":  # id 7 at tokens 0 and 2 with rows v and -v
            ids[CRAFTED] = torch.tensor([7, 3, 7])
            dy[CRAFTED] = torch.stack([v, dy[CRAFTED, 1], -v])
        elif layout == "huge":
            dy[CRAFTED] *= HUGE
            dy[CRAFTED - 1] *= OVERFLOW
        return ids, dy

    return make


def hf(path: str):
    """The Hugging Face class at import path ``path`` (transformers imported by the test only)."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def replaced_forward(module: nn.Module) -> nn.Module:
    """``module`` with its forward replaced on the instance, as a hub kernel would."""
    module.forward = lambda x: x  # type: ignore[method-assign]
    return module


LLAMA_NORM = "transformers.models.llama.modeling_llama.LlamaRMSNorm"


def gemma_weight_stand_in(layer: nn.Module) -> nn.Module:
    """A float64-capable layer with GemmaRMSNorm's weight gradient ``dy * xhat``: Gemma's
    forward multiplies in float32 (``x.float()``, ``(1 + weight.float())``), so a float64 copy
    of it still sums the cancelling terms in float32 and is no reference for them."""
    stand_in = nn.RMSNorm(layer.weight.shape[0], eps=layer.eps)
    with torch.no_grad():
        stand_in.weight.copy_(1.0 + layer.weight)
    return stand_in


def float64_stand_in(case, layer: nn.Module) -> nn.Module:
    """The module whose float64 copy is the case's per-example reference: the layer itself,
    or the case's third element applied to it."""
    return case[2](layer) if len(case) > 2 else layer


# One line per rule: (layer factory, input factory). Every registered module type needs one.
CASES = [
    (lambda: nn.Linear(6, 5), features(6, 5)),
    (lambda: nn.Linear(6, 5, bias=False), features(6, 5)),
    (lambda: nn.Embedding(11, 5, padding_idx=1), token_ids(11, 5)),
    (lambda: nn.LayerNorm(6), features(6, 6)),
    (lambda: Shift(6), features(6, 6)),
    # Decoder layers (issue 27): GPT-2's Conv1D(nf=out, nx=in), the RMSNorms.
    (lambda: hf("transformers.pytorch_utils.Conv1D")(5, 6), features(6, 5)),
    (lambda: nn.RMSNorm(6), features(6, 6)),
    (lambda: nn.RMSNorm(6, eps=1e-3), features(6, 6)),
    (lambda: hf(LLAMA_NORM)(6, eps=1e-5), features(6, 6)),
    (lambda: hf("transformers.models.qwen2.modeling_qwen2.Qwen2RMSNorm")(6), features(6, 6)),
    (lambda: hf("transformers.models.qwen3.modeling_qwen3.Qwen3RMSNorm")(6), features(6, 6)),
    (lambda: hf("transformers.models.mistral.modeling_mistral.MistralRMSNorm")(6), features(6, 6)),
    (
        lambda: hf("transformers.models.gemma.modeling_gemma.GemmaRMSNorm")(6),
        features(6, 6),
        gemma_weight_stand_in,
    ),
]


def _case_id(case) -> str:
    layer = case[0]()
    return f"{type(layer).__name__}{'-nobias' if getattr(layer, 'bias', 0) is None else ''}"


def _seeded_layer(factory, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return factory()


def test_every_registered_rule_has_a_case():
    covered = {type(case[0]()) for case in CASES}
    missing = [t.__name__ for t in registered_layer_rules() if t not in covered]
    assert not missing, f"registered rules without a case in CASES: {missing}"
    paths = {import_path(t) for t in covered}
    missing = [p for p in registered_named_layer_rules() if p not in paths]
    assert not missing, f"rules registered by import path without a case in CASES: {missing}"


@pytest.mark.parametrize("layout", ORDINARY + ADVERSARIAL)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_rule_matches_the_float64_reference(case, layout):
    factory, make_inputs = case[:2]
    seed = CASES.index(case) * 100 + (ORDINARY + ADVERSARIAL).index(layout)
    layer = _seeded_layer(factory, seed)
    x, dy = make_inputs(layout, torch.Generator().manual_seed(seed))
    rule = get_layer_rule(layer)
    rule.check_module(layer)
    grads = per_example_grads(float64_stand_in(case, layer), x, dy)
    if layout in ORDINARY and float64_stand_in(case, layer) is not layer:
        # The stand-in computes the layer's own gradient (in float32 there: 1e-6 relative).
        own = per_example_grads(layer, x, dy)
        for name, g in grads.items():
            torch.testing.assert_close(own[name], g, rtol=1e-5, atol=1e-6 * g.abs().max().item())
    truth = per_example_sq_norms(grads)

    bounds = rule.sq_norms(layer, x, dy)
    assert set(bounds) == set(truth), "every trainable parameter must be bounded"
    for name, bound in bounds.items():
        assert bound.shape == (B,) and not torch.isnan(bound).any(), name
        # float64 reference: off by ~1e-16 of the cancelling terms, far below this margin
        assert (bound.double() >= truth[name] * (1 - 1e-6)).all(), (name, bound, truth[name])
        if layout in ORDINARY:  # not vacuous
            assert (bound.double() <= truth[name] * (1 + 1e-5) + 1e-30).all(), name

    scale = rmt_kernels.clip_scales(list(bounds.values()), C)
    norms = sum(truth.values()).sqrt()
    assert (scale.double() * norms <= C * (1 + 1e-6)).all(), (scale, norms)
    if layout == "huge":
        assert scale[CRAFTED - 1] == 0 and 0 < scale[CRAFTED] < 1e-12

    names = sorted(bounds)
    offsets = {name: rmt_kernels.noise_offset(0, i, len(names)) for i, name in enumerate(names)}
    sums = rule.clipped_noisy_sums(layer, x, dy, scale, 0.0, 0, offsets)
    assert set(sums) == set(truth)
    expected = clipped_sum(grads, scale)
    for name, value in sums.items():
        # The engine writes the sum as the parameter's gradient: a transposed sum must fail.
        assert value.shape == layer.get_parameter(name).shape, name
        assert torch.isfinite(value).all(), name
    error = torch.cat([(sums[n].double() - expected[n]).flatten() for n in sorted(sums)])
    assert error.norm() <= 1e-5 * C * B, (layout, error.norm())


@pytest.mark.parametrize("layout", ORDINARY + ADVERSARIAL)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_opacus_ghost_norms_come_from_the_same_rule(case, layout):
    factory, make_inputs = case[:2]
    layer = _seeded_layer(factory, 7)
    x, dy = make_inputs(layout, torch.Generator().manual_seed(7))
    if not get_layer_rule(layer).flat_positions:
        assert type(layer) not in CERTIFIED_NORM_SAMPLERS
        return
    truth = per_example_sq_norms(per_example_grads(float64_stand_in(case, layer), x, dy))
    ghost = CERTIFIED_NORM_SAMPLERS[type(layer)](layer, [x], dy)
    params = dict(layer.named_parameters())
    assert {id(p) for p in ghost} == {id(p) for p in params.values() if p.requires_grad}
    for name, p in params.items():
        assert (ghost[p].double().square() >= truth[name] * (1 - 1e-6)).all(), name
    # A (B, T1, T2, d) input is positions of the same example: the norms of its flattening.
    if layout == "sequence" and x.is_floating_point():
        x4, dy4 = x.unsqueeze(1).expand(B, 2, T, x.shape[-1]), dy.unsqueeze(1).expand(B, 2, T, -1)
        four = CERTIFIED_NORM_SAMPLERS[type(layer)](layer, [x4], dy4)
        truth4 = per_example_sq_norms(per_example_grads(float64_stand_in(case, layer), x4, dy4))
        for name, p in params.items():
            assert (four[p].double().square() >= truth4[name] * (1 - 1e-6)).all(), name


# Module options no rule follows: the native engine and the Opacus drop-in refuse the same.
REFUSED = [
    (lambda: nn.LayerNorm((3, 4)), "last dimension"),
    (lambda: nn.Embedding(5, 4, max_norm=1.0), "max_norm"),
    (lambda: nn.Embedding(5, 4, sparse=True), "sparse"),
    (lambda: nn.Embedding(5, 4, scale_grad_by_freq=True), "scale_grad_by_freq"),
    (lambda: nn.RMSNorm((3, 4)), "last dimension"),
    (lambda: replaced_forward(hf(LLAMA_NORM)(4)), "forward was replaced"),
    (lambda: replaced_forward(hf("transformers.pytorch_utils.Conv1D")(4, 3)), "forward was"),
]


@pytest.mark.parametrize(("factory", "reason"), REFUSED, ids=lambda v: str(v)[:24])
def test_both_engines_refuse_the_same_module_options(factory, reason):
    with pytest.raises(ValueError, match=reason):
        trainable_layers(nn.Sequential(factory()))
    with pytest.raises(NotImplementedError, match=reason):
        check_certifiable(nn.Sequential(factory()))
    with pytest.raises(NotImplementedError, match=reason):
        CertifiedGradSampleModuleFastGradientClipping(factory())


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_both_engines_accept_every_case(case):
    trainable_layers(nn.Sequential(case[0]()))
    check_certifiable(nn.Sequential(case[0]()))


def test_register_layer_rule_takes_one_module_type_or_several():
    class A(nn.Linear):
        pass

    class Bb(nn.Linear):
        pass

    linear = get_layer_rule(nn.Linear(2, 2))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(registry, "_RULES", dict(registry._RULES))
        register_layer_rule((A, Bb), linear)
        assert get_layer_rule(A(2, 2)) is linear and get_layer_rule(Bb(2, 2)) is linear

        @register_layer_rule(A)
        class ARule:
            sq_norms = staticmethod(linear.sq_norms)
            clipped_noisy_sums = staticmethod(linear.clipped_noisy_sums)

        assert get_layer_rule(A(2, 2)).sq_norms is linear.sq_norms
        assert not get_layer_rule(A(2, 2)).flat_positions  # opted out by default
        with pytest.raises(TypeError, match=r"nn\.Module subclass"):
            register_layer_rule((A, int), linear)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="rule must be a LayerRule"):
            register_layer_rule(A, ARule)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="has no clipped_noisy_sums"):
            register_layer_rule(A)(type("Half", (), {"sq_norms": staticmethod(len)}))
