"""Tied input/output embeddings (issue 27; privacy invariants 1, 2, 3 and 6 of PRIVACY.md): one
Parameter as an nn.Embedding's weight and an nn.Linear head's (rmt_kernels/rules/tied_embedding.py,
rmt_kernels/dp/tied_units.py).

The tied weight's per-example gradient is E_b + L_b; its norm needs the cross term 2 <E_b, L_b>.
Checked: the certified bound against the exact float64 norm when the two parts align and cancel
(a clip ignoring the cross term, or using the triangle inequality, fails); the engine's clipped
sum against a float64 per-example reference, on a hand-made model and tiny tied GPT-2 and Llama;
removing one example moves the noise-free sum by at most C; the release guard keeps float32
rounding of a crafted cancelling example out of the sum; the noise enters once (std sigma C, not
sqrt(2) or 2 times it); every other sharing is refused; the Opacus drop-in is exact in hooks mode
and refuses ghost mode.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.functional import cross_entropy
from torch.utils.data import DataLoader, TensorDataset

import rmt_kernels
from rmt_kernels.dp import make_private
from rmt_kernels.ops import (
    OFFSET_STRIDE,
    embedding_clipped_noisy_sum,
    embedding_sq_norms,
    linear_clipped_noisy_sum,
    linear_sq_norms,
)
from rmt_kernels.rules.tied_embedding import (
    TIED_EMBEDDING_RULE,
    TiedEmbeddingPair,
    cross_term_bounds,
    tied_sq_norms,
)
from tests.helpers import assert_gaussian_noise

C = 0.5
V, D = 23, 8


class TiedLM(nn.Module):
    """Embedding -> Linear -> LayerNorm -> Linear head tied to the embedding."""

    def __init__(
        self, vocab: int = V, dim: int = D, padding_idx: int | None = None, last: int = 0
    ) -> None:
        super().__init__()
        self.last = last  # > 0: the head sees only the last ``last`` positions
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.lin = nn.Linear(dim, dim)
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.ln(torch.tanh(self.lin(self.emb(ids))))
        return self.head(h[:, -self.last :] if self.last else h)


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")


def _private(model, ids, targets, noise_multiplier=0.0, **kw):
    loader = DataLoader(TensorDataset(ids, targets), batch_size=len(ids))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    return make_private(
        model,
        opt,
        loader,
        target_delta=1e-5,
        max_grad_norm=C,
        noise_multiplier=noise_multiplier,
        poisson_sampling=False,
        loss_reduction="sum",
        **kw,
    )


def _engine_sum(base, ids, targets, keep, noise_multiplier=0.0, **forward_kw):
    """The engine's released sum (p.grad times the expected batch size) over examples keep."""
    model = copy.deepcopy(base)
    x, y = ids[keep], targets[keep]
    model, opt, _ = _private(model, x, y, noise_multiplier=noise_multiplier)
    _loss(_logits(model(x, **forward_kw)), y).backward()
    opt.step()
    batch = opt.engine.expected_batch_size
    return {n: p.grad.double() * batch for n, p in model.named_parameters() if p.requires_grad}


def _logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def _reference_sum(base, ids, targets, keep, **forward_kw):
    """sum_b min(1, C / ||g_b||) g_b, g_b from one float64 forward/backward per example (the
    tied weight's gradient is autograd's sum of both uses)."""
    model = copy.deepcopy(base).double()
    total: dict[str, torch.Tensor] = {}
    for b in keep.tolist():
        model.zero_grad(set_to_none=True)
        _loss(_logits(model(ids[b : b + 1], **forward_kw)), targets[b : b + 1]).backward()
        g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        norm = math.sqrt(sum(float(t.square().sum()) for t in g.values()))
        factor = min(1.0, C / norm) if norm > 0 else 1.0
        for n, t in g.items():
            total[n] = total.get(n, 0) + factor * t
    return total


def _distance(a: dict, b: dict) -> float:
    return math.sqrt(sum(float((a[n] - b[n]).square().sum()) for n in a))


def _data(B: int, T: int, vocab: int = V, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=gen), torch.randint(
        0, vocab, (B, T), generator=gen
    )


# ------------------------------------------------------------------------------------------
# The certified norm: cross term included
# ------------------------------------------------------------------------------------------


