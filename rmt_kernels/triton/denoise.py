"""rmt::denoise and rmt::denoise_warm on a device: the block Krylov range finder of
csrc/cpu/denoise.cpp in torch (GEMMs, CholeskyQR2, small float64 eigenproblems), with Triton
kernels for the two steps that touch the matrix elementwise: the Gaussian sketch of a cold start
and shrink + reconstruct.

Same steps, constants and stopping rule as the CPU kernel (csrc/constants.h, read through
rmt_kernels._C); the random streams differ (Philox here, the CPU generator there), so the two
agree to the accuracy of the range finder, not bit for bit. One host synchronisation per pass
reads the stopping decision (with the NaN/Inf check in the first), one more the rank decision.
"""

from __future__ import annotations

import math

import torch

from rmt_kernels import _C
from rmt_kernels._checks import check_denoise_arguments, check_denoise_basis
from rmt_kernels.linalg import gram_svd, next_krylov_block, orthonormal_block
from rmt_kernels.shrinkage import shrink_singular_values, target_norm
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
    y = s_ahead / sh.noise_scale
    t = y * y - (sh.beta + 1.0)
    x2 = (t + (t * t - 4.0 * sh.beta).clamp_min(0.0).sqrt()) * 0.5
    eta_f = sh(s_ahead, "frobenius") / sh.noise_scale
    loss = torch.where(eta_f > 0, (x2 - eta_f * eta_f).clamp_min(0.0), 0.0)
    scale = (loss.sum(1) + 1.0) * sh.noise_scale**2
    return (change <= RITZ_TOLERANCE**2 * scale).all()


def _grow_gram(gram, old_cols, cols):
    diag = cols.mT @ cols
    if gram is None:
        return diag
    off = old_cols.mT @ cols
    return torch.cat([torch.cat([gram, off], 2), torch.cat([off.mT, diag], 2)], 1)


def _krylov_range(a, a_in, start, rank, oversample, niter, sh: _Shrink, seed):
    """The range finder of ``krylov_range`` in csrc/cpu/denoise.cpp on ``a`` (b, m, n) float32
    (``a_in``: the same in the caller's dtype, which the sketch kernel reads directly).

    Returns ``(left, values, right, basis, ahead, passes)``: Ritz triplets with
    ``A ~ left diag(1 / values) ... `` as :func:`shrink_reconstruct` takes them (one of left,
    right orthonormal, the other's columns of norms ``values``: left when ``ahead``, the
    estimate half a pass ahead, right otherwise); ``basis`` orthonormal left Ritz vectors of the
    Krylov basis; ``passes`` the products with grad or grad^T.
    """
    b, m, n = a.shape
    full = min(m, n)
    k0_in = 0 if start is None else start.shape[2]
    k = rank if rank > 0 else min(max(INITIAL_RANK, k0_in), full)
    passes, checked = 0, False
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
        fresh = width - k0
        finite = torch.ones((), dtype=torch.bool, device=a.device)
        if fresh > 0 and k0 == 0:
            block = gaussian_sketch(a_in, fresh, seed)
            passes += 1
            finite = torch.isfinite(block).all()
            block = torch.nan_to_num(block, nan=0.0, posinf=0.0, neginf=0.0)
            checked = True
        elif fresh > 0:
            noise = torch.randn(b, m, fresh, generator=generator, device=a.device)
            block = torch.cat([start, noise], 2)
        else:
            block = start
        min_passes = 1 if k0 > 0 else COLD_PASSES
        q = q_last = orthonormal_block(block)
        mz = am = m64 = am64 = g1 = g2 = None
        ahead = None
        pass_ = 0
        while True:
            pass_ += 1
            z = a.mT @ q_last
            passes += 1
            if not checked:
                finite = torch.isfinite(z).all()
                z = torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)
                checked = True
            mz = z if mz is None else torch.cat([mz, z], 2)
            total = mz.shape[2]
            last = (
                total >= full
                or (niter >= 0 and pass_ >= niter + 1)
                or (niter < 0 and pass_ >= MAX_ADAPTIVE_PASSES)
            )
            if last and (niter >= 0 or total >= full):
                if not bool(finite):
                    raise ValueError("denoise: grad contains NaN or Inf")
                break
            y = a @ z
            passes += 1
            am = y if am is None else torch.cat([am, y], 2)
            z64, y64 = z.double(), y.double()
            g1, g2 = _grow_gram(g1, m64, z64), _grow_gram(g2, am64, y64)
            m64 = z64 if m64 is None else torch.cat([m64, z64], 2)
            am64 = y64 if am64 is None else torch.cat([am64, y64], 2)
            stop = torch.zeros((), dtype=torch.bool, device=a.device)
            la = None
            if niter < 0 and (last or pass_ >= min_passes):
                la = _look_ahead(g1, g2)
                stop = stop | last | _settled(la, sh, k0 == 0 or pass_ == 1)
            finite_ok, stop_now = torch.stack([finite, stop]).tolist()
            if not finite_ok:
                raise ValueError("denoise: grad contains NaN or Inf")
            if stop_now:
                _s_now, e, s_ahead, _x, cx = la
                cx32 = cx.float()
                ahead = (am @ cx32, s_ahead.float(), mz @ cx32, q @ e.float())
                break
            nxt = min(y.shape[2], full - total)
            q_last = next_krylov_block(q, y[:, :, :nxt])
            q = torch.cat([q, q_last], 2)
        if ahead is not None:
            left, values, right, basis = ahead
        else:
            # P_Q A = Q M^T; M = V S Wb^T from the Gram matrix of M: left Q Wb, right M Wb.
            values, wb = gram_svd(mz)
            left = basis = q @ wb
            right = mz @ wb
        if rank > 0 or values.shape[1] >= full or k >= full:
            break
        if not bool((values[:, k - 1] <= sh.threshold).all()):
            start = basis[:, :, : min(k, basis.shape[2])].contiguous()
            k = min(2 * k, full)
            continue
        break
    return left, values, right, basis, ahead is not None, passes


