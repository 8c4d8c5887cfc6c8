"""rmt::denoise and rmt::denoise_warm on a device: the block Krylov range finder of
csrc/cpu/denoise.cpp in torch (GEMMs, CholeskyQR2, small float64 eigenproblems), with Triton
kernels for the two steps that touch the matrix elementwise: the Gaussian sketch of a cold start
and shrink + reconstruct.

Same steps, constants and stopping rule as the CPU kernel (csrc/constants.h, read through
rmt_kernels._C); the random streams differ (Philox here, the CPU generator there), so the two
agree to the accuracy of the range finder, not bit for bit. One host synchronisation per pass
reads the stopping decision with the magnitude check of the pass's products (NaN/Inf included),
one more the rank decision.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rmt_kernels import _C
from rmt_kernels._checks import check_denoise_basis
from rmt_kernels.linalg import gram_svd, next_krylov_block, orthonormal_block
from rmt_kernels.op_options import DenoiseOpOptions
from rmt_kernels.shrinkage import SHRINK_IDENTITY_ABOVE, shrink_singular_values, target_norm
from rmt_kernels.triton.reconstruct import shrink_reconstruct
from rmt_kernels.triton.sketch import gaussian_sketch

# The range finder's constants (csrc/constants.h).
INITIAL_RANK: int = _C.INITIAL_RANK
RITZ_TOLERANCE: float = _C.RITZ_TOLERANCE
RITZ_WINDOW: float = _C.RITZ_WINDOW
RISE_STEPS: float = _C.RISE_STEPS
RISE_MARGIN: float = _C.RISE_MARGIN
COLD_PASSES: int = _C.COLD_PASSES
MAX_ADAPTIVE_PASSES: int = _C.MAX_ADAPTIVE_PASSES
DIRECTION_FLOOR: float = _C.DIRECTION_FLOOR
BASIS_MARGIN: int = _C.BASIS_MARGIN
PRODUCT_CEILING: float = _C.PRODUCT_CEILING
PRODUCT_FLOOR: float = _C.PRODUCT_FLOOR


class _Shrink:
    """The shrinker of one call as a function of singular values (any float dtype)."""

    def __init__(self, p: int, q: int, sigma: float, kappa: float, shrinker: str):
        self.p, self.q, self.sigma, self.kappa, self.shrinker = p, q, sigma, kappa, shrinker
        self.beta = p / q
        self.noise_scale = kappa * sigma * math.sqrt(q)
        self.threshold = self.noise_scale * (1.0 + math.sqrt(self.beta))

    def __call__(self, s: torch.Tensor, shrinker: str | None = None) -> torch.Tensor:
        return shrink_singular_values(
            s, self.p, self.q, self.sigma, shrinker or self.shrinker, self.kappa
        )


def _look_ahead(g1: torch.Tensor, g2: torch.Tensor):
    """The two estimates of a pass from G1 = M^T M and G2 = (AM)^T AM (float64): see
    ``look_ahead`` in csrc/cpu/denoise.cpp. Returns (s_now, E, s_ahead, X, C X)."""
    lam, e = torch.linalg.eigh(g1)
    lam, e = lam.flip(-1).clamp_min(0.0), e.flip(-1)
    s_now = lam.sqrt()
    top = s_now[:, :1]
    inv = torch.where(s_now > DIRECTION_FLOOR * top, 1.0 / s_now.clamp_min(1e-300), 0.0)
    c = e * inv.unsqueeze(1)
    mu, x = torch.linalg.eigh(c.mT @ g2 @ c)
    x = x.flip(-1)
    return s_now, e, mu.flip(-1).clamp_min(0.0).sqrt(), x, c @ x


def _settled(la, sh: _Shrink, guard: bool) -> torch.Tensor:
    """0-d bool tensor: the stopping rule of ``settled`` in csrc/cpu/denoise.cpp."""
    s_now, _e, s_ahead, x, _cx = la
    eta_now, eta_ahead = sh(s_now), sh(s_ahead)
    weight = torch.where(eta_ahead > 0, eta_ahead / s_ahead.clamp_min(1e-300), 0.0)
    cross = ((eta_now * s_now).unsqueeze(1) @ x.square() @ weight.unsqueeze(2)).reshape(-1)
    change = (eta_now.square().sum(1) + eta_ahead.square().sum(1) - 2.0 * cross).clamp_min(0.0)
    projected = s_ahead + RISE_STEPS * (s_ahead - s_now)
    rising = (
        (s_ahead >= RITZ_WINDOW * sh.threshold)
        & (s_ahead <= sh.threshold)
        & (projected > (1.0 + RISE_MARGIN) * sh.threshold)
        & guard
    )
    change = change + torch.where(rising, sh(projected), 0.0).square().sum(1)
    # At y up to SHRINK_IDENTITY_ABOVE, where x^2 - eta^2 has reached its limit (as the CPU).
    y = (s_ahead / sh.noise_scale).clamp_max(SHRINK_IDENTITY_ABOVE)
    t = y * y - (sh.beta + 1.0)
    x2 = (t + (t * t - 4.0 * sh.beta).clamp_min(0.0).sqrt()) * 0.5
    eta_f = sh(y * sh.noise_scale, "frobenius") / sh.noise_scale
    loss = torch.where(eta_f > 0, (x2 - eta_f * eta_f).clamp_min(0.0), 0.0)
    # noise_scale * noise_scale, not ** 2: a float's power raises OverflowError past 1e308.
    scale = (loss.sum(1) + 1.0) * (sh.noise_scale * sh.noise_scale)
    return (change <= RITZ_TOLERANCE**2 * scale).all()


def _grow_gram(gram, old_cols, cols):
    diag = cols.mT @ cols
    if gram is None:
        return diag
    off = old_cols.mT @ cols
    return torch.cat([torch.cat([gram, off], 2), torch.cat([off.mT, diag], 2)], 1)


def _top(product: torch.Tensor) -> torch.Tensor:
    """0-d float32: the largest |entry| of a product with grad (NaN where it holds one)."""
    return product.abs().amax().float()


class _ScaleGuard:
    """The matrix the range finder works on, ``a = grad / scale`` (scale a power of two), the
    magnitude check of its products and the count of passes over grad: ``ScaleGuard`` in
    csrc/cpu/denoise.cpp (PRODUCT_FLOOR, PRODUCT_CEILING: csrc/constants.h)."""

    def __init__(self, a: torch.Tensor, a_in: torch.Tensor):
        self.a, self.a_in = a, a_in
        self.scale = 1.0
        self.passes = 0
        self.checked = False

    def accept(self, tops: list[float]) -> bool:
        """Whether the range finder may go on from products whose largest entries are ``tops``
        (read at a host synchronisation); otherwise :meth:`check`. NaN fails the comparison."""
        if self.checked or all(PRODUCT_FLOOR <= t <= PRODUCT_CEILING for t in tops):
            return True
        return self.check()

    def check(self) -> bool:
        """Read grad's largest entry once: NaN or Inf raises. Unless ``[top, top sqrt(m n)]``, the
        range of ``||A||_2`` it bounds, lies in ``[sqrt(PRODUCT_FLOOR), sqrt(PRODUCT_CEILING)]``,
        ``a`` becomes grad times the power of two that puts it in [1, 2). False when ``a``
        changed (start again)."""
        if self.checked:
            return True
        self.checked = True
        lo, hi = torch.aminmax(self.a)
        lo, hi = torch.stack([lo, hi]).tolist()
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("denoise: grad contains NaN or Inf")
        top = max(-lo, hi)
        bound = top * math.sqrt(self.a.shape[1] * self.a.shape[2])
        if top == 0.0 or (top >= math.sqrt(PRODUCT_FLOOR) and bound <= math.sqrt(PRODUCT_CEILING)):
            return True
        e = math.frexp(top)[1] - 1  # top = f 2^e, f in [1, 2)
        if e == 0:
            return True
        # In float64: 2^-e reaches 2^149 (a subnormal grad), past float32's range.
        self.a = (self.a.double() * math.ldexp(1.0, -e)).float()
        self.a_in = self.a
        self.scale = math.ldexp(1.0, e)
        return False


def _exact(a):
    """The exact SVD of ``a`` (b, m, n) as ``(left, values, right, basis, left_scaled)`` (see
    :func:`_krylov_range`), from the Gram eigenproblem of its smaller side."""
    if a.shape[1] >= a.shape[2]:
        values, v = gram_svd(a)  # a = u diag(values) v^T
        left = a @ v
        return left, values, v, orthonormal_block(left), True
    values, u = gram_svd(a.mT)  # a^T = v diag(values) u^T
    return u, values, a.mT @ u, u, False


def _krylov_range(guard: _ScaleGuard, start, rank, oversample, niter, sh: _Shrink, seed):
    """The range finder of ``krylov_range`` in csrc/cpu/denoise.cpp on ``guard.a`` (b, m, n)
    float32 (``guard.a_in``: the same in the caller's dtype, which the sketch kernel reads
    directly), with its exact SVD once the basis would hold min(m, n) columns.

    Returns ``(left, values, right, basis, left_scaled)``: Ritz triplets as
    :func:`shrink_reconstruct` takes them (one of left, right orthonormal, the other's columns
    of norms ``values``: left when ``left_scaled``); ``basis`` orthonormal left Ritz vectors of
    the Krylov basis. None where the guard rescaled the matrix (call again).
    """
    a, a_in = guard.a, guard.a_in
    b, m, n = a.shape
    full = min(m, n)
    k0_in = 0 if start is None else start.shape[2]
    k = rank if rank > 0 else min(max(INITIAL_RANK, k0_in), full)
    generator = torch.Generator(device=a.device).manual_seed(seed)
    first_round = True
    while True:
        k0 = 0 if start is None else start.shape[2]
        width = min(max(k + oversample, k0), full)
        if first_round and k0 > 0 and rank < 0:
            # A caller's warm start: fresh columns fill the block up to 2 INITIAL_RANK, at least
            # oversample - BASIS_MARGIN, at most oversample (as the CPU kernel).
            fresh = min(max(2 * INITIAL_RANK - k0, max(oversample - BASIS_MARGIN, 0)), oversample)
            width = min(max(k0 + fresh, k), full)
        first_round = False
        exact = width >= full
        found = None
        if not exact:
            fresh = width - k0
            # Largest entries of the products not checked yet (read at the next synchronisation;
            # NaN/Inf are zeroed meanwhile so that no solver sees them).
            tops = []
            if fresh > 0 and k0 == 0:
                block = gaussian_sketch(a_in, fresh, seed)
                guard.passes += 1
                tops.append(_top(block))
                block = torch.nan_to_num(block, nan=0.0, posinf=0.0, neginf=0.0)
            elif fresh > 0:
                noise = torch.randn(b, m, fresh, generator=generator, device=a.device)
                block = torch.cat([start, noise], 2)
            else:
                block = start
            min_passes = 1 if k0 > 0 else COLD_PASSES
            q = q_last = orthonormal_block(block)
            mz = am = m64 = am64 = g1 = g2 = None
            pass_ = 0
            while True:
                pass_ += 1
                z = a.mT @ q_last
                guard.passes += 1
                mz = z if mz is None else torch.cat([mz, z], 2)
                if niter >= 0 and pass_ >= niter + 1:
                    if not guard.accept(torch.stack([*tops, _top(z)]).tolist()):
                        return None
                    break
                last = niter < 0 and pass_ >= MAX_ADAPTIVE_PASSES
                y = a @ z
                guard.passes += 1
                tops.append(_top(y))
                am = y if am is None else torch.cat([am, y], 2)
                z64, y64 = z.double(), y.double()
                g1, g2 = _grow_gram(g1, m64, z64), _grow_gram(g2, am64, y64)
                m64 = z64 if m64 is None else torch.cat([m64, z64], 2)
                am64 = y64 if am64 is None else torch.cat([am64, y64], 2)
                stop = torch.zeros((), dtype=torch.bool, device=a.device)
                la = None
                if niter < 0 and (last or pass_ >= min_passes):
                    la = _look_ahead(
                        *(torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) for g in (g1, g2))
                    )
                    stop = stop | last | _settled(la, sh, k0 == 0 or pass_ == 1)
                *top_values, stop_now = torch.stack([*tops, stop.float()]).tolist()
                tops = []
                if not guard.accept(top_values):
                    return None
                if stop_now:
                    _s_now, e, s_ahead, _x, cx = la
                    cx32 = cx.float()
                    found = (am @ cx32, s_ahead.float(), mz @ cx32, q @ e.float(), True)
                    break
                if mz.shape[2] + y.shape[2] >= full:
                    exact = True
                    break
                q_last = next_krylov_block(q, y)
                q = torch.cat([q, q_last], 2)
            if found is None and not exact:
                # P_Q A = Q M^T; M = V S Wb^T from the Gram matrix of M: left Q Wb, right M Wb.
                values, wb = gram_svd(mz)
                left = q @ wb
                found = (left, values, mz @ wb, left, False)
        if exact:
            if not guard.check():
                return None
            found = _exact(a)
            guard.passes += 1
        values, basis = found[1], found[3]
        if rank > 0 or values.shape[1] >= full or k >= full:
            break
        if not bool((values[:, k - 1] <= sh.threshold).all()):
            start = basis[:, :, : min(k, basis.shape[2])].contiguous()
            k = min(2 * k, full)
            continue
        break
    return found


def _denoise_device(grad, sigma, start, options: DenoiseOpOptions):
    """rmt::denoise_warm on checked arguments (``start``: the caller's basis, scaled, or None);
    returns (estimate, new basis, passes as an int)."""
    rank, norm, shrinker = options.rank, options.norm, options.shrinker
    batched = grad.dim() == 3
    a_in = grad if batched else grad.unsqueeze(0)
    # a_in.float(): a view for float32 input; GEMMs take any strides
    guard = _ScaleGuard(a_in.float(), a_in)
    _b, m, n = a_in.shape
    p, q = min(m, n), max(m, n)
    found = None
    while found is None:
        # In units of the matrix the range finder works on (grad / scale).
        sigma_a = sigma / guard.scale
        sh = _Shrink(p, q, sigma_a, options.kappa, shrinker)
        found = _krylov_range(
            guard, start, rank, options.oversample, options.niter, sh, options.seed
        )
    left, values, right, basis, left_scaled = found
    a = guard.a
    # left_scaled: left = AM C X or A V (norms values), right orthonormal; otherwise left
    # orthonormal, right = M Wb or A^T U (norms values). Either way out = left diag(eta / s)
    # right^T.
    eta = sh(values)
    if rank > 0:
        eta[:, rank:] = 0.0
    above = int((eta > 0).sum(1).max())
    width = values.shape[1]
    # The returned basis: the estimate's own left vectors, orthonormalised, kept ones first; a
    # column without a direction (value ~ 0) takes the Krylov basis's instead.
    k_basis = min(above + BASIS_MARGIN, width)
    unit = left[:, :, :k_basis]
    if left_scaled:
        unit = unit / values[:, :k_basis].clamp_min(1e-30).unsqueeze(1)
    usable = (values[:, :k_basis] > 1e-6 * values[:, :1]) & (values[:, :1] > 0)
    new_basis = orthonormal_block(torch.where(usable.unsqueeze(1), unit, basis[:, :, :k_basis]))
    out = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
    if above == 0:  # fast path: nothing above the edge, no reconstruction
        out.zero_()
    else:
        target = None
        if norm != "none":
            target = target_norm(a.double().square().sum((1, 2)), p, q, sigma_a, norm).float()
        left, right = left[:, :, :above], right[:, :, :above]
        if guard.scale != 1.0:
            # Back to grad's units through the orthonormal factor (entries <= 1, so times a
            # power of two up to 2^127 they stay finite; a float32 product, exact).
            if left_scaled:
                right = right * guard.scale
            else:
                left = left * guard.scale
        shrink_reconstruct(
            left,
            right,
            values[:, :above].contiguous(),
            out if batched else out.unsqueeze(0),
            noise_scale=sh.noise_scale,
            beta=sh.beta,
            shrinker=shrinker,
            keep=min(above, rank) if rank > 0 else above,
            target=target,
        )
    if not batched:
        new_basis = new_basis.squeeze(0)
    return out, new_basis, guard.passes


def denoise_triton(grad: torch.Tensor, sigma: float, **options: Any) -> torch.Tensor:
    """Same contract as :func:`rmt_kernels.denoise` (``options``: its keyword options, as the
    dispatcher passes them), computed on grad's device."""
    checked = DenoiseOpOptions(**options)
    checked.check(grad, sigma, check_seed=False)
    return _denoise_device(grad, sigma, None, checked)[0]


def denoise_warm_triton(
    grad: torch.Tensor, sigma: float, basis: torch.Tensor, *options: Any, **named_options: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as :func:`rmt_kernels.denoise_warm` (the options positional in the
    schema's order or by name, as the dispatcher passes them), computed on grad's device."""
    checked = DenoiseOpOptions(*options, **named_options)
    checked.check(grad, sigma, check_seed=False)
    check_denoise_basis(grad, basis)
    start = None
    if basis.shape[-1] > 0:
        if not bool(torch.isfinite(basis).all()):
            raise ValueError("denoise_warm: basis contains NaN or Inf")
        start = basis if grad.dim() == 3 else basis.unsqueeze(0)
        # Each column divided by its largest entry (only its direction counts; the Gram
        # matrices of the orthonormalisation hold squares).
        top = start.abs().amax(1, keepdim=True)
        start = torch.where(top > 0, start / top, 0.0).contiguous()
    out, new_basis, passes = _denoise_device(grad, sigma, start, checked)
    return out, new_basis, torch.tensor(passes, dtype=torch.int64, device=grad.device)
