"""Fused DP-SGD gradient ops (book-keeping clipping, Bu et al.): per-example squared gradient
norms without per-example gradients, and the clipped sum with Gaussian noise in one pass.

Layers, plainly stacked: C++ schema (csrc/rmt.cpp) -> CPU kernel (csrc/cpu/{linear,embedding,
layernorm}.cpp) or CUDA kernel (Triton launchers in rmt_kernels/triton/, registered below) -> the
documented functions here. Fake (meta) implementations sit beside them for tracing.

Noise. Every op that adds noise takes ``(noise_std, seed, offset)``: element k of its output in
row-major order (element (i, j) of a (d_out, d_in) weight gradient: k = i * d_in + j) receives
``noise_std * randn(seed, offset + k)``, element ``offset + k`` of the stream of key ``seed``:
Philox4x32-10 keyed by the 64-bit ``seed`` on the quad ``(offset + k) >> 2`` of the 64-bit element
index, whose four words give two Box-Muller pairs (lanes 0-1 and 2-3), with untruncated tails
(csrc/cpu/philox.h defines the stream; rmt_kernels/triton/gaussian.py draws it on the GPU).
Philox words and uniforms are bit-identical on both; the normals agree to a few float32 ulps
(log/sin/cos of different math libraries). Two calls share no noise when their element ranges
``[offset, offset + numel)`` are disjoint or their seeds differ. :func:`noise_offset` gives (step,
parameter) a 2^32-wide range of its own; keep ``seed`` fixed (and secret in secure mode) for a run
and never reuse an offset with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from rmt_kernels import rounding
from rmt_kernels._dp_checks import (
    check_activations,
    check_float,
    check_ids,
    check_layernorm,
    check_noise,
    check_same_device,
    check_scale_metadata,
    check_scale_values,
)

__all__ = [
    "LayerRule",
    "add_gaussian_noise",
    "bias_clipped_noisy_sum",
    "bias_sq_norms",
    "clip_scales",
    "embedding_clipped_noisy_sum",
    "embedding_sq_norms",
    "get_layer_rule",
    "layernorm_clipped_noisy_sum",
    "layernorm_sq_norms",
    "linear_clipped_noisy_sum",
    "linear_sq_norms",
    "noise_offset",
    "register_layer_rule",
]

# Bytes of intermediates (Gram matrices or per-example gradients) one block of examples may hold
# in the device norm computation (the CPU kernels work one example per worker thread).
BLOCK_BYTES = 32 << 20
# Longest sequence for which the embedding norms take the Gram route; crossover measured on a
# 2-core CPU at d = 768 (csrc/cpu/embedding.cpp has the numbers).
EMBEDDING_GRAM_MAX_T = 256
# Width of the counter range of one (step, parameter): every parameter has < 2^32 elements.
OFFSET_STRIDE = 1 << 32
# Version of the noise stream's definition (module docstring). 1 was tl.randn's layout (one
# normal per Philox call); 2 is the quad layout. A run resumed from a checkpoint replays its lost
# steps for free only if it draws the same noise, so checkpoints record this and refuse another.
NOISE_STREAM_VERSION = 2
# Unit roundoff of float64, the arithmetic of every certified norm bound (invariant 6).
U64 = 2.0**-53


def use_gram_route(T: int, d_in: int, d_out: int) -> bool:
    """Whether the Linear norms take the Gram ("ghost") route.

    Per example the Gram route costs T^2 (d_in + d_out) multiply-adds, the per-example route
    T d_in d_out; take the cheaper one. Same rule as csrc/cpu/linear.cpp.
    """
    return T * (d_in + d_out) <= d_in * d_out


def noise_offset(step: int, param_index: int, num_params: int) -> int:
    """Counter offset of parameter ``param_index`` (of ``num_params``) at ``step``.

    Ranges of 2^32 counters, one per (step, parameter) in step-major order, so no two
    (step, parameter) pairs ever share a counter under one seed. Raises ValueError if the
    parameter index is out of range or the offset would leave int64 (about 2^31 / num_params
    steps).
    """
    if not 0 <= param_index < num_params:
        raise ValueError(
            f"noise_offset: param_index must be in [0, num_params = {num_params}), "
            f"got {param_index}"
        )
    if step < 0:
        raise ValueError(f"noise_offset: step must be >= 0, got {step}")
    offset = (step * num_params + param_index) * OFFSET_STRIDE
    if offset + OFFSET_STRIDE > 2**63 - 1:
        raise ValueError(f"noise_offset: step {step} leaves the int64 counter space")
    return offset


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


def clip_scales(
    sq_norms: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...], max_grad_norm: float
) -> torch.Tensor:
    """Per-example clip factors ``min(1, C / sqrt(q))`` (float32, (B,)), rounded down.

    ``sq_norms`` is either the per-example total ``q`` (B,) or a list of per-parameter squared
    norms (each (B,)), which are then summed here in float64. Each must be an upper bound of the
    true squared norm (what every ``*_sq_norms`` op returns). Guarantee, in exact arithmetic on the
    returned float32 values: ``0 <= scale_b <= 1`` and ``scale_b * sqrt(q_b) <= C (1 - 2^-31)``,
    where ``q_b`` is the exact sum of the given bounds, so an example whose true gradient norm is
    at most ``sqrt(q_b)`` contributes at most ``C``. Proof: the float64 sum of n <= 2^22 bounds is
    at least ``q (1 - 2^-31)`` (gamma_n with u = 2^-53; for one tensor it is exact), and
    ``s = fl(fl(C / fl(sqrt(fl(q)))) (1 - 2^-29))`` is at most ``C / sqrt(q) * (1 + u)^3 /
    ((1 - u)(1 - 2^-31)^(1/2)) * (1 - 2^-29) < C (1 - 2^-31) / sqrt(q)``; clamping to 1 only lowers
    it, and the float32 value is rounded toward zero from ``s``. A total summed in float32
    elsewhere may be low by ``n 2^-24`` relative and is not covered: pass the list instead.

    A squared norm that is NaN, infinite or negative (no certified bound: a non-finite input
    reached the norms) gives factor 0: the example contributes nothing and the step goes on
    (a NaN factor would poison every sum, and an aborted step would reveal the example). A zero
    norm gives factor 1.
    """
    if not (isinstance(max_grad_norm, (int, float)) and math.isfinite(max_grad_norm)):
        raise ValueError(f"clip_scales: max_grad_norm must be a finite number, got {max_grad_norm}")
    if not max_grad_norm > 0:
        raise ValueError(f"clip_scales: max_grad_norm must be > 0, got {max_grad_norm}")
    parts = list(sq_norms) if isinstance(sq_norms, (list, tuple)) else [sq_norms]
    if not parts or not all(isinstance(p, torch.Tensor) and p.is_floating_point() for p in parts):
        raise TypeError(
            "clip_scales: sq_norms must be a floating-point torch.Tensor or a non-empty list "
            "of them"
        )
    if len(parts) > 1 << 22:
        raise ValueError(f"clip_scales: at most 2^22 squared-norm tensors, got {len(parts)}")
    q = parts[0].detach().double()
    for p in parts[1:]:
        q = q + p.detach().double()
    known = torch.isfinite(q) & (q >= 0)
    s = (float(max_grad_norm) / q.sqrt()) * (1.0 - 2.0**-29)  # q = 0: inf, clamped to 1
    s = torch.where(known, s.clamp(max=1.0), 0.0)
    f = s.float()
    return torch.where(f.double() > s, torch.nextafter(f, torch.zeros_like(f)), f)


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def linear_sq_norms(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius norms of the per-example weight gradients of an ``nn.Linear``.

    Example b's weight gradient is ``sum_t dy[b, t]^T x[b, t]`` (d_out x d_in). Per call the
    cheaper route is chosen (:func:`use_gram_route`): the Gram route
    ``sum_{t,s} (x_t . x_s)(dy_t . dy_s)`` or explicit per-example products, one example per
    worker thread on CPU, in blocks of examples bounded by :data:`BLOCK_BYTES` on the device;
    neither all B gradients nor a B x T x T tensor is ever held.

    Certified (DESIGN.md invariant 6): the result is an UPPER BOUND of the exact squared norm
    ``N_b`` (real arithmetic on the given float inputs), rounded up to float32; see
    :func:`linear_sq_norm_bound` for the formula and proof. For ordinary inputs it exceeds
    ``N_b`` by a relative 1e-9 or less; for crafted cancelling inputs (x = [u, -u + 10 w]) where a
    float32 Gram sum returns 0 or a negative number, it stays above ``N_b``. An example with a
    non-finite input gets ``+inf`` (:func:`clip_scales` then gives it factor 0).

    Cost (CPU kernel): each example is converted to float64 on a worker thread and its Gram strips
    run through single-threaded dgemm, about 1.5-2x the uncertified float32 Gram (dgemm runs at
    half the sgemm rate). float32 Gram strips with a rigorous error term were measured and
    rejected: that term sums ``gamma_d |x_t||x_s||G_ts|`` over all T^2 entries while ``N_b``
    cancels, so it inflates the bound by ~``gamma_d T / sqrt(d)`` (3e-4..1e-3 on random data,
    up to 1.5e-2 on real-looking activations at RoBERTa widths, T 64-128), and a switch to
    float64 whenever it is not negligible would fire on every example.

    Args:
        x: layer input (B, d_in) or (B, T, d_in); float32, bfloat16 or float16.
        dy: gradient of the layer output (B, d_out) or (B, T, d_out), same B and T. Padding
            positions contribute nothing when their dy (or x) rows are zero.

    Returns:
        float32 (B,), >= the exact squared norms; +inf where an input is not finite or the
        bound exceeds float32's range.

    Raises:
        ValueError / TypeError naming the argument: wrong ndim, mismatched B or T, empty
        dimension or batch, non-float dtype.
    """
    return torch.ops.rmt.linear_sq_norms(x, dy)