def _denoise_device(grad, sigma, start, shrinker, kappa, rank, oversample, niter, norm, seed):
    batched = grad.dim() == 3
    a_in = grad if batched else grad.unsqueeze(0)
    a = a_in.float()  # a view for float32 input; GEMMs take any strides
    _b, m, n = a.shape
    p, q = min(m, n), max(m, n)
    sh = _Shrink(p, q, sigma, kappa, shrinker)
    left, values, right, basis, ahead, passes = _krylov_range(
        a, a_in, start, rank, oversample, niter, sh, seed
    )
    # Ahead: left = AM C X (norms values), right = M C X (orthonormal). Behind: left = Q Wb
    # (orthonormal), right = M Wb (norms values). Either way out = left diag(eta / s) right^T.
    eta = sh(values)
    if rank > 0:
        eta[:, rank:] = 0.0
    above = int((eta > 0).sum(1).max())
    width = values.shape[1]
    # The returned basis: the estimate's own left vectors, orthonormalised, kept ones first; a
    # column without a direction (value ~ 0) takes the Krylov basis's instead.
    k_basis = min(above + BASIS_MARGIN, width)
    unit = left[:, :, :k_basis]
    if ahead:
        unit = unit / values[:, :k_basis].clamp_min(1e-30).unsqueeze(1)
    usable = (values[:, :k_basis] > 1e-6 * values[:, :1]) & (values[:, :1] > 0)
    new_basis = orthonormal_block(torch.where(usable.unsqueeze(1), unit, basis[:, :, :k_basis]))
    out = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
    if above == 0:  # fast path: nothing above the edge, no reconstruction
        out.zero_()
    else:
        target = None
        if norm != "none":
            target = target_norm(a.double().square().sum((1, 2)), p, q, sigma, norm).float()
        shrink_reconstruct(
            left[:, :, :above],
            right[:, :, :above],
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
    return out, new_basis, passes


def denoise_triton(
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
    """Same contract as :func:`rmt_kernels.denoise`, computed on grad's device."""
    check_denoise_arguments(grad, sigma, shrinker, kappa, rank, oversample, niter, norm)
    return _denoise_device(grad, sigma, None, shrinker, kappa, rank, oversample, niter, norm, seed)[
        0
    ]


def denoise_warm_triton(
    grad: torch.Tensor,
    sigma: float,
    basis: torch.Tensor,
    shrinker: str = "frobenius",
    kappa: float = 1.0,
    rank: int = -1,
    oversample: int = 8,
    niter: int = -1,
    norm: str = "none",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as :func:`rmt_kernels.denoise_warm`, computed on grad's device."""
    check_denoise_arguments(grad, sigma, shrinker, kappa, rank, oversample, niter, norm)
    check_denoise_basis(grad, basis)
    start = None
    if basis.shape[-1] > 0:
        if not bool(torch.isfinite(basis).all()):
            raise ValueError("denoise_warm: basis contains NaN or Inf")
        start = (basis if grad.dim() == 3 else basis.unsqueeze(0)).contiguous()
    out, new_basis, passes = _denoise_device(
        grad, sigma, start, shrinker, kappa, rank, oversample, niter, norm, seed
    )
    return out, new_basis, torch.tensor(passes, dtype=torch.int64, device=grad.device)
