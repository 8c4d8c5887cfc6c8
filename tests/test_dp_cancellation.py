"""Privacy invariant 6 (PRIVACY.md): every per-example norm is a certified upper bound, for any
input.

Crafted cancelling inputs (x = [u, -u + 10 w] with equal output gradients, repeated ids with
cancelling dy rows, ...) made the float32 norms return 0, a negative number or NaN, so that one
example could move the clipped sum by 10 C or more, or abort the step. Here every norm route, on
the CPU kernels and on the device implementations (Triton interpreted), must return at least the
EXACT squared norm (rational arithmetic on the given float32 inputs; LayerNorm's xhat has a square
root, so there float64 with math.fsum), must stay within a stated relative tolerance of it on
ordinary inputs (the bound is not vacuous), and clip_scales must then keep every example's
clipped gradient at norm <= C, at input scales from 1 to 1e30, without NaN.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

import rmt_kernels
from rmt_kernels.triton import device

C = 1.0
# Ordinary inputs: the bound's excess over the exact value. The float64 error terms are ~1e-12
# relative; rounding the bound up to float32 adds at most 2^-23.
ORDINARY_RTOL = 1e-6
SCALES = [1.0, 3e4, 1e8, 1e15, 1e20, 1e30]
PATHS = ["cpu", "device"]


def _op(name: str, path: str):
    return getattr(rmt_kernels, name) if path == "cpu" else getattr(device, f"{name}_device")


def _fr(t: torch.Tensor) -> list:
    """Nested lists of exact Fractions of a float tensor's values."""
    return [_fr(r) for r in t] if t.dim() else Fraction(float(t))


def exact_linear_equal_dy(x: torch.Tensor, dy: torch.Tensor) -> list[Fraction]:
    """Exact ||sum_t dy x_t^T||_F^2 = |dy|^2 |sum_t x_t|^2 per example, x (B, T, d_in), dy
    (B, d_out) the output gradient of every token."""
    out = []
    for xb, dyb in zip(_fr(x), _fr(dy), strict=True):
        xsum = [sum(col) for col in zip(*xb, strict=True)]
        out.append(sum(v * v for v in dyb) * sum(v * v for v in xsum))
    return out


def linear_truth(x: torch.Tensor, dy: torch.Tensor) -> list[float]:
    """||sum_t dy_t x_t^T||_F^2 from correctly rounded entries (float32 products are exact in
    float64, math.fsum rounds each sum once): within a relative 1e-15 of the exact value."""
    g = torch.einsum("bti,btj->btij", dy.double(), x.double())  # exact products
    return [math.fsum(math.fsum(col) ** 2 for col in gb.flatten(1).T.tolist()) for gb in g]


def exact_embedding(ids: torch.Tensor, dy: torch.Tensor) -> list[Fraction]:
    """Exact sum over distinct ids v of |sum_{t: id_t = v} dy_t|^2 per example."""
    out = []
    for idb, dyb in zip(ids.tolist(), _fr(dy), strict=True):
        rows: dict[int, list[Fraction]] = {}
        for v, row in zip(idb, dyb, strict=True):
            acc = rows.setdefault(v, [Fraction(0)] * len(row))
            rows[v] = [a + r for a, r in zip(acc, row, strict=True)]
        out.append(sum(sum(c * c for c in r) for r in rows.values()))
    return out


def exact_bias(dy: torch.Tensor) -> list[Fraction]:
    return [sum(sum(col) ** 2 for col in zip(*dyb, strict=True)) for dyb in _fr(dy)]


def layernorm_truth(x: torch.Tensor, dy: torch.Tensor, eps: float) -> list[float]:
    """float64 xhat (inputs chosen so it is accurate to ~1e-15), sums by math.fsum."""
    x64 = x.double()
    xhat = (x64 - x64.mean(-1, keepdim=True)) / (
        x64.var(-1, correction=0, keepdim=True) + eps
    ).sqrt()
    out = []
    for xh, d in zip(xhat, dy.double(), strict=True):
        g = [math.fsum((d[:, i] * xh[:, i]).tolist()) for i in range(x.shape[-1])]
        out.append(math.fsum(v * v for v in g))
    return out


def _assert_bound(bound: torch.Tensor, truth: list, what: str) -> None:
    assert bound.dtype == torch.float32 and not torch.isnan(bound).any(), (what, bound)
    for b, t in zip(bound.tolist(), truth, strict=True):
        assert b >= 0 and (math.isinf(b) or Fraction(b) >= Fraction(t)), (what, b, float(t))


