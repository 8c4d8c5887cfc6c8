"""Privacy invariants 1 and 2 (PRIVACY.md) on the fused ops: removing one example moves the
pre-noise clipped sum of a small model (Linear + bias, Embedding, LayerNorm) by at most C, and
every parameter has a rule."""

import copy
import math

import pytest
import torch
from torch import nn

import rmt_kernels
from rmt_kernels.ops import noise_offset
from rmt_kernels.rules import LayerRule, get_layer_rule, register_layer_rule
from rmt_kernels.rules.registry import _RULES

C = 1.0


def _batch(B, T, kind):
    emb, lin, ln = nn.Embedding(11, 6), nn.Linear(6, 5), nn.LayerNorm(5)
    ids = torch.randint(0, 11, (B, T))
    h = torch.randn(B, T, 6)
    z = torch.randn(B, T, 5)
    dys = {"emb": torch.randn(B, T, 6), "lin": torch.randn(B, T, 5), "ln": torch.randn(B, T, 5)}
    for dy in dys.values():
        if kind == "adversarial":  # one example with a gradient ~1e6 times the others'
            dy[B // 2] *= 1e6
        if kind == "small":  # every gradient below C: nothing is clipped
            dy *= 1e-2
    layers = [(emb, ids, dys["emb"]), (lin, h, dys["lin"]), (ln, z, dys["ln"])]
    return layers


def _clipped_sums(layers, keep):
    """Pre-noise clipped sums of the examples in ``keep``, all parameters, flattened."""
    sub = [(m, x[keep], dy[keep]) for m, x, dy in layers]
    total = sum(n for m, x, dy in sub for n in get_layer_rule(m).sq_norms(m, x, dy).values())
    scale = rmt_kernels.clip_scales(total, C)
    parts = []
    for i, (m, x, dy) in enumerate(sub):
        names = [n for n, _ in m.named_parameters()]
        offsets = {n: noise_offset(0, 2 * i + j, 6) for j, n in enumerate(names)}
        sums = get_layer_rule(m).clipped_noisy_sums(m, x, dy, scale, 0.0, 0, offsets)
        assert set(sums) == set(names)  # every trainable parameter is covered
        parts += [sums[n].double().flatten() for n in names]
    return torch.cat(parts)


def _example_norm(layers, k: int) -> float:
    """Example k's gradient norm over all parameters, by float64 autograd on that example."""
    total = 0.0
    for m, x, dy in layers:
        m64 = copy.deepcopy(m).double()
        inp = x[k : k + 1] if x.dtype == torch.long else x[k : k + 1].double()
        grads = torch.autograd.grad(m64(inp), list(m64.parameters()), dy[k : k + 1].double())
        total += sum(g.square().sum().item() for g in grads)
    return math.sqrt(total)


@pytest.mark.parametrize("kind", ["ordinary", "adversarial", "small"])
@pytest.mark.parametrize(("B", "T"), [(6, 4), (1, 3), (5, 1)])
def test_removing_one_example_moves_the_sum_by_at_most_c(B, T, kind):
    layers = _batch(B, T, kind)
    full = _clipped_sums(layers, torch.arange(B))
    for k in range(B):
        keep = torch.tensor([b for b in range(B) if b != k], dtype=torch.long)
        without = torch.zeros_like(full) if len(keep) == 0 else _clipped_sums(layers, keep)
        moved = (full - without).norm().item()
        # float32 sums of terms up to C each: allow rounding of a few ulps of the sum's scale.
        assert moved <= C * (1 + 1e-4)
        # ... and from below: the sum moves by example k's whole clipped gradient, min(C, |g_k|)
        # by the float64 reference (a rule that clips it further, or to nothing, fails).
        expected = min(C, _example_norm(layers, k))
        assert moved == pytest.approx(expected, rel=1e-4), (k, moved, expected)


def test_unknown_layer_is_an_error_and_rules_can_be_registered():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.gain

    with pytest.raises(TypeError, match="no DP layer rule for Scale"):
        get_layer_rule(Scale())

    def norms(m, x, dy):
        return {"gain": (x * dy).flatten(1, -2).sum(1).square().sum(1)}

    def sums(m, x, dy, scale, noise_std, seed, offsets):
        g = torch.einsum("b,b...d->d", scale, x * dy)
        return {"gain": rmt_kernels.add_gaussian_noise(g, noise_std, seed, offsets["gain"])}

    register_layer_rule(Scale, LayerRule(norms, sums))
    try:
        m, x, dy = Scale(), torch.randn(3, 2, 4), torch.randn(3, 2, 4)
        from rmt_kernels.reference import per_example_grads, per_example_sq_norms

        expected = per_example_sq_norms(per_example_grads(m, x, dy))["gain"]
        got = get_layer_rule(m).sq_norms(m, x, dy)["gain"]
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    finally:
        _RULES.pop(Scale)


def test_unsupported_module_options_are_refused():
    ids, dy = torch.zeros(2, 3, dtype=torch.long), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="max_norm"):
        m = nn.Embedding(5, 4, max_norm=1.0)
        get_layer_rule(m).sq_norms(m, ids, dy)
    with pytest.raises(ValueError, match="last dimension"):
        m = nn.LayerNorm((3, 4))
        get_layer_rule(m).sq_norms(m, torch.randn(2, 3, 4), torch.randn(2, 3, 4))


