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
at::Tensor orthonormal_basis(const at::Tensor& y) {
  return std::get<0>(at::linalg_qr(y, "reduced"));
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
// right (b, n, W) with orthonormal columns.
struct Ritz {
  at::Tensor left, values, right;
  int64_t passes = 0;
};

// Relative size below which a direction of M = A^T Q is dropped when the values half a pass
// ahead are computed: A applied to it would be float32 rounding divided by a tiny number.
constexpr double kDirectionFloor = 1e-4;

// Singular values (b, W) of A P_V, V = orth(M), from M (b, n, W) and AM = A M (b, m, W): the
// Rayleigh-Ritz values of the right Krylov space, half a pass ahead of those of Q. Only compared
// with the estimate's values (never used for the estimate), so values are enough.
at::Tensor values_ahead(const at::Tensor& m, const at::Tensor& am) {
  const at::Tensor m64 = m.to(at::kDouble);
  auto [evals, evecs] = at::linalg_eigh(at::matmul(m64.transpose(1, 2), m64));
  const at::Tensor s = evals.clamp_min(0.0).sqrt();  // ascending
  const at::Tensor top = std::get<0>(s.max(1, true));
  const at::Tensor inv = at::where(s > kDirectionFloor * top, 1.0 / s.clamp_min(1e-300),
      at::zeros_like(s));
  const at::Tensor av = at::matmul(am.to(at::kDouble), evecs * inv.unsqueeze(1));
  return at::linalg_svdvals(av).to(at::kFloat);
}

// Whether the estimate's values `now` (b, W) and those half a pass ahead agree on what matters,
// in every matrix of the batch:
// - the shrunk values moved by at most kRitzTolerance * noise_scale in norm (a component that
//   crosses the threshold moves them by its whole shrunk value), and
// - no value within kRitzWindow below the threshold is still rising by more than
//   kRitzTolerance (relative): a component about to cross it.
bool settled(const at::Tensor& now, const at::Tensor& ahead, double threshold,
    double noise_scale, double beta, Shrinker shrinker) {
  const int64_t r = std::min(now.size(1), ahead.size(1));
  const at::Tensor a = ahead.narrow(1, 0, r), n = now.narrow(1, 0, r);
  const at::Tensor moved = (shrink(a, noise_scale, beta, shrinker) -
                               shrink(n, noise_scale, beta, shrinker))
                               .square()
                               .sum(1)
                               .sqrt();
  if ((moved > kRitzTolerance * noise_scale).any().item<bool>()) return false;
  const at::Tensor rising = (a >= kRitzWindow * threshold) & (a <= threshold) &
                            ((a - n) > kRitzTolerance * a);
  return !rising.any().item<bool>();
}

// A NaN or Inf anywhere in grad reaches its row of a product with grad (0 * NaN is NaN):
// checking the first thin product costs a fraction of a pass and keeps LAPACK away from NaN.
// Returns true (the check is done) or raises.
bool check_is_finite(const at::Tensor& product) {
  TORCH_CHECK_VALUE(at::isfinite(product).all().item<bool>(), "denoise: grad contains NaN or Inf");
  return true;
}

// Block Krylov range finder (Musco & Musco 2015) started from `start` (b, m, k0) plus fresh
// Gaussian columns: Q_0 = orth([start, G]), Q_{j+1} = orth(A A^T Q_j) against Q_0..Q_j, and after
// each pass the Rayleigh-Ritz triplets of A on span(Q_0..Q_j) (the SVD of A^T [Q_0..Q_j]). A fixed
// niter >= 0 takes niter + 1 passes; niter = -1 stops on the rule of `settled`. `passes` counts
// the products with grad or grad^T (reads of grad): a cold start's sketch, then per pass one
// with grad^T and (but for a last fixed pass) one with grad.
Ritz krylov_range(const at::Tensor& a, at::Tensor start, int64_t rank, int64_t oversample,
    int64_t niter, double noise_scale, double beta, Shrinker shrinker, uint64_t seed,
    bool check_finite) {
  const double threshold = noise_scale * (1.0 + std::sqrt(beta));
  const int64_t b = a.size(0), m = a.size(1), n = a.size(2);
  const int64_t full = std::min(m, n);
  const at::Tensor at_ = a.transpose(1, 2);
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
    // Gaussian vectors: the Krylov passes turn them into a search for new directions, and the
    // start costs no product.
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
    // A cold start's first passes look at a random subspace: a component just above the
    // threshold has not shown yet, so the rule starts to apply after kColdPasses.
    const int64_t min_passes = k0 > 0 ? 1 : kColdPasses;
    std::vector<at::Tensor> qs{orthonormal_basis(block)}, zs, ys;
    for (int64_t pass = 1;; ++pass) {
      const at::Tensor z = at::matmul(at_, qs.back());  // (b, n, w)
      ++est.passes;
      check_finite = check_finite && !check_is_finite(z);
      zs.push_back(z);
      const at::Tensor mz = zs.size() == 1 ? z : at::cat(zs, 2);  // A^T Q, (b, n, W)
      const at::Tensor q = qs.size() == 1 ? qs[0] : at::cat(qs, 2);
      // P_Q A = Q (A^T Q)^T; the SVD of A^T Q = V S Wb^T gives A ~ (Q Wb) S V^T.
      auto [v, values, wh] = at::linalg_svd(mz, /*full_matrices=*/false);
      est.left = at::matmul(q, wh.transpose(1, 2));
      est.values = values;
      est.right = v;
      const int64_t total = mz.size(2);
      if (total >= full) break;  // the whole column space: exact
      if (niter >= 0 && pass >= niter + 1) break;
      if (niter < 0 && pass >= kMaxAdaptivePasses) break;
      const at::Tensor y = at::matmul(a, z);  // A A^T Q_j: the next block, and a look ahead
      ++est.passes;
      ys.push_back(y);
      if (niter < 0 && pass >= min_passes &&
          settled(values, values_ahead(mz, ys.size() == 1 ? y : at::cat(ys, 2)), threshold,
              noise_scale, beta, shrinker)) {
        break;
      }
      // The next block, orthogonal to all before it: the last columns of a Householder QR of
      // [Q, Y], which stays orthonormal when Y has (numerically) nothing new.
      const int64_t next = std::min(y.size(2), full - total);
      const at::Tensor basis = orthonormal_basis(at::cat({q, y.narrow(2, 0, next)}, 2));
      qs.push_back(basis.narrow(2, total, next));
    }
    if (rank > 0 || est.values.size(1) >= full || k >= full) break;
    // Adaptive rank: done once the k-th value of every matrix is at or below the threshold, so
    // every component above it was found with `oversample` columns to spare. Otherwise start
    // again, twice as wide, from what was found (a warm start).
    if ((est.values.select(1, k - 1) <= threshold).all().item<bool>()) break;
    start = est.left.narrow(2, 0, std::min(k, est.left.size(2))).contiguous();
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
// Returns (estimate like grad, new basis (b, m, k'), passes).
std::tuple<at::Tensor, at::Tensor, int64_t> denoise_impl(const at::Tensor& grad,
    const at::Tensor& start, const Options& o) {
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
  const at::Tensor new_basis =
      est.left.narrow(2, 0, std::min(kept + kBasisMargin, width)).contiguous();
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
  return std::get<0>(denoise_impl(grad, at::Tensor(), o));
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
  auto [out, new_basis, passes] = denoise_impl(grad, start, o);
  if (grad.dim() == 2) new_basis = new_basis.squeeze(0);
  return {out, new_basis, at::scalar_tensor(passes, grad.options().dtype(at::kLong))};
}

}  // namespace

TORCH_LIBRARY_IMPL(rmt, CPU, m) {
  m.impl("denoise", &denoise_cpu);
  m.impl("denoise_warm", &denoise_warm_cpu);
}

}  // namespace rmt