def _assert_tight(bound: torch.Tensor, truth: list, margin: float = 0.0) -> None:
    """truth (1 - margin) <= bound <= truth (1 + ORDINARY_RTOL); margin > 0 only where the
    truth is a float64 value rather than exact."""
    for b, t in zip(bound.tolist(), truth, strict=True):
        lo = Fraction(t) * (1 - Fraction(margin))
        assert Fraction(b) >= lo and b <= float(t) * (1 + ORDINARY_RTOL), (b, float(t))


def _assert_clipped(bound: torch.Tensor, truth: list) -> None:
    """The end-to-end statement: scale_b * true norm_b <= C (1 + 1e-6), computed in float64."""
    scale = rmt_kernels.clip_scales(bound, C)
    assert torch.isfinite(scale).all() and (scale >= 0).all() and (scale <= 1).all()
    for s, t in zip(scale.double().tolist(), truth, strict=True):
        assert s * math.sqrt(float(t)) <= C * (1 + 1e-6), (s, float(t))


def _cancelling_pair(n: int, d: int, mag: float, gen: torch.Generator) -> torch.Tensor:
    """(n, 2, d): rows u and -u + 10 w, |u| = mag, |w| = 1."""
    u = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w = torch.randn(n, d, generator=gen, dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True) * mag
    w = w / w.norm(dim=1, keepdim=True)
    return torch.stack([u, -u + 10 * w], 1).float()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("route", ["gram", "per_example"])
def test_linear_norms_bound_crafted_and_ordinary(path, route):
    gen = torch.Generator().manual_seed(11)
    norms = _op("linear_sq_norms", path)
    # Gram: T (d_in + d_out) <= d_in d_out (T = 34: two of Triton's 32-row tiles); per example:
    # a thin layer with a longer sequence.
    d_in, d_out, pairs = (68, 68, 17) if route == "gram" else (4, 3, 8)
    assert device.use_gram_route(2 * pairs, d_in, d_out) == (route == "gram")
    for mag in SCALES:
        # Tokens t and t + pairs cancel (across tiles); every token of an example has the same
        # output gradient, so the exact norm is |dy|^2 |sum_t x_t|^2.
        x = _cancelling_pair(3 * pairs, d_in, mag, gen).view(3, pairs, 2, d_in)
        x = x.transpose(1, 2).reshape(3, 2 * pairs, d_in)
        dy_row = torch.randn(3, d_out, generator=gen)
        dy = dy_row[:, None].expand(3, 2 * pairs, d_out).contiguous()
        truth = exact_linear_equal_dy(x, dy_row)
        bound = norms(x, dy)
        _assert_bound(bound, truth, f"linear {route} {path} |u| = {mag:g}")
        _assert_clipped(bound, truth)
    x = torch.randn(4, 2 * pairs, d_in, generator=gen)
    dy = torch.randn(4, 2 * pairs, d_out, generator=gen)
    _assert_tight(norms(x, dy), linear_truth(x, dy), margin=1e-12)
    _assert_tight(norms(x[:, 0], dy[:, 0]), linear_truth(x[:, :1], dy[:, :1]), margin=1e-12)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("T", [40, 300], ids=["gram", "segment"])
def test_embedding_norms_bound_crafted_and_ordinary(path, T):
    gen = torch.Generator().manual_seed(12)
    norms = _op("embedding_sq_norms", path)
    d = 8
    assert (T <= device.EMBEDDING_GRAM_MAX_T) == (T == 40)
    for mag in SCALES:
        # One repeated id whose dy rows cancel in pairs; the rest ordinary.
        dy = torch.randn(2, T, d, generator=gen)
        dy[:, :20] = _cancelling_pair(2 * 10, d, mag, gen).view(2, 20, d)
        ids = torch.randint(0, 50, (2, T), generator=gen)
        ids[:, :20] = 7
        ids[:, 20:] = ids[:, 20:].clamp(min=8)
        truth = exact_embedding(ids, dy)
        bound = norms(ids, dy)
        _assert_bound(bound, truth, f"embedding T={T} {path} |u| = {mag:g}")
        _assert_clipped(bound, truth)
    ids, dy = torch.randint(0, 5, (3, T), generator=gen), torch.randn(3, T, d, generator=gen)
    _assert_tight(norms(ids, dy), exact_embedding(ids, dy))