def _exact_sq_norms(ids, e, h, g):
    """||E_b + L_b||^2 from the dense float64 gradients (E scattered by id, L = g^T h)."""
    out = []
    for b in range(ids.shape[0]):
        dense = g[b].double().T @ h[b].double()
        dense.index_add_(0, ids[b], e[b].double())
        out.append(float(dense.square().sum()))
    return torch.tensor(out, dtype=torch.float64)


def _aligned_and_cancelling(sign: float, B: int = 4, T: int = 3, S: int = 3):
    """Examples whose head gradient L_b is sign times the embedding's E_b: the head's input
    rows are the embedding's output-gradient rows, its output gradient picks their ids."""
    gen = torch.Generator().manual_seed(5)
    ids = torch.stack([torch.randperm(V, generator=gen)[:T] for _ in range(B)])
    e = torch.randn(B, T, D, generator=gen)
    h = e.clone()
    g = torch.zeros(B, S, V)
    g.scatter_(2, ids.unsqueeze(-1), sign)  # g[b, t, id_t] = sign: L_b = sign * E_b
    return ids, e, h, g


@pytest.mark.parametrize("sign", [1.0, -1.0, 0.5, 0.0])
def test_bound_follows_the_cross_term_when_the_parts_align_or_cancel(sign):
    ids, e, h, g = _aligned_and_cancelling(sign)
    exact = _exact_sq_norms(ids, e, h, g)
    bound = tied_sq_norms(ids, e, h, g).double()
    e_sq = _exact_sq_norms(ids, e, h, torch.zeros_like(g))
    # Aligned (sign 1): ||E + L||^2 = 4 ||E||^2, twice what ||E||^2 + ||L||^2 gives; cancelling
    # (sign -1): 0, where the triangle inequality gives 4 ||E||^2. The bound must be above the
    # exact value and tight within the float64 error terms either way.
    assert torch.all(bound >= exact)
    assert torch.all(bound <= exact + 1e-6 * e_sq + 1e-30), (bound, exact)
    assert torch.allclose(exact, (1 + sign) ** 2 * e_sq, rtol=1e-12)


def test_bound_is_above_the_exact_norm_on_random_and_repeated_ids():
    gen = torch.Generator().manual_seed(3)
    B, T, S = 6, 7, 5
    ids = torch.randint(0, 4, (B, T), generator=gen)  # many repeated ids
    e, h = torch.randn(B, T, D, generator=gen), torch.randn(B, S, D, generator=gen)
    g = torch.randn(B, S, V, generator=gen)
    h[0] = e[0, :S]  # example 0: L partly aligned with E
    g[0, torch.arange(S), ids[0, :S]] = 30.0
    exact = _exact_sq_norms(ids, e, h, g)
    bound = tied_sq_norms(ids, e, h, g).double()
    assert torch.all(bound >= exact)
    torch.testing.assert_close(bound, exact, rtol=1e-6, atol=0.0)


def test_the_cross_terms_error_bound_covers_its_float64_rounding():
    # The cross term is signed: rounded up or down it may shrink the bound below the exact norm,
    # so its float64 value must come with a rigorous error term. Entries of widely spread
    # magnitudes make every float64 sum round; the exact value is rational arithmetic on the
    # same float32 inputs.
    from fractions import Fraction

    gen = torch.Generator().manual_seed(12)
    B, T, S, d = 3, 4, 3, 16
    ids = torch.randint(0, V, (B, T), generator=gen)
    spread = 2.0 ** torch.randint(0, 24, (B, T, d), generator=gen)
    e = torch.randn(B, T, d, generator=gen) * spread
    h = torch.randn(B, S, d, generator=gen) * 2.0 ** torch.randint(0, 24, (B, S, d), generator=gen)
    g = torch.randn(B, S, V, generator=gen)
    cross, error = cross_term_bounds(ids, e, h, g)
    for b in range(B):
        exact = sum(
            Fraction(g[b, s, ids[b, t]].item())
            * sum(Fraction(e[b, t, k].item()) * Fraction(h[b, s, k].item()) for k in range(d))
            for t in range(T)
            for s in range(S)
        )
        miss = abs(Fraction(cross[b].item()) - exact)
        assert miss > 0  # the case rounds: an error term of 0 would fail here
        assert miss <= Fraction(error[b].item()), (b, float(miss), float(error[b]))


