"""The float32 rounding of the released clipped sum is not the adversary's (ReleaseGuard,
rmt_kernels/rules/release_guard.py).

An example whose token terms cancel (rows ``[u, a, -u]`` with ``|u| = 2^k``, or ``[u, -u + v]``
with ``|u| >> |v|``) has a small exact gradient but huge float32 terms; summed in the fused
float32 op, its rounding (``~u32 scale |u|``) moved the released sum by up to ~0.8 C beyond its
clipped contribution. Through every layer rule (Linear weight and bias, Embedding with repeated
ids, LayerNorm weight and bias), with noise off, the released sum with and without such an
example must differ by at most ``C (1 + 1e-5)`` and equal the exact clipped sum (rational or
100-digit arithmetic on the same float inputs and clip factors) within ``1e-5 C``; ordinary inputs
must give bit-identical results to the fused op alone (no example set apart).
"""

from __future__ import annotations

import decimal
from fractions import Fraction

import pytest
import torch
from torch import nn

import rmt_kernels
from rmt_kernels.ops import OFFSET_STRIDE
from rmt_kernels.rules import get_layer_rule
from rmt_kernels.rules.embedding import EmbeddingTerms, without_padding
from rmt_kernels.rules.layernorm import LayerNormTerms
from rmt_kernels.rules.linear import LinearTerms
from rmt_kernels.rules.release_guard import AMPLIFICATION_LIMIT, ReleaseGuard

C = 1.0
MAGNITUDES = [10, 20, 30, 40, 50, 60]
B, T = 5, 3  # the crafted example is the last one (CRAFTED): the others' terms come first, so
CRAFTED = B - 1  # its cancelling terms meet partial sums that are not zero


def _rule_sums(module, inputs, keep, noise_std=0.0, clip=C):
    """Clip factors and released sums (float64 copies of the float32 results) of examples keep."""
    sub = tuple(t[keep] for t in inputs)
    rule = get_layer_rule(module)
    norms = rule.sq_norms(module, *sub)
    scale = rmt_kernels.clip_scales(list(norms.values()), clip)
    offsets = {name: i * OFFSET_STRIDE for i, name in enumerate(sorted(norms))}
    sums = rule.clipped_noisy_sums(module, *sub, scale, noise_std, 7, offsets)
    return scale, {name: sums[name].double() for name in sorted(sums)}


def _flat(sums):
    return torch.cat([sums[name].flatten() for name in sorted(sums)])


def _exact_linear(x, dy, scale, bias):
    """sum_b scale_b sum_t dy_bt x_bt^T (and sum_t dy_bt) in rational arithmetic."""
    Bn, Tn, d_in = x.shape
    d_out = dy.shape[2]
    X = [[[Fraction(v) for v in row] for row in ex] for ex in x.tolist()]
    D = [[[Fraction(v) for v in row] for row in ex] for ex in dy.tolist()]
    w = [[Fraction(0)] * d_in for _ in range(d_out)]
    b = [Fraction(0)] * d_out
    for e in range(Bn):
        s = Fraction(scale[e].item())
        for t in range(Tn):
            for i in range(d_out):
                b[i] += s * D[e][t][i]
                for j in range(d_in):
                    w[i][j] += s * D[e][t][i] * X[e][t][j]
    out = {"weight": torch.tensor([[float(v) for v in r] for r in w], dtype=torch.float64)}
    if bias:
        out["bias"] = torch.tensor([float(v) for v in b], dtype=torch.float64)
    return out


def _exact_embedding(ids, dy, scale, num_embeddings):
    d = dy.shape[2]
    table = [[Fraction(0)] * d for _ in range(num_embeddings)]
    for e, (row_ids, rows) in enumerate(zip(ids.tolist(), dy.tolist(), strict=True)):
        s = Fraction(scale[e].item())
        for v, r in zip(row_ids, rows, strict=True):
            for j in range(d):
                table[v][j] += s * Fraction(r[j])
    return {"weight": torch.tensor([[float(v) for v in r] for r in table], dtype=torch.float64)}