@pytest.mark.parametrize("path", PATHS)
def test_bias_norms_bound_crafted_and_ordinary(path):
    gen = torch.Generator().manual_seed(13)
    norms = _op("bias_sq_norms", path)
    for mag in SCALES:
        # Rows a, b, -a: float32 sums (a + b) - a lose b entirely when |a| >> |b|.
        a = _cancelling_pair(3, 16, mag, gen)[:, 0]
        b = torch.randn(3, 16, generator=gen)
        dy = torch.stack([a, b, -a, b], 1)
        truth = exact_bias(dy)
        bound = norms(dy)
        _assert_bound(bound, truth, f"bias {path} |a| = {mag:g}")
        _assert_clipped(bound, truth)
    dy = torch.randn(4, 9, 16, generator=gen)
    _assert_tight(norms(dy), exact_bias(dy))


@pytest.mark.parametrize("path", PATHS)
def test_layernorm_norms_bound_crafted_and_ordinary(path):
    gen = torch.Generator().manual_seed(14)
    norms = _op("layernorm_sq_norms", path)
    d, eps = 16, 1e-5
    for mag in SCALES:
        # Equal LayerNorm inputs (equal xhat) with output gradients a, b, -a, b.
        x = torch.randn(3, 1, d, generator=gen).expand(3, 4, d).contiguous()
        a = _cancelling_pair(3, d, mag, gen)[:, 0]
        b = torch.randn(3, d, generator=gen)
        dy = torch.stack([a, b, -a, b], 1)
        truth = layernorm_truth(x, dy, eps)
        bound = norms(x, dy, eps)
        _assert_bound(bound, truth, f"layernorm {path} |a| = {mag:g}")
        _assert_clipped(bound, truth)
    x, dy = torch.randn(4, 9, d, generator=gen), torch.randn(4, 9, d, generator=gen)
    bound, truth = norms(x, dy, eps), layernorm_truth(x, dy, eps)
    _assert_tight(bound, truth, margin=1e-12)


@pytest.mark.parametrize("path", PATHS)
def test_layernorm_bound_holds_for_a_nearly_constant_row_with_a_large_offset(path):
    # x = 1e6 + tiny spread: float32 LayerNorm statistics lose the spread; the bound must still
    # hold for the exact xhat (float64 truth is exact enough here: spread / offset = 1e-6).
    gen = torch.Generator().manual_seed(15)
    x = (1e6 + torch.randn(2, 3, 16, generator=gen, dtype=torch.float64) * 1.0).float()
    dy = torch.randn(2, 3, 16, generator=gen)
    bound = _op("layernorm_sq_norms", path)(x, dy, 0.0)
    truth = layernorm_truth(x, dy, 0.0)
    _assert_bound(bound, [t * (1 + 1e-9) for t in truth], f"layernorm offset {path}")


@pytest.mark.parametrize("path", PATHS)
def test_non_finite_inputs_give_infinite_bound_scale_zero_and_no_contribution(path):
    gen = torch.Generator().manual_seed(16)
    x, dy = torch.randn(3, 5, 8, generator=gen), torch.randn(3, 5, 6, generator=gen)
    x[1, 2, 3] = math.inf
    dy[2, 0, 0] = math.nan
    ids = torch.randint(0, 9, (3, 5), generator=gen)
    norms = {
        "linear": _op("linear_sq_norms", path)(x, dy),
        "bias": _op("bias_sq_norms", path)(dy),
        "embedding": _op("embedding_sq_norms", path)(ids, dy),
        "layernorm": _op("layernorm_sq_norms", path)(x, x.neg(), 1e-5),
    }
    for name, n in norms.items():
        assert not torch.isnan(n).any(), name
        assert torch.isfinite(n[0]), name
        bad = [1, 2] if name in ("linear", "layernorm") else [2]
        bad = [1] if name == "layernorm" else bad
        assert torch.isinf(n[bad]).all(), (name, n)
    scale = rmt_kernels.clip_scales(norms["linear"] + norms["bias"], C)
    assert scale[0] > 0 and (scale[1:] == 0).all()
    # The examples with factor 0 contribute exactly nothing: the sums equal those of example 0.
    suffix = "" if path == "cpu" else "_device"
    ops = {
        k: getattr(rmt_kernels if path == "cpu" else device, k + suffix)
        for k in (
            "linear_clipped_noisy_sum",
            "bias_clipped_noisy_sum",
            "embedding_clipped_noisy_sum",
            "layernorm_clipped_noisy_sum",
        )
    }
    pairs = [
        (ops["linear_clipped_noisy_sum"], (x, dy), ()),
        (ops["bias_clipped_noisy_sum"], (dy,), ()),
        (ops["embedding_clipped_noisy_sum"], (ids, dy), (9,)),
        (ops["layernorm_clipped_noisy_sum"], (x, x.neg()), (1e-5,)),
    ]
    for fn, tensors, extra in pairs:
        full = fn(*tensors, scale, *extra, 0.5, 3, 0)
        alone = fn(*(t[:1] for t in tensors), scale[:1], *extra, 0.5, 3, 0)
        assert torch.isfinite(full).all(), fn
        torch.testing.assert_close(full, alone, rtol=0, atol=1e-6)