def linear_clipped_noisy_sum(
    x: torch.Tensor,
    dy: torch.Tensor,
    scale: torch.Tensor,
    noise_std: float,
    seed: int,
    offset: int,
) -> torch.Tensor:
    """Clipped, noised sum of the per-example weight gradients of an ``nn.Linear``, one pass.

    ``sum_b scale[b] * sum_t dy[b, t]^T x[b, t] + N(0, noise_std^2)``: one GEMM over the B*T rows
    with row-scaled operands, noise added as the output is written (element (i, j) uses Philox
    counter ``offset + i * d_in + j`` under ``seed``; see the module docstring).

    Args:
        x, dy: as in :func:`linear_sq_norms`.
        scale: (B,) clip factors, finite and >= 0 (e.g. :func:`clip_scales`).
        noise_std: std of the noise on the sum (``noise_multiplier * max_grad_norm``); 0 gives the
            exact clipped sum.
        seed: Philox key, >= 0.
        offset: first Philox counter, >= 0; see :func:`noise_offset`.

    Returns:
        float32 (d_out, d_in), contiguous.

    Raises:
        ValueError / TypeError naming the argument: as :func:`linear_sq_norms`, plus scale of the
        wrong shape, negative or non-finite; noise_std < 0 or not finite; negative seed or offset.
    """
    return torch.ops.rmt.linear_clipped_noisy_sum(
        x, dy, scale, float(noise_std), int(seed), int(offset)
    )