def _exact_layernorm(x, dy, scale, eps):
    """sum_b scale_b sum_t dy_bt * xhat_bt with the exact xhat, to 100 digits."""
    ctx = decimal.Context(prec=100)
    d = x.shape[2]
    w = [decimal.Decimal(0)] * d
    b = [decimal.Decimal(0)] * d
    for e, (xs, dys) in enumerate(zip(x.tolist(), dy.tolist(), strict=True)):
        s = decimal.Decimal(scale[e].item())
        for xr, dr in zip(xs, dys, strict=True):
            xr = [decimal.Decimal(v) for v in xr]
            mean = ctx.divide(sum(xr, decimal.Decimal(0)), d)
            var = ctx.divide(sum(ctx.multiply(v - mean, v - mean) for v in xr), d)
            inv = ctx.divide(1, ctx.sqrt(var + decimal.Decimal(eps)))
            for j in range(d):
                dj = decimal.Decimal(dr[j])
                w[j] = ctx.add(w[j], ctx.multiply(s, ctx.multiply(dj, (xr[j] - mean) * inv)))
                b[j] = ctx.add(b[j], ctx.multiply(s, dj))
    return {
        "bias": torch.tensor([float(v) for v in b], dtype=torch.float64),
        "weight": torch.tensor([float(v) for v in w], dtype=torch.float64),
    }


def _check(module, inputs, exact_fn, clip=C):
    """Sensitivity and exactness of the released sum with the crafted example."""
    everyone = torch.arange(B)
    scale, full = _rule_sums(module, inputs, everyone, clip=clip)
    _, without = _rule_sums(module, inputs, torch.arange(B - 1), clip=clip)
    moved = (_flat(full) - _flat(without)).norm().item()
    assert moved <= clip * (1 + 1e-5), f"one example moved the sum by {moved / clip:.6f} C"
    exact = exact_fn(*inputs, scale)
    error = (_flat(full) - _flat(exact)).norm().item()
    assert error <= 1e-5 * clip, f"released sum off the exact clipped sum by {error / clip:.3g} C"