def test_clip_scales_round_down_and_never_nan():
    q = torch.tensor(
        [0.0, 1e-45, 0.25, 1.0, 1.0000001, 4.0, 3.0, 1e12, 3.4e38, math.inf, math.nan, -1.0]
    )
    for c in (1.0, 0.1, 3.0, 1e-3):
        scale = rmt_kernels.clip_scales(q, c)
        assert scale.dtype == torch.float32 and not torch.isnan(scale).any()
        assert ((scale >= 0) & (scale <= 1)).all()
        for s, v in zip(scale.tolist(), q.tolist(), strict=True):
            if math.isfinite(v) and v >= 0:  # exact: s^2 v <= c^2
                assert Fraction(s) ** 2 * Fraction(v) <= Fraction(c) ** 2, (c, s, v)
                assert v > 0 or s == 1.0
            else:
                assert s == 0.0, (c, v, s)
        # Not vacuous: within a few ulps of min(1, c / sqrt(q)).
        ok = torch.isfinite(q) & (q > 0)
        ref = (c / q[ok].double().sqrt()).clamp(max=1)
        assert torch.all(scale[ok].double() >= ref * (1 - 3e-7))
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="max_grad_norm"):
            rmt_kernels.clip_scales(q, bad)
    # Per-parameter bounds summed in float64 inside (a float32 total may round down).
    parts = [torch.full((3,), 1.0), torch.full((3,), 2.0**-24), torch.tensor([0.0, math.nan, 1.0])]
    scale = rmt_kernels.clip_scales(parts, 1.0)
    assert scale[1] == 0
    for s in scale[[0, 2]].tolist():
        assert s * s * (1 + 2**-24) < 1  # float32 1 + 2^-24 would round to 1
    with pytest.raises(TypeError, match="sq_norms"):
        rmt_kernels.clip_scales([], 1.0)


def _meta_calls():
    x, dy, s = torch.randn(2, 3, 4), torch.randn(2, 3, 5), torch.ones(2)
    ids = torch.zeros(2, 3, dtype=torch.long)

    def m(t):
        return t.to("meta")

    ops = torch.ops.rmt
    return [
        ("linear_sq_norms", lambda: ops.linear_sq_norms(x, m(dy))),
        ("linear_clipped_noisy_sum", lambda: ops.linear_clipped_noisy_sum(x, dy, m(s), 0.0, 0, 0)),
        ("bias_clipped_noisy_sum", lambda: ops.bias_clipped_noisy_sum(dy, m(s), 0.0, 0, 0)),
        ("embedding_sq_norms", lambda: ops.embedding_sq_norms(m(ids), dy)),
        (
            "embedding_clipped_noisy_sum",
            lambda: ops.embedding_clipped_noisy_sum(ids, m(dy), s, 4, 0.0, 0, 0),
        ),
        ("layernorm_sq_norms", lambda: ops.layernorm_sq_norms(m(x), x, 1e-5)),
        (
            "layernorm_clipped_noisy_sum",
            lambda: ops.layernorm_clipped_noisy_sum(x, x, m(s), 1e-5, 0.0, 0, 0),
        ),
    ]