def test_a_non_finite_input_gets_an_infinite_bound():
    ids, e, h, g = _aligned_and_cancelling(1.0)
    h[1, 0, 0] = math.inf
    e[2, 0, 0] = math.nan
    bound = tied_sq_norms(ids, e, h, g)
    assert math.isinf(bound[1]) and math.isinf(bound[2]) and torch.isfinite(bound[[0, 3]]).all()


# ------------------------------------------------------------------------------------------
# The rule's release: clipped sum, release guard, noise once
# ------------------------------------------------------------------------------------------


def _rule_release(ids, e, h, g, keep, noise_std=0.0, offset=3 * OFFSET_STRIDE):
    module = TiedEmbeddingPair(nn.Embedding(V, D), nn.Linear(D, V, bias=False))
    x, dy = (ids[keep], h[keep]), (e[keep], g[keep])
    norms = TIED_EMBEDDING_RULE.sq_norms(module, x, dy)
    scale = rmt_kernels.clip_scales(list(norms.values()), C)
    sums = TIED_EMBEDDING_RULE.clipped_noisy_sums(
        module, x, dy, scale, noise_std, 11, {"weight": offset}
    )
    return scale, sums["weight"]


def _crafted_cancelling():
    """Ordinary examples, then one whose head rows are [2^30 w, a, -2^30 w] (float32 rounding of
    the head's pass ~64 per entry) while its embedding gradient cancels the exact rest: its
    exact tied gradient is 0."""
    gen = torch.Generator().manual_seed(9)
    B, T, S = 4, 1, 3
    ids = torch.randint(0, V, (B, T), generator=gen)
    e = torch.randn(B, T, D, generator=gen)
    h = torch.randn(B, S, D, generator=gen)
    g = torch.randn(B, S, V, generator=gen) * 0.1
    w, a = torch.randn(D, generator=gen), torch.randn(D, generator=gen)
    h[-1] = torch.stack([2.0**30 * w, a, -(2.0**30) * w])
    g[-1] = 0.0
    g[-1, :, ids[-1, 0]] = -1.0  # L = -(2^30 w + a - 2^30 w) = -a exactly
    e[-1, 0] = a  # E = a: E + L = 0
    return ids, e, h, g


def test_release_matches_the_float64_clipped_sum_and_one_example_moves_it_at_most_c():
    ids, e, h, g = _crafted_cancelling()
    B = ids.shape[0]
    everyone = torch.arange(B)
    scale, full = _rule_release(ids, e, h, g, everyone)
    # Exact clipped sum with the rule's own clip factors: dense float64 per example.
    exact = torch.zeros(V, D, dtype=torch.float64)
    for b in range(B):
        dense = g[b].double().T @ h[b].double()
        dense.index_add_(0, ids[b], e[b].double())
        exact += float(scale[b]) * dense
    torch.testing.assert_close(full.double(), exact, rtol=0, atol=1e-5 * C)
    for k in range(B):
        keep = torch.tensor([b for b in range(B) if b != k])
        _, without = _rule_release(ids, e, h, g, keep)
        moved = float((full.double() - without.double()).norm())
        assert moved <= C * (1 + 1e-5), (k, moved / C)


def test_the_noise_is_added_once_to_the_tied_sum():
    # std sigma C on every entry of the tied weight's released sum: not sqrt(2) times it (each
    # use noised from its own stream) nor 2 times (one stream added twice). V x D = 184
    # entries pooled over 8 counter ranges: 1472 draws resolve a 25% error (sqrt(2) is 41%)
    # with a false failure and a miss both below 1e-6 (assert_gaussian_noise checks its power).
    ids, e, h, g = _crafted_cancelling()
    keep = torch.arange(ids.shape[0] - 1)  # the ordinary examples
    std = 1.3 * C
    draws = []
    _, clean = _rule_release(ids, e, h, g, keep)
    for k in range(8):
        _, noisy = _rule_release(ids, e, h, g, keep, std, offset=(5 + k) * OFFSET_STRIDE)
        draws.append((noisy.double() - clean.double()).flatten())
    assert_gaussian_noise(torch.cat(draws), std, rel=0.25)