def _crafted_linear(k: int, family: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    d_in, d_out = 5, 4
    x = torch.randn(B, T, d_in, generator=gen)
    dy = torch.randn(B, T, d_out, generator=gen)
    u = torch.randn(d_in, generator=gen) * 2.0**k
    delta = torch.randn(d_out, generator=gen)
    # genuine part: ~1 (tiny against the terms) or ~2^(k-20) (clipped, rounding on top of C)
    small = torch.randn(d_in, generator=gen) * (2.0 ** (k - 20) if family.endswith("big") else 1)
    if family.startswith("x"):  # x rows cancel, equal dy rows
        x[CRAFTED] = torch.stack([u, small, -u])
        dy[CRAFTED] = delta
    elif family.startswith("dy"):  # dy rows cancel (weight and bias), equal x rows
        v = torch.randn(d_out, generator=gen) * 2.0**k
        dy[CRAFTED] = torch.stack([v, delta * (small.norm() / delta.norm()), -v])
        x[CRAFTED] = small / small.norm() * 2
    else:  # x = [u, -u + v, 0]: -u + v rounded in float32, so the exact sum is u + fl(-u + v)
        x[CRAFTED] = torch.stack([u, -u + small * 2.0**k * 2**-18, torch.zeros(d_in)])
        dy[CRAFTED] = delta
    if family.startswith("tiny"):  # x ~ 2^(k-120): its float32 squares underflow (k < 57)
        x[CRAFTED] = torch.stack([u, small, -u]) * 2.0**-120
        dy[CRAFTED] = delta * 2.0**60
    return x, dy


FAMILIES = ["x-small", "x-big", "dy-small", "dy-big", "uv"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("k", MAGNITUDES)
def test_linear_crafted_cancellation_is_released_exactly(k, family):
    module = nn.Linear(5, 4)
    inputs = _crafted_linear(k, family, seed=k)
    _check(module, inputs, lambda x, dy, s: _exact_linear(x, dy, s, bias=True))


@pytest.mark.parametrize("family", ["x-big", "tiny-small", "tiny-big"])
@pytest.mark.parametrize("k", MAGNITUDES)
def test_linear_without_bias_crafted_cancellation(k, family):
    # tiny: x ~ 2^(k-120) with dy ~ 2^60 (a bias would get a huge bound and factor ~0): float32
    # squares of x underflow to 0 (k < 57), and the spread must still see the terms. Terms that
    # small (|x||dy| < 2) matter only against a small C: 2^-20 here.
    module = nn.Linear(5, 4, bias=False)
    inputs = _crafted_linear(k, family, seed=100 + k)
    clip = 2.0**-20 if family.startswith("tiny") else C
    _check(module, inputs, lambda x, dy, s: _exact_linear(x, dy, s, bias=False), clip)


@pytest.mark.parametrize("family", ["small", "big", "sum3", "uv"])
@pytest.mark.parametrize("k", MAGNITUDES)
def test_embedding_repeated_ids_crafted_cancellation(k, family):
    gen = torch.Generator().manual_seed(200 + k)
    V, d = 9, 4
    module = nn.Embedding(V, d)
    ids = torch.randint(0, V, (B, T), generator=gen)
    ids[0, 0] = 7  # row 7 already holds another example's term when the crafted rows arrive
    dy = torch.randn(B, T, d, generator=gen)
    v = torch.randn(d, generator=gen) * 2.0**k
    small = torch.randn(d, generator=gen) * (2.0 ** (k - 20) if family == "big" else 1)
    if family == "uv":  # one id, rows u and fl(-u + small 2^(k-18)); a third id elsewhere
        ids[CRAFTED] = torch.tensor([7, 7, 2])
        dy[CRAFTED] = torch.stack([v, -v + small * 2.0 ** (k - 18), small])
    elif family == "sum3":  # one id, rows v, w, -fl(v + w): the exact sum is v + w's rounding
        w = torch.randn(d, generator=gen) * 2.0**k
        ids[CRAFTED] = torch.tensor([7, 7, 7])
        dy[CRAFTED] = torch.stack([v, w, -(v + w)])
    else:  # id 7 at tokens 0 and 2 with cancelling rows, id 3 between them
        ids[CRAFTED] = torch.tensor([7, 3, 7])
        dy[CRAFTED] = torch.stack([v, small, -v])
    _check(module, (ids, dy), lambda i, g, s: _exact_embedding(i, g, s, V))


@pytest.mark.parametrize("family", ["tokens-small", "tokens-big", "sum3", "offset"])
@pytest.mark.parametrize("k", MAGNITUDES)
def test_layernorm_crafted_cancellation(k, family):
    gen = torch.Generator().manual_seed(300 + k)
    d = 6
    module = nn.LayerNorm(d)
    x = torch.randn(B, T, d, generator=gen)
    dy = torch.randn(B, T, d, generator=gen)
    z = torch.randn(d, generator=gen)
    g = torch.randn(d, generator=gen) * 2.0**k
    if family == "offset":  # |mean| >> sigma: float32 xhat itself is off by ~u32 2^k relative
        if k > 22:  # a float32 row around 2^k has spacing 2^(k-23): sigma >= that
            pytest.skip("a float32 row cannot be closer to constant than its spacing")
        x[CRAFTED] = 2.0**k + torch.randn(T, d, generator=gen)
        dy[CRAFTED] = torch.randn(T, d, generator=gen) * 10
    elif family == "sum3":  # equal rows x, dy rows v, w, -fl(v + w) (weight and bias)
        w = torch.randn(d, generator=gen) * 2.0**k
        x[CRAFTED] = z
        dy[CRAFTED] = torch.stack([g, w, -(g + w)])
    else:  # tokens 0 and 2: x and fl(3 x) (equal exact xhat up to 3x's rounding), dy and -dy
        small = 2.0 ** (k - 20) if family == "tokens-big" else 1.0
        x[CRAFTED] = torch.stack([z, torch.randn(d, generator=gen), 3 * z])
        dy[CRAFTED] = torch.stack([g, torch.randn(d, generator=gen) * small, -g])
    _check(module, (x, dy), lambda xx, gg, s: _exact_layernorm(xx, gg, s, module.eps))


def _raw_sums(module, inputs, scale, noise_std):
    """What each rule computed before the guard: the fused float32 ops alone."""
    if isinstance(module, nn.Linear):
        x, dy = inputs
        return {
            "bias": rmt_kernels.bias_clipped_noisy_sum(dy, scale, noise_std, 7, 0),
            "weight": rmt_kernels.linear_clipped_noisy_sum(
                x, dy, scale, noise_std, 7, OFFSET_STRIDE
            ),
        }
    if isinstance(module, nn.Embedding):
        ids, dy = inputs
        return {
            "weight": rmt_kernels.embedding_clipped_noisy_sum(
                ids, dy, scale, module.num_embeddings, noise_std, 7, OFFSET_STRIDE
            )
        }
    x, dy = inputs
    return {
        "bias": rmt_kernels.bias_clipped_noisy_sum(dy, scale, noise_std, 7, 0),
        "weight": rmt_kernels.layernorm_clipped_noisy_sum(
            x, dy, scale, module.eps, noise_std, 7, OFFSET_STRIDE
        ),
    }


def _ordinary(kind, Bn, Tn, seed):
    gen = torch.Generator().manual_seed(seed)
    if kind == "linear":
        x, dy = torch.randn(Bn, Tn, 24, generator=gen), torch.randn(Bn, Tn, 16, generator=gen)
        return nn.Linear(24, 16), (x, dy)
    if kind == "embedding":
        ids = torch.randint(0, 30, (Bn, Tn), generator=gen)
        return nn.Embedding(30, 16), (ids, torch.randn(Bn, Tn, 16, generator=gen))
    x = torch.randn(Bn, Tn, 16, generator=gen) * 3 + 1
    return nn.LayerNorm(16), (x, torch.randn(Bn, Tn, 16, generator=gen))


@pytest.mark.parametrize("noise_std", [0.0, 1.5])
@pytest.mark.parametrize(("Bn", "Tn"), [(6, 1), (8, 128), (3, 512)])
@pytest.mark.parametrize("kind", ["linear", "embedding", "layernorm"])
def test_ordinary_inputs_are_bit_identical_to_the_fused_op(kind, Bn, Tn, noise_std):
    # Ordinary examples have spread / norm ~ sqrt(T) (<= 45 here), far below R = 256: nothing is
    # set apart, so the release is the fused op's, bit for bit (fails if R were ~ sqrt(T)).
    module, inputs = _ordinary(kind, Bn, Tn, seed=Bn * Tn)
    rule = get_layer_rule(module)
    scale = rmt_kernels.clip_scales(list(rule.sq_norms(module, *inputs).values()), C)
    offsets = {"bias": 0, "weight": OFFSET_STRIDE}
    got = rule.clipped_noisy_sums(module, *inputs, scale, noise_std, 7, offsets)
    want = _raw_sums(module, inputs, scale, noise_std)
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_noise_is_unchanged_when_an_example_is_set_apart():
    module = nn.Linear(5, 4)
    inputs = _crafted_linear(40, "x-big", seed=1)
    _, quiet = _rule_sums(module, inputs, torch.arange(B))
    _, noisy = _rule_sums(module, inputs, torch.arange(B), noise_std=2.0)
    for i, name in enumerate(sorted(quiet)):
        noise = rmt_kernels.add_gaussian_noise(
            torch.zeros_like(quiet[name]).float(), 2.0, 7, i * OFFSET_STRIDE
        ).double()
        torch.testing.assert_close(noisy[name] - quiet[name], noise, atol=1e-5, rtol=0)


def test_norm_bounds_are_recomputed_when_the_inputs_changed_in_place():
    # The guard reuses the bounds sq_norms computed for the same tensors, keyed by identity and
    # version: a stale bound (here of an ordinary dy) would set the projection radius far too low.
    module = nn.Linear(5, 4)
    x, dy = _crafted_linear(30, "x-big", seed=2)
    ordinary = dy.clone()
    ordinary[CRAFTED] = torch.randn(T, 4) * 1e-6
    rule = get_layer_rule(module)
    fresh = rule.sq_norms(module, x, dy)
    scale = rmt_kernels.clip_scales(list(fresh.values()), C)
    dy_reused = ordinary.clone()
    rule.sq_norms(module, x, dy_reused)  # remembered for the small dy
    dy_reused.copy_(dy)  # then changed in place
    offsets = {"bias": 0, "weight": OFFSET_STRIDE}
    got = rule.clipped_noisy_sums(module, x, dy_reused, scale, 0.0, 0, offsets)
    want = rule.clipped_noisy_sums(module, x.clone(), dy.clone(), scale, 0.0, 0, offsets)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    exact = _exact_linear(x, dy, scale, bias=True)
    error = (_flat({n: got[n].double() for n in sorted(got)}) - _flat(exact)).norm().item()
    assert error <= 1e-5 * C


def test_scale_is_checked_by_the_rule():
    module = nn.Linear(5, 4)
    x, dy = torch.randn(3, 2, 5), torch.randn(3, 2, 4)
    rule = get_layer_rule(module)
    offsets = {"bias": 0, "weight": OFFSET_STRIDE}
    with pytest.raises(ValueError, match="scale must have one entry per example"):
        rule.clipped_noisy_sums(module, x, dy, torch.ones(2), 0.0, 0, offsets)
    with pytest.raises(ValueError, match="scale must be finite and >= 0"):
        rule.clipped_noisy_sums(module, x, dy, torch.tensor([1.0, -1.0, 1.0]), 0.0, 0, offsets)


def test_limit_is_far_above_ordinary_spreads_of_tiny_encoders():
    # tiny BERT / RoBERTa, padded batches: every tracked layer's spread / norm stays far below R
    # (max 9.5 measured at hidden 128, T 128); the guard sets nothing apart on ordinary data.
    from tests.dp_models import padded_batch, tiny_model

    for kind in ("bert", "roberta"):
        model = tiny_model(kind)
        saved: list[list] = []

        def keep_input(mod, inp, _out, saved=saved):
            saved.append([mod, inp[0].detach(), None])

        def keep_grad(mod, _gin, gout, saved=saved):
            for entry in reversed(saved):
                if entry[0] is mod and entry[2] is None:
                    entry[2] = gout[0].detach()
                    break

        for mod in model.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding, nn.LayerNorm)):
                mod.register_forward_hook(keep_input)
                mod.register_full_backward_hook(keep_grad)
        ids, mask, labels = padded_batch(batch=6, length=12)
        out = model(input_ids=ids, attention_mask=mask)
        nn.functional.cross_entropy(out.logits, labels, reduction="sum").backward()
        worst = 0.0
        for mod, x, dy in saved:
            if dy is None or x.shape[0] != ids.shape[0]:
                continue  # broadcast position ids: not a per-example layer input
            rule = get_layer_rule(mod)
            norms = rule.sq_norms(mod, x, dy)
            scale = rmt_kernels.clip_scales(list(norms.values()), C)
            guard = ReleaseGuard("test", mod, (x, dy), scale, lambda: {})
            if isinstance(mod, nn.Linear):
                terms = LinearTerms(x, dy)
            elif isinstance(mod, nn.Embedding):
                terms = EmbeddingTerms(x, without_padding(mod, x, dy))
            else:
                terms = LayerNormTerms(x, dy, mod.eps)
            ratio = terms.spread() / guard.reference
            worst = max(worst, ratio[torch.isfinite(ratio)].max().item())
            assert not guard.flagged("weight", terms).any()
        assert worst < AMPLIFICATION_LIMIT / 8, worst