@pytest.mark.parametrize("name,call", _meta_calls(), ids=[n for n, _ in _meta_calls()])
def test_meta_tensor_beside_cpu_tensors_is_refused(name, call):
    # Dispatch sends such a call to the fake implementation, which returned an uninitialised
    # CPU tensor (garbage) for a CPU first argument.
    with pytest.raises(ValueError, match=f"{name}: all tensor arguments must be on one device"):
        call()
    # All on meta still traces.
    x, dy = torch.randn(2, 3, 4, device="meta"), torch.randn(2, 3, 5, device="meta")
    assert torch.ops.rmt.linear_sq_norms(x, dy).device.type == "meta"


def _bias_truth(dy: torch.Tensor) -> list[float]:
    """|sum_t dy_t|^2 per example from correctly rounded column sums (math.fsum): within a
    relative 1e-15 of the exact value."""
    return [math.fsum(math.fsum(col) ** 2 for col in b.double().T.tolist()) for b in dy]


def _layouts(x: torch.Tensor, dy: torch.Tensor):
    """The same values in the layouts the CPU kernels must read: contiguous, strided
    (transposed storage), expanded (stride 0 over T) and half-precision inputs (their float32
    values are the exact inputs)."""
    yield "contiguous", x, dy
    yield "strided", x.transpose(1, 2).contiguous().transpose(1, 2), dy.mT.contiguous().mT
    yield "expanded", x[:, :1].expand_as(x), dy[:, :1].expand_as(dy)
    yield "bf16", x.bfloat16(), dy.bfloat16()
    yield "fp16", x.half(), dy.half()


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_norms_per_example_workers_every_layout_and_split(threads):
    # The CPU kernels work one example at a time on worker threads (one loop with multi-threaded
    # BLAS when B < threads), reading float32 rows in place or converting into reused float64
    # buffers: Linear in Gram strips of 32 rows with a partial last strip, the bias in row chunks
    # of 256 KiB (d = 3000: several chunks), the embedding by sorted ids.
    # Every layout and split gives the certified, tight bound, also for a cancelling example.
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(17)
        # (B, T, d_in, d_out): Gram over 2 strips, B below / above the thread count; per-example
        # route; rank one.
        for B, T, d_in, d_out in [(1, 40, 80, 80), (5, 40, 80, 80), (3, 20, 4, 3), (4, 1, 9, 5)]:
            assert device.use_gram_route(T, d_in, d_out) == (d_in != 4)
            x = torch.randn(B, T, d_in, generator=gen)
            dy = torch.randn(B, T, d_out, generator=gen)
            if T > 1:  # example 0 cancels: rows u and -u + 10 w, equal dy rows
                x[0, :2] = _cancelling_pair(1, d_in, 3e4, gen)[0]  # fits float16
                dy[0, 1] = dy[0, 0]
            for name, xv, dyv in _layouts(x, dy):
                xf, dyf = xv.float(), dyv.float()
                bound = rmt_kernels.linear_sq_norms(xv, dyv)
                truth = linear_truth(xf, dyf)
                _assert_bound(bound, [t * (1 - 1e-12) for t in truth], f"linear {name}")
                _assert_tight(bound[1:], truth[1:], margin=1e-12)
                # Each example alone (the serial path) gives a certified bound too.
                for b in range(B):
                    alone = rmt_kernels.linear_sq_norms(xv[b : b + 1], dyv[b : b + 1])
                    _assert_bound(alone, [truth[b] * (1 - 1e-12)], f"linear {name} alone")
                bias = rmt_kernels.bias_sq_norms(dyv)
                _assert_tight(bias, _bias_truth(dyf), margin=1e-12)
                # Embedding (segment sums per example): repeated ids, int32 ids, 1-D ids.
                ids = torch.randint(0, 6, (B, T), generator=gen)
                emb = rmt_kernels.embedding_sq_norms(ids.int(), dyv)
                _assert_tight(emb, exact_embedding(ids, dyf))
                emb1 = rmt_kernels.embedding_sq_norms(ids[:, 0], dyv[:, 0])
                _assert_tight(emb1, exact_embedding(ids[:, :1], dyf[:, :1]))
        dy = torch.randn(3, 25, 3000, generator=gen)  # 10 rows per 256 KiB chunk: 10, 10, 5
        dy[0, 1] = -dy[0, 0]
        for _name, _, dyv in _layouts(dy[..., :1], dy):
            _assert_tight(rmt_kernels.bias_sq_norms(dyv), _bias_truth(dyv.float()), margin=1e-12)
    finally:
        torch.set_num_threads(before)