def test_a_part_whose_module_did_not_run_contributes_nothing():
    # LayerDrop-style: only one of the two modules ran in the batch; the tied gradient is the
    # other part alone, with its own bound and its noise (still drawn once).
    ids, e, h, g = _aligned_and_cancelling(1.0)
    module = TiedEmbeddingPair(nn.Embedding(V, D), nn.Linear(D, V, bias=False))
    scale = torch.full((ids.shape[0],), 0.25)
    for x, dy, alone in [
        ((ids, None), (e, None), lambda s: embedding_clipped_noisy_sum(ids, e, s, V, 0.0, 1, 0)),
        ((None, h), (None, g), lambda s: linear_clipped_noisy_sum(h, g, s, 0.0, 1, 0)),
    ]:
        norms = TIED_EMBEDDING_RULE.sq_norms(module, x, dy)["weight"]
        parts = [t for t in (*x, *dy) if t is not None]
        own = embedding_sq_norms(*parts) if x[1] is None else linear_sq_norms(*parts)
        assert torch.equal(norms, own)
        sums = TIED_EMBEDDING_RULE.clipped_noisy_sums(module, x, dy, scale, 0.0, 1, {"weight": 0})
        assert torch.equal(sums["weight"], alone(scale))


# ------------------------------------------------------------------------------------------
# The engine
# ------------------------------------------------------------------------------------------


def _aligned_model():
    """TiedLM with one example whose embedding and head gradients align: its tied gradient norm
    is well above sqrt(||E||^2 + ||L||^2), and it is clipped."""
    torch.manual_seed(0)
    base = TiedLM()
    ids, targets = _data(5, 4, seed=3)
    with torch.no_grad():
        base.emb.weight[ids[2, 0]] *= 30.0  # large logits and embeddings for example 2
    return base, ids, targets


def test_engine_matches_the_float64_reference_and_one_example_moves_at_most_c():
    base, ids, targets = _aligned_model()
    B = ids.shape[0]
    everyone = torch.arange(B)
    full = _engine_sum(base, ids, targets, everyone)
    reference = _reference_sum(base, ids, targets, everyone)
    assert set(full) == set(reference) == {n for n, _ in base.named_parameters()}
    for n in reference:
        torch.testing.assert_close(full[n], reference[n], rtol=1e-4, atol=1e-6, msg=n)
    for k in range(B):
        keep = torch.tensor([b for b in range(B) if b != k])
        assert _distance(full, _engine_sum(base, ids, targets, keep)) <= C * (1 + 1e-4)


def test_engine_with_padding_and_a_head_on_some_positions():
    # nn.Embedding gives the padding row no gradient, the head does: the tied gradient's padding
    # row is the head's alone. The head sees only the last two positions.
    torch.manual_seed(1)
    base = TiedLM(padding_idx=0, last=2)
    ids, targets = _data(4, 5, seed=4)
    ids[:, :2] = 0
    targets = targets[:, -2:]
    everyone = torch.arange(4)
    full = _engine_sum(base, ids, targets, everyone)
    reference = _reference_sum(base, ids, targets, everyone)
    for n in reference:
        torch.testing.assert_close(full[n], reference[n], rtol=1e-4, atol=1e-6, msg=n)


def test_engine_lists_the_tied_weight_once_and_noises_it_once():
    torch.manual_seed(2)
    base = TiedLM(vocab=400, dim=16)
    ids, targets = _data(3, 4, vocab=400, seed=6)
    _, opt, _ = _private(copy.deepcopy(base), ids, targets)
    engine = opt.engine
    assert engine.param_names == [n for n, _ in base.named_parameters()]
    assert engine.param_names.count("emb.weight") == 1
    everyone = torch.arange(3)
    clean = _engine_sum(base, ids, targets, everyone)
    noisy = _engine_sum(base, ids, targets, everyone, noise_multiplier=1.0)
    # 6400 entries of the tied weight resolve a 20% error with a false failure and a miss both
    # below 1e-6; a tie noised by both uses would be off by sqrt(2) (41%) or 2 times.
    assert_gaussian_noise(noisy["emb.weight"] - clean["emb.weight"], C, rel=0.2)