def bias_sq_norms(dy: torch.Tensor) -> torch.Tensor:
    """Squared norms of the per-example gradients ``sum_t dy[b, t]`` of a bias (Linear, LayerNorm).

    Certified upper bound, as :func:`linear_sq_norms`: ``v^ = sum_t dy_t`` is formed in float64
    (off by at most ``gamma_T S`` in norm, ``S = sum_t |dy_t|``), so with ``Q = fl(|v^|^2)``,
    ``bound = min(Q (1 + 2(d + 2)u) + 4(T + 1)u S^2, S^2 (1 + 3(d + T + 8)u))``, u = 2^-53.

    Args:
        dy: output gradient (B, d) or (B, T, d), float.

    Returns:
        float32 (B,).
    """
    return torch.ops.rmt.bias_sq_norms(dy)


def bias_clipped_noisy_sum(
    dy: torch.Tensor, scale: torch.Tensor, noise_std: float, seed: int, offset: int
) -> torch.Tensor:
    """``sum_b scale[b] * sum_t dy[b, t] + N(0, noise_std^2)`` for a bias; float32 (d,).

    Noise element j uses counter ``offset + j``. Arguments as in :func:`linear_clipped_noisy_sum`.
    """
    return torch.ops.rmt.bias_clipped_noisy_sum(dy, scale, float(noise_std), int(seed), int(offset))


