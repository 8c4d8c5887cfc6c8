"""Public entry points of every ``torch.ops.rmt`` op.

Layers, plainly stacked: C++ schema (csrc/rmt.cpp) -> per-backend kernel (csrc/cpu/*.cpp for the
CPU; rmt_kernels/triton/, registered for CUDA in rmt_kernels/triton/register.py) -> the documented
Python functions below. Fake (meta) implementations for tracing: rmt_kernels/fake_impls.py;
argument checks: rmt_kernels/_checks.py (denoise's options: rmt_kernels/op_options.py); slow
references: rmt_kernels/reference.py; layer rules built on the DP ops: rmt_kernels/rules/.

Two families: ``denoise`` / ``denoise_many`` (singular-value shrinkage of a noisy gradient), and
the fused DP-SGD gradient ops (book-keeping clipping, Bu et al.): per-example squared gradient
norms without per-example gradients, and the clipped sum with Gaussian noise in one pass.

Noise. Every op that adds noise takes ``(noise_std, seed, offset)``: element k of its output in
row-major order (element (i, j) of a (d_out, d_in) weight gradient: k = i * d_in + j) receives
``noise_std * randn(seed, offset + k)``, element ``offset + k`` of the stream of key ``seed``
specified in csrc/cpu/philox.h (drawn on the GPU by rmt_kernels/triton/gaussian.py). Two calls
share no noise when their element ranges ``[offset, offset + numel)`` are disjoint or their seeds
differ. :func:`noise_offset` gives (step, parameter) a 2^32-wide range of its own; keep ``seed``
fixed (and secret in secure mode) for a run and never reuse an offset with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from rmt_kernels import _C
from rmt_kernels._checks import INT64_MAX, check_denoise_basis
from rmt_kernels.op_options import DenoiseOpOptions

# The public functions (rmt_kernels re-exports them); the constants below are read as ops.NAME.
__all__ = [
    "add_gaussian_noise",
    "bias_clipped_noisy_sum",
    "bias_sq_norms",
    "clip_scales",
    "denoise",
    "denoise_many",
    "denoise_warm",
    "embedding_clipped_noisy_sum",
    "embedding_sq_norms",
    "layernorm_clipped_noisy_sum",
    "layernorm_sq_norms",
    "linear_clipped_noisy_sum",
    "linear_sq_norms",
    "noise_offset",
    "rmsnorm_clipped_noisy_sum",
    "rmsnorm_sq_norms",
]

# Width of the counter range of one (step, parameter): every parameter has < 2^32 elements.
OFFSET_STRIDE = 1 << 32
# Version of the noise stream's definition (kNoiseStreamVersion in csrc/cpu/philox.h). A run
# resumed from a checkpoint replays its lost steps for free only if it draws the same noise, so
# checkpoints record this and refuse another.
NOISE_STREAM_VERSION: int = _C.NOISE_STREAM_VERSION
# The range finder's stopping rule and the margin of denoise_warm's basis (csrc/constants.h).
RITZ_TOLERANCE: float = _C.RITZ_TOLERANCE
RITZ_WINDOW: float = _C.RITZ_WINDOW
RISE_STEPS: float = _C.RISE_STEPS
COLD_PASSES: int = _C.COLD_PASSES
MAX_ADAPTIVE_PASSES: int = _C.MAX_ADAPTIVE_PASSES
BASIS_MARGIN: int = _C.BASIS_MARGIN
# The range of the range finder's products, and where the shrinkers become the identity.
PRODUCT_FLOOR: float = _C.PRODUCT_FLOOR
PRODUCT_CEILING: float = _C.PRODUCT_CEILING
SHRINK_IDENTITY_ABOVE: float = _C.SHRINK_IDENTITY_ABOVE


# ----------------------------------------------------------------------------------------------
# Denoising
# ----------------------------------------------------------------------------------------------


def denoise(
    grad: torch.Tensor,
    sigma: float,
    *,
    shrinker: str = "frobenius",
    kappa: float = 1.0,
    rank: int = -1,
    oversample: int = 8,
    niter: int = -1,
    norm: str = "none",
    seed: int = 0,
) -> torch.Tensor:
    """Denoise a noisy gradient matrix by Marchenko-Pastur singular-value shrinkage.

    Same as ``torch.ops.rmt.denoise(grad, sigma, ...)``. A randomized block Krylov range finder
    (Gaussian sketch, then passes of ``grad^T`` and ``grad`` over a growing orthonormal basis,
    Musco & Musco 2015; each pass ends with a Rayleigh-Ritz SVD) finds the components above the
    noise bulk; their singular values are shrunk and everything at or below ``kappa`` times the
    bulk edge ``sigma * (sqrt(m) + sqrt(n))`` is zeroed. It reads only the noisy matrix and
    ``sigma``, so applied to a DP-SGD gradient it is post-processing: the privacy guarantee is
    unchanged.

    Stopping (``niter=-1``, the default). Each pass (one product with ``grad^T``, one with
    ``grad``) ends with two estimates: Rayleigh-Ritz on the Krylov basis, and on the other side's
    Krylov space half a pass further on (from the product the next pass needs anyway). The range
    finder returns the second once their Frobenius distance, plus the shrunk value any value
    within ``RITZ_WINDOW`` below the threshold would reach if it kept rising for ``RISE_STEPS``
    half passes, is within ``RITZ_TOLERANCE`` of the exact shrinker's error scale (its expected
    loss on the kept components plus one noise component, ``kappa * sigma * sqrt(max(m, n))``);
    from its ``COLD_PASSES``-th pass, at most ``MAX_ADAPTIVE_PASSES``. Components near the
    threshold converge slowest and decide what is kept, so the rule is about them. Measured
    (tests/denoise/test_edge.py): within 2% of the exact full-SVD shrinker's error on spectra
    crossing the edge at RoBERTa-base and MiniLM shapes, with 7-9 products with grad there
    (pure noise 5-7, strong signals 7). :func:`denoise_warm` starts from the last step's basis.

    Args:
        grad: noisy matrix (m, n) or batch of matrices (b, m, n), float32, bfloat16 or float16,
            any strides. Computation is in float32; the result has ``grad``'s dtype.
        sigma: per-entry noise std of ``grad``. For the DP-SGD averaged gradient this is
            ``noise_multiplier * max_grad_norm / batch_size`` (public hyper-parameters only).
        shrinker: ``"frobenius"`` (Gavish-Donoho optimal for Frobenius loss), ``"operator"``
            (debiasing), ``"nuclear"``, or ``"hard"`` (keep values above the threshold as they are).
        kappa: multiplier of the bulk edge; the shrinkers are evaluated at noise level
            ``kappa * sigma`` so they stay continuous at the threshold.
        rank: -1 (adaptive: the sketch grows until its ``rank``-th value is below the threshold,
            so every component above it is kept) or a fixed number of components to keep at most.
        oversample: extra sketch columns beyond ``rank``, for accuracy of the kept components.
        niter: -1 (adaptive, the default: stop on the rule above) or a fixed number of power
            iterations, 0 to 100: ``niter + 1`` passes, ``2 niter + 2`` products with grad, as
            before (each pass now extends a Krylov basis instead of replacing it, which is at
            least as accurate per pass; the estimate is Rayleigh-Ritz on the whole basis).
        norm: ``"none"``; ``"preserve"`` rescales the estimate to ``||grad||_F``; ``"debiased"``
            rescales it to ``sqrt(max(||grad||_F^2 - sigma^2 m n, 0))``. A zero estimate stays zero.
        seed: seed of the Gaussian test matrix; same seed and input give the same output.

    Returns:
        The estimate: a new contiguous tensor of ``grad``'s shape and dtype.

    Range. Any finite ``grad`` and ``sigma`` > 0 give the estimate (never NaN): the shrinker is
    homogeneous, ``denoise(a G, a sigma) = a denoise(G, sigma)``, so where a product of the
    range finder leaves ``[PRODUCT_FLOOR, PRODUCT_CEILING]`` (float32 over- or underflow ahead)
    grad and sigma are rescaled by a power of two and it starts again; above
    ``SHRINK_IDENTITY_ABOVE`` times the noise level every shrinker is the identity. Once the
    Krylov basis would hold ``min(m, n)`` columns the result is the exact SVD's.

    Raises:
        ValueError / TypeError naming the argument: wrong ndim, empty dimension, non-float dtype,
        sigma or kappa not finite and positive, rank outside [1, min(m, n)] and not -1, negative
        oversample, niter below -1, unknown shrinker or norm, NaN or Inf in ``grad``.

    Example:
        >>> g = torch.randn(768, 3072) * 0.01            # a noisy DP gradient
        >>> clean = rmt_kernels.denoise(g, sigma=0.01)   # pure noise comes back as ~zero
    """
    # Checked here too, before C++: an int option past int64 (or near it, e.g. an oversample of
    # 2**63 - 1) would otherwise overflow in the kernel's arithmetic or fail with a binding error.
    options = DenoiseOpOptions(shrinker, kappa, rank, oversample, niter, norm, seed)
    options.check(grad, sigma)
    return torch.ops.rmt.denoise(grad, float(sigma), **options.op_arguments())


def denoise_warm(
    grad: torch.Tensor,
    sigma: float,
    basis: torch.Tensor | None = None,
    *,
    shrinker: str = "frobenius",
    kappa: float = 1.0,
    rank: int = -1,
    oversample: int = 8,
    niter: int = -1,
    norm: str = "none",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`denoise` started from a basis, returning the basis to start the next call from.

    Same as ``torch.ops.rmt.denoise_warm(grad, sigma, basis, ...)``. The range finder starts
    from ``basis`` plus fresh Gaussian columns (seeded by ``seed``) instead of a sketch alone:
    with the adaptive rank (``rank=-1``), as many as fill the block to 16 columns (the widest
    that costs no more than a narrower one in the products with grad), at least
    ``oversample - BASIS_MARGIN`` (the basis's own last ``BASIS_MARGIN`` columns, the components
    just below the threshold at the last step, do the rest of the oversampling's work) and at
    most ``oversample``; with a fixed rank, ``rank + oversample`` columns in all. A
    DP gradient's subspace moves slowly from one step to the next, so the basis this returned at
    the last step settles the range finder sooner: measured, 2 products with grad on pure noise
    (cold: 5-7), 4 for strong signals (cold: 7), 4-6 on spectra crossing the edge (cold: 7-9),
    within 2% of the exact shrinker's error. A warm start watches for values rising toward the
    threshold in its first pass only (those of the basis's components
    that the new noise pushed under it): a component that is new at this step and still below
    the threshold after that pass is left to the next step. With no basis (``None`` or k = 0) it
    is a cold start: the estimate is exactly :func:`denoise`'s. The basis is a function of the
    noisy matrix and public numbers only, so keeping it across DP-SGD steps is post-processing.

    Args:
        grad, sigma: as in :func:`denoise`.
        basis: (m, k) float32 for grad (m, n), or (b, m, k) for a batch (b, m, n); on grad's
            device, 0 <= k <= min(m, n), finite, of any magnitude (each column is divided by
            its largest entry first). Need not be orthonormal (it is orthonormalised; repeated
            or zero columns are harmless). None: a cold start.
        shrinker, kappa, rank, oversample, niter, norm, seed: as in :func:`denoise`.

    Returns:
        ``(estimate, new_basis, passes)``: the estimate (a new contiguous tensor like ``grad``);
        ``new_basis`` float32 (m, k') or (b, m, k') with orthonormal columns, the left singular
        vectors of the kept components and of the next ``BASIS_MARGIN`` below them
        (k' = min(kept + BASIS_MARGIN, width of the range finder), kept the most components
        any matrix of the batch kept); ``passes`` an int64 0-d tensor on grad's device, the
        number of products with grad or grad^T this call took (each reads grad once: 2 for a
        warm start that settles in its first pass, 5 or more for an adaptive cold start,
        ``2 niter + 2`` for a fixed one), plus one for the exact SVD that ends the range finder
        once its basis would hold min(m, n) columns. That is where a wide start basis on a tall
        grad leads: the basis is not in grad's column space, so the Krylov basis never holds
        that space and only the exact SVD is exact.

    Raises:
        as :func:`denoise`, plus ValueError / TypeError naming ``basis``: wrong number of
        dimensions, rows or batch size, more than min(m, n) columns, not float32, on another
        device, NaN or Inf.

    Tracing: k' depends on the data. The fake implementation gives it an unbacked symbolic
    size (``torch.compile`` needs ``capture_dynamic_output_shape_ops``, else it breaks the graph
    there); meta tensors are refused after the argument checks.

    Example:
        >>> basis = None
        >>> for step in range(3):
        ...     g = torch.randn(768, 3072) * 0.01
        ...     clean, basis, passes = rmt_kernels.denoise_warm(g, 0.01, basis)
    """
    options = DenoiseOpOptions(shrinker, kappa, rank, oversample, niter, norm, seed)
    options.check(grad, sigma)
    if basis is None:
        basis = grad.new_empty((*grad.shape[:-1], 0), dtype=torch.float32)
    check_denoise_basis(grad, basis)
    return torch.ops.rmt.denoise_warm(grad, float(sigma), basis, **options.op_arguments())