def test_clip_scales_bound_every_example():
    sq = torch.tensor([0.0, 0.25, 1.0, 4.0, 1e12])
    scale = rmt_kernels.clip_scales(sq, C)
    assert torch.all(scale * sq.sqrt() <= C) and torch.all(scale <= 1)
    with pytest.raises(ValueError, match="max_grad_norm"):
        rmt_kernels.clip_scales(sq, 0.0)


def test_embedding_padding_idx_gets_no_gradient_as_in_torch():
    # RoBERTa looks up its padding token (padding_idx=1) at every padded position.
    from rmt_kernels.reference import per_example_grads, per_example_sq_norms

    m = nn.Embedding(7, 4, padding_idx=1)
    ids = torch.tensor([[1, 1, 3, 2], [5, 1, 1, 1], [1, 6, 6, 0]])
    dy = torch.randn(3, 4, 4)
    rule = get_layer_rule(m)
    grads = per_example_grads(m, ids, dy)
    torch.testing.assert_close(
        rule.sq_norms(m, ids, dy)["weight"].double(),
        per_example_sq_norms(grads)["weight"],
        rtol=1e-5,
        atol=1e-6,
    )
    scale = torch.tensor([1.0, 0.5, 0.25])
    total = rule.clipped_noisy_sums(m, ids, dy, scale, 0.0, 0, {"weight": 0})["weight"]
    expected = torch.einsum("b,bij->ij", scale.double(), grads["weight"])
    torch.testing.assert_close(total.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.all(total[1] == 0)


def test_layer_rules_give_the_clipped_sum_of_a_whole_model():
    # Embedding -> LayerNorm -> Linear, clipped per example over ALL parameters together: the
    # rules' norms summed over layers must give the total norm, and their sums the clipped sum of
    # explicit per-example gradients of the whole model (torch.func).
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(1)
    model = nn.Sequential(nn.Embedding(13, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    B, T = 5, 6
    ids, target = torch.randint(0, 13, (B, T)), torch.randn(B, T, 3)

    def loss_fn(out, tgt):
        return ((out - tgt) ** 2).sum()

    captured: dict[nn.Module, list[torch.Tensor]] = {}

    def keep_input(m, inputs, output):
        captured[m] = [inputs[0].detach()]

    def keep_output_grad(m, grad_inputs, grad_outputs):
        captured[m].append(grad_outputs[0].detach())

    hooks = []
    for layer in model:
        hooks.append(layer.register_forward_hook(keep_input))
        hooks.append(layer.register_full_backward_hook(keep_output_grad))
    loss_fn(model(ids), target).backward()
    for h in hooks:
        h.remove()
    total = sum(
        n for m, (x, dy) in captured.items() for n in get_layer_rule(m).sq_norms(m, x, dy).values()
    )
    scale = rmt_kernels.clip_scales(total, C)
    ours = {}
    for m, (x, dy) in captured.items():
        sums = get_layer_rule(m).clipped_noisy_sums(
            m, x, dy, scale, 0.0, 0, {"weight": 0, "bias": 0}
        )
        for name, value in sums.items():
            ours[f"{list(model).index(m)}.{name}"] = value

    params = {k: v.detach() for k, v in model.named_parameters()}

    def per_example_loss(p, i, t):
        return loss_fn(functional_call(model, p, (i.unsqueeze(0),)), t.unsqueeze(0))

    per_example = vmap(grad(per_example_loss), in_dims=(None, 0, 0))(params, ids, target)
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in per_example.values()))
    torch.testing.assert_close(total.sqrt(), norms, rtol=1e-4, atol=1e-6)
    ref_scale = (C / (norms + 1e-6)).clamp(max=1.0)
    assert set(ours) == set(per_example)
    for k, g in per_example.items():
        expected = torch.einsum("b,b...->...", ref_scale, g)
        torch.testing.assert_close(ours[k], expected, rtol=1e-4, atol=1e-5)