def embedding_sq_norms(ids: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Squared norms of the per-example weight gradients of an ``nn.Embedding``.

    ``||G_b||^2 = sum_{t,s} [ids_t == ids_s] (dy_t . dy_s)``: repeated tokens add up. The CPU
    kernel sorts each example's ids and sums the dy rows of equal ids (T d work, one example per
    worker thread, no (V, d) matrix per example); the device path does the same beyond
    T = :data:`EMBEDDING_GRAM_MAX_T` and takes the Gram route (T^2 d) up to it.

    Certified upper bound, as :func:`linear_sq_norms` (repeated ids with cancelling dy rows are
    the crafted case), both routes in float64; with ``S = sum_t |dy_t|`` (>= ``||G_b||``):
    Gram ``P^ + 2(d + 3T^2 + 3T + 8)u S^2``; sort-and-segment ``Q (1 + 2(d + T + 2)u) +
    4(T + 1)u S^2`` (``Q`` the float64 sum of squared segment sums, each off by at most
    ``gamma_T`` times its rows' norms); the smaller of that and ``S^2 (1 + 3(d + T + 8)u)``.

    Args:
        ids: token ids (B,) or (B, T), int64 or int32.
        dy: gradient of the embedding output, ids' shape + (d,), float.

    Returns:
        float32 (B,).
    """
    return torch.ops.rmt.embedding_sq_norms(ids, dy)


def embedding_clipped_noisy_sum(
    ids: torch.Tensor,
    dy: torch.Tensor,
    scale: torch.Tensor,
    num_embeddings: int,
    noise_std: float,
    seed: int,
    offset: int,
) -> torch.Tensor:
    """Clipped sum of per-example embedding gradients plus noise on every table entry.

    Returns float32 (num_embeddings, d); noise element (v, j) uses counter ``offset + v * d + j``.
    ids must lie in [0, num_embeddings). Other arguments as in :func:`linear_clipped_noisy_sum`.
    """
    return torch.ops.rmt.embedding_clipped_noisy_sum(
        ids, dy, scale, int(num_embeddings), float(noise_std), int(seed), int(offset)
    )


def layernorm_sq_norms(x: torch.Tensor, dy: torch.Tensor, eps: float) -> torch.Tensor:
    """Squared norms of the per-example weight gradients of a LayerNorm over the last dim.

    Example b's gradient is ``sum_t dy[b, t] * xhat[b, t]``, ``xhat = (x - mean) / sqrt(var + eps)``
    recomputed from the layer input ``x`` (what a forward hook sees). The bias is
    :func:`bias_sq_norms`.

    Certified upper bound of the squared norm with the EXACT ``xhat`` of the given ``x`` (where
    ``var + eps > 0``; elsewhere the layer's own output is NaN), as :func:`linear_sq_norms`.
    In float64 (u = 2^-53), per row: the mean is off by at most ``eta = 1.1(d + 3)u max|x|``;
    the computed ``D^ = sqrt(var^ + eps)`` has ``D^^2 = (var + eps + e^2)(1 +- g)``,
    ``g = 1.1(d + 8)u``, so ``var + eps >= L = D^^2 (1 - g) - eta^2`` and, with
    ``rho = eta^2 / L``, ``|xhat - xhat^| <= eps_t = sqrt(d)(rho/2 + eta/D^ + 1.2(d + 12)u)``
    (at most ``2.1 sqrt(d)``: both have norm <= sqrt(d)). Then ``||g_b|| <= sqrt(Q(1 + 2(d + 2)u))
    + sum_t M_t (eps_t + 1.2(T + 1)u sqrt(d))`` with ``M_t = max|dy_t|``, ``Q = fl(|g^|^2)``, and
    trivially ``||g_b|| <= sqrt(d) sum_t M_t``; the smaller is returned, squared, rounded up.

    Args:
        x: LayerNorm input (B, d) or (B, T, d); dy: output gradient of the same shape.
        eps: the module's eps, finite and >= 0.

    Returns:
        float32 (B,).
    """
    return torch.ops.rmt.layernorm_sq_norms(x, dy, float(eps))


def layernorm_clipped_noisy_sum(
    x: torch.Tensor,
    dy: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    noise_std: float,
    seed: int,
    offset: int,
) -> torch.Tensor:
    """Clipped, noised sum of LayerNorm weight gradients; float32 (d,), noise j at offset + j."""
    return torch.ops.rmt.layernorm_clipped_noisy_sum(
        x, dy, scale, float(eps), float(noise_std), int(seed), int(offset)
    )


def add_gaussian_noise(x: torch.Tensor, noise_std: float, seed: int, offset: int) -> torch.Tensor:
    """Return float32 ``x + noise_std * randn(seed, offset + k)`` (k: row-major element index).

    For parameters whose clipped sum a custom :class:`LayerRule` computes itself.
    """
    return torch.ops.rmt.add_gaussian_noise(x, float(noise_std), int(seed), int(offset))


# --------------------------------------------------------------------------------------------
# Layer rules: how a module type's parameters get per-example norms and noisy clipped sums
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerRule:
    """Book-keeping rule of one module type.

    ``sq_norms(module, input, grad_output)`` returns ``{param_name: (B,) squared norms}`` and
    ``clipped_noisy_sums(module, input, grad_output, scale, noise_std, seed, offsets)`` returns
    ``{param_name: noisy clipped sum}`` with ``offsets[param_name]`` the counter offset of each
    parameter. Every trainable parameter of the module must appear in both: DP-SGD noises them all.
    """

    sq_norms: Callable[..., dict[str, torch.Tensor]]
    clipped_noisy_sums: Callable[..., dict[str, torch.Tensor]]


_RULES: dict[type[nn.Module], LayerRule] = {}


def register_layer_rule(module_type: type[nn.Module], rule: LayerRule) -> None:
    """Register (or replace) the rule for ``module_type`` (matched exactly, not by subclass)."""
    _RULES[module_type] = rule


def get_layer_rule(module: nn.Module) -> LayerRule:
    """The rule for ``module``'s type; a module without one is an error, never silently skipped."""
    rule = _RULES.get(type(module))
    if rule is None:
        raise TypeError(
            f"no DP layer rule for {type(module).__name__}; register one with "
            "rmt_kernels.register_layer_rule"
        )
    return rule


def _trainable(module: nn.Module, name: str) -> bool:
    p = getattr(module, name, None)
    return isinstance(p, nn.Parameter) and p.requires_grad


def _linear_norms(module: nn.Linear, x, dy):
    out = {}
    if _trainable(module, "weight"):
        out["weight"] = linear_sq_norms(x, dy)
    if _trainable(module, "bias"):
        out["bias"] = bias_sq_norms(dy)
    rounding.remember_sq_norms(module, (x, dy), out)
    return out


def _linear_sums(module: nn.Linear, x, dy, scale, noise_std, seed, offsets):
    # Examples whose float32 rounding could exceed R C are summed apart (rmt_kernels/rounding.py).
    op = "linear_clipped_noisy_sum"
    guard = rounding.ReleaseGuard(op, module, (x, dy), scale, lambda: _linear_norms(module, x, dy))
    out = {}
    if _trainable(module, "weight"):
        out["weight"] = guard.release(
            "weight",
            rounding.LinearTerms(x, dy),
            lambda s: linear_clipped_noisy_sum(x, dy, s, noise_std, seed, offsets["weight"]),
        )
    if _trainable(module, "bias"):
        out["bias"] = guard.release(
            "bias",
            rounding.BiasTerms(dy),
            lambda s: bias_clipped_noisy_sum(dy, s, noise_std, seed, offsets["bias"]),
        )
    return out


def _embedding_grad_output(module: nn.Embedding, ids, dy):
    # nn.Embedding gives the padding row no gradient: drop the positions that look it up.
    if module.padding_idx is None:
        return dy
    return dy.masked_fill((ids == module.padding_idx).unsqueeze(-1), 0)


def _embedding_norms(module: nn.Embedding, ids, dy):
    _check_embedding_module(module)
    if not _trainable(module, "weight"):
        return {}
    out = {"weight": embedding_sq_norms(ids, _embedding_grad_output(module, ids, dy))}
    rounding.remember_sq_norms(module, (ids, dy), out)
    return out


def _embedding_sums(module: nn.Embedding, ids, dy, scale, noise_std, seed, offsets):
    _check_embedding_module(module)
    if not _trainable(module, "weight"):
        return {}
    op = "embedding_clipped_noisy_sum"
    guard = rounding.ReleaseGuard(
        op, module, (ids, dy), scale, lambda: _embedding_norms(module, ids, dy)
    )
    dy = _embedding_grad_output(module, ids, dy)
    return {
        "weight": guard.release(
            "weight",
            rounding.EmbeddingTerms(ids, dy),
            lambda s: embedding_clipped_noisy_sum(
                ids, dy, s, module.num_embeddings, noise_std, seed, offsets["weight"]
            ),
        )
    }


def _check_embedding_module(module: nn.Embedding) -> None:
    # max_norm renormalises rows in the forward pass and sparse gradients have no dense sum:
    # refuse rather than compute something nn.Embedding would not.
    if module.max_norm is not None or module.sparse:
        raise ValueError("embedding rule: max_norm and sparse embeddings are not supported")


def _layernorm_norms(module: nn.LayerNorm, x, dy):
    _check_layernorm_module(module)
    out = {}
    if _trainable(module, "weight"):
        out["weight"] = layernorm_sq_norms(x, dy, module.eps)
    if _trainable(module, "bias"):
        out["bias"] = bias_sq_norms(dy)
    rounding.remember_sq_norms(module, (x, dy), out)
    return out


def _layernorm_sums(module: nn.LayerNorm, x, dy, scale, noise_std, seed, offsets):
    _check_layernorm_module(module)
    op = "layernorm_clipped_noisy_sum"
    guard = rounding.ReleaseGuard(
        op, module, (x, dy), scale, lambda: _layernorm_norms(module, x, dy)
    )
    out = {}
    if _trainable(module, "weight"):
        out["weight"] = guard.release(
            "weight",
            rounding.LayerNormTerms(x, dy, module.eps),
            lambda s: layernorm_clipped_noisy_sum(
                x, dy, s, module.eps, noise_std, seed, offsets["weight"]
            ),
        )
    if _trainable(module, "bias"):
        out["bias"] = guard.release(
            "bias",
            rounding.BiasTerms(dy),
            lambda s: bias_clipped_noisy_sum(dy, s, noise_std, seed, offsets["bias"]),
        )
    return out


def _check_layernorm_module(module: nn.LayerNorm) -> None:
    if len(module.normalized_shape) != 1:
        raise ValueError(
            "layernorm rule: only normalisation over the last dimension is supported, got "
            f"normalized_shape={tuple(module.normalized_shape)}"
        )


register_layer_rule(nn.Linear, LayerRule(_linear_norms, _linear_sums))
register_layer_rule(nn.Embedding, LayerRule(_embedding_norms, _embedding_sums))
register_layer_rule(nn.LayerNorm, LayerRule(_layernorm_norms, _layernorm_sums))


# --------------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes and metadata checks only
# --------------------------------------------------------------------------------------------


def _float_empty(like: torch.Tensor, *shape: int) -> torch.Tensor:
    return like.new_empty(shape, dtype=torch.float32)


@torch.library.register_fake("rmt::linear_sq_norms")
def _linear_sq_norms_fake(x, dy):
    _check_linear("linear_sq_norms", x, dy)
    return _float_empty(x, x.shape[0])


@torch.library.register_fake("rmt::linear_clipped_noisy_sum")
def _linear_clipped_noisy_sum_fake(x, dy, scale, noise_std, seed, offset):
    op = "linear_clipped_noisy_sum"
    _check_linear(op, x, dy)
    check_scale_metadata(op, scale, x.shape[0])
    check_same_device(op, x=x, dy=dy, scale=scale)
    check_noise(op, noise_std, seed, offset, dy.shape[-1] * x.shape[-1])
    return _float_empty(x, dy.shape[-1], x.shape[-1])


@torch.library.register_fake("rmt::bias_sq_norms")
def _bias_sq_norms_fake(dy):
    _check_bias("bias_sq_norms", dy)
    return _float_empty(dy, dy.shape[0])


@torch.library.register_fake("rmt::bias_clipped_noisy_sum")
def _bias_clipped_noisy_sum_fake(dy, scale, noise_std, seed, offset):
    op = "bias_clipped_noisy_sum"
    _check_bias(op, dy)
    check_scale_metadata(op, scale, dy.shape[0])
    check_same_device(op, dy=dy, scale=scale)
    check_noise(op, noise_std, seed, offset, dy.shape[-1])
    return _float_empty(dy, dy.shape[-1])


@torch.library.register_fake("rmt::embedding_sq_norms")
def _embedding_sq_norms_fake(ids, dy):
    check_ids("embedding_sq_norms", ids, dy)
    check_same_device("embedding_sq_norms", ids=ids, dy=dy)
    return _float_empty(dy, dy.shape[0])


@torch.library.register_fake("rmt::embedding_clipped_noisy_sum")
def _embedding_clipped_noisy_sum_fake(ids, dy, scale, num_embeddings, noise_std, seed, offset):
    op = "embedding_clipped_noisy_sum"
    check_ids(op, ids, dy)
    _check_num_embeddings(op, num_embeddings)
    check_scale_metadata(op, scale, dy.shape[0])
    check_same_device(op, ids=ids, dy=dy, scale=scale)
    check_noise(op, noise_std, seed, offset, num_embeddings * dy.shape[-1])
    return _float_empty(dy, num_embeddings, dy.shape[-1])


@torch.library.register_fake("rmt::layernorm_sq_norms")
def _layernorm_sq_norms_fake(x, dy, eps):
    check_layernorm("layernorm_sq_norms", x, dy, eps)
    check_same_device("layernorm_sq_norms", x=x, dy=dy)
    return _float_empty(x, x.shape[0])


@torch.library.register_fake("rmt::layernorm_clipped_noisy_sum")
def _layernorm_clipped_noisy_sum_fake(x, dy, scale, eps, noise_std, seed, offset):
    op = "layernorm_clipped_noisy_sum"
    check_layernorm(op, x, dy, eps)
    check_scale_metadata(op, scale, x.shape[0])
    check_same_device(op, x=x, dy=dy, scale=scale)
    check_noise(op, noise_std, seed, offset, x.shape[-1])
    return _float_empty(x, x.shape[-1])


@torch.library.register_fake("rmt::add_gaussian_noise")
def _add_gaussian_noise_fake(x, noise_std, seed, offset):
    check_float("add_gaussian_noise", "x", x)
    check_noise("add_gaussian_noise", noise_std, seed, offset, x.numel())
    return x.new_empty(x.shape, dtype=torch.float32)


def _check_linear(op: str, x: torch.Tensor, dy: torch.Tensor) -> None:
    check_activations(op, "x", x, dy)
    check_float(op, "x", x)
    check_float(op, "dy", dy)
    check_same_device(op, x=x, dy=dy)


def _check_bias(op: str, dy: torch.Tensor) -> None:
    check_activations(op, "dy", dy, dy)
    check_float(op, "dy", dy)


def _check_num_embeddings(op: str, num_embeddings: int) -> None:
    if num_embeddings <= 0:
        raise ValueError(f"{op}: num_embeddings must be > 0, got {num_embeddings}")


# --------------------------------------------------------------------------------------------
# Device (CUDA) implementations: the clipped Linear sum (GEMM + noise epilogue), the noise and
# the Gram-route norms are Triton kernels; the per-example norm route (blocked bmm), the
# embedding's sort-and-segment route and the small bias / LayerNorm reductions are torch ops.
# Written for any device, so the CPU tests run them too (Triton under TRITON_INTERPRET=1). The
# route thresholds are the CPU's; they are not tuned on a GPU yet.
# --------------------------------------------------------------------------------------------


def _seq(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 3 else t.unsqueeze(1)


def _noise_(out: torch.Tensor, noise_std: float, seed: int, offset: int) -> torch.Tensor:
    # Imported here so that importing rmt_kernels never needs Triton.
    from rmt_kernels.triton.dp_noise import add_noise_

    return add_noise_(out, noise_std, seed, offset)


def linear_sq_norms_device(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Device implementation of :func:`linear_sq_norms` (checks included): float64 Gram tiles
    in the Triton kernel or blocked float64 bmm, then :func:`linear_sq_norm_bound`."""
    _check_linear("linear_sq_norms", x, dy)
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

    op = "linear_clipped_noisy_sum"
    _check_linear(op, x, dy)
    check_scale_metadata(op, scale, x.shape[0])
    check_same_device(op, x=x, dy=dy, scale=scale)
    check_noise(op, noise_std, seed, offset, dy.shape[-1] * x.shape[-1])
    check_scale_values(op, scale)
    x, dy = _drop_zero_scaled(x, scale), _drop_zero_scaled(dy, scale)
    return linear_clipped_noisy_sum_triton(x, dy, scale, noise_std, seed, offset)


def bias_sq_norms_device(dy: torch.Tensor) -> torch.Tensor:
    """Device implementation of :func:`bias_sq_norms` (the bound stated there)."""
    _check_bias("bias_sq_norms", dy)
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
    op = "bias_clipped_noisy_sum"
    _check_bias(op, dy)
    check_scale_metadata(op, scale, dy.shape[0])
    check_same_device(op, dy=dy, scale=scale)
    check_noise(op, noise_std, seed, offset, dy.shape[-1])
    check_scale_values(op, scale)
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
    check_ids("embedding_sq_norms", ids, dy)
    check_same_device("embedding_sq_norms", ids=ids, dy=dy)
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
    check_ids(op, ids, dy)
    _check_num_embeddings(op, num_embeddings)
    check_scale_metadata(op, scale, dy.shape[0])
    check_same_device(op, ids=ids, dy=dy, scale=scale)
    check_noise(op, noise_std, seed, offset, num_embeddings * dy.shape[-1])
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
    check_layernorm("layernorm_sq_norms", x, dy, eps)
    check_same_device("layernorm_sq_norms", x=x, dy=dy)
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
    op = "layernorm_clipped_noisy_sum"
    check_layernorm(op, x, dy, eps)
    check_scale_metadata(op, scale, x.shape[0])
    check_same_device(op, x=x, dy=dy, scale=scale)
    check_noise(op, noise_std, seed, offset, x.shape[-1])
    check_scale_values(op, scale)
    per_example = _drop_zero_scaled(_layernorm_per_example(x, dy, eps), scale)
    out = (per_example.mT @ scale.float()).contiguous()
    return _noise_(out, noise_std, seed, offset)


def add_gaussian_noise_device(
    x: torch.Tensor, noise_std: float, seed: int, offset: int
) -> torch.Tensor:
    """Device implementation of :func:`add_gaussian_noise`."""
    check_float("add_gaussian_noise", "x", x)
    check_noise("add_gaussian_noise", noise_std, seed, offset, x.numel())
    out = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    return _noise_(out, noise_std, seed, offset)


for _name, _impl in [
    ("linear_sq_norms", linear_sq_norms_device),
    ("linear_clipped_noisy_sum", linear_clipped_noisy_sum_device),
    ("bias_sq_norms", bias_sq_norms_device),
    ("bias_clipped_noisy_sum", bias_clipped_noisy_sum_device),
    ("embedding_sq_norms", embedding_sq_norms_device),
    ("embedding_clipped_noisy_sum", embedding_clipped_noisy_sum_device),
    ("layernorm_sq_norms", layernorm_sq_norms_device),
    ("layernorm_clipped_noisy_sum", layernorm_clipped_noisy_sum_device),
    ("add_gaussian_noise", add_gaussian_noise_device),
]:
    torch.library.register_kernel(f"rmt::{_name}", "cuda", _impl)