def denoise_many(
    grads: Sequence[torch.Tensor],
    sigmas: float | Sequence[float],
    **options,
) -> list[torch.Tensor]:
    """Denoise a model's worth of matrices, grouping equal shapes into batched launches.

    On a GPU, matrices of equal shape, dtype and sigma are stacked into one batched call. On the
    CPU they are denoised one by one: the BLAS work is the same and stacking would copy them.

    Args:
        grads: 2-D matrices of any mix of shapes, dtypes and devices.
        sigmas: one per-entry noise std for all of them, or one per matrix.
        **options: keyword options of :func:`denoise` (shrinker, kappa, rank, ...).

    Returns:
        The estimates, in the order of ``grads``.
    """
    grads = list(grads)
    if isinstance(sigmas, (int, float)):
        sigma_list = [float(sigmas)] * len(grads)
    else:
        sigma_list = [float(s) for s in sigmas]
        if len(sigma_list) != len(grads):
            raise ValueError(
                f"denoise_many: sigmas must be one number or one per matrix: got {len(sigma_list)} "
                f"sigmas for {len(grads)} grads"
            )
    groups: dict[tuple, list[int]] = {}
    for i, (g, s) in enumerate(zip(grads, sigma_list, strict=True)):
        if not isinstance(g, torch.Tensor) or g.dim() != 2:
            shape = list(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
            raise ValueError(f"denoise_many: grads[{i}] must be a 2-D matrix, got {shape}")
        groups.setdefault((tuple(g.shape), g.dtype, g.device, s), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(grads)
    for (_, _, device, sigma), indices in groups.items():
        # On the CPU a batched call does the same BLAS work as separate calls, and stacking
        # would copy every gradient: only devices, where launches cost, get batched.
        if len(indices) == 1 or device.type == "cpu":
            for i in indices:
                out[i] = denoise(grads[i], sigma, **options)
            continue
        batch = denoise(torch.stack([grads[i] for i in indices]), sigma, **options)
        for i, estimate in zip(indices, batch.unbind(0), strict=True):
            out[i] = estimate
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# The fused DP-SGD gradient ops, and the two helpers every caller of them needs
# ----------------------------------------------------------------------------------------------


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
    if offset + OFFSET_STRIDE > INT64_MAX:
        raise ValueError(f"noise_offset: step {step} leaves the int64 counter space")
    return offset


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


def linear_sq_norms(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius norms of the per-example weight gradients of an ``nn.Linear``.

    Example b's weight gradient is ``sum_t dy[b, t]^T x[b, t]`` (d_out x d_in). Per call the
    cheaper route is chosen (``use_gram_route``, csrc/constants.h): the Gram route
    ``sum_{t,s} (x_t . x_s)(dy_t . dy_s)`` or explicit per-example products, one example per
    worker thread on CPU, in blocks of examples bounded by ``BLOCK_BYTES`` on the device;
    neither all B gradients nor a B x T x T tensor is ever held.

    Certified (privacy invariant 6, PRIVACY.md): the result is an UPPER BOUND of the exact
    squared norm ``N_b`` (real arithmetic on the given float inputs), rounded up to float32; see
    ``triton.device.linear_sq_norm_bound`` for the formula and proof. For ordinary inputs it exceeds
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
    counter ``offset + i * d_in + j`` under ``seed``; the stream: csrc/cpu/philox.h).

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
    T = ``EMBEDDING_GRAM_MAX_T`` and takes the Gram route (T^2 d) up to it.

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

    For parameters whose clipped sum a custom :class:`rmt_kernels.rules.LayerRule` computes
    itself.
    """
    return torch.ops.rmt.add_gaussian_noise(x, float(noise_std), int(seed), int(offset))


def rmsnorm_sq_norms(x: torch.Tensor, dy: torch.Tensor, eps: float) -> torch.Tensor:
    """Squared norms of the per-example weight gradients of an RMSNorm over the last dim.

    Example b's gradient is ``sum_t dy[b, t] * xhat[b, t]``, ``xhat = x / sqrt(mean(x^2) + eps)``
    (no centring) recomputed from the layer input ``x``. The layers: ``torch.nn.RMSNorm`` and
    the Hugging Face Llama/Qwen/Mistral/Gemma norms (rmt_kernels/rules/rmsnorm.py).

    Certified upper bound of the squared norm with the EXACT ``xhat`` of the given ``x``, as
    :func:`linear_sq_norms`. In float64 (u = 2^-53), per row: the normaliser sums d non-negative
    squares, so ``D^ = sqrt(ms^ + eps)`` is off by at most ``gamma_{d+5} / 2`` relative and each
    entry of ``xhat^`` by ``0.6 (d + 8) u`` relative; since ``||xhat|| <= sqrt(d)``,
    ``||xhat^ - xhat|| <= eps_t = 1.2 (d + 12) u sqrt(d)``. Then ``||g_b|| <= sqrt(Q(1 + 2(d +
    2)u)) + sum_t M_t (eps_t + 1.2(T + 1)u sqrt(d))`` with ``M_t = max|dy_t|``, ``Q = fl(|g^|^2)``,
    and trivially ``||g_b|| <= sqrt(d) sum_t M_t``; the smaller is returned, squared, rounded up.
    A row with ``mean(x^2) + eps = 0`` (the layer's own output is NaN there) leaves the trivial
    bound.

    Args:
        x: RMSNorm input (B, d) or (B, T, d); dy: output gradient of the same shape; float32,
            bfloat16 or float16.
        eps: the eps the layer adds, finite and >= 0 (``torch.nn.RMSNorm(eps=None)`` adds
            float32's machine epsilon for float32, bfloat16 and float16 inputs).

    Returns:
        float32 (B,).

    Raises:
        ValueError / TypeError naming the argument: as :func:`layernorm_sq_norms`.
    """
    return torch.ops.rmt.rmsnorm_sq_norms(x, dy, float(eps))


def rmsnorm_clipped_noisy_sum(
    x: torch.Tensor,
    dy: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    noise_std: float,
    seed: int,
    offset: int,
) -> torch.Tensor:
    """Clipped, noised sum of RMSNorm weight gradients; float32 (d,), noise j at offset + j.

    ``sum_b scale[b] * sum_t dy[b, t] * xhat[b, t] + N(0, noise_std^2)`` in float32 (``xhat``
    with a correctly rounded sqrt and division). Arguments as :func:`rmsnorm_sq_norms` and
    :func:`linear_clipped_noisy_sum`.
    """
    return torch.ops.rmt.rmsnorm_clipped_noisy_sum(
        x, dy, scale, float(eps), float(noise_std), int(seed), int(offset)
    )
