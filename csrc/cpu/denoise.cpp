// CPU kernels of rmt::denoise and rmt::denoise_warm: a block Krylov range finder with a stopping
// rule, then Marchenko-Pastur shrinkage. Both ops share every step; denoise is the cold start.
//
// All dense algebra goes through ATen (BLAS/LAPACK). `shrink` below is the C++ copy of the
// shrinker formulas (rmt_kernels/shrinkage.py states them; the Triton copy is `_shrink` in
// rmt_kernels/triton/reconstruct.py); tests/test_shrinkers_agree.py checks the three agree.
// rmt_kernels/linalg.py is the device path's copy of the range finder (same steps, GEMM-based
// orthonormalisation).
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "constants.h"

namespace rmt {
namespace {

enum class Shrinker { kFrobenius, kOperator, kNuclear, kHard };
enum class NormCorrection { kNone, kPreserve, kDebiased };

Shrinker parse_shrinker(const char* op, c10::string_view name) {
  if (name == "frobenius") return Shrinker::kFrobenius;
  if (name == "operator") return Shrinker::kOperator;
  if (name == "nuclear") return Shrinker::kNuclear;
  if (name == "hard") return Shrinker::kHard;
  TORCH_CHECK_VALUE(false, op,
      ": shrinker must be one of 'frobenius', 'operator', 'nuclear', 'hard', got '",
      std::string(name), "'");
}

NormCorrection parse_norm(const char* op, c10::string_view name) {
  if (name == "none") return NormCorrection::kNone;
  if (name == "preserve") return NormCorrection::kPreserve;
  if (name == "debiased") return NormCorrection::kDebiased;
  TORCH_CHECK_VALUE(false, op, ": norm must be one of 'none', 'preserve', 'debiased', got '",
      std::string(name), "'");
}

void check_arguments(const char* op, const at::Tensor& grad, double sigma, double kappa,
    int64_t rank, int64_t oversample, int64_t niter) {
  TORCH_CHECK_VALUE(grad.dim() == 2 || grad.dim() == 3, op,
      ": grad must be a matrix (m, n) or a batch of matrices (b, m, n), got a tensor "
      "with ", grad.dim(), " dimensions");
  for (int64_t d = 0; d < grad.dim(); ++d) {
    TORCH_CHECK_VALUE(grad.size(d) > 0, op,
        ": grad must not have an empty dimension, got shape ", grad.sizes());
  }
  const auto dtype = grad.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
      ": grad must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK_VALUE(std::isfinite(sigma) && sigma > 0, op,
      ": sigma (the per-entry noise std of grad) must be a finite number > 0, got ", sigma);
  TORCH_CHECK_VALUE(std::isfinite(kappa) && kappa > 0, op,
      ": kappa (the multiplier of the bulk edge) must be a finite number > 0, got ", kappa);
  const int64_t full_rank = std::min(grad.size(-2), grad.size(-1));
  TORCH_CHECK_VALUE(rank == -1 || (rank >= 1 && rank <= full_rank), op,
      ": rank must be -1 (adaptive) or between 1 and min(m, n) = ", full_rank, ", got ", rank);
  TORCH_CHECK_VALUE(oversample >= 0, op, ": oversample must be >= 0, got ", oversample);
  TORCH_CHECK_VALUE(niter >= -1 && niter <= kMaxPowerIterations, op,
      ": niter must be -1 (adaptive) or between 0 and ", kMaxPowerIterations, ", got ", niter);
}

// The start basis of denoise_warm: one (m, k) float32 block per matrix, on grad's device,
// k <= min(m, n), finite. The messages are those of rmt_kernels._checks.check_denoise_basis.
void check_basis(const at::Tensor& grad, const at::Tensor& basis) {
  const char* op = "denoise_warm";
  TORCH_CHECK_VALUE(basis.dim() == grad.dim(), op, ": basis must have ", grad.dim(),
      " dimensions like grad (", grad.dim() == 2 ? "(m, k)" : "(b, m, k)", "), got ",
      basis.dim());
  if (grad.dim() == 3) {
    TORCH_CHECK_VALUE(basis.size(0) == grad.size(0), op,
        ": basis must have one block per matrix of grad (", grad.size(0), "), got ",
        basis.size(0));
  }
  TORCH_CHECK_VALUE(basis.size(-2) == grad.size(-2), op,
      ": basis must have m = ", grad.size(-2), " rows (grad's rows), got ", basis.size(-2));
  const int64_t full_rank = std::min(grad.size(-2), grad.size(-1));
  TORCH_CHECK_VALUE(basis.size(-1) <= full_rank, op,
      ": basis must have at most min(m, n) = ", full_rank, " columns, got ", basis.size(-1));
  TORCH_CHECK_TYPE(basis.scalar_type() == at::kFloat, op, ": basis must be float32, got ",
      basis.scalar_type());
  TORCH_CHECK_VALUE(basis.device() == grad.device(), op,
      ": basis must be on grad's device (", grad.device(), "), got ", basis.device());
  TORCH_CHECK_VALUE(basis.numel() == 0 || at::isfinite(basis).all().item<bool>(), op,
      ": basis contains NaN or Inf");
}

// Householder QR through LAPACK: stays orthonormal even when the block is rank-deficient
// (an exactly low-rank or all-zero gradient, a repeated warm-start column), which Cholesky-based
// QR does not.
at::Tensor householder_basis(const at::Tensor& y) {
  return std::get<0>(at::linalg_qr(y, "reduced"));
}

// One shifted CholeskyQR step in float64 (the Gram matrix of a thin block, a w x w Cholesky
// factor, one triangular solve): level-3 BLAS only, where LAPACK's tall Householder QR runs
// panel by panel. The shift lets the factorisation succeed on (nearly) dependent columns; the
// caller checks the result and falls back to Householder QR there.
at::Tensor cholesky_qr_step(const at::Tensor& y64) {
  const at::Tensor gram = at::matmul(y64.transpose(1, 2), y64);
  const at::Tensor shift = 1e-12 * gram.diagonal(0, 1, 2).sum(1) + 1e-300;
  const at::Tensor eye = at::eye(gram.size(1), gram.options());
  const at::Tensor lower =
      std::get<0>(at::linalg_cholesky_ex(gram + shift.view({-1, 1, 1}) * eye));
  // y L^-T, as the transpose of L^-1 y^T.
  return at::linalg_solve_triangular(lower, y64.transpose(1, 2), /*upper=*/false)
      .transpose(1, 2);
}

// Whether every column of a block has unit norm: what CholeskyQR gives unless the block had
// (nearly) dependent columns.
bool unit_columns(const at::Tensor& q64) {
  return ((q64.square().sum(1) - 1.0).abs() < 1e-6).all().item<bool>();
}

// An orthonormal basis of the columns of y (b, m, w), float32: CholeskyQR2 (Fukaya et al. 2014),
// or Householder QR where y's columns are (nearly) dependent. Where y's columns are orthonormal
// already it returns them (CholeskyQR's R has a positive diagonal).
at::Tensor orthonormal_basis(const at::Tensor& y) {
  const at::Tensor q64 = cholesky_qr_step(cholesky_qr_step(y.to(at::kDouble)));
  if (!unit_columns(q64)) return householder_basis(y);
  return q64.to(at::kFloat);
}

// Shrunk singular values; zero at or below the threshold kappa * bulk edge. noise_scale is
// kappa * sigma * sqrt(q): the shrinkers are evaluated at the kappa-scaled noise level, so they
// stay continuous (zero) at the threshold for every kappa.
at::Tensor shrink(const at::Tensor& s, double noise_scale, double beta, Shrinker shrinker) {
  const at::Tensor y = s / noise_scale;
  const at::Tensor t = y * y - (beta + 1.0);
  const at::Tensor root = (t * t - 4.0 * beta).clamp_min(0.0).sqrt();
  at::Tensor shrunk;
  switch (shrinker) {
    case Shrinker::kFrobenius:
      shrunk = root / y;
      break;
    case Shrinker::kOperator:
      shrunk = ((t + root) * 0.5).clamp_min(0.0).sqrt();
      break;
    case Shrinker::kNuclear: {
      const at::Tensor x = ((t + root) * 0.5).clamp_min(0.0).sqrt();
      shrunk = (x.pow(4) - std::sqrt(beta) * x * y - beta).clamp_min(0.0) / (x * x * y);
      break;
    }
    case Shrinker::kHard:
      shrunk = y;
      break;
  }
  const at::Tensor above = y > (1.0 + std::sqrt(beta));
  return at::where(above, shrunk * noise_scale, at::zeros_like(shrunk));
}

// A ~ left diag(values) right^T: Rayleigh-Ritz triplets, values descending, left (b, m, W) and
// right (b, n, W). `basis` (b, m, W): orthonormal left Ritz vectors of the Krylov basis (equal
// to `left` where the estimate is the basis's own, close to it where it is the one ahead).
struct Ritz {
  at::Tensor left, values, right, basis;
  int64_t passes = 0;
};

// Products of the blocks so far, kept in float64 as they grow: G1 = M^T M and G2 = (AM)^T (AM),
// M = A^T Q = [Z_0 .. Z_j], AM = [Y_1 .. Y_{j+1}] (Y_{i+1} = A Z_i).
at::Tensor grow_gram(const at::Tensor& gram, const at::Tensor& old_cols, const at::Tensor& cols) {
  const at::Tensor diag = at::matmul(cols.transpose(1, 2), cols);
  if (!gram.defined()) return diag;
  const at::Tensor off = at::matmul(old_cols.transpose(1, 2), cols);  // (b, W, w)
  return at::cat({at::cat({gram, off}, 2), at::cat({off.transpose(1, 2), diag}, 2)}, 1);
}

// The two estimates of a pass from G1 and G2 alone (float64, b x W x W).
// now:   P_Q A, whose SVD is M = V_L diag(s_L) E^T (E, s_L^2 the eigenpairs of G1).
// ahead: A P_V, V = orth(M) = M C, C = E diag(1 / s_L) (directions under kDirectionFloor left
//        out); its SVD is A V = (AM C X diag(1 / s_R)) diag(s_R) X^T with X, s_R^2 the eigenpairs
//        of C^T G2 C. So V_L^T V_R = X and U_L^T U_R = diag(s_L) X diag(1 / s_R), and
//        <now, ahead>_F = sum_ij eta_L,i s_L,i X_ij^2 eta_R,j / s_R,j needs no tall product.
struct Lookahead {
  at::Tensor s_now, e, s_ahead, x, cx;  // (b, W), (b, W, W), (b, W), (b, W, W), C X
};

Lookahead look_ahead(const at::Tensor& g1, const at::Tensor& g2) {
  auto [lam, e] = at::linalg_eigh(g1);
  lam = lam.flip(1).clamp_min(0.0);
  e = e.flip(2);
  const at::Tensor s_now = lam.sqrt();
  const at::Tensor top = s_now.narrow(1, 0, 1);
  const at::Tensor inv =
      at::where(s_now > kDirectionFloor * top, 1.0 / s_now.clamp_min(1e-300), at::zeros_like(s_now));
  const at::Tensor c = e * inv.unsqueeze(1);
  auto [mu, x] = at::linalg_eigh(at::matmul(at::matmul(c.transpose(1, 2), g2), c));
  x = x.flip(2);
  return {s_now, e, mu.flip(1).clamp_min(0.0).sqrt(), x, at::matmul(c, x)};
}

// Whether the pass is final (the rule of kRitzTolerance in csrc/constants.h), in every matrix.
bool settled(const Lookahead& la, double noise_scale, double beta, Shrinker shrinker, bool guard) {
  const double threshold = noise_scale * (1.0 + std::sqrt(beta));
  const at::Tensor &s_now = la.s_now, &s_ahead = la.s_ahead;
  const at::Tensor eta_now = shrink(s_now, noise_scale, beta, shrinker);
  const at::Tensor eta_ahead = shrink(s_ahead, noise_scale, beta, shrinker);
  const at::Tensor& x = la.x;
  const at::Tensor weight_ahead =
      at::where(eta_ahead > 0, eta_ahead / s_ahead.clamp_min(1e-300), at::zeros_like(eta_ahead));
  const at::Tensor cross =
      at::matmul(at::matmul((eta_now * s_now).unsqueeze(1), x.square()), weight_ahead.unsqueeze(2))
          .squeeze(2)
          .squeeze(1);
  at::Tensor change = (eta_now.square().sum(1) + eta_ahead.square().sum(1) - 2.0 * cross)
                          .clamp_min(0.0);
  // Values still rising toward the threshold count with the shrunk value they would reach.
  const at::Tensor projected = s_ahead + kRiseSteps * (s_ahead - s_now);
  const at::Tensor rising = (s_ahead >= kRitzWindow * threshold) & (s_ahead <= threshold) &
                            (projected > (1.0 + kRiseMargin) * threshold) & guard;
  const at::Tensor potential = at::where(
      rising, shrink(projected, noise_scale, beta, shrinker), at::zeros_like(projected));
  change = change + potential.square().sum(1);
  // Error scale of the exact Frobenius shrinker: per kept component x^2 - eta^2 (x the debiased
  // value), in units of noise_scale^2, plus one noise component.
  const at::Tensor y = s_ahead / noise_scale;
  const at::Tensor t = y * y - (beta + 1.0);
  const at::Tensor x2 = (t + (t * t - 4.0 * beta).clamp_min(0.0).sqrt()) * 0.5;
  const at::Tensor eta_f = shrink(s_ahead, noise_scale, beta, Shrinker::kFrobenius) / noise_scale;
  const at::Tensor loss = at::where(eta_f > 0, (x2 - eta_f * eta_f).clamp_min(0.0),
      at::zeros_like(x2));
  const at::Tensor scale = (loss.sum(1) + 1.0) * (noise_scale * noise_scale);
  return (change <= kRitzTolerance * kRitzTolerance * scale).all().item<bool>();
}

// A NaN or Inf anywhere in grad reaches its row of a product with grad (0 * NaN is NaN):
// checking the first thin product costs a fraction of a pass and keeps LAPACK away from NaN.
// Returns true (the check is done) or raises.
bool check_is_finite(const at::Tensor& product) {
  TORCH_CHECK_VALUE(at::isfinite(product).all().item<bool>(), "denoise: grad contains NaN or Inf");
  return true;
}

// The next Krylov block: y orthonormalised against q (b, m, W) and within itself. Block
// classical Gram-Schmidt twice, CholeskyQR2, and once more against q (a block with nearly
// dependent columns amplifies what is left of q in it). Where a column lost most of its norm to
// q (the Krylov space is exhausted: an exactly low-rank grad) or the result is not orthonormal,
// a Householder QR of [q, y] instead, which stays orthonormal whatever y holds.
at::Tensor next_block(const at::Tensor& q, const at::Tensor& y) {
  const at::Tensor qt = q.transpose(1, 2);
  at::Tensor r = y - at::matmul(q, at::matmul(qt, y));
  r = r - at::matmul(q, at::matmul(qt, r));
  if ((r.norm(2, {1}) >= 1e-2 * y.norm(2, {1})).all().item<bool>()) {
    const at::Tensor q64 = q.to(at::kDouble);
    at::Tensor b64 = cholesky_qr_step(cholesky_qr_step(r.to(at::kDouble)));
    b64 = b64 - at::matmul(q64, at::matmul(q64.transpose(1, 2), b64));
    b64 = cholesky_qr_step(b64);
    if (unit_columns(b64)) return b64.to(at::kFloat);
  }
  return householder_basis(at::cat({q, y}, 2)).narrow(2, q.size(2), y.size(2));
}

// Orthonormal columns that equal `left` (b, m, k) where it already is orthonormal (up to
// rounding). A column whose value is (nearly) zero carries no direction (0 / 0) and is replaced
// by the same column of `fallback`, an orthonormal basis of the same Krylov space.
at::Tensor orthonormal_like(const at::Tensor& left, const at::Tensor& values,
    const at::Tensor& fallback) {
  const at::Tensor top = values.narrow(1, 0, 1);
  const at::Tensor usable = (values > 1e-6 * top) & (top > 0);
  return orthonormal_basis(at::where(usable.unsqueeze(1), left, fallback));
}

// Block Krylov range finder (Musco & Musco 2015) started from `start` (b, m, k0) plus fresh
// columns: Q_0 = orth([start, fresh]), Q_{j+1} = orth(A A^T Q_j) against Q_0..Q_j. Each pass
// multiplies by A^T (Z_j = A^T Q_j) and, unless it is a fixed schedule's last, by A
// (Y_{j+1} = A Z_j). A fixed niter >= 0 takes niter + 1 passes and returns Rayleigh-Ritz on
// span(Q_0..Q_niter); niter = -1 stops on the rule of `settled` and returns the estimate half a
// pass ahead. `passes` counts the products with grad or grad^T (reads of grad).
Ritz krylov_range(const at::Tensor& a, at::Tensor start, int64_t rank, int64_t oversample,
    int64_t niter, double noise_scale, double beta, Shrinker shrinker, uint64_t seed,
    bool check_finite) {
  const double threshold = noise_scale * (1.0 + std::sqrt(beta));
  const int64_t b = a.size(0), m = a.size(1), n = a.size(2);
  const int64_t full = std::min(m, n);
  const at::Tensor a_t = a.transpose(1, 2);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const int64_t k0_in = start.defined() ? start.size(2) : 0;
  int64_t k = rank > 0 ? rank : std::min(std::max(kInitialRank, k0_in), full);
  Ritz est;
  for (;;) {
    const int64_t k0 = start.defined() ? start.size(2) : 0;
    const int64_t width = std::min(std::max(k + oversample, k0), full);
    const int64_t fresh = width - k0;
    // Fresh columns. A cold start sketches, A Omega (Halko, Martinsson & Tropp 2011): one
    // product with grad, after which its first pass is the classic randomized SVD. A warm start
    // already holds grad's main directions (the last step's), so its fresh columns are plain
    // Gaussian vectors: the passes turn them into a search for new directions, and the start
    // costs no product.
    at::Tensor block;
    if (fresh > 0 && k0 == 0) {
      block = at::matmul(a, at::randn({b, n, fresh}, gen, a.options()));
      ++est.passes;
      check_finite = check_finite && !check_is_finite(block);
    } else if (fresh > 0) {
      block = at::cat({start, at::randn({b, m, fresh}, gen, a.options())}, 2);
    } else {
      block = start;
    }
    const int64_t min_passes = k0 > 0 ? 1 : kColdPasses;
    at::Tensor q = orthonormal_basis(block), q_last = q;
    at::Tensor mz, am, m64, am64, g1, g2;  // M, AM and their float64 copies and Gram matrices
    bool ahead = false;
    for (int64_t pass = 1;; ++pass) {
      const at::Tensor z = at::matmul(a_t, q_last);  // (b, n, w)
      ++est.passes;
      check_finite = check_finite && !check_is_finite(z);
      mz = mz.defined() ? at::cat({mz, z}, 2) : z;
      const int64_t total = mz.size(2);
      const bool last = total >= full ||  // the whole column space: exact
                        (niter >= 0 && pass >= niter + 1) ||
                        (niter < 0 && pass >= kMaxAdaptivePasses);
      if (last && (niter >= 0 || total >= full)) break;
      const at::Tensor y = at::matmul(a, z);  // A A^T Q_j: the next block and the look ahead
      ++est.passes;
      am = am.defined() ? at::cat({am, y}, 2) : y;
      const at::Tensor z64 = z.to(at::kDouble), y64 = y.to(at::kDouble);
      g1 = grow_gram(g1, m64, z64);
      g2 = grow_gram(g2, am64, y64);
      m64 = m64.defined() ? at::cat({m64, z64}, 2) : z64;
      am64 = am64.defined() ? at::cat({am64, y64}, 2) : y64;
      if (niter < 0 && (last || pass >= min_passes)) {
        const Lookahead la = look_ahead(g1, g2);
        // A warm start watches for rising values in its first pass only: there they are the
        // start basis's components that the new noise pushed under the threshold. Later, its
        // fresh columns rise through the window as any search does; a new component that
        // crosses the threshold still shows in the estimates' difference.
        const bool guard = k0 == 0 || pass == 1;
        if (last || settled(la, noise_scale, beta, shrinker, guard)) {
          // The estimate half a pass ahead: left AM C X / s_R, right M C X (float32 products
          // with small float64 factors). The basis for the next call: Q E, orthonormal.
          const at::Tensor cx = la.cx.to(at::kFloat);
          const at::Tensor s = la.s_ahead.to(at::kFloat);
          est.values = s;
          est.right = at::matmul(mz, cx);
          est.left = at::matmul(am, cx) / s.clamp_min(1e-30).unsqueeze(1);
          est.basis = at::matmul(q, la.e.to(at::kFloat));
          ahead = true;
          break;
        }
      }
      const int64_t next = std::min(y.size(2), full - total);
      q_last = next_block(q, y.narrow(2, 0, next));
      q = at::cat({q, q_last}, 2);
    }
    if (!ahead) {
      // P_Q A = Q (A^T Q)^T; the SVD of A^T Q = V S Wb^T gives A ~ (Q Wb) S V^T.
      auto [v, values, wh] = at::linalg_svd(mz, /*full_matrices=*/false);
      est.left = at::matmul(q, wh.transpose(1, 2));
      est.values = values;
      est.right = v;
      est.basis = est.left;
    }
    if (rank > 0 || est.values.size(1) >= full || k >= full) break;
    // Adaptive rank: done once the k-th value of every matrix is at or below the threshold, so
    // every component above it was found with `oversample` columns to spare. Otherwise start
    // again, twice as wide, from what was found (a warm start).
    if ((est.values.select(1, k - 1) <= threshold).all().item<bool>()) break;
    start = est.basis.narrow(2, 0, std::min(k, est.basis.size(2))).contiguous();
    k = std::min(2 * k, full);
  }
  return est;
}

struct Options {
  double sigma, kappa;
  Shrinker shrinker;
  NormCorrection norm;
  int64_t rank, oversample, niter, seed;
};

// Shared body of both ops. grad (m, n) or (b, m, n); start (b, m, k0) or undefined.
// Returns (estimate like grad, new basis (b, m, k') if want_basis, passes).
std::tuple<at::Tensor, at::Tensor, int64_t> denoise_impl(const at::Tensor& grad,
    const at::Tensor& start, const Options& o, bool want_basis) {
  const bool batched = grad.dim() == 3;
  const at::Tensor a = (batched ? grad : grad.unsqueeze(0)).to(at::kFloat);
  const int64_t m = a.size(1), n = a.size(2);
  const int64_t p = std::min(m, n), q = std::max(m, n);
  const double beta = static_cast<double>(p) / static_cast<double>(q);
  const double noise_scale = o.kappa * o.sigma * std::sqrt(static_cast<double>(q));
  const double threshold = noise_scale * (1.0 + std::sqrt(beta));

  const Ritz est = krylov_range(a, start, o.rank, o.oversample, o.niter, noise_scale, beta,
      o.shrinker, static_cast<uint64_t>(o.seed), /*check_finite=*/true);
  const int64_t width = est.values.size(1);

  at::Tensor eta = shrink(est.values, noise_scale, beta, o.shrinker);
  if (o.rank > 0 && width > o.rank) eta.narrow(1, o.rank, width - o.rank).zero_();
  if (o.norm != NormCorrection::kNone) {
    const at::Tensor grad_sq = a.square().sum({1, 2}, false, at::kDouble);
    const at::Tensor target = o.norm == NormCorrection::kPreserve
        ? grad_sq.sqrt()
        : (grad_sq - o.sigma * o.sigma * static_cast<double>(p * q)).clamp_min(0.0).sqrt();
    const at::Tensor estimate = eta.to(at::kDouble).square().sum(1).sqrt();
    // ||U diag(eta) V^T||_F = ||eta||_2, so the rescale needs no reconstruction. An estimate of
    // zero stays zero: there is no direction to give the target norm to.
    const at::Tensor factor =
        at::where(estimate > 0, target / estimate.clamp_min(1e-300), at::zeros_like(estimate));
    eta = eta * factor.unsqueeze(1).to(at::kFloat);
  }

  // Only components up to the last one kept in any matrix are reconstructed.
  const at::Tensor kept_columns = (eta > 0).any(0).nonzero();
  const int64_t kept = kept_columns.numel() == 0 ? 0 : kept_columns.max().item<int64_t>() + 1;
  // The next call's start: the estimate's own left vectors (orthonormalised: those of the
  // estimate ahead are only up to rounding), kept components first.
  at::Tensor new_basis;
  if (want_basis) {
    const int64_t k = std::min(kept + kBasisMargin, width);
    new_basis = orthonormal_like(est.left.narrow(2, 0, k), est.values.narrow(1, 0, k),
        est.basis.narrow(2, 0, k));
  }
  // Fast path for the common DP case: nothing above the edge, so no reconstruction.
  if (kept == 0) {
    return {at::zeros(grad.sizes(), grad.options().memory_format(at::MemoryFormat::Contiguous)),
        new_basis, est.passes};
  }
  const at::Tensor left = est.left.narrow(2, 0, kept) * eta.narrow(1, 0, kept).unsqueeze(1);
  at::Tensor out = at::matmul(left, est.right.narrow(2, 0, kept).transpose(1, 2));
  if (!batched) out = out.squeeze(0);
  return {out.to(grad.scalar_type()).contiguous(), new_basis, est.passes};
}

at::Tensor denoise_cpu(const at::Tensor& grad, double sigma, c10::string_view shrinker,
    double kappa, int64_t rank, int64_t oversample, int64_t niter, c10::string_view norm,
    int64_t seed) {
  check_arguments("denoise", grad, sigma, kappa, rank, oversample, niter);
  const Options o{sigma, kappa, parse_shrinker("denoise", shrinker), parse_norm("denoise", norm),
      rank, oversample, niter, seed};
  return std::get<0>(denoise_impl(grad, at::Tensor(), o, /*want_basis=*/false));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> denoise_warm_cpu(const at::Tensor& grad,
    double sigma, const at::Tensor& basis, c10::string_view shrinker, double kappa, int64_t rank,
    int64_t oversample, int64_t niter, c10::string_view norm, int64_t seed) {
  check_arguments("denoise_warm", grad, sigma, kappa, rank, oversample, niter);
  check_basis(grad, basis);
  const Options o{sigma, kappa, parse_shrinker("denoise_warm", shrinker),
      parse_norm("denoise_warm", norm), rank, oversample, niter, seed};
  at::Tensor start;
  if (basis.size(-1) > 0) start = (grad.dim() == 3 ? basis : basis.unsqueeze(0)).contiguous();
  auto [out, new_basis, passes] = denoise_impl(grad, start, o, /*want_basis=*/true);
  if (grad.dim() == 2) new_basis = new_basis.squeeze(0);
  return {out, new_basis, at::scalar_tensor(passes, grad.options().dtype(at::kLong))};
}

}  // namespace

TORCH_LIBRARY_IMPL(rmt, CPU, m) {
  m.impl("denoise", &denoise_cpu);
  m.impl("denoise_warm", &denoise_warm_cpu);
}

}  // namespace rmt
