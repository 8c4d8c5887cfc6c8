"""Device implementations of the fused DP ops, registered for CUDA in triton/register.py.

The clipped Linear sum (GEMM + noise epilogue), the noise and the Gram-route norms are Triton
kernels (linear.py, dp_noise.py, sq_norms.py beside this file); the per-example norm route
(blocked bmm), the embedding's sort-and-segment route and the small bias / LayerNorm reductions are
torch ops. Written for any device, so the CPU tests run them too (Triton under
TRITON_INTERPRET=1); Triton is imported only when a kernel runs. The route thresholds are the
CPU's; they are not tuned on a GPU yet.

Every ``*_sq_norms_device`` returns the certified upper bound its op documents in
rmt_kernels/ops.py (privacy invariant 6, PRIVACY.md), the same formula as its C++ kernel; the
functions named in docstrings below are those of rmt_kernels.ops.
"""

from __future__ import annotations

import math

import torch

from rmt_kernels import _C
from rmt_kernels._checks import (
    check_add_gaussian_noise,
    check_bias,
    check_bias_sum,
    check_embedding_norms,
    check_embedding_sum,
    check_layernorm_norms,
    check_layernorm_sum,
    check_linear,
    check_linear_sum,
    check_scale_values,
)

# Bytes of intermediates (Gram matrices or per-example gradients) one block of examples may hold
# in the device norm computation (the CPU kernels work one example per worker thread).
BLOCK_BYTES = 32 << 20
# Longest sequence for which the device embedding norms take the Gram route (T^2 d) rather than
# sort-and-segment; the crossover of that formulation measured on a 2-core CPU at d = 768. The CPU
# kernel segments at every T (csrc/cpu/embedding.cpp has the numbers).
EMBEDDING_GRAM_MAX_T = 256
# Unit roundoff of float64, the arithmetic of every certified norm bound (privacy invariant 6,
# PRIVACY.md).
U64 = 2.0**-53


def use_gram_route(T: int, d_in: int, d_out: int) -> bool:
    """Whether the Linear norms take the Gram ("ghost") route: the rule of csrc/constants.h.

    Per example the Gram route costs T^2 (d_in + d_out) multiply-adds, the per-example route
    T d_in d_out; take the cheaper one.
    """
    return _C.use_gram_route(T, d_in, d_out)


def linear_sq_norm_bound(
    part: torch.Tensor | None, S: torch.Tensor, T: int, d_in: int, d_out: int, route: str
) -> torch.Tensor:
    """Certified float32 upper bound of ``N_b = ||sum_t dy_t x_t^T||_F^2`` from float64 parts.

    The formula of :func:`linear_sq_norms` (csrc/cpu/linear.cpp computes the same). Arguments,
    all computed in float64 from the exactly converted inputs (u = 2^-53):

    * ``S`` (B,): ``fl(sum_t |x_t| |dy_t|)``; ``sqrt(N_b) <= S_true`` by the triangle inequality
      and ``S_true <= S (1 + 1.01 (d_in/2 + d_out/2 + T + 3) u)``.
    * ``route = "gram"``: ``part = P^ = fl(sum_{t,s} G^x_ts G^dy_ts)``. Each Gram entry is off by
      ``|e_ts| <= gamma_{d_in} |x_t||x_s|`` (Cauchy-Schwarz on the standard bound
      ``|fl(sum a_i) - sum a_i| <= gamma_n sum |a_i|``, ``gamma_n = n u / (1 - n u)``, any order,
      FMA or not), likewise ``|f_ts| <= gamma_{d_out} |dy_t||dy_s|``; since
      ``G^x G^dy - Gx Gdy = e G^dy + f G^x - e f`` and the (strip- or tile-wise, coefficients
      1 or 2) sum of the T^2 products adds at most ``3 gamma_{T^2+T+2} sum |products|``, with
      ``sum_{t,s} |x_t||x_s||dy_t||dy_s| = S^2``:
      ``|P^ - N_b| <= 1.05 (d_in + d_out + 3T^2 + 3T + 8) u S_true^2``.
      Bound: ``P^ + 2 K u S^2``, ``K = d_in + d_out + 3T^2 + 3T + 8`` (the factor 2 also covers
      ``S`` vs ``S_true`` and the roundings of this formula).
    * ``route = "per_example"``: ``part = Q = fl(sum_ij G^_ij^2)`` with ``G^ = fl(dy^T x)``,
      entrywise off by ``gamma_T (|dy|^T |x|)_ij``, a matrix of Frobenius norm <= ``S``, so
      ``sqrt(N_b) <= |G^|_F + gamma_T S`` and ``N_b <= |G^|_F^2 + 2.1 gamma_T S^2``.
      Bound: ``Q (1 + 2 (d_in d_out + 2) u) + 4 (T + 1) u S^2``.
    * ``route = "rank_one"`` (T = 1, ``part`` unused): ``N_b = S_true^2``.
    * Always: trivial ``S^2 (1 + 3 (d_in + d_out + T + 8) u)``; the smaller of the two is taken.

    For finite float32 inputs every product of <= 4 input values lies in float64's normal range,
    so no underflow or overflow term arises; a non-finite input makes ``S`` non-finite and the
    bound ``+inf``. The float64 bound is rounded up to float32 (``+inf`` past its range).
    Ordinary inputs: the added term is ~1e-12 S^2, i.e. well below 1e-9 relative.
    """
    S2 = S * S
    trivial = S2 * (1.0 + 3.0 * (d_in + d_out + T + 8) * U64)
    if route == "rank_one":
        bound = trivial
    elif route == "gram":
        bound = part + S2 * (2.0 * (d_in + d_out + 3 * T * T + 3 * T + 8) * U64)
    elif route == "per_example":
        bound = part * (1.0 + 2.0 * (d_in * d_out + 2) * U64) + S2 * (4.0 * (T + 1) * U64)
    else:
        raise ValueError(f"linear_sq_norm_bound: unknown route {route!r}")
    return _certified(bound, trivial, torch.isfinite(S))