def _tiny_decoder(kind: str) -> nn.Module:
    """A tiny Hugging Face decoder with tie_word_embeddings=True, every parameter trainable
    (GPT-2: Conv1D and LayerNorm; Llama: RMSNorm, rotary, grouped-query attention)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=64,
            n_positions=16,
            n_embd=32,
            n_layer=1,
            n_head=2,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
        )
        model = transformers.GPT2LMHeadModel(config)
        assert model.lm_head.weight is model.transformer.wte.weight
        return model
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_tiny_tied_decoder_matches_the_float64_reference(kind):
    base = _tiny_decoder(kind)
    ids, targets = _data(3, 6, vocab=64, seed=8)
    everyone = torch.arange(3)
    full = _engine_sum(base, ids, targets, everyone)
    reference = _reference_sum(base, ids, targets, everyone)
    tied = "transformer.wte.weight" if kind == "gpt2" else "model.embed_tokens.weight"
    assert tied in full and "lm_head.weight" not in full
    assert set(full) == set(reference)
    for n in reference:
        torch.testing.assert_close(full[n], reference[n], rtol=1e-4, atol=1e-6, msg=n)


def test_param_guards_hold_for_the_tied_weight():
    # A use of the tied weight outside its two modules is refused at backward; freezing it
    # after make_private is refused at step (privacy invariant 8, PRIVACY.md).
    ids, targets = _data(2, 3)
    model, opt, _ = _private(TiedLM(), ids, targets)
    extra = torch.nn.functional.linear(torch.ones(2, 3, D), model.emb.weight)
    logits = model(ids) + extra
    with pytest.raises(RuntimeError, match=r"parameter 'emb.weight' got a gradient"):
        _loss(logits, targets).backward()
    model, opt, _ = _private(TiedLM(), ids, targets)
    _loss(model(ids), targets).backward()
    model.head.weight.requires_grad_(False)
    with pytest.raises(RuntimeError, match=r"'emb.weight' was frozen after make_private"):
        opt.step()


# ------------------------------------------------------------------------------------------
# Refusals
# ------------------------------------------------------------------------------------------


def _two_linears():
    model = TiedLM()
    model.lin2 = nn.Linear(D, D)
    model.lin2.weight = model.lin.weight
    return model


def _mismatched_head():
    model = TiedLM(vocab=D)  # a square table: Linear(V, d)'s declared shape is the transpose
    model.head = nn.Linear(D, D, bias=False)
    model.emb = nn.Embedding(D, D)
    model.head.in_features = D + 1
    model.head.weight = model.emb.weight
    return model


def _three_uses():
    model = TiedLM()
    model.head2 = nn.Linear(D, V, bias=False)
    model.head2.weight = model.emb.weight
    return model


def _head_with_bias():
    model = TiedLM()
    model.head.bias = nn.Parameter(torch.zeros(V))
    return model


@pytest.mark.parametrize(
    ("build", "words"),
    [
        (_two_linears, r"'lin.weight' \(Linear\), 'lin2.weight' \(Linear\).*not an nn.Embedding"),
        (_mismatched_head, r"in_features=9, out_features=8.*nn.Embedding\(8, 8\)"),
        (_three_uses, r"used by 3 modules"),
        (_head_with_bias, r"trainable bias"),
    ],
)
def test_other_sharing_is_refused_at_make_private(build, words):
    ids, targets = _data(2, 3)
    with pytest.raises(ValueError, match=words):
        _private(build(), ids, targets)


# ------------------------------------------------------------------------------------------
# The Opacus drop-in
# ------------------------------------------------------------------------------------------


def _dropin(model, ids, targets, mode):
    pytest.importorskip("opacus")
    from rmt_kernels.opacus import DenoisingPrivacyEngine

    engine = DenoisingPrivacyEngine(accountant="rdp")
    kwargs = {"criterion": nn.CrossEntropyLoss(reduction="sum")} if mode == "ghost" else {}
    return engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=DataLoader(TensorDataset(ids, targets), batch_size=len(ids)),
        noise_multiplier=0.0,
        max_grad_norm=C,
        grad_sample_mode=mode,
        poisson_sampling=False,
        loss_reduction="sum",
        **kwargs,
    )


def test_opacus_dropin_hooks_mode_sums_both_uses_before_clipping():
    base, ids, targets = _aligned_model()
    model, optimizer, _ = _dropin(copy.deepcopy(base), ids, targets, "hooks")
    _loss(model(ids), targets).backward()
    optimizer.step()
    reference = _reference_sum(base, ids, targets, torch.arange(len(ids)))
    for n, p in model._module.named_parameters():
        torch.testing.assert_close(p.grad.double(), reference[n], rtol=1e-4, atol=1e-6, msg=n)


def test_opacus_dropin_ghost_mode_refuses_tied_weights():
    ids, targets = _data(2, 3)
    with pytest.raises(NotImplementedError, match=r"emb.weight and head.weight.*tied"):
        _dropin(TiedLM(), ids, targets, "ghost")