def _row_norms64(a: torch.Tensor) -> torch.Tensor:
    """float64 Euclidean norms over the last dim, each element converted to float64 first."""
    return torch.linalg.vector_norm(a, dim=-1, dtype=torch.float64)


def _bound_to_float(bound: torch.Tensor) -> torch.Tensor:
    """float64 bound -> float32 rounded UP (+inf past float32's range); NaN -> +inf."""
    b = torch.where(torch.isnan(bound), math.inf, bound)
    f = b.float()
    return torch.where(f.double() < b, torch.nextafter(f, torch.full_like(f, math.inf)), f)


def _certified(route: torch.Tensor, trivial: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """min(route, trivial) where the inputs are finite (fmin: a NaN route leaves the trivial
    bound, which holds alone), +inf elsewhere; as float32 rounded up."""
    return _bound_to_float(torch.where(finite, torch.fmin(route, trivial), math.inf))


def _drop_zero_scaled(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Zero the rows (dim 0) of examples whose clip factor is exactly 0, so that they contribute
    exactly nothing even with non-finite inputs (0 * inf = NaN would poison the whole sum)."""
    keep = scale != 0
    if bool(keep.all()):
        return t
    return torch.where(keep.view(-1, *([1] * (t.dim() - 1))), t, 0)


def _seq(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 3 else t.unsqueeze(1)


def _noise_(out: torch.Tensor, noise_std: float, seed: int, offset: int) -> torch.Tensor:
    # Imported here so that importing rmt_kernels never needs Triton.
    from rmt_kernels.triton.dp_noise import add_noise_

    return add_noise_(out, noise_std, seed, offset)


def linear_sq_norms_device(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Device implementation of :func:`linear_sq_norms` (checks included): float64 Gram tiles
    in the Triton kernel or blocked float64 bmm, then :func:`linear_sq_norm_bound`."""
    check_linear("linear_sq_norms", x, dy)
    x3, dy3 = _seq(x), _seq(dy)
    B, T, d_in = x3.shape
    d_out = dy3.shape[2]
    if T > 1 and use_gram_route(T, d_in, d_out):
        from rmt_kernels.triton.sq_norms import gram_sq_norms

        S = (_row_norms64(x3) * _row_norms64(dy3)).sum(1)
        # Gram tiles live in registers only
        return linear_sq_norm_bound(gram_sq_norms(x3, dy3), S, T, d_in, d_out, "gram")
    per_example = 8 * (T * (d_in + d_out) + (d_in * d_out if T > 1 else 0))
    block = max(1, min(B, BLOCK_BYTES // per_example))
    out = torch.empty(B, device=x.device, dtype=torch.float32)
    for b0 in range(0, B, block):
        xb, dyb = x3[b0 : b0 + block].double(), dy3[b0 : b0 + block].double()
        S = (_row_norms64(xb) * _row_norms64(dyb)).sum(1)
        if T == 1:
            out[b0 : b0 + block] = linear_sq_norm_bound(None, S, T, d_in, d_out, "rank_one")
        else:
            Q = torch.bmm(dyb.mT, xb).square().sum((1, 2))
            out[b0 : b0 + block] = linear_sq_norm_bound(Q, S, T, d_in, d_out, "per_example")
    return out


def linear_clipped_noisy_sum_device(
    x: torch.Tensor,
    dy: torch.Tensor,
    scale: torch.Tensor,
    noise_std: float,
    seed: int,
    offset: int,
) -> torch.Tensor:
    """Device implementation of :func:`linear_clipped_noisy_sum`: the fused Triton GEMM."""
    from rmt_kernels.triton.linear import linear_clipped_noisy_sum_triton

    check_linear_sum(x, dy, scale, noise_std, seed, offset)
    check_scale_values("linear_clipped_noisy_sum", scale)
    x3, dy3 = _drop_zero_scaled(_seq(x), scale), _drop_zero_scaled(_seq(dy), scale)
    return linear_clipped_noisy_sum_triton(x3, dy3, scale, noise_std, seed, offset)


def bias_sq_norms_device(dy: torch.Tensor) -> torch.Tensor:
    """Device implementation of :func:`bias_sq_norms` (the bound stated there)."""
    check_bias("bias_sq_norms", dy)
    dy3 = _seq(dy)
    _, T, d = dy3.shape
    S = _row_norms64(dy3).sum(1)
    Q = dy3.sum(1, dtype=torch.float64).square().sum(1)
    route = Q * (1.0 + 2.0 * (d + 2) * U64) + S * S * (4.0 * (T + 1) * U64)
    trivial = S * S * (1.0 + 3.0 * (d + T + 8) * U64)
    return _certified(route, trivial, torch.isfinite(S))


def bias_clipped_noisy_sum_device(
    dy: torch.Tensor, scale: torch.Tensor, noise_std: float, seed: int, offset: int
) -> torch.Tensor:
    """Device implementation of :func:`bias_clipped_noisy_sum`."""
    check_bias_sum(dy, scale, noise_std, seed, offset)
    check_scale_values("bias_clipped_noisy_sum", scale)
    per_example = _drop_zero_scaled(_seq(dy).float().sum(1), scale)
    out = (per_example.mT @ scale.float()).contiguous()
    return _noise_(out, noise_std, seed, offset)


def _embedding_bound(part: torch.Tensor, S: torch.Tensor, T: int, d: int, gram: bool):
    # The formula of embedding_sq_norms's docstring (csrc/cpu/embedding.cpp computes the same).
    S2 = S * S
    if gram:
        route = part + S2 * (2.0 * (d + 3 * T * T + 3 * T + 8) * U64)
    else:
        route = part * (1.0 + 2.0 * (d + T + 2) * U64) + S2 * (4.0 * (T + 1) * U64)
    trivial = S2 * (1.0 + 3.0 * (d + T + 8) * U64)
    return _certified(route, trivial, torch.isfinite(S))


def embedding_sq_norms_device(ids: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Device implementation of :func:`embedding_sq_norms` (the bound stated there)."""
    check_embedding_norms(ids, dy)
    ids2 = ids if ids.dim() == 2 else ids.unsqueeze(1)
    dy3 = _seq(dy)
    B, T, d = dy3.shape
    S = _row_norms64(dy3).sum(1)
    if T == 1:  # the Gram sum is |dy|^2 = S^2
        return _embedding_bound(S * S, S, T, d, gram=True)
    if T <= EMBEDDING_GRAM_MAX_T:
        from rmt_kernels.triton.sq_norms import gram_sq_norms

        return _embedding_bound(gram_sq_norms(ids2, dy3, ids=True), S, T, d, gram=True)
    sorted_ids, perm = ids2.sort(1)
    rows = dy3.gather(1, perm[:, :, None].expand(B, T, d)).reshape(B * T, d).double()
    starts = torch.ones(B, T, dtype=torch.bool, device=dy.device)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    flat = starts.reshape(-1)
    segment = flat.cumsum(0) - 1
    sums = rows.new_zeros(int(flat.sum()), d).index_add_(0, segment, rows)
    example = torch.arange(B, device=dy.device).repeat_interleave(T)[flat]
    Q = rows.new_zeros(B).index_add_(0, example, sums.square().sum(1))
    return _embedding_bound(Q, S, T, d, gram=False)


def embedding_clipped_noisy_sum_device(
    ids: torch.Tensor,
    dy: torch.Tensor,
    scale: torch.Tensor,
    num_embeddings: int,
    noise_std: float,
    seed: int,
    offset: int,
) -> torch.Tensor:
    """Device implementation of :func:`embedding_clipped_noisy_sum`."""
    op = "embedding_clipped_noisy_sum"
    check_embedding_sum(ids, dy, scale, num_embeddings, noise_std, seed, offset)
    if not bool(((ids >= 0) & (ids < num_embeddings)).all()):
        raise ValueError(f"{op}: ids must lie in [0, num_embeddings = {num_embeddings})")
    check_scale_values(op, scale)
    B, d = dy.shape[0], dy.shape[-1]
    rows = (_drop_zero_scaled(_seq(dy), scale).float() * scale.float().view(B, 1, 1)).reshape(-1, d)
    out = torch.zeros(num_embeddings, d, device=dy.device, dtype=torch.float32)
    out.index_add_(0, ids.reshape(-1), rows)
    return _noise_(out, noise_std, seed, offset)


def _layernorm_per_example(x: torch.Tensor, dy: torch.Tensor, eps: float) -> torch.Tensor:
    x3 = _seq(x).float()
    var, mean = torch.var_mean(x3, dim=2, correction=0, keepdim=True)
    return (_seq(dy).float() * ((x3 - mean) * (var + eps).rsqrt())).sum(1)


def layernorm_sq_norms_device(x: torch.Tensor, dy: torch.Tensor, eps: float) -> torch.Tensor:
    """Device implementation of :func:`layernorm_sq_norms` (the bound stated there; the same
    formula as csrc/cpu/layernorm.cpp)."""
    check_layernorm_norms(x, dy, eps)
    x64, dy64 = _seq(x).double(), _seq(dy).double()
    T, d = x64.shape[1], x64.shape[2]
    sqd = math.sqrt(d)
    c = x64 - x64.mean(2, keepdim=True)
    D = (c.square().mean(2, keepdim=True) + eps).sqrt()
    Q = (dy64 * (c / D)).sum(1).square().sum(1)
    Dt = D.squeeze(2)
    eta = x64.abs().amax(2) * (1.1 * (d + 3) * U64)
    L = Dt * Dt * (1.0 - 1.1 * (d + 8) * U64) - eta * eta
    rho = torch.where(L > 0, eta * eta / L, math.inf)
    eps_t = torch.fmin(
        (rho * 0.5 + eta / Dt + 1.2 * (d + 12) * U64) * (sqd * (1.0 + 8.0 * U64)),
        torch.full_like(rho, 2.1 * sqd),
    )
    M_t = dy64.abs().amax(2)
    err = (M_t * (eps_t + 1.2 * (T + 1) * U64 * sqd)).sum(1)
    route = ((Q * (1.0 + 2.0 * (d + 2) * U64)).sqrt() + err * (1.0 + 8.0 * U64)).square()
    route = route * (1.0 + 8.0 * U64)
    M = M_t.sum(1)
    trivial = M * M * (d * (1.0 + 3.0 * (T + 2) * U64))
    finite = torch.isfinite(M) & torch.isfinite(x64.sum((1, 2)))
    return _certified(route, trivial, finite)


def layernorm_clipped_noisy_sum_device(
    x: torch.Tensor,
    dy: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    noise_std: float,
    seed: int,
    offset: int,
) -> torch.Tensor:
    """Device implementation of :func:`layernorm_clipped_noisy_sum`."""
    check_layernorm_sum(x, dy, scale, eps, noise_std, seed, offset)
    check_scale_values("layernorm_clipped_noisy_sum", scale)
    per_example = _drop_zero_scaled(_layernorm_per_example(x, dy, eps), scale)
    out = (per_example.mT @ scale.float()).contiguous()
    return _noise_(out, noise_std, seed, offset)


def add_gaussian_noise_device(
    x: torch.Tensor, noise_std: float, seed: int, offset: int
) -> torch.Tensor:
    """Device implementation of :func:`add_gaussian_noise`."""
    check_add_gaussian_noise(x, noise_std, seed, offset)
    out = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    return _noise_(out, noise_std, seed, offset)
